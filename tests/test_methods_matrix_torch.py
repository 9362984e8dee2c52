"""Matrix-mode PGD, FreeLB and VAT on PyTorch against hand-written references.

The references (tests/matrix_reference.py) are plain torch, with no advgraph code:
delta is built on the touched rows of the embedding matrix with the published
update. advgraph's step must give the same parameter gradients, report the same
loss, and leave every weight byte-identical afterwards (rows restored).

Random draws (PGD's and FreeLB's random starts, VAT's start direction) are fixed
draws handed to both sides: advgraph's draw functions (``normal_like`` /
``uniform_like`` of the torch array ops) are replaced for the test, so the
reference gets exactly the numbers advgraph used.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from torch.nn import functional as F  # noqa: E402

import advgraph  # noqa: E402
import advgraph._ops as advgraph_ops  # noqa: E402
from matrix_reference import matrix_step  # noqa: E402
from torch_models import MeanPool, param_bytes  # noqa: E402

V, D, C, B, L = 30, 8, 3, 6, 7


def _data():
    gen = torch.Generator().manual_seed(3)
    x = torch.randint(0, 20, (B, L), generator=gen)
    x[:, 0] = 4  # a row shared by every sample
    y = torch.randint(0, C, (B,), generator=gen)
    return x, y


def fixed_normal(shape):
    return np.random.default_rng(11).standard_normal(tuple(shape))


def fixed_uniform(shape):
    """U(0, 1); draws of any shape share their first values (row-major)."""
    return np.random.default_rng(13).random(tuple(shape))


@pytest.fixture
def fixed_draws(monkeypatch):
    """advgraph draws ``fixed_normal`` / ``fixed_uniform`` (mapped to [low, high))."""
    calls = []

    def normal_like(self, x, rng=None):
        calls.append(("normal", tuple(x.shape)))
        return torch.from_numpy(fixed_normal(x.shape)).to(self.widen(x).dtype)

    def uniform_like(self, x, low, high, rng=None):
        calls.append(("uniform", tuple(x.shape)))
        u = torch.from_numpy(fixed_uniform(x.shape)).to(self.widen(x).dtype)
        return low + (high - low) * u

    monkeypatch.setattr(advgraph_ops._ArrayApiOps, "normal_like", normal_like)
    monkeypatch.setattr(advgraph_ops._ArrayApiOps, "uniform_like", uniform_like)
    return calls


CASES = [
    ("pgd", {"epsilon": 1.0, "steps": 3, "alpha": 0.45}),  # 3 x 0.45 > 1: projected
    ("pgd", {"epsilon": 1.0, "steps": 2, "alpha": 0.4, "objective": "adv"}),
    ("pgd", {"epsilon": 0.8, "steps": 2, "alpha": 0.5, "random_init": True}),
    ("pgd", {"epsilon": 0.05, "steps": 3, "alpha": 0.02, "norm": "linf"}),
    ("freelb", {"epsilon": 0.5, "steps": 3, "alpha": 0.3, "random_init": False}),
    ("freelb", {"epsilon": 0.5, "steps": 3, "alpha": 0.4, "init_mag": 0.3}),  # random start
    ("freelb", {"epsilon": None, "steps": 2, "alpha": 0.7, "init_mag": 0.2}),  # unbounded
    ("vat", {"epsilon": 2.0, "xi": 0.1, "vat_weight": 0.5}),
    ("vat", {"epsilon": 1.5, "xi": 0.5, "steps": 2}),
]


def _ids(case):
    method, kw = case
    return method + "-" + "-".join(f"{k}={v}" for k, v in kw.items())


def _reference(model, x, y, method, kw, labeled, normal=None, uniform=None, dtype=torch.float32):
    E = model.emb.weight.detach().numpy()
    W = model.fc.weight.detach().numpy().T
    b = model.fc.bias.detach().numpy()
    knobs = dict(kw)
    if method == "pgd":
        knobs.setdefault("alpha", 2.5 * knobs["epsilon"] / knobs.get("steps", 3))
    if method == "freelb":
        knobs.setdefault("random_init", True)
    return matrix_step(E, W, b, x.numpy(), y.numpy(), method, labeled=labeled, normal=normal, uniform=uniform, dtype=dtype, **knobs)


# Every case with a labeled batch; VAT's also with an unlabeled one (its closure
# returns logits only).
RUNS = [(c, True) for c in CASES] + [(c, False) for c in CASES if c[0] == "vat"]


@pytest.mark.parametrize(
    "case,labeled", RUNS, ids=[_ids(c) + ("" if lab else "-unlabeled") for c, lab in RUNS]
)
def test_matrix_step_equals_hand_written_reference(case, labeled, fixed_draws):
    method, kw = case
    torch.manual_seed(0)
    model = MeanPool(vocab=V, dim=D, classes=C)
    x, y = _data()
    rows = torch.unique(x).numel()
    expected = _reference(
        model, x, y, method, kw, labeled,
        normal=fixed_normal((rows, D)), uniform=fixed_uniform((rows * D,)),
    )

    wrapped = advgraph.wrap(model, mode="matrix", method=method, **kw)
    before = param_bytes(model)

    def closure():
        out = wrapped(x)
        if method == "vat":
            return (F.cross_entropy(out, y), out) if labeled else out
        return F.cross_entropy(out, y)

    loss = wrapped.adversarial_step(closure)
    # Restored: every weight holds its bytes again (copied back, not subtracted).
    assert param_bytes(model) == before
    # The draws advgraph asked for had the touched rows' shape (rows, D), which the
    # reference was given: a draw over other rows would not match it.
    random = method == "vat" or kw.get("random_init", method == "freelb")
    if random:
        assert fixed_draws and all(shape in ((rows, D), (1, 1)) for _, shape in fixed_draws), fixed_draws
    else:
        assert not fixed_draws
    # Tolerance: both sides run the same float32 operations in another order (advgraph
    # gathers the rows' gradient from the lookup's output gradient and takes norms on
    # g / max|g|): a few ulps. Measured on gradients of up to ~0.06: <= 1.5e-8 for
    # PGD and FreeLB, 2.3e-7 for VAT (its power-iteration gradient is a small
    # difference of KL terms), so 2e-6 + 2e-5 relative leaves ~10x for other CPUs.
    # A wrong row, step size, projection or pass weighting is off by >= 1.5e-4
    # (test_reference_is_not_trivially_satisfied).
    tol = dict(rtol=2e-5, atol=2e-6)
    # The loss: relative 1e-5 (an unlabeled VAT batch reports its KL, a sum of
    # cancelling terms p (log p - log q): measured 5e-6 relative).
    assert float(loss) == pytest.approx(expected["loss"], rel=2e-5, abs=1e-7)
    np.testing.assert_allclose(model.emb.weight.grad.numpy(), expected["dE"], err_msg="E", **tol)
    np.testing.assert_allclose(model.fc.weight.grad.numpy().T, expected["dW"], err_msg="W", **tol)
    np.testing.assert_allclose(model.fc.bias.grad.numpy(), expected["db"], err_msg="b", **tol)
    assert wrapped.advgraph_stats["skipped_zero"] == 0 and wrapped.advgraph_stats["skipped_nonfinite"] == 0


def test_reference_is_not_trivially_satisfied():
    """The reference tells the methods' variants apart (so agreeing with it means something)."""
    torch.manual_seed(0)
    model = MeanPool(vocab=V, dim=D, classes=C)
    x, y = _data()
    rows = torch.unique(x).numel()
    draws = dict(normal=fixed_normal((rows, D)), uniform=fixed_uniform((rows * D,)))
    base = _reference(model, x, y, "pgd", {"epsilon": 1.0, "steps": 3, "alpha": 0.45}, True)
    for other in (
        _reference(model, x, y, "pgd", {"epsilon": 1.0, "steps": 3, "alpha": 0.3}, True),
        _reference(model, x, y, "pgd", {"epsilon": 2.0, "steps": 3, "alpha": 0.45}, True),  # no projection
        _reference(model, x, y, "pgd", {"epsilon": 1.0, "steps": 3, "alpha": 0.45, "objective": "adv"}, True),
        _reference(model, x, y, "pgd", {"epsilon": 1.0, "steps": 3, "alpha": 0.45, "random_init": True}, True, **draws),
    ):
        # 50x the comparison's tolerance (~3e-6 on gradients of ~0.05)
        assert np.abs(other["dE"] - base["dE"]).max() > 1.5e-4
    vat1 = _reference(model, x, y, "vat", {"epsilon": 2.0}, False, **draws)
    vat2 = _reference(model, x, y, "vat", {"epsilon": 2.0, "steps": 2}, False, **draws)
    assert np.abs(vat1["dE"] - vat2["dE"]).max() > 1e-4
