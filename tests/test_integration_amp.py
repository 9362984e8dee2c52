"""Mixed precision in plain loops: torch.autocast + GradScaler around adversarial_step.

The closure returns ``scaler.scale(loss)``. A step whose scaled gradients overflow
gives delta = 0 (counted), GradScaler skips the optimizer step, and no parameter
ever becomes NaN/inf because of advgraph.
"""

from __future__ import annotations

import copy
import warnings

import pytest

torch = pytest.importorskip("torch")
from torch.nn import functional as F  # noqa: E402

import advgraph  # noqa: E402
from torch_models import ConvClassifier, param_bytes  # noqa: E402

STEPS = 5
INF_STEP = 2


@pytest.fixture(autouse=True)
def one_thread():
    # The test machines are small and shared: one intra-op thread is much faster there.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def batches(n: int = STEPS, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return [
        (torch.randint(1, 30, (4, 6), generator=gen), torch.randint(0, 3, (4,), generator=gen))
        for _ in range(n)
    ]


def autocast_dtypes() -> list[torch.dtype]:
    dtypes = [torch.bfloat16]
    try:
        with torch.autocast("cpu", dtype=torch.float16):
            torch.nn.functional.linear(torch.ones(2, 2), torch.ones(2, 2))
        dtypes.append(torch.float16)
    except RuntimeError:  # pragma: no cover - older CPUs / builds
        pass
    return dtypes


@pytest.mark.parametrize("dtype", autocast_dtypes(), ids=str)
@pytest.mark.parametrize(
    "mode,method,kwargs",
    [
        ("output", "fgm", {}),
        ("matrix", "fgm", {}),
        ("output", "pgd", {"steps": 2}),
        ("output", "freelb", {"steps": 2}),
    ],
)
def test_inf_scale_step_is_skipped_and_parameters_stay_finite(dtype, mode, method, kwargs):
    torch.manual_seed(0)
    model = ConvClassifier()
    wrapped = advgraph.wrap(model, mode=mode, method=method, epsilon=0.5, **kwargs)
    opt = torch.optim.SGD(wrapped.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    skipped_before = 0
    for step, (x, y) in enumerate(batches()):
        if step == INF_STEP:
            scaler.update(new_scale=float("inf"))  # the injected overflow
        before = param_bytes(model)
        opt.zero_grad()
        with torch.autocast("cpu", dtype=dtype), warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            loss = wrapped.adversarial_step(lambda: scaler.scale(F.cross_entropy(wrapped(x), y)))
        # Parameters are restored exactly after the passes (matrix mode edits rows in place).
        assert param_bytes(model) == before
        scaler.step(opt)
        scaler.update()
        skipped = wrapped.advgraph_stats["skipped_nonfinite"]
        if step == INF_STEP:
            assert not torch.isfinite(loss)
            assert skipped > skipped_before  # delta = 0 for this step, counted ...
            assert any(isinstance(w.message, advgraph.AdvGraphWarning) for w in caught)  # ... and warned
            assert param_bytes(model) == before  # GradScaler skipped the optimizer step
            scaler.update(new_scale=2.0**10)
        else:
            assert torch.isfinite(loss)
            assert skipped == skipped_before
            assert param_bytes(model) != before  # a normal step updates
        skipped_before = skipped
        assert all(torch.isfinite(p).all() for p in model.parameters())
    assert wrapped.advgraph_stats["steps"] == STEPS


@pytest.mark.parametrize("mode", ["output", "matrix"])
def test_scaled_step_equals_unscaled_step(mode):
    # With a finite scale, unscale_() gives the gradients of the unscaled loss (fp32).
    torch.manual_seed(0)
    model = ConvClassifier()
    reference = copy.deepcopy(model)
    wrapped = advgraph.wrap(model, mode=mode, epsilon=0.5)
    w_ref = advgraph.wrap(reference, mode=mode, epsilon=0.5)
    opt = torch.optim.SGD(wrapped.parameters(), lr=0.1)
    opt_ref = torch.optim.SGD(w_ref.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    for x, y in batches(3):
        opt.zero_grad()
        opt_ref.zero_grad()
        wrapped.adversarial_step(lambda: scaler.scale(F.cross_entropy(wrapped(x), y)))
        w_ref.adversarial_step(lambda: F.cross_entropy(w_ref(x), y))
        scaler.step(opt)
        scaler.update()
        opt_ref.step()
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
