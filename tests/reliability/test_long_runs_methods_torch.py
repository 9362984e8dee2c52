"""Long runs of gp, r3f, smart, neftune and awp: live tensors and Python objects do
not grow after warm-up (SMART's teacher is one copy, updated in place)."""

from __future__ import annotations

import gc

import pytest

torch = pytest.importorskip("torch")
from torch.nn import functional as F  # noqa: E402

import advgraph  # noqa: E402
from test_long_runs_torch import batches, live_tensor_bytes  # noqa: E402
from torch_models import MeanPool  # noqa: E402

CASES = [
    ("gp", "output", {}),
    ("gp", "matrix", {}),
    ("r3f", "output", {}),
    ("smart", "output", {"alpha": 0.1}),
    ("smart", "matrix", {"alpha": 0.1}),
    ("neftune", "output", {}),
    ("awp", "output", {"target": ""}),
]


@pytest.mark.slow
@pytest.mark.parametrize("method,mode,kwargs", CASES)
def test_new_methods_hold_no_growing_memory(method, mode, kwargs):
    torch.manual_seed(0)
    model = MeanPool(padding_idx=0)
    wrapped = advgraph.wrap(model, mode=mode, method=method, **kwargs)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    data = batches(20)
    pair = method in ("r3f", "smart")
    # Python objects counted at three points 120 steps apart, each after the same batch
    # (the 20th). A leak of one object a step grows both windows by 120; a one-off
    # initialisation (a library's lazy cache, in torch or in another library this
    # process imported for other tests) grows one window only.
    objects = {}
    for i in range(280):
        x, y = data[i % len(data)]
        if i in (40, 160):
            gc.collect()
            objects[i] = len(gc.get_objects())
        if i == 40:
            tensors = live_tensor_bytes()

        def closure():
            out = wrapped(x)
            loss = F.cross_entropy(out, y)
            return (loss, out) if pair else loss

        opt.zero_grad()
        wrapped.adversarial_step(closure)
        opt.step()
    gc.collect()
    assert live_tensor_bytes() <= tensors
    windows = (objects[160] - objects[40], len(gc.get_objects()) - objects[160])
    assert min(windows) < 100, windows
    assert all(torch.isfinite(p).all() for p in model.parameters())
