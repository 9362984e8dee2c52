"""Bad input: a clear error (expected..., then `Received: ...`), the model untouched."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402
from torch.nn import functional as F  # noqa: E402

import advgraph  # noqa: E402
from torch_models import MeanPool, param_bytes  # noqa: E402


class NoEmbedding(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(x)


class TwoTables(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Embedding(10, 4)
        self.b = nn.Embedding(10, 4)

    def forward(self, x):
        return self.a(x) + self.b(x)


def frozen():
    m = MeanPool()
    m.emb.weight.requires_grad_(False)
    return m


# (id, model factory, wrap kwargs, expected exception, message fragment)
WRAP_CASES = [
    ("model-not-a-model", lambda: object(), {}, TypeError, "torch.nn.Module or a keras.Model"),
    ("model-a-string", lambda: "bert", {}, TypeError, "Received: model='str'"),
    ("target-int", MeanPool, {"target": 3}, TypeError, "Received: target=3"),
    ("target-missing", MeanPool, {"target": "encoder.tok"}, ValueError, "Candidates: emb"),
    ("target-foreign-module", MeanPool, {"target": nn.Embedding(3, 3)}, ValueError, "Candidates"),
    ("target-ambiguous", TwoTables, {}, ValueError, "ambiguous"),
    ("target-is-model", MeanPool, {"target": ""}, ValueError, "not the model itself"),
    ("no-embedding", NoEmbedding, {}, ValueError, "found no nn.Embedding"),
    ("mode-unknown", MeanPool, {"mode": "weights"}, ValueError, "Received: mode='weights'"),
    ("mode-type", MeanPool, {"mode": None}, TypeError, "Received: mode=None"),
    ("method-unknown", MeanPool, {"method": "pgd2"}, ValueError, "Received: method='pgd2'"),
    ("method-type", MeanPool, {"method": len}, TypeError, "Received: method="),
    ("objective-unknown", MeanPool, {"objective": "sum"}, ValueError, "Received: objective='sum'"),
    ("epsilon-zero", MeanPool, {"epsilon": 0}, ValueError, "Received: epsilon=0"),
    ("epsilon-negative", MeanPool, {"epsilon": -0.5}, ValueError, "Received: epsilon=-0.5"),
    ("epsilon-nan", MeanPool, {"epsilon": float("nan")}, ValueError, "Received: epsilon=nan"),
    ("epsilon-inf", MeanPool, {"epsilon": float("inf")}, ValueError, "Received: epsilon=inf"),
    ("epsilon-string", MeanPool, {"epsilon": "0.5"}, TypeError, "Received: epsilon='0.5'"),
    ("epsilon-none-fgm", MeanPool, {"epsilon": None}, TypeError, "Received: epsilon=None"),
    ("steps-zero", MeanPool, {"method": "pgd", "steps": 0}, ValueError, "Received: steps=0"),
    ("steps-float", MeanPool, {"method": "pgd", "steps": 2.0}, TypeError, "Received: steps=2.0"),
    ("alpha-zero", MeanPool, {"method": "pgd", "alpha": 0.0}, ValueError, "Received: alpha=0.0"),
    ("alpha-negative", MeanPool, {"method": "freelb", "alpha": -1}, ValueError, "Received: alpha=-1"),
    ("knob-not-used", MeanPool, {"method": "fgm", "steps": 3}, ValueError, "does not apply"),
    ("norm-unknown", MeanPool, {"norm": "l1"}, ValueError, "Received: norm='l1'"),
    ("fgsm-l2", MeanPool, {"method": "fgsm", "norm": "l2"}, ValueError, "sign method"),
    ("matrix-per-sample", MeanPool, {"mode": "matrix", "per_sample": True}, ValueError, "not meaningful"),
    ("matrix-frozen", frozen, {"mode": "matrix"}, ValueError, "frozen"),
    ("freelb-clean-adv", MeanPool, {"method": "freelb", "objective": "clean+adv"}, ValueError, "no clean pass"),
    ("random-init-type", MeanPool, {"method": "pgd", "random_init": 1}, TypeError, "Received: random_init=1"),
]


@pytest.mark.parametrize("name,factory,kwargs,exc,fragment", WRAP_CASES, ids=[c[0] for c in WRAP_CASES])
def test_wrap_rejects_bad_input_and_leaves_model_untouched(name, factory, kwargs, exc, fragment):
    model = factory()
    is_module = isinstance(model, nn.Module)
    before = param_bytes(model) if is_module else None
    cls = type(model)
    with pytest.raises(exc) as info:
        advgraph.wrap(model, **kwargs)
    message = str(info.value)
    assert fragment in message
    assert "Received" in message or "Candidates" in message
    if is_module:
        assert type(model) is cls
        assert not advgraph.is_wrapped(model)
        assert param_bytes(model) == before
        assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def _wrapped(**kwargs):
    torch.manual_seed(0)
    model = MeanPool()
    return model, advgraph.wrap(model, **kwargs)


def test_wrap_twice_and_unwrap_unwrapped():
    model, wrapped = _wrapped()
    with pytest.raises(ValueError, match="already wrapped.*Received"):
        advgraph.wrap(wrapped)
    with pytest.raises(TypeError, match="Received: model='MeanPool'"):
        advgraph.unwrap(MeanPool())
    with pytest.raises(TypeError, match="Received"):
        advgraph.unwrap(42)


X = torch.randint(0, 30, (4, 6))
Y = torch.randint(0, 3, (4,))

STEP_CASES = [
    ("closure-not-callable", lambda w: "loss", TypeError, "takes a closure"),
    ("closure-returns-none", lambda w: (lambda: None), TypeError, "Received: closure_returned='NoneType'"),
    ("closure-returns-float", lambda w: (lambda: 1.5), TypeError, "Received: closure_returned='float'"),
    ("closure-non-scalar", lambda w: (lambda: F.cross_entropy(w(X), Y, reduction="none")), ValueError, "Received: loss_shape=(4,)"),
    ("closure-no-grad", lambda w: (lambda: F.cross_entropy(w(X), Y).detach()), ValueError, "does not require grad"),
    ("closure-skips-embedding", lambda w: (lambda: (w.fc.weight**2).sum()), ValueError, "Received: embedding_calls=0"),
]


@pytest.mark.parametrize("mode", ["output", "matrix"])
@pytest.mark.parametrize("name,make,exc,fragment", STEP_CASES, ids=[c[0] for c in STEP_CASES])
def test_adversarial_step_rejects_bad_closures(mode, name, make, exc, fragment):
    model, wrapped = _wrapped(mode=mode)
    before = param_bytes(model)
    with pytest.raises(exc, match=fragment.replace("(", r"\(").replace(")", r"\)")):
        wrapped.adversarial_step(make(wrapped))
    assert param_bytes(model) == before
    assert not wrapped.__dict__["_advgraph"].site.active
    wrapped.adversarial_step(lambda: F.cross_entropy(wrapped(X), Y))  # still usable


@pytest.mark.parametrize("mode", ["output", "matrix"])
def test_perturbed_before_any_backward(mode):
    model, wrapped = _wrapped(mode=mode)
    with pytest.raises(RuntimeError, match="Received: recorded_gradients=0"):
        with wrapped.perturbed():
            pass


def test_batch_shape_changes_between_passes():
    model, wrapped = _wrapped(mode="output")
    F.cross_entropy(wrapped(X), Y).backward()
    before = param_bytes(model)
    with pytest.raises(ValueError, match=r"Received: delta_shape=\(4, 6, 8\), output_shape=\(2, 6, 8\)"):
        with wrapped.perturbed():
            wrapped(X[:2])
    assert param_bytes(model) == before


def test_matrix_batch_changes_between_passes():
    model, wrapped = _wrapped(mode="matrix", method="pgd", steps=2)
    calls = []

    def closure():
        calls.append(1)
        x = X if len(calls) == 1 else (X + 1) % 30
        return F.cross_entropy(wrapped(x), Y)

    before = param_bytes(model)
    with pytest.raises(ValueError, match="other embedding rows"):
        wrapped.adversarial_step(closure)
    assert param_bytes(model) == before


def test_nested_perturbed_and_step_inside_perturbed():
    model, wrapped = _wrapped()
    F.cross_entropy(wrapped(X), Y).backward()
    with wrapped.perturbed():
        with pytest.raises(RuntimeError, match="cannot be nested"):
            with wrapped.perturbed():
                pass
        with pytest.raises(RuntimeError, match="inside perturbed"):
            wrapped.adversarial_step(lambda: F.cross_entropy(wrapped(X), Y))
        with pytest.raises(RuntimeError, match="inside perturbed"):
            advgraph.unwrap(wrapped)
