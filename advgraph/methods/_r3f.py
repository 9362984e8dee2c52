"""R3F (Aghajanyan et al., "Better Fine-Tuning by Reducing Representational
Collapse", ICLR 2021; fairseq ``examples/rxf/rxf_src/sentence_prediction_r3f.py``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from advgraph._errors import check_choice

from . import _common
from ._base import Method, check_number
from ._common import noise, split_pair, symmetric_kl
from ._site import Closure, Site

__all__ = ["R3F", "NOISE_TYPES"]

NOISE_TYPES = ("uniform", "normal")


@dataclass(frozen=True, kw_only=True)
class R3F(Method):
    """R3F: 1 pass of two forwards.

    The closure returns ``(loss, logits)``. Clean forward, and a forward at
    ``e + z`` with ``z ~ U(-noise_eps, noise_eps)`` (or ``N(0, noise_eps^2)``);
    one backward of ``loss + weight * (KL(p || p_z) + KL(p_z || p)) / batch``
    (KL summed over classes) with gradients through both forwards. No ascent step.
    Returns the clean loss.

    Fields:
        noise_eps: noise size (default 1e-5; fairseq ``--eps``).
        noise_type: ``"uniform"`` (default) or ``"normal"`` (``--noise-type``).
        weight: weight of the symmetric KL (default 1.0; ``--r3f-lambda``;
            ``r3f_lambda=`` in ``wrap``).

    Example:
        >>> import advgraph
        >>> advgraph.methods.R3F(noise_type="normal").weight
        1.0
    """

    name: ClassVar[str] = "r3f"
    closure: ClassVar[str] = "loss_and_logits"
    edits_between_forwards: ClassVar[bool] = True
    objective: ClassVar[str] = "clean+adv"

    noise_eps: Any = 1e-5
    noise_type: str = "uniform"
    weight: Any = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        check_number(self, "noise_eps")
        check_choice("noise_type", self.noise_type, NOISE_TYPES)
        check_number(self, "weight")

    def passes(self) -> int:
        return 1

    def step(self, site: Site, closure: Closure) -> Any:
        box: dict[str, Any] = {}

        def objective(outs: list[Any]) -> Any:
            loss, logits = split_pair(outs[0], "method='r3f'")
            _, noised = split_pair(outs[1], "method='r3f'")
            ops = _common.ops_for(logits)
            box["loss"] = ops.stop_gradient(loss)
            return loss + self.weight * symmetric_kl(ops, noised, logits, detach_targets=False)

        site.joint_backward(closure, [None, noise(self.noise_eps, self.noise_type)], objective)
        return box["loss"]
