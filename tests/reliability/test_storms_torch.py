"""Gradient storms: NaN, inf, zero and huge gradients never reach a parameter."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
from torch.nn import functional as F  # noqa: E402

import advgraph  # noqa: E402
from torch_models import MeanPool, param_bytes  # noqa: E402

STORM = [1.0, float("nan"), 1.0, float("inf"), 0.0, 6.0e4, -float("inf"), 1.0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("mode", ["output", "matrix"])
@pytest.mark.parametrize("method", ["fgm", "fgsm", "pgd", "freelb"])
def test_storm(dtype, mode, method):
    torch.manual_seed(0)
    model = MeanPool().to(dtype)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    kwargs = {"epsilon": 0.05} if method == "fgsm" else {}
    wrapped = advgraph.wrap(model, mode=mode, method=method, **kwargs)
    x = torch.randint(0, 30, (4, 6))
    y = torch.randint(0, 3, (4,))
    for factor in STORM:
        opt.zero_grad()
        before = param_bytes(model)
        with pytest.warns(advgraph.AdvGraphWarning) if factor != 1.0 and factor != 6.0e4 else _nothing():
            loss = wrapped.adversarial_step(lambda: F.cross_entropy(wrapped(x), y) * factor)
        # advgraph changed no parameter, whatever the gradient was.
        assert param_bytes(model) == before
        # The optimizer step is the user's: skip it on a non-finite loss or gradient,
        # as GradScaler would.
        finite = torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in model.parameters())
        if finite:
            opt.step()
        assert all(torch.isfinite(p).all() for p in model.parameters())
    stats = wrapped.advgraph_stats
    assert stats["steps"] == len(STORM)
    assert stats["skipped_nonfinite"] >= 3  # nan, inf, -inf
    assert stats["skipped_zero"] >= 1


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
