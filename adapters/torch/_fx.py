"""The torch.fx pass of output mode: a perturbation node after a lookup's output.

``insert_perturbation`` is the pass itself (in the style of torch.fx's own passes:
find the node, insert after it, rewire its users, lint). ``rewrite_lookup``
traces one lookup module (the embedding: an ``nn.Embedding`` always traces),
runs the pass, and returns a generated subclass of the module's own class whose
``forward`` is the rewritten graph's code. The caller swaps the module's class
for it, as ``torch.nn.utils.parametrize`` does: the module stays the same object,
an instance of its class (``isinstance``, HF ``resize_token_embeddings``, PEFT),
with the same Parameters; swapping the class back gives the original forward.

The inserted code reads the site from the module (``self._advgraph_site``), so a
``copy.deepcopy`` of the model perturbs through the copy's site.
"""

from __future__ import annotations

import copy
import inspect
from typing import Any

from torch import fx, nn

PERTURBATION_NAME = "advgraph_perturbation"
SITE_ATTR = "_advgraph_site"


class TraceRejected(Exception):
    """A route does not apply; the message says why (logged by the caller)."""


def insert_perturbation(graph: fx.Graph, node: fx.Node) -> fx.Node:
    """Insert ``advgraph_perturbation = self._advgraph_site.on_output(node)`` after ``node``.

    Every former user of ``node`` reads the perturbation node instead.

    Returns:
        The new node.
    """
    with graph.inserting_after(node):
        site = graph.get_attr(SITE_ATTR)
    with graph.inserting_after(site):
        new = graph.create_node("call_method", "on_output", (site, node), name=PERTURBATION_NAME)
    node.replace_all_uses_with(new, delete_user_cb=lambda user: user is not new)
    graph.lint()
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


def _trace(module: nn.Module) -> fx.GraphModule:
    try:
        graph = fx.Tracer().trace(module)
    except Exception as exc:  # any tracing failure means: use the hook route
        raise TraceRejected(f"symbolic tracing failed: {type(exc).__name__}: {exc}") from None
    out = graph.output_node().args[0]
    if not isinstance(out, fx.Node):
        raise TraceRejected("the module does not return a single tensor")
    insert_perturbation(graph, out)
    return fx.GraphModule(module, graph, type(module).__name__)


def scalar_attributes(module: nn.Module) -> dict[str, Any]:
    """The plain attributes symbolic tracing may have baked into the code as constants.

    ``training`` is left out: :func:`rewrite_lookup` refuses a forward that depends on it.
    """
    return {
        k: v
        for k, v in vars(module).items()
        if isinstance(v, (bool, int, float, str, type(None))) and k not in (SITE_ATTR, "training")
    }


def _deepcopy_keeping_class(self: nn.Module, memo: dict[int, Any]) -> nn.Module:
    cls = type(self)
    new = cls.__new__(cls)
    memo[id(self)] = new
    for key, value in self.__dict__.items():
        new.__dict__[key] = copy.deepcopy(value, memo)
    return new


def _plain(base: type, state: dict[str, Any]) -> nn.Module:
    module = base.__new__(base)
    module.__dict__.update(state)
    return module


def _reduce_as_base(self: nn.Module, protocol: Any) -> Any:
    # Pickling the module on its own (not through the wrapped model): the generated
    # class is not importable, so it pickles as its original class, unperturbed.
    base = type(self).__dict__["_advgraph_base"]
    state = {k: v for k, v in self.__dict__.items() if k != SITE_ATTR}
    return (_plain, (base, state))


def rewrite_lookup(module: nn.Module) -> tuple[type, str]:
    """Trace ``module``, insert the perturbation node, return ``(class, code)``.

    ``module`` must already hold the site as ``_advgraph_site``. The class is a
    subclass of ``type(module)`` with the same name whose ``forward`` is the
    rewritten graph; ``code`` is that forward's source (``print`` it to see the
    node).

    Raises:
        TraceRejected: the forward does not trace faithfully (an argument with a
            default, data-dependent control flow, a forward that depends on
            train/eval mode, a forward set on the instance).
    """
    if "forward" in vars(module):
        raise TraceRejected("the instance has its own forward attribute (e.g. an accelerate hook)")
    _plain_signature(module)
    training = module.training
    gm = _trace(module)
    try:
        module.training = not training
        other = _trace(module)
    finally:
        module.training = training
    if other.code != gm.code:
        raise TraceRejected("the forward depends on train/eval mode, which tracing would specialise")
    base = type(module)
    cls = type(
        base.__name__,
        (base,),
        {
            "forward": type(gm).forward,
            "__module__": base.__module__,
            "__qualname__": base.__qualname__,
            "__deepcopy__": _deepcopy_keeping_class,
            "__reduce_ex__": _reduce_as_base,
            "_advgraph_base": base,
        },
    )
    return cls, gm.code
