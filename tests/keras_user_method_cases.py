"""A user's own methods (``_user_methods.py``: R-Drop, relative FGM) on the active Keras
backend; run once per backend by ``test_user_methods.py``.

Run directly: ``KERAS_BACKEND=jax python -m pytest -q tests/keras_user_method_cases.py``.
With ``ADVGRAPH_USER_METHODS_OUT=<file.npz>`` set, ``test_one_step_numbers`` writes the
weights after one step of every case in ``_user_methods.CASES`` there, for the
cross-backend comparison.
"""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest

if os.environ.get("KERAS_BACKEND") == "torch":
    import torch  # noqa: F401  (before tensorflow, see conftest)

keras = pytest.importorskip("keras")

import advgraph  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _user_methods as um  # noqa: E402

BACKEND = keras.backend.backend()
LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


class FixedMasks(keras.layers.Layer):
    """Dropout whose draws are injected: the k-th training forward multiplies by
    ``masks[k % 2]``. The count is a non-trainable variable, so it advances the same
    way eagerly, in ``tf.function``, in ``jax.jit`` (a state the step carries) and on torch."""

    def __init__(self, masks: np.ndarray, **kwargs) -> None:
        super().__init__(**kwargs)
        self.masks = masks
        self.count = self.add_weight(shape=(), dtype="int32", initializer="zeros", trainable=False, name="count")

    def call(self, h, training=None):
        if not training:
            return h
        masks = keras.ops.convert_to_tensor(self.masks)
        mask = keras.ops.take(masks, keras.ops.mod(self.count, 2), axis=0)
        self.count.assign(self.count + 1)
        return h * keras.ops.cast(mask, h.dtype)


class Bomb(keras.layers.Layer):
    """Identity that raises in the second training forward once armed."""

    def __init__(self) -> None:
        super().__init__()
        self.armed, self.calls = False, 0

    def call(self, h, training=None):
        if training and self.armed:
            self.calls += 1
            if self.calls == 2:
                raise RuntimeError("boom in the second forward")
        return h


def model_with(middle, *, eager: bool = True, lr: float = um.LR) -> keras.Model:
    inp = keras.Input((um.L,), dtype="int32")
    h = keras.layers.Embedding(um.V, um.D, name="emb")(inp)
    if middle is not None:
        h = middle(h)
    out = keras.layers.Dense(um.C, name="fc")(keras.layers.GlobalAveragePooling1D()(h))
    model = keras.Model(inp, out)
    model.compile(optimizer=keras.optimizers.SGD(lr), loss=LOSS, run_eagerly=eager)
    return model


def weights_of(model: keras.Model) -> list[np.ndarray]:
    return [np.asarray(keras.ops.convert_to_numpy(w)) for w in model.weights]


def test_one_step_numbers() -> None:
    """One ``train_on_batch`` of every case from the same weights; saved for the
    cross-backend check (``test_user_methods.py``)."""
    d = um.data()
    results = {}
    for i, (name, mode, eager) in enumerate(um.CASES):
        middle = FixedMasks(d["masks"]) if name.startswith("rdrop") else None
        model = model_with(middle, eager=eager)
        model.get_layer("emb").set_weights([d["E"]])
        model.get_layer("fc").set_weights([d["W"], d["b"]])
        wrapped = advgraph.wrap(model, mode=mode, method=um.method_of(name))
        logs = wrapped.train_on_batch(d["x"], d["y"], return_dict=True)
        results[f"{i}/loss"] = np.asarray(float(logs["loss"]))
        results[f"{i}/E"] = np.asarray(model.get_layer("emb").get_weights()[0])
        results[f"{i}/W"], results[f"{i}/b"] = map(np.asarray, model.get_layer("fc").get_weights())
        stats = dict(wrapped.advgraph_stats)
        assert stats == {"steps": 1, "plain_steps": 0, "skipped_nonfinite": 0, "skipped_zero": 0}, (name, stats)
        if middle is not None:  # the two forwards of the step drew masks 0 and 1
            assert int(keras.ops.convert_to_numpy(middle.count)) == 2
        for key in ("E", "W", "b"):
            assert np.isfinite(results[f"{i}/{key}"]).all()
    out = os.environ.get("ADVGRAPH_USER_METHODS_OUT")
    if out:
        np.savez(out, **results)


def test_rdrop_with_real_dropout_two_forwards_differ_and_kl_is_positive() -> None:
    """Keras' own Dropout draws a new mask per forward: the two outputs differ and the
    KL term is > 0; with rate 0 the same probe measures exactly no difference."""
    d = um.data()
    found = {}
    for rate, show in ((0.5, "kl"), (0.5, "gap"), (0.0, "gap")):
        keras.utils.set_random_seed(0)
        model = model_with(keras.layers.Dropout(rate), eager=False)
        wrapped = advgraph.wrap(model, method=um.RDropProbe(show=show))
        logs = wrapped.train_on_batch(d["x"], d["y"], return_dict=True)
        found[rate, show] = float(logs["loss"])
    # Small logits (a fresh Dense) give a small KL; float32 noise would be ~1e-8.
    assert found[0.5, "kl"] > 1e-6 and found[0.5, "gap"] > 1e-3, found
    assert found[0.0, "gap"] == 0.0, found


@pytest.mark.parametrize("name, mode", [("rdrop", "output"), ("rdrop", "matrix"), ("relfgm", "output")])
def test_error_in_the_second_forward_leaves_every_weight_and_output_as_before(name: str, mode: str) -> None:
    """The second forward of the step raises (R-Drop: inside the joint pass; relative
    FGM: the perturbed pass): every weight keeps its bytes, predictions are unchanged,
    and the next step trains."""
    d = um.data()
    bomb = Bomb()
    model = model_with(bomb, eager=BACKEND == "tensorflow")
    wrapped = advgraph.wrap(model, mode=mode, method=um.method_of(name))
    before = [w.tobytes() for w in weights_of(model)]
    predicted = np.asarray(keras.ops.convert_to_numpy(model.predict(d["x"], verbose=0))).tobytes()
    bomb.armed = True
    with pytest.raises(Exception, match="boom"):
        wrapped.train_on_batch(d["x"], d["y"])
    assert [w.tobytes() for w in weights_of(model)] == before
    assert np.asarray(keras.ops.convert_to_numpy(model.predict(d["x"], verbose=0))).tobytes() == predicted
    bomb.armed = False
    wrapped.train_on_batch(d["x"], d["y"])
    assert [w.tobytes() for w in weights_of(model)] != before


@pytest.mark.parametrize("bad, counter", [(0.0, "skipped_zero"), (float("nan"), "skipped_nonfinite")])
def test_relative_fgm_skips_and_counts_a_bad_gradient(bad: float, counter: str) -> None:
    """Sample 0's loss weight is 0 (zero gradient at its embedding output) or NaN
    (non-finite): its delta is 0 and the step counts it; the others are perturbed.
    A zero gradient normalised without the skip would be 0/0 = NaN in every weight."""
    d = um.data()
    model = model_with(None, eager=False)
    wrapped = advgraph.wrap(model, method=um.RelativeFGM(epsilon=0.5))
    weight = np.ones(um.B, "float32")
    weight[0] = bad
    wrapped.train_on_batch(d["x"], d["y"], sample_weight=weight)
    stats = dict(wrapped.advgraph_stats)
    other = "skipped_nonfinite" if counter == "skipped_zero" else "skipped_zero"
    assert stats["steps"] == 1 and stats[counter] == 1 and stats[other] == 0, stats
    if counter == "skipped_zero":
        assert all(np.isfinite(w).all() for w in weights_of(model))


def test_rdrop_counts_each_step_once_and_relative_fgm_in_matrix_mode_is_refused() -> None:
    d = um.data()
    model = model_with(keras.layers.Dropout(0.3), eager=False)
    wrapped = advgraph.wrap(model, mode="matrix", method=um.RDrop(alpha=0.5))
    wrapped.fit(d["x"], d["y"], batch_size=3, epochs=1, verbose=0)
    assert dict(wrapped.advgraph_stats) == {"steps": 2, "plain_steps": 0, "skipped_nonfinite": 0, "skipped_zero": 0}
    assert wrapped.advgraph_method == um.RDrop(alpha=0.5)
    other = model_with(None)
    with pytest.raises(ValueError, match="Received: .*mode='matrix'"):
        advgraph.wrap(other, mode="matrix", method=um.RelativeFGM())
    assert not advgraph.is_wrapped(other)
