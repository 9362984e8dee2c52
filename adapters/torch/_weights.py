"""AWP's site: a set of weights instead of the embedding (method="awp").

``target`` names modules (a dotted path, a module, or a list of them; the model
itself or ``""`` for all of it); every parameter named ``weight`` under them
that requires grad is perturbed (matrices, convolution kernels, embedding and
norm scales; biases are not), as the ``adv_param="weight"`` rule of the AWP
class Kaggle NLP solutions share, but chosen by module, never by substring.

The gradient at the site is this pass's gradient of each weight (a hook on the
parameter, or ``torch.autograd.grad``), never ``.grad``, which holds earlier
micro-batches under gradient accumulation. Restore copies the saved weights back.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from advgraph._errors import received

from ._calls import data_parallel_size, global_share
from ._checks import check_loss
from ._site import Stats, _Site
from ._target import find_target

__all__ = ["WeightSite", "awp_parameters"]


def awp_parameters(model: nn.Module, target: Any) -> tuple[str, list[tuple[str, nn.Parameter]]]:
    """Resolve AWP's ``target`` to ``(description, [(name, parameter), ...])``."""
    if isinstance(target, str) and "," in target:
        target = [t.strip() for t in target.split(",")]
    targets = list(target) if isinstance(target, (list, tuple)) else [target]
    if not targets:
        raise ValueError(f"`target` names no module. {received(target=target)}")
    paths: list[str] = []
    found: list[tuple[str, nn.Parameter]] = []
    seen: set[int] = set()
    for item in targets:
        if item is model or item == "":
            path, module = "", model
        else:
            path, module = find_target(model, item)
        paths.append(path)
        for name, param in module.named_parameters(prefix=path):
            if name.rsplit(".", 1)[-1] == "weight" and param.requires_grad and id(param) not in seen:
                seen.add(id(param))
                found.append((name, param))
    if not found:
        raise ValueError(
            "method='awp' perturbs the trainable parameters named `weight` under `target`; "
            f"there are none. {received(target=','.join(paths) or '<model>')}"
        )
    return ",".join(paths), found


class WeightSite:
    """delta on weights: one array per perturbed parameter (a tuple)."""

    mode = "weights"
    record = _Site.record

    def __init__(self, named: list[tuple[str, nn.Parameter]], stats: Stats) -> None:
        self.named = named
        self.stats = stats
        self._grads: dict[int, torch.Tensor] | None = None
        self._chosen: list[int] = []
        self._saved: list[torch.Tensor] | None = None
        self.active = False
        self.capturing = True
        self.backward: Callable[[torch.Tensor], Any] | None = None

    @property
    def names(self) -> list[str]:
        return [name for name, _ in self.named]

    def begin_forward(self, *_: Any) -> None:
        pass

    def forward_backward(
        self,
        closure: Callable[[], Any],
        *,
        param_grads: bool,
        scale: float = 1.0,
        allow_none: bool = False,
        keep_grad: bool = True,
    ) -> torch.Tensor | None:
        loss = closure()
        if loss is None and allow_none:
            return None
        loss = check_loss(loss)
        target = loss if scale == 1.0 else loss * scale
        params = [p for _, p in self.named]
        self._grads = None
        if param_grads:
            store: dict[int, torch.Tensor] = {}
            handles = []
            if keep_grad:
                for i, p in enumerate(params):
                    handles.append(p.register_hook(lambda g, i=i: store.__setitem__(i, g)))
            try:
                if self.backward is None:
                    target.backward()
                else:
                    self.backward(target)
            finally:
                for handle in handles:
                    handle.remove()
            if keep_grad:
                self._grads = store
        else:
            grads = torch.autograd.grad(target, params, allow_unused=True)
            self._grads = {i: g for i, g in enumerate(grads) if g is not None}
        return loss.detach()

    def _run_backward(self, total: torch.Tensor) -> None:
        if self.backward is None:
            total.backward()
        else:
            self.backward(total)

    def penalty_backward(self, closure: Callable[[], Any], penalty: Callable[[Any], Any]) -> torch.Tensor:
        """A forward, then a backward of ``loss + penalty(g)``, ``g`` the gradient of
        every perturbed weight the loss reached, kept differentiable."""
        loss = check_loss(closure())
        params = [p for _, p in self.named]
        grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
        self._grads = {i: g for i, g in enumerate(grads) if g is not None}
        grad = self.site_grad()
        extra = penalty(grad)
        del grad, grads
        self._run_backward(loss + extra.to(loss.dtype))
        return loss.detach()

    def joint_backward(
        self, closure: Callable[[], Any], deltas: Any, objective: Callable[[list[Any]], Any]
    ) -> torch.Tensor:
        """The forwards of one backward. The weights are edited in place, which autograd
        refuses between two forwards it saved them for: one delta for all of them."""
        kinds = {None if d is None else id(d) for d in deltas}
        if len(kinds) > 1:
            raise ValueError(
                "joint_backward() on a site made of weights runs every forward under the same "
                "delta (the weights are edited in place, which autograd refuses between "
                f"forwards that saved them). {received(deltas=len(deltas), distinct=len(kinds))}"
            )
        try:
            if deltas and deltas[0] is not None:
                self.set_delta(deltas[0])
            outs = [closure() for _ in deltas]
            total = objective(outs)
            del outs
            self._run_backward(total)
        finally:
            self.clear()
        return total.detach()

    def token_mask(self, like: Any) -> None:
        return None  # no token positions at a set of weights

    def site_grad(self) -> tuple[torch.Tensor, ...]:
        """This pass's gradient of every perturbed weight the loss reached (under data
        parallelism this rank's share of the global batch's, ``g_r / W``)."""
        if not self._grads:
            raise RuntimeError(
                "No gradient at the perturbed weights: the loss does not depend on them. "
                f"{received(weights=len(self.named))}"
            )
        self._chosen = sorted(self._grads)
        grads = tuple(self._grads[i] for i in self._chosen)
        self._grads = None
        return global_share(grads, data_parallel_size())  # as the embedding sites

    def site_values(self) -> tuple[torch.Tensor, ...]:
        return tuple(self.named[i][1].detach() for i in self._chosen)

    def _params(self) -> list[nn.Parameter]:
        return [self.named[i][1] for i in self._chosen]

    def set_delta(self, delta: Any) -> None:
        if callable(delta) or not isinstance(delta, tuple):
            raise TypeError(
                "advgraph internal error: the weight site takes one delta per weight (a tuple). "
                f"{received(delta=type(delta).__name__)}"
            )
        params = self._params()
        with torch.no_grad():
            if self._saved is None:
                self._saved = [p.detach().clone() for p in params]
            else:
                for p, saved in zip(params, self._saved):
                    p.copy_(saved)
            self.active = True
            for p, d in zip(params, delta):
                p.add_(d.to(p.dtype))

    def clear(self) -> None:
        if self._saved is not None:
            with torch.no_grad():
                for p, saved in zip(self._params(), self._saved):
                    p.copy_(saved)
            self._saved = None
        self.active = False

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_grads"] = None
        state["backward"] = None
        return state
