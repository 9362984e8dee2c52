"""The same weights and batch in PyTorch and Keras: the same FGM (FGSM, PGD) step.

Model: embedding -> mean over the sequence -> dense, plain SGD, one adversarial
step through each framework's public API (``wrapped.adversarial_step`` +
``optimizer.step()`` in PyTorch; ``train_on_batch`` of the wrapped Keras model).
The clean loss, delta and the updated weights agree within 1e-5, and delta agrees
with the formula computed by hand from the clean gradient.

delta is observed without any debugging API: both adapters compute it with the
shared core (``advgraph.methods._common.compute_delta``), which this test spies on; in
mode='matrix' the installed delta is read from the embedding matrix during the
adversarial forward (the matrix minus its clean value), the same in both frameworks.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")  # torch before tensorflow (see tests/conftest.py)

from test_keras_support import LENGTH, batch, compiled, embedding_of, fgm, weights  # noqa: E402

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")

import advgraph  # noqa: E402
import advgraph.methods._common as methods  # noqa: E402
from advgraph.adapters.keras import _tf as keras_site  # noqa: E402

LR = 0.3
EPS = 0.6
TOL = dict(rtol=1e-5, atol=1e-5)


class TorchMeanPool(torch.nn.Module):
    def __init__(self, w: dict[str, np.ndarray]) -> None:
        super().__init__()
        vocab, dim = w["E"].shape
        self.emb = torch.nn.Embedding(vocab, dim)
        self.fc = torch.nn.Linear(dim, w["W"].shape[1])
        with torch.no_grad():
            self.emb.weight.copy_(torch.from_numpy(w["E"]))
            self.fc.weight.copy_(torch.from_numpy(w["W"].T.copy()))
            self.fc.bias.copy_(torch.from_numpy(w["b"]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.emb(x).mean(dim=1))


@pytest.fixture
def deltas(monkeypatch: pytest.MonkeyPatch) -> list[np.ndarray]:
    """Every delta the core computes during the test, as numpy arrays."""
    seen: list[np.ndarray] = []
    original = methods.compute_delta

    def spy(*args, **kwargs):
        result = original(*args, **kwargs)
        delta = result.delta
        seen.append(delta.detach().numpy() if isinstance(delta, torch.Tensor) else delta.numpy())
        return result

    monkeypatch.setattr(methods, "compute_delta", spy)
    return seen


def torch_step(w, x, y, mode: str, method: str, kwargs: dict):
    model = TorchMeanPool(w)
    wrapped = advgraph.wrap(model, mode=mode, method=method, epsilon=EPS, **kwargs)
    optimizer = torch.optim.SGD(wrapped.parameters(), lr=LR)
    xt, yt = torch.from_numpy(x).long(), torch.from_numpy(y).long()
    matrices = []

    def closure():
        matrices.append(model.emb.weight.detach().numpy().copy())  # as the forward sees it
        return torch.nn.functional.cross_entropy(wrapped(xt), yt)

    optimizer.zero_grad()
    loss = wrapped.adversarial_step(closure)
    optimizer.step()
    updated = {
        "E": model.emb.weight.detach().numpy(),
        "W": model.fc.weight.detach().numpy().T,
        "b": model.fc.bias.detach().numpy(),
    }
    return float(loss), matrices, updated


def keras_step(w, x, y, mode: str, method: str, kwargs: dict, monkeypatch: pytest.MonkeyPatch):
    # run_eagerly: the spies below see concrete values (the math is the same compiled).
    model = compiled("functional", lr=LR, seed=0, run_eagerly=True)
    model.set_weights([w["E"], w["W"], w["b"]])
    wrapped = advgraph.wrap(model, mode=mode, method=method, epsilon=EPS, **kwargs)
    matrices = []
    original = keras_site.MatrixSite.set_delta

    def set_delta(self, delta):
        original(self, delta)
        matrix = self.variable.numpy().copy()
        if self.rows_delta is not None:  # added at the lookup's output: the matrix it reads
            ids, seg = self._ids.numpy(), self._seg.numpy()
            matrix[ids] = matrix[ids] + self.rows_delta.numpy()[seg]
        matrices.append(matrix)

    monkeypatch.setattr(keras_site.MatrixSite, "set_delta", set_delta)
    logs = wrapped.train_on_batch(x, y, return_dict=True)
    emb = embedding_of(wrapped)
    updated = {
        "E": emb.embeddings.numpy(),
        "W": wrapped.get_layer("dense").kernel.numpy(),
        "b": wrapped.get_layer("dense").bias.numpy(),
    }
    return float(logs["loss"]), matrices, updated


def clean_gradients(w, x, y):
    """dL/dE (dense) and dL/dh by hand (TensorFlow ops, no Keras layers)."""
    E = tf.Variable(w["E"])
    with tf.GradientTape() as tape:
        h = tf.gather(E, x)
        tape.watch(h)
        logits = tf.matmul(tf.reduce_mean(h, axis=1), w["W"]) + w["b"]
        loss = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(y, logits))
    g_h, g_E = tape.gradient(loss, [h, E])
    return float(loss), tf.convert_to_tensor(g_E).numpy(), g_h.numpy()


@pytest.mark.parametrize(
    "method, kwargs",
    [
        ("fgm", {}),
        ("fgm", {"objective": "adv"}),
        ("fgsm", {}),
        ("pgd", {"steps": 2, "alpha": 0.4}),
    ],
)
@pytest.mark.parametrize("mode", ["output", "matrix"])
def test_one_step_agrees_across_frameworks(mode, method, kwargs, deltas, monkeypatch) -> None:
    pytest.importorskip("advgraph.adapters.torch")
    w = weights(seed=5)
    x, y = batch(seed=5, n=6)
    assert len(np.unique(x)) < x.size  # repeated ids: the matrix rows are shared
    loss_ref, g_E, g_h = clean_gradients(w, x, y)

    t_loss, t_matrices, t_updated = torch_step(w, x, y, mode, method, kwargs)
    t_deltas = list(deltas)
    deltas.clear()
    k_loss, k_matrices, k_updated = keras_step(w, x, y, mode, method, kwargs, monkeypatch)
    k_deltas = list(deltas)

    assert t_loss == pytest.approx(loss_ref, rel=1e-5)
    assert k_loss == pytest.approx(loss_ref, rel=1e-5)
    # The core's directions (one per delta computation) agree pass by pass.
    assert len(t_deltas) == len(k_deltas) == kwargs.get("steps", 1)
    for t_delta, k_delta in zip(t_deltas, k_deltas):
        assert t_delta.shape == k_delta.shape
        np.testing.assert_allclose(t_delta, k_delta, **TOL)
    g = g_h if mode == "output" else g_E
    if method == "fgsm":
        expected = EPS * np.sign(g)
    else:
        expected = fgm(g, EPS, per_sample=mode == "output")
    if mode == "output":
        if method != "pgd":
            np.testing.assert_allclose(k_deltas[0], expected, **TOL)
    else:
        # The matrix as each adversarial forward saw it, minus the clean matrix.
        t_installed = [m - t_matrices[0] for m in t_matrices[1:]]
        k_installed = [m - w["E"] for m in k_matrices]
        assert len(t_installed) == len(k_installed) == kwargs.get("steps", 1)
        for t_delta, k_delta in zip(t_installed, k_installed):
            np.testing.assert_allclose(t_delta, k_delta, **TOL)
        untouched = np.setdiff1d(np.arange(w["E"].shape[0]), x)
        assert not k_installed[-1][untouched].any()
        if method != "pgd":
            np.testing.assert_allclose(k_installed[0], expected, **TOL)
        if method == "fgm":
            assert np.linalg.norm(k_installed[0]) == pytest.approx(EPS, rel=1e-5)
    for key in ("E", "W", "b"):
        np.testing.assert_allclose(k_updated[key], t_updated[key], err_msg=key, **TOL)
    assert np.abs(k_updated["W"] - w["W"]).max() > 1e-3  # a real update happened
