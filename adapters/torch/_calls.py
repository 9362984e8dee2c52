"""The Site calls added for gp, r3f, smart and neftune, on the PyTorch sites.

:class:`SiteCalls` is mixed into both embedding sites (output and matrix);
:class:`RunnerCalls` into the step runner, which knows the wrapped module (the
teacher's forward needs it). Each call is one self-contained pass, documented on
:class:`advgraph.Site`.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from advgraph._errors import received

from ._checks import check_loss

__all__ = ["SiteCalls", "RunnerCalls", "Teacher", "data_parallel_size", "global_share"]


def data_parallel_size() -> int:
    """W, the number of ranks whose gradients are averaged; 1 outside torch.distributed.

    The world size of the default process group when ``torch.distributed`` is
    initialized: data parallelism over every rank with averaged gradients, which is
    what DDP, FSDP, DeepSpeed, Lightning's and accelerate's strategies do.
    """
    dist = getattr(torch, "distributed", None)
    if dist is None or not dist.is_available() or not dist.is_initialized():
        return 1
    return int(dist.get_world_size())


def global_share(grad: Any, world: int) -> Any:
    """``grad / W`` per array: a rank's gradient of its local mean loss, as a share of
    the gradient one process computes on the concatenated batch.

    With a mean-reduced loss, ``L = (1/W) sum_r L_r`` (equal local batches), so the
    single-process gradient at rank r's samples (output mode) is ``(1/W) dL_r/de``;
    in matrix mode the single-process row gradient is ``sum_r (1/W) dL_r/dE``.
    """
    if world == 1:
        return grad
    if isinstance(grad, tuple):
        return tuple(global_share(g, world) for g in grad)
    return grad / world


def _detach(tree: Any) -> Any:
    if isinstance(tree, torch.Tensor):
        return tree.detach()
    if isinstance(tree, tuple):
        return tuple(_detach(t) for t in tree)
    if isinstance(tree, list):
        return [_detach(t) for t in tree]
    if isinstance(tree, dict):
        return type(tree)((k, _detach(v)) for k, v in tree.items())
    return tree


def _eager() -> Any:
    """Compiled code runs eagerly within (torch.compiler.set_stance, torch >= 2.6).

    gp's pass needs a double backward through the forward; a ``torch.compile``d
    forward's backward (AOTAutograd) is not differentiable, and the gradient the
    site's custom op hands over is a constant there: the penalty would silently add
    nothing to the parameter gradients. That pass therefore runs the model eagerly.
    """
    import contextlib

    set_stance = getattr(torch.compiler, "set_stance", None)
    if set_stance is None:  # pragma: no cover - older torch
        return contextlib.nullcontext()
    return set_stance("force_eager")


def _math_attention() -> Any:
    """scaled_dot_product_attention on its math kernel (differentiable twice)."""
    import contextlib

    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # pragma: no cover - older torch
        return contextlib.nullcontext()
    return sdpa_kernel([SDPBackend.MATH])


def _scalar(value: Any, what: str) -> torch.Tensor:
    if not isinstance(value, torch.Tensor) or value.numel() != 1:
        raise TypeError(
            f"advgraph internal error: {what} must be a scalar tensor. "
            f"{received(got=type(value).__name__)}"
        )
    return value


class SiteCalls:
    """``penalty_backward``, ``joint_backward``, ``token_mask`` for the embedding sites."""

    # Set by the wrapper (neftune): the embedding's padding index and the ids of the
    # target's current call; by adversarial_step(mask=...): the step's token mask.
    padding_idx: int | None = None
    step_mask: torch.Tensor | None = None
    _ids: torch.Tensor | None = None

    def _run_backward(self, total: torch.Tensor) -> None:
        backward = getattr(self, "backward", None)
        if backward is None:
            total.backward()
        else:
            backward(total)

    def penalty_backward(self, closure: Callable[[], Any], penalty: Callable[[Any], Any]) -> torch.Tensor:
        self.new_pass()  # type: ignore[attr-defined]
        self._keep_outputs = True
        self.capturing = True
        try:
            # The fused attention kernels have no double backward; the math one has.
            with _math_attention(), _eager():
                loss = check_loss(closure())
            outputs = self._outputs  # type: ignore[attr-defined]
            if not outputs:
                raise ValueError(
                    "The closure's forward did not run the wrapped embedding with autograd "
                    "enabled, so there is no gradient at the perturbation site to penalise. "
                    f"{received(embedding_calls=0)}"
                )
            self._grad_parts, self._grad_keys, self._grad_pass = [], set(), -1
            # The hooks at the site record the differentiable gradient (create_graph).
            torch.autograd.grad(loss, outputs, create_graph=True, allow_unused=True)
            # site_grad() is this rank's share of the global-batch gradient (g_r / W, see
            # global_share). The gradients of the W ranks are averaged, so a penalty
            # summed over samples counts W times here to give one process's
            # ``eps/2 * sum_i ||g_i||^2`` on the concatenated batch: for gp that is
            # W * ||g_r / W||^2 = ||g_r||^2 / W on each rank (mean-reduced loss assumed).
            grad = self.site_grad()  # type: ignore[attr-defined]
            world = data_parallel_size()
            value = _scalar(penalty(grad), "the penalty")
            total = loss + (value * world if world > 1 else value).to(loss.dtype)
            del grad
            self._run_backward(total)
        finally:
            self._keep_outputs = False
            self._outputs = []
            self._grad_parts = []
            self._grad_keys = set()
            self.capturing = True
            self._fresh = True
        return loss.detach()

    def joint_backward(
        self, closure: Callable[[], Any], deltas: Any, objective: Callable[[list[Any]], Any]
    ) -> torch.Tensor:
        outs: list[Any] = []
        self.capturing = False
        try:
            for delta in deltas:
                if delta is None:
                    self.clear()  # type: ignore[attr-defined]
                else:
                    self.set_delta(delta)  # type: ignore[attr-defined]
                outs.append(closure())
            total = _scalar(objective(outs), "the objective")
            del outs
            self._run_backward(total)
        finally:
            self.clear()  # type: ignore[attr-defined]
            self.capturing = True
        return total.detach()

    def record_ids(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """Forward pre-hook of the target (neftune): the token ids of this call."""
        ids = args[0] if args else next(iter(kwargs.values()), None)
        self._ids = ids if isinstance(ids, torch.Tensor) and not ids.is_floating_point() else None

    def token_mask(self, like: torch.Tensor) -> torch.Tensor | None:
        mask = self.step_mask
        source = "mask"
        if mask is None:
            ids, pad = self._ids, self.padding_idx
            if ids is None or pad is None:
                return None
            mask, source = ids != pad, "padding_idx"
        if tuple(mask.shape) != tuple(like.shape[:-1]):
            raise ValueError(
                "The token mask must have the shape of the embedding's output without its "
                f"last axis (batch, sequence). {received(**{source + '_shape': tuple(mask.shape), 'output_shape': tuple(like.shape)})}"
            )
        acc = torch.float32 if like.dtype in (torch.float16, torch.bfloat16) else like.dtype
        return mask.to(device=like.device, dtype=acc).unsqueeze(-1)

    def site_values(self) -> Any:
        raise NotImplementedError("site_values() belongs to a site made of weights (awp).")


class Teacher:
    """SMART's momentum teacher: one tensor per trainable parameter of the host.

    It moves once per optimizer step, not once per micro-batch: an update is skipped
    when no trainable parameter was modified in place since the last one (PyTorch's
    version counters; the optimizers update parameters in place). Parameters the
    site itself edits (the embedding weight in matrix mode) are not consulted.
    """

    def __init__(self) -> None:
        self.values: dict[str, torch.Tensor] | None = None
        self.versions: dict[str, int] = {}

    def update(self, host: nn.Module, beta: float, own: tuple[Any, ...] = ()) -> None:
        params = {n: p for n, p in host.named_parameters() if p.requires_grad}
        watched = {n: p for n, p in params.items() if not any(p is o for o in own)} or params
        versions = {n: p._version for n, p in watched.items()}
        with torch.no_grad():
            if self.values is None or set(self.values) != set(params):
                self.values = {n: p.detach().clone() for n, p in params.items()}
            elif versions != self.versions:
                for name, value in self.values.items():
                    value.mul_(beta).add_(params[name].detach().to(value.dtype), alpha=1.0 - beta)
        self.versions = versions


class _ClosureModule(nn.Module):
    """Runs a closure that calls ``host``; functional_call reparametrises ``host``."""

    def __init__(self, host: nn.Module, closure: Callable[[], Any]) -> None:
        super().__init__()
        self.host = host
        self.closure = closure

    def forward(self) -> Any:
        return self.closure()


class RunnerCalls:
    """``forward_only``, ``update_teacher``, ``penalty_backward``, ``joint_backward``
    for the step runner (the last two are passes: counted for DDP's sync)."""

    host: nn.Module

    def _counted(self, call: Callable[..., Any], *args: Any) -> Any:
        runner: Any = self
        runner.done += 1
        runner.sync.active = runner.done < runner.passes
        runner.site.backward = runner.backward
        try:
            return call(*args)
        finally:
            runner.sync.active = False
            runner.sync.resume()
            runner.site.backward = None

    def penalty_backward(self, closure: Callable[[], Any], penalty: Callable[[Any], Any]) -> Any:
        return self._counted(self.site.penalty_backward, closure, penalty)  # type: ignore[attr-defined]

    def joint_backward(self, closure: Callable[[], Any], deltas: Any, objective: Any) -> Any:
        return self._counted(self.site.joint_backward, closure, deltas, objective)  # type: ignore[attr-defined]

    def _teacher(self) -> Teacher:
        state = self.host.__dict__["_advgraph"]
        if getattr(state, "teacher", None) is None:
            state.teacher = Teacher()
        return state.teacher

    def update_teacher(self, beta: float) -> None:
        own = getattr(self.site, "weight", None)  # type: ignore[attr-defined]
        self._teacher().update(self.host, beta, () if own is None else (own,))

    def forward_only(self, closure: Callable[[], Any], *, teacher: bool = False) -> Any:
        with torch.no_grad():
            if not teacher:
                return _detach(closure())
            values = self._teacher().values
            if values is None:
                raise RuntimeError("advgraph internal error: forward_only(teacher=True) before update_teacher().")
            runner = _ClosureModule(self.host, closure)
            params = {f"host.{name}": value for name, value in values.items()}
            return _detach(torch.func.functional_call(runner, params, ()))
