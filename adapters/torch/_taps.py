"""Reading the gradient at the site inside a ``torch.compile``d forward.

Eagerly the site registers a tensor hook on the embedding's output. Dynamo
cannot keep such a hook in the graph when its body has Python side effects
(it breaks the graph: "HOP: Non-nullified side effect"), so inside a compiled
region the output goes through :func:`tap` instead:

* in the forward, an ``autograd.Function`` that returns ``x`` (dynamo inlines it:
  no call out of the compiled graph, and inductor fuses its copy into the op that
  reads it). Its backward calls
* ``advgraph::grad_tap_v2(grad, ids, site, call, index)``, a custom op, which
  dynamo and AOTAutograd keep as an opaque node of the compiled backward: it runs
  at backward time with the real gradient and hands it to the site registered
  under ``site`` (an int baked into the graph). The gradient itself flows on past
  the op (the backward returns it), so nothing is copied on the way; the site
  keeps only what it made from ``grad`` during the call (a copy, or the touched
  rows' gradient), never ``grad`` itself, whose buffer the compiled backward may
  reuse once its last reader ran.

The ``_v2``: inductor caches compiled graphs on disk under a key made from the
forward graph, which names a custom op but not the backward registered for it; a
change to what an op does therefore needs a new name, or a cache filled by an
earlier advgraph would run the old code against the new op. (Earlier code
registered ``site_tap``/``grad_tap``, then ``site_tap_v2``, a custom op whose
forward copied ``x``; the ``autograd.Function`` replaced it.)

Matrix mode's lookups that are plain ``nn.Embedding``s on the CPU (see
:func:`plain_lookup`) are tapped one step further back: the site's forward hook
recomputes the lookup through :func:`tap_lookup`, an ``autograd.Function`` whose
backward is the lookup's own (``embedding_dense_backward``, the dense weight
gradient the compiled backward computes anyway, not a second time) and which hands
that gradient to ``advgraph::grad_rows_v1``; the site copies the touched rows out of
it (one ``index_select``) instead of reducing the output's gradient to them (a sort,
a zero fill and an ``index_add_``) while the backward runs. The module's own output
is then unused and dropped from the graph.

``anchor`` is a 0-dim leaf of the site that requires grad: its (zero) gradient
is a graph output of the backward, so the tap always runs, and a pass that only
needs the gradient at the site asks autograd for the anchor's gradient.

Matrix mode perturbs the rows a batch touches. When the delta is drawn inside the
forward (a random start, noise), the lookup's pre-hook finds those rows
(``torch.unique``: an output shape that depends on the data, which dynamo cannot
keep in a graph). Inside a compiled region, in a pass with such a draw pending
(the site's ``drawing`` flag, a bool the graph guards on), the pre-hook therefore calls

* ``advgraph::lookup_rows(ids, site)``: the ids unchanged (a copy, which the
  lookup then reads, so the op runs before it); as a side effect the site
  perturbs the rows ``ids`` touch, eagerly, on the real tensors.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch

__all__ = ["SITES", "lookup_rows", "plain_lookup", "tap", "tap_lookup"]

def _refuse_a_second_copy() -> None:
    """The ops below are global to the process: a second copy of this module (the
    source tree's ``adapters.torch`` imported beside ``advgraph.adapters.torch``)
    would re-register them against its own, empty ``SITES``, and every compiled
    advgraph model would silently stop finding its site."""
    # Any version's ops: older copies registered site_tap / site_tap_v2 (and
    # lookup_rows, which kept its name).
    names = ("grad_tap_v2", "grad_rows_v1", "site_tap_v2", "site_tap", "lookup_rows")
    if not any(hasattr(torch.ops.advgraph, name) for name in names):
        return
    raise ImportError(
        "advgraph's torch adapter is already loaded in this process; import it as "
        f"'advgraph.adapters.torch' only. Received: a second copy as {__name__!r}"
    )


_refuse_a_second_copy()

# The live sites by key, registered by the sites themselves (adapters/torch/_site.py);
# a custom op receives the key, never the site, so that it stays a graph constant.
SITES: "weakref.WeakValueDictionary[int, Any]" = weakref.WeakValueDictionary()


# grad_tap_v2 runs in the backward of every compiled step, so it is defined with the
# plain torch.library API: through torch.library.custom_op a call cost ~26 us on a
# 2-core CPU (warm), defined here ~10. Its only output is a new constant (the anchor's zero
# gradient), which needs no autograd formula.
_LIB = torch.library.Library("advgraph", "FRAGMENT")


def _define_backward_tap(name: str, ids_type: str, method: str) -> None:
    """``advgraph::<name>(grad, ids, site, call, index)``: hands ``grad`` to the
    site's ``method`` at backward time and returns the anchor's (zero) gradient."""
    _LIB.define(f"{name}(Tensor grad, {ids_type} ids, int site, int call, int index) -> Tensor")

    def kernel(grad: torch.Tensor, ids: torch.Tensor | None, site: int, call: int, index: int) -> torch.Tensor:
        owner = SITES.get(site)
        if owner is not None:
            getattr(owner, method)(call, ids, index, grad)
        return grad.new_zeros(())  # the anchor's gradient

    def fake(grad: torch.Tensor, ids: torch.Tensor | None, site: int, call: int, index: int) -> Any:
        return grad.new_empty(())

    _LIB.impl(name, kernel, "CompositeExplicitAutograd")
    torch.library.register_fake(f"advgraph::{name}", fake, lib=_LIB)


# The output's gradient, to MatrixSite/OutputSite.on_compiled_grad.
_define_backward_tap("grad_tap_v2", "Tensor?", "on_compiled_grad")


class _Tap(torch.autograd.Function):
    """Identity in the forward, inside the compiled graph (no call out of it); its
    backward hands the gradient to ``grad_tap_v2``."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, x: torch.Tensor, anchor: torch.Tensor, ids: torch.Tensor | None, site: int, call: int, index: int
    ) -> torch.Tensor:
        ctx.site, ctx.call, ctx.index = site, call, index
        ctx.anchor_dtype, ctx.anchor_device = anchor.dtype, anchor.device
        ctx.save_for_backward(ids)
        # A copy, not a view: a model may modify the lookup's output in place, which
        # autograd refuses on a view made inside a custom Function. Inductor fuses the
        # copy into the op that reads it.
        return x.clone()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:  # type: ignore[override]
        (ids,) = ctx.saved_tensors
        grad_anchor = torch.ops.advgraph.grad_tap_v2(grad, ids, ctx.site, ctx.call, ctx.index)
        return grad, grad_anchor.to(device=ctx.anchor_device, dtype=ctx.anchor_dtype), None, None, None, None


def tap(
    x: torch.Tensor, anchor: torch.Tensor, ids: torch.Tensor | None, site: int, call: int, index: int
) -> torch.Tensor:
    """``x`` unchanged; its gradient goes to the site registered under ``site``."""
    return _Tap.apply(x, anchor, ids, site, call, index)


# Matrix mode, a plain ``nn.Embedding`` on the CPU: the lookup itself is the tap. Its
# backward computes the weight's gradient as the lookup's own backward does (the
# dense ``embedding_dense_backward``, which the compiled backward computes anyway) and
# hands it to ``grad_rows_v1``, which reads the touched rows out of it: one
# ``index_select`` instead of reducing the output's gradient to the rows (sort, zeros,
# ``index_add_``) while the backward runs.
_define_backward_tap("grad_rows_v1", "Tensor", "on_compiled_rows")


class _TapLookup(torch.autograd.Function):
    """``F.embedding(ids, weight, padding_idx, scale_grad_by_freq=...)``; its backward
    is the lookup's own (the dense weight gradient), which it also hands to
    ``grad_rows_v1``."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, weight: torch.Tensor, ids: torch.Tensor, anchor: torch.Tensor, padding_idx: int,
        scale_grad_by_freq: bool, site: int, call: int, index: int,
    ) -> torch.Tensor:
        ctx.save_for_backward(ids)
        ctx.num_weights, ctx.padding_idx, ctx.scale = weight.shape[0], padding_idx, scale_grad_by_freq
        ctx.site, ctx.call, ctx.index = site, call, index
        ctx.anchor_dtype, ctx.anchor_device = anchor.dtype, anchor.device
        return torch.nn.functional.embedding(
            ids, weight, None if padding_idx < 0 else padding_idx, None, 2.0, scale_grad_by_freq, False
        )

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:  # type: ignore[override]
        (ids,) = ctx.saved_tensors
        dense = torch.ops.aten.embedding_dense_backward(grad, ids, ctx.num_weights, ctx.padding_idx, ctx.scale)
        grad_anchor = torch.ops.advgraph.grad_rows_v1(dense, ids, ctx.site, ctx.call, ctx.index)
        anchor = grad_anchor.to(device=ctx.anchor_device, dtype=ctx.anchor_dtype)
        return dense, None, anchor, None, None, None, None, None


def tap_lookup(
    module: torch.nn.Module, ids: torch.Tensor, anchor: torch.Tensor, site: int, call: int, index: int
) -> torch.Tensor:
    """The lookup ``module(ids)`` of a plain ``nn.Embedding`` (see :func:`plain_lookup`),
    whose backward hands the weight's gradient to the site registered under ``site``."""
    padding_idx = -1 if module.padding_idx is None else int(module.padding_idx)
    return _TapLookup.apply(
        module.weight, ids, anchor, padding_idx, bool(module.scale_grad_by_freq), site, call, index
    )


def plain_lookup(module: torch.nn.Module, hook: Any) -> bool:
    """Whether the output the forward hook ``hook`` receives from ``module`` is exactly
    ``F.embedding(ids, weight, padding_idx, scale_grad_by_freq=...)``, which
    :func:`tap_lookup` recomputes: ``nn.Embedding``'s own forward (not a subclass's,
    not one set on the instance), dense, without ``max_norm``, on a CPU float32/float64
    weight, and no forward hook ran before ``hook`` (a global one, or one registered
    on the module earlier, may have changed the output)."""
    weight = getattr(module, "weight", None)
    # torch's hook registries (private names: where they are missing, no lookup is plain)
    registry = getattr(torch.nn.modules.module, "_global_forward_hooks", None)
    own = getattr(module, "_forward_hooks", None)
    if registry is None or own is None:
        return False
    first = next(iter(own.values()), None)
    return (
        isinstance(module, torch.nn.Embedding)
        and type(module).forward is torch.nn.Embedding.forward
        and "forward" not in vars(module)
        and not registry
        # the same bound method (compared by its parts: dynamo folds these to constants)
        and getattr(first, "__self__", None) is hook.__self__
        and getattr(first, "__func__", None) is hook.__func__
        and module.max_norm is None
        and not module.sparse
        and isinstance(weight, torch.Tensor)
        and weight.device.type == "cpu"
        and weight.dtype in (torch.float32, torch.float64)
    )


@torch.library.custom_op("advgraph::lookup_rows", mutates_args=())
def _lookup_rows(ids: torch.Tensor, site: int) -> torch.Tensor:
    owner = SITES.get(site)
    if owner is not None:
        owner.perturb_rows(ids)
    return ids.clone()


@_lookup_rows.register_fake
def _(ids: torch.Tensor, site: int) -> Any:
    return torch.empty_like(ids)


def lookup_rows(ids: torch.Tensor, site: int) -> torch.Tensor:
    """``ids`` unchanged; before the lookup reads them, the site registered under
    ``site`` perturbs the rows they touch (matrix mode, a delta drawn in the forward)."""
    return torch.ops.advgraph.lookup_rows(ids, site)
