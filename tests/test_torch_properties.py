"""Property tests: restore is exact (bytes), whatever the model, epsilon, dtype, batch."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from torch.nn import functional as F  # noqa: E402

import advgraph  # noqa: E402
from torch_models import ConvClassifier, LSTMClassifier, MeanPool, WithMask, param_bytes  # noqa: E402

ARCHS = [MeanPool, ConvClassifier, LSTMClassifier, WithMask]

case = st.fixed_dictionaries(
    {
        "arch": st.sampled_from(ARCHS),
        "mode": st.sampled_from(["output", "matrix"]),
        "method": st.sampled_from(["fgm", "fgsm"]),
        "objective": st.sampled_from(["clean+adv", "adv"]),
        "epsilon": st.floats(1e-4, 1e3, allow_nan=False, allow_infinity=False),
        "dtype": st.sampled_from([torch.float32, torch.float64]),
        "b": st.integers(1, 5),
        "n": st.integers(1, 7),
        "vocab": st.integers(2, 40),
        "dim": st.integers(1, 6),
        "seed": st.integers(0, 2**16),
        "fail_at": st.sampled_from([None, 1, 2]),  # which forward of the step raises
        "scale": st.sampled_from([1.0, 1e-30, 1e30, -3.0]),
    }
)

SETTINGS = settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)


def test_hypothesis_settings_are_derandomized():
    """conftest's "advgraph" profile: the same draws on every run (see test_delta)."""
    import os

    if os.environ.get("HYPOTHESIS_PROFILE", "advgraph") != "advgraph":
        pytest.skip(f"HYPOTHESIS_PROFILE={os.environ['HYPOTHESIS_PROFILE']} asks for random draws")
    assert SETTINGS.derandomize and SETTINGS.database is None


class Boom(Exception):
    pass


def build(c):
    torch.manual_seed(c["seed"])
    model = c["arch"](vocab=c["vocab"], dim=c["dim"]).to(c["dtype"])
    gen = torch.Generator().manual_seed(c["seed"])
    x = torch.randint(0, c["vocab"], (c["b"], c["n"]), generator=gen)
    y = torch.randint(0, 3, (c["b"],), generator=gen)
    return model, x, y


def make_closure(wrapped, x, y, c, calls):
    def closure():
        calls.append(1)
        if c["fail_at"] is not None and len(calls) == c["fail_at"]:
            raise Boom()
        return F.cross_entropy(wrapped(x), y) * c["scale"]

    return closure


@SETTINGS
@given(case)
def test_adversarial_step_restores_parameters_bytewise(c):
    model, x, y = build(c)
    wrapped = advgraph.wrap(
        model, mode=c["mode"], method=c["method"], epsilon=c["epsilon"], objective=c["objective"]
    )
    before = param_bytes(model)
    calls: list[int] = []
    try:
        wrapped.adversarial_step(make_closure(wrapped, x, y, c, calls))
    except Boom:
        assert c["fail_at"] is not None
    assert param_bytes(model) == before
    site = wrapped.__dict__["_advgraph"].site
    assert not site.active
    # The wrapped model stays usable for the next step.
    c_ok = dict(c, fail_at=None)
    wrapped.adversarial_step(make_closure(wrapped, x, y, c_ok, []))
    assert param_bytes(model) == before
    plain = advgraph.unwrap(wrapped)
    with torch.no_grad():
        ref_model, _, _ = build(c)
        ref_model.load_state_dict(plain.state_dict())
        assert torch.equal(plain(x), ref_model(x))


@SETTINGS
@given(case)
def test_perturbed_restores_parameters_bytewise(c):
    model, x, y = build(c)
    wrapped = advgraph.wrap(model, mode=c["mode"], method=c["method"], epsilon=c["epsilon"])
    (F.cross_entropy(wrapped(x), y) * c["scale"]).backward()
    before = param_bytes(model)
    grads_before = {n: p.grad.clone() for n, p in model.named_parameters()}
    try:
        with wrapped.perturbed():
            out = wrapped(x)
            if c["fail_at"] is not None:
                raise Boom()
            (F.cross_entropy(out, y) * c["scale"]).backward()
    except Boom:
        pass
    assert param_bytes(model) == before
    if c["fail_at"] is not None:
        # Only .grad may change, and only through a backward that ran.
        for n, p in model.named_parameters():
            assert torch.equal(p.grad, grads_before[n]) or torch.isnan(grads_before[n]).any()


@SETTINGS
@given(case)
def test_unwrap_restores_forward_bitwise(c):
    model, x, y = build(c)
    with torch.no_grad():
        expected = model(x)
    wrapped = advgraph.wrap(model, mode=c["mode"], epsilon=c["epsilon"])
    with torch.no_grad():
        assert torch.equal(wrapped(x), expected)
    plain = advgraph.unwrap(wrapped)
    with torch.no_grad():
        assert torch.equal(plain(x), expected)
