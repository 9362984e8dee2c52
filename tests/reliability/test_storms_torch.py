"""Gradient storms: NaN, inf, zero and huge gradients never reach a parameter.

The storm hits the gradient flowing into the head (a tensor hook on its input
multiplies it by the storm's factor in every pass), so the gradient advgraph reads at
the embedding to build δ is stormed. The head (``fc``) sits downstream, so its gradient is finite whatever
the storm, unless δ itself carries NaN or inf into the adversarial forward. The
head's optimizer therefore steps unconditionally, every step, and "parameters stay
finite" is a check that fails if a bad δ ever reaches a forward. The embedding's
own gradient is stormed by construction: its optimizer clips it and skips the step
on a non-finite gradient, as GradScaler would (advgraph does not own the user's step).
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
from torch.nn import functional as F  # noqa: E402

import advgraph  # noqa: E402
from torch_models import MeanPool, param_bytes  # noqa: E402

STORM = [1.0, float("nan"), 1.0, float("inf"), 0.0, 6.0e4, -float("inf"), 1.0]


def _storm_hook(model, factor_of_step):
    """Multiply the gradient flowing into the head's input: everything upstream (the
    gradient advgraph reads at the embedding, the embedding's own gradient) is
    stormed; the head's parameter gradients are not (they do not depend on it)."""

    def on_forward(module, args):
        if args[0].requires_grad:
            args[0].register_hook(lambda g: g * factor_of_step())
        return None

    return model.fc.register_forward_pre_hook(on_forward)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("mode", ["output", "matrix"])
@pytest.mark.parametrize("method", ["fgm", "fgsm", "pgd", "freelb"])
def test_storm(dtype, mode, method):
    torch.manual_seed(0)
    model = MeanPool().to(dtype)
    opt_head = torch.optim.SGD(model.fc.parameters(), lr=0.1)
    opt_emb = torch.optim.SGD(model.emb.parameters(), lr=0.1)
    kwargs = {"epsilon": 0.05} if method == "fgsm" else {}
    wrapped = advgraph.wrap(model, mode=mode, method=method, **kwargs)
    x = torch.randint(0, 30, (4, 6))
    y = torch.randint(0, 3, (4,))
    current = {"factor": 1.0}
    _storm_hook(model, lambda: current["factor"])
    emb_steps = 0
    for factor in STORM:
        current["factor"] = factor
        opt_head.zero_grad()
        opt_emb.zero_grad()
        before = param_bytes(model)
        bad = factor != 1.0 and factor != 6.0e4
        with pytest.warns(advgraph.AdvGraphWarning) if bad else _nothing():
            loss = wrapped.adversarial_step(lambda: F.cross_entropy(wrapped(x), y))
        # advgraph changed no parameter, whatever the gradient was.
        assert param_bytes(model) == before
        assert torch.isfinite(loss)
        # The head's gradient saw only δ, never the storm: finite, and the step is taken.
        head_before = model.fc.weight.detach().clone()
        assert all(torch.isfinite(p.grad).all() for p in model.fc.parameters()), factor
        opt_head.step()
        assert not torch.equal(model.fc.weight, head_before), factor
        if torch.isfinite(model.emb.weight.grad).all():
            torch.nn.utils.clip_grad_norm_(model.emb.parameters(), 1.0)  # the 6e4 storm
            opt_emb.step()
            emb_steps += 1
        assert all(torch.isfinite(p).all() for p in model.parameters()), factor
    assert emb_steps >= 4  # the 1.0 and 6e4 steps (and zero) updated the embedding
    stats = wrapped.advgraph_stats
    assert stats["steps"] == len(STORM)
    assert stats["skipped_nonfinite"] >= 3  # nan, inf, -inf
    assert stats["skipped_zero"] >= 1


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
