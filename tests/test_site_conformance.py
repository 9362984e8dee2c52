"""The Site contract (advgraph/methods/_site.py), checked the same way on every Site.

One set of probe methods (``_site_probes.py``: small ``advgraph.Method`` subclasses
written against the public Site, run through ``advgraph.wrap(model, method=probe)``)
and one set of assertions run on every implementation: PyTorch output, matrix and
weights; Keras output and matrix on TensorFlow, JAX and torch (each in a subprocess:
the Keras backend is fixed per process). A new adapter or site is proven by adding one entry
to ``SITES``. What is checked, against references computed by hand in numpy:

* exact restore: the weights' bytes after ``clear()``, also when a pass raised;
  the delta did reach the forward (the perturbed loss is the hand-computed one);
* per-call gradients: a target called twice gives a tuple of two gradients in call
  order, and a tuple delta gives each call its own (matrix mode: one gradient over
  the union of the rows, the calls' gradients summed, as design.md says);
* skip counting: ``record()`` of a NaN / zero ``compute_delta`` result adds to
  ``skipped_nonfinite`` / ``skipped_zero``, and its delta is exactly 0;
* pass counting: ``forward_backward``, ``penalty_backward`` and ``joint_backward``
  are one pass each (each accumulates its gradient into the step's update), and on
  PyTorch a method that runs another number of passes than its ``passes()`` is caught;
* ``advgraph_stats``: the same keys, and the same values after the same probe steps.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from dataclasses import dataclass

import numpy as np
import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
import _site_probes as probes  # noqa: E402

# float32 forward/backward of a tiny model against a float64 reference: ~1e-7 relative
# rounding per operation over a few dozen operations; 1e-5 leaves a wide margin and is
# still far below the effects checked (a delta moves the loss by > 1e-2).
TOL = dict(rtol=1e-5, atol=1e-5)


@dataclass(frozen=True)
class Site:
    framework: str  # "torch" (in this process) or a Keras backend (a subprocess)
    mode: str  # "output" | "matrix" | "weights"
    calls: str  # a target called twice: "per-call" | "union" | "none" (weights)
    checks_passes: bool = False  # a wrong passes() is caught (PyTorch: DDP / DeepSpeed)
    static_rows: bool = False  # matrix rows padded with zero rows to the ids' count (JAX)


SITES = {
    "torch-output": Site("torch", "output", "per-call", checks_passes=True),
    "torch-matrix": Site("torch", "matrix", "union", checks_passes=True),
    "torch-weights": Site("torch", "weights", "none", checks_passes=True),
    "keras-tensorflow": Site("tensorflow", "output", "per-call"),
    "keras-jax": Site("jax", "output", "per-call"),
    "keras-torch": Site("torch-backend", "output", "per-call"),
    "keras-tensorflow-matrix": Site("tensorflow", "matrix", "union"),
    "keras-jax-matrix": Site("jax", "matrix", "union", static_rows=True),
    "keras-torch-matrix": Site("torch-backend", "matrix", "union"),
}
STAT_KEYS = ["steps", "plain_steps", "skipped_nonfinite", "skipped_zero"]
# advgraph_stats after each probe's steps, the same on every site: a step counts once
# it completed (a step whose pass raised is not counted); each record() of a result
# with a NaN / zero gradient counts one skipped gradient.
EXPECTED_STATS = {
    "restore": (1, 0, 0, 0),
    "restore_raising": (0, 0, 0, 0),
    "calls": (1, 0, 0, 0),
    "skips": (2, 0, 2, 2),
    "passes": (1, 0, 0, 0),
}
COMPILED = ("skips", "passes")
# The skips probe records NaN and zero gradients on purpose: its warnings are expected.
pytestmark = pytest.mark.filterwarnings("ignore:advgraph. the gradient at the embedding")  # also run in Keras' compiled train function


def _backend_installed(framework: str) -> bool:
    import importlib.util

    module = {"tensorflow": "tensorflow", "jax": "jax", "torch-backend": "torch", "torch": "torch"}[framework]
    return importlib.util.find_spec(module) is not None and (
        framework == "torch" or importlib.util.find_spec("keras") is not None
    )


@functools.lru_cache(maxsize=None)
def _torch_results(mode: str) -> dict:
    return {probe: probes.run_torch(mode, probe) for probe in probes.PROBES}


@functools.lru_cache(maxsize=None)
def _keras_results(framework: str, mode: str, tmp: str) -> dict:
    backend = "torch" if framework == "torch-backend" else framework
    env = dict(os.environ, KERAS_BACKEND=backend, TF_CPP_MIN_LOG_LEVEL="2")
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    out = os.path.join(tmp, f"{framework}-{mode}.json")
    # passes_short / passes_long are checked where a wrong passes() is caught (PyTorch).
    names = [p for p in probes.PROBES if not p.startswith("passes_")] + [f"{n}:compiled" for n in COMPILED]
    proc = subprocess.run(
        [sys.executable, os.path.join(HERE, "_site_probes.py"), out, mode, *names],
        env=env, capture_output=True, text=True, timeout=600, cwd=ROOT,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    with open(out) as f:
        return json.load(f)


@pytest.fixture(params=list(SITES))
def site(request, tmp_path_factory):
    """``(name, Site, results)``: every probe's observations on that site."""
    name = request.param
    spec = SITES[name]
    if not _backend_installed(spec.framework):
        pytest.skip(f"{spec.framework} is not installed")
    if spec.framework == "torch":
        results = _torch_results(spec.mode)
    else:
        results = _keras_results(spec.framework, spec.mode, str(tmp_path_factory.getbasetemp()))
    return name, spec, results


# -- hand-written references (float64) ----------------------------------------------------


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def _forward(H: np.ndarray, W: np.ndarray, b: np.ndarray, H2=None, W2=None):
    """Loss and gradients of mean-pool -> dense (+ mean-pool -> dense2) -> CE.

    Returns ``loss, dH, dH2, dW, db``."""
    y = probes.data()["y"]
    n, length, _ = H.shape
    h = H.mean(axis=1)
    z = h @ W + b
    if H2 is not None:
        z = z + H2.mean(axis=1) @ W2
    p = _softmax(z)
    loss = -np.log(p[np.arange(n), y]).mean()
    dz = p.copy()
    dz[np.arange(n), y] -= 1.0
    dz /= n
    dH = np.repeat((dz @ W.T)[:, None, :] / length, length, axis=1)
    dH2 = None if H2 is None else np.repeat((dz @ W2.T)[:, None, :] / length, length, axis=1)
    return loss, dH, dH2, h.T @ dz, dz.sum(axis=0)


def _f64() -> dict[str, np.ndarray]:
    return {k: (v if k in ("x", "x2", "y") else v.astype(np.float64)) for k, v in probes.data().items()}


def _scatter(ids: np.ndarray, dH: np.ndarray) -> np.ndarray:
    out = np.zeros((probes.V, dH.shape[-1]))
    np.add.at(out, ids.reshape(-1), dH.reshape(-1, dH.shape[-1]))
    return out


def _scalar(value) -> float:
    return float(np.asarray(value).reshape(()))


# -- the contract ---------------------------------------------------------------------------


def test_stats_have_the_same_keys_and_values_after_the_same_probe_steps(site) -> None:
    name, spec, results = site
    for probe, expected in EXPECTED_STATS.items():
        stats = results[probe]["stats"]
        assert list(stats) == STAT_KEYS, (name, probe, stats)
        assert tuple(stats.values()) == expected, (name, probe, stats)
    for probe in COMPILED:  # Keras' compiled train function counts the same
        if f"{probe}:compiled" in results:
            assert tuple(results[f"{probe}:compiled"]["stats"].values()) == EXPECTED_STATS[probe], (name, probe)


@pytest.mark.parametrize("probe", ["restore", "restore_raising"])
def test_clear_restores_the_bytes_also_when_a_pass_raises(site, probe: str) -> None:
    name, spec, results = site
    r = results[probe]
    if probe == "restore_raising":
        assert r["error"] and "ProbeError" in r["error"], (name, r["error"])
    else:
        assert r["error"] is None, (name, r["error"])
        # The delta reached the forward: the perturbed loss is the hand-computed one.
        d = _f64()
        H = d["E"][d["x"]]
        clean, dH, _, dW, _ = _forward(H, d["W"], d["b"])
        k = probes.DELTA
        if spec.mode == "weights":  # the site is the Dense layer's weight matrix
            perturbed = _forward(H, d["W"] + k * dW, d["b"])[0]
        elif spec.mode == "matrix":  # the touched rows, by their lookup gradient
            E = d["E"] + k * _scatter(d["x"], dH)
            perturbed = _forward(E[d["x"]], d["W"], d["b"])[0]
        else:
            perturbed = _forward(H + k * dH, d["W"], d["b"])[0]
        assert abs(perturbed - clean) > 1e-2
        np.testing.assert_allclose(_scalar(r["notes"]["clean_loss"][0]), clean, **TOL)
        np.testing.assert_allclose(_scalar(r["notes"]["perturbed_loss"][0]), perturbed, err_msg=name, **TOL)
    assert r["after"] == r["before"], f"{name}: the weights' bytes changed after clear()"


def test_a_target_called_twice_gives_per_call_gradients_and_deltas(site, request) -> None:
    name, spec, results = site
    if spec.calls == "none":
        pytest.skip("a site made of weights has no calls of a target")
    r = results["calls"]
    assert r["error"] is None, (name, r["error"])
    d = _f64()
    H, H2 = d["E"][d["x"]], d["E"][d["x2"]]
    loss, dH, dH2, _, _ = _forward(H, d["W"], d["b"], H2, d["W2"])
    np.testing.assert_allclose(_scalar(r["notes"]["clean_loss"][0]), loss, **TOL)
    grad = r["notes"]["grad"][0]
    s0, s1 = probes.SCALES
    if spec.calls == "per-call":
        assert isinstance(grad, (list, tuple)) and len(grad) == 2 and np.ndim(grad[0]) == 3, name
        # "Call order" is the order the calls ran in: PyTorch runs x then x2 as written;
        # a Keras functional graph runs nodes of equal depth in its own order, so the
        # first gradient is matched to its call (each must match exactly one of them).
        first = np.asarray(grad[0])
        order = (0, 1) if np.allclose(first, dH, **TOL) else (1, 0)
        if spec.framework == "torch":
            assert order == (0, 1), name
        want = (dH, dH2) if order == (0, 1) else (dH2, dH)
        np.testing.assert_allclose(first, want[0], err_msg=f"{name} call 0", **TOL)
        np.testing.assert_allclose(np.asarray(grad[1]), want[1], err_msg=f"{name} call 1", **TOL)
        # Each call got its own delta, in call order (swapped, the loss would differ).
        sx, sx2 = (s0, s1) if order == (0, 1) else (s1, s0)
        perturbed = _forward(H + sx * dH, d["W"], d["b"], H2 + sx2 * dH2, d["W2"])[0]
        swapped = _forward(H + sx2 * dH, d["W"], d["b"], H2 + sx * dH2, d["W2"])[0]
        assert abs(perturbed - swapped) > 1e-3
    else:  # matrix: the rows touched by either call, the calls' gradients summed
        rows = np.unique(np.concatenate([d["x"].ravel(), d["x2"].ravel()]))
        expected = (_scatter(d["x"], dH) + _scatter(d["x2"], dH2))[rows]
        grad = np.asarray(grad)
        if spec.static_rows:  # one slot per id position: the distinct rows, then zeros
            assert grad.shape == (d["x"].size + d["x2"].size, expected.shape[1]), (name, grad.shape)
            assert (grad[len(rows):] == 0).all(), name
            grad = grad[: len(rows)]
        np.testing.assert_allclose(grad, expected, err_msg=name, **TOL)
        E = d["E"].copy()
        E[rows] += s0 * expected
        perturbed = _forward(E[d["x"]], d["W"], d["b"], E[d["x2"]], d["W2"])[0]
    assert abs(perturbed - loss) > 1e-2
    np.testing.assert_allclose(_scalar(r["notes"]["perturbed_loss"][0]), perturbed, err_msg=name, **TOL)


def test_skipped_gradients_are_counted_and_their_delta_is_zero(site) -> None:
    name, _, results = site
    r = results["skips"]
    assert r["error"] is None, (name, r["error"])
    assert tuple(r["stats"].values()) == EXPECTED_STATS["skips"], (name, r["stats"])
    for deltas, clean, perturbed in zip(r["notes"]["deltas"], r["notes"]["clean_loss"], r["notes"]["perturbed_loss"]):
        bad, zero, good = (np.asarray(a) for a in deltas)
        assert (bad == 0).all() and (zero == 0).all(), name
        np.testing.assert_allclose(np.linalg.norm(good), 0.5, rtol=1e-5)
        # The NaN result's delta installed at the site: the pass is the clean pass, bit for bit.
        assert _scalar(perturbed) == _scalar(clean), name


def test_every_kind_of_pass_is_one_pass_that_accumulates_its_gradient(site) -> None:
    """forward_backward + penalty_backward (zero penalty) + joint_backward (one
    forward): three passes, each adding the clean gradient; SGD then moves every
    weight by -LR * 3 * g (hand-computed)."""
    name, _, results = site
    d = _f64()
    _, dH, _, dW, db = _forward(d["E"][d["x"]], d["W"], d["b"])
    expected = {"E": d["E"] - probes.LR * 3 * _scatter(d["x"], dH), "W": d["W"] - probes.LR * 3 * dW,
                "b": d["b"] - probes.LR * 3 * db, "W2": d["W2"]}  # fmt: skip
    for key in ("passes", "passes:compiled"):
        if key not in results:
            continue
        r = results[key]
        assert r["error"] is None, (name, key, r["error"])
        for weight, value in expected.items():
            np.testing.assert_allclose(np.asarray(r["weights"][weight]), value, err_msg=f"{name} {key} {weight}", **TOL)


@pytest.mark.parametrize("probe, run", [("passes_short", 2), ("passes_long", 4)])
def test_a_method_running_another_number_of_passes_than_declared_is_caught(site, probe: str, run: int) -> None:
    name, spec, results = site
    if not spec.checks_passes:
        pytest.skip(
            "Keras sums every pass's gradients and applies them once per step: nothing "
            "depends on which pass is the last, so there is nothing to catch"
        )
    r = results[probe]
    assert r["error"] and r["error"].startswith("ValueError"), (name, r["error"])
    assert f"passes_run={run}, passes_declared=3" in r["error"], r["error"]
    assert r["after"] == r["before"], name  # the parameters are restored; no optimizer step ran
    assert r["stats"]["steps"] == 0
