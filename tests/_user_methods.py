"""Two methods a user writes outside advgraph: R-Drop and FGM with a relative epsilon.

Nothing in advgraph knows them: they subclass the public :class:`advgraph.Method`
and call only the public :class:`advgraph.Site` and :func:`advgraph.compute_delta`.
Their math is written with the framework the arrays belong to (``_xp`` picks
torch, TensorFlow or JAX from the array's type), as a user's code would, so the
same class runs on advgraph's PyTorch adapter and on Keras' TensorFlow, JAX and
torch backends. Used by ``test_user_methods.py``, ``keras_user_method_cases.py``
and ``_user_methods_worker.py``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import advgraph


class _Torch:
    def __init__(self) -> None:
        import torch

        self.m = torch

    def log_softmax(self, z: Any) -> Any:
        return self.m.log_softmax(z, dim=-1)

    def exp(self, z: Any) -> Any:
        return self.m.exp(z)

    def sum(self, z: Any, axis: Any = None, keepdims: bool = False) -> Any:
        if axis is None:
            return z.sum()
        return z.sum(dim=axis, keepdim=keepdims)

    def sqrt(self, z: Any) -> Any:
        return self.m.sqrt(z)

    def float32(self, z: Any) -> Any:
        return z.float()

    def cast_like(self, z: Any, like: Any) -> Any:
        return z.to(like.dtype)

    def stop(self, z: Any) -> Any:
        return z.detach()


class _TensorFlow:
    def __init__(self) -> None:
        import tensorflow as tf

        self.m = tf

    def log_softmax(self, z: Any) -> Any:
        return self.m.nn.log_softmax(z, axis=-1)

    def exp(self, z: Any) -> Any:
        return self.m.exp(z)

    def sum(self, z: Any, axis: Any = None, keepdims: bool = False) -> Any:
        return self.m.reduce_sum(z, axis=axis, keepdims=keepdims)

    def sqrt(self, z: Any) -> Any:
        return self.m.sqrt(z)

    def float32(self, z: Any) -> Any:
        return self.m.cast(z, self.m.float32)

    def cast_like(self, z: Any, like: Any) -> Any:
        return self.m.cast(z, like.dtype)

    def stop(self, z: Any) -> Any:
        return self.m.stop_gradient(z)


class _Jax:
    def __init__(self) -> None:
        import jax

        self.m = jax

    def log_softmax(self, z: Any) -> Any:
        return self.m.nn.log_softmax(z, axis=-1)

    def exp(self, z: Any) -> Any:
        return self.m.numpy.exp(z)

    def sum(self, z: Any, axis: Any = None, keepdims: bool = False) -> Any:
        return self.m.numpy.sum(z, axis=axis, keepdims=keepdims)

    def sqrt(self, z: Any) -> Any:
        return self.m.numpy.sqrt(z)

    def float32(self, z: Any) -> Any:
        return z.astype("float32")

    def cast_like(self, z: Any, like: Any) -> Any:
        return z.astype(like.dtype)

    def stop(self, z: Any) -> Any:
        return self.m.lax.stop_gradient(z)


def _xp(array: Any) -> Any:
    """The framework of ``array`` (torch, TensorFlow or JAX, also traced)."""
    module = type(array).__module__
    if module.startswith("torch"):
        return _Torch()
    if module.startswith("tensorflow"):
        return _TensorFlow()
    if module.startswith("jax"):
        return _Jax()
    raise TypeError(f"An array of torch, TensorFlow or JAX was expected. Received: type={type(array).__name__}")


def symmetric_kl(logits_a: Any, logits_b: Any) -> Any:
    """``(KL(p_a || p_b) + KL(p_b || p_a)) / 2``, summed over classes, mean over samples.

    Gradients flow through both distributions (the R-Drop paper's loss)."""
    xp = _xp(logits_a)
    log_a = xp.log_softmax(xp.float32(logits_a))
    log_b = xp.log_softmax(xp.float32(logits_b))
    both = xp.exp(log_a) * (log_a - log_b) + xp.exp(log_b) * (log_b - log_a)
    batch = logits_a.shape[0]
    return xp.sum(both) / (2.0 * batch)


@dataclass(frozen=True, kw_only=True)
class RDrop(advgraph.Method):
    """R-Drop (Liang et al., "R-Drop: Regularized Dropout for Neural Networks",
    NeurIPS 2021): two forwards of the same batch (different dropout masks), one
    backward of ``(CE_1 + CE_2) / 2 + alpha * (KL(p_1 || p_2) + KL(p_2 || p_1)) / 2``.
    """

    closure: ClassVar[str] = "loss_and_logits"  # the closure returns (loss, logits)

    alpha: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.alpha, (int, float)) or isinstance(self.alpha, bool) or self.alpha < 0:
            raise ValueError(f"`alpha` must be a number >= 0. Received: alpha={self.alpha!r}")

    def passes(self) -> int:
        return 1  # one backward through both forwards

    def objective(self, outs: list[Any]) -> Any:
        (loss_1, logits_1), (loss_2, logits_2) = outs
        kl = symmetric_kl(logits_1, logits_2)
        return (loss_1 + loss_2) / 2 + self.alpha * _xp(kl).cast_like(kl, loss_1)

    def step(self, site: advgraph.Site, closure: Any) -> Any:
        seen: dict[str, Any] = {}

        def objective(outs: list[Any]) -> Any:
            # What the step returns is computed (and detached) inside the pass: on JAX
            # the outputs are traced values that must not leave it.
            seen["loss"] = self.report(outs)
            return self.objective(outs)

        site.joint_backward(closure, [None, None], objective)
        return seen["loss"]

    def report(self, outs: list[Any]) -> Any:
        """What the step returns (the logged loss): the mean of both clean losses."""
        (loss_1, _), (loss_2, _) = outs
        return _xp(loss_1).stop((loss_1 + loss_2) / 2)


@dataclass(frozen=True, kw_only=True)
class RelativeFGM(advgraph.Method):
    """FGM with epsilon relative to each sample's embedding norm:
    ``delta_b = epsilon * ||e_b|| * g_b / ||g_b||``, so one epsilon fits embeddings of
    std 0.02 and of std 1. Two passes; zero / non-finite gradients give ``delta_b = 0``
    and are counted (``site.record``)."""

    modes: ClassVar[tuple[str, ...]] = ("output",)  # ||e_b||: one sample's embedding output

    epsilon: float = 0.1

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.epsilon, (int, float)) or isinstance(self.epsilon, bool) or not self.epsilon > 0:
            raise ValueError(f"`epsilon` must be a number > 0. Received: epsilon={self.epsilon!r}")

    def passes(self) -> int:
        return 2

    def delta(self, site: advgraph.Site) -> Any:
        grad, values = site.site_grad(), site.site_values()
        if isinstance(grad, tuple):  # the target ran several times: one delta per call
            return tuple(self._one(site, g, e) for g, e in zip(grad, values))
        return self._one(site, grad, values)

    def _one(self, site: advgraph.Site, grad: Any, values: Any) -> Any:
        xp = _xp(grad)
        unit = advgraph.compute_delta(grad, 1.0, norm="l2", per_sample=True)
        site.record(unit)  # skipped samples (zero / NaN gradient): delta_b = 0, counted
        e = xp.float32(values)
        axes = tuple(range(1, len(values.shape)))
        size = xp.sqrt(xp.sum(e * e, axis=axes, keepdims=True)) * self.epsilon
        return xp.cast_like(xp.float32(unit.delta) * size, grad)

    def step(self, site: advgraph.Site, closure: Any) -> Any:
        loss = site.forward_backward(closure, param_grads=True)
        site.set_delta(self.delta(site))
        try:
            site.forward_backward(closure, param_grads=True, keep_grad=False)
        finally:
            site.clear()
        return loss


@dataclass(frozen=True, kw_only=True)
class RDropProbe(RDrop):
    """R-Drop whose step returns what a test looks at: ``show="kl"`` the symmetric KL
    between the two forwards, ``"gap"`` the largest difference of their logits."""

    show: str = "kl"

    def report(self, outs: list[Any]) -> Any:
        (_, logits_1), (_, logits_2) = outs
        xp = _xp(logits_1)
        if self.show == "kl":
            return xp.stop(symmetric_kl(logits_1, logits_2))
        diff = xp.float32(logits_1 - logits_2)
        return xp.stop(xp.sqrt(xp.sum(diff * diff)))


# -- the numbers every framework computes (same weights, batch and "dropout" draws) ----

V, D, C, B, L = 13, 5, 3, 6, 7
LR, EPS, ALPHA, KEEP = 0.3, 0.4, 0.7, 0.6
CASES = [  # (name, mode, run eagerly on Keras)
    ("rdrop-output", "output", True),
    ("rdrop-matrix", "matrix", True),
    ("relfgm-output", "output", True),
    ("rdrop-output", "output", False),
    ("rdrop-matrix", "matrix", False),
    ("relfgm-output", "output", False),
]


def data() -> dict[str, Any]:
    """Weights, batch and the two fixed dropout masks (keep 0.6, scaled by 1/0.6)."""
    import numpy as np

    rng = np.random.default_rng(7)
    x = rng.integers(0, V, (B, L)).astype("int32")
    x[:, 0] = 2  # a repeated id: matrix rows shared by several positions
    masks = (rng.random((2, B, L, D)) < KEEP).astype("float32") / np.float32(KEEP)
    return {
        "E": rng.standard_normal((V, D)).astype("float32"),
        "W": (rng.standard_normal((D, C)) * 0.5).astype("float32"),
        "b": (rng.standard_normal(C) * 0.1).astype("float32"),
        "x": x,
        "y": rng.integers(0, C, B).astype("int32"),
        "masks": masks,
    }


def method_of(name: str) -> advgraph.Method:
    return RDrop(alpha=ALPHA) if name.startswith("rdrop") else RelativeFGM(epsilon=EPS)
