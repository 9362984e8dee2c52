"""Perturbation sites for PyTorch: the embedding's output, or its matrix rows.

Both implement :class:`advgraph._methods.Site`. The gradient at the site always
comes from a tensor hook on the embedding's output in the current pass, never
from ``.grad``: with gradient accumulation ``.grad`` holds earlier micro-batches.
"""

from __future__ import annotations

import warnings
from typing import Any, Callable

import torch
from torch import nn

from advgraph._delta import DeltaResult
from advgraph._errors import AdvGraphWarning, received

from ._calls import SiteCalls


class Stats:
    """Counters of one wrapped model (read them as ``wrapped.advgraph_stats``)."""

    def __init__(self) -> None:
        self.steps = 0
        self.skipped_nonfinite = 0
        self.skipped_zero = 0

    def as_dict(self) -> dict[str, int]:
        return {
            "steps": self.steps,
            "skipped_nonfinite": self.skipped_nonfinite,
            "skipped_zero": self.skipped_zero,
        }


def check_loss(loss: Any) -> torch.Tensor:
    if not isinstance(loss, torch.Tensor):
        raise TypeError(
            "The closure must return the loss as a scalar torch.Tensor. "
            f"{received(closure_returned=type(loss).__name__)}"
        )
    if loss.numel() != 1:
        raise ValueError(
            "The closure must return a scalar loss (one element); reduce it first, e.g. "
            f".mean(). {received(loss_shape=tuple(loss.shape))}"
        )
    if not loss.requires_grad:
        raise ValueError(
            "The closure's loss does not require grad: it must come from a forward of the "
            "wrapped model with autograd enabled (not under torch.no_grad()). "
            f"{received(loss_requires_grad=False)}"
        )
    return loss


class _Site(SiteCalls):
    """What both sites share: capture the target's output, read its gradient."""

    mode = "abstract"

    def __init__(self, stats: Stats) -> None:
        self.stats = stats
        # Outputs are held only while forward_backward() runs (for autograd.grad).
        self._outputs: list[torch.Tensor] = []
        self._keep_outputs = False
        self._grad_parts: list[tuple[Any, torch.Tensor]] = []
        self._pass = 0
        self._grad_pass = -1
        self.capturing = True  # False while a pass needs no gradient at the site
        self.active = False
        # Set by adversarial_step(backward=...) for one step: runs the backward of the
        # passes that accumulate parameter gradients (e.g. accelerator.backward).
        self.backward: Callable[[torch.Tensor], Any] | None = None

    # -- capture ------------------------------------------------------------
    def begin_forward(self, *_: Any) -> None:
        """Forward pre-hook of the wrapped model: a new pass begins."""
        self._outputs = []
        self._pass += 1

    def _capture(self, out: torch.Tensor, key: Any = None) -> None:
        if self._keep_outputs:
            self._outputs.append(out)
        if not self.capturing:
            return
        out.register_hook(lambda g, p=self._pass: self._on_grad(p, key, g))

    def _on_grad(self, pass_id: int, key: Any, grad: torch.Tensor) -> None:
        # The gradient parts of the latest pass whose backward ran replace older ones;
        # a forward that fails before its backward leaves the last gradient intact.
        if pass_id != self._grad_pass:
            self._grad_parts = []
            self._grad_pass = pass_id
        self._grad_parts.append((key, grad))

    # -- Site interface -------------------------------------------------------
    def forward_backward(
        self,
        closure: Callable[[], Any],
        *,
        param_grads: bool,
        scale: float = 1.0,
        allow_none: bool = False,
        keep_grad: bool = True,
    ) -> torch.Tensor | None:
        self.begin_forward()
        self._keep_outputs = True
        self.capturing = keep_grad
        try:
            loss = closure()
            if loss is None and allow_none:
                return None
            loss = check_loss(loss)
            outputs = self._outputs
            if not outputs:
                raise ValueError(
                    "The closure's forward did not run the wrapped embedding with autograd "
                    "enabled, so there is no gradient at the perturbation site. Call the "
                    "wrapped model inside the closure (with DistributedDataParallel: give "
                    "DDP the object advgraph.wrap() returned, or wrap the DDP module). "
                    f"{received(embedding_calls=0)}"
                )
            target = loss if scale == 1.0 else loss * scale
            self._grad_parts, self._grad_pass = [], -1
            if param_grads:
                if self.backward is None:
                    target.backward()
                else:
                    self.backward(target)
            else:
                torch.autograd.grad(target, outputs, allow_unused=True)
        finally:
            self._keep_outputs = False
            self._outputs = []
            self.capturing = True
        return loss.detach()

    def has_grad(self) -> bool:
        return bool(self._grad_parts)

    def site_grad(self) -> torch.Tensor:
        """The gradient at the site from the last backward; each one is used once.

        Reading it releases it, so that nothing O(batch) or O(rows) stays alive
        through the next pass.
        """
        if not self._grad_parts:
            raise RuntimeError(
                "No gradient at the perturbation site: run a forward and a backward of the "
                "wrapped model (with a loss that depends on the embedding) before "
                "perturbed(); each backward's gradient gives one delta. "
                f"{received(recorded_gradients=0)}"
            )
        try:
            return self._grad()
        finally:
            self._grad_parts = []

    def _grad(self) -> torch.Tensor:
        raise NotImplementedError

    def record(self, result: DeltaResult) -> None:
        nonfinite = bool(result.nonfinite.any())
        zero = bool(result.zero.any())
        if nonfinite:
            self.stats.skipped_nonfinite += 1
            warnings.warn(
                "advgraph: the gradient at the embedding holds NaN or inf; delta = 0 for "
                "the affected samples this step (counted in advgraph_stats).",
                AdvGraphWarning,
                stacklevel=4,
            )
        if zero:
            self.stats.skipped_zero += 1
            warnings.warn(
                "advgraph: the gradient at the embedding is zero; delta = 0 for the "
                "affected samples this step (counted in advgraph_stats).",
                AdvGraphWarning,
                stacklevel=4,
            )

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_outputs"] = []
        state["_grad_parts"] = []
        state["backward"] = None
        return state

    def __deepcopy__(self, memo: dict[int, Any]) -> "_Site":
        import copy

        new = type(self).__new__(type(self))
        memo[id(self)] = new
        for key, value in self.__getstate__().items():
            new.__dict__[key] = copy.deepcopy(value, memo)
        return new


class OutputSite(_Site):
    """delta on the embedding's output activations, shape ``(b, n, d)``."""

    mode = "output"

    def __init__(self, stats: Stats) -> None:
        super().__init__(stats)
        self.delta: torch.Tensor | None = None

    def on_output(self, x: torch.Tensor) -> torch.Tensor:
        """Called by the perturbation node / hook with the embedding's output."""
        if callable(self.delta):
            self.delta = self.delta(torch.zeros_like(x, requires_grad=False)).detach()
        if self.delta is not None:
            if self.delta.shape != x.shape:
                raise ValueError(
                    "The batch's embedding output has another shape in the adversarial pass "
                    "than in the pass the delta was computed from; output mode needs the "
                    "same batch in both. "
                    f"{received(delta_shape=tuple(self.delta.shape), output_shape=tuple(x.shape))}"
                )
            x = x + self.delta.to(x.dtype)
        if torch.is_grad_enabled():
            if not x.requires_grad:
                # A frozen embedding: the gradient at its output is still defined.
                x = x.detach().requires_grad_()
            self._capture(x)
        return x

    def output_hook(self, module: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor:
        """Forward hook of the target (the hook route): same as the perturbation node.

        A bound method, not a lambda, so that ``copy.deepcopy`` of the model gives the
        copy's hook the copy's site.
        """
        return self.on_output(output)

    def _grad(self) -> torch.Tensor:
        if len(self._grad_parts) > 1:
            raise ValueError(
                "The target embedding ran more than once in one pass; mode='output' needs "
                "one call per forward (use mode='matrix', or target a module called once). "
                f"{received(calls=len(self._grad_parts))}"
            )
        return self._grad_parts[-1][1]

    def set_delta(self, delta: Any) -> None:
        self.delta = delta if callable(delta) else delta.detach()
        self.active = True

    def clear(self) -> None:
        self.delta = None
        self.active = False


class MatrixSite(_Site):
    """delta on the rows of the embedding matrix that the batch touched.

    The gradient of those rows is gathered from the output gradient (what the
    embedding's backward does), so it is the gradient through the lookup only,
    also when the weight is tied to an output layer. Extra memory is
    O(touched rows x d): the rows' saved values and delta, never a copy of the
    whole matrix. Restore copies the saved rows back (bit-exact).
    """

    mode = "matrix"

    def __init__(self, embedding: nn.Embedding, stats: Stats) -> None:
        super().__init__(stats)
        self.embedding = embedding
        self._rows: torch.Tensor | None = None
        self._saved: torch.Tensor | None = None
        self._pending: Callable[[torch.Tensor], torch.Tensor] | None = None

    @property
    def weight(self) -> torch.Tensor:
        return self.embedding.weight

    def before_lookup(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        """Forward pre-hook of the embedding: materialise a delta given as a function."""
        if self._pending is not None:
            fn, self._pending = self._pending, None
            rows = torch.unique(args[0])
            self._rows = rows
            dtype = self.weight.dtype
            acc = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
            zeros = torch.zeros(rows.shape[0], self.weight.shape[1], dtype=acc, device=self.weight.device)
            self.set_delta(fn(zeros))

    def on_forward(self, module: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> None:
        """Forward hook of the embedding."""
        if torch.is_grad_enabled() and isinstance(output, torch.Tensor) and output.requires_grad:
            self._capture(output, key=args[0].detach())

    def _rows_grad(self, ids: torch.Tensor, grads: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """What the embedding's backward computes, for the touched rows only."""
        rows, inverse, counts = torch.unique(ids, return_inverse=True, return_counts=True)
        acc_dtype = torch.float32 if grads.dtype in (torch.float16, torch.bfloat16) else grads.dtype
        out = torch.zeros(rows.shape[0], grads.shape[1], dtype=acc_dtype, device=grads.device)
        out.index_add_(0, inverse, grads.to(acc_dtype))
        emb = self.embedding
        if getattr(emb, "scale_grad_by_freq", False):
            out.div_(counts.to(acc_dtype).unsqueeze(1))
        padding_idx = getattr(emb, "padding_idx", None)
        if padding_idx is not None:
            out.masked_fill_((rows == padding_idx).unsqueeze(1), 0.0)
        return rows, out

    def _grad(self) -> torch.Tensor:
        # The output gradient is reduced to the touched rows only when read: during the
        # backward, the reference held here is one autograd holds anyway, so the peak
        # memory of a step grows by the saved rows alone.
        dim = self._grad_parts[0][1].shape[-1]
        if len(self._grad_parts) == 1:
            ids, grads = self._grad_parts[0][0].reshape(-1), self._grad_parts[0][1].reshape(-1, dim)
        else:  # the embedding ran several times in one pass
            ids = torch.cat([key.reshape(-1) for key, _ in self._grad_parts])
            grads = torch.cat([g.reshape(-1, dim) for _, g in self._grad_parts])
        rows, out = self._rows_grad(ids, grads)
        if self._saved is not None and not torch.equal(rows, self._rows):
            raise ValueError(
                "The batch touched other embedding rows in this pass than in the pass the "
                "delta was computed from; mode='matrix' needs the same batch in all passes "
                f"of a step. {received(rows_before=int(self._rows.numel()), rows_now=int(rows.numel()))}"
            )
        self._rows = rows
        return out

    def set_delta(self, delta: Any) -> None:
        if callable(delta):
            self._pending = delta
            self.active = True
            return
        if self._rows is None:
            raise RuntimeError("set_delta() before site_grad(): no rows to perturb.")
        weight = self.weight
        with torch.no_grad():
            if self._saved is None:
                self._saved = weight.index_select(0, self._rows)
            else:
                weight.index_copy_(0, self._rows, self._saved)
            self.active = True
            # W[rows] += delta in place: delta itself is not kept.
            weight.index_add_(0, self._rows, delta.detach().to(weight.dtype))

    def clear(self) -> None:
        self._pending = None
        if self._saved is not None:
            with torch.no_grad():
                self.weight.index_copy_(0, self._rows, self._saved)
            self._saved = None
        self.active = False


class Perturbation(nn.Module):
    """The node the fx pass inserts after the embedding's output.

    With no delta installed it returns its input unchanged (the same tensor);
    the wrapped model's outputs are then bit-identical to the original's.
    """

    def __init__(self, site: OutputSite) -> None:
        super().__init__()
        self.site = site

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.site.on_output(x)

    def extra_repr(self) -> str:
        return f"advgraph {self.site.mode} perturbation"
