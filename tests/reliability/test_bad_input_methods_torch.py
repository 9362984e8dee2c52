"""Bad input and bad gradients for gp, r3f, smart, neftune and awp: a clear error
(expected..., then `Received: ...`) with the model untouched, or delta = 0 and a count."""

from __future__ import annotations

import warnings

import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402
from torch.nn import functional as F  # noqa: E402

import advgraph  # noqa: E402
from torch_models import MeanPool, param_bytes  # noqa: E402

# (id, wrap kwargs, expected exception, message fragment)
WRAP_CASES = [
    ("neftune-matrix", {"method": "neftune", "mode": "matrix"}, ValueError, "Received: method='neftune', mode='matrix'"),
    ("awp-matrix", {"method": "awp", "mode": "matrix"}, ValueError, "Received: method='awp', mode='matrix'"),
    ("r3f-epsilon", {"method": "r3f", "epsilon": 0.1}, ValueError, "Received: epsilon=0.1"),
    ("smart-norm-l1", {"method": "smart", "norm": "l1"}, ValueError, "Received: norm='l1'"),
    ("gp-norm", {"method": "gp", "norm": "l2"}, ValueError, "Received: norm='l2'"),
    ("awp-per-sample", {"method": "awp", "per_sample": True}, ValueError, "Received: per_sample=True"),
    ("r3f-noise-type", {"method": "r3f", "noise_type": "gauss"}, ValueError, "Received: noise_type='gauss'"),
    ("r3f-noise-eps-zero", {"method": "r3f", "noise_eps": 0}, ValueError, "Received: noise_eps=0"),
    ("r3f-lambda-nan", {"method": "r3f", "r3f_lambda": float("nan")}, ValueError, "Received: r3f_lambda=nan"),
    ("smart-beta-one", {"method": "smart", "smart_beta": 1.0}, ValueError, "Received: smart_beta=1.0"),
    ("smart-mu-negative", {"method": "smart", "smart_mu": -1}, ValueError, "Received: smart_mu=-1"),
    ("smart-steps-zero", {"method": "smart", "steps": 0}, ValueError, "Received: steps=0"),
    ("neftune-alpha-str", {"method": "neftune", "neftune_alpha": "5"}, TypeError, "Received: neftune_alpha='5'"),
    ("awp-adv-eps-inf", {"method": "awp", "adv_eps": float("inf")}, ValueError, "Received: adv_eps=inf"),
    ("fgm-adv-lr", {"method": "fgm", "adv_lr": 0.1}, ValueError, "read by awp"),
    ("pgd-smart-mu", {"method": "pgd", "smart_mu": 1.0}, ValueError, "read by smart"),
    ("r3f-objective-adv", {"method": "r3f", "objective": "adv"}, ValueError, "Received: method='r3f', objective='adv'"),
    ("neftune-objective", {"method": "neftune", "objective": "clean+adv"}, ValueError, "objective='clean+adv'"),
    ("awp-no-weights", {"method": "awp", "target": "fc.bias"}, ValueError, "names no submodule"),
]


@pytest.mark.parametrize("case", WRAP_CASES, ids=[c[0] for c in WRAP_CASES])
def test_wrap_rejects_bad_knobs_and_leaves_model_alone(case):
    _, kwargs, exc, fragment = case
    model = MeanPool()
    before = param_bytes(model)
    with pytest.raises(exc) as info:
        advgraph.wrap(model, **kwargs)
    assert fragment in str(info.value)
    assert param_bytes(model) == before
    assert not advgraph.is_wrapped(model)
    assert type(model) is MeanPool


class _NanGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        return torch.full_like(g, float("nan"))


class BadGrad(nn.Module):
    """The gradient reaching the embedding (and the matrix) is NaN, or zero."""

    def __init__(self, kind):
        super().__init__()
        self.kind = kind
        self.emb = nn.Embedding(30, 8)
        self.fc = nn.Linear(8, 3)

    def forward(self, x, unused=None):  # not traced whole: fx would inline the Function
        h = self.emb(x)
        h = _NanGrad.apply(h) if self.kind == "nan" else h * 0.0
        return self.fc(h.mean(dim=1))


@pytest.mark.parametrize("mode", ["output", "matrix"])
@pytest.mark.parametrize("kind,counter", [("nan", "skipped_nonfinite"), ("zero", "skipped_zero")])
def test_smart_bad_ascent_gradient_gives_zero_delta_and_a_count(mode, kind, counter):
    torch.manual_seed(0)
    model = BadGrad(kind)
    wrapped = advgraph.wrap(model, mode=mode, method="smart", steps=2, smart_mu=0)
    x, y = torch.randint(0, 30, (4, 5)), torch.randint(0, 3, (4,))
    installed = []
    site = wrapped.__dict__["_advgraph"].site
    original = site.set_delta

    def spy(delta):
        installed.append(delta)
        original(delta)

    site.set_delta = spy

    def closure():
        out = wrapped(x)
        return F.cross_entropy(out, y), out

    before = param_bytes(model)
    with pytest.warns(advgraph.AdvGraphWarning):
        wrapped.adversarial_step(closure)
    del site.set_delta
    assert wrapped.advgraph_stats[counter] == 2  # one per ascent step
    # The deltas of the two ascent steps and of the final pass are exactly zero.
    for delta in installed[-3:]:
        assert not callable(delta) and torch.count_nonzero(delta) == 0
    assert param_bytes(model) == before
    assert torch.isfinite(model.fc.weight.grad).all()


def test_awp_nonfinite_and_zero_gradients_give_zero_delta_and_counts():
    torch.manual_seed(0)
    model = MeanPool()
    wrapped = advgraph.wrap(model, target="", method="awp")
    x, y = torch.randint(0, 30, (4, 5)), torch.randint(0, 3, (4,))
    seen = []
    site = wrapped.__dict__["_advgraph"].site
    original = site.set_delta
    site.set_delta = lambda d: (seen.append(d), original(d))
    before = param_bytes(model)
    # The promised warning (README: "a warning ... the same holds for AWP's gradient").
    with pytest.warns(advgraph.AdvGraphWarning, match="(?i)nan or inf"):
        wrapped.adversarial_step(lambda: F.cross_entropy(wrapped(x), y) * float("inf"))
    assert wrapped.advgraph_stats["skipped_nonfinite"] == 2  # one per weight
    assert all(torch.count_nonzero(d) == 0 for d in seen[0])
    assert param_bytes(model) == before
    # A weight the loss reaches with a zero gradient: counted, not perturbed.
    seen.clear()
    with pytest.warns(advgraph.AdvGraphWarning, match="(?i)zero"):
        wrapped.adversarial_step(lambda: F.cross_entropy(wrapped(x), y) * 0.0)
    assert wrapped.advgraph_stats["skipped_zero"] == 2
    assert all(torch.count_nonzero(d) == 0 for d in seen[0])
    del site.set_delta
    assert param_bytes(model) == before


def test_awp_weights_the_loss_does_not_reach_are_left_out():
    class Unused(MeanPool):
        def __init__(self):
            super().__init__()
            self.spare = nn.Linear(8, 8)

    model = Unused()
    wrapped = advgraph.wrap(model, target="", method="awp")
    x, y = torch.randint(0, 30, (4, 5)), torch.randint(0, 3, (4,))
    before = param_bytes(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "zero gradient" warning for the unused layer
        wrapped.adversarial_step(lambda: F.cross_entropy(wrapped(x), y))
    assert wrapped.advgraph_stats["skipped_zero"] == 0
    assert param_bytes(model) == before


def test_neftune_mask_type_is_checked():
    model = MeanPool()
    wrapped = advgraph.wrap(model, method="neftune")
    x, y = torch.randint(0, 30, (4, 5)), torch.randint(0, 3, (4,))
    before = param_bytes(model)
    with pytest.raises(TypeError, match="Received: mask="):
        wrapped.adversarial_step(lambda: F.cross_entropy(wrapped(x), y), mask=[1, 1, 0])
    assert param_bytes(model) == before
    assert wrapped.__dict__["_advgraph"].site.step_mask is None


@pytest.mark.parametrize("method", ["r3f", "smart"])
def test_joint_methods_refuse_a_tied_matrix(method):
    pytest.importorskip("transformers")
    from torch_models import tiny_gpt2

    model = tiny_gpt2()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tied-weight warning of matrix mode
        with pytest.raises(ValueError, match="Received: method='%s', tied_to='lm_head.weight'" % method):
            advgraph.wrap(model, mode="matrix", method=method)
    assert not advgraph.is_wrapped(model)
    advgraph.unwrap(advgraph.wrap(model, mode="output", method=method))
