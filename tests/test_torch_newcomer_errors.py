"""The two mistakes a newcomer makes first with the PyTorch adapter get advgraph messages.

1. A closure that calls ``.backward()`` itself: adversarial_step runs the backward of
   every pass, so PyTorch used to answer with its raw "Trying to backward through the
   graph a second time" (or, with ``retain_graph=True``, silently doubled gradients).
2. A second ``perturbed()`` block after one backward: the gradient was already used
   by the first block; the message used to be the one for "no backward at all".
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
from torch.nn import functional as F  # noqa: E402

import advgraph  # noqa: E402
from torch_models import MeanPool, Untraceable, param_bytes  # noqa: E402

X = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 0], [8, 9, 1, 2]])
Y = torch.tensor([0, 1, 2])


def models():
    torch.manual_seed(0)
    return {"fx": MeanPool(), "hook": Untraceable()}


@pytest.mark.parametrize("mode,route", [("output", "fx"), ("output", "hook"), ("matrix", "fx")])
@pytest.mark.parametrize("retain_graph", [False, True])
def test_closure_that_calls_backward_itself(mode, route, retain_graph):
    model = models()[route]
    target = "tok" if route == "hook" else "embedding"  # "tok": a module fx cannot trace
    wrapped = advgraph.wrap(model, target=target, mode=mode, method="pgd", epsilon=0.5)
    before = param_bytes(model)

    def closure():
        loss = F.cross_entropy(wrapped(X), Y)
        loss.backward(retain_graph=retain_graph)  # the mistake
        return loss

    with pytest.raises(ValueError) as info:
        wrapped.adversarial_step(closure)
    message = str(info.value)
    assert "The closure ran a backward pass itself" in message
    assert "adversarial_step(closure, backward=...)" in message
    assert "Received: closure_ran_backward=True" in message
    assert param_bytes(model) == before  # weights untouched
    # The model is usable: the corrected closure trains.
    wrapped.zero_grad()
    wrapped.adversarial_step(lambda: F.cross_entropy(wrapped(X), Y))
    assert wrapped.advgraph_stats["steps"] == 1
    assert param_bytes(model) == before


@pytest.mark.parametrize("mode", ["output", "matrix"])
def test_a_second_perturbed_block_says_the_gradient_was_used(mode):
    model = models()["fx"]
    wrapped = advgraph.wrap(model, mode=mode, epsilon=0.5)
    before = param_bytes(model)
    with pytest.raises(RuntimeError, match=r"^No gradient at the perturbation site") as none:
        with wrapped.perturbed():
            pass
    assert "already used" not in str(none.value)
    F.cross_entropy(wrapped(X), Y).backward()
    with wrapped.perturbed():
        F.cross_entropy(wrapped(X), Y).backward()
    with pytest.raises(RuntimeError) as again:
        with wrapped.perturbed():
            pass
    message = str(again.value)
    assert "already used for a delta (by the previous perturbed() block" in message
    assert "Run the clean forward and backward again" in message
    assert "Received: recorded_gradients=0, already_used=True" in message
    assert param_bytes(model) == before
    F.cross_entropy(wrapped(X), Y).backward()  # a new backward: a new delta
    with wrapped.perturbed():
        F.cross_entropy(wrapped(X), Y).backward()
    assert param_bytes(model) == before
    assert wrapped.advgraph_stats["steps"] == 2


def test_perturbed_after_adversarial_step_says_the_gradient_was_used():
    wrapped = advgraph.wrap(models()["fx"], mode="output", epsilon=0.5)
    wrapped.adversarial_step(lambda: F.cross_entropy(wrapped(X), Y))
    with pytest.raises(RuntimeError, match=r"already used for a delta"):
        with wrapped.perturbed():
            pass


@pytest.mark.parametrize("mode", ["output", "matrix"])
def test_backward_in_the_adversarial_pass_only_is_reported_and_restored(mode):
    """The pass under delta needs no gradient at the site, so only PyTorch's own error
    can tell; it is translated, and the perturbed weights are restored."""
    model = models()["fx"]
    wrapped = advgraph.wrap(model, mode=mode, epsilon=0.5)
    before = param_bytes(model)
    calls = []

    def closure():
        loss = F.cross_entropy(wrapped(X), Y)
        calls.append(1)
        if len(calls) == 2:  # the adversarial pass of FGM
            loss.backward()
        return loss

    with pytest.raises(ValueError, match=r"The closure ran a backward pass itself") as info:
        wrapped.adversarial_step(closure)
    assert isinstance(info.value.__cause__, RuntimeError)  # PyTorch's message stays in the chain
    assert param_bytes(model) == before
