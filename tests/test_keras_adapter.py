"""The Keras 3 adapter: routes, fit() integration, errors, counters, saving."""

from __future__ import annotations

import logging
import warnings

import numpy as np
import pytest

from test_keras_support import (
    CLASSES,
    LENGTH,
    batch,
    compiled,
    embedding_of,
    functional,
    loss_fn,
    snapshot,
    weights,
)

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")

import advgraph  # noqa: E402
from advgraph.adapters.keras import Perturbation  # noqa: E402


def graph_chain(model: keras.Model) -> list[str]:
    """Layer names from the output back to the input of a single-path functional model."""
    names = []
    tensor = model.outputs[0]
    while True:
        history = tensor._keras_history
        layer = history.operation
        names.append(layer.name)
        node = layer._inbound_nodes[history.node_index]
        if not node.input_tensors:
            return names
        tensor = node.input_tensors[0]


# -- routes -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kind, route",
    [
        ("sequential", "sequential-rewrite"),
        ("functional", "functional-rewrite"),
        ("subclassed", "call-wrap"),
    ],
)
def test_output_mode_routes(kind: str, route: str, caplog: pytest.LogCaptureFixture) -> None:
    model = compiled(kind)
    x, y = batch()
    before = model.predict(x, verbose=0)
    with caplog.at_level(logging.INFO, logger="advgraph"):
        wrapped = advgraph.wrap(model, mode="output", epsilon=0.5)
    assert wrapped.advgraph_route == route
    assert any(f"route={route}" in r.getMessage() for r in caplog.records if r.name == "advgraph")
    assert advgraph.is_wrapped(wrapped)
    assert (wrapped is model) == (route == "call-wrap")
    # Outside training the wrapped model is the original, bit for bit.
    np.testing.assert_array_equal(wrapped.predict(x, verbose=0), before)
    w0 = snapshot(wrapped)
    history = wrapped.fit(x, y, batch_size=3, epochs=1, verbose=0)
    assert snapshot(wrapped) != w0
    assert np.isfinite(history.history["loss"]).all()
    assert wrapped.advgraph_stats["steps"] == 2
    # The rewritten models share the layers: the original model trained too.
    np.testing.assert_array_equal(model.predict(x, verbose=0), wrapped.predict(x, verbose=0))
    original = advgraph.unwrap(wrapped)
    assert original is model
    assert not advgraph.is_wrapped(original) and not advgraph.is_wrapped(wrapped)
    assert "train_step" not in original.__dict__
    assert original.train_step.__func__ is type(original).train_step


def test_functional_rewrite_inserts_perturbation_right_after_embedding() -> None:
    model = compiled("functional")
    assert graph_chain(model) == ["dense", "pool", "Embedding-Token", "tokens"]
    wrapped = advgraph.wrap(model, mode="output")
    chain = graph_chain(wrapped)
    assert chain == ["dense", "pool", "advgraph_perturbation", "Embedding-Token", "tokens"]
    pert = wrapped.get_layer("advgraph_perturbation")
    assert isinstance(pert, Perturbation) and not pert.weights
    # Weights are shared with the original layers, not copied.
    assert wrapped.get_layer("Embedding-Token") is model.get_layer("Embedding-Token")
    assert all(any(v is w for w in model.weights) for v in wrapped.weights)
    # The original graph is untouched.
    assert graph_chain(model) == ["dense", "pool", "Embedding-Token", "tokens"]
    x, _ = batch(n=7)
    out = wrapped.predict(x, verbose=0)
    assert out.tobytes() == model.predict(x, verbose=0).tobytes()


def test_sequential_rewrite_layer_order() -> None:
    model = compiled("sequential")
    wrapped = advgraph.wrap(model, mode="output")
    names = [layer.name for layer in wrapped.layers]
    assert names == ["Embedding-Token", "advgraph_perturbation", "pool", "dense"]
    x, _ = batch(n=4)
    assert wrapped.predict(x, verbose=0).tobytes() == model.predict(x, verbose=0).tobytes()


def test_matrix_mode_keeps_the_model_object() -> None:
    model = compiled("sequential")
    wrapped = advgraph.wrap(model, mode="matrix", epsilon=0.3)
    assert wrapped is model and wrapped.advgraph_route == "matrix"
    assert wrapped.advgraph_config.per_sample is False
    assert wrapped.advgraph_target == "Embedding-Token"
    assert advgraph.unwrap(wrapped) is model


# -- fit() integration -----------------------------------------------------------------


@pytest.mark.parametrize("mode", ["matrix", "output"])
def test_adversarial_step_changes_the_update(mode: str) -> None:
    x, y = batch(n=6)
    plain = compiled("functional")
    plain.fit(x, y, batch_size=6, epochs=1, verbose=0, shuffle=False)
    wrapped = advgraph.wrap(compiled("functional"), mode=mode, epsilon=1.0)
    wrapped.fit(x, y, batch_size=6, epochs=1, verbose=0, shuffle=False)
    for a, b in zip(plain.weights, wrapped.weights):
        assert np.abs(a.numpy() - b.numpy()).max() > 1e-4


# XLA of the output mode is also covered by test_keras_differential.py.
@pytest.mark.parametrize("mode, jit_compile", [("matrix", True), ("output", False)])
def test_fit_with_metrics_sample_weight_validation_callback_jit_and_steps_per_execution(
    mode: str, jit_compile: bool
) -> None:
    model = compiled(
        "functional",
        metrics=["accuracy"],
        weighted_metrics=["accuracy"],
        jit_compile=jit_compile,
        steps_per_execution=2,
    )
    wrapped = advgraph.wrap(model, mode=mode, epsilon=0.5)
    x, y = batch(n=12)
    xv, yv = batch(seed=1, n=4)
    sw = np.linspace(0.5, 1.5, 12).astype(np.float32)
    seen: list[dict] = []
    callback = keras.callbacks.LambdaCallback(on_train_batch_end=lambda b, logs: seen.append(dict(logs)))
    history = wrapped.fit(
        x, y, sample_weight=sw, batch_size=3, epochs=2, verbose=0,
        validation_data=(xv, yv), callbacks=[callback],
    )
    assert set(history.history) >= {"loss", "accuracy", "weighted_accuracy", "val_loss", "val_accuracy"}
    assert len(history.history["val_loss"]) == 2
    assert seen and "accuracy" in seen[-1]
    assert wrapped.advgraph_stats["steps"] == 8  # 4 batches x 2 epochs
    assert wrapped.jit_compile is jit_compile and wrapped.steps_per_execution == 2
    # evaluate/predict are unchanged: the wrapped model gives what an independent plain
    # model with the same (trained) weights gives. Not advgraph.unwrap(wrapped): that is
    # the same model (matrix) or shares its layers (output), so it would compare the
    # wrapped model with itself. Same float32 ops compiled the same way on one machine;
    # rel 1e-6 leaves room for a different op fusion around the identity Perturbation.
    trained = {
        "E": embedding_of(wrapped).embeddings.numpy(),
        "W": wrapped.get_layer("dense").kernel.numpy(),
        "b": wrapped.get_layer("dense").bias.numpy(),
    }
    assert trained["E"].tobytes() != weights()["E"].tobytes()  # it trained: not the start weights
    independent = functional(trained)
    independent.compile(
        optimizer=keras.optimizers.SGD(learning_rate=0.1), loss=loss_fn(), metrics=["accuracy"],
        weighted_metrics=["accuracy"], jit_compile=jit_compile, steps_per_execution=2,
    )  # fmt: skip
    assert not any(v is w for v in independent.weights for w in wrapped.weights)
    ev = wrapped.evaluate(xv, yv, verbose=0, return_dict=True)
    ev_plain = independent.evaluate(xv, yv, verbose=0, return_dict=True)
    assert ev.keys() == ev_plain.keys() and "loss" in ev and "accuracy" in ev
    for key in ev:
        assert ev[key] == pytest.approx(ev_plain[key], rel=1e-6), key
    np.testing.assert_allclose(
        wrapped.predict(xv, verbose=0), independent.predict(xv, verbose=0), rtol=1e-6, atol=1e-7
    )


def test_clean_loss_is_logged_and_metrics_see_clean_predictions() -> None:
    x, y = batch(n=6)
    model = compiled("functional", metrics=["accuracy"])
    expected_loss = float(loss_fn()(y, model.predict(x, verbose=0)))
    expected_acc = float(np.mean(np.argmax(model.predict(x, verbose=0), -1) == y))
    wrapped = advgraph.wrap(model, mode="matrix", epsilon=2.0)
    logs = wrapped.train_on_batch(x, y, return_dict=True)
    assert logs["loss"] == pytest.approx(expected_loss, rel=1e-5)
    assert logs["accuracy"] == pytest.approx(expected_acc)


def test_zero_gradient_gives_zero_delta_counted_and_weights_untouched() -> None:
    x, y = batch(n=6)
    model = advgraph.wrap(compiled("functional"), mode="matrix", epsilon=1.0)
    before = snapshot(model)
    with pytest.warns(advgraph.AdvGraphWarning, match="was zero"):
        model.fit(x, y, sample_weight=np.zeros(6, np.float32), batch_size=3, verbose=0)
    assert snapshot(model) == before
    assert dict(model.advgraph_stats) == {"steps": 2, "plain_steps": 0, "skipped_nonfinite": 0, "skipped_zero": 2}


def test_nan_gradient_is_counted() -> None:
    x, y = batch(n=3)
    model = advgraph.wrap(compiled("functional", run_eagerly=True), mode="output", epsilon=1.0)
    sw = np.array([1.0, np.nan, 1.0], np.float32)
    with pytest.warns(advgraph.AdvGraphWarning, match="NaN or inf"):
        model.fit(x, y, sample_weight=sw, batch_size=3, verbose=0)
    assert model.advgraph_stats["skipped_nonfinite"] == 1


@pytest.mark.parametrize("mode", ["matrix", "output"])
def test_mixed_precision_with_loss_scaling(mode: str) -> None:
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        tokens = keras.Input((LENGTH,), dtype="int32")
        emb = keras.layers.Embedding(13, 4)
        h = keras.layers.GlobalAveragePooling1D()(emb(tokens))
        model = keras.Model(tokens, keras.layers.Dense(CLASSES, dtype="float32")(h))
        # A huge initial scale overflows float16 gradients: the first steps must be
        # skipped (by advgraph: delta = 0; by the LossScaleOptimizer: no update).
        opt = keras.optimizers.LossScaleOptimizer(keras.optimizers.SGD(0.1), initial_scale=2.0**40)
        model.compile(optimizer=opt, loss=loss_fn())
        wrapped = advgraph.wrap(model, mode=mode, epsilon=0.5)
        x, y = batch(n=4)
        E0 = emb.embeddings.numpy().tobytes()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", advgraph.AdvGraphWarning)
            wrapped.fit(x, y, batch_size=4, epochs=1, verbose=0)
        assert emb.embeddings.numpy().tobytes() == E0  # overflowed step: nothing applied
        assert wrapped.advgraph_stats["skipped_nonfinite"] == 1
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", advgraph.AdvGraphWarning)
            wrapped.fit(x, y, batch_size=1, epochs=10, verbose=0)
        stats = wrapped.advgraph_stats
        assert stats["steps"] == 41 and stats["skipped_nonfinite"] < 41
        assert float(opt.dynamic_scale.numpy()) < 2.0**40
        assert all(np.isfinite(v.numpy()).all() for v in wrapped.weights)
        assert emb.embeddings.numpy().tobytes() != E0  # finite steps did train
    finally:
        keras.mixed_precision.set_global_policy("float32")


# -- saving ---------------------------------------------------------------------------


@pytest.mark.parametrize("mode, kind", [("matrix", "functional"), ("output", "functional"), ("output", "sequential")])
def test_save_and_load_wrapped_model(mode: str, kind: str, tmp_path) -> None:
    x, y = batch(n=6)
    wrapped = advgraph.wrap(compiled(kind, metrics=["accuracy"]), mode=mode, epsilon=0.5)
    wrapped.fit(x, y, batch_size=3, verbose=0)
    path = tmp_path / "m.keras"
    wrapped.save(path)
    loaded = keras.models.load_model(path)
    assert not advgraph.is_wrapped(loaded)
    assert not any(isinstance(layer, Perturbation) for layer in loaded.layers)
    np.testing.assert_array_equal(loaded.predict(x, verbose=0), wrapped.predict(x, verbose=0))
    # The loaded model is a plain compiled model: it can be wrapped again and trained.
    again = advgraph.wrap(loaded, mode=mode, epsilon=0.5)
    before = [w.copy() for w in again.get_weights()]
    again.fit(x, y, batch_size=3, verbose=0)
    assert again.advgraph_stats["steps"] > 0  # the reloaded model trains adversarially
    assert any(not np.array_equal(a, b) for a, b in zip(before, again.get_weights()))
    weights_path = tmp_path / "m.weights.h5"
    wrapped.save_weights(weights_path)
    fresh = functional() if kind == "functional" else compiled(kind)
    fresh.load_weights(weights_path)
    np.testing.assert_array_equal(fresh.predict(x, verbose=0), wrapped.predict(x, verbose=0))


def test_saved_model_and_method_settings_reload_and_train_on_identically(tmp_path) -> None:
    """A wrapped Keras model saves as the user's model; its method saves as settings
    (``get_config()``, plain JSON) and ``advgraph.methods.from_config`` rebuilds it:
    the reloaded pair trains on exactly as the original (schedule and start included)."""
    import json

    x, y = batch(n=6)
    method = advgraph.methods.PGD(epsilon=advgraph.linear_schedule(0.1, 0.5, steps=4), steps=2, start=1)
    wrapped = advgraph.wrap(compiled("functional"), mode="matrix", method=method)
    wrapped.fit(x, y, batch_size=3, verbose=0)
    wrapped.save(tmp_path / "m.keras")
    (tmp_path / "method.json").write_text(json.dumps({"method": "pgd", **wrapped.advgraph_method.get_config()}))

    loaded = keras.models.load_model(tmp_path / "m.keras")
    rebuilt = advgraph.methods.from_config(json.loads((tmp_path / "method.json").read_text()))
    assert rebuilt == wrapped.advgraph_method
    again = advgraph.wrap(loaded, mode="matrix", method=rebuilt)
    for model in (wrapped, again):
        model.fit(x, y, batch_size=3, verbose=0, shuffle=False)
    for a, b in zip(wrapped.get_weights(), again.get_weights()):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)
    assert again.advgraph_stats["steps"] == 2 and again.advgraph_stats["plain_steps"] == 0


# -- errors ---------------------------------------------------------------------------


def test_uncompiled_model_is_rejected() -> None:
    with pytest.raises(ValueError, match=r"compile.*Received: model="):
        advgraph.wrap(functional(), mode="matrix")


def test_wrapping_twice_is_rejected() -> None:
    wrapped = advgraph.wrap(compiled("functional"), mode="matrix")
    with pytest.raises(ValueError, match=r"already wrapped.*Received: "):
        advgraph.wrap(wrapped, mode="matrix")
    rewritten = advgraph.wrap(compiled("functional"), mode="output")
    with pytest.raises(ValueError, match="already wrapped"):
        advgraph.wrap(rewritten, mode="output")


def test_unwrap_of_plain_model_is_rejected() -> None:
    with pytest.raises(TypeError, match=r"advgraph.wrap\(\).*Received: model="):
        advgraph.unwrap(compiled("functional"))
    wrapped = advgraph.wrap(compiled("subclassed"), mode="output")
    advgraph.unwrap(wrapped)
    with pytest.raises(TypeError):
        advgraph.unwrap(wrapped)


def test_custom_train_step_is_rejected() -> None:
    class Custom(keras.Model):
        def train_step(self, data):  # pragma: no cover - never run
            return super().train_step(data)

    tokens = keras.Input((LENGTH,), dtype="int32")
    model = Custom(tokens, keras.layers.Dense(2)(keras.layers.Embedding(9, 2)(tokens)))
    model.compile(optimizer="sgd", loss="mse")
    with pytest.raises(ValueError, match=r"train_step.*Received: model_class="):
        advgraph.wrap(model)


def _two_embeddings(vocab_a: int, vocab_b: int) -> keras.Model:
    tokens = keras.Input((LENGTH,), dtype="int32")
    a = keras.layers.Embedding(vocab_a, 4, name="Embedding-Token")(tokens)
    b = keras.layers.Embedding(vocab_b, 4, name="Embedding-Segment")(tokens)
    h = keras.layers.GlobalAveragePooling1D()(keras.layers.Add()([a, b]))
    model = keras.Model(tokens, keras.layers.Dense(CLASSES)(h))
    model.compile(optimizer="sgd", loss=loss_fn())
    return model


def test_target_resolution(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="advgraph"):
        wrapped = advgraph.wrap(_two_embeddings(13, 2), mode="matrix")
    assert wrapped.advgraph_target == "Embedding-Token"
    assert any("largest input_dim" in r.getMessage() for r in caplog.records)
    advgraph.unwrap(wrapped)
    assert advgraph.wrap(wrapped, target="Embedding-Segment", mode="matrix").advgraph_target == "Embedding-Segment"
    advgraph.unwrap(wrapped)
    layer = wrapped.get_layer("Embedding-Segment")
    assert advgraph.wrap(wrapped, target=layer, mode="output").advgraph_target == "Embedding-Segment"


def test_target_errors_list_the_candidates() -> None:
    model = _two_embeddings(13, 13)
    with pytest.raises(ValueError, match=r"ambiguous.*Embedding-Token.*Embedding-Segment.*Received: target='embedding'"):
        advgraph.wrap(model)
    with pytest.raises(ValueError, match=r"Embedding layers: \['Embedding-Token'.*Received: target='Embedding-Tokn'"):
        advgraph.wrap(model, target="Embedding-Tokn")
    with pytest.raises(ValueError, match=r"must be a layer of the model.*Received: target="):
        advgraph.wrap(model, target=keras.layers.Embedding(3, 2))
    with pytest.raises(TypeError, match=r"Received: target=3"):
        advgraph.wrap(model, target=3)
    with pytest.raises(ValueError, match=r"mode='matrix'.*embeddings.*Received: target="):
        advgraph.wrap(model, target=model.layers[-1], mode="matrix")
    plain = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    plain.compile(optimizer="sgd", loss="mse")
    with pytest.raises(ValueError, match=r"found no keras.layers.Embedding.*Received: target='embedding'"):
        advgraph.wrap(plain)
    assert not advgraph.is_wrapped(model)


def test_a_target_called_twice_in_a_functional_graph_takes_the_call_wrap_route() -> None:
    """The graph rewrite inserts one perturbation layer after one call; a target called
    twice gets one delta per call through the call-wrap route instead (same model object)."""
    tokens = keras.Input((LENGTH,), dtype="int32")
    x, y = batch()
    emb = keras.layers.Embedding(int(x.max()) + 1, 4)
    h = keras.layers.Add()([emb(tokens), emb(tokens)])
    model = keras.Model(tokens, keras.layers.Dense(CLASSES)(keras.layers.GlobalAveragePooling1D()(h)))
    model.compile(optimizer="sgd", loss=loss_fn())
    wrapped = advgraph.wrap(model, mode="output")
    assert wrapped is model and wrapped.advgraph_route == "call-wrap"
    wrapped.fit(x, y, batch_size=3, verbose=0)
    assert wrapped.advgraph_stats["steps"] == 2
    advgraph.unwrap(wrapped)
    assert advgraph.wrap(model, mode="matrix").advgraph_route == "matrix"  # and in matrix mode


def test_stats_mapping_and_frozen_embedding_in_matrix_mode() -> None:
    model = compiled("functional")
    embedding_of(model).trainable = False
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss=loss_fn())
    wrapped = advgraph.wrap(model, mode="matrix", epsilon=1.0)
    E0 = embedding_of(model).embeddings.numpy().tobytes()
    W0 = model.get_layer("dense").kernel.numpy().tobytes()
    x, y = batch(n=6)
    wrapped.fit(x, y, batch_size=2, verbose=0, shuffle=False)
    # A frozen matrix is perturbed and restored exactly; the dense layer trained.
    assert embedding_of(model).embeddings.numpy().tobytes() == E0
    assert model.get_layer("dense").kernel.numpy().tobytes() != W0
    stats = wrapped.advgraph_stats
    assert dict(stats) == {"steps": 3, "plain_steps": 0, "skipped_nonfinite": 0, "skipped_zero": 0}
    assert list(stats) == ["steps", "plain_steps", "skipped_nonfinite", "skipped_zero"] and len(stats) == 4


# -- every method of the core runs on the Keras sites -----------------------------------------


class PassCounter(keras.layers.Layer):
    """Identity that counts the training forwards (eager mode)."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.calls = 0

    def call(self, h, training=None):
        if training:
            self.calls += 1
        return h


@pytest.mark.parametrize(
    "method, kwargs, passes",
    [
        ("fgsm", {}, 2),
        ("pgd", {"steps": 3, "random_init": True}, 4),
        ("freelb", {"steps": 3}, 3),
        ("vat", {"steps": 1}, 3),
    ],
)
@pytest.mark.parametrize("mode", ["matrix", "output"])
def test_every_method_trains_with_its_pass_count(mode, method, kwargs, passes) -> None:
    tokens = keras.Input((LENGTH,), dtype="int32")
    counter = PassCounter()
    h = counter(keras.layers.Embedding(13, 4)(tokens))
    model = keras.Model(tokens, keras.layers.Dense(CLASSES)(keras.layers.GlobalAveragePooling1D()(h)))
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss=loss_fn(), run_eagerly=True)
    wrapped = advgraph.wrap(model, mode=mode, method=method, epsilon=0.5, **kwargs)
    x, y = batch(n=4)
    before = snapshot(wrapped)
    wrapped.fit(x, y, batch_size=4, verbose=0)
    assert counter.calls == passes
    assert wrapped.advgraph_stats["steps"] == 1  # one training step, whatever its passes
    assert snapshot(wrapped) != before
    assert all(np.isfinite(v.numpy()).all() for v in wrapped.weights)
    if method == "vat":  # label-free: fit(x) alone trains too
        history = wrapped.fit(x, batch_size=4, verbose=0)
        assert np.isfinite(history.history["loss"]).all()


@pytest.mark.parametrize("name", ["_adapter", "_routes", "_tf", "_target"])
def test_docstring_examples_run(name: str) -> None:
    import doctest
    import importlib

    module = importlib.import_module(f"advgraph.adapters.keras.{name}")
    result = doctest.testmod(module, optionflags=doctest.NORMALIZE_WHITESPACE, verbose=False)
    assert result.attempted > 0 and result.failed == 0, result


@pytest.mark.parametrize("mode", ["matrix", "output"])
def test_per_output_losses_and_metrics_report_the_clean_pass(mode: str) -> None:
    tokens = keras.Input((LENGTH,), dtype="int32", name="tokens")
    pooled = keras.layers.GlobalAveragePooling1D()(keras.layers.Embedding(13, 4)(tokens))
    outputs = {"cls": keras.layers.Dense(CLASSES, name="cls")(pooled), "reg": keras.layers.Dense(1, name="reg")(pooled)}
    model = keras.Model(tokens, outputs)
    model.compile(
        optimizer=keras.optimizers.SGD(0.1),
        loss={"cls": loss_fn(), "reg": "mse"},
        metrics={"cls": ["accuracy"]},
    )
    x, y = batch(n=6)
    targets = {"cls": y, "reg": np.linspace(-1, 1, 6, dtype=np.float32)[:, None]}
    pred = model.predict(x, verbose=0)
    cls_loss = float(loss_fn()(targets["cls"], pred["cls"]))
    reg_loss = float(keras.losses.MeanSquaredError()(targets["reg"], pred["reg"]))
    wrapped = advgraph.wrap(model, mode=mode, epsilon=3.0)
    logs = wrapped.train_on_batch(x, targets, return_dict=True)
    assert logs["cls_loss"] == pytest.approx(cls_loss, rel=1e-5)
    assert logs["reg_loss"] == pytest.approx(reg_loss, rel=1e-5)
    assert logs["loss"] == pytest.approx(cls_loss + reg_loss, rel=1e-5)
    assert logs["cls_accuracy"] == pytest.approx(np.mean(np.argmax(pred["cls"], -1) == y))
