"""Property tests (hypothesis) of the Keras adapter; weights are compared as bytes.

- One wrapped step leaves exactly the bytes of a reference step: the reference
  installs the delta the adapter installed, runs the adversarial forward/backward
  on an identical plain model, restores by copying and applies the same Keras SGD.
  A restore by subtraction, ((w + d) - d != w in floating point), would break it.
- A frozen matrix (the optimizer never writes it) is bit-identical after compiled,
  XLA-compiled training with repeated ids in the batch: restore is exact.
- When the adversarial forward raises, the matrix (and every weight) is
  bit-identical to before the step, and the model trains normally afterwards.
"""

from __future__ import annotations

import numpy as np
import pytest

from test_keras_support import CLASSES, DIM, LENGTH, VOCAB, compiled, embedding_of, fgm, loss_fn, snapshot

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")
hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from hypothesis.extra import numpy as hnp  # noqa: E402

import advgraph  # noqa: E402
from advgraph.adapters.keras import _tf as keras_site  # noqa: E402

SETTINGS = settings(
    max_examples=8,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

floats32 = st.floats(-3.0, 3.0, width=32)  # includes -0.0 and subnormals


@st.composite
def cases(draw, max_batch: int = 4):
    n = draw(st.integers(1, max_batch))
    vocab = draw(st.integers(2, VOCAB))
    return {
        "E": draw(hnp.arrays(np.float32, (VOCAB, DIM), elements=floats32)),
        "W": draw(hnp.arrays(np.float32, (DIM, CLASSES), elements=floats32)),
        "b": draw(hnp.arrays(np.float32, (CLASSES,), elements=floats32)),
        "x": draw(hnp.arrays(np.int32, (n, LENGTH), elements=st.integers(0, vocab - 1))),
        "y": draw(hnp.arrays(np.int32, (n,), elements=st.integers(0, CLASSES - 1))),
        "eps": draw(st.floats(0.01, 5.0)),
    }


def _build(case) -> keras.Model:
    model = compiled("functional", lr=0.25, run_eagerly=True)
    model.set_weights([case["E"], case["W"], case["b"]])
    return model


@given(case=cases(), mode=st.sampled_from(["matrix", "output"]), objective=st.sampled_from(["adv", "clean+adv"]))
@SETTINGS
def test_step_leaves_the_bytes_of_the_reference_step(case, mode, objective, monkeypatch) -> None:
    x, y, eps = case["x"], case["y"], case["eps"]
    installed = []
    site_cls = keras_site.MatrixSite if mode == "matrix" else keras_site.OutputSite
    original = site_cls.set_delta

    def set_delta(self, delta):
        original(self, delta)
        if mode == "output":
            installed.append(delta.numpy())
            return
        matrix = self.variable.numpy().copy()
        if self.rows_delta is not None:  # added at the lookup's output: the matrix it reads
            ids, seg = self._ids.numpy(), self._seg.numpy()
            matrix[ids] = matrix[ids] + self.rows_delta.numpy()[seg]
        installed.append(matrix)

    monkeypatch.setattr(site_cls, "set_delta", set_delta)
    wrapped = advgraph.wrap(_build(case), mode=mode, epsilon=eps, objective=objective)
    wrapped.train_on_batch(x, y)
    assert len(installed) == 1

    ref = _build(case)
    emb, pool, dense = (ref.get_layer(n) for n in ("Embedding-Token", "pool", "dense"))
    variables = ref.trainable_variables

    def loss_with(delta=None):
        h = emb(x, training=True)
        if delta is not None:
            h = h + delta
        return loss_fn()(y, dense(pool(h)))

    with tf.GradientTape() as tape:
        h = emb(x, training=True)
        tape.watch(h)
        clean = loss_fn()(y, dense(pool(h)))
    g_h, *clean_grads = tape.gradient(clean, [h, *variables])
    with tf.GradientTape() as tape:
        if mode == "matrix":
            emb.embeddings.assign(installed[0])  # the matrix the adapter's forward saw
            adv = loss_with()
        else:
            adv = loss_with(installed[0])
    adv_grads = tape.gradient(adv, variables)
    if mode == "matrix":
        emb.embeddings.assign(case["E"])
        delta = installed[0].astype(np.float64) - case["E"]
        expected = fgm(tf.convert_to_tensor(clean_grads[0]).numpy(), eps, per_sample=False)
    else:
        delta, expected = installed[0], fgm(g_h.numpy(), eps, per_sample=True)
    np.testing.assert_allclose(delta, expected, rtol=1e-4, atol=1e-5 * max(1.0, eps))
    grads = adv_grads
    if objective == "clean+adv":  # the adapter's sum: sparse gradients concatenated
        grads = [keras_site.add_grads(c, a) for c, a in zip(clean_grads, adv_grads)]
    ref.optimizer.apply_gradients(zip(grads, variables))
    assert snapshot(wrapped) == snapshot(ref)


@pytest.fixture(scope="module")
def frozen_xla_model():
    model = compiled("functional", lr=0.25, jit_compile=True)
    embedding_of(model).trainable = False
    model.compile(optimizer=keras.optimizers.SGD(0.25), loss=loss_fn(), jit_compile=True)
    return advgraph.wrap(model, mode="matrix", epsilon=1.5)


@given(
    E=hnp.arrays(np.float32, (VOCAB, DIM), elements=floats32),
    x=hnp.arrays(np.int32, (4, LENGTH), elements=st.integers(0, 3)),  # many repeats
    y=hnp.arrays(np.int32, (4,), elements=st.integers(0, CLASSES - 1)),
)
@SETTINGS
def test_frozen_matrix_is_bit_identical_after_xla_training(frozen_xla_model, E, x, y) -> None:
    model = frozen_xla_model
    emb = embedding_of(model)
    emb.embeddings.assign(E)
    before = emb.embeddings.numpy().tobytes()
    steps = model.advgraph_stats["steps"]
    model.fit(np.concatenate([x, x]), np.concatenate([y, y]), batch_size=4, shuffle=False, verbose=0)
    assert emb.embeddings.numpy().tobytes() == before
    assert model.advgraph_stats["steps"] == steps + 2


class Bomb(keras.layers.Layer):
    """Identity; raises in the second training call of a step when armed."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.armed = False
        self.calls = 0

    def call(self, h, training=None):
        if training:
            self.calls += 1
            if self.armed and self.calls % 2 == 0:
                raise RuntimeError("boom in the adversarial forward")
        return h


@given(case=cases(), mode=st.sampled_from(["matrix", "output"]))
@SETTINGS
def test_restore_is_exact_when_the_adversarial_forward_raises(case, mode) -> None:
    tokens = keras.Input((LENGTH,), dtype="int32")
    emb = keras.layers.Embedding(VOCAB, DIM)
    bomb = Bomb()
    out = keras.layers.Dense(CLASSES)(keras.layers.GlobalAveragePooling1D()(bomb(emb(tokens))))
    model = keras.Model(tokens, out)
    model.compile(optimizer=keras.optimizers.SGD(0.25), loss=loss_fn(), run_eagerly=True)
    model.set_weights([case["E"], case["W"], case["b"]])
    wrapped = advgraph.wrap(model, mode=mode, epsilon=case["eps"])
    x, y = case["x"], case["y"]
    predicted = wrapped.predict(x, verbose=0)
    before = snapshot(wrapped)
    bomb.armed = True
    with pytest.raises(RuntimeError, match="boom"):
        wrapped.train_on_batch(x, y)
    assert bomb.calls == 2
    assert emb.embeddings.numpy().tobytes() == case["E"].tobytes()
    assert snapshot(wrapped) == before
    assert wrapped.predict(x, verbose=0).tobytes() == predicted.tobytes()
    bomb.armed = False
    wrapped.train_on_batch(x, y)
    assert np.isfinite(emb.embeddings.numpy()).all()
