"""Methods as objects: construction, settings round-trip, the string shorthand giving
the same gradients, and schedules (``start``, a scheduled epsilon) against a
hand-written loop that switches on at step N."""

from __future__ import annotations

import copy
import dataclasses
import io
import json
import pickle

import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402
from torch.nn import functional as F  # noqa: E402

import advgraph  # noqa: E402
from advgraph import methods  # noqa: E402

CLASSES = [methods.FGM, methods.FGSM, methods.PGD, methods.FreeLB, methods.VAT, methods.GP,
           methods.R3F, methods.SMART, methods.NEFTune, methods.AWP]
PAIR = ("vat", "r3f", "smart")


class Tiny(nn.Module):
    """Embedding -> mean -> linear; ``delta`` adds to the embedding output (the
    hand-written reference's own perturbation, independent of advgraph)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 6)
        self.fc = nn.Linear(6, 3)

    def forward(self, x, delta=None):
        e = self.emb(x)
        if delta is not None:
            e = e + delta
        return self.fc(e.mean(dim=1))


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, 20, (4, 5), generator=g), torch.randint(0, 3, (4,), generator=g)


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_each_class_builds_with_defaults_is_a_method_and_round_trips(cls):
    m = cls()
    assert isinstance(m, advgraph.Method)
    assert m.name == cls.__name__.lower()
    assert m.passes() >= 1
    text = repr(m)
    assert text.startswith(cls.__name__ + "(")
    for f in dataclasses.fields(m):
        assert f"{f.name}=" in text
    config = m.get_config()
    json.dumps(config)  # plain data
    assert cls.from_config(config) == m
    assert methods.from_config({"method": m.name, **config}) == m
    assert pickle.loads(pickle.dumps(m)) == m
    with pytest.raises(dataclasses.FrozenInstanceError):
        m.start = 3  # type: ignore[misc]


@pytest.mark.parametrize(
    "build,exc,fragment",
    [
        (lambda: methods.PGD(steps=0), ValueError, "Received: steps=0"),
        (lambda: methods.PGD(steps=1.5), TypeError, "Received: steps=1.5"),
        (lambda: methods.FGM(epsilon=-1.0), ValueError, "Received: epsilon=-1.0"),
        (lambda: methods.FGM(epsilon="1"), TypeError, "Received: epsilon='1'"),
        (lambda: methods.FGM(norm="l1"), ValueError, "Received: norm='l1'"),
        (lambda: methods.SMART(mu=-1.0), ValueError, "Received: mu=-1.0"),
        (lambda: methods.SMART(beta=1.0), ValueError, "Received: beta=1.0"),
        (lambda: methods.R3F(noise_type="gauss"), ValueError, "Received: noise_type='gauss'"),
        (lambda: methods.AWP(start=-1), ValueError, "Received: start=-1"),
        (lambda: methods.FGM(epsilon=lambda step: -1.0), ValueError, "Received: epsilon(0)=-1.0"),
        (lambda: methods.FreeLB(objective="clean+adv"), ValueError, "no clean pass"),
    ],
)
def test_bad_settings_fail_at_construction(build, exc, fragment):
    with pytest.raises(exc) as info:
        build()
    assert fragment in str(info.value)


def test_wrap_refuses_settings_beside_a_method_object_and_a_class():
    model = Tiny()
    with pytest.raises(TypeError, match="carries its own settings.*Received: epsilon=0.5"):
        advgraph.wrap(model, method=methods.FGM(), epsilon=0.5)
    with pytest.raises(TypeError, match=r"PGD\(\.\.\.\), not the class"):
        advgraph.wrap(model, method=methods.PGD)
    with pytest.raises(ValueError, match="does not apply to method='fgm' .*it takes start, epsilon"):
        advgraph.wrap(model, method="fgm", xi=0.1)
    assert not advgraph.is_wrapped(model) and type(model) is Tiny


# The string shorthand and the object form: the same gradients, pass for pass.
SHORTHAND = [
    ("fgm", {"epsilon": 0.3}, methods.FGM(epsilon=0.3)),
    ("fgsm", {"epsilon": 0.1}, methods.FGSM(epsilon=0.1)),
    ("pgd", {"epsilon": 0.5, "steps": 2, "random_init": True}, methods.PGD(epsilon=0.5, steps=2, random_init=True)),
    ("freelb", {"steps": 2, "epsilon": None}, methods.FreeLB(steps=2, epsilon=None)),
    ("vat", {"vat_weight": 2.0, "xi": 0.5}, methods.VAT(weight=2.0, xi=0.5)),
    ("gp", {"epsilon": 0.2}, methods.GP(epsilon=0.2)),
    ("r3f", {"r3f_lambda": 0.5, "noise_eps": 0.1}, methods.R3F(weight=0.5, noise_eps=0.1)),
    ("smart", {"smart_mu": 0.5, "smart_lambda": 2.0, "noise_eps": 0.1}, methods.SMART(mu=0.5, weight=2.0, noise_eps=0.1)),
    ("neftune", {"neftune_alpha": 3.0}, methods.NEFTune(alpha=3.0)),
    ("awp", {"adv_lr": 0.1}, methods.AWP(adv_lr=0.1)),
]


def _grads_after_steps(method_kwargs, mode, steps=2):
    torch.manual_seed(0)
    model = Tiny()
    wrapped = advgraph.wrap(model, mode=mode, **method_kwargs)
    name = wrapped.advgraph_config.method
    out = []
    for i in range(steps):
        x, y = _batch(i)
        torch.manual_seed(100 + i)  # the same random draws on both sides
        model.zero_grad()

        def closure():
            logits = wrapped(x)
            loss = F.cross_entropy(logits, y)
            return (loss, logits) if name in PAIR else loss

        wrapped.adversarial_step(closure)
        out.append([p.grad.clone() for p in model.parameters()])
    return out, wrapped


@pytest.mark.parametrize("name,knobs,obj", SHORTHAND, ids=[s[0] for s in SHORTHAND])
def test_string_shorthand_and_object_form_give_identical_gradients(name, knobs, obj):
    modes = ["output"] + (["matrix"] if "matrix" in obj.modes and name != "awp" else [])
    for mode in modes:
        by_name, w1 = _grads_after_steps({"method": name, **knobs}, mode)
        by_object, w2 = _grads_after_steps({"method": obj}, mode)
        assert w1.advgraph_method == w2.advgraph_method
        for a, b in zip(by_name, by_object):
            for ga, gb in zip(a, b):
                assert torch.equal(ga, gb), (name, mode)


def test_config_reads_through_with_the_wrap_keyword_names():
    model = Tiny()
    wrapped = advgraph.wrap(model, method="smart", smart_mu=0.25)
    config = wrapped.advgraph_config
    assert config.method == "smart" and config.smart_mu == 0.25 and config.settings.mu == 0.25
    assert wrapped.advgraph_method is config.settings
    with pytest.raises(AttributeError):
        config.epsilon  # noqa: B018 - SMART has no epsilon


# ------------------------------------------------------------------------- schedules


def _hand_written(steps, start, eps_at, lr=0.1):
    """Plain SGD steps before ``start``, then FGM (output mode, per sample, clean+adv)
    with epsilon ``eps_at(step)``, all by hand."""
    torch.manual_seed(0)
    model = Tiny()
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    for step in range(steps):
        x, y = _batch(step)
        opt.zero_grad()
        if step < start:
            F.cross_entropy(model(x), y).backward()
        else:
            e = model.emb(x)
            e.retain_grad()
            logits = model.fc(e.mean(dim=1))
            F.cross_entropy(logits, y).backward()
            g = e.grad.detach()
            norms = g.flatten(1).norm(dim=1).view(-1, 1, 1)
            delta = eps_at(step) * g / norms
            F.cross_entropy(model(x, delta=delta), y).backward()
        opt.step()
    return model


def _advgraph_loop(steps, method, lr=0.1):
    torch.manual_seed(0)
    model = Tiny()
    wrapped = advgraph.wrap(model, method=method)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    for step in range(steps):
        x, y = _batch(step)
        opt.zero_grad()
        wrapped.adversarial_step(lambda: F.cross_entropy(wrapped(x), y))
        opt.step()
    return model, wrapped


def test_start_holds_the_method_off_for_n_steps_with_one_pass_each():
    ref = _hand_written(7, start=4, eps_at=lambda s: 0.5)
    model, wrapped = _advgraph_loop(7, methods.FGM(epsilon=0.5, start=4))
    # float32 SGD over 7 steps, advgraph and the reference computing delta in different
    # orders: a few ulps; the variants below differ by > 1e-3.
    for a, b in zip(ref.parameters(), model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert wrapped.advgraph_stats["plain_steps"] == 4 and wrapped.advgraph_stats["steps"] == 3
    # A start that is never reached trains exactly as plain SGD (one pass a step).
    plain = _hand_written(3, start=10, eps_at=lambda s: 0.5)
    model, wrapped = _advgraph_loop(3, methods.FGM(start=10))
    for a, b in zip(plain.parameters(), model.parameters()):
        assert torch.equal(a, b)
    # It differs from starting at 0: the check can tell the two apart.
    on = _hand_written(3, start=0, eps_at=lambda s: 0.5)
    assert not all(torch.equal(a, b) for a, b in zip(on.parameters(), model.parameters()))


def test_plain_steps_run_one_forward_and_one_backward():
    torch.manual_seed(0)
    model = Tiny()
    wrapped = advgraph.wrap(model, method=methods.PGD(steps=3, start=1))
    calls = []
    model.fc.register_forward_hook(lambda *a: calls.append("f"))
    model.fc.register_full_backward_hook(lambda *a: calls.append("b"))
    x, y = _batch()
    wrapped.adversarial_step(lambda: F.cross_entropy(wrapped(x), y))
    assert calls == ["f", "b"]
    calls.clear()
    wrapped.adversarial_step(lambda: F.cross_entropy(wrapped(x), y))
    assert calls.count("f") == 4  # clean + 3 ascent passes


def test_scheduled_epsilon_follows_the_hand_written_warmup():
    warmup = advgraph.linear_schedule(0.1, 1.0, steps=4)
    ref = _hand_written(6, start=0, eps_at=warmup)
    model, _ = _advgraph_loop(6, methods.FGM(epsilon=warmup))
    for a, b in zip(ref.parameters(), model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    flat = _hand_written(6, start=0, eps_at=lambda s: 1.0)
    assert not all(torch.allclose(a, b, atol=1e-6) for a, b in zip(flat.parameters(), model.parameters()))


def test_explicit_step_overrides_the_call_count():
    torch.manual_seed(0)
    model = Tiny()
    wrapped = advgraph.wrap(model, method=methods.FGM(start=5))
    x, y = _batch()
    wrapped.adversarial_step(lambda: F.cross_entropy(wrapped(x), y), step=5)
    wrapped.adversarial_step(lambda: F.cross_entropy(wrapped(x), y), step=4)
    assert wrapped.advgraph_stats["steps"] == 1 and wrapped.advgraph_stats["plain_steps"] == 1
    with pytest.raises(TypeError, match="Received: step=-1"):
        wrapped.adversarial_step(lambda: F.cross_entropy(wrapped(x), y), step=-1)


def test_a_wrapped_model_with_a_schedule_saves_and_loads_with_its_method():
    model, wrapped = _advgraph_loop(2, methods.FGM(epsilon=advgraph.linear_schedule(0.1, 1.0, 4), start=1))
    buffer = io.BytesIO()
    torch.save(wrapped, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert loaded.advgraph_method == wrapped.advgraph_method
    assert loaded.advgraph_stats == wrapped.advgraph_stats
    clone = copy.deepcopy(wrapped)
    assert clone.advgraph_method == wrapped.advgraph_method
    config = wrapped.advgraph_method.get_config()
    assert config["epsilon"] == {"schedule": "linear_schedule", "config": {"init": 0.1, "end": 1.0, "steps": 4, "begin": 0}}
    assert methods.FGM.from_config(json.loads(json.dumps(config))) == wrapped.advgraph_method


def test_a_plain_function_schedule_works_but_cannot_be_written_as_settings():
    m = methods.FGM(epsilon=lambda step: 0.5)
    assert m.at(3).epsilon == 0.5
    with pytest.raises(TypeError, match="plain function"):
        m.get_config()
