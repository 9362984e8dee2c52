"""AWP (Wu et al., "Adversarial Weight Perturbation Helps Robust Generalization",
NeurIPS 2020; the one-step form of Kaggle NLP solutions)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from advgraph._errors import check_choice, received

from . import _common
from ._base import OBJECTIVES, Method, check_number
from ._common import tree_map
from ._site import Closure, Site

__all__ = ["AWP"]

Array = Any


@dataclass(frozen=True, kw_only=True)
class AWP(Method):
    """AWP: 2 passes; the site is a set of weights (``target`` names their modules).

    Clean pass: ``g`` per parameter (and, for ``objective="clean+adv"``, the
    parameter gradients). Then per parameter ``delta_w = adv_lr * ||w|| * g /
    ||g||``, clamped to ``|delta_w| <= adv_eps * |w|`` elementwise; one pass at
    ``w + delta_w`` accumulates the parameter gradients; the weights are restored
    bit for bit. The Kaggle form starts after the first epoch: ``start=`` (steps)
    or ``AdversarialTrainer``'s ``start_epoch``.

    Fields:
        adv_lr: relative step (default 0.005, Wu et al.'s gamma: ``||delta_w|| =
            gamma ||w||`` per layer).
        adv_eps: relative elementwise bound (default 0.2).
        objective: ``"adv"`` (default; Wu et al.: the update uses the loss at the
            perturbed weights) or ``"clean+adv"``.

    Example:
        >>> import advgraph
        >>> advgraph.methods.AWP(adv_lr=0.01, start=100).start
        100
    """

    name: ClassVar[str] = "awp"
    modes: ClassVar[tuple[str, ...]] = ("output",)
    site: ClassVar[str] = "weights"

    adv_lr: Any = 0.005
    adv_eps: Any = 0.2
    objective: str = "adv"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_number(self, "adv_lr")
        check_number(self, "adv_eps")
        check_choice("objective", self.objective, OBJECTIVES)

    def for_mode(self, mode: str) -> Method:
        if mode != "output":
            raise ValueError(
                "method='awp' perturbs the weights of the modules `target` names, not the "
                "embedding's output or matrix; leave `mode` at its default. "
                f"{received(method='awp', mode=mode)}"
            )
        return super().for_mode(mode)

    def passes(self) -> int:
        return 2

    def _delta(self, site: Site, grad: Array, weight: Array) -> Array:
        ops = _common.ops_for(grad)
        unit = _common.compute_delta(grad, 1.0, norm="l2", per_sample=False)
        site.record(unit)
        w = ops.widen(weight)
        norm_w = ops.sqrt(ops.sum(w * w, tuple(range(ops.ndim(w)))))
        delta = ops.widen(unit.delta) * (self.adv_lr * norm_w)
        return ops.cast(ops.clip_to(delta, ops.abs(w) * self.adv_eps), ops.dtype(weight))

    def step(self, site: Site, closure: Closure) -> Any:
        clean_loss = site.forward_backward(closure, param_grads=self.objective == "clean+adv")
        grad = site.site_grad()
        weights = site.site_values()
        site.set_delta(tree_map(lambda g, w: self._delta(site, g, w), grad, weights))
        try:
            site.forward_backward(closure, param_grads=True, keep_grad=False)
        finally:
            site.clear()
        return clean_loss
