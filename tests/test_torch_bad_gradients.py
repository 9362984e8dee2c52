"""Bad gradients at the PyTorch adapter: δ itself is inspected, not a counter.

A forward hook on ``tap`` (an ``nn.Identity`` right after the embedding) records
what the rest of the model sees on every forward of a step: the clean pass sees
``E[x]``, the adversarial pass ``E[x] + δ`` (output mode) or ``(E + δ)[x]``
(matrix mode), so ``δ`` is read as the difference, through the public API only.
The gradient at the embedding is poisoned by a per-sample loss weight: a weight of
NaN, inf or 0 for one sample makes exactly that sample's gradient NaN, inf or zero
(the model mixes no samples). The reference δ is written by hand from a plain
autograd gradient of an unwrapped copy.

Promises checked (README, "Bad gradients are skipped, not applied"):
- δ is exactly 0 (the adversarial forward sees the clean activations bit for bit)
  when the whole gradient is zero, NaN, inf or -inf, and never NaN;
- output mode (per sample): one poisoned sample gets δ_b = 0 while every other
  sample still gets ‖δ_c‖ = ε, equal to the hand-written ε g_c / ‖g_c‖;
- matrix mode (one global δ): a NaN/inf anywhere gives δ = 0 for the whole batch;
  a zero gradient for one sample leaves the global δ at norm ε;
- the same for the hook route (a lookup whose forward does not trace).
"""

from __future__ import annotations

import copy
import math
import warnings

import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402
from torch.nn import functional as F  # noqa: E402

import advgraph  # noqa: E402
from torch_models import param_bytes  # noqa: E402

V, D, C, B, N = 30, 8, 3, 4, 6
EPS = 0.7
POISONED = 2  # the sample whose gradient is bad
BAD = {"nan": float("nan"), "inf": float("inf"), "-inf": -float("inf"), "zero": 0.0}


class _Untraceable(nn.Module):
    """A lookup whose forward has data-dependent control flow: hook route."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.Embedding(V, D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.inner(x)
        if bool(x.max() > 1000):
            out = out * 0.5
        return out


class Tapped(nn.Module):
    def __init__(self, route: str = "fx") -> None:
        super().__init__()
        self.emb = nn.Embedding(V, D) if route == "fx" else _Untraceable()
        self.tap = nn.Identity()
        self.fc = nn.Linear(D, C)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.tap(self.emb(x)).mean(dim=1))


def _setup(route: str, mode: str, method: str = "fgm", **kwargs):
    torch.manual_seed(0)
    model = Tapped(route)
    reference = copy.deepcopy(model)
    wrapped = advgraph.wrap(model, target="emb", mode=mode, method=method, epsilon=EPS, **kwargs)
    if route == "hook" and mode == "output":
        assert wrapped.advgraph_route == "hook"
    seen: list[torch.Tensor] = []
    model.tap.register_forward_hook(lambda m, args, out: seen.append(args[0].detach().clone()))
    gen = torch.Generator().manual_seed(1)
    x = torch.randint(0, V, (B, N), generator=gen)
    y = torch.randint(0, C, (B,), generator=gen)
    return model, reference, wrapped, seen, x, y


def _weights(bad: float, which: str) -> torch.Tensor:
    w = torch.ones(B)
    if which == "all":
        w[:] = bad
    else:
        w[POISONED] = bad
    return w


def _loss(model, x, y, w):
    return (F.cross_entropy(model(x), y, reduction="none") * w).sum()


def _embedding_weight(model: nn.Module) -> torch.Tensor:
    return model.emb.weight if isinstance(model.emb, nn.Embedding) else model.emb.inner.weight


def _reference_grads(reference: nn.Module, x, y, w):
    """Gradients at the embedding output (B, N, D) and at the matrix (V, D), by autograd."""
    weight = _embedding_weight(reference)
    h = F.embedding(x, weight).detach().requires_grad_(True)
    loss = (F.cross_entropy(reference.fc(h.mean(dim=1)), y, reduction="none") * w).sum()
    (g_out,) = torch.autograd.grad(loss, h)
    g_mat = torch.zeros_like(weight).index_add_(0, x.reshape(-1), g_out.reshape(-1, D))
    return g_out, g_mat


def _step(wrapped, model, x, y, w, expect_warning: bool):
    before = param_bytes(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        wrapped.adversarial_step(lambda: _loss(wrapped, x, y, w))
    warned = [c for c in caught if issubclass(c.category, advgraph.AdvGraphWarning)]
    assert bool(warned) == expect_warning, [str(c.message) for c in caught]
    assert param_bytes(model) == before  # restored exactly


def _matrix_delta(x: torch.Tensor, clean: torch.Tensor, adv: torch.Tensor) -> torch.Tensor:
    """δ of the rows the batch touched (one row per id), read from the activations."""
    ids = torch.unique(x)
    rows = []
    for i in ids.tolist():
        at = (x == i).nonzero()[0]
        rows.append(adv[at[0], at[1]] - clean[at[0], at[1]])
        # Every occurrence of an id sees the same perturbed row.
        occ = (x == i)
        assert torch.equal(adv[occ] - clean[occ], (adv[at[0], at[1]] - clean[at[0], at[1]]).expand(int(occ.sum()), D))
    return torch.stack(rows), ids


# Matrix mode has one route (the weight rows), whatever the lookup's forward.
@pytest.mark.parametrize("route, mode", [("fx", "output"), ("hook", "output"), ("fx", "matrix")])
@pytest.mark.parametrize("bad", list(BAD))
def test_whole_batch_bad_gradient_gives_exactly_zero_delta(route, mode, bad):
    model, _, wrapped, seen, x, y = _setup(route, mode)
    _step(wrapped, model, x, y, _weights(BAD[bad], "all"), expect_warning=True)
    assert len(seen) == 2, "FGM: one clean and one adversarial forward"
    clean, adv = seen
    assert torch.isfinite(adv).all()
    # δ = 0 exactly: the adversarial forward saw the clean activations bit for bit.
    assert adv.numpy().tobytes() == clean.numpy().tobytes()
    stats = wrapped.advgraph_stats
    key = "skipped_zero" if bad == "zero" else "skipped_nonfinite"
    assert stats["steps"] == 1 and stats[key] == 1


@pytest.mark.parametrize("route", ["fx", "hook"])
@pytest.mark.parametrize("bad", list(BAD))
def test_output_mode_skips_only_the_poisoned_sample(route, bad):
    model, reference, wrapped, seen, x, y = _setup(route, "output")
    w = _weights(BAD[bad], "one")
    _step(wrapped, model, x, y, w, expect_warning=True)
    clean, adv = seen
    delta = adv - clean
    assert torch.isfinite(delta).all()
    assert adv[POISONED].numpy().tobytes() == clean[POISONED].numpy().tobytes()
    g_out, _ = _reference_grads(reference, x, y, w)
    for c in range(B):
        if c == POISONED:
            continue
        # ‖δ_c‖ = ε; float32 rounding of (h + δ) - h is ~ulp(|h|) per entry (|h| < 4).
        assert math.isclose(float(delta[c].norm()), EPS, rel_tol=1e-5)
        expected = EPS * g_out[c] / g_out[c].norm()
        torch.testing.assert_close(delta[c], expected, rtol=0, atol=2e-6)
    stats = wrapped.advgraph_stats
    key = "skipped_zero" if bad == "zero" else "skipped_nonfinite"
    assert stats["steps"] == 1 and stats[key] == 1


@pytest.mark.parametrize("bad", ["nan", "inf", "-inf"])
def test_matrix_mode_nonfinite_sample_skips_the_global_delta(bad):
    model, _, wrapped, seen, x, y = _setup("fx", "matrix")
    _step(wrapped, model, x, y, _weights(BAD[bad], "one"), expect_warning=True)
    clean, adv = seen
    assert adv.numpy().tobytes() == clean.numpy().tobytes()
    assert wrapped.advgraph_stats["skipped_nonfinite"] == 1


def test_matrix_mode_zero_gradient_sample_keeps_the_global_delta():
    """One sample with a zero gradient: the global δ is still ε g / ‖g‖ (no skip)."""
    model, reference, wrapped, seen, x, y = _setup("fx", "matrix")
    w = _weights(0.0, "one")
    _step(wrapped, model, x, y, w, expect_warning=False)
    clean, adv = seen
    rows, ids = _matrix_delta(x, clean, adv)
    _, g_mat = _reference_grads(reference, x, y, w)
    g = g_mat[ids]
    assert math.isclose(float(rows.norm()), EPS, rel_tol=1e-5)
    torch.testing.assert_close(rows, EPS * g / g.norm(), rtol=0, atol=2e-6)
    assert wrapped.advgraph_stats["skipped_zero"] == 0


@pytest.mark.parametrize("mode", ["output", "matrix"])
def test_pgd_poisoned_sample_never_moves_and_delta_never_nan(mode):
    """Every PGD ascent step of a NaN-poisoned sample is skipped: δ_b stays 0 in every
    forward; the other samples move and stay inside the ε-ball (output mode)."""
    model, _, wrapped, seen, x, y = _setup("fx", mode, method="pgd", steps=3, alpha=0.4)
    _step(wrapped, model, x, y, _weights(float("nan"), "one"), expect_warning=True)
    assert len(seen) == 4  # clean + 3 ascent/adversarial forwards
    clean = seen[0]
    for adv in seen[1:]:
        assert torch.isfinite(adv).all()
        if mode == "output":
            assert adv[POISONED].numpy().tobytes() == clean[POISONED].numpy().tobytes()
            norms = (adv - clean).flatten(1).norm(dim=1)
            others = [c for c in range(B) if c != POISONED]
            assert (norms[others] > 0.1).all() and (norms[others] <= EPS * (1 + 1e-5)).all()
        else:  # one global δ: a NaN anywhere skips it whole
            assert adv.numpy().tobytes() == clean.numpy().tobytes()
