"""The step before a method's ``start``: one plain forward/backward, no perturbation."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ._base import Method
from ._site import Closure, Site

__all__ = ["PLAIN", "PlainStep"]


@dataclass(frozen=True, kw_only=True)
class PlainStep(Method):
    """One pass of the closure's loss into the parameters (the plain step's cost).

    ``closure`` says what the wrapped method's closure returns: for
    ``"loss_and_logits"`` the loss is its first element; for ``"logits"`` (VAT) a
    bare ``logits`` (an unlabeled batch) has no loss, so nothing is backpropagated.
    """

    kind: str = "loss"

    def passes(self) -> int:
        return 1

    def step(self, site: Site, closure: Closure) -> Any:
        kind = self.kind

        def loss() -> Any:
            out = closure()
            if kind != "loss" and isinstance(out, tuple):
                return out[0]  # (loss, logits); VAT's labeled batch
            if kind == "logits":
                return None  # VAT's unlabeled batch: logits only, no loss
            return out

        return site.forward_backward(loss, param_grads=True, keep_grad=False, allow_none=True)


PLAIN = {kind: PlainStep(kind=kind) for kind in ("loss", "loss_and_logits", "logits")}
