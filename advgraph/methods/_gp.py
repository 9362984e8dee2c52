"""Gradient penalty (bert4torch's adversarial callback; Su Jianlin's Keras recipe, 2020)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from advgraph._errors import received

from . import _common
from ._base import Method, check_number
from ._common import leaves
from ._site import Closure, Site

__all__ = ["GP"]


@dataclass(frozen=True, kw_only=True)
class GP(Method):
    """Gradient penalty: 1 pass (a forward and a double backward).

    ``loss + epsilon / 2 * ||dL/de||^2`` with ``e`` the site (output mode: the
    embedding's activations; matrix mode: the rows the batch touched), summed over
    every entry (and every call of the target). The objective is ``"clean+adv"``:
    the penalty is added to the clean loss.

    Under data parallelism (W ranks averaging their gradients: DDP, FSDP, DeepSpeed)
    the step equals one process's on the concatenated batch, assuming a mean-reduced
    loss over equal local batches. Derivation: one process's loss on the global batch
    is ``L = (1/W) sum_r L_r``, so its gradient at rank r's samples is ``g_r / W``
    (``g_r`` = the gradient of r's local loss) and its penalty is
    ``eps/2 * sum_r ||g_r / W||^2``. Each rank adds ``W * eps/2 * ||g_r / W||^2``
    (= ``eps/2 * ||g_r||^2 / W``): the site hands out ``g_r / W`` and the penalty
    counts W times because the ranks' gradients are averaged. In matrix mode the
    global gradient of a row sums over ranks and its square has cross terms no rank
    sees: the penalty is each rank's own, as matrix-mode deltas are.

    Fields:
        epsilon: the penalty weight (default 1.0).

    Example:
        >>> import advgraph
        >>> advgraph.methods.GP(epsilon=0.5).passes()
        1
    """

    name: ClassVar[str] = "gp"
    objective: ClassVar[str] = "clean+adv"

    epsilon: Any = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.epsilon is None:
            raise TypeError(f"`epsilon` must be a positive finite number. {received(epsilon=None, method='gp')}")
        check_number(self, "epsilon")

    def passes(self) -> int:
        return 1

    def step(self, site: Site, closure: Closure) -> Any:
        half = self.epsilon / 2.0

        def penalty(grad: Any) -> Any:
            total = None
            for g in leaves(grad):
                ops = _common.ops_for(g)
                w = ops.widen(g)
                part = ops.reshape(ops.sum(w * w, tuple(range(ops.ndim(w)))), ())
                total = part if total is None else total + part
            return total * half

        return site.penalty_backward(closure, penalty)
