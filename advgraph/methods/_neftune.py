"""NEFTune (Jain et al., "NEFTune: Noisy Embeddings Improve Instruction Finetuning", 2023)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from advgraph._errors import received

from . import _common
from ._base import Method, check_number
from ._common import count
from ._site import Closure, Site

__all__ = ["NEFTune"]


@dataclass(frozen=True, kw_only=True)
class NEFTune(Method):
    """NEFTune: 1 pass; output mode only.

    The forward runs with ``U(-1, 1) * alpha / sqrt(L_i * d)`` added to the
    embedding's output, ``L_i`` the number of real tokens of sequence ``i`` and
    ``d`` the embedding width; padding positions get no noise
    (:meth:`Site.token_mask`; without a mask every position counts, as in
    HuggingFace's hook). Returns the loss of that forward. Its objective is
    ``"adv"``: its one forward is the noisy one.

    Fields:
        alpha: the noise scale (default 5.0; ``neftune_alpha=`` in ``wrap``).

    Example:
        >>> import advgraph
        >>> advgraph.methods.NEFTune(alpha=10.0)
        NEFTune(start=0, alpha=10.0)
    """

    name: ClassVar[str] = "neftune"
    modes: ClassVar[tuple[str, ...]] = ("output",)
    needs_token_mask: ClassVar[bool] = True
    objective: ClassVar[str] = "adv"

    alpha: Any = 5.0

    def __post_init__(self) -> None:
        super().__post_init__()
        check_number(self, "alpha")

    def for_mode(self, mode: str) -> Method:
        if mode == "matrix":
            raise ValueError(
                "method='neftune' adds noise to the embedding's output (one draw per token, "
                "scaled by each sequence's length); it has no meaning on the embedding matrix. "
                f"Use mode='output'. {received(method='neftune', mode=mode)}"
            )
        return super().for_mode(mode)

    def passes(self) -> int:
        return 1

    def step(self, site: Site, closure: Closure) -> Any:
        def draw(like: Any) -> Any:
            ops = _common.ops_for(like)
            mask = site.token_mask(like)
            nd = ops.ndim(like)
            dim = count(ops, like, (nd - 1,))  # d at every position
            if mask is None:
                mask = ops.widen(ops.zeros_like(like))[..., :1] + 1.0
            mask = ops.widen(ops.cast(mask, ops.dtype(ops.widen(like))))
            length = ops.sum(mask, tuple(range(1, nd - 1)))  # real tokens per sequence
            length = ops.where(length > 0, length, length + 1.0)
            scale = self.alpha / ops.sqrt(length * dim)
            out = ops.uniform_like(like, -1.0, 1.0) * scale * mask
            return ops.cast(out, ops.dtype(like))

        site.set_delta(draw)
        try:
            return site.forward_backward(closure, param_grads=True, keep_grad=False)
        finally:
            site.clear()
