"""Reading the gradient at the site inside a ``torch.compile``d forward.

Eagerly the site registers a tensor hook on the embedding's output. Dynamo
cannot keep such a hook in the graph when its body has Python side effects
(it breaks the graph: "HOP: Non-nullified side effect"), so inside a compiled
region the output goes through two custom ops instead, which dynamo and
AOTAutograd treat as opaque graph nodes:

* ``advgraph::site_tap_v2(x, anchor, ids, site, call, index)``: identity (a copy)
  in the forward. Its backward is
* ``advgraph::grad_tap_v2(grad, ids, site, call, index)``, which runs at backward
  time with the real gradient and hands it to the site registered under
  ``site`` (an int baked into the graph). The gradient itself flows on past the
  op (the backward returns it), so the op copies nothing on the way; the site
  keeps only what it made from ``grad`` during the call (a copy, or the touched
  rows' gradient), never ``grad`` itself, whose buffer the compiled backward may
  reuse once its last reader ran.

The ``_v2`` in the names: inductor caches compiled graphs on disk under a key
made from the forward graph, which names the op but not the backward registered
for it; a change to the backward therefore needs a new name, or a cache filled
by the previous advgraph would run the old backward code against the new op.

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

__all__ = ["SITES", "lookup_rows", "tap"]

def _refuse_a_second_copy() -> None:
    """The ops below are global to the process: a second copy of this module (the
    source tree's ``adapters.torch`` imported beside ``advgraph.adapters.torch``)
    would re-register them against its own, empty ``SITES``, and every compiled
    advgraph model would silently stop finding its site."""
    # Any version's ops: an older copy registered site_tap (and lookup_rows, which kept
    # its name) before the _v2 ops existed.
    names = ("site_tap_v2", "site_tap", "lookup_rows")
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


@torch.library.custom_op("advgraph::grad_tap_v2", mutates_args=())
def _grad_tap(
    grad: torch.Tensor, ids: torch.Tensor | None, site: int, call: int, index: int
) -> torch.Tensor:
    owner = SITES.get(site)
    if owner is not None:
        owner.on_compiled_grad(call, ids, index, grad)
    return grad.new_zeros(())  # the anchor's gradient


@_grad_tap.register_fake
def _(grad: torch.Tensor, ids: torch.Tensor | None, site: int, call: int, index: int) -> Any:
    return grad.new_empty(())


@torch.library.custom_op("advgraph::site_tap_v2", mutates_args=())
def _site_tap(
    x: torch.Tensor, anchor: torch.Tensor, ids: torch.Tensor | None, site: int, call: int, index: int
) -> torch.Tensor:
    return x.clone()


@_site_tap.register_fake
def _(x: torch.Tensor, anchor: torch.Tensor, ids: torch.Tensor | None, site: int, call: int, index: int) -> Any:
    return torch.empty_like(x)


def _setup(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
    _, anchor, ids, site, call, index = inputs
    ctx.site, ctx.call, ctx.index = site, call, index
    ctx.anchor_dtype, ctx.anchor_device = anchor.dtype, anchor.device
    ctx.save_for_backward(ids if ids is not None else None)


def _backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:
    (ids,) = ctx.saved_tensors
    grad_anchor = torch.ops.advgraph.grad_tap_v2(grad, ids, ctx.site, ctx.call, ctx.index)
    return grad, grad_anchor.to(device=ctx.anchor_device, dtype=ctx.anchor_dtype), None, None, None, None


_site_tap.register_autograd(_backward, setup_context=_setup)


def tap(
    x: torch.Tensor, anchor: torch.Tensor, ids: torch.Tensor | None, site: int, call: int, index: int
) -> torch.Tensor:
    """``x`` unchanged; its gradient goes to the site registered under ``site``."""
    return torch.ops.advgraph.site_tap_v2(x, anchor, ids, site, call, index)


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
