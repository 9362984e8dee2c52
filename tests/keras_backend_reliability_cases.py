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


def build(seed: int = 0, run_eagerly: bool = BACKEND == "tensorflow") -> tuple[keras.Model, Tap]:
    keras.utils.set_random_seed(seed)
    inp = keras.Input((L,), dtype="int32")
    tap = Tap(name="tap")
    h = tap(keras.layers.Embedding(V, D, name="emb")(inp))
    out = keras.layers.Dense(C, name="fc")(keras.layers.GlobalAveragePooling1D()(h))
    model = keras.Model(inp, out)
    model.compile(
        optimizer=keras.optimizers.SGD(0.1),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        run_eagerly=run_eagerly,
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


# -- KeyboardInterrupt inside the adversarial pass ---------------------------------------

FAULT_CASES = [
    ("output", "fgm", {}, 2),
    ("matrix", "fgm", {}, 2),
    ("output", "pgd", {"steps": 2}, 2),
    ("output", "pgd", {"steps": 2}, 3),
    ("matrix", "pgd", {"steps": 2}, 3),
    ("output", "awp", {"target": "", "adv_lr": 0.5, "adv_eps": 0.5}, 2),
]


def _wrap_for_fault(model, mode: str, method: str, kwargs: dict):
    if method == "awp":
        return advgraph.wrap(model, method="awp", **kwargs)
    return advgraph.wrap(model, mode=mode, method=method, epsilon=EPS, **kwargs)


def _assert_usable(wrapped, model, tap: Tap, before: list[bytes], x, y) -> None:
    """Disarmed, the same wrapped model trains on and evaluates."""
    tap.armed_at = None
    steps = dict(wrapped.advgraph_stats)["steps"]
    history = wrapped.fit(x, y, batch_size=B, epochs=2, shuffle=False, verbose=0)
    assert np.isfinite(history.history["loss"]).all()
    assert dict(wrapped.advgraph_stats)["steps"] > steps
    after = all_bytes(model)
    assert after != before
    assert all(np.isfinite(np.frombuffer(b, np.float32)).all() for b in after)
    assert np.isfinite(wrapped.evaluate(x, y, verbose=0))


# JAX: Keras' own fit() (keras/src/backend/jax/trainer.py) purges the model's
# variables when it fetches the state at the first step of an epoch and writes them
# back only from the state of a completed step: an exception inside the *first* step
# of a fit() leaves the variables empty (plain Keras does the same, without
# advgraph), so on JAX the interrupt comes in the second step.
STEPS_BEFORE = (1,) if BACKEND == "jax" else (0, 1)


@pytest.mark.parametrize("steps_before", STEPS_BEFORE)
@pytest.mark.parametrize("mode, method, kwargs, k", FAULT_CASES, ids=[f"{m}-{me}-call{k}" for m, me, _, k in FAULT_CASES])
def test_keyboard_interrupt_in_the_adversarial_pass_restores_every_weight(mode, method, kwargs, k, steps_before) -> None:
    """fit() interrupted by KeyboardInterrupt in the k-th forward (k >= 2: an
    adversarial forward, δ or the weight perturbation installed) of the step after
    ``steps_before`` completed steps. The step runs eagerly here (TensorFlow and JAX
    with run_eagerly=True; torch), so the interrupt comes at run time, in the middle
    of a step whose earlier passes have run. Every weight must be byte-identical to an
    identical model that ran only the completed steps."""
    x, y = data()
    half = B // 2
    passes = 3 if method == "pgd" else 2  # forwards per step: fgm/awp 2, pgd(steps=2) 3
    reference, _ = build(run_eagerly=BACKEND in ("tensorflow", "jax"))
    reference = _wrap_for_fault(reference, mode, method, kwargs)
    model, tap = build(run_eagerly=BACKEND in ("tensorflow", "jax"))
    wrapped = _wrap_for_fault(model, mode, method, kwargs)
    assert all_bytes(model) == all_bytes(reference)
    if steps_before:
        reference.fit(x[:half], y[:half], batch_size=half, shuffle=False, verbose=0)
    expected = all_bytes(reference)
    tap.calls, tap.armed_at = 0, steps_before * passes + k
    with pytest.raises(KeyboardInterrupt, match="adversarial pass"):
        wrapped.fit(x, y, batch_size=half if steps_before else B, shuffle=False, verbose=0)
    assert tap.calls == steps_before * passes + k
    assert all_bytes(model) == expected
    _assert_usable(wrapped, model, tap, expected, x, y)


if BACKEND == "tensorflow":

    @pytest.mark.parametrize("mode, method, kwargs, k", FAULT_CASES, ids=[f"{m}-{me}-call{k}" for m, me, _, k in FAULT_CASES])
    def test_tf_interrupt_inside_the_compiled_step_restores_every_weight(mode, method, kwargs, k) -> None:
        """The compiled step (tf.function, run_eagerly=False): a KeyboardInterrupt in a
        py_function that runs after the perturbed lookup of the k-th forward. TensorFlow
        turns it into an op error (UnknownError); no Python ``finally`` runs inside the
        graph, so whatever advgraph wrote must not outlive the failed step."""
        import tensorflow as tf

        class GraphBomb(keras.layers.Layer):
            def __init__(self) -> None:
                super().__init__()
                self.calls, self.armed_at = 0, None

            def _maybe(self, total):
                self.calls += 1
                if self.armed_at is not None and self.calls == self.armed_at:
                    raise KeyboardInterrupt("interrupted inside the compiled adversarial pass")
                return total

            def call(self, h, training=None):
                if training:
                    done = tf.py_function(self._maybe, [tf.reduce_sum(h)], Tout=tf.float32)
                    with tf.control_dependencies([done]):
                        return tf.identity(h)
                return h

        keras.utils.set_random_seed(0)
        inp = keras.Input((L,), dtype="int32")
        bomb = GraphBomb()
        out = keras.layers.Dense(C)(keras.layers.GlobalAveragePooling1D()(bomb(keras.layers.Embedding(V, D, name="emb")(inp))))
        model = keras.Model(inp, out)
        model.compile(optimizer=keras.optimizers.SGD(0.1), jit_compile=False,
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        x, y = data()
        wrapped = _wrap_for_fault(model, mode, method, kwargs)
        wrapped.fit(x, y, batch_size=B, verbose=0)
        before = all_bytes(model)
        bomb.calls, bomb.armed_at = 0, k
        with pytest.raises((KeyboardInterrupt, tf.errors.UnknownError), match="interrupted inside"):
            wrapped.fit(x, y, batch_size=B, verbose=0)
        assert bomb.calls == k
        assert all_bytes(model) == before
        bomb.armed_at = None
        history = wrapped.fit(x, y, batch_size=B, epochs=2, shuffle=False, verbose=0)
        assert np.isfinite(history.history["loss"]).all()
        assert all_bytes(model) != before
