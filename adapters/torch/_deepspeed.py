"""DeepSpeed: every pass of a step but the last is not a gradient-accumulation boundary.

``deepspeed.initialize`` returns an engine whose ``backward`` treats each call as
one micro-batch. With ``gradient_accumulation_steps=1`` every call is a boundary:
ZeRO-1/2 then reduce the gradients into the optimizer's partition and start the
next call from zero, so of the passes of one ``adversarial_step`` only the last
one's gradients would reach ``engine.step()`` -- ``objective="clean+adv"`` would
silently train as ``"adv"``. advgraph therefore runs the backward of every pass
but the last with the boundary turned off, as DeepSpeed's own
``set_gradient_accumulation_boundary`` recipe for manual accumulation does, and
restores the engine's setting afterwards. The last pass keeps the caller's
setting (a boundary, or not when the step itself is a gradient-accumulation
micro-batch), so the gradients of all passes are reduced once.

The engine is found from ``adversarial_step(backward=engine.backward)`` (a bound
method of a ``DeepSpeedEngine``). Other backward functions (the HF Trainer's
``accelerator.backward`` under DeepSpeed) may carry an ``advgraph_before_last``
attribute: the function to use for the passes before the last.

Nothing here imports deepspeed: an engine can only exist if deepspeed is imported.
"""

from __future__ import annotations

import sys
from typing import Any, Callable

import torch

__all__ = ["backward_before_last", "check_backward", "deepspeed_engine"]

Backward = Callable[[torch.Tensor], Any]


def deepspeed_engine(obj: Any) -> Any:
    """The ``DeepSpeedEngine`` that ``obj`` is, or whose bound method it is; else None."""
    engine_module = sys.modules.get("deepspeed.runtime.engine")
    engine_class = getattr(engine_module, "DeepSpeedEngine", None)
    if not isinstance(engine_class, type):
        return None
    for candidate in (obj, getattr(obj, "__self__", None)):
        if isinstance(candidate, engine_class):
            return candidate
    return None


def backward_before_last(backward: Backward | None) -> Backward | None:
    """The backward for the passes of a step before its last one.

    ``backward`` itself unless it is a DeepSpeed engine's ``backward`` (then: the
    same call with the engine's gradient-accumulation boundary off) or carries an
    ``advgraph_before_last`` function.
    """
    if backward is None:
        return None
    custom = getattr(backward, "advgraph_before_last", None)
    if callable(custom):
        return custom
    engine = deepspeed_engine(backward)
    if engine is None:
        return backward
    managed = getattr(engine, "managed_gradient_accumulation", None)
    if callable(managed) and not managed():
        return backward  # the caller's engine.step() is the boundary: nothing to defer

    def not_a_boundary(loss: torch.Tensor) -> Any:
        # DeepSpeed saves and restores this private flag the same way in
        # coalesce_grad_reduction(); the public setter cannot restore "automatic" (None).
        saved = engine._is_gradient_accumulation_boundary
        engine.set_gradient_accumulation_boundary(False)
        try:
            return backward(loss)
        finally:
            engine._is_gradient_accumulation_boundary = saved

    return not_a_boundary


def check_backward(module: torch.nn.Module, backward: Backward | None) -> None:
    """Refuse a step that would lose the clean pass's gradients under ZeRO-1/2.

    ZeRO stages 1 and 2 mark every parameter they manage (``_hp_mapping``). There,
    only a backward advgraph can run outside a gradient-accumulation boundary
    (``engine.backward``, or one carrying ``advgraph_before_last``) keeps the
    gradients of the passes before the last; ``loss.backward()`` or another
    function would silently train ``"clean+adv"`` as ``"adv"``. (ZeRO-3 accumulates
    its partitioned gradients across backward calls either way.)
    """
    if "deepspeed" not in sys.modules:
        return
    if backward is not None and (
        callable(getattr(backward, "advgraph_before_last", None)) or deepspeed_engine(backward) is not None
    ):
        return
    param = next(module.parameters(), None)
    if param is None or getattr(param, "_hp_mapping", None) is None:
        return
    from advgraph._errors import received

    name = "loss.backward()" if backward is None else getattr(backward, "__qualname__", type(backward).__name__)
    raise ValueError(
        "The model's parameters are managed by a DeepSpeed ZeRO stage 1/2 optimizer: pass "
        "adversarial_step(closure, backward=engine.backward) (the DeepSpeedEngine's own method). "
        "advgraph then runs every pass but the last outside a gradient-accumulation boundary; "
        "with any other backward, ZeRO keeps only the last pass's gradients. "
        f"{received(backward=name)}"
    )
