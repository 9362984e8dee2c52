"""Fault injection: an exception or KeyboardInterrupt at every point of a step.

Afterwards every parameter is byte-identical to its value before the step, the
wrapped model is usable for the next step, and nothing leaks (hooks, installed
deltas, saved rows, held activations).
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
from torch.nn import functional as F  # noqa: E402

import advgraph  # noqa: E402
import advgraph.methods._common as methods_module  # noqa: E402
from torch_models import MeanPool, param_bytes  # noqa: E402

METHODS = {
    "fgm": ({}, 2),
    "fgsm": ({"epsilon": 0.1}, 2),
    "pgd": ({"steps": 2, "random_init": True}, 3),
    "freelb": ({"steps": 2}, 2),
    "vat": ({"steps": 1}, 3),
}
EXCEPTIONS = [RuntimeError, KeyboardInterrupt]


class Injected(RuntimeError):
    pass


def hook_count(model):
    return sum(
        len(m._forward_hooks)
        + len(m._forward_pre_hooks)
        + len(m._backward_hooks)
        + len(m._backward_pre_hooks)
        for m in model.modules()
    )


def assert_clean(wrapped, model, before, hooks):
    site = wrapped.__dict__["_advgraph"].site
    assert param_bytes(model) == before
    assert not site.active
    assert site._outputs == [] and site._keep_outputs is False
    if site.mode == "matrix":
        assert site._saved is None and site._pending is None
    else:
        assert site.delta is None
    assert hook_count(model) == hooks


def cases():
    for method, (_, passes) in METHODS.items():
        for mode in ("output", "matrix"):
            for exc in EXCEPTIONS:
                for k in range(1, passes + 1):
                    yield method, mode, exc, "before_forward", k
                    yield method, mode, exc, "after_forward", k
                    yield method, mode, exc, "backward", k
                for k in (1, 2):
                    yield method, mode, exc, "between", k


@pytest.mark.parametrize("method,mode,exc,where,k", list(cases()))
def test_fault_in_adversarial_step_leaves_parameters_exact(method, mode, exc, where, k, monkeypatch):
    kwargs, _ = METHODS[method]
    torch.manual_seed(0)
    model = MeanPool()
    wrapped = advgraph.wrap(model, mode=mode, method=method, **kwargs)
    x = torch.randint(0, 30, (4, 6))
    y = torch.randint(0, 3, (4,))
    error = exc if exc is KeyboardInterrupt else Injected
    counters = {"forward": 0, "backward": 0, "between": 0}

    def on_backward(*_):
        counters["backward"] += 1
        if where == "backward" and counters["backward"] == k:
            raise error("backward")

    handle = model.fc.register_full_backward_pre_hook(on_backward)
    hooks = hook_count(model)
    if where == "between":
        original = methods_module.compute_delta

        def failing(*args, **kw):
            counters["between"] += 1
            if counters["between"] == k:
                raise error("between passes")
            return original(*args, **kw)

        monkeypatch.setattr(methods_module, "compute_delta", failing)

    def closure():
        counters["forward"] += 1
        hit = counters["forward"] == k
        if where == "before_forward" and hit:
            raise error("before forward")
        out = wrapped(x)
        if where == "after_forward" and hit:
            raise error("after forward")
        loss = F.cross_entropy(out, y)
        return (loss, out) if method == "vat" else loss

    before = param_bytes(model)
    raised = False
    try:
        wrapped.adversarial_step(closure)
    except (Injected, KeyboardInterrupt):
        raised = True
    # "between" may not be reached by methods with fewer delta computations.
    if where != "between":
        assert raised, (method, mode, where, k)
    assert_clean(wrapped, model, before, hooks)

    # The model stays usable: the next step runs and again restores exactly.
    monkeypatch.undo()
    counters.update(forward=10**6, backward=10**6, between=10**6)
    wrapped.adversarial_step(closure)
    assert_clean(wrapped, model, before, hooks)
    handle.remove()
    plain = advgraph.unwrap(wrapped)
    assert hook_count(plain) == 0


@pytest.mark.parametrize("mode", ["output", "matrix"])
@pytest.mark.parametrize("exc", EXCEPTIONS)
@pytest.mark.parametrize("where", ["inside", "after_forward", "after_backward"])
def test_fault_inside_perturbed(mode, exc, where):
    torch.manual_seed(0)
    model = MeanPool()
    wrapped = advgraph.wrap(model, mode=mode)
    hooks = hook_count(model)
    x = torch.randint(0, 30, (4, 6))
    y = torch.randint(0, 3, (4,))
    F.cross_entropy(wrapped(x), y).backward()
    before = param_bytes(model)
    error = exc if exc is KeyboardInterrupt else Injected
    with pytest.raises(error):
        with wrapped.perturbed():
            if where == "inside":
                raise error()
            loss = F.cross_entropy(wrapped(x), y)
            if where == "after_forward":
                raise error()
            loss.backward()
            raise error()
    assert_clean(wrapped, model, before, hooks)
    # Usable for the next step: a clean backward, then the adversarial block.
    F.cross_entropy(wrapped(x), y).backward()
    with wrapped.perturbed():
        F.cross_entropy(wrapped(x), y).backward()
    assert_clean(wrapped, model, before, hooks)
    # Each backward's gradient gives one delta: a second block needs a new backward.
    with pytest.raises(RuntimeError, match="recorded_gradients=0"):
        with wrapped.perturbed():
            pass
