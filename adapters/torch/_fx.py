"""The torch.fx pass of output mode: a perturbation node after the embedding output.

``insert_perturbation`` is the pass itself (in the style of torch.fx's own passes:
find the node, insert after it, rewire its users, lint, recompile). The two
``trace_*`` functions produce the GraphModule it runs on:

1. ``trace_model``: the whole model, when its forward has only plain positional
   arguments (an argument with a default such as ``mask=None`` would be
   specialised silently by symbolic tracing), the trace succeeds, the target is
   called exactly once as a module, and the traced module has exactly the
   original's state_dict keys.
2. ``trace_module``: the smallest traceable module containing the target, i.e.
   the target module itself (an ``nn.Embedding`` always traces), rewritten in place
   inside its parent. This is the route for HuggingFace models, whose forwards do
   not trace as a whole.
"""

from __future__ import annotations

import inspect
from typing import Callable

from torch import fx, nn

PERTURBATION_NAME = "advgraph_perturbation"


class TraceRejected(Exception):
    """A route does not apply; the message says why (logged by the caller)."""


def insert_perturbation(
    gm: fx.GraphModule, node: fx.Node, perturbation: nn.Module
) -> fx.Node:
    """Insert ``call_module(advgraph_perturbation)`` right after ``node``.

    Every former user of ``node`` reads the perturbation node instead.

    Returns:
        The new node.
    """
    gm.add_submodule(PERTURBATION_NAME, perturbation)
    with gm.graph.inserting_after(node):
        new = gm.graph.call_module(PERTURBATION_NAME, (node,))
    node.replace_all_uses_with(new, delete_user_cb=lambda user: user is not new)
    gm.graph.lint()
    gm.recompile()
    return new


def _plain_signature(module: nn.Module) -> None:
    sig = inspect.signature(module.forward)
    for param in sig.parameters.values():
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            raise TraceRejected(f"forward takes *{param.name}")
        if param.default is not param.empty:
            raise TraceRejected(
                f"forward argument {param.name!r} has a default, which tracing would specialise"
            )


class _TargetLeafTracer(fx.Tracer):
    def __init__(self, target_path: str) -> None:
        super().__init__()
        self.target_path = target_path

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if module_qualified_name == self.target_path:
            return True
        return super().is_leaf_module(m, module_qualified_name)


def trace_model(
    model: nn.Module, target_path: str, make_perturbation: Callable[[], nn.Module]
) -> fx.GraphModule:
    """Trace the whole model and insert the perturbation after the target's call."""
    _plain_signature(model)
    tracer = _TargetLeafTracer(target_path)
    try:
        graph = tracer.trace(model)
    except Exception as exc:  # any tracing failure means: try the next route
        raise TraceRejected(f"symbolic tracing failed: {type(exc).__name__}: {exc}") from None
    gm = fx.GraphModule(tracer.root, graph, type(model).__name__)
    calls = [n for n in gm.graph.nodes if n.op == "call_module" and n.target == target_path]
    if len(calls) != 1:
        raise TraceRejected(f"the target is called {len(calls)} times as a module in the graph")
    if set(gm.state_dict()) != set(model.state_dict()):
        raise TraceRejected("the traced module's state_dict keys differ from the model's")
    insert_perturbation(gm, calls[0], make_perturbation())
    return gm


_EMBEDDING_ATTRS = (
    "num_embeddings",
    "embedding_dim",
    "padding_idx",
    "max_norm",
    "norm_type",
    "scale_grad_by_freq",
    "sparse",
)


def trace_module(module: nn.Module, make_perturbation: Callable[[], nn.Module]) -> fx.GraphModule:
    """Trace the target module itself; the perturbation follows its output."""
    _plain_signature(module)
    try:
        gm = fx.symbolic_trace(module)
    except Exception as exc:
        raise TraceRejected(f"symbolic tracing failed: {type(exc).__name__}: {exc}") from None
    out = gm.graph.output_node().args[0]
    if not isinstance(out, fx.Node):
        raise TraceRejected("the module does not return a single tensor")
    if set(gm.state_dict()) != set(module.state_dict()):
        raise TraceRejected("the traced module's state_dict keys differ from the module's")
    insert_perturbation(gm, out, make_perturbation())
    # Code that reads e.g. `model.get_input_embeddings().num_embeddings` keeps working.
    for name in _EMBEDDING_ATTRS:
        if hasattr(module, name) and not hasattr(gm, name):
            setattr(gm, name, getattr(module, name))
    gm.train(module.training)
    return gm
