"""A user's own method, on every backend, without touching advgraph (issue 17, item 4).

``_user_methods.py`` defines R-Drop and FGM with a relative epsilon as
``advgraph.Method`` subclasses, outside advgraph. Here:

- on the PyTorch adapter, each method's update equals a hand-written PyTorch step
  (no advgraph), restore is byte-exact when the second forward raises, zero and
  non-finite gradients are skipped (delta exactly 0) and counted, and with real
  dropout R-Drop's two forwards differ (KL > 0);
- the same update (weights after one SGD step) on the PyTorch adapter and on Keras'
  TensorFlow, JAX and torch backends, within 1e-5 (R-Drop's dropout draws injected:
  the same two masks everywhere);
- the per-backend suite ``keras_user_method_cases.py`` passes on every Keras backend
  (one subprocess each: the backend is fixed per process). The worked R-Drop example
  of the docs (docs/write-your-own.md) runs with the docs tests.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import advgraph  # noqa: E402
from advgraph import AdvGraphWarning  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
import _user_methods as um  # noqa: E402

BACKENDS = ("tensorflow", "jax", "torch")
TOL = dict(rtol=1e-5, atol=1e-5)
F = torch.nn.functional


# -- the PyTorch model: Embedding -> (injected dropout) -> mean over L -> Linear ---------


class FixedMasks(torch.nn.Module):
    """Dropout whose k-th training forward multiplies by ``masks[k % 2]``."""

    def __init__(self, masks: np.ndarray) -> None:
        super().__init__()
        self.masks = torch.from_numpy(masks)
        self.count = 0

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return h
        mask = self.masks[self.count % 2]
        self.count += 1
        return h * mask


class Net(torch.nn.Module):
    def __init__(self, d: dict, middle: torch.nn.Module | None = None) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(um.V, um.D)
        self.middle = middle if middle is not None else torch.nn.Identity()
        self.fc = torch.nn.Linear(um.D, um.C)
        with torch.no_grad():
            self.emb.weight.copy_(torch.from_numpy(d["E"]))
            self.fc.weight.copy_(torch.from_numpy(d["W"].T.copy()))
            self.fc.bias.copy_(torch.from_numpy(d["b"]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.middle(self.emb(x)).mean(dim=1))


def batch(d: dict) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.from_numpy(d["x"]).long(), torch.from_numpy(d["y"]).long()


def closure_for(wrapped: Any, method: advgraph.Method, x: torch.Tensor, y: torch.Tensor, weight=None):
    def closure():
        logits = wrapped(x)
        per_sample = F.cross_entropy(logits, y, reduction="none")
        loss = per_sample.mean() if weight is None else (per_sample * weight).mean()
        return (loss, logits) if method.closure == "loss_and_logits" else loss

    return closure


def adapter_step(name: str, mode: str, d: dict) -> dict[str, np.ndarray]:
    """One step of ``name`` through advgraph's PyTorch adapter, plain SGD."""
    method = um.method_of(name)
    middle = FixedMasks(d["masks"]) if name.startswith("rdrop") else None
    model = Net(d, middle)
    wrapped = advgraph.wrap(model, mode=mode, method=method)
    optimizer = torch.optim.SGD(wrapped.parameters(), lr=um.LR)
    x, y = batch(d)
    optimizer.zero_grad()
    loss = wrapped.adversarial_step(closure_for(wrapped, method, x, y))
    optimizer.step()
    assert dict(wrapped.advgraph_stats) == {"steps": 1, "plain_steps": 0, "skipped_nonfinite": 0, "skipped_zero": 0}
    if middle is not None:
        assert middle.count == 2  # one forward per mask
    return {
        "loss": np.asarray(float(loss)),
        "E": model.emb.weight.detach().numpy().copy(),
        "W": model.fc.weight.detach().numpy().T.copy(),
        "b": model.fc.bias.detach().numpy().copy(),
    }


# -- hand-written references: plain PyTorch, no advgraph -------------------------------


def _leaves(d: dict):
    E = torch.tensor(d["E"], requires_grad=True)
    W = torch.tensor(d["W"], requires_grad=True)
    b = torch.tensor(d["b"], requires_grad=True)
    x, y = batch(d)
    return E, W, b, x, y


def _sgd(E, W, b, loss) -> dict[str, np.ndarray]:
    with torch.no_grad():
        return {
            "loss": np.asarray(float(loss)),
            "E": (E - um.LR * E.grad).numpy(),
            "W": (W - um.LR * W.grad).numpy(),
            "b": (b - um.LR * b.grad).numpy(),
        }


def rdrop_reference(d: dict) -> dict[str, np.ndarray]:
    """Two forwards with masks 0 and 1; ``(CE1 + CE2)/2 + alpha * (KL12 + KL21)/2``."""
    E, W, b, x, y = _leaves(d)
    masks = torch.from_numpy(d["masks"])
    logits = [(E[x] * masks[k]).mean(dim=1) @ W + b for k in (0, 1)]
    ce = [F.cross_entropy(z, y) for z in logits]
    logp, logq = (torch.log_softmax(z, dim=-1) for z in logits)
    kl_pq = (logp.exp() * (logp - logq)).sum(dim=-1).mean()
    kl_qp = (logq.exp() * (logq - logp)).sum(dim=-1).mean()
    total = (ce[0] + ce[1]) / 2 + um.ALPHA * (kl_pq + kl_qp) / 2
    total.backward()
    return _sgd(E, W, b, (ce[0] + ce[1]) / 2)


def relfgm_reference(d: dict) -> dict[str, np.ndarray]:
    """Clean pass; ``delta_b = eps * ||e_b|| * g_b / ||g_b||``; a pass at ``e + delta``."""
    E, W, b, x, y = _leaves(d)
    e = E[x]
    e.retain_grad()
    loss = F.cross_entropy(e.mean(dim=1) @ W + b, y)
    loss.backward()
    g = e.grad.detach()
    g_norm = g.flatten(1).norm(dim=1).view(-1, 1, 1)
    e_norm = e.detach().flatten(1).norm(dim=1).view(-1, 1, 1)
    delta = um.EPS * e_norm * g / g_norm
    F.cross_entropy((E[x] + delta).mean(dim=1) @ W + b, y).backward()
    out = _sgd(E, W, b, loss)
    out["delta"] = delta.numpy()
    return out


@pytest.mark.parametrize("name, mode", [("rdrop", "output"), ("rdrop", "matrix"), ("relfgm", "output")])
def test_pytorch_adapter_matches_the_hand_written_step(name: str, mode: str) -> None:
    d = um.data()
    ours = adapter_step(name, mode, d)
    ref = rdrop_reference(d) if name == "rdrop" else relfgm_reference(d)
    # Same framework, same float32 math in another order: agreement to float32 rounding.
    for key in ("loss", "E", "W", "b"):
        np.testing.assert_allclose(ours[key], ref[key], rtol=1e-6, atol=1e-6, err_msg=key)
    # The step changed the weights (a no-op method would fail the comparison above only
    # if the reference's step were small): the update is real.
    assert np.abs(ref["E"] - d["E"]).max() > 1e-3


# -- the promises of a built-in method, held by a user's method -------------------------


@dataclass(frozen=True, kw_only=True)
class SpyRelativeFGM(um.RelativeFGM):
    """Relative FGM that keeps each delta it installs (test only)."""

    seen: ClassVar[list] = []

    def delta(self, site):
        delta = super().delta(site)
        self.seen.append(delta.detach().clone())
        return delta


def _bytes(model: torch.nn.Module) -> list[bytes]:
    return [p.detach().numpy().tobytes() for p in model.parameters()]


def test_relative_fgm_delta_has_the_relative_size_per_sample() -> None:
    d = um.data()
    x, y = batch(d)
    model = Net(d)
    SpyRelativeFGM.seen.clear()
    wrapped = advgraph.wrap(model, method=SpyRelativeFGM(epsilon=um.EPS))
    wrapped.adversarial_step(closure_for(wrapped, wrapped.advgraph_method, x, y))
    (delta,) = SpyRelativeFGM.seen
    np.testing.assert_allclose(delta.numpy(), relfgm_reference(d)["delta"], rtol=1e-5, atol=1e-7)
    e_norm = torch.from_numpy(d["E"])[x].flatten(1).norm(dim=1)
    np.testing.assert_allclose(delta.flatten(1).norm(dim=1).numpy(), (um.EPS * e_norm).numpy(), rtol=1e-5)


@pytest.mark.parametrize("bad, counter", [(0.0, "skipped_zero"), (float("nan"), "skipped_nonfinite")])
def test_relative_fgm_skips_and_counts_a_bad_gradient(bad: float, counter: str) -> None:
    """Sample 0's loss weight is 0 (its gradient at the embedding is zero) or NaN
    (non-finite): its delta is exactly 0, the other samples' are not, the step counts
    it in advgraph_stats and warns."""
    d = um.data()
    x, y = batch(d)
    weight = torch.ones(um.B)
    weight[0] = bad
    SpyRelativeFGM.seen.clear()
    wrapped = advgraph.wrap(Net(d), method=SpyRelativeFGM(epsilon=um.EPS))
    with pytest.warns(AdvGraphWarning, match="NaN or inf" if bad != bad else "zero"):
        wrapped.adversarial_step(closure_for(wrapped, wrapped.advgraph_method, x, y, weight))
    (delta,) = SpyRelativeFGM.seen
    assert not delta[0].any()  # exactly 0 (also not NaN)
    assert (delta[1:].flatten(1).norm(dim=1) > 0).all()
    stats = dict(wrapped.advgraph_stats)
    other = "skipped_nonfinite" if counter == "skipped_zero" else "skipped_zero"
    assert stats[counter] == 1 and stats[other] == 0 and stats["steps"] == 1, stats


class Bomb(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.armed, self.calls = False, 0

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if self.training and self.armed:
            self.calls += 1
            if self.calls == 2:
                raise RuntimeError("boom in the second forward")
        return h


@pytest.mark.parametrize("name, mode", [("rdrop", "output"), ("rdrop", "matrix"), ("relfgm", "output")])
def test_error_in_the_second_forward_restores_exactly(name: str, mode: str) -> None:
    """R-Drop's second forward (inside the joint pass) or relative FGM's perturbed one
    raises: every parameter keeps its bytes, no delta stays installed (the model's
    output is bit-identical to before) and the next step runs."""
    d = um.data()
    x, y = batch(d)
    bomb = Bomb()
    model = Net(d, bomb)
    method = um.method_of(name)
    wrapped = advgraph.wrap(model, mode=mode, method=method)
    before = _bytes(model)
    with torch.no_grad():
        out_before = wrapped(x).numpy().tobytes()
    bomb.armed = True
    with pytest.raises(RuntimeError, match="boom"):
        wrapped.adversarial_step(closure_for(wrapped, method, x, y))
    assert _bytes(model) == before
    with torch.no_grad():
        assert wrapped(x).numpy().tobytes() == out_before
    bomb.armed = False
    model.zero_grad()
    wrapped.adversarial_step(closure_for(wrapped, method, x, y))
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


@pytest.mark.parametrize("mode", ["output", "matrix"])
def test_rdrop_with_real_dropout_two_forwards_differ_and_kl_is_positive(mode: str) -> None:
    d = um.data()
    x, y = batch(d)
    found = {}
    for rate, show in ((0.5, "kl"), (0.5, "gap"), (0.0, "gap")):
        torch.manual_seed(0)
        wrapped = advgraph.wrap(Net(d, torch.nn.Dropout(rate)), mode=mode, method=um.RDropProbe(show=show))
        found[rate, show] = float(wrapped.adversarial_step(closure_for(wrapped, wrapped.advgraph_method, x, y)))
    assert found[0.5, "kl"] > 1e-6 and found[0.5, "gap"] > 1e-3, found
    assert found[0.0, "gap"] == 0.0, found


def test_user_methods_are_objects_like_the_built_in_ones() -> None:
    method = um.RDrop(alpha=0.5, start=3)
    assert repr(method) == "RDrop(start=3, alpha=0.5)"
    assert um.RDrop.from_config(method.get_config()) == method
    assert isinstance(method, advgraph.Method)
    with pytest.raises(ValueError, match="Received: alpha=-1"):
        um.RDrop(alpha=-1)
    model = Net(um.data())
    with pytest.raises(ValueError, match="Received: .*mode='matrix'"):
        advgraph.wrap(model, mode="matrix", method=um.RelativeFGM())
    assert not advgraph.is_wrapped(model)


# -- every backend ---------------------------------------------------------------------


def _available(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def _env(backend: str, out: str) -> dict[str, str]:
    env = dict(os.environ)
    env["KERAS_BACKEND"] = backend
    env["ADVGRAPH_USER_METHODS_OUT"] = out
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    return env


@pytest.fixture(scope="module")
def keras_runs(tmp_path_factory) -> dict[str, tuple[subprocess.CompletedProcess, str]]:
    """``keras_user_method_cases.py`` under each installed Keras backend."""
    if not _available("keras"):
        pytest.skip("keras is not installed")
    tmp = tmp_path_factory.mktemp("user-methods")
    runs = {}
    for backend in BACKENDS:
        if not _available(backend):
            continue
        out = str(tmp / f"{backend}.npz")
        proc = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", os.path.join(HERE, "keras_user_method_cases.py")],
            env=_env(backend, out),
            capture_output=True,
            text=True,
            timeout=900,
            cwd=ROOT,
        )
        runs[backend] = (proc, out)
    return runs


@pytest.mark.parametrize("backend", BACKENDS)
def test_keras_backend_suite(keras_runs, backend: str) -> None:
    """The per-backend suite passes (restore on error, skips counted, real dropout
    differs, steps counted) with KERAS_BACKEND=backend."""
    if backend not in keras_runs:
        pytest.skip(f"{backend} is not installed")
    proc, _ = keras_runs[backend]
    assert proc.returncode == 0, proc.stdout[-8000:] + proc.stderr[-3000:]
    assert re.search(r"\b[1-9]\d* passed", proc.stdout), proc.stdout[-3000:]  # not all skipped
    assert " skipped" not in proc.stdout.splitlines()[-1], proc.stdout[-3000:]


@pytest.mark.parametrize("i", range(len(um.CASES)), ids=[f"{n}-{'eager' if e else 'compiled'}" for n, _, e in um.CASES])
def test_same_update_on_every_backend(keras_runs, i: int) -> None:
    """PyTorch adapter, Keras TensorFlow, JAX and torch: the same loss and weights after
    one step within 1e-5, and all of them the hand-written PyTorch step's."""
    name, mode, _ = um.CASES[i]
    d = um.data()
    ref = rdrop_reference(d) if name.startswith("rdrop") else relfgm_reference(d)
    results = {"torch-adapter": adapter_step(name, mode, d)}
    for backend, (proc, out) in keras_runs.items():
        assert os.path.exists(out), f"{backend}: no numbers written\n" + proc.stdout[-4000:]
        with np.load(out) as data:
            results[f"keras-{backend}"] = {k: data[f"{i}/{k}"] for k in ("loss", "E", "W", "b")}
    assert len(results) == 1 + len(keras_runs) >= 2
    first = results["torch-adapter"]
    for framework, result in results.items():
        for key in ("loss", "E", "W", "b"):
            np.testing.assert_allclose(result[key], first[key], err_msg=f"{framework} {key}", **TOL)
            np.testing.assert_allclose(result[key], ref[key], err_msg=f"{framework} vs reference {key}", **TOL)
