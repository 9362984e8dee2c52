"""FreeLB-K (Zhu et al., "FreeLB: Enhanced Adversarial Training for Natural
Language Understanding", ICLR 2020)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from advgraph._errors import received

from . import _common
from ._base import check_flag, check_int, check_number
from ._common import add, last_calls, project_tree
from ._fgm import GradientMethod
from ._site import Closure, Site

__all__ = ["FreeLB"]

Array = Any


@dataclass(frozen=True, kw_only=True)
class FreeLB(GradientMethod):
    """FreeLB-K: exactly ``steps`` passes.

    delta starts at FreeLB's random start (``random_init``, scaled by
    ``init_mag``) or 0. Each pass t backpropagates ``L(x + delta) / steps``: the
    parameter gradients of all passes accumulate ("free" training). After each
    pass but the last, ``delta <- delta + alpha * g / ||g||`` and, when
    ``epsilon`` is set, is projected onto the epsilon-ball (FreeLB's max norm;
    ``epsilon=None``: unbounded). Returns the loss of the first pass. Its
    objective is ``"adv"``: it has no clean pass.

    Fields:
        epsilon: max norm of delta, or ``None`` (unbounded). Default 1.0.
        steps: passes K (default 3).
        alpha: ascent step (default 0.1).
        random_init: random start (default True).
        init_mag: magnitude of the random start (default 0.1 with ``random_init``).

    Example:
        >>> import advgraph
        >>> advgraph.methods.FreeLB(steps=2).passes()
        2
    """

    name: ClassVar[str] = "freelb"

    objective: str = "adv"
    steps: int = 3
    alpha: Any = 0.1
    random_init: bool = True
    init_mag: Any = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.objective != "adv":
            raise ValueError(
                "method='freelb' has no clean pass: every one of its passes is adversarial, "
                f"so its objective is 'adv'. {received(method='freelb', objective=self.objective)}"
            )
        check_int(self, "steps")
        check_number(self, "alpha")
        check_flag(self, "random_init")
        if self.init_mag is not None and not self.random_init:
            raise ValueError(
                "`init_mag` scales FreeLB's random start, which random_init=False turns "
                f"off. {received(init_mag=self.init_mag, random_init=self.random_init)}"
            )
        if self.init_mag is None and self.random_init:
            object.__setattr__(self, "init_mag", 0.1)
        check_number(self, "init_mag", none=True)

    def _check_epsilon(self) -> None:
        check_number(self, "epsilon", none=True)

    def passes(self) -> int:
        return self.steps

    def _init(self, like: Array) -> Array:
        """U(-1, 1) * init_mag / sqrt(entries per sample) for l2 (the reference
        normalises by sequence length x dim), U(-init_mag, init_mag) for linf."""
        ops = _common.ops_for(like)
        if self.norm == "linf":
            return ops.cast(ops.uniform_like(like, -self.init_mag, self.init_mag), ops.dtype(like))
        axes = tuple(range(1, ops.ndim(like))) if self.per_sample else tuple(range(ops.ndim(like)))
        count = ops.sum(ops.widen(ops.zeros_like(like)) + 1.0, axes)
        noise = ops.uniform_like(like, -1.0, 1.0) * (self.init_mag / ops.sqrt(count))
        return ops.cast(noise, ops.dtype(like))

    def step(self, site: Site, closure: Closure) -> Any:
        scale = 1.0 / self.steps
        first_loss = None
        box: dict[str, Array] = {}
        starts: list[Array] = []  # the random start of each call of the target, in call order
        if self.random_init:

            def start(like: Array) -> Array:
                starts.append(self._init(like))
                return starts[-1]

            site.set_delta(start)
        try:
            for step in range(self.steps):
                last = step == self.steps - 1
                loss = site.forward_backward(closure, param_grads=True, scale=scale, keep_grad=not last)
                if first_loss is None:
                    first_loss = loss
                if last:
                    break
                grad = site.site_grad()
                if starts and "delta" not in box:
                    box["delta"] = last_calls(starts, grad)  # the first pass's calls
                ascent = self.direction(site, grad, self.alpha)
                delta = add(box["delta"], ascent) if "delta" in box else ascent
                if self.epsilon is not None:
                    delta = project_tree(delta, self.epsilon, self.norm, bool(self.per_sample))
                box["delta"] = delta
                site.set_delta(delta)
        finally:
            site.clear()
        return first_loss
