"""The few array operations the core needs, for any array library.

The delta rules are written once against :class:`Ops`. ``ops_for(x)`` returns the
implementation for ``x``'s library without importing any framework that the caller
has not imported already:

- numpy, torch, jax, cupy, ... through the Array API standard (``array-api-compat``);
- TensorFlow through a small shim (array-api-compat has no TensorFlow support). It
  uses only graph-safe ops, so the core runs inside ``tf.function`` and XLA.

Reductions keep their dimensions. Half precision (float16, bfloat16) is widened to
float32 before any reduction by the callers through :meth:`Ops.widen`.
"""

from __future__ import annotations

import struct
import sys
import threading
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Sequence

from advgraph._errors import received

__all__ = ["Ops", "ops_for", "jax_keys"]

Array = Any


class Ops:
    """Array operations used by the core. Subclasses bind them to one library."""

    name = "abstract"

    # -- dtypes ---------------------------------------------------------------
    def dtype(self, x: Array) -> Any:
        return x.dtype

    def is_floating(self, x: Array) -> bool:
        raise NotImplementedError

    def widen(self, x: Array) -> Array:
        """Return ``x`` in float32 if it is a half-precision float, else ``x``."""
        raise NotImplementedError

    def cast(self, x: Array, dtype: Any) -> Array:
        raise NotImplementedError

    def ndim(self, x: Array) -> int:
        return len(x.shape)

    # -- elementwise ----------------------------------------------------------
    def abs(self, x: Array) -> Array:
        raise NotImplementedError

    def sqrt(self, x: Array) -> Array:
        raise NotImplementedError

    def sign(self, x: Array) -> Array:
        raise NotImplementedError

    def isfinite(self, x: Array) -> Array:
        raise NotImplementedError

    def where(self, cond: Array, a: Array, b: Array) -> Array:
        raise NotImplementedError

    def clip(self, x: Array, low: float, high: float) -> Array:
        raise NotImplementedError

    def clip_to(self, x: Array, bound: Array) -> Array:
        """``x`` clamped elementwise to ``[-bound, bound]`` (``bound >= 0``, an array)."""
        return self.where(x > bound, bound, self.where(x < -bound, -bound, x))

    def zeros_like(self, x: Array) -> Array:
        raise NotImplementedError

    def logical_and(self, a: Array, b: Array) -> Array:
        raise NotImplementedError

    def logical_not(self, a: Array) -> Array:
        raise NotImplementedError

    def exp(self, x: Array) -> Array:
        raise NotImplementedError

    def log(self, x: Array) -> Array:
        raise NotImplementedError

    def stop_gradient(self, x: Array) -> Array:
        """``x`` cut out of the autodiff graph (torch ``detach``, tf ``stop_gradient``)."""
        raise NotImplementedError

    # -- reductions (keepdims=True) -------------------------------------------
    def sum(self, x: Array, axes: Sequence[int]) -> Array:
        raise NotImplementedError

    def amax(self, x: Array, axes: Sequence[int]) -> Array:
        raise NotImplementedError

    def l2_norm(self, x: Array, axes: Sequence[int]) -> Array:
        """The plain l2 norm over ``axes`` (no guard against over- or underflow)."""
        return self.sqrt(self.sum(x * x, axes))

    def reshape(self, x: Array, shape: Sequence[int]) -> Array:
        raise NotImplementedError

    def finfo(self, x: Array) -> Any:
        """``tiny``, ``eps`` and ``max`` of ``x``'s floating dtype (Python numbers)."""
        raise NotImplementedError

    # -- eager only (a Python value: never inside a traced or jitted function) --
    def all_true(self, x: Array) -> bool:
        raise NotImplementedError

    def size(self, x: Array) -> int:
        """The number of entries of ``x``."""
        count = 1
        for n in x.shape:
            count *= int(n)
        return count

    def to_float(self, x: Array) -> float:
        """The value of a one-entry array as a Python float."""
        raise NotImplementedError

    def falses(self, like: Array, shape: Sequence[int]) -> Array:
        """A boolean array of ``shape``, all False, of ``like``'s library and device."""
        raise NotImplementedError

    def scalar_quotient(self, numerator: float, denominator: float, like: Array) -> float | None:
        """``numerator / d`` as a Python float, bit for bit what this library gives for
        ``numerator / array`` with ``array`` a one-entry array of ``like``'s dtype
        holding ``d`` (``denominator``, its exact value); None where that is not known
        (the caller then divides arrays)."""
        return None

    # -- randomness -----------------------------------------------------------
    def generator(self, rng: Any = None) -> Any:
        """Return one generator to draw every random number of a call from."""
        return rng

    def uniform_like(self, x: Array, low: float, high: float, rng: Any = None) -> Array:
        raise NotImplementedError

    def normal_like(self, x: Array, rng: Any = None) -> Array:
        raise NotImplementedError


_KEYS = threading.local()


@contextmanager
def jax_keys(next_key: Callable[[], Any]) -> Iterator[None]:
    """Within this block, random draws on jax arrays without ``rng`` use ``next_key()``.

    JAX has no global random state: a caller that runs the core inside a jitted
    step (the Keras JAX adapter) passes a function returning a fresh
    ``jax.random`` key per draw, split from a key carried in its state.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from advgraph._ops import jax_keys, ops_for
        >>> keys = iter(jax.random.split(jax.random.key(0), 4))
        >>> with jax_keys(lambda: next(keys)):
        ...     noise = ops_for(jnp.zeros(3)).normal_like(jnp.zeros(3))
        >>> noise.shape
        (3,)
    """
    previous = getattr(_KEYS, "fn", None)
    _KEYS.fn = next_key
    try:
        yield
    finally:
        _KEYS.fn = previous


def _jax_key(rng: Any) -> Any:
    if rng is not None:
        return rng
    fn = getattr(_KEYS, "fn", None)
    if fn is None:
        raise ValueError(
            "Random numbers for jax arrays need a key: pass rng=jax.random.key(seed). "
            f"{received(rng=rng)}"
        )
    return fn()


def _jax_primal(x: Array) -> Array:
    """``x`` without its autodiff tracers (the value ``stop_gradient`` means).

    Inside ``jax.value_and_grad`` a value is a linearize/JVP tracer of that
    transformation; its primal is the same value one level up. A value kept across
    passes (VAT's clean log-probabilities) must be the primal, or it would leak the
    finished transformation's tracer into the next pass.
    """
    jax = sys.modules["jax"]
    while isinstance(x, jax.core.Tracer) and type(x).__name__ in ("JVPTracer", "LinearizeTracer"):
        x = x.primal
    return x


class _ArrayApiOps(Ops):
    """numpy, torch and every library array-api-compat covers."""

    def __init__(self, xp: Any, name: str) -> None:
        self.xp = xp
        self.name = name

    def is_floating(self, x: Array) -> bool:
        if self.name == "torch":
            return bool(x.is_floating_point())
        if self.name == "numpy":
            import numpy as np

            # ml_dtypes' bfloat16 is not a numpy.floating subtype, but is a float.
            return np.issubdtype(x.dtype, np.floating) or x.dtype.name in ("bfloat16",)
        return self.xp.isdtype(x.dtype, "real floating")

    def _is_half(self, x: Array) -> bool:
        return str(x.dtype).rsplit(".", 1)[-1] in ("float16", "bfloat16", "half")

    def widen(self, x: Array) -> Array:
        if self._is_half(x):
            return self.cast(x, self.xp.float32)
        return x

    def cast(self, x: Array, dtype: Any) -> Array:
        if x.dtype == dtype:
            return x
        if self.name == "torch":
            return x.to(dtype)
        return x.astype(dtype)

    def abs(self, x: Array) -> Array:
        return self.xp.abs(x)

    def sqrt(self, x: Array) -> Array:
        return self.xp.sqrt(x)

    def sign(self, x: Array) -> Array:
        return self.xp.sign(x)

    def isfinite(self, x: Array) -> Array:
        return self.xp.isfinite(x)

    def where(self, cond: Array, a: Array, b: Array) -> Array:
        return self.xp.where(cond, a, b)

    def clip(self, x: Array, low: float, high: float) -> Array:
        if self.name == "torch":
            return x.clamp(low, high)
        return self.xp.clip(x, low, high)

    def clip_to(self, x: Array, bound: Array) -> Array:
        if self.name == "torch":
            return x.clamp(-bound, bound)
        return self.xp.minimum(self.xp.maximum(x, -bound), bound)

    def zeros_like(self, x: Array) -> Array:
        return self.xp.zeros_like(x)

    def logical_and(self, a: Array, b: Array) -> Array:
        return self.xp.logical_and(a, b)

    def logical_not(self, a: Array) -> Array:
        return self.xp.logical_not(a)

    def exp(self, x: Array) -> Array:
        return self.xp.exp(x)

    def log(self, x: Array) -> Array:
        return self.xp.log(x)

    def stop_gradient(self, x: Array) -> Array:
        if self.name == "torch":
            return x.detach()
        if self.name == "jax":
            return sys.modules["jax"].lax.stop_gradient(_jax_primal(x))
        return x

    def sum(self, x: Array, axes: Sequence[int]) -> Array:
        return self.xp.sum(x, axis=tuple(axes), keepdims=True)

    def amax(self, x: Array, axes: Sequence[int]) -> Array:
        return self.xp.max(x, axis=tuple(axes), keepdims=True)

    def l2_norm(self, x: Array, axes: Sequence[int]) -> Array:
        if not axes:  # a norm over no axis (torch would reduce over every axis)
            return self.abs(x)
        if self.name == "torch":  # one pass, no temporary array of squares
            return sys.modules["torch"].linalg.vector_norm(x, dim=tuple(axes), keepdim=True)
        if self.name == "numpy":
            import numpy as np

            # The caller checks the norm's range: a square that over- or underflows
            # only puts it outside, and must not warn or raise (np.seterr).
            with np.errstate(over="ignore", under="ignore", invalid="ignore"):
                return super().l2_norm(x, axes)
        return super().l2_norm(x, axes)

    def finfo(self, x: Array) -> Any:
        return self.xp.finfo(x.dtype)

    def all_true(self, x: Array) -> bool:
        return bool(self.xp.all(x))

    def to_float(self, x: Array) -> float:
        if self.name in ("torch", "numpy"):  # .item(): one call for any one-entry array
            return float(x.item())
        return float(x.reshape(()))

    def scalar_quotient(self, numerator: float, denominator: float, like: Array) -> float | None:
        # A Python float meets a float32/float64 array as a "weak" scalar: it is cast to
        # the array's dtype first. torch computes ``n / array`` as
        # ``array.reciprocal() * n`` (Tensor.__rdiv__), numpy divides. Each step is one
        # IEEE operation in the dtype; done in double precision and rounded once to
        # float32 it gives the same bits (double rounding is harmless for + - * / when
        # the wide format has at least 2p + 2 bits: 53 >= 2 * 24 + 2).
        dtype = str(like.dtype).rsplit(".", 1)[-1]
        if self.name not in ("torch", "numpy") or dtype not in ("float32", "float64"):
            return None
        if dtype == "float64":
            return (1.0 / denominator) * numerator if self.name == "torch" else numerator / denominator
        try:
            if self.name == "torch":
                return _to_float32(_to_float32(1.0 / denominator) * _to_float32(numerator))
            return _to_float32(_to_float32(numerator) / denominator)
        except OverflowError:  # past float32's range, where a Python raises: divide arrays
            return None

    def falses(self, like: Array, shape: Sequence[int]) -> Array:
        if self.name == "torch":
            return sys.modules["torch"].zeros(tuple(shape), dtype=sys.modules["torch"].bool, device=like.device)
        return self.xp.zeros(tuple(shape), dtype=self.xp.bool)

    def reshape(self, x: Array, shape: Sequence[int]) -> Array:
        if self.name == "numpy":  # numpy scalars (0-d results) become arrays again
            import numpy as np

            return np.asarray(x).reshape(tuple(shape))
        return self.xp.reshape(x, tuple(shape))

    def generator(self, rng: Any = None) -> Any:
        if self.name == "numpy":
            import numpy as np

            # A seed (or None) becomes one Generator here: seeding a fresh Generator in
            # each draw would replay the same stream for every draw of one call.
            return rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
        return rng

    def uniform_like(self, x: Array, low: float, high: float, rng: Any = None) -> Array:
        if self.name == "torch":
            torch = sys.modules["torch"]
            out = torch.empty(x.shape, dtype=self.widen(x).dtype, device=x.device)
            return out.uniform_(low, high, generator=rng)
        if self.name == "numpy":
            import numpy as np

            gen = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
            return gen.uniform(low, high, size=x.shape).astype(self.widen(x).dtype)
        if self.name == "jax":
            jax = sys.modules["jax"]
            dtype = self.widen(x).dtype
            return jax.random.uniform(_jax_key(rng), x.shape, dtype, minval=low, maxval=high)
        raise NotImplementedError(  # pragma: no cover
            f"Random starts are implemented for numpy, torch, jax and tensorflow arrays. "
            f"{received(array_type=type(x).__name__)}"
        )

    def normal_like(self, x: Array, rng: Any = None) -> Array:
        if self.name == "torch":
            torch = sys.modules["torch"]
            out = torch.empty(x.shape, dtype=self.widen(x).dtype, device=x.device)
            return out.normal_(generator=rng)
        if self.name == "numpy":
            import numpy as np

            gen = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
            return gen.standard_normal(size=x.shape).astype(self.widen(x).dtype)
        if self.name == "jax":
            jax = sys.modules["jax"]
            return jax.random.normal(_jax_key(rng), x.shape, self.widen(x).dtype)
        raise NotImplementedError(  # pragma: no cover
            f"Random starts are implemented for numpy, torch, jax and tensorflow arrays. "
            f"{received(array_type=type(x).__name__)}"
        )


def _to_float32(value: float) -> float:
    """``value`` rounded to the nearest float32 (ties to even), as a Python float:
    inf past float32's range, as the arrays give (or OverflowError, the caller's
    cue to divide arrays)."""
    return float(struct.unpack("f", struct.pack("f", value))[0])


_TF_OPS: "_TensorFlowOps | None" = None
_API_OPS: dict[str, _ArrayApiOps] = {}


def ops_for(x: Array, arg: str = "grad") -> Ops:
    """Return the :class:`Ops` for ``x``'s array library (``arg``: x's name in errors).

    Raises:
        TypeError: if ``x`` is not an array of a supported library.
    """
    global _TF_OPS
    module = type(x).__module__
    # A torch tensor or numpy array whose library was resolved before: no namespace
    # lookup (this runs once per delta, and its cost shows in a compiled step).
    if module.startswith("torch"):
        torch = sys.modules.get("torch")
        known = _API_OPS.get("torch")
        if known is not None and torch is not None and isinstance(x, torch.Tensor):
            return known
    elif module == "numpy":
        numpy = sys.modules.get("numpy")
        known = _API_OPS.get("numpy")
        if known is not None and numpy is not None and type(x) is numpy.ndarray:
            return known
    if module.startswith("tensorflow"):
        tf = sys.modules.get("tensorflow")
        if tf is not None and (tf.is_tensor(x) or isinstance(x, tf.Variable)):
            if _TF_OPS is None:
                _TF_OPS = _TensorFlowOps()
            return _TF_OPS
    else:
        try:
            import array_api_compat
        except ImportError:  # pragma: no cover - array-api-compat is a core dependency
            array_api_compat = None
        if array_api_compat is not None and _is_array(x, array_api_compat):
            xp = array_api_compat.array_namespace(x)
            name = xp.__name__.rsplit(".", 1)[-1]
            if xp.__name__.startswith("jax"):  # jax.numpy: not numpy
                name = "jax"
            if name not in _API_OPS:
                _API_OPS[name] = _ArrayApiOps(xp, name)
            return _API_OPS[name]
    raise TypeError(
        "Expected an array: a numpy array, a torch tensor, a TensorFlow tensor or any "
        f"array supported by array-api-compat. {received(**{arg: type(x).__name__})}"
    )


def _is_array(x: Array, array_api_compat: Any) -> bool:
    if isinstance(x, (bool, int, float, complex, str, bytes, list, tuple, dict)) or x is None:
        return False
    try:
        return bool(array_api_compat.is_array_api_obj(x))
    except Exception:  # pragma: no cover - defensive: unknown objects
        return False


# TensorFlow's Ops live in their own module; defined after Ops, which it subclasses.
from advgraph._ops_tf import _TensorFlowOps  # noqa: E402
