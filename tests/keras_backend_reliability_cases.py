"""Keras adapter reliability on the active backend: δ under bad gradients, and a
KeyboardInterrupt inside the adversarial pass. Run per backend (in a subprocess,
the backend is fixed per process) by ``test_keras_backends_reliability.py``.

Run directly: ``KERAS_BACKEND=jax python -m pytest -q tests/keras_backend_reliability_cases.py``.

δ is read from what the model sees: a ``Tap`` layer right after the embedding
records its input on every training forward (eagerly on TensorFlow with
``run_eagerly=True`` and on torch; through ``jax.debug.callback`` inside the jitted
step on JAX). The clean pass sees ``E[x]``, the adversarial pass ``E[x] + δ``
(output mode) or ``(E + δ)[x]`` (matrix mode). A sample's gradient is made NaN, inf
or zero by its ``sample_weight`` (the model mixes no samples). The reference δ of a
healthy sample is written by hand in numpy from the model's weights.
"""

from __future__ import annotations

import os
import warnings

import numpy as np
import pytest

if os.environ.get("KERAS_BACKEND") == "torch":
    import torch  # noqa: F401  (before tensorflow, see conftest)

keras = pytest.importorskip("keras")

import advgraph  # noqa: E402

BACKEND = keras.backend.backend()
V, D, C, L, B = 17, 6, 3, 5, 4
EPS = 0.7
POISONED = 2
BAD = {"nan": np.nan, "inf": np.inf, "-inf": -np.inf, "zero": 0.0}


class Tap(keras.layers.Layer):
    """Identity; records its input on every training call, in call order."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.seen: list[np.ndarray] = []
        self.armed_at: int | None = None  # raise KeyboardInterrupt on this call
        self.calls = 0

    def _record(self, value) -> None:
        self.seen.append(np.array(value, copy=True))

    def call(self, h, training=None):
        if training:
            if BACKEND == "jax":
                import jax

                jax.debug.callback(self._record, h, ordered=True)
            else:
                self._record(keras.ops.convert_to_numpy(h))
            self.calls += 1
            if self.armed_at is not None and self.calls == self.armed_at:
                raise KeyboardInterrupt("interrupted inside the adversarial pass")
        return h


def build(seed: int = 0) -> tuple[keras.Model, Tap]:
    keras.utils.set_random_seed(seed)
    inp = keras.Input((L,), dtype="int32")
    tap = Tap(name="tap")
    h = tap(keras.layers.Embedding(V, D, name="emb")(inp))
    out = keras.layers.Dense(C, name="fc")(keras.layers.GlobalAveragePooling1D()(h))
    model = keras.Model(inp, out)
    model.compile(
        optimizer=keras.optimizers.SGD(0.1),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        run_eagerly=BACKEND == "tensorflow",
    )
    return model, tap


def data(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.integers(0, V, (B, L)).astype("int32")
    x[:, 0] = 3  # a row shared by every sample
    return x, rng.integers(0, C, B).astype("int32")


def weights(bad: float, which: str) -> np.ndarray:
    w = np.ones(B, np.float32)
    if which == "all":
        w[:] = bad
    else:
        w[POISONED] = bad
    return w


def all_bytes(model: keras.Model) -> list[bytes]:
    return [np.asarray(keras.ops.convert_to_numpy(w)).tobytes() for w in model.weights]


def reference_direction(model: keras.Model, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """dL_c/dh_c (B, L, D) up to a positive per-sample factor, by hand:
    h -> mean over L -> dense -> softmax CE gives (p_c - onehot(y_c)) W^T / L at every position."""
    E = np.asarray(model.get_layer("emb").get_weights()[0], np.float64)
    W, b = (np.asarray(a, np.float64) for a in model.get_layer("fc").get_weights())
    z = E[x].mean(axis=1) @ W + b
    p = np.exp(z - z.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    p[np.arange(B), y] -= 1.0
    return np.repeat((p @ W.T)[:, None, :] / L, L, axis=1)


def step(model, x, y, sw, expect_warning: bool) -> None:
    """One fit() step (fit, not train_on_batch: fit is where skips are warned about)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.fit(x, y, sample_weight=sw, batch_size=B, shuffle=False, verbose=0)
    warned = [c for c in caught if issubclass(c.category, advgraph.AdvGraphWarning)]
    assert bool(warned) == expect_warning, [str(c.message) for c in caught]


def clean_and_adversarial(tap: Tap) -> tuple[np.ndarray, np.ndarray]:
    if BACKEND == "jax":
        import jax

        jax.effects_barrier()
    assert len(tap.seen) == 2, f"FGM: one clean and one adversarial forward, got {len(tap.seen)}"
    clean, adv = tap.seen
    assert clean.shape == adv.shape == (B, L, D)
    return clean, adv


@pytest.mark.parametrize("mode", ["output", "matrix"])
@pytest.mark.parametrize("bad", list(BAD))
def test_whole_batch_bad_gradient_gives_exactly_zero_delta(mode: str, bad: str) -> None:
    model, tap = build()
    x, y = data()
    wrapped = advgraph.wrap(model, mode=mode, epsilon=EPS)
    step(wrapped, x, y, weights(BAD[bad], "all"), expect_warning=True)
    clean, adv = clean_and_adversarial(tap)
    assert np.isfinite(adv).all()
    assert adv.tobytes() == clean.tobytes()  # δ = 0 exactly
    stats = dict(wrapped.advgraph_stats)
    key = "skipped_zero" if bad == "zero" else "skipped_nonfinite"
    assert stats["steps"] == 1 and stats[key] == 1, stats


@pytest.mark.parametrize("bad", list(BAD))
def test_output_mode_skips_only_the_poisoned_sample(bad: str) -> None:
    model, tap = build()
    x, y = data()
    direction = reference_direction(model, x, y)
    wrapped = advgraph.wrap(model, mode="output", epsilon=EPS)
    step(wrapped, x, y, weights(BAD[bad], "one"), expect_warning=True)
    clean, adv = clean_and_adversarial(tap)
    delta = adv.astype(np.float64) - clean
    assert np.isfinite(delta).all()
    assert adv[POISONED].tobytes() == clean[POISONED].tobytes()
    for c in range(B):
        if c == POISONED:
            continue
        # ‖δ_c‖ = ε; (h + δ) - h in float32 is off by ~ulp(|h|) ~ 1e-8 per entry.
        assert abs(np.linalg.norm(delta[c]) - EPS) < 1e-5
        expected = EPS * direction[c] / np.linalg.norm(direction[c])
        np.testing.assert_allclose(delta[c], expected, rtol=0, atol=1e-5)
    stats = dict(wrapped.advgraph_stats)
    key = "skipped_zero" if bad == "zero" else "skipped_nonfinite"
    assert stats["steps"] == 1 and stats[key] == 1, stats


@pytest.mark.parametrize("bad", ["nan", "inf", "-inf"])
def test_matrix_mode_nonfinite_sample_skips_the_global_delta(bad: str) -> None:
    model, tap = build()
    x, y = data()
    wrapped = advgraph.wrap(model, mode="matrix", epsilon=EPS)
    step(wrapped, x, y, weights(BAD[bad], "one"), expect_warning=True)
    clean, adv = clean_and_adversarial(tap)
    assert adv.tobytes() == clean.tobytes()
    assert dict(wrapped.advgraph_stats)["skipped_nonfinite"] == 1


def test_matrix_mode_zero_gradient_sample_keeps_the_global_delta() -> None:
    model, tap = build()
    x, y = data()
    w = weights(0.0, "one")
    g = reference_direction(model, x, y) * w[:, None, None]
    g_rows = np.zeros((V, D))
    np.add.at(g_rows, x.reshape(-1), g.reshape(-1, D))
    ids = np.unique(x)
    wrapped = advgraph.wrap(model, mode="matrix", epsilon=EPS)
    step(wrapped, x, y, w, expect_warning=False)
    clean, adv = clean_and_adversarial(tap)
    delta = adv.astype(np.float64) - clean
    rows = np.stack([delta[tuple(np.argwhere(x == i)[0])] for i in ids])
    expected = EPS * g_rows[ids] / np.linalg.norm(g_rows[ids])
    np.testing.assert_allclose(rows, expected, rtol=0, atol=1e-5)
    assert dict(wrapped.advgraph_stats)["skipped_zero"] == 0
