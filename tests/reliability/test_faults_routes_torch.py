"""Fault injection beyond the small MeanPool model: the hook route (a lookup whose
forward does not trace) and a HuggingFace BERT built from a config.

An exception or KeyboardInterrupt is raised before/after the k-th forward of the
step, inside the k-th call of the lookup (a forward hook that runs after advgraph
put δ in: the perturbation is live when it raises), or at the k-th backward.
Afterwards every parameter and buffer is byte-identical to its value before the
step, no hook is left behind, the idle model's outputs are bit-identical to those
before the fault (no δ left installed), and the model trains on: a full step
restores exactly again and an optimizer step changes the parameters.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
from torch.nn import functional as F  # noqa: E402

import advgraph  # noqa: E402
from torch_models import Untraceable, param_bytes  # noqa: E402

METHODS = {"fgm": ({}, 2), "pgd": ({"steps": 2, "random_init": True}, 3)}
EXCEPTIONS = [RuntimeError, KeyboardInterrupt]
WHERE = ["before_forward", "after_forward", "in_lookup", "backward"]


class Injected(RuntimeError):
    pass


def hook_count(model):
    return sum(
        len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) + len(m._backward_pre_hooks)
        for m in model.modules()
    )


def _hook_route():
    torch.manual_seed(0)
    model = Untraceable()
    x = torch.randint(0, 30, (4, 6))
    y = torch.randint(0, 3, (4,))
    return model, dict(target="tok"), model.tok, model.fc, (lambda m: m(x)), (lambda m: F.cross_entropy(m(x), y))


def _bert():
    pytest.importorskip("transformers")
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=32, max_position_embeddings=32, hidden_dropout_prob=0.0,
                     attention_probs_dropout_prob=0.0, num_labels=2)
    model = BertForSequenceClassification(cfg).eval()  # no dropout: outputs comparable bit for bit
    x = torch.randint(1, 64, (3, 7))
    y = torch.randint(0, 2, (3,))
    return (model, {}, model.get_input_embeddings(), model.classifier,
            (lambda m: m(input_ids=x).logits), (lambda m: m(input_ids=x, labels=y).loss))


MODELS = {"hook": (_hook_route, ["output"]), "bert": (_bert, ["output", "matrix"])}


def cases():
    for name, (_, modes) in MODELS.items():
        for mode in modes:
            for method, (_, passes) in METHODS.items():
                for exc in EXCEPTIONS:
                    for where in WHERE:
                        # pgd's first forward is fgm's clean one: its later ones only.
                        for k in range(1 if method == "fgm" else 2, passes + 1):
                            yield name, mode, method, exc, where, k


@pytest.mark.parametrize("name,mode,method,exc,where,k", list(cases()))
def test_fault_leaves_parameters_exact_and_model_usable(name, mode, method, exc, where, k):
    model, target, lookup, head, forward, loss_of = MODELS[name][0]()
    with torch.no_grad():
        idle = forward(model)
    wrapped = advgraph.wrap(model, mode=mode, method=method, **target, **METHODS[method][0])
    if name == "hook":
        assert wrapped.advgraph_route == "hook"
    hooks = hook_count(model)
    error = exc if exc is KeyboardInterrupt else Injected
    counters = {"forward": 0, "lookup": 0, "backward": 0}

    def on_lookup(module, args, output):
        counters["lookup"] += 1
        if where == "in_lookup" and counters["lookup"] == k:
            raise error("inside the lookup, δ installed")

    def on_backward(*_):
        counters["backward"] += 1
        if where == "backward" and counters["backward"] == k:
            raise error("backward")

    handles = [lookup.register_forward_hook(on_lookup), head.register_full_backward_pre_hook(on_backward)]

    def closure():
        counters["forward"] += 1
        hit = counters["forward"] == k
        if where == "before_forward" and hit:
            raise error("before forward")
        loss = loss_of(wrapped)
        if where == "after_forward" and hit:
            raise error("after forward")
        return loss

    before = param_bytes(model)
    with pytest.raises(error):
        wrapped.adversarial_step(closure)
    assert param_bytes(model) == before
    assert hook_count(model) == hooks + len(handles)
    with torch.no_grad():
        assert torch.equal(forward(wrapped), idle)  # no δ left installed

    # Usable: a whole step restores exactly again, then the optimizer trains it.
    counters.update(forward=10**6, lookup=10**6, backward=10**6)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    opt.zero_grad()
    wrapped.adversarial_step(closure)
    assert param_bytes(model) == before
    opt.step()
    assert param_bytes(model) != before
    assert all(torch.isfinite(p).all() for p in model.parameters())
    for handle in handles:
        handle.remove()
    advgraph.unwrap(wrapped)
    assert hook_count(model) == 0
