"""PGD-K (Madry et al., "Towards Deep Learning Models Resistant to Adversarial
Attacks", ICLR 2018)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar


from . import _common
from ._base import check_flag, check_int, check_number
from ._common import add, project_tree, tree_map
from ._fgm import GradientMethod
from ._site import Closure, Site

__all__ = ["PGD"]


@dataclass(frozen=True, kw_only=True)
class PGD(GradientMethod):
    """PGD-K: ``steps + 1`` passes.

    Clean pass, then ``steps`` ascent steps ``delta <- Proj_eps(delta + alpha *
    g / ||g||)`` (linf: ``alpha * sign(g)``), each followed by a pass at the new
    delta. As in the common PyTorch PGD loop, the parameter gradients come from
    the clean pass (``objective="clean+adv"``) plus the *last* adversarial pass
    only: the intermediate passes compute the gradient at the site alone.
    ``random_init`` adds a uniform random start inside the ball before the first
    ascent step, whose direction comes from the clean pass.

    Fields:
        steps: ascent steps K (default 3).
        alpha: step size (default ``2.5 * epsilon / steps``, Madry et al.).
        random_init: random start inside the ball (default False).

    Example:
        >>> import advgraph
        >>> advgraph.methods.PGD(epsilon=1.0, steps=2).alpha
        1.25
    """

    name: ClassVar[str] = "pgd"

    steps: int = 3
    alpha: Any = None
    random_init: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int(self, "steps")
        if self.alpha is None and not self.scheduled():
            object.__setattr__(self, "alpha", 2.5 * self.epsilon / self.steps)
        check_number(self, "alpha", none=True)
        check_flag(self, "random_init")

    def passes(self) -> int:
        return self.steps + 1

    def step(self, site: Site, closure: Closure) -> Any:
        clean_loss = site.forward_backward(closure, param_grads=self.objective == "clean+adv")
        grad = site.site_grad()
        eps = self.epsilon
        alpha = self.alpha if self.alpha is not None else 2.5 * eps / self.steps
        per_sample = bool(self.per_sample)
        delta = None
        if self.random_init:
            delta = tree_map(lambda g: _common.random_init(g, eps, norm=self.norm, per_sample=per_sample), grad)
        try:
            for step in range(self.steps):
                ascent = self.direction(site, grad, alpha)
                delta = ascent if delta is None else add(delta, ascent)
                delta = project_tree(delta, eps, self.norm, per_sample)
                site.set_delta(delta)
                last = step == self.steps - 1
                site.forward_backward(closure, param_grads=last, keep_grad=not last)
                if not last:
                    grad = site.site_grad()
        finally:
            site.clear()
        return clean_loss
