"""gp, r3f, neftune, smart and awp on the Keras adapter: one step on every Keras backend equals
the step of advgraph's PyTorch adapter (same weights, batch and noise) within 1e-5.

Each backend runs in a subprocess (``_keras_backend_worker.py``, as
``test_keras_backends.py``). The noise of R3F and NEFTune is made deterministic by
replacing the core's ``uniform_like`` in every process with the same fixed numpy
draw (mapped to the range the method asks for), so the frameworks draw the same
``z``; SMART's normal start noise likewise (``normal_like``), and SMART runs two
steps so that its teacher (a momentum copy of the weights) differs from the
weights and the proximal term acts. The compiled step (``tf.function`` / ``jax.jit`` / torch) must update
exactly as the eager one. gp is checked against a step computed by hand in numpy.
"""

from __future__ import annotations

import numpy as np
import pytest

from test_keras_backends import BACKENDS, TOL, _available, _run_worker, worker

SMART = {"steps": 1, "alpha": 0.5, "noise_eps": 0.3, "smart_lambda": 2.0, "smart_mu": 1.0, "smart_beta": 0.5}
AWP = {"adv_lr": 0.5, "adv_eps": 0.05}
CASES = [
    ("output", "gp", {}),
    ("matrix", "gp", {}),
    ("output", "r3f", {"noise_eps": 0.5, "r3f_lambda": 2.0}),
    ("matrix", "r3f", {"noise_eps": 0.5, "r3f_lambda": 2.0}),
    ("output", "neftune", {"neftune_alpha": 5.0}),
    ("output", "smart", SMART),
    ("matrix", "smart", SMART),
    ("output", "awp", AWP),  # target "embedding": the embedding matrix
    ("output", "awp", {**AWP, "target": "", "objective": "clean+adv"}),  # every weight
]
REPEAT = {"smart": 2}  # SMART's proximal term is 0 at the first step (teacher = weights)


def _cases(eager: bool) -> list[dict]:
    return [
        {"mode": m, "method": me, "kwargs": k, "eager": eager, "repeat": REPEAT.get(me, 1)}
        for m, me, k in CASES
    ]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, dict]:
    tmp = tmp_path_factory.mktemp("new-methods")
    results = {}
    for backend in BACKENDS:
        if _available(backend):
            results[backend] = _run_worker("keras", backend, _cases(True) + _cases(False), tmp)
    if not _available("torch"):
        pytest.skip("the PyTorch adapter (the reference) needs torch")
    results["torch-adapter"] = _run_worker("torch-adapter", None, _cases(True), tmp)
    return results


@pytest.mark.parametrize("i", range(len(CASES)), ids=[f"{m}-{me}-{i}" for i, (m, me, _) in enumerate(CASES)])
def test_keras_step_equals_the_pytorch_adapters(runs, i: int) -> None:
    reference = runs["torch-adapter"]
    d = worker.data()
    assert np.abs(reference[f"{i}/W"] - d["W"]).max() > 1e-3  # a real update happened
    for name in BACKENDS:
        if name not in runs:
            continue
        for key in ("loss", "E", "W", "b"):
            np.testing.assert_allclose(runs[name][f"{i}/{key}"], reference[f"{i}/{key}"], err_msg=f"{name} {key}", **TOL)
        j = i + len(CASES)  # the compiled step updates exactly as the eager one
        for key in ("loss", "E", "W", "b"):
            np.testing.assert_allclose(runs[name][f"{j}/{key}"], runs[name][f"{i}/{key}"], err_msg=f"{name} compiled {key}", **TOL)
        counted = REPEAT.get(CASES[i][1], 1) * CASES[i][2].get("steps", 1)  # smart: ascent steps
        assert int(runs[name][f"{i}/steps"]) == int(runs[name][f"{j}/steps"]) == counted


@pytest.mark.parametrize("mode", ["output", "matrix"])
def test_smart_teacher_is_the_momentum_average_of_the_weights(runs, mode: str) -> None:
    """After two steps: theta~ = beta theta_0 + (1 - beta) theta_1 (the first step copied
    theta_0; the second mixed in the weights after one update), eager and compiled."""
    i = CASES.index((mode, "smart", SMART))
    d, beta = worker.data(), SMART["smart_beta"]
    for name in BACKENDS:
        if name not in runs:
            continue
        for k in (i, i + len(CASES)):
            for key in ("E", "W", "b"):
                expected = beta * d[key] + (1 - beta) * runs[name][f"{k}/{key}1"]
                np.testing.assert_allclose(runs[name][f"{k}/t{key}"], expected, err_msg=f"{name} {key}", rtol=1e-6, atol=1e-6)


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


@pytest.mark.parametrize("mode", ["output", "matrix"])
def test_gp_matches_the_hand_computed_step(runs, mode: str) -> None:
    """loss + eps/2 ||dL/de||^2 on mean-pool -> dense -> softmax CE, differentiated by hand.

    With h = mean_L(e), z = hW + b, p = softmax(z): dL/de = (p - y) W^T / (B L) at every
    position, so ||dL/de||^2 = sum_i L ||r_i||^2 / (B L)^2 with r_i = (p_i - y_i) W^T
    (output mode); matrix mode sums the positions of each id first. Its gradient w.r.t.
    W and b goes through p (softmax Jacobian) and directly through W.
    """
    import torch  # the reference's arithmetic (float64), by hand-written formulas

    d = worker.data()
    E = torch.tensor(d["E"], dtype=torch.float64, requires_grad=True)
    W = torch.tensor(d["W"], dtype=torch.float64, requires_grad=True)
    b = torch.tensor(d["b"], dtype=torch.float64, requires_grad=True)
    x, y = torch.from_numpy(d["x"]).long(), torch.from_numpy(d["y"]).long()
    B, L = x.shape
    h = E[x].mean(dim=1)
    p = torch.softmax(h @ W + b, dim=1)
    onehot = torch.nn.functional.one_hot(y, W.shape[1]).double()
    loss = -(onehot * torch.log(p)).sum(dim=1).mean()
    r = (p - onehot) @ W.T / (B * L)  # dL/de at each position of sample i
    if mode == "output":
        sq = L * (r**2).sum()
    else:
        per_pos = r[:, None, :].expand(B, L, r.shape[1]).reshape(-1, r.shape[1])
        rows = torch.zeros(E.shape, dtype=torch.float64).index_add(0, x.reshape(-1), per_pos)
        sq = (rows**2).sum()
    total = loss + worker.EPS / 2 * sq
    gE, gW, gb = torch.autograd.grad(total, [E, W, b])
    expected = {
        "loss": loss.item(),
        "E": d["E"] - worker.LR * gE.numpy(),
        "W": d["W"] - worker.LR * gW.numpy(),
        "b": d["b"] - worker.LR * gb.numpy(),
    }
    i = CASES.index((mode, "gp", {}))
    for name, result in runs.items():
        for key, value in expected.items():
            np.testing.assert_allclose(result[f"{i}/{key}"], value, err_msg=f"{name} {key}", **TOL)
