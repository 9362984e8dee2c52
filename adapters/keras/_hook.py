"""What every Keras backend shares: the hook at the target layer, the inserted
perturbation layer and the read-only view of the step counters.

Nothing here imports a backend (TensorFlow, JAX or torch): the backend's site
(``_tf``, ``_jax``, ``_torch``: one module per backend) does the array work. A site
implements :class:`advgraph.Site` and, for the hook, three calls:

- ``in_pass()``: whether a forward of the adversarial step runs now;
- ``on_output(x)``: the target's output in such a forward (returns ``x`` plus delta);
- ``before_lookup(ids)``: the target's input (mode='matrix': the token ids).
"""

from __future__ import annotations

import threading
import warnings
from collections.abc import Mapping
from contextlib import contextmanager
from typing import Any, Iterator

import keras

from advgraph._errors import AdvGraphWarning, received

__all__ = [
    "run_method",
    "STAT_KEYS",
    "Perturbation",
    "SiteHook",
    "StatsBase",
    "Teacher",
    "check_labels",
    "count_step",
    "delta_for_call",
    "is_reverse_call",
    "token_mask_of",
]

# The keys of ``advgraph_stats``, the same as the PyTorch adapter's (also their order);
# each backend's counters are stored in this order.
STAT_KEYS = ("steps", "plain_steps", "skipped_nonfinite", "skipped_zero")


def check_labels(method: Any, y: Any) -> None:
    """A method whose closure returns ``(loss, logits)`` adds its regulariser to the
    supervised loss: it needs ``y``."""
    if y is None and method.closure == "loss_and_logits":
        from advgraph._errors import received

        raise ValueError(
            f"{method.label} adds its regulariser to the supervised loss, so fit() needs "
            f"labels (fit(x, y)); for an unlabeled batch use method='vat'. {received(y=None)}"
        )


def delta_for_call(site: Any, call: int, x: Any, zeros: Any) -> Any:
    """mode='output': the delta of call ``call`` of the target in this forward, or ``None``.

    ``site.delta`` is ``None``, one array (every call), a tuple with one array per
    call (call ``i`` gets ``delta[i % len(delta)]``, as the PyTorch adapter), or a
    function (a random start): called once per call with ``zeros(x)``, its results
    kept in ``site._made`` until the next ``set_delta`` / ``clear``.
    """
    delta = site.delta
    if delta is None:
        return None
    if isinstance(delta, tuple):
        return delta[call % len(delta)]
    if callable(delta):
        if call < len(site._made):
            return site._made[call]
        made = delta(zeros(x))
        site._made.append(made)
        return made
    return delta


def run_method(site: Any, closure: Any, config: Any) -> Any:
    """Every pass of the method's step on ``site``; the clean loss. The step is
    counted once it ran: in ``steps`` (whatever the method, a user's included), or in
    ``plain_steps`` for the plain step before the method's ``start``.

    ``config``: the wrapped model's settings, or the :class:`advgraph.Method` to run
    (the method with its schedules evaluated at this step, or the plain step: see
    ``_schedule.method_now``).
    """
    from advgraph.methods._plain import PlainStep

    method = getattr(config, "settings", config)
    loss = method.step(site, closure)
    count_step(site, plain=isinstance(method, PlainStep))
    if loss is None:  # a plain step of VAT on an unlabeled batch: nothing to backpropagate
        loss = keras.ops.zeros((), "float32")
    return loss


def count_step(site: Any, plain: bool = False) -> None:
    """One training step: ``steps`` += 1 (``plain=True``: ``plain_steps`` += 1, a
    step before the method's ``start``). Every backend's site has ``count_step``."""
    site.count_step(plain)


def token_mask_of(site: Any, like: Any, cast: Any) -> Any:
    """:meth:`Site.token_mask` for the Keras sites: the target's Keras mask, or ``None``.

    ``site.mask`` is the function the hook got with the output in progress;
    ``cast(mask)`` turns the boolean ``(batch, sequence)`` mask into the backend's
    floating array with a last axis of 1.
    """
    from advgraph._errors import received

    thunk = getattr(site, "mask", None)
    mask = thunk() if callable(thunk) else None
    if mask is None:
        return None
    if tuple(mask.shape) != tuple(like.shape[:-1]):
        raise ValueError(
            "The target's Keras mask must have the shape of its output without the last "
            f"axis (batch, sequence). {received(mask_shape=tuple(mask.shape), output_shape=tuple(like.shape))}"
        )
    return cast(mask)


class StatsBase(Mapping):
    """Counters of one wrapped model, read on the host as ``model.advgraph_stats``.

    The same keys and meaning as the PyTorch adapter's: ``steps``: training steps
    that ran the method (one per ``train_step``, whatever the method); ``plain_steps``:
    steps before the method's ``start`` (one plain forward/backward);
    ``skipped_nonfinite`` / ``skipped_zero``: gradients (one per :meth:`Site.record`)
    that held NaN/inf or were zero (for some sample in output mode), so delta was 0
    there. The training step updates them on the device, inside the compiled step;
    reading a key copies the value to the host.
    Each backend stores them its own way (``_values``, ``reset``, ``record``).
    """

    def _values(self) -> list[int]:
        raise NotImplementedError

    def __getitem__(self, key: str) -> int:
        return self._values()[STAT_KEYS.index(key)]

    def __iter__(self) -> Iterator[str]:
        return iter(STAT_KEYS)

    def __len__(self) -> int:
        return len(STAT_KEYS)

    def __repr__(self) -> str:
        return f"advgraph_stats({dict(zip(STAT_KEYS, self._values()))})"

    def as_dict(self) -> dict[str, int]:
        return dict(zip(STAT_KEYS, self._values()))

    def reset(self) -> None:  # pragma: no cover - every backend overrides it
        raise NotImplementedError


def is_reverse_call(args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    """Whether a ``ReversibleEmbedding`` call is its output head (``reverse=True``).

    The head (a matmul with the transposed matrix, as GPT-2's tied LM head) is not
    the lookup: it is never perturbed in mode='output' and gives no gradient at the site.
    """
    reverse = kwargs.get("reverse", args[1] if len(args) > 1 else False)
    return reverse is True


class ReadOnceGrad:
    """``Site.site_grad`` of every Keras backend's sites: the gradient at the site of
    the last pass that kept one (``self._grad``, set by the backend's pass), read once."""

    _grad: Any

    def site_grad(self) -> Any:
        if self._grad is None:
            raise RuntimeError(
                "No gradient at the perturbation site: no forward_backward() with "
                f"keep_grad=True since it was last read. {received(recorded_gradients=0)}"
            )
        grad, self._grad = self._grad, None
        return grad


class SiteHook:
    """Connects the target layer (perturbation layer or wrapped ``call``) to the site.

    One per wrapped model, shared by every trace; the site of the step being traced
    is thread-local (MirroredStrategy traces each replica in its own thread).
    Outside an adversarial step it does nothing: the output is returned unchanged,
    the same object, so predict/evaluate see the original model bit for bit.
    """

    def __init__(self, mode: str = "output", path: str = "") -> None:
        self._local = threading.local()
        self.mode = mode
        self.path = path
        self.warned_tied = False

    def active_site(self) -> Any:
        return getattr(self._local, "site", None)

    @contextmanager
    def activate(self, site: Any) -> Iterator[None]:
        previous = self.active_site()
        self._local.site = site
        try:
            yield
        finally:
            self._local.site = previous

    def __call__(self, x: Any, mask: Any = None) -> Any:
        """After the target: its output (mode='output').

        ``mask``: a function giving the target's Keras mask (``Embedding(mask_zero=True)``:
        ``ids != 0``) or ``None``; read only by a method that asks for it (neftune).
        """
        site = self.active_site()
        if site is None or not site.in_pass():
            return x
        site.mask = mask
        return site.on_output(x)

    def before(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """Before the target: its inputs (mode='matrix': the token ids)."""
        site = self.active_site()
        if site is None or not site.in_pass():
            return
        inputs = args[0] if args else kwargs.get("inputs")
        site.before_lookup(inputs)

    def reverse(self) -> None:
        """The target's ``reverse=True`` call (a tied output head) ran in a pass."""
        site = self.active_site()
        if site is None or not site.in_pass() or self.mode != "matrix" or self.warned_tied:
            return
        self.warned_tied = True
        warnings.warn(
            f"advgraph: the embedding matrix of '{self.path}' is also the model's output "
            "head (ReversibleEmbedding with tied weights, reverse=True); in mode='matrix' the "
            "perturbed rows reach that head too. delta comes from the lookup's gradient "
            "only. mode='output' perturbs only the lookup's output.",
            AdvGraphWarning,
            stacklevel=2,
        )


@keras.saving.register_keras_serializable(package="advgraph")
class Perturbation(keras.layers.Layer):
    """The layer the graph rewrite inserts right after the embedding's output.

    Identity (it returns its input, the same tensor) except inside an adversarial
    training step, where it adds the current delta. It has no weights.

    Example:
        >>> import numpy as np
        >>> from advgraph.adapters.keras import Perturbation
        >>> x = np.ones((1, 2, 3), "float32")
        >>> bool((np.asarray(Perturbation()(x)) == x).all())
        True
    """

    def __init__(self, hook: SiteHook | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.supports_masking = True
        self._advgraph_hook = hook

    def call(self, inputs: Any, mask: Any = None) -> Any:
        hook = self._advgraph_hook
        if hook is None:
            return inputs
        return hook(inputs, mask=lambda: mask)

    def compute_output_shape(self, input_shape: Any) -> Any:
        return input_shape

    def get_config(self) -> dict[str, Any]:
        return super().get_config()


class Teacher(keras.metrics.Metric):
    """SMART's momentum teacher: one value per trainable variable of the wrapped model.

    ``theta~ <- beta * theta~ + (1 - beta) * theta``; the first update copies
    ``theta``. It moves at most once per optimizer step: an update when
    ``optimizer.iterations`` did not move since the last one leaves it alone.
    Written with ``keras.ops`` once for every backend: TensorFlow and torch assign
    the variables (in-graph on TensorFlow); JAX runs it in a ``StatelessScope`` and
    carries the values in the jitted step's state (the teacher is a metric tracked
    by the model there, as the step counters). Nothing shows in the logs.
    """

    def __init__(self, sources: list[Any], iterations_dtype: str, name: str = "advgraph_teacher") -> None:
        super().__init__(name=name)
        self.values = [
            self.add_variable(
                shape=tuple(v.shape), initializer="zeros", dtype=v.dtype, name=f"teacher_{i}"
            )
            for i, v in enumerate(sources)
        ]
        self.ready = self.add_variable(shape=(), initializer="zeros", dtype="int32", name="ready")
        self.last = self.add_variable(
            shape=(), initializer="zeros", dtype=iterations_dtype, name="last_iteration"
        )

    def update_state(self, *args: Any, **kwargs: Any) -> None:
        """Updated by the adversarial step only."""

    def result(self) -> dict[str, Any]:
        return {}

    def reset_state(self) -> None:
        """The teacher persists across epochs and evaluations."""

    def update(self, current: list[Any], beta: float, iterations: Any) -> None:
        """One momentum update from the trainable values ``current`` (see the class)."""
        ops = keras.ops
        first = ops.equal(self.ready.value, 0)
        moved = ops.not_equal(self.last.value, ops.cast(iterations, self.last.dtype))
        for t, w in zip(self.values, current):
            w = ops.cast(ops.stop_gradient(w), t.dtype)
            mixed = t.value * beta + w * (1.0 - beta)
            t.assign(ops.where(first, w, ops.where(moved, mixed, t.value)))
        self.ready.assign(ops.ones((), "int32"))
        self.last.assign(ops.cast(iterations, self.last.dtype))
