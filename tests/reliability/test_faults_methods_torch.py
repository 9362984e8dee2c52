"""Fault injection for gp, r3f, smart, neftune and awp: an exception or a
KeyboardInterrupt at every forward, every backward and every delta computation of
a step. Afterwards every parameter (for AWP: every perturbed weight) is
byte-identical, nothing stays installed, and the next step works."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
from torch.nn import functional as F  # noqa: E402

import advgraph  # noqa: E402
import advgraph.methods._common as methods_module  # noqa: E402
from torch_models import MeanPool, param_bytes  # noqa: E402

# method: (kwargs, forwards, modes)
METHODS = {
    "gp": ({}, 1, ("output", "matrix")),
    "r3f": ({}, 2, ("output", "matrix")),
    "smart": ({"steps": 2, "alpha": 0.1}, 6, ("output", "matrix")),
    "neftune": ({}, 1, ("output",)),
    "awp": ({"target": ""}, 2, ("weights",)),
}
EXCEPTIONS = [RuntimeError, KeyboardInterrupt]


class Injected(RuntimeError):
    pass


def hook_count(model):
    return sum(
        len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) + len(m._backward_pre_hooks)
        for m in model.modules()
    )


def assert_clean(wrapped, model, before, hooks):
    site = wrapped.__dict__["_advgraph"].site
    assert param_bytes(model) == before
    assert not site.active
    if site.mode == "weights":
        assert site._saved is None
    else:
        assert site._outputs == [] and site._keep_outputs is False and site.capturing
        if site.mode == "matrix":
            assert site._saved is None and site._pending is None
        else:
            assert site.delta is None
        assert site.step_mask is None
    assert hook_count(model) == hooks
    assert all(p._backward_hooks is None or len(p._backward_hooks) == 0 for p in model.parameters())


def cases():
    for method, (_, forwards, modes) in METHODS.items():
        for mode in modes:
            for exc in EXCEPTIONS:
                for k in range(1, forwards + 1):
                    yield method, mode, exc, "before_forward", k
                    yield method, mode, exc, "after_forward", k
                for k in range(1, 4):
                    yield method, mode, exc, "backward", k
                    yield method, mode, exc, "between", k


@pytest.mark.parametrize("method,mode,exc,where,k", list(cases()))
def test_fault_in_new_method_leaves_parameters_exact(method, mode, exc, where, k, monkeypatch):
    kwargs, _, _ = METHODS[method]
    torch.manual_seed(0)
    model = MeanPool(padding_idx=0)
    wrapped = advgraph.wrap(model, mode="output" if mode == "weights" else mode, method=method, **kwargs)
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
        # Every array computation of the core (noise, KL, penalty, delta) asks ops_for.
        original = methods_module.ops_for

        def failing(*args, **kw):
            counters["between"] += 1
            if counters["between"] == k:
                raise error("between")
            return original(*args, **kw)

        monkeypatch.setattr(methods_module, "ops_for", failing)

    def closure():
        counters["forward"] += 1
        hit = counters["forward"] == k
        if where == "before_forward" and hit:
            raise error("before forward")
        out = wrapped(x)
        if where == "after_forward" and hit:
            raise error("after forward")
        loss = F.cross_entropy(out, y)
        return (loss, out) if method in ("r3f", "smart") else loss

    before = param_bytes(model)
    raised = False
    try:
        wrapped.adversarial_step(closure, mask=(x != 0) if method == "neftune" else None)
    except (Injected, KeyboardInterrupt):
        raised = True
    if counters[where.split("_")[-1] if where != "between" else "between"] >= k:
        assert raised, (method, mode, where, k)
    assert_clean(wrapped, model, before, hooks)

    monkeypatch.undo()
    counters.update(forward=10**6, backward=10**6, between=10**6)
    for p in model.parameters():
        p.grad = None
    wrapped.adversarial_step(closure)
    assert_clean(wrapped, model, before, hooks)
    handle.remove()
    assert hook_count(advgraph.unwrap(wrapped)) == 0
