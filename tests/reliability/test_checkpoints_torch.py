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
