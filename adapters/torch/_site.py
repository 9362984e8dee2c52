"""Perturbation sites for PyTorch: the embedding's output, or its matrix rows.

Both implement :class:`advgraph.Site`. The gradient at the site always
comes from the embedding's output in the current pass, never from ``.grad``:
with gradient accumulation ``.grad`` holds earlier micro-batches.

A target may be looked up several times per forward (the encoder's and the
decoder's ``embed_tokens`` of T5/BART share one weight; a bi-encoder runs one
encoder twice). Output mode numbers the calls of a pass and gives each its own
gradient and its own delta; matrix mode perturbs the union of the rows touched.

Eagerly the gradient is read by a tensor hook on the output. Inside a
``torch.compile``d forward a hook registered there would break the graph, so
the output goes through an ``autograd.Function`` whose backward hands the
gradient to the site through the ``advgraph::grad_tap_v2`` custom op (matrix mode,
a plain CPU ``nn.Embedding``: the lookup itself is the tap, ``grad_rows_v1``; see
:mod:`._taps`).
"""

from __future__ import annotations

import functools
import itertools
import warnings
import weakref
from typing import Any, Callable

import torch
from torch import nn

from advgraph._delta import DeltaResult, skipped_nothing
from advgraph._errors import AdvGraphWarning, received

from . import _taps
from ._calls import SiteCalls, data_parallel_size, global_share
from ._checks import check_loss


class Stats:
    """Counters of one wrapped model (read them as ``wrapped.advgraph_stats``)."""

    def __init__(self) -> None:
        self.steps = 0
        self.skipped_nonfinite = 0
        self.skipped_zero = 0
        self.plain_steps = 0

    def as_dict(self) -> dict[str, int]:
        return {
            "steps": self.steps,
            "plain_steps": self.plain_steps,
            "skipped_nonfinite": self.skipped_nonfinite,
            "skipped_zero": self.skipped_zero,
        }


_KEYS = itertools.count(1)
_SITES = _taps.SITES  # the live sites by key (the compiled path's taps find them there)


_OWN_BACKWARD = (
    "The closure ran a backward pass itself (loss.backward()); adversarial_step() runs "
    "the backward of every pass, so the closure must only run the forward and return "
    "the loss. Remove the backward from the closure; for a custom backward (e.g. "
    "accelerator.backward, engine.backward) pass adversarial_step(closure, backward=...). "
    "The weights are as before the step (their .grad may hold the closure's own backward). "
)


class _Site(SiteCalls):
    """What both sites share: number the target's calls, read their gradients."""

    mode = "abstract"

    def __init__(self, stats: Stats) -> None:
        self.stats = stats
        # Outputs are held only while forward_backward() runs (for autograd.grad).
        self._outputs: list[torch.Tensor] = []
        self._keep_outputs = False
        # ((call, key), gradient): the output gradient; matrix mode's compiled tap may
        # hand in the touched rows' gradient instead, as a (rows, gradient) pair.
        self._grad_parts: list[tuple[Any, Any]] = []
        self._grad_keys: set[int] = set()
        self._pass = 0
        self._grad_pass = -1
        self._calls = 0  # calls of the target in the current pass
        self._fresh = True  # the next forward of the wrapped model starts a new pass
        self._grad_used = False  # the last backward's gradient already gave a delta
        self.capturing = True  # False while a pass needs no gradient at the site
        self.active = False
        # Set by adversarial_step(backward=...) for one step: runs the backward of the
        # passes that accumulate parameter gradients (e.g. accelerator.backward).
        self.backward: Callable[[torch.Tensor], Any] | None = None
        # Named in the error raised when a forward never reaches the site.
        self.names: dict[str, Any] = {}
        self._register()

    def _register(self) -> None:
        self.key = next(_KEYS)
        _SITES[self.key] = self
        # The compiled path's leaf: a gradient-only pass asks autograd for its gradient.
        self.anchor = torch.zeros((), requires_grad=True)

    # -- passes -------------------------------------------------------------
    def new_pass(self) -> None:
        self._calls = 0
        self._pass += 1
        self._fresh = False

    def begin_forward(self, *_: Any) -> None:
        """Forward pre-hook of the wrapped model: a forward after a backward (or after
        a delta was installed or removed) begins a new pass; calls are numbered from 0."""
        if self._fresh:
            self.new_pass()

    def _next_call(self) -> int:
        call = self._calls
        self._calls = call + 1
        return call

    def _capture(
        self, out: torch.Tensor, key: Any, call: int, ids: torch.Tensor | None = None, index: int = 0
    ) -> torch.Tensor:
        if torch.compiler.is_compiling():
            # No tensor hook inside a compiled region (it breaks the graph): the tap's
            # backward reports the gradient; the anchor lets a gradient-only pass reach it.
            if self._keep_outputs:
                self._outputs.append(self.anchor)
            if not self.capturing:
                return out
            return _taps.tap(out, self.anchor, ids, self.key, call, index)
        if self._keep_outputs:
            self._outputs.append(out)
        if self.capturing:
            out.register_hook(functools.partial(self._on_grad, self._pass, call, key))
        return out

    def _on_grad(self, pass_id: int, call: int, key: Any, grad: torch.Tensor) -> None:
        # The gradient parts of the latest pass whose backward ran replace older ones;
        # a forward that fails before its backward leaves the last gradient intact.
        if pass_id != self._grad_pass or call in self._grad_keys:
            self._grad_parts = []
            self._grad_keys = set()
            self._grad_pass = pass_id
            self._grad_used = False
        self._grad_parts.append(((call, key), grad))
        self._grad_keys.add(call)
        self._fresh = True

    def on_compiled_grad(
        self, call: int, ids: torch.Tensor | None, index: int, grad: torch.Tensor
    ) -> None:
        """The compiled path's tap: the gradient of call ``call`` of the current pass.

        ``grad`` is a buffer of the compiled backward, which may reuse it once this
        call returns: the site keeps a copy."""
        self._on_grad(self._pass, call, None, grad.clone())

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
        self.new_pass()
        self._keep_outputs = True
        self.capturing = keep_grad
        try:
            loss = closure()
            if loss is None and allow_none:
                return None
            loss = check_loss(loss)
            if self._grad_parts and self._grad_pass == self._pass:
                raise ValueError(_OWN_BACKWARD + received(closure_ran_backward=True))
            outputs = self._outputs
            if not outputs:
                raise ValueError(self._not_called_message())
            target = loss if scale == 1.0 else loss * scale
            self._grad_parts, self._grad_keys, self._grad_pass = [], set(), -1
            try:
                if param_grads:
                    if self.backward is None:
                        target.backward()
                    else:
                        self.backward(target)
                else:
                    torch.autograd.grad(target, outputs, allow_unused=True)
            except RuntimeError as error:
                if "backward through the graph a second time" not in str(error):
                    raise
                raise ValueError(_OWN_BACKWARD + received(closure_ran_backward=True)) from error
        finally:
            self._keep_outputs = False
            self._outputs = []
            self.capturing = True
            self._fresh = True
        return loss.detach()

    def _not_called_message(self) -> str:
        info = self.names
        target = info.get("target", "?")
        sharing = info.get("sharing") or []
        also = (
            f" Modules holding the same weight: {', '.join(sharing)}; target='embedding' "
            "perturbs every module that looks the input-embedding weight up, a dotted path "
            "only that module."
            if sharing
            else ""
        )
        return (
            f"The closure's forward did not run the wrapped embedding ({target}) with autograd "
            "enabled, so there is no gradient at the perturbation site." + also + " Call the "
            "wrapped model inside the closure (with DistributedDataParallel: give DDP the "
            "object advgraph.wrap() returned, or wrap the DDP module). "
            f"{received(embedding_calls=0, target=target)}"
        )

    def has_grad(self) -> bool:
        return bool(self._grad_parts)

    def site_grad(self) -> Any:
        """The gradient at the site from the last backward; each one is used once.

        Under data parallelism (W ranks, gradients averaged) it is this rank's share
        of the gradient of the global batch's mean loss, ``g_r / W``: the gradient one
        process computes at these samples (output mode), so a method that depends on
        the gradient's scale (smart's ascent step, gp's penalty) gives the update of
        one process on the concatenated batch.

        Reading it releases it, so that nothing O(batch) or O(rows) stays alive
        through the next pass.
        """
        if not self._grad_parts and getattr(self, "_grad_used", False):
            raise RuntimeError(
                "The gradient of the last backward was already used for a delta (by the "
                "previous perturbed() block, or by adversarial_step()); each backward gives "
                "one delta. Run the clean forward and backward again before the next "
                "perturbed() block (a backward inside a perturbed() block does not count: "
                f"it trains on the perturbed input). {received(recorded_gradients=0, already_used=True)}"
            )
        if not self._grad_parts:
            raise RuntimeError(
                "No gradient at the perturbation site: run a forward and a backward of the "
                "wrapped model (with a loss that depends on the embedding) before "
                "perturbed(); each backward's gradient gives one delta. "
                f"{received(recorded_gradients=0)}"
            )
        try:
            return global_share(self._grad(), data_parallel_size())
        finally:
            self._grad_parts = []
            self._grad_keys = set()
            self._grad_used = True

    def _grad(self) -> Any:
        raise NotImplementedError

    def record(self, result: DeltaResult) -> None:
        if skipped_nothing(result):  # the flags are all False by construction
            return
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
        state["_grad_keys"] = set()
        state["_values"] = []
        state["backward"] = None
        state.pop("anchor", None)
        state.pop("key", None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._register()

    def __deepcopy__(self, memo: dict[int, Any]) -> "_Site":
        import copy

        new = type(self).__new__(type(self))
        memo[id(self)] = new
        for key, value in self.__getstate__().items():
            new.__dict__[key] = copy.deepcopy(value, memo)
        new._register()
        return new


def _plain(delta: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``delta`` outside autograd, in ``dtype`` (no operation when it already is)."""
    if delta.requires_grad:
        delta = delta.detach()
    return delta if delta.dtype == dtype else delta.to(dtype)


def _check_shape(delta: torch.Tensor, x: torch.Tensor, call: int) -> None:
    if delta.shape != x.shape:
        raise ValueError(
            "The batch's embedding output has another shape in the adversarial pass "
            "than in the pass the delta was computed from; output mode needs the "
            "same batch in both. "
            f"{received(delta_shape=tuple(delta.shape), output_shape=tuple(x.shape), call=call)}"
        )


class OutputSite(_Site):
    """delta on the embedding's output activations, shape ``(b, n, d)`` per call.

    When the target runs several times in a pass, the gradient is a tuple (one
    per call, in call order) and so is the delta; call ``i`` of a later forward
    gets ``delta[i % len(delta)]``.
    """

    mode = "output"

    def __init__(self, stats: Stats) -> None:
        super().__init__(stats)
        self.delta: Any = None  # a tensor, a tuple of tensors, a function, or None
        self._made: list[torch.Tensor] = []  # deltas a function gave, one per call
        # site_values(): each call's output (without delta) in the latest site pass
        # (forward_backward) that kept a gradient; dropped when a delta is installed
        # or removed, so nothing O(batch) stays alive through the passes after it.
        self._values: list[torch.Tensor] = []
        self._values_pass = -1

    def _delta_for(self, call: int, x: torch.Tensor) -> torch.Tensor | None:
        delta = self.delta
        if delta is None:
            return None
        if isinstance(delta, torch.Tensor):
            return delta
        if isinstance(delta, tuple):
            return delta[call % len(delta)]
        if call < len(self._made):
            return self._made[call]
        made = delta(torch.zeros_like(x, requires_grad=False)).detach()
        self._made.append(made)
        return made

    def on_output(self, x: torch.Tensor) -> torch.Tensor:
        """Called by the perturbation node / hook with one call's embedding output."""
        call = self._next_call()
        if self._keep_outputs and self.capturing and not torch.compiler.is_compiling():
            if self._values_pass != self._pass:
                self._values, self._values_pass = [], self._pass
            self._values.append(x.detach())
        delta = self._delta_for(call, x)
        if delta is not None:
            _check_shape(delta, x, call)
            x = x + delta.to(x.dtype)
        if torch.is_grad_enabled():
            if not x.requires_grad and not torch.compiler.is_compiling():
                # A frozen embedding: the gradient at its output is still defined.
                x = x.detach().requires_grad_()
            x = self._capture(x, None, call)
        return x

    def output_hook(self, module: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor:
        """Forward hook of a lookup (the hook route): same as the perturbation node.

        A bound method, not a lambda, so that ``copy.deepcopy`` of the model gives the
        copy's hook the copy's site.
        """
        return self.on_output(output)

    def _grad(self) -> Any:
        parts = sorted(self._grad_parts, key=lambda part: part[0][0])
        if len(parts) == 1:
            return parts[0][1]
        return tuple(grad for _, grad in parts)

    def site_values(self) -> Any:
        """The embedding's output (without delta) of each call in the latest pass that
        kept a gradient: the structure :meth:`site_grad` gives."""
        if not self._values:
            raise RuntimeError(
                "No values at the perturbation site: site_values() reads the embedding's "
                "output of the last forward_backward() that kept a gradient, before any "
                "set_delta() or clear() (not available inside torch.compile). "
                f"{received(recorded_values=0)}"
            )
        values = self._values
        return values[0] if len(values) == 1 else tuple(values)

    def set_delta(self, delta: Any) -> None:
        self._values = []
        if callable(delta):
            self.delta = delta
            self._made = []
        elif isinstance(delta, tuple):
            self.delta = tuple(d.detach() for d in delta)
        else:
            self.delta = delta.detach()
        self.active = True
        self._fresh = True

    def clear(self) -> None:
        self.delta = None
        self._made = []
        self._values = []
        self.active = False
        self._fresh = True


class MatrixSite(_Site):
    """delta on the rows of the embedding matrix that the batch touched.

    The gradient of those rows is gathered from the output gradient of every
    lookup of the pass (what the embedding's backward does), so it is the
    gradient through the lookups only, also when the weight is tied to an
    output layer. Extra memory is O(touched rows x d): the rows' saved values
    and delta, never a copy of the whole matrix. Restore copies the saved rows
    back (bit-exact).
    """

    mode = "matrix"
    drawing = False  # (class default: a site pickled before this field existed)

    def __init__(self, lookups: list[nn.Module], stats: Stats) -> None:
        super().__init__(stats)
        self.lookups = list(lookups)
        self._rows: torch.Tensor | None = None
        self._saved: torch.Tensor | None = None
        self._pending: Callable[[torch.Tensor], torch.Tensor] | None = None
        self._applied: torch.Tensor | None = None  # what the pending function gave, by row
        # Whether a delta function is pending: a bool (not the function, a new object
        # each step) that a compiled forward guards on, so that a pass with nothing
        # to draw has no lookup_rows op at all (one graph per value, no recompiles).
        self.drawing = False

    @property
    def embedding(self) -> nn.Module:
        return self.lookups[0]

    @property
    def weight(self) -> torch.Tensor:
        return self.lookups[0].weight

    def before_lookup(self, module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
        """Forward pre-hook of a lookup: materialise a delta given as a function.

        The function gets zeros for the rows touched so far in the pass. When a later
        lookup of the same pass (an encoder-decoder's decoder) touches new rows, it is
        called again with zeros for the union of rows; the rows perturbed already keep
        their values, which are written into the array it returned (so a method that
        kept that array, as FreeLB keeps its random start, sees what was applied).
        """
        if not args or not isinstance(args[0], torch.Tensor):
            return None
        if torch.compiler.is_compiling():
            if not self.drawing:
                return None
            # The rows are data-dependent (torch.unique): an opaque op does this work
            # at run time, so that the compiled graph does not break here.
            return (_taps.lookup_rows(args[0], self.key),) + tuple(args[1:])
        self.perturb_rows(args[0])
        return None

    def perturb_rows(self, ids: torch.Tensor) -> None:
        """Materialise a pending delta on the rows ``ids`` touch (see ``before_lookup``)."""
        if self._pending is None:
            return
        rows = torch.unique(ids).long()  # int32 ids too: index_copy_ takes int64 rows
        weight = self.weight
        acc = torch.float32 if weight.dtype in (torch.float16, torch.bfloat16) else weight.dtype

        def zeros(count: int) -> torch.Tensor:
            return torch.zeros(count, weight.shape[1], dtype=acc, device=weight.device)

        if self._applied is None or self._rows is None:
            delta = self._pending(zeros(rows.shape[0]))
            self._add_rows(rows, delta)
            self._applied = delta
            return
        new = rows[~torch.isin(rows, self._rows)]
        if new.numel() == 0:
            return
        union = torch.unique(torch.cat([self._rows, new]))
        delta = self._pending(zeros(union.shape[0]))
        with torch.no_grad():
            delta[torch.searchsorted(union, self._rows)] = self._applied.to(delta.dtype)
        self._add_rows(new, delta[torch.searchsorted(union, new)])
        self._applied = delta

    def on_forward(self, module: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> Any:
        """Forward hook of a lookup."""
        if torch.is_grad_enabled() and isinstance(output, torch.Tensor) and output.requires_grad:
            call = self._next_call()
            index = next((i for i, m in enumerate(self.lookups) if m is module), 0)
            if self.capturing and torch.compiler.is_compiling() and _taps.plain_lookup(module, self.on_forward):
                # The lookup recomputed as the tap (the module's own output is then
                # unused, and dropped from the compiled graph): see on_compiled_rows.
                if self._keep_outputs:
                    self._outputs.append(self.anchor)
                return _taps.tap_lookup(module, args[0], self.anchor, self.key, call, index)
            ids = args[0].detach()
            captured = self._capture(output, (ids, module), call, ids=ids, index=index)
            if captured is not output:
                return captured
        return None

    def _rows_grad(
        self, ids: torch.Tensor, grads: torch.Tensor, emb: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """What a lookup's backward computes, for the touched rows only."""
        by_freq = bool(getattr(emb, "scale_grad_by_freq", False))
        rows, inverse, *counts = torch.unique(ids, return_inverse=True, return_counts=by_freq)
        rows = rows.long()  # int32 ids too: index_copy_ takes int64 rows
        acc_dtype = torch.float32 if grads.dtype in (torch.float16, torch.bfloat16) else grads.dtype
        out = torch.zeros(rows.shape[0], grads.shape[1], dtype=acc_dtype, device=grads.device)
        out.index_add_(0, inverse, grads if grads.dtype == acc_dtype else grads.to(acc_dtype))
        if by_freq:
            out.div_(counts[0].to(acc_dtype).unsqueeze(1))
        padding_idx = getattr(emb, "padding_idx", None)
        if padding_idx is not None:
            # rows is sorted: the padding row, if touched, is where searchsorted puts it
            # (one small read instead of a mask over every row: 6 vs 46 us here), and
            # row 0 can only be first.
            at = 0 if padding_idx == 0 else int(torch.searchsorted(rows, int(padding_idx)))
            if at < rows.shape[0] and int(rows[at]) == padding_idx:
                out[at] = 0.0
        return rows, out

    def _grad(self) -> torch.Tensor:
        # Eagerly the output gradient is reduced to the touched rows only when read:
        # during the backward, the reference held here is one autograd holds anyway, so
        # the peak memory of a step grows by the saved rows alone. The compiled path's
        # tap hands in the reduced rows (see on_compiled_grad).
        pieces = []
        for (_, (ids, module)), grad in self._grad_parts:
            if isinstance(grad, tuple):  # reduced already (the compiled path's tap)
                pieces.append(grad)
            else:
                pieces.append(self._reduce(ids, module, grad))
        dim = pieces[0][1].shape[-1]
        if len(pieces) == 1:
            rows, out = pieces[0]
        else:  # several lookups in one pass: the gradient summed over them, union of rows
            rows = torch.unique(torch.cat([r for r, _ in pieces]))
            out = torch.zeros(rows.shape[0], dim, dtype=pieces[0][1].dtype, device=pieces[0][1].device)
            for r, g in pieces:
                out.index_add_(0, torch.searchsorted(rows, r), g)
        if self._saved is not None and not torch.equal(rows, self._rows):
            raise ValueError(
                "The batch touched other embedding rows in this pass than in the pass the "
                "delta was computed from; mode='matrix' needs the same batch in all passes "
                f"of a step. {received(rows_before=int(self._rows.numel()), rows_now=int(rows.numel()))}"
            )
        self._rows = rows
        return out

    def _reduce(
        self, ids: torch.Tensor, module: nn.Module | None, grad: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        emb = module if module is not None else self.embedding
        return self._rows_grad(ids.reshape(-1), grad.reshape(-1, grad.shape[-1]), emb)

    def on_compiled_grad(
        self, call: int, ids: torch.Tensor | None, index: int, grad: torch.Tensor
    ) -> None:
        """The compiled path's tap. The compiled backward may reuse ``grad``'s buffer
        after this call, so the site keeps what it makes of it now: on the CPU the
        touched rows' gradient (no copy of the whole gradient); on an accelerator a
        copy, reduced when read, because ``torch.unique`` waits for the device and
        would stall the backward midway."""
        module = self.lookups[index] if index < len(self.lookups) else None
        kept = self._reduce(ids, module, grad) if self._reduces_at_the_tap(grad) else grad.clone()
        self._on_grad(self._pass, call, (ids, module), kept)

    def on_compiled_rows(self, call: int, ids: torch.Tensor, index: int, dense: torch.Tensor) -> None:
        """The compiled path's tap of a plain lookup (``_taps.tap_lookup``): ``dense`` is
        the weight's gradient through call ``call`` (what the lookup's own backward
        computes: padding row zero, ``scale_grad_by_freq`` applied). The site keeps the
        touched rows of it, copied: the buffer belongs to the compiled backward."""
        module = self.lookups[index] if index < len(self.lookups) else None
        rows = torch.unique(ids).long()
        self._on_grad(self._pass, call, (ids, module), (rows, dense.index_select(0, rows)))

    @staticmethod
    def _reduces_at_the_tap(grad: torch.Tensor) -> bool:
        return grad.device.type == "cpu"

    def _add_rows(self, rows: torch.Tensor, delta: torch.Tensor) -> None:
        """Perturb ``rows`` (not perturbed yet) by ``delta``, saving them first."""
        weight = self.weight
        with torch.no_grad():
            saved = weight.index_select(0, rows)
            if self._saved is None or self._rows is None:
                merged, merged_saved = rows, saved
            else:
                merged = torch.cat([self._rows, rows])
                merged_saved = torch.cat([self._saved, saved])
            order = torch.argsort(merged)
            self._rows, self._saved = merged[order], merged_saved[order]
            self.active = True
            weight.index_copy_(0, rows, saved + _plain(delta, weight.dtype))

    def set_delta(self, delta: Any) -> None:
        self._fresh = True
        if callable(delta):
            if self._saved is not None:
                with torch.no_grad():
                    self.weight.index_copy_(0, self._rows, self._saved)
                self._saved = None
            self._pending, self._applied = delta, None
            self.drawing = True
            self.active = True
            return
        self._pending, self._applied = None, None
        self.drawing = False
        if self._rows is None:
            raise RuntimeError("set_delta() before site_grad(): no rows to perturb.")
        weight = self.weight
        with torch.no_grad():
            if self._saved is None:
                self._saved = weight.index_select(0, self._rows)
            self.active = True
            # W[rows] = saved + delta (the value W[rows] += delta gives, bit for bit, in
            # one copy; index_add_ is a loop over rows on CPU); delta is not kept.
            weight.index_copy_(0, self._rows, self._saved + _plain(delta, weight.dtype))

    def clear(self) -> None:
        self._pending, self._applied = None, None
        self.drawing = False
        self._fresh = True
        if self._saved is not None:
            with torch.no_grad():
                self.weight.index_copy_(0, self._rows, self._saved)
            self._saved = None
        self.active = False
