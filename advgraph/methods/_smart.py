"""SMART (Jiang et al., "SMART: Robust and Efficient Fine-Tuning for Pre-trained
Natural Language Models through Principled Regularized Optimization", ACL 2020;
official code ``namisan/mt-dnn``, ``mt_dnn/perturbation.py``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from advgraph._delta import NORMS, DeltaResult
from advgraph._errors import check_choice

from . import _common
from ._base import Method, check_int, check_number
from ._common import last_calls, noise, split_pair, symmetric_kl, tree_map
from ._site import Closure, Site

__all__ = ["SMART"]

Array = Any


@dataclass(frozen=True, kw_only=True)
class SMART(Method):
    """SMART: ``steps + 1`` passes plus forwards without backward.

    The closure returns ``(loss, logits)``.

    1. Teacher (``mu > 0``): ``theta~ <- beta theta~ + (1 - beta) theta`` (the
       first step copies ``theta``), then a forward with ``theta~`` (no backward).
    2. A forward without backward: the clean logits, held fixed for the ascent.
    3. noise ``N(0, noise_eps^2)``; ``steps`` times: a pass on the symmetric KL
       between the fixed clean and the noisy distribution, gradient ``g`` at the
       site, ``noise <- (noise + alpha g) / (max|noise + alpha g| + 1e-6)`` per
       token (mt-dnn's inf-norm normalisation; ``norm="l2"``: the l2 norm).
    4. One backward through a clean and a noisy forward of
       ``loss + weight * SymKL(clean, noisy) + mu * SymKL(clean, teacher)``
       (mt-dnn's ``SymKlCriterion``: each KL's target held fixed; the teacher is
       constant). Returns the clean loss.

    Fields:
        noise_eps: std of the initial noise (default 1e-5; mt-dnn ``--adv_noise_var``).
        steps: ascent steps (default 1; ``--adv_k``).
        alpha: ascent step size (default 1e-5; ``--adv_step_size``).
        norm: ``"linf"`` (default; ``--adv_p_norm``) or ``"l2"``.
        weight: lambda_s, weight of the smoothness term (default 1.0;
            ``smart_lambda=`` in ``wrap``).
        mu: weight of the Bregman proximal term (default 1.0; 0 turns the teacher
            off; ``smart_mu=``).
        beta: momentum of the teacher (default 0.99; ``smart_beta=``).

    Example:
        >>> import advgraph
        >>> advgraph.methods.SMART(mu=0.0).uses_teacher
        False
    """

    name: ClassVar[str] = "smart"
    closure: ClassVar[str] = "loss_and_logits"
    edits_between_forwards: ClassVar[bool] = True
    objective: ClassVar[str] = "clean+adv"

    noise_eps: Any = 1e-5
    steps: int = 1
    alpha: Any = 1e-5
    norm: str = "linf"
    weight: Any = 1.0
    mu: Any = 1.0
    beta: Any = 0.99

    def __post_init__(self) -> None:
        super().__post_init__()
        check_number(self, "noise_eps")
        check_int(self, "steps")
        check_number(self, "alpha")
        check_choice("norm", self.norm, NORMS)
        check_number(self, "weight")
        check_number(self, "mu", open_low=False)
        check_number(self, "beta", open_low=False, high=1.0)

    @property
    def uses_teacher(self) -> bool:
        return callable(self.mu) or self.mu > 0

    def passes(self) -> int:
        return self.steps + 1  # ascent passes, the joint pass

    def _normalise(self, site: Site, noise_: Array, grad: Array) -> Array:
        """``v / (max|v| + 1e-6)`` per token (``norm="l2"``: ``v / (||v|| + 1e-6)``),
        ``v = noise + alpha * g`` over the last axis, as mt-dnn's ``_norm_grad``. A
        zero or non-finite gradient gives delta = 0 (counted)."""
        ops = _common.ops_for(grad)
        g = ops.widen(grad)
        every = tuple(range(ops.ndim(g)))
        peak = ops.reshape(ops.amax(ops.abs(g), every), ())  # NaN/inf propagate
        nonfinite = ops.logical_not(ops.isfinite(peak))
        zero = ops.logical_and(ops.logical_not(nonfinite), peak == 0)
        site.record(DeltaResult(grad, nonfinite, zero))
        v = ops.widen(noise_) + self.alpha * ops.where(ops.isfinite(g), g, ops.zeros_like(g))
        last = (ops.ndim(v) - 1,)
        if self.norm == "linf":
            size = ops.amax(ops.abs(v), last)
        else:
            size = ops.sqrt(ops.sum(v * v, last))
        out = v / (size + 1e-6)
        ok = ops.logical_and(ops.logical_not(nonfinite), ops.logical_not(zero))
        out = ops.where(ok, out, ops.zeros_like(out))
        return ops.cast(out, ops.dtype(grad))

    def step(self, site: Site, closure: Closure) -> Any:
        label = "method='smart'"
        teacher = None
        if self.uses_teacher:
            site.update_teacher(self.beta)
            _, teacher = split_pair(site.forward_only(closure, teacher=True), label)
        _, fixed = split_pair(site.forward_only(closure), label)
        ops = _common.ops_for(fixed)
        box: dict[str, Any] = {}
        starts: list[Array] = []
        draw = noise(self.noise_eps, "normal")

        def noisy_kl() -> Array:
            _, logits = split_pair(closure(), label)
            return symmetric_kl(ops, fixed, logits, detach_targets=False)

        def start(like: Array) -> Array:
            starts.append(draw(like))
            return starts[-1]

        site.set_delta(start)
        try:
            for _ in range(self.steps):
                site.forward_backward(noisy_kl, param_grads=False)
                grad = site.site_grad()
                if "noise" not in box:
                    box["noise"] = last_calls(starts, grad)
                box["noise"] = tree_map(lambda n, g: self._normalise(site, n, g), box["noise"], grad)
                site.set_delta(box["noise"])
        finally:
            site.clear()

        def objective(outs: list[Any]) -> Array:
            loss, clean = split_pair(outs[0], label)
            _, noisy = split_pair(outs[1], label)
            box["loss"] = ops.stop_gradient(loss)
            total = loss + self.weight * symmetric_kl(ops, clean, noisy, detach_targets=True)
            if teacher is not None:
                total = total + self.mu * symmetric_kl(ops, clean, teacher, detach_targets=False)
            return total

        site.joint_backward(closure, [None, box["noise"]], objective)
        return box["loss"]
