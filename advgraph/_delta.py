"""Delta rules: the framework-agnostic heart of advgraph.

Every function here takes an array of any supported library (numpy, torch,
TensorFlow, anything array-api-compat covers) and returns the same array type,
shape, dtype and device. Nothing here imports a framework.

Numerics:
    - Norms of float16/bfloat16 arrays accumulate in float32 (a float16 sum of
      squares overflows at 65504).
    - The l2 norm is computed on ``g / max|g|``, so even float32 gradients near
      the top of their range give a finite direction.
    - A zero gradient gives delta = 0 (no NaN). A gradient holding NaN or inf gives
      delta = 0 for that row (``per_sample``) or the whole array, and the
      ``nonfinite`` flag of :func:`compute_delta` says so. delta never holds NaN.
"""

from __future__ import annotations

import math
import numbers
import sys

from typing import Any, NamedTuple

from advgraph._errors import check_choice, check_positive_finite, received
from advgraph._ops import Ops, ops_for

__all__ = ["DeltaResult", "compute_delta", "fgm_delta", "project", "random_init", "NORMS"]

Array = Any
NORMS = ("l2", "linf")


class DeltaResult(NamedTuple):
    """What :func:`compute_delta` returns.

    Attributes:
        delta: the perturbation, same type/shape/dtype/device as the gradient.
        nonfinite: boolean array, shape ``(batch,)`` when ``per_sample`` else ``()``:
            True where the gradient held NaN or inf (delta set to 0 there).
        zero: boolean array of the same shape: True where the gradient was all zeros
            (delta is 0 there, as the direction is undefined).
    """

    delta: Array
    nonfinite: Array
    zero: Array


def _check_array(grad: Array, per_sample: bool, name: str = "grad") -> Ops:
    ops = ops_for(grad, name)
    if not ops.is_floating(grad):
        raise TypeError(
            f"`{name}` must have a floating-point dtype. {received(dtype=str(ops.dtype(grad)))}"
        )
    if not isinstance(per_sample, bool):
        raise TypeError(f"`per_sample` must be True or False. {received(per_sample=per_sample)}")
    if per_sample and ops.ndim(grad) == 0:
        raise ValueError(
            "`per_sample=True` needs an array with a batch axis (ndim >= 1), normalised "
            f"separately along axis 0. {received(shape=tuple(grad.shape))}"
        )
    return ops


def _axes(ndim: int, per_sample: bool) -> tuple[int, ...]:
    return tuple(range(1, ndim)) if per_sample else tuple(range(ndim))


def _torch_compiling() -> bool:
    compiler = getattr(sys.modules.get("torch"), "compiler", None)
    return bool(compiler is not None and compiler.is_compiling())


def _eager(ops: Ops) -> bool:
    """numpy, or torch outside ``torch.compile``: a branch on the data costs nothing."""
    return ops.name == "numpy" or (ops.name == "torch" and not _torch_compiling())


# The plain l2 norm (one pass, no scaling) is exact to rounding when it lies in
# (lo, hi): below hi no square and no partial sum overflows; above lo the squares
# that underflow (each off by at most ``tiny``) change a sum of up to 2**31 of them by
# at most ``eps`` relative (one or two units in the last place, as rounding does).
# Anything else (NaN, inf, an all-zero row, a norm near either end of the range)
# takes the scaled, masked computation.
_MAX_COUNT = 2.0**31


_RANGES: dict[str, tuple[float, float]] = {}  # by dtype name: the range for each dtype


def _plain_range(ops: Ops, x: Array) -> tuple[float, float]:
    key = f"{ops.name}:{ops.dtype(x)}"
    found = _RANGES.get(key)
    if found is None:
        info = ops.finfo(x)
        found = (_MAX_COUNT * float(info.tiny) / float(info.eps)) ** 0.5, float(info.max) ** 0.5 / 2.0
        _RANGES[key] = found
    return found


def _in_range(ops: Ops, norms: Array, x: Array) -> Array:
    lo, hi = _plain_range(ops, x)
    return ops.logical_and(norms > lo, norms < hi)


def _all_in_range(ops: Ops, norms: Array, x: Array, value: float | None = None) -> bool:
    """Eagerly: whether every norm is in the plain range (False for NaN). One norm
    (a global delta, matrix mode) is compared as the Python number ``value``: one
    read, no array operations."""
    if value is not None:
        lo, hi = _plain_range(ops, x)
        return lo < value < hi
    return ops.all_true(_in_range(ops, norms, x))


def _one_factor(ops: Ops, epsilon: Any, value: float | None, x: Array) -> float | None:
    """``epsilon / norms`` for a single norm ``value`` (a global delta) as a Python
    number, bit for bit the array quotient: the product then costs one array
    operation. None: divide the arrays."""
    if value is None or isinstance(epsilon, bool) or not isinstance(epsilon, (int, float)):
        return None
    return ops.scalar_quotient(epsilon, value, x)


class _NothingSkipped(DeltaResult):
    """A :class:`DeltaResult` whose flags are all False by construction (the eager
    two-pass path): :func:`skipped_nothing` knows it without reading them."""

    __slots__ = ()

    def _replace(self, **changes: Any) -> DeltaResult:  # type: ignore[override]
        return DeltaResult(*self)._replace(**changes)


def skipped_nothing(result: DeltaResult) -> bool:
    """True when ``result``'s flags are known to be all False without reading them
    (False means: read them)."""
    return type(result) is _NothingSkipped


def _finite_part(ops: Ops, x: Array, axes: tuple[int, ...]) -> tuple[Array, Array, Array]:
    """``(clean, finite, peak)``: ``x`` with NaN/inf entries set to 0, per reduction
    whether ``x`` was all finite, and ``max |clean|`` per reduction.

    Masking keeps every later operation finite: no ``inf * 0`` or overflowing square
    is ever computed (numpy would warn, and raise under ``np.seterr``). Eager numpy and
    torch first check the peak, which they need anyway and which is finite only when
    every entry is (NaN propagates through their max): the masking, a few passes over
    the whole array, then runs only when something is non-finite. TensorFlow (graph
    mode, XLA) and torch inside ``torch.compile`` (a data-dependent branch would
    break the graph) always take the branch-free path.
    """
    if _eager(ops):
        peak = ops.amax(ops.abs(x), axes)
        if bool(ops.isfinite(ops.amax(peak, tuple(range(ops.ndim(peak)))))):
            return x, ops.isfinite(peak), peak
    mask = ops.isfinite(x)
    clean = ops.where(mask, x, ops.zeros_like(x))
    bad = ops.sum(ops.cast(ops.logical_not(mask), ops.dtype(x)), axes)
    return clean, bad == 0.0, ops.amax(ops.abs(clean), axes)


def _flag(ops: Ops, flag: Array, grad: Array, per_sample: bool) -> Array:
    """Reshape a keepdims reduction result to ``(batch,)`` or ``()``."""
    if per_sample:
        # -1, not grad.shape[0]: the batch size is None inside a tf.function traced
        # with an unknown batch dimension (as Keras traces train_step).
        return ops.reshape(flag, (-1,))
    return ops.reshape(flag, ())


def _radius(epsilon: Any) -> Any:
    """A positive finite number; or a 0-d array as is (a scheduled radius evaluated
    inside a compiled step, whose value is known only when the step runs)."""
    if type(epsilon) is float and 0.0 < epsilon < math.inf:  # the common case, checked cheaply
        return epsilon
    if getattr(epsilon, "shape", None) == () and not isinstance(epsilon, numbers.Real):
        return epsilon
    return check_positive_finite("epsilon", epsilon)


def compute_delta(
    grad: Array,
    epsilon: float = 1.0,
    *,
    norm: str = "l2",
    per_sample: bool = False,
) -> DeltaResult:
    """Compute the FGM/FGSM perturbation of ``grad`` and report skipped rows.

    ``norm="l2"``: ``delta = epsilon * g / ||g||_2`` (Miyato et al., 2017).
    ``norm="linf"``: ``delta = epsilon * sign(g)`` (Goodfellow et al., 2015).
    With ``per_sample=True`` the norm is taken over all axes but the first,
    separately for each row of axis 0.

    Args:
        grad: gradient array (numpy, torch, tensorflow, ...), floating point.
        epsilon: radius of the perturbation, a positive finite number.
        norm: ``"l2"`` or ``"linf"``.
        per_sample: normalise each row of axis 0 separately.

    Returns:
        A :class:`DeltaResult` ``(delta, nonfinite, zero)``.

    Example:
        >>> import numpy as np
        >>> from advgraph._delta import compute_delta
        >>> res = compute_delta(np.array([[3.0, 4.0], [np.nan, 1.0]]), 1.0, per_sample=True)
        >>> res.delta
        array([[0.6, 0.8],
               [0. , 0. ]])
        >>> res.nonfinite
        array([False,  True])
    """
    epsilon = _radius(epsilon)
    norm = check_choice("norm", norm, NORMS)
    ops = _check_array(grad, per_sample)
    axes = _axes(ops.ndim(grad), per_sample)
    wide = ops.widen(grad)
    if norm == "l2" and _eager(ops) and ops.ndim(grad) > 0:
        # The common case, every plain norm in range, in two passes over the array (the
        # norm, then the product); the same formula as the masked path below gives
        # those rows, so eager and compiled code agree.
        norms = ops.l2_norm(wide, axes)
        value = ops.to_float(norms) if ops.size(norms) == 1 else None
        if _all_in_range(ops, norms, wide, value):
            # Every norm is finite and positive: no row skipped, both flags False.
            flags = (ops.size(norms),) if per_sample else ()
            factor = _one_factor(ops, epsilon, value, wide)
            return _NothingSkipped(
                ops.cast(wide * (epsilon / norms if factor is None else factor), ops.dtype(grad)),
                ops.falses(norms, flags),
                ops.falses(norms, flags),
            )
    g, finite, peak = _finite_part(ops, wide, axes)
    zero = ops.logical_and(finite, peak == 0.0)
    ok = ops.logical_and(finite, ops.logical_not(zero))
    one = ops.zeros_like(peak) + 1.0
    nothing = ops.zeros_like(peak)
    # Skipped rows get a factor of 0 (a per-row array, not a pass over delta); g is
    # finite after masking, so 0 * g is exactly 0.
    if norm == "l2":
        # peak of the masked part is finite; dividing by it keeps every square <= 1.
        scaled = g / ops.where(peak > 0.0, peak, one)
        sumsq = ops.where(ok, ops.sum(scaled * scaled, axes), one)
        delta = scaled * ops.where(ok, epsilon / ops.sqrt(sumsq), nothing)
        # Rows whose plain norm is in range: the two-pass formula of the eager path. The
        # other rows are zeroed before the product, so it never overflows there either.
        plain = ops.l2_norm(g, axes)
        direct = ops.logical_and(ok, _in_range(ops, plain, g))
        picked = ops.where(direct, g, ops.zeros_like(g))
        delta = ops.where(direct, picked * (epsilon / ops.where(direct, plain, one)), delta)
    else:
        delta = ops.sign(g) * ops.where(ok, one * epsilon, nothing)
    delta = ops.cast(delta, ops.dtype(grad))
    if ops.ndim(grad) == 0:  # numpy turns 0-d results into scalars: hand back an array
        delta = ops.reshape(delta, ())
    return DeltaResult(
        delta,
        _flag(ops, ops.logical_not(finite), grad, per_sample),
        _flag(ops, zero, grad, per_sample),
    )


def fgm_delta(
    grad: Array,
    epsilon: float = 1.0,
    *,
    norm: str = "l2",
    per_sample: bool = False,
) -> Array:
    """Return the FGM perturbation ``epsilon * g / ||g||`` (or ``epsilon * sign(g)``).

    Same array type, shape, dtype and device as ``grad``. A zero gradient, or one
    holding NaN or inf, gives ``delta = 0`` (per row with ``per_sample=True``);
    use :func:`advgraph.compute_delta` to learn whether that happened.

    Args:
        grad: gradient array (numpy, torch, tensorflow, ...), floating point.
        epsilon: radius, a positive finite number.
        norm: ``"l2"`` (``epsilon * g / ||g||_2``) or ``"linf"`` (``epsilon * sign(g)``).
        per_sample: normalise each row of axis 0 separately (the norm over all other axes).

    Example:
        >>> import numpy as np
        >>> import advgraph
        >>> advgraph.fgm_delta(np.array([3.0, 4.0]), epsilon=0.5)
        array([0.3, 0.4])
        >>> advgraph.fgm_delta(np.array([3.0, -4.0]), epsilon=0.5, norm="linf")
        array([ 0.5, -0.5])
    """
    return compute_delta(grad, epsilon, norm=norm, per_sample=per_sample).delta


def project(
    delta: Array,
    epsilon: float,
    *,
    norm: str = "l2",
    per_sample: bool = False,
) -> Array:
    """Project ``delta`` onto the ``epsilon``-ball (l2 or linf; global or per sample).

    l2: ``delta * min(1, epsilon / ||delta||)``; linf: ``clip(delta, -epsilon, epsilon)``.
    Entries that are NaN or inf are set to 0 (per row with ``per_sample``).

    Example:
        >>> import numpy as np
        >>> import advgraph
        >>> advgraph.project(np.array([3.0, 4.0]), 1.0)
        array([0.6, 0.8])
        >>> advgraph.project(np.array([0.3, -2.0]), 1.0, norm="linf")
        array([ 0.3, -1. ])
    """
    epsilon = _radius(epsilon)
    norm = check_choice("norm", norm, NORMS)
    ops = _check_array(delta, per_sample, name="delta")
    axes = _axes(ops.ndim(delta), per_sample)
    d, finite, peak = _finite_part(ops, ops.widen(delta), axes)
    if norm == "l2":
        ok = ops.logical_and(finite, peak > 0.0)
        one = ops.zeros_like(peak) + 1.0
        safe_peak = ops.where(peak > 0.0, peak, one)
        scaled = d / safe_peak
        length = ops.sqrt(ops.where(ok, ops.sum(scaled * scaled, axes), one)) * safe_peak
        outside = length > epsilon
        # The quotient only where it is used: a tiny length would overflow it elsewhere.
        factor = ops.where(outside, epsilon / ops.where(outside, length, one), one)
        out = d * factor
    else:
        out = ops.clip(d, -epsilon, epsilon)
    out = ops.where(finite, out, ops.zeros_like(out))
    return ops.cast(out, ops.dtype(delta))


def random_init(
    like: Array,
    epsilon: float,
    *,
    norm: str = "l2",
    per_sample: bool = False,
    rng: Any = None,
) -> Array:
    """Draw a random start uniformly from the ``epsilon``-ball, shaped like ``like``.

    linf: each entry uniform in ``[-epsilon, epsilon]``. l2: a uniformly random
    direction times ``epsilon * u**(1/n)``, ``u ~ U(0, 1)`` and ``n`` the number of
    entries per ball, which is uniform in the ball (Madry et al., 2018, random start).

    Args:
        like: array whose type, shape, dtype and device the result takes.
        epsilon: radius.
        norm: ``"l2"`` or ``"linf"``.
        per_sample: one ball per row of axis 0.
        rng: optional generator of the array library (``numpy.random.Generator`` or
            seed, ``torch.Generator``, ``tf.random.Generator``).

    Example:
        >>> import numpy as np
        >>> import advgraph
        >>> d = advgraph.random_init(np.zeros((2, 3)), 0.1, norm="linf", rng=0)
        >>> bool((np.abs(d) <= 0.1).all())
        True
    """
    epsilon = check_positive_finite("epsilon", epsilon)
    norm = check_choice("norm", norm, NORMS)
    ops = _check_array(like, per_sample, name="like")
    rng = ops.generator(rng)
    if norm == "linf":
        out = ops.uniform_like(like, -epsilon, epsilon, rng)
        return ops.cast(out, ops.dtype(like))
    axes = _axes(ops.ndim(like), per_sample)
    direction = ops.normal_like(like, rng)
    # A normal draw is zero with probability 0; compute_delta would give 0 then anyway.
    unit = compute_delta(direction, 1.0, norm="l2", per_sample=per_sample).delta
    count = ops.sum(ops.zeros_like(unit) + 1.0, axes)  # entries per ball, keepdims
    u = ops.uniform_like(count, 0.0, 1.0, rng)
    radius = (u ** (1.0 / count)) * epsilon
    return ops.cast(unit * radius, ops.dtype(like))


