"""FGM and FGSM, and the settings every gradient-direction method shares."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, ClassVar

from advgraph._delta import NORMS
from advgraph._errors import check_choice, received

from ._base import OBJECTIVES, Method, check_flag, check_number
from ._common import direction
from ._site import Closure, Site

__all__ = ["FGM", "FGSM", "GradientMethod"]


@dataclass(frozen=True, kw_only=True)
class GradientMethod(Method):
    """Settings shared by the methods that step along the gradient at the site.

    Fields:
        epsilon: radius of delta (a number or a schedule).
        norm: ``"l2"`` (``epsilon * g / ||g||``) or ``"linf"`` (``epsilon * sign(g)``).
        per_sample: normalise and project delta per sample; ``None``: per sample in
            output mode, one global delta in matrix mode.
        objective: ``"clean+adv"`` (clean and adversarial gradients add up) or
            ``"adv"`` (the adversarial passes alone drive the update).
    """

    default_norm: ClassVar[str] = "l2"

    epsilon: Any = 1.0
    norm: str | None = None
    per_sample: bool | None = None
    objective: str = "clean+adv"

    def __post_init__(self) -> None:
        super().__post_init__()
        self._check_epsilon()
        if self.norm is None:
            object.__setattr__(self, "norm", self.default_norm)
        check_choice("norm", self.norm, NORMS)
        check_flag(self, "per_sample", none=True)
        check_choice("objective", self.objective, OBJECTIVES)

    def _check_epsilon(self) -> None:
        if self.epsilon is None:
            raise TypeError(
                "`epsilon` must be a positive finite number (only FreeLB takes None: no max "
                f"norm). {received(epsilon=self.epsilon, method=self.name or type(self).__name__)}"
            )
        check_number(self, "epsilon")

    def for_mode(self, mode: str) -> Method:
        super().for_mode(mode)
        if mode == "matrix" and self.per_sample:
            raise ValueError(
                "`per_sample=True` is not meaningful in mode='matrix': one delta on the "
                "embedding matrix is shared by every sample of the batch. Use mode='output' "
                f"for one delta per sample. {received(mode=mode, per_sample=self.per_sample)}"
            )
        if self.per_sample is None:
            return replace(self, per_sample=mode == "output")
        return self

    def direction(self, site: Site, grad: Any, size: Any) -> Any:
        """``size * g / ||g||`` (or ``size * sign(g)``) per call, skips recorded."""
        return direction(site, grad, size, self.norm, bool(self.per_sample))

    def delta(self, site: Site) -> Any:
        return self.direction(site, site.site_grad(), self.epsilon)


@dataclass(frozen=True, kw_only=True)
class FGM(GradientMethod):
    """FGM: 2 passes (Miyato et al., "Adversarial Training Methods for
    Semi-Supervised Text Classification", ICLR 2017).

    1. Clean pass: ``L(x)``; the gradient ``g`` at the site (and, for
       ``objective="clean+adv"``, the parameter gradients).
    2. ``delta = epsilon * g / ||g||`` (``norm="linf"``: ``epsilon * sign(g)``).
    3. A pass with delta installed; its parameter gradients accumulate; delta is
       removed afterwards, also on error.

    Example:
        >>> import advgraph
        >>> advgraph.methods.FGM(epsilon=0.5)
        FGM(start=0, epsilon=0.5, norm='l2', per_sample=None, objective='clean+adv')
    """

    name: ClassVar[str] = "fgm"

    def passes(self) -> int:
        return 2

    def step(self, site: Site, closure: Closure) -> Any:
        clean_loss = site.forward_backward(closure, param_grads=self.objective == "clean+adv")
        # No local reference to delta: once installed, only the site holds what it needs.
        site.set_delta(self.delta(site))
        try:
            site.forward_backward(closure, param_grads=True, keep_grad=False)
        finally:
            site.clear()
        return clean_loss


@dataclass(frozen=True, kw_only=True)
class FGSM(FGM):
    """FGSM: FGM's two passes with the sign step ``epsilon * sign(g)`` (Goodfellow
    et al., "Explaining and Harnessing Adversarial Examples", ICLR 2015).

    Example:
        >>> import advgraph
        >>> advgraph.methods.FGSM().norm
        'linf'
    """

    name: ClassVar[str] = "fgsm"
    default_norm: ClassVar[str] = "linf"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.norm != "linf":
            raise ValueError(
                "method='fgsm' is the sign method and uses norm='linf'; use method='fgm' for "
                f"an l2 step. {received(method='fgsm', norm=self.norm)}"
            )
