"""Keras on every backend: the same numbers on TensorFlow, JAX and torch, and the
backend-specific behaviour suite run once per backend.

The Keras backend is fixed per process, so every backend runs in a subprocess:

- ``_keras_backend_worker.py`` does one adversarial step of the same model with
  the same weights and batch on each Keras backend and in advgraph's PyTorch
  adapter; the clean loss, every delta and the updated weights must agree within
  1e-5 (fgm, fgsm, pgd, freelb without random start, vat with the same start
  direction; both modes; ``objective`` both ways), and FGM must match a
  reference computed by hand in numpy (the model's gradients written out);
  matrix-mode PGD, FreeLB and VAT must match ``matrix_reference.py`` (plain torch,
  no advgraph code), on every backend and in the PyTorch adapter.
- ``keras_backend_cases.py`` (the per-backend suite) runs under pytest with
  ``KERAS_BACKEND`` set to each backend.
"""

from __future__ import annotations

import functools
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
BACKENDS = ("tensorflow", "jax", "torch")
TOL = dict(rtol=1e-5, atol=1e-5)

sys.path.insert(0, HERE)
import _keras_backend_worker as worker  # noqa: E402


def _available(backend: str) -> bool:
    module = {"tensorflow": "tensorflow", "jax": "jax", "torch": "torch"}[backend]
    try:
        __import__("importlib.util").util.find_spec(module)
    except Exception:  # pragma: no cover
        return False
    return __import__("importlib.util").util.find_spec(module) is not None


def _env(backend: str | None) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("KERAS_BACKEND", None)
    if backend is not None:
        env["KERAS_BACKEND"] = backend
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    return env


def _run_worker(framework: str, backend: str | None, cases: list[dict], tmp_path) -> dict:
    out = tmp_path / f"{framework}-{backend}.npz"
    proc = subprocess.run(
        [sys.executable, os.path.join(HERE, "_keras_backend_worker.py"), framework, str(out), json.dumps(cases)],
        env=_env(backend),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    with np.load(out) as data:
        return {key: data[key] for key in data.files}


CASES = [
    (mode, method, kwargs)
    for mode in ("output", "matrix")
    for method, kwargs in (
        ("fgm", {}),
        ("fgm", {"objective": "adv"}),
        ("fgsm", {}),
        ("pgd", {"steps": 2, "alpha": 0.4}),
        ("freelb", {"steps": 2, "alpha": 0.3, "random_init": False}),
        ("vat", {}),
    )
] + [
    # FreeLB with its projection reached (2 ascent steps of 0.4 against epsilon 0.6).
    ("matrix", "freelb", {"steps": 3, "alpha": 0.4, "random_init": False}),
]


def _cases(eager: bool) -> list[dict]:
    return [{"mode": m, "method": me, "kwargs": k, "eager": eager} for m, me, k in CASES]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, dict]:
    """Every backend's results: eager cases (deltas observable), then compiled cases."""
    tmp = tmp_path_factory.mktemp("backends")
    cases = _cases(True) + _cases(False)
    results = {}
    for backend in BACKENDS:
        if _available(backend):
            results[backend] = _run_worker("keras", backend, cases, tmp)
    if _available("torch"):
        results["torch-adapter"] = _run_worker("torch-adapter", None, _cases(True), tmp)
    if len(results) < 2:
        pytest.skip("fewer than two frameworks installed")
    return results


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def _grads(E_used: np.ndarray, H: np.ndarray, W: np.ndarray, b: np.ndarray, y: np.ndarray):
    """Loss and gradients of mean-pool -> dense -> softmax CE, by hand.

    ``H`` (B, L, D) is the embedding output the forward uses. Returns
    ``(loss, dH, dW, db)``.
    """
    B, L, _ = H.shape
    h = H.mean(axis=1)
    p = _softmax(h @ W + b)
    loss = -np.log(p[np.arange(B), y]).mean()
    dz = p.copy()
    dz[np.arange(B), y] -= 1.0
    dz /= B
    dW, db = h.T @ dz, dz.sum(axis=0)
    dH = np.repeat((dz @ W.T)[:, None, :] / L, L, axis=1)
    return loss, dH, dW, db


def _scatter(x: np.ndarray, dH: np.ndarray, vocab: int) -> np.ndarray:
    dE = np.zeros((vocab, dH.shape[-1]))
    np.add.at(dE, x.reshape(-1), dH.reshape(-1, dH.shape[-1]))
    return dE


def fgm_reference(mode: str, objective: str) -> dict[str, np.ndarray]:
    """One FGM step of the worker's model and batch, computed by hand in float64."""
    d = worker.data()
    E, W, b, x, y = (d[k].astype(np.float64) if k != "x" and k != "y" else d[k] for k in "EWbxy")
    loss, dH, dW, db = _grads(E, E[x], W, b, y)
    dE = _scatter(x, dH, E.shape[0])
    if mode == "output":  # per sample, l2 over (L, D)
        norms = np.sqrt((dH**2).sum(axis=(1, 2), keepdims=True))
        delta = worker.EPS * dH / norms
        _, dH2, dW2, db2 = _grads(E, E[x] + delta, W, b, y)
    else:  # global l2 over the touched rows
        delta_m = worker.EPS * dE / np.sqrt((dE**2).sum())
        E2 = E + delta_m
        _, dH2, dW2, db2 = _grads(E2, E2[x], W, b, y)
        delta = delta_m[np.unique(x)]
    dE2 = _scatter(x, dH2, E.shape[0])
    keep = 1.0 if objective == "clean+adv" else 0.0
    lr = worker.LR
    return {
        "loss": loss,
        "delta0": delta,
        "E": E - lr * (keep * dE + dE2),
        "W": W - lr * (keep * dW + dW2),
        "b": b - lr * (keep * db + db2),
    }


def _deltas(result: dict, i: int) -> list[np.ndarray]:
    n = int(result[f"{i}/ndeltas"])
    return [result[f"{i}/delta{j}"] for j in range(n)]


def _trim(delta: np.ndarray, rows: int) -> np.ndarray:
    """JAX's matrix layout pads to N row slots: the slots past the batch's ids are 0."""
    if delta.ndim == 2 and delta.shape[0] > rows:
        assert not delta[rows:].any(), "padding row slots must hold no delta"
        return delta[:rows]
    return delta


@pytest.mark.parametrize("i", range(len(CASES)), ids=[f"{m}-{me}-{'-'.join(k)}" for m, me, k in CASES])
def test_same_delta_and_update_on_every_backend(runs, i: int) -> None:
    mode, method, kwargs = CASES[i]
    rows = len(np.unique(worker.data()["x"]))
    frameworks = list(runs)
    reference = runs[frameworks[0]]
    for name in frameworks[1:]:
        other = runs[name]
        for key in ("loss", "E", "W", "b"):
            np.testing.assert_allclose(other[f"{i}/{key}"], reference[f"{i}/{key}"], err_msg=f"{name} {key}", **TOL)
        mine = [_trim(dl, rows) for dl in _deltas(other, i)]
        theirs = [_trim(dl, rows) for dl in _deltas(reference, i)]
        assert len(mine) == len(theirs), name
        # VAT's directions are gradients of KL(p || p(x + xi d)) near d = 0, where
        # float32 cancellation leaves ~1e-4 differences between frameworks' autodiff;
        # its update agrees within 1e-5 (checked above).
        tol = dict(rtol=0, atol=5e-4) if method == "vat" else TOL
        for a, c in zip(mine, theirs):
            np.testing.assert_allclose(a, c, err_msg=f"{name} delta", **tol)
    # The compiled step (tf.function / jax.jit / torch) updates exactly as the eager one.
    j = i + len(CASES)
    for name in frameworks:
        if name == "torch-adapter":
            continue
        for key in ("loss", "E", "W", "b"):
            np.testing.assert_allclose(runs[name][f"{j}/{key}"], runs[name][f"{i}/{key}"], err_msg=f"{name} compiled {key}", **TOL)
        if name != "torch-adapter":
            assert int(runs[name][f"{j}/steps"]) >= 1  # counted in the compiled step too


@pytest.mark.parametrize("mode", ["output", "matrix"])
@pytest.mark.parametrize("objective", ["clean+adv", "adv"])
def test_fgm_matches_the_hand_computed_step(runs, mode: str, objective: str) -> None:
    i = CASES.index((mode, "fgm", {} if objective == "clean+adv" else {"objective": "adv"}))
    ref = fgm_reference(mode, objective)
    rows = len(np.unique(worker.data()["x"]))
    for name, result in runs.items():
        np.testing.assert_allclose(result[f"{i}/loss"], ref["loss"], err_msg=name, **TOL)
        np.testing.assert_allclose(_trim(result[f"{i}/delta0"], rows), ref["delta0"], err_msg=name, **TOL)
        for key in ("E", "W", "b"):
            np.testing.assert_allclose(result[f"{i}/{key}"], ref[key], err_msg=f"{name} {key}", **TOL)


# Skips the per-backend suite may report, by design, with the backends where they are
# expected: a skip whose reason matches none of these fails test_backend_suite. Every
# skip, expected or not, is shown by test_backend_suite_skips (pytest -ra lists it).
EXPECTED_SKIPS = (
    # keras_backend_cases.py's in-graph assert test: only TensorFlow has one.
    (("jax", "torch"), re.compile(r"an assert inside TensorFlow's compiled graph")),
    # Optional packages of the keras-hub cases.
    (BACKENDS, re.compile(r"could not import 'keras_hub'")),
)
_SKIP_LINE = re.compile(r"^SKIPPED \[(\d+)\] (\S+?):(\d+): (.*)$", re.M)


@functools.lru_cache(maxsize=None)
def _backend_suite(backend: str) -> subprocess.CompletedProcess:
    """keras_backend_cases.py under pytest with KERAS_BACKEND=backend (run once per backend)."""
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider",
         os.path.join(HERE, "keras_backend_cases.py")],
        env=_env(backend), capture_output=True, text=True, timeout=900, cwd=ROOT,
    )  # fmt: skip


def child_skips(output: str) -> list[tuple[int, str, str]]:
    """``(count, location, reason)`` of every SKIPPED line of a child pytest's ``-rs`` summary."""
    return [(int(n), f"{os.path.basename(path)}:{line}", reason) for n, path, line, reason in _SKIP_LINE.findall(output)]


def unexpected_skips(backend: str, skips: list[tuple[int, str, str]]) -> list[tuple[int, str, str]]:
    return [
        skip for skip in skips
        if not any(backend in where and pattern.search(skip[2]) for where, pattern in EXPECTED_SKIPS)
    ]  # fmt: skip


def test_child_skip_parsing() -> None:
    output = (
        "....s..\n=========================== short test summary info ============================\n"
        "SKIPPED [2] tests/keras_backend_cases.py:319: an assert inside TensorFlow's compiled graph\n"
        "SKIPPED [1] tests/keras_backend_cases.py:243: could not import 'keras_hub': No module named 'keras_hub'\n"
        "SKIPPED [1] tests/keras_backend_cases.py:50: something else broke\n"
        "40 passed, 4 skipped in 12.00s\n"
    )
    skips = child_skips(output)
    assert [(n, where) for n, where, _ in skips] == [
        (2, "keras_backend_cases.py:319"), (1, "keras_backend_cases.py:243"), (1, "keras_backend_cases.py:50")
    ]
    assert unexpected_skips("jax", skips) == [skips[2]]
    # On TensorFlow the TF-only test must run: its skip there is unexpected.
    assert unexpected_skips("tensorflow", skips) == [skips[0], skips[2]]


@pytest.mark.parametrize("backend", BACKENDS)
def test_backend_suite(backend: str) -> None:
    """The per-backend suite (keras_backend_cases.py) passes with KERAS_BACKEND=backend,
    and skips nothing but what EXPECTED_SKIPS allows on that backend."""
    if not _available(backend):
        pytest.skip(f"{backend} is not installed")
    proc = _backend_suite(backend)
    tail = proc.stdout[-8000:] + proc.stderr[-3000:]
    assert proc.returncode == 0, tail
    assert re.search(r"\b[1-9]\d* passed", proc.stdout), tail
    unexpected = unexpected_skips(backend, child_skips(proc.stdout))
    assert not unexpected, f"keras_backend_cases.py skipped on {backend}: {unexpected}"


@pytest.mark.parametrize("backend", BACKENDS)
def test_backend_suite_skips(backend: str) -> None:
    """Every skip of the per-backend suite, re-raised here so that it shows in this run."""
    if not _available(backend):
        pytest.skip(f"{backend} is not installed")
    proc = _backend_suite(backend)
    if proc.returncode != 0:
        pytest.skip(f"keras_backend_cases.py failed on {backend}: see test_backend_suite[{backend}]")
    skips = child_skips(proc.stdout)
    if skips:
        pytest.skip(
            f"keras_backend_cases.py with KERAS_BACKEND={backend} skipped {sum(n for n, _, _ in skips)}: "
            + "; ".join(f"{n}x {where} ({reason})" for n, where, reason in skips)
        )


MATRIX_REFERENCE_CASES = [i for i, (mode, method, _) in enumerate(CASES) if mode == "matrix" and method in ("pgd", "freelb", "vat")]


@pytest.mark.parametrize(
    "i", MATRIX_REFERENCE_CASES, ids=[f"{CASES[i][1]}-{'-'.join(CASES[i][2])}" for i in MATRIX_REFERENCE_CASES]
)
def test_matrix_methods_match_the_hand_written_torch_reference(runs, i: int) -> None:
    """Matrix-mode PGD, FreeLB and VAT on every Keras backend (eager and compiled) and
    in advgraph's PyTorch adapter against tests/matrix_reference.py: plain torch, no
    advgraph code, on the worker's weights and batch (VAT: the worker's fixed start
    direction for the touched rows). The cross-framework test above runs the same
    method code on every side; this one would catch a bug in that shared code."""
    torch = pytest.importorskip("torch")
    from matrix_reference import matrix_step

    mode, method, kwargs = CASES[i]
    d = worker.data()
    rows = len(np.unique(d["x"]))
    knobs = {"epsilon": worker.EPS, **kwargs}
    if method == "vat":
        knobs["normal"] = worker.fixed_noise((rows, worker.D), rows)
    if method == "freelb":
        knobs.setdefault("random_init", True)
    ref = matrix_step(d["E"], d["W"], d["b"], d["x"], d["y"], method, dtype=torch.float64, **knobs)
    expected = {key: d[key].astype(np.float64) - worker.LR * ref[f"d{key}"] for key in ("E", "W", "b")}
    # The reference runs in float64; each framework's float32 step differs from it by
    # the float32 rounding of a few passes on weights of size ~1: measured <= 5.7e-7
    # (TensorFlow), <= 1.2e-7 (JAX, torch, the PyTorch adapter), inside 1e-5 + 1e-5
    # relative. Skipping the projection changes the update by 9e-5 (FreeLB, steps=3)
    # and 2.7e-4 (PGD); a wrong row or step size by more.
    checked = []
    for name, result in runs.items():
        for j in (i, i + len(CASES)) if name != "torch-adapter" else (i,):
            np.testing.assert_allclose(result[f"{j}/loss"], ref["loss"], err_msg=f"{name} loss", **TOL)
            for key in ("E", "W", "b"):
                np.testing.assert_allclose(result[f"{j}/{key}"], expected[key], err_msg=f"{name} {key}", **TOL)
            checked.append(name)
    assert "torch-adapter" in checked and len(set(checked)) >= 2, checked
