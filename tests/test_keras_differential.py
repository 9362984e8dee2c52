"""Differential tests: the Keras adapter against a hand-written reference of the formula.

The reference is the seed's recipe written out with ``tf.GradientTape`` and plain
TensorFlow ops (no Keras layers, no advgraph): g = dL/dE (or dL/dh for the output
mode), delta = eps * g / ||g||, the adversarial forward/backward with delta
installed, then plain SGD. ``objective="adv"`` updates with the adversarial
gradient only (the seed's Keras recipe); ``"clean+adv"`` with the sum.
"""

from __future__ import annotations

import numpy as np
import pytest

from test_keras_support import batch, compiled, embedding_of, fgm, loss_fn, weights

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")

import advgraph  # noqa: E402

LR = 0.5
STEPS = 5
BATCH = 4


def reference_training(
    w: dict[str, np.ndarray], x: np.ndarray, y: np.ndarray, *, mode: str, objective: str, epsilon: float
) -> dict[str, np.ndarray]:
    """STEPS steps of the seed's formula on embedding -> mean -> dense, by hand."""
    E, W, b = (tf.Variable(w[k]) for k in ("E", "W", "b"))

    def loss_of(ids: tf.Tensor, labels: tf.Tensor, h: tf.Tensor) -> tf.Tensor:
        logits = tf.matmul(tf.reduce_mean(h, axis=1), W) + b
        return tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(labels, logits))

    for step in range(STEPS):
        ids = tf.constant(x[step * BATCH : (step + 1) * BATCH])
        labels = tf.constant(y[step * BATCH : (step + 1) * BATCH])
        with tf.GradientTape() as tape:
            h = tf.gather(E, ids)
            tape.watch(h)
            clean = loss_of(ids, labels, h)
        g_h, *clean_grads = tape.gradient(clean, [h, E, W, b])
        if mode == "matrix":
            g = tf.convert_to_tensor(clean_grads[0]).numpy()  # dL/dE, dense (V, d)
            delta = fgm(g, epsilon, per_sample=False).astype(np.float32)
            saved = E.numpy()
            E.assign(saved + delta)
            with tf.GradientTape() as tape:
                adv = loss_of(ids, labels, tf.gather(E, ids))
            adv_grads = tape.gradient(adv, [E, W, b])
            E.assign(saved)  # restore by copying
        else:
            delta = fgm(g_h.numpy(), epsilon, per_sample=True).astype(np.float32)
            with tf.GradientTape() as tape:
                adv = loss_of(ids, labels, tf.gather(E, ids) + delta)
            adv_grads = tape.gradient(adv, [E, W, b])
        for var, ga, gc in zip((E, W, b), adv_grads, clean_grads):
            update = tf.convert_to_tensor(ga)
            if objective == "clean+adv":
                update = update + tf.convert_to_tensor(gc)
            var.assign_sub(LR * update)
    return {"E": E.numpy(), "W": W.numpy(), "b": b.numpy()}


@pytest.mark.parametrize(
    "mode, objective, jit_compile, steps_per_execution",
    [
        ("matrix", "adv", False, 1),  # the seed's recipe exactly
        ("matrix", "clean+adv", True, 2),
        ("output", "clean+adv", False, 1),
        ("output", "adv", True, 3),
    ],
)
def test_fit_matches_reference(mode: str, objective: str, jit_compile: bool, steps_per_execution: int) -> None:
    w = weights(seed=3)
    x, y = batch(seed=3, n=STEPS * BATCH)
    eps = 0.7
    expected = reference_training(w, x, y, mode=mode, objective=objective, epsilon=eps)
    model = compiled(
        "functional", lr=LR, seed=3, jit_compile=jit_compile, steps_per_execution=steps_per_execution
    )
    wrapped = advgraph.wrap(model, mode=mode, epsilon=eps, objective=objective)
    plain = compiled("functional", lr=LR, seed=3)
    wrapped.fit(x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0)
    plain.fit(x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0)
    got = {
        "E": embedding_of(wrapped).embeddings.numpy(),
        "W": wrapped.get_layer("dense").kernel.numpy(),
        "b": wrapped.get_layer("dense").bias.numpy(),
    }
    for key in ("E", "W", "b"):
        np.testing.assert_allclose(got[key], expected[key], rtol=1e-5, atol=1e-6, err_msg=key)
    # ... and it is not plain training (the test would fail if wrap() did nothing).
    assert np.abs(plain.get_layer("dense").kernel.numpy() - expected["W"]).max() > 1e-3
    assert wrapped.advgraph_stats["steps"] == STEPS


@pytest.mark.parametrize("method, kwargs", [("fgsm", {}), ("pgd", {"steps": 2})])
def test_xla_static_rows_match_graph_mode(method: str, kwargs: dict) -> None:
    """Under XLA the matrix site pads its rows to a static N; deltas must not change."""
    x, y = batch(seed=4, n=8)
    results = []
    for jit_compile in (False, True):
        model = compiled("functional", lr=LR, seed=4, jit_compile=jit_compile)
        wrapped = advgraph.wrap(model, mode="matrix", method=method, epsilon=0.7, **kwargs)
        wrapped.fit(x, y, batch_size=4, epochs=1, shuffle=False, verbose=0)
        results.append([v.numpy() for v in wrapped.weights])
    for graph, xla in zip(*results):
        np.testing.assert_allclose(xla, graph, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mode", ["matrix", "output"])
@pytest.mark.parametrize("objective", ["adv", "clean+adv"])
def test_vanishing_epsilon_reduces_to_keras_train_step(mode: str, objective: str) -> None:
    """epsilon -> 0: the adversarial pass is the clean pass again, so the wrapped step is
    Keras' own train_step (objective='adv'), or it with the gradient counted twice
    (objective='clean+adv', i.e. twice the learning rate). Regularisation losses
    (activity and kernel) and metrics go through the same compute_loss."""

    def build(lr: float) -> keras.Model:
        tokens = keras.Input((5,), dtype="int32")
        emb = keras.layers.Embedding(
            13, 4, activity_regularizer=keras.regularizers.L2(0.1),
            embeddings_initializer=keras.initializers.RandomNormal(seed=1),
        )
        h = keras.layers.GlobalAveragePooling1D()(emb(tokens))
        dense = keras.layers.Dense(
            3, kernel_regularizer=keras.regularizers.L2(0.5),
            kernel_initializer=keras.initializers.GlorotUniform(seed=2),
        )
        model = keras.Model(tokens, dense(h))
        model.compile(optimizer=keras.optimizers.SGD(lr), loss=loss_fn(), metrics=["accuracy"])
        return model

    x, y = batch(seed=6, n=6)
    y = y % 3
    plain = build(0.2 if objective == "adv" else 0.4)
    wrapped = advgraph.wrap(build(0.2), mode=mode, epsilon=1e-12, objective=objective)
    for _ in range(3):
        expected = plain.train_on_batch(x, y, return_dict=True)
        got = wrapped.train_on_batch(x, y, return_dict=True)
        assert got["loss"] == pytest.approx(expected["loss"], rel=1e-6)
        assert got["accuracy"] == expected["accuracy"]
    for a, b in zip(plain.weights, wrapped.weights):
        np.testing.assert_allclose(b.numpy(), a.numpy(), rtol=1e-6, atol=1e-7)
