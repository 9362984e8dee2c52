"""``start``, schedules and a user's own ``train_step`` on the active Keras backend.

Run per backend by ``test_keras_schedules.py`` (``KERAS_BACKEND`` is fixed per
process); directly: ``KERAS_BACKEND=jax python -m pytest -q tests/keras_schedule_cases.py``.

The reference is a hand-written loop in numpy (float64): the model is
ids -> Embedding -> mean over the sequence -> Dense -> softmax cross-entropy with
plain SGD, so its gradients are written out by hand; a step before ``start`` is a
plain SGD step, a step from it on is FGM in output mode (per-sample l2 delta of
size eps(step) from the clean gradient at the embedding output; clean + adversarial
gradients summed). Tolerance: float32 (Keras) against float64 (numpy) over at most
six SGD steps of a model of ~100 weights of order 1: rounding stays below 1e-5.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

if os.environ.get("KERAS_BACKEND") == "torch":
    import torch  # noqa: F401  (before tensorflow, see conftest)

keras = pytest.importorskip("keras")

import advgraph  # noqa: E402
import advgraph.keras  # noqa: E402
from advgraph import methods  # noqa: E402

BACKEND = keras.backend.backend()
V, D, C, B, L = 13, 5, 3, 4, 6
LR, EPS = 0.3, 0.6
TOL = dict(rtol=1e-5, atol=1e-5)


def weights0():
    rng = np.random.default_rng(7)
    return (
        rng.standard_normal((V, D)).astype("float32"),
        (rng.standard_normal((D, C)) * 0.5).astype("float32"),
        (rng.standard_normal(C) * 0.1).astype("float32"),
    )


def batches(steps: int):
    """The first ``steps`` batches of one fixed sequence."""
    rng = np.random.default_rng(3)
    x = rng.integers(0, V, (12 * B, L)).astype("int32")
    y = rng.integers(0, C, 12 * B).astype("int32")
    return x[: steps * B], y[: steps * B]


# ----------------------------------------------------------------- the hand-written loop
def _grads(E, H, W, b, x, y):
    """Loss and gradients (dH, dE, dW, db) of mean-pool -> dense -> softmax CE."""
    n, length, _ = H.shape
    h = H.mean(axis=1)
    z = h @ W + b
    p = np.exp(z - z.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    dz = p.copy()
    dz[np.arange(n), y] -= 1.0
    dz /= n
    dH = np.repeat((dz @ W.T)[:, None, :] / length, length, axis=1)
    dE = np.zeros_like(E)
    np.add.at(dE, x.reshape(-1), dH.reshape(-1, E.shape[1]))
    return dH, dE, h.T @ dz, dz.sum(axis=0)


def hand_written(steps: int, start: int, eps_at, epochs: int = 1) -> list[np.ndarray]:
    """Plain SGD for the steps before ``start``, FGM with eps_at(step) after; the
    batches of one epoch repeat in each of ``epochs`` epochs."""
    E, W, b = (w.astype(np.float64) for w in weights0())
    per_epoch = steps // epochs
    xs, ys = batches(per_epoch)
    for step in range(steps):
        i = step % per_epoch
        x, y = xs[i * B : (i + 1) * B], ys[i * B : (i + 1) * B]
        dH, dE, dW, db = _grads(E, E[x], W, b, x, y)
        if step >= start:
            norms = np.sqrt((dH**2).sum(axis=(1, 2), keepdims=True))
            delta = eps_at(step) * dH / norms
            _, dE2, dW2, db2 = _grads(E, E[x] + delta, W, b, x, y)
            dE, dW, db = dE + dE2, dW + dW2, db + db2
        E, W, b = E - LR * dE, W - LR * dW, b - LR * db
    return [E, W, b]


# ----------------------------------------------------------------------------- models
class Net(keras.Model):
    def __init__(self) -> None:
        super().__init__()
        self.emb = keras.layers.Embedding(V, D, name="emb")
        self.pool = keras.layers.GlobalAveragePooling1D()
        self.fc = keras.layers.Dense(C, name="fc")

    def call(self, x):
        return self.fc(self.pool(self.emb(x)))


if BACKEND == "jax":

    class Own(Net):
        """Functional: the state goes in, comes back with the gradients applied."""

        def train_step(self, state, data):
            trainable, _, optimizer_values, _ = state
            result = advgraph.keras.adversarial_gradients(self, data, state)
            _, non_trainable, _, metrics = result.state
            trainable, optimizer_values = self.optimizer.stateless_apply(
                optimizer_values, result.grads, trainable
            )
            return {"loss": result.loss}, (trainable, non_trainable, optimizer_values, metrics)

elif BACKEND == "torch":

    class Own(Net):
        def train_step(self, data):
            result = advgraph.keras.adversarial_gradients(self, data)
            with torch.no_grad():
                self.optimizer.apply(result.grads, self.trainable_variables)
            return {"loss": result.loss}

else:

    class Own(Net):
        def train_step(self, data):
            result = advgraph.keras.adversarial_gradients(self, data)
            self.optimizer.apply_gradients(zip(result.grads, self.trainable_variables))
            return {"loss": result.loss}


def build(cls=None, *, functional: bool = True, run_eagerly: bool = False, steps_per_execution: int = 1):
    if cls is not None:
        model = cls()
        model(np.zeros((1, L), "int32"))
    elif functional:
        inp = keras.Input((L,), dtype="int32")
        h = keras.layers.GlobalAveragePooling1D()(keras.layers.Embedding(V, D, name="emb")(inp))
        model = keras.Model(inp, keras.layers.Dense(C, name="fc")(h))
    else:
        return build(Net, run_eagerly=run_eagerly, steps_per_execution=steps_per_execution)
    model.compile(
        optimizer=keras.optimizers.SGD(LR),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        run_eagerly=run_eagerly,
        steps_per_execution=steps_per_execution,
    )
    E, W, b = weights0()
    model.get_layer("emb").set_weights([E])
    model.get_layer("fc").set_weights([W, b])
    return model


def weights(model) -> list[np.ndarray]:
    return [np.asarray(keras.ops.convert_to_numpy(v.value)) for v in (
        model.get_layer("emb").embeddings, model.get_layer("fc").kernel, model.get_layer("fc").bias)]


def fit(model, steps: int, epochs: int = 1):
    x, y = batches(steps // epochs)
    return model.fit(x, y, batch_size=B, epochs=epochs, shuffle=False, verbose=0)


# ------------------------------------------------------------------------------- start
@pytest.mark.parametrize("run_eagerly", [False, True], ids=["compiled", "eager"])
def test_start_matches_the_hand_written_loop_that_switches_on_at_step_n(run_eagerly) -> None:
    model = advgraph.wrap(build(run_eagerly=run_eagerly), method=methods.FGM(epsilon=EPS, start=2))
    fit(model, 5)
    ref = hand_written(5, start=2, eps_at=lambda s: EPS)
    for got, want in zip(weights(model), ref):
        np.testing.assert_allclose(got, want, **TOL)
    assert dict(model.advgraph_stats) == {"steps": 3, "plain_steps": 2, "skipped_nonfinite": 0, "skipped_zero": 0}
    # The check can tell the switch-on step apart: one step earlier or later differs.
    for other in (1, 3):
        assert not np.allclose(weights(model)[0], hand_written(5, start=other, eps_at=lambda s: EPS)[0], **TOL)


def test_start_across_epochs_and_fit_calls_counts_optimizer_steps() -> None:
    model = advgraph.wrap(build(functional=False), method=methods.FGM(epsilon=EPS, start=3))
    fit(model, 2)  # steps 0, 1: plain
    assert model.advgraph_stats["plain_steps"] == 2 and model.advgraph_stats["steps"] == 0
    x, y = batches(4)
    model.fit(x[2 * B :], y[2 * B :], batch_size=B, shuffle=False, verbose=0)  # steps 2 (plain), 3
    ref = hand_written(4, start=3, eps_at=lambda s: EPS)
    for got, want in zip(weights(model), ref):
        np.testing.assert_allclose(got, want, **TOL)
    assert model.advgraph_stats["plain_steps"] == 3 and model.advgraph_stats["steps"] == 1


def test_a_plain_step_runs_one_forward_and_computes_no_delta(monkeypatch) -> None:
    import advgraph.methods._common as common

    deltas = []
    original = common.compute_delta
    monkeypatch.setattr(common, "compute_delta", lambda *a, **k: deltas.append(1) or original(*a, **k))
    model = build(functional=False, run_eagerly=True)
    model = advgraph.wrap(model, method=methods.PGD(epsilon=EPS, steps=2, start=3))
    x, y = batches(3)
    model.fit(x[:B], y[:B], batch_size=B, verbose=0)  # Keras builds what it needs here
    forwards = []
    head = model.fc
    call = head.call
    object.__setattr__(head, "call", lambda *a, **k: forwards.append(1) or call(*a, **k))
    try:
        model.fit(x[B:], y[B:], batch_size=B, shuffle=False, verbose=0)
        # JAX's step also evaluates the forward's shapes once (jax.eval_shape, an
        # abstract trace, not a pass): forwards are counted on TensorFlow and torch.
        if BACKEND != "jax":
            assert len(forwards) == 2  # two plain steps: one forward each
        assert len(deltas) == 0
        model.fit(x[:B], y[:B], batch_size=B, verbose=0)
        if BACKEND != "jax":
            assert len(forwards) == 2 + 3  # then PGD: 3 forwards
        assert len(deltas) == 2  # and 2 deltas
    finally:
        object.__delattr__(head, "call")
    assert model.advgraph_stats["plain_steps"] == 3 and model.advgraph_stats["steps"] == 1  # training steps


def test_steps_per_execution_switches_between_executions() -> None:
    if BACKEND == "torch":
        pytest.skip("Keras refuses steps_per_execution > 1 on the torch backend")
    model = advgraph.wrap(build(steps_per_execution=2), method=methods.FGM(epsilon=EPS, start=2))
    fit(model, 6)
    for got, want in zip(weights(model), hand_written(6, start=2, eps_at=lambda s: EPS)):
        np.testing.assert_allclose(got, want, **TOL)
    assert model.advgraph_stats["plain_steps"] == 2 and model.advgraph_stats["steps"] == 4


# --------------------------------------------------------------------------- schedules
@pytest.mark.parametrize("run_eagerly", [False, True], ids=["compiled", "eager"])
def test_scheduled_epsilon_follows_the_hand_written_warmup(run_eagerly) -> None:
    warmup = advgraph.linear_schedule(0.1, 1.0, steps=4)
    model = advgraph.wrap(build(run_eagerly=run_eagerly), method=methods.FGM(epsilon=warmup, start=1))
    fit(model, 6, epochs=2)
    ref = hand_written(6, start=1, eps_at=warmup, epochs=2)
    for got, want in zip(weights(model), ref):
        np.testing.assert_allclose(got, want, **TOL)
    flat = hand_written(6, start=1, eps_at=lambda s: 1.0, epochs=2)
    assert not np.allclose(weights(model)[0], flat[0], **TOL)
    assert model.advgraph_stats["plain_steps"] == 1 and model.advgraph_stats["steps"] == 5


# ------------------------------------------------------------------ your own train_step
def test_a_model_with_its_own_train_step_is_refused_by_wrap_and_pointed_at_prepare() -> None:
    with pytest.raises(ValueError, match=r"advgraph\.keras\.prepare\(model, \.\.\.\).*Received: model_class="):
        advgraph.wrap(build(Own))


@pytest.mark.parametrize(
    "mode, method",
    [("output", methods.FGM(epsilon=EPS)), ("matrix", methods.PGD(epsilon=EPS, steps=2)),
     ("output", methods.FGM(epsilon=advgraph.linear_schedule(0.1, 1.0, 3), start=1))],
    ids=["fgm-output", "pgd-matrix", "fgm-start-schedule"],
)
def test_own_train_step_gives_the_update_of_fit_on_a_wrapped_model(mode, method) -> None:
    own = advgraph.keras.prepare(build(Own), mode=mode, method=method)
    ref = advgraph.wrap(build(Net), mode=mode, method=method)
    fit(own, 4)
    fit(ref, 4)
    for got, want in zip(weights(own), weights(ref)):
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
    assert dict(own.advgraph_stats) == dict(ref.advgraph_stats)
    assert own.advgraph_route == ("call-wrap" if mode == "output" else "matrix")
    model = advgraph.unwrap(own)
    assert not advgraph.is_wrapped(model)


def test_own_train_step_leaves_the_weights_byte_exact_and_returns_what_it_promises() -> None:
    model = advgraph.keras.prepare(build(Own), mode="matrix", method=methods.PGD(epsilon=EPS, steps=2))
    before = [w.tobytes() for w in weights(model)]
    x, y = batches(1)
    x, y = keras.ops.convert_to_tensor(x), keras.ops.convert_to_tensor(y)
    if BACKEND == "jax":
        state = (
            [v.value for v in model.trainable_variables],
            [v.value for v in model.non_trainable_variables],
            [v.value for v in model.optimizer.variables],
            [v.value for v in model.metrics_variables],
        )
        result = advgraph.keras.adversarial_gradients(model, (x, y), state)
        assert [np.asarray(t).tobytes() for t in result.state[0]] == [np.asarray(t).tobytes() for t in state[0]]
    else:
        result = advgraph.keras.adversarial_gradients(model, (x, y))
        assert result.state is None
    assert [w.tobytes() for w in weights(model)] == before
    assert len(result.grads) == len(model.trainable_variables)
    assert tuple(result.y_pred.shape) == (B, C)
    assert np.isfinite(float(keras.ops.convert_to_numpy(result.loss)))


def test_adversarial_gradients_refuses_a_wrapped_model_and_a_bad_state() -> None:
    wrapped = advgraph.wrap(build(Net))
    x, y = batches(1)
    with pytest.raises(ValueError, match="advgraph.keras.prepare.*Received: model="):
        advgraph.keras.adversarial_gradients(wrapped, (x, y))
    with pytest.raises(TypeError, match="Received: model="):
        advgraph.keras.adversarial_gradients(build(Net), (x, y))
    own = advgraph.keras.prepare(build(Own))
    with pytest.raises(TypeError, match="Received: .*state="):
        advgraph.keras.adversarial_gradients(own, (x, y), state="nope" if BACKEND == "jax" else (1, 2, 3, 4))


def test_own_train_step_that_never_calls_advgraph_raises_after_fit() -> None:
    model = advgraph.keras.prepare(build(Net))  # Keras' own train_step: no advgraph call
    with pytest.raises(RuntimeError, match="never called advgraph.keras.adversarial_gradients"):
        fit(model, 1)
