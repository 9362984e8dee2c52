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

__all__ = ["backward_before_last", "deepspeed_engine"]

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
