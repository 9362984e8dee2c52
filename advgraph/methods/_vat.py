"""Virtual adversarial training (Miyato et al., "Virtual Adversarial Training: A
Regularization Method for Supervised and Semi-Supervised Learning", TPAMI 2018; on
text embeddings: Miyato et al., ICLR 2017)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from advgraph._errors import received

from . import _common
from ._base import check_int, check_number
from ._common import kl_from_log_probs, log_softmax
from ._fgm import GradientMethod
from ._site import Closure, Site

__all__ = ["VAT"]


def _split_vat_output(out: Any) -> tuple[Any, Any]:
    if isinstance(out, tuple):
        if len(out) != 2:
            raise TypeError(
                "method='vat': the closure returns `logits` (unlabeled batch) or "
                f"`(loss, logits)` (labeled batch). {received(tuple_length=len(out))}"
            )
        return out
    if isinstance(out, (list, dict)) or out is None or not hasattr(out, "shape"):
        raise TypeError(
            "method='vat': the closure returns `logits` (unlabeled batch) or "
            f"`(loss, logits)` (labeled batch). {received(closure_returned=type(out).__name__)}"
        )
    return None, out


@dataclass(frozen=True, kw_only=True)
class VAT(GradientMethod):
    """VAT: ``1 + steps + 1`` passes; label-free.

    The closure returns ``logits`` for an unlabeled batch, or ``(loss, logits)``
    for a labeled one (its supervised loss is backpropagated in the clean pass).
    p = softmax(logits) of the clean pass is held fixed. From a random unit
    direction d, ``steps`` power iterations ``d <- xi * g / ||g||`` with g the
    gradient of KL(p || p(x + d)); then ``r_adv = epsilon * g / ||g||`` and
    ``weight * KL(p || p(x + r_adv))`` is backpropagated into the parameters.
    Returns the supervised loss, or for an unlabeled batch the VAT loss.

    Fields:
        steps: power iterations (default 1).
        xi: finite-difference scale of the power iteration (default 0.1, Miyato et
            al.'s released text code).
        weight: weight of the VAT term (default 1.0; ``vat_weight=`` in ``wrap``).

    Example:
        >>> import advgraph
        >>> advgraph.methods.VAT(epsilon=2.0).passes()
        3
    """

    name: ClassVar[str] = "vat"
    closure: ClassVar[str] = "logits"

    steps: int = 1
    xi: Any = 0.1
    weight: Any = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.norm != "l2":
            raise ValueError(f"method='vat' uses norm='l2' (Miyato et al.). {received(method='vat', norm=self.norm)}")
        check_int(self, "steps")
        check_number(self, "xi")
        check_number(self, "weight")

    def passes(self) -> int:
        return self.steps + 2

    def step(self, site: Site, closure: Closure) -> Any:
        box: dict[str, Any] = {}

        def clean() -> Any:
            loss, logits = _split_vat_output(closure())
            ops = _common.ops_for(logits)
            box["ops"] = ops
            box["log_p"] = ops.stop_gradient(log_softmax(ops, logits))
            return loss

        def kl() -> Any:
            _, logits = _split_vat_output(closure())
            return kl_from_log_probs(box["ops"], box["log_p"], logits)

        clean_loss = site.forward_backward(clean, param_grads=self.objective == "clean+adv", allow_none=True)

        def unit(like: Any) -> Any:
            ops = _common.ops_for(like)
            noise = ops.normal_like(like)
            return ops.cast(_common.compute_delta(noise, self.xi, per_sample=bool(self.per_sample)).delta, ops.dtype(like))

        site.set_delta(unit)
        try:
            grad = None
            for step in range(self.steps):
                site.forward_backward(kl, param_grads=False)
                grad = site.site_grad()
                if step < self.steps - 1:
                    site.set_delta(self.direction(site, grad, self.xi))
            site.set_delta(self.direction(site, grad, self.epsilon))
            vat_loss = site.forward_backward(kl, param_grads=True, scale=self.weight, keep_grad=False)
        finally:
            site.clear()
        return clean_loss if clean_loss is not None else vat_loss
