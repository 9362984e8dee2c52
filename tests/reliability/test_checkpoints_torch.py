"""Checkpoints: state_dict both ways, torch.save of the whole module, deepcopy — every route."""

from __future__ import annotations

import copy
import io

import pytest

torch = pytest.importorskip("torch")
from torch.nn import functional as F  # noqa: E402

import advgraph  # noqa: E402
from torch_models import LSTMClassifier, Untraceable, WithMask, param_bytes  # noqa: E402

ROUTES = {
    "fx": (LSTMClassifier, {}),
    "fx-optional-args": (WithMask, {}),
    "hook": (Untraceable, {"target": "tok"}),
    "matrix": (LSTMClassifier, {"mode": "matrix"}),
}
X = torch.randint(0, 30, (4, 6))
Y = torch.randint(0, 3, (4,))


def make(route):
    torch.manual_seed(0)
    cls, kwargs = ROUTES[route]
    model = cls()
    wrapped = advgraph.wrap(model, **kwargs)
    assert wrapped.advgraph_route == route.split("-")[0]
    return cls, model, wrapped


@pytest.mark.parametrize("route", list(ROUTES))
def test_state_dict_round_trips_both_ways(route):
    cls, model, wrapped = make(route)
    wrapped.adversarial_step(lambda: F.cross_entropy(wrapped(X), Y))
    plain = cls()
    plain.load_state_dict(wrapped.state_dict())
    assert param_bytes(plain) == param_bytes(model)
    torch.manual_seed(5)
    other = cls()
    wrapped.load_state_dict(other.state_dict())
    assert param_bytes(model) == param_bytes(other)


@pytest.mark.parametrize("route", list(ROUTES))
def test_torch_save_load_whole_wrapped_module(route):
    cls, model, wrapped = make(route)
    wrapped.adversarial_step(lambda: F.cross_entropy(wrapped(X), Y))
    buf = io.BytesIO()
    torch.save(wrapped, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    assert advgraph.is_wrapped(loaded) and loaded.advgraph_route == wrapped.advgraph_route
    assert loaded.advgraph_stats == wrapped.advgraph_stats
    with torch.no_grad():
        assert torch.equal(loaded(X), wrapped(X))
    before = param_bytes(loaded)
    loaded.adversarial_step(lambda: F.cross_entropy(loaded(X), Y))
    assert param_bytes(loaded) == before
    assert advgraph.is_wrapped(wrapped)  # saving left the live module wrapped
    assert type(advgraph.unwrap(loaded)).__name__ == cls.__name__


@pytest.mark.parametrize("route", list(ROUTES))
def test_deepcopy_is_independent(route):
    cls, model, wrapped = make(route)
    clone = copy.deepcopy(wrapped)
    assert clone.advgraph_route == wrapped.advgraph_route
    before_original = param_bytes(model)
    clone.adversarial_step(lambda: F.cross_entropy(clone(X), Y))
    torch.optim.SGD(clone.parameters(), lr=1.0).step()
    assert param_bytes(model) == before_original
    assert all(p.grad is None for p in model.parameters())


# ------------------------------------------------------------- AWP's weights route, SMART

# AWP's site is a set of weights (route "weights"); SMART keeps a momentum teacher.
# Whole-module checkpoints (torch.save / copy.deepcopy) carry SMART's teacher: the
# copy continues training exactly as the original would (state_dict does not hold it).
OTHER_ROUTES = {
    "awp": dict(method="awp", adv_lr=0.5, adv_eps=0.5),
    "smart": dict(method="smart", smart_mu=1.0, smart_beta=0.9),
    "smart-matrix": dict(method="smart", mode="matrix", smart_mu=1.0, smart_beta=0.9),
}


def _closure(module, method):
    def closure():
        logits = module(X)
        loss = F.cross_entropy(logits, Y)
        return (loss, logits) if method == "smart" else loss

    return closure


def _train(module, method, steps, seed=7):
    opt = torch.optim.SGD(module.parameters(), lr=0.5)
    for i in range(steps):
        opt.zero_grad()
        torch.manual_seed(seed + i)  # SMART's noise: the same draws on both sides
        before = param_bytes(module)
        module.adversarial_step(_closure(module, method))
        assert param_bytes(module) == before  # every perturbed weight restored exactly
        opt.step()


def _make_other(name):
    torch.manual_seed(0)
    model = LSTMClassifier()
    wrapped = advgraph.wrap(model, **OTHER_ROUTES[name])
    if name == "awp":
        assert wrapped.advgraph_route == "weights"
    return model, wrapped


def _save_load(wrapped):
    buf = io.BytesIO()
    torch.save(wrapped, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


@pytest.mark.parametrize("how", ["torch.save", "deepcopy"])
@pytest.mark.parametrize("name", list(OTHER_ROUTES))
def test_awp_and_smart_checkpoint_and_continue_exactly(name, how):
    method = OTHER_ROUTES[name]["method"]
    model, wrapped = _make_other(name)
    _train(wrapped, method, 3)  # SMART's teacher has moved away from the parameters
    copied = _save_load(wrapped) if how == "torch.save" else copy.deepcopy(wrapped)
    assert copied is not wrapped and advgraph.is_wrapped(copied) and advgraph.is_wrapped(wrapped)
    assert copied.advgraph_route == wrapped.advgraph_route
    assert copied.advgraph_config == wrapped.advgraph_config
    assert copied.advgraph_stats == wrapped.advgraph_stats
    assert param_bytes(copied) == param_bytes(model)
    with torch.no_grad():
        assert torch.equal(copied(X), wrapped(X))
    # Both continue: the copy trains exactly as the original (same weights perturbed,
    # same teacher), and independently of it.
    _train(wrapped, method, 2, seed=100)
    after_original = param_bytes(model)
    _train(copied, method, 2, seed=100)
    assert param_bytes(copied) == after_original
    assert param_bytes(model) == after_original  # the copy's steps left the original alone
    assert copied.advgraph_stats == wrapped.advgraph_stats
    assert type(advgraph.unwrap(copied)).__name__ == "LSTMClassifier"


def test_smart_teacher_is_carried_not_reset():
    """The teacher matters: a fresh wrap of the same weights (teacher reset to the
    current parameters, what a state_dict checkpoint gives) trains differently."""
    model, wrapped = _make_other("smart")
    _train(wrapped, "smart", 3)
    fresh = advgraph.wrap(LSTMClassifier(), **OTHER_ROUTES["smart"])
    fresh.load_state_dict(wrapped.state_dict())
    _train(wrapped, "smart", 2, seed=100)
    _train(fresh, "smart", 2, seed=100)
    assert param_bytes(fresh) != param_bytes(model)
