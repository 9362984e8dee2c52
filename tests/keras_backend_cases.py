"""The Keras adapter on the active backend (run per backend by test_keras_backends.py).

Run directly: ``KERAS_BACKEND=jax python -m pytest -q tests/keras_backend_cases.py``.
Not collected by a plain ``pytest`` run (no ``test_`` prefix): the backend is fixed
per process, so ``test_keras_backends.py`` starts one pytest per backend.
"""

from __future__ import annotations

import os
import subprocess
import sys
import warnings

import numpy as np
import pytest

if os.environ.get("KERAS_BACKEND") == "torch":
    import torch  # noqa: F401  (before tensorflow, see conftest)

keras = pytest.importorskip("keras")

import advgraph  # noqa: E402
from advgraph._errors import AdvGraphWarning  # noqa: E402

BACKEND = keras.backend.backend()
V, D, C, L, B = 17, 6, 3, 5, 8
METHODS = [
    ("fgm", {}),
    ("fgsm", {}),
    ("pgd", {"steps": 2}),
    ("pgd", {"steps": 2, "random_init": True}),
    ("freelb", {"steps": 2}),
    ("vat", {}),
]


def data(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.integers(1, V - 4, (B, L)).astype("int32")  # ids V-4.. never used
    return x, rng.integers(0, C, B).astype("int32")


def build(kind: str = "functional", *, jit_compile="auto", run_eagerly=False, seed=0) -> keras.Model:
    keras.utils.set_random_seed(seed)
    if kind == "subclassed":

        class Net(keras.Model):
            def __init__(self) -> None:
                super().__init__()
                self.emb = keras.layers.Embedding(V, D, name="emb")
                self.pool = keras.layers.GlobalAveragePooling1D()
                self.fc = keras.layers.Dense(C)

            def call(self, x, training=None):
                return self.fc(self.pool(self.emb(x)))

        model = Net()
        model(np.zeros((1, L), "int32"))
    elif kind == "sequential":
        model = keras.Sequential(
            [keras.Input((L,), dtype="int32"), keras.layers.Embedding(V, D, name="emb"),
             keras.layers.GlobalAveragePooling1D(), keras.layers.Dense(C)]
        )
    else:
        inp = keras.Input((L,), dtype="int32")
        h = keras.layers.Embedding(V, D, name="emb")(inp)
        h = keras.layers.Dropout(0.1)(h)
        out = keras.layers.Dense(C)(keras.layers.GlobalAveragePooling1D()(h))
        model = keras.Model(inp, out)
    model.compile(
        optimizer=keras.optimizers.Adam(0.01),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
        jit_compile=jit_compile,
        run_eagerly=run_eagerly,
    )
    return model


def emb_of(model: keras.Model):
    return next(l for l in model._flatten_layers() if isinstance(l, keras.layers.Embedding))


def matrix_bytes(model: keras.Model) -> bytes:
    return np.asarray(keras.ops.convert_to_numpy(emb_of(model).embeddings.value)).tobytes()


def test_dispatch_recognises_keras_first() -> None:
    from advgraph._wrap import _framework_of

    model = build()
    assert _framework_of(model) == "keras"
    if BACKEND == "torch":
        import torch

        assert isinstance(model, torch.nn.Module)  # and still the Keras adapter


def test_is_wrapped_never_raises() -> None:
    class NoDict:
        __slots__ = ()

    class Hostile:
        def __getattribute__(self, name):
            raise RuntimeError("no attribute access")

    model = build()
    assert advgraph.is_wrapped(model) is False
    assert advgraph.is_wrapped(NoDict()) is False
    assert advgraph.is_wrapped(Hostile()) is False
    assert advgraph.is_wrapped(None) is False
    wrapped = advgraph.wrap(model, mode="matrix")
    assert advgraph.is_wrapped(wrapped) is True
    assert advgraph.is_wrapped(advgraph.unwrap(wrapped)) is False


@pytest.mark.parametrize("kind", ["functional", "sequential", "subclassed"])
@pytest.mark.parametrize("mode", ["output", "matrix"])
def test_evaluate_and_predict_are_bit_identical(kind: str, mode: str) -> None:
    x, y = data()
    model = build(kind)
    model.fit(x, y, verbose=0)  # built and trained a little, as users have it
    predicted = keras.ops.convert_to_numpy(model.predict(x, verbose=0))
    evaluated = model.evaluate(x, y, verbose=0)
    wrapped = advgraph.wrap(model, mode=mode, epsilon=0.5)
    assert keras.ops.convert_to_numpy(wrapped.predict(x, verbose=0)).tobytes() == predicted.tobytes()
    assert wrapped.evaluate(x, y, verbose=0) == evaluated


@pytest.mark.parametrize(
    "method, kwargs, objective",
    # freelb has no clean pass: its objective is 'adv' only (no clean+adv case to run).
    [(m, k, o) for m, k in METHODS for o in ("clean+adv", "adv") if not (m == "freelb" and o == "clean+adv")],
)
@pytest.mark.parametrize("mode", ["output", "matrix"])
def test_every_method_trains_and_counts(method: str, kwargs: dict, mode: str, objective: str) -> None:
    kwargs = dict(kwargs, objective=objective)
    x, y = data()
    model = build()
    untouched = np.asarray(keras.ops.convert_to_numpy(emb_of(model).embeddings.value))[V - 4 :].copy()
    wrapped = advgraph.wrap(model, mode=mode, method=method, epsilon=0.5, **kwargs)
    history = wrapped.fit(x, y, batch_size=4, epochs=2, verbose=0)
    assert len(history.history["loss"]) == 2 and np.isfinite(history.history["loss"]).all()
    stats = dict(wrapped.advgraph_stats)
    assert stats["steps"] == 4, stats  # training steps (2 epochs of 2 batches), whatever the method
    assert stats["skipped_nonfinite"] == 0
    after = np.asarray(keras.ops.convert_to_numpy(emb_of(model).embeddings.value))
    # Rows no batch touched: no delta ever reached them (Adam leaves zero-gradient rows).
    assert after[V - 4 :].tobytes() == untouched.tobytes()
    assert "advgraph_counters" not in history.history


def test_adversarial_update_differs_from_the_plain_one() -> None:
    x, y = data()
    plain, adv = build("sequential", seed=3), build("sequential", seed=3)
    assert matrix_bytes(plain) == matrix_bytes(adv)
    adv = advgraph.wrap(adv, mode="output", epsilon=2.0)
    plain.fit(x, y, verbose=0, shuffle=False)
    adv.fit(x, y, verbose=0, shuffle=False)
    assert matrix_bytes(plain) != matrix_bytes(adv)


def test_matrix_mode_on_a_layer_without_embeddings_is_rejected_and_model_untouched() -> None:
    model = build()
    before = [np.asarray(keras.ops.convert_to_numpy(w)).tobytes() for w in model.weights]
    step = model.train_step
    with pytest.raises(ValueError, match="Received: target="):
        advgraph.wrap(model, target=model.layers[-1].name, mode="matrix")
    with pytest.raises(ValueError, match="Received: target="):
        advgraph.wrap(model, target="no_such_layer")
    with pytest.raises(TypeError, match="Received: target="):
        advgraph.wrap(model, target=3.5)
    with pytest.raises(ValueError, match="Received: epsilon="):
        advgraph.wrap(model, epsilon=-1.0)
    assert not advgraph.is_wrapped(model)
    assert model.train_step == step
    assert [np.asarray(keras.ops.convert_to_numpy(w)).tobytes() for w in model.weights] == before


def test_uncompiled_model_is_rejected() -> None:
    model = keras.Sequential([keras.Input((L,), dtype="int32"), keras.layers.Embedding(V, D)])
    with pytest.raises(ValueError, match="Received: model="):
        advgraph.wrap(model)


def test_replaced_train_step_raises_instead_of_training_plainly() -> None:
    x, y = data()
    wrapped = advgraph.wrap(build(), mode="matrix")
    object.__setattr__(wrapped, "train_step", type(wrapped).train_step.__get__(wrapped))
    with pytest.raises(RuntimeError, match="train_step"):
        wrapped.fit(x, y, verbose=0)


@pytest.mark.parametrize("mode", ["output", "matrix"])
def test_error_in_the_adversarial_pass_leaves_the_embedding_unperturbed(mode: str) -> None:
    """The second forward of the step raises; the stored matrix keeps its bytes.

    torch runs eagerly (Python restores); JAX raises while tracing the jitted step,
    which is functional (nothing was stored); TensorFlow runs eagerly here.
    """

    class Bomb(keras.layers.Layer):
        def __init__(self) -> None:
            super().__init__()
            self.armed, self.calls = False, 0

        def call(self, h, training=None):
            if training and self.armed:
                self.calls += 1
                if self.calls == 2:
                    raise RuntimeError("boom in the adversarial forward")
            return h

    bomb = Bomb()
    inp = keras.Input((L,), dtype="int32")
    out = keras.layers.Dense(C)(keras.layers.GlobalAveragePooling1D()(bomb(keras.layers.Embedding(V, D)(inp))))
    model = keras.Model(inp, out)
    model.compile(optimizer="sgd", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  run_eagerly=BACKEND == "tensorflow")
    x, y = data()
    wrapped = advgraph.wrap(model, mode=mode)
    before = matrix_bytes(model)
    bomb.armed = True
    with pytest.raises(Exception, match="boom"):
        wrapped.train_on_batch(x, y)
    assert matrix_bytes(model) == before


def test_frozen_embedding_matrix_mode_stays_bit_identical() -> None:
    x, y = data()
    model = build()
    emb_of(model).trainable = False
    model.compile(optimizer="adam", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    before = matrix_bytes(model)
    wrapped = advgraph.wrap(model, mode="matrix", epsilon=0.5)
    wrapped.fit(x, y, verbose=0, epochs=2, batch_size=4)
    assert wrapped.advgraph_stats["steps"] == 4
    assert matrix_bytes(model) == before


def test_token_and_position_embedding_gives_no_false_warning() -> None:
    keras_hub = pytest.importorskip("keras_hub")
    inp = keras.Input((L,), dtype="int32")
    tpe = keras_hub.layers.TokenAndPositionEmbedding(V, L, D, name="tpe")
    out = keras.layers.Dense(C)(keras.layers.GlobalAveragePooling1D()(tpe(inp)))
    model = keras.Model(inp, out)
    model.compile(optimizer="sgd", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    with warnings.catch_warnings():
        warnings.simplefilter("error", AdvGraphWarning)
        wrapped = advgraph.wrap(model, mode="matrix")
        assert wrapped.advgraph_target == "tpe/token_embedding"
        x, y = data()
        wrapped.fit(x, y, verbose=0)
    assert wrapped.advgraph_stats["steps"] == 1


@pytest.mark.parametrize("mode", ["output", "matrix"])
def test_keras_hub_gpt2_causal_lm(mode: str) -> None:
    """GPT-2's ReversibleEmbedding is also its LM head: the lookup only is the site."""
    keras_hub = pytest.importorskip("keras_hub")
    keras.utils.set_random_seed(0)
    backbone = keras_hub.models.GPT2Backbone(
        vocabulary_size=40, num_layers=1, num_heads=2, hidden_dim=8, intermediate_dim=16,
        max_sequence_length=L, dropout=0.0,
    )
    model = keras_hub.models.GPT2CausalLM(backbone, preprocessor=None)
    model.compile(optimizer="sgd", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    rng = np.random.default_rng(0)
    x = {"token_ids": rng.integers(1, 20, (4, L)).astype("int32"), "padding_mask": np.ones((4, L), "int32")}
    y = rng.integers(1, 20, (4, L)).astype("int32")
    untouched = matrix_bytes_of(backbone.token_embedding)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        wrapped = advgraph.wrap(model, mode=mode, epsilon=0.5)
        wrapped.fit(x, y, verbose=0)
    ours = [str(w.message) for w in caught if issubclass(w.category, AdvGraphWarning)]
    assert wrapped.advgraph_target.endswith("token_embedding")
    assert wrapped.advgraph_stats["steps"] == 1
    assert (len(ours) == 1 and "output head" in ours[0]) if mode == "matrix" else ours == []
    assert matrix_bytes_of(backbone.token_embedding) != untouched  # trained


def matrix_bytes_of(layer) -> bytes:
    return np.asarray(keras.ops.convert_to_numpy(layer.embeddings.value)).tobytes()


def test_only_the_active_backends_framework_is_imported() -> None:
    """advgraph adds no framework import beyond what keras itself imports."""
    code = (
        "import sys, keras, numpy as np, advgraph\n"
        "before = {f for f in ('tensorflow', 'jax', 'torch') if f in sys.modules}\n"
        "m = keras.Sequential([keras.Input((4,), dtype='int32'), keras.layers.Embedding(10, 3),\n"
        "                      keras.layers.GlobalAveragePooling1D(), keras.layers.Dense(2)])\n"
        "m.compile(optimizer='sgd', loss='mse')\n"
        "advgraph.wrap(m, mode='matrix')\n"
        "others = {'tensorflow', 'jax', 'torch'} - {keras.backend.backend()} - before\n"
        "print(sorted(o for o in others if o in sys.modules))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, KERAS_BACKEND=BACKEND))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == "[]"


def test_unknown_keras_version_is_a_clear_error(monkeypatch) -> None:
    from advgraph.adapters.keras import _private

    monkeypatch.setattr(keras, "version", lambda: "4.0.0")
    with pytest.raises(ImportError, match="supports Keras 3.*Received: keras_version='4.0.0'"):
        _private.check_keras_version()
    model = build()
    monkeypatch.delattr(type(model), "_loss_tracker", raising=False)
    object.__setattr__(model, "_loss_tracker", None)
    with pytest.raises(RuntimeError, match="Trainer._loss_tracker.*Received: keras_version="):
        _private.loss_tracker(model)


@pytest.mark.skipif(BACKEND != "tensorflow", reason="an assert inside TensorFlow's compiled graph")
@pytest.mark.parametrize("mode", ["output", "matrix"])
def test_tf_error_inside_the_compiled_step_leaves_the_embedding_unperturbed(mode: str) -> None:
    """The adversarial forward fails inside the tf.function graph (no Python
    ``finally`` runs there): nothing was written to the matrix, so it keeps its
    bytes. (XLA drops asserts: nothing raises in-graph there.)"""
    import tensorflow as tf

    class Bomb(keras.layers.Layer):
        def __init__(self) -> None:
            super().__init__()
            self.count = tf.Variable(0, trainable=False, dtype=tf.int32)

        def call(self, h, training=None):
            if training:
                self.count.assign_add(1)
                # Data-dependent on h: it runs after the (perturbed) lookup.
                after_lookup = self.count.read_value() + tf.cast(tf.reduce_sum(h) * 0.0, tf.int32)
                with tf.control_dependencies([tf.debugging.assert_less(after_lookup, 2)]):
                    h = tf.identity(h)
            return h

    inp = keras.Input((L,), dtype="int32")
    out = keras.layers.Dense(C)(keras.layers.GlobalAveragePooling1D()(Bomb()(keras.layers.Embedding(V, D)(inp))))
    model = keras.Model(inp, out)
    model.compile(optimizer="sgd", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  jit_compile=False)
    wrapped = advgraph.wrap(model, mode=mode, epsilon=1.0)
    before = matrix_bytes(model)
    x, y = data()
    with pytest.raises(Exception, match="(?i)assert"):
        wrapped.train_on_batch(x, y)
    assert matrix_bytes(model) == before


@pytest.mark.parametrize("mode", ["output", "matrix"])
def test_jit_compile_true_trains_adversarially(mode: str) -> None:
    """jit_compile=True (TF: XLA; JAX: jax.jit; torch: torch.compile around an eager
    adversarial step): real deltas, none skipped, a step that differs from plain fit."""
    x, y = data()
    plain, adv = build("sequential", jit_compile=True, seed=4), build("sequential", jit_compile=True, seed=4)
    adv = advgraph.wrap(adv, mode=mode, epsilon=1.0)
    plain.fit(x, y, verbose=0, shuffle=False, epochs=2)
    adv.fit(x, y, verbose=0, shuffle=False, epochs=2)
    assert dict(adv.advgraph_stats) == {"steps": 2, "plain_steps": 0, "skipped_nonfinite": 0, "skipped_zero": 0}
    assert matrix_bytes(plain) != matrix_bytes(adv)


# -- gp, r3f, neftune (issue 13) -----------------------------------------------------

NEW_METHODS = [
    ("gp", "output"), ("gp", "matrix"), ("r3f", "output"), ("r3f", "matrix"), ("neftune", "output"),
    ("smart", "output"), ("smart", "matrix"),
]
NEW_KNOBS = {
    "gp": {"epsilon": 0.5},
    "r3f": {"noise_eps": 0.1},
    "neftune": {"neftune_alpha": 5.0},
    "smart": {"steps": 1, "smart_mu": 1.0},
}
# Forwards per step: gp 1 (double backward), r3f 2 (one backward through both),
# neftune 1, smart 5 (teacher and clean forwards without backward, 1 ascent pass,
# clean + noisy forwards of the joint pass).
FORWARDS = {"gp": 1, "r3f": 2, "neftune": 1, "smart": 5}


class Counter(keras.layers.Layer):
    """Identity that counts its training forwards (eager steps only)."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.calls = 0

    def call(self, h, training=None):
        if training:
            self.calls += 1
        return h


@pytest.mark.parametrize("method, mode", NEW_METHODS)
def test_new_methods_train_count_and_forward_once_or_twice(method: str, mode: str) -> None:
    """Forwards per step (``FORWARDS``); ``steps`` counts each training step once;
    rows no batch touched keep their bytes."""
    counter = Counter()
    inp = keras.Input((L,), dtype="int32")
    h = counter(keras.layers.Embedding(V, D, name="emb")(inp))
    model = keras.Model(inp, keras.layers.Dense(C)(keras.layers.GlobalAveragePooling1D()(h)))
    model.compile(optimizer=keras.optimizers.Adam(0.01), run_eagerly=True,
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    untouched = np.asarray(keras.ops.convert_to_numpy(emb_of(model).embeddings.value))[V - 4 :].copy()
    x, y = data()
    wrapped = advgraph.wrap(model, mode=mode, method=method, **NEW_KNOBS[method])
    counter.calls = 0
    history = wrapped.fit(x, y, batch_size=4, epochs=1, verbose=0, shuffle=False)
    assert np.isfinite(history.history["loss"]).all()
    probe = 1 if BACKEND == "jax" else 0  # JAX: jax.eval_shape of the output's shape, no compute
    assert counter.calls == 2 * (FORWARDS[method] + probe)
    assert dict(wrapped.advgraph_stats) == {"steps": 2, "plain_steps": 0, "skipped_nonfinite": 0, "skipped_zero": 0}
    after = np.asarray(keras.ops.convert_to_numpy(emb_of(model).embeddings.value))
    assert after[V - 4 :].tobytes() == untouched.tobytes()


@pytest.mark.parametrize("method, mode", [m for m in NEW_METHODS if m[1] == "matrix"])
def test_new_methods_frozen_matrix_stays_bit_identical(method: str, mode: str) -> None:
    """The delta written to (TF with a reader of the matrix, torch) or passed into
    (JAX, TF functional path) the matrix is gone after the step: same bytes."""
    x, y = data()
    model = build()
    emb_of(model).trainable = False
    model.compile(optimizer="adam", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    before = matrix_bytes(model)
    wrapped = advgraph.wrap(model, mode=mode, method=method, **NEW_KNOBS[method])
    wrapped.fit(x, y, verbose=0, epochs=1, batch_size=4)
    assert wrapped.advgraph_stats["steps"] == 2
    assert matrix_bytes(model) == before


def test_r3f_error_in_the_noisy_forward_leaves_the_matrix_unperturbed() -> None:
    """r3f's second forward (the noisy one) raises; the stored matrix keeps its bytes."""

    class Bomb(keras.layers.Layer):
        def __init__(self) -> None:
            super().__init__()
            self.armed, self.calls = False, 0

        def call(self, h, training=None):
            if training and self.armed:
                self.calls += 1
                if self.calls == 2:
                    raise RuntimeError("boom in the noisy forward")
            return h

    bomb = Bomb()
    inp = keras.Input((L,), dtype="int32")
    out = keras.layers.Dense(C)(keras.layers.GlobalAveragePooling1D()(bomb(keras.layers.Embedding(V, D)(inp))))
    model = keras.Model(inp, out)
    model.compile(optimizer="sgd", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  run_eagerly=BACKEND == "tensorflow")
    x, y = data()
    wrapped = advgraph.wrap(model, mode="matrix", method="r3f", noise_eps=0.5)
    before = matrix_bytes(model)
    bomb.armed = True
    with pytest.raises(Exception, match="boom"):
        wrapped.train_on_batch(x, y)
    assert matrix_bytes(model) == before


@pytest.mark.parametrize("kind", ["functional", "subclassed"])
def test_neftune_no_noise_on_padding_and_per_sequence_scale(kind: str, monkeypatch) -> None:
    """Embedding(mask_zero=True): id 0 is padding. With the uniform draw fixed at its
    upper end (1), the noise is exactly alpha / sqrt(L_i * d) at each real token of
    sequence i (L_i its real tokens) and 0 at padding, on both the perturbation-layer
    route (functional) and the call-wrap route (subclassed)."""
    import advgraph._ops as ops

    for cls in (ops._ArrayApiOps, ops._TensorFlowOps):
        monkeypatch.setattr(cls, "uniform_like", lambda self, x, low, high, rng=None: self.zeros_like(x) + high)
    seen: list[np.ndarray] = []
    site_cls = _output_site_class()
    original = site_cls.on_output

    def on_output(self, x):
        out = original(self, x)
        _record(out - x, seen)
        return out

    monkeypatch.setattr(site_cls, "on_output", on_output)
    keras.utils.set_random_seed(0)
    if kind == "subclassed":

        class Net(keras.Model):
            def __init__(self) -> None:
                super().__init__()
                self.emb = keras.layers.Embedding(V, D, mask_zero=True, name="emb")
                self.fc = keras.layers.Dense(C)

            def call(self, x, training=None):
                h = self.emb(x)
                return self.fc(keras.ops.mean(h, axis=1))

        model = Net()
        model(np.zeros((1, L), "int32"))
    else:
        inp = keras.Input((L,), dtype="int32")
        h = keras.layers.Embedding(V, D, mask_zero=True, name="emb")(inp)
        model = keras.Model(inp, keras.layers.Dense(C)(keras.layers.GlobalAveragePooling1D()(h)))
    model.compile(optimizer="sgd", run_eagerly=True,
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    x, y = data()
    x = x[:4]
    lengths = np.array([5, 3, 1, 4])
    for i, n in enumerate(lengths):
        x[i, n:] = 0  # padding
    wrapped = advgraph.wrap(model, method="neftune", neftune_alpha=5.0)
    wrapped.train_on_batch(x, y[:4])
    assert len(seen) == 1
    noise = seen[0]
    expected = (5.0 / np.sqrt(lengths * D))[:, None, None] * (x != 0)[..., None] * np.ones((1, 1, D))
    np.testing.assert_allclose(noise, expected, rtol=1e-6, atol=1e-7)
    assert not noise[x == 0].any()  # exactly zero on padding


def _output_site_class():
    if BACKEND == "jax":
        from advgraph.adapters.keras._jax import JaxSite

        return JaxSite
    if BACKEND == "torch":
        from advgraph.adapters.keras._torch import TorchSite

        return TorchSite
    from advgraph.adapters.keras._tf import OutputSite

    return OutputSite


def _record(value, seen: list) -> None:
    if BACKEND == "jax":
        import jax

        jax.debug.callback(lambda v: seen.append(np.asarray(v)), value)
    elif BACKEND == "torch":
        seen.append(value.detach().cpu().numpy())
    else:
        seen.append(value.numpy())


def _all_bytes(model: keras.Model) -> list[bytes]:
    return [np.asarray(keras.ops.convert_to_numpy(w)).tobytes() for w in model.weights]


def test_awp_bad_targets_are_a_clear_error_and_model_untouched() -> None:
    model = build()
    before, step = _all_bytes(model), model.train_step
    pool = next(l.name for l in model.layers if isinstance(l, keras.layers.GlobalAveragePooling1D))
    with pytest.raises(ValueError, match="Received: target="):  # a layer without weights
        advgraph.wrap(model, method="awp", target=pool)
    with pytest.raises(ValueError, match="Received: target="):
        advgraph.wrap(model, method="awp", target="no_such_layer")
    with pytest.raises(ValueError, match="Received: method='awp', mode='matrix'"):
        advgraph.wrap(model, method="awp", mode="matrix")
    assert not advgraph.is_wrapped(model) and model.train_step == step
    assert _all_bytes(model) == before


def test_awp_perturbs_kernels_embeddings_and_scales_not_biases() -> None:
    inp = keras.Input((L,), dtype="int32")
    h = keras.layers.GlobalAveragePooling1D()(keras.layers.Embedding(V, D, name="emb")(inp))
    out = keras.layers.Dense(C, name="fc")(keras.layers.LayerNormalization(name="ln")(h))
    model = keras.Model(inp, out)
    model.compile(optimizer="sgd", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    wrapped = advgraph.wrap(model, method="awp", target="")
    names = sorted(w.path for w in wrapped.__dict__["_advgraph"].weights)
    assert names == ["emb/embeddings", "fc/kernel", "ln/gamma"]
    advgraph.unwrap(wrapped)
    wrapped = advgraph.wrap(model, method="awp", target="fc, ln")
    assert sorted(w.path for w in wrapped.__dict__["_advgraph"].weights) == ["fc/kernel", "ln/gamma"]
    assert wrapped.advgraph_route == "weights" and wrapped.advgraph_target == "fc,ln"


def test_awp_restores_every_weight_exactly_and_runs_two_forwards() -> None:
    """With a learning rate of 0 the optimizer changes nothing, so after AWP steps every
    weight must hold its bytes: the perturbation is gone (TF / torch: assigned back;
    JAX: never stored). Two forwards per step; ``steps`` counts training steps."""
    counter = Counter()
    inp = keras.Input((L,), dtype="int32")
    h = keras.layers.GlobalAveragePooling1D()(counter(keras.layers.Embedding(V, D)(inp)))
    out = keras.layers.Dense(C)(keras.layers.LayerNormalization()(h))
    model = keras.Model(inp, out)
    model.compile(optimizer=keras.optimizers.SGD(0.0), run_eagerly=True,
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    x, y = data()
    wrapped = advgraph.wrap(model, method="awp", target="", adv_lr=0.5, adv_eps=0.5)
    before = _all_bytes(model)
    counter.calls = 0
    wrapped.fit(x, y, batch_size=4, epochs=1, verbose=0, shuffle=False)
    assert counter.calls == 2 * 2
    assert _all_bytes(model) == before
    assert dict(wrapped.advgraph_stats) == {"steps": 2, "plain_steps": 0, "skipped_nonfinite": 0, "skipped_zero": 0}


def test_awp_error_in_the_adversarial_pass_restores_the_weights() -> None:
    class Bomb(keras.layers.Layer):
        def __init__(self) -> None:
            super().__init__()
            self.armed, self.calls = False, 0

        def call(self, h, training=None):
            if training and self.armed:
                self.calls += 1
                if self.calls == 2:
                    raise RuntimeError("boom in the adversarial forward")
            return h

    bomb = Bomb()
    inp = keras.Input((L,), dtype="int32")
    out = keras.layers.Dense(C)(keras.layers.GlobalAveragePooling1D()(bomb(keras.layers.Embedding(V, D)(inp))))
    model = keras.Model(inp, out)
    model.compile(optimizer="sgd", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  run_eagerly=BACKEND == "tensorflow")
    x, y = data()
    wrapped = advgraph.wrap(model, method="awp", target="", adv_lr=0.5, adv_eps=0.5)
    before = _all_bytes(model)
    bomb.armed = True
    with pytest.raises(Exception, match="boom"):
        wrapped.train_on_batch(x, y)
    assert _all_bytes(model) == before


def test_neftune_in_matrix_mode_is_rejected() -> None:
    model = build()
    with pytest.raises(ValueError, match="mode='matrix'|Received: mode="):
        advgraph.wrap(model, mode="matrix", method="neftune")
    assert not advgraph.is_wrapped(model)


@pytest.mark.parametrize("method", ["r3f", "smart"])
def test_r3f_smart_on_an_unlabeled_batch_is_a_clear_error(method: str) -> None:
    """r3f / smart add their regulariser to the supervised loss: they need labels."""
    model = build()
    wrapped = advgraph.wrap(model, method=method)
    x, y = data()
    wrapped.train_on_batch(x, y)  # built (Keras' own checks of y ran on a labeled batch)
    before = matrix_bytes(model)
    with pytest.raises(ValueError, match="Received: y=None"):
        wrapped.train_on_batch(x)
    assert matrix_bytes(model) == before


def test_smart_on_an_unbuilt_model_is_a_clear_error() -> None:
    """The teacher copies the trainable weights: they must exist at wrap() time."""
    model = keras.Sequential([keras.layers.Embedding(V, D), keras.layers.GlobalAveragePooling1D(), keras.layers.Dense(C)])
    model.compile(optimizer="sgd", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    with pytest.raises(ValueError, match="Received: model=.*trainable_weights=0"):
        advgraph.wrap(model, method="smart", smart_mu=1.0)
    assert not advgraph.is_wrapped(model)


def test_smart_teacher_is_not_in_logs_and_unwrap_removes_it() -> None:
    x, y = data()
    model = build()
    metrics_before = len(model.metrics)
    wrapped = advgraph.wrap(model, method="smart", smart_mu=1.0, smart_beta=0.9)
    history = wrapped.fit(x, y, batch_size=4, epochs=1, verbose=0)
    assert set(history.history) == {"loss", "accuracy"}
    plain = advgraph.unwrap(wrapped)
    assert not any("teacher" in m.name for m in plain.metrics)
    assert len(plain.metrics) == metrics_before


def test_r3f_matrix_with_a_tied_head_is_refused_on_torch_only() -> None:
    """torch edits the matrix in place for the noisy forward; a tied head's graph from
    the clean forward would be differentiated at the perturbed values: refused there."""

    class TiedHead(keras.layers.Layer):
        def __init__(self, matrix) -> None:
            super().__init__()
            self.matrix = matrix  # tracked: the matrix is one of this layer's weights

        def call(self, h):
            return keras.ops.matmul(h, keras.ops.transpose(self.matrix))

    inp = keras.Input((L,), dtype="int32")
    emb = keras.layers.Embedding(V, D, name="emb")
    emb.build((None, L))
    out = TiedHead(emb.embeddings)(keras.layers.GlobalAveragePooling1D()(emb(inp)))
    model = keras.Model(inp, out)
    model.compile(optimizer="sgd", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", AdvGraphWarning)
        if BACKEND == "torch":
            with pytest.raises(ValueError, match="Received: method='r3f', target='emb', matrix_shared=True"):
                advgraph.wrap(model, mode="matrix", method="r3f")
            assert not advgraph.is_wrapped(model)
        else:
            wrapped = advgraph.wrap(model, mode="matrix", method="r3f")
            x, y = data()
            wrapped.train_on_batch(x, y % C)
            assert wrapped.advgraph_stats["steps"] == 1


# -- real noise draws (issue 19) ------------------------------------------------------
# Every other Keras test replaces the draws by fixed arrays. Here the draws are real:
# a probe layer right after the embedding stores what each forward of a step sees
# (in non-trainable variables, so it works inside tf.function, XLA and jax.jit),
# the optimizer has learning rate 0 (the weights stay put), and the noise of a
# forward is the probe's value minus the clean embedding output E[x].

NB, NL, ND, NV = 8, 16, 16, 64  # 2048 noise entries per forward: tight statistics
# (method, mode, knobs, forwards per step, the forward holding the raw draw, kind)
NOISE_CASES = [
    ("r3f", "output", {"noise_eps": 0.05}, 2, 1, "uniform"),
    ("r3f", "output", {"noise_eps": 0.05, "noise_type": "normal"}, 2, 1, "normal"),
    ("r3f", "matrix", {"noise_eps": 0.05}, 2, 1, "uniform"),
    ("neftune", "output", {"neftune_alpha": 5.0}, 1, 0, "uniform"),
    # clean, ascent pass (the N(0, eps^2) start), joint clean, joint noisy (no teacher)
    ("smart", "output", {"noise_eps": 0.05, "smart_mu": 0.0}, 4, 1, "normal"),
    ("vat", "output", {"xi": 0.1}, 3, 1, "direction"),  # clean, power iteration, final
]
NOISE_JITS = [False, True] if BACKEND == "tensorflow" else ["auto"]


class Probe(keras.layers.Layer):
    """Identity that stores the input of each of its last ``slots`` forwards."""

    def __init__(self, slots: int, **kwargs) -> None:
        super().__init__(**kwargs)
        self.slots = slots

    def build(self, shape) -> None:
        self.seen = self.add_weight(shape=(self.slots, NB, NL, ND), initializer="zeros", trainable=False, name="seen")
        self.count = self.add_weight(shape=(), initializer="zeros", dtype="int32", trainable=False, name="count")

    def compute_output_shape(self, shape):
        return shape

    def call(self, h):
        count = self.count.value
        i = keras.ops.mod(count, self.slots)
        value = keras.ops.expand_dims(keras.ops.stop_gradient(h), 0)
        self.seen.assign(keras.ops.slice_update(self.seen.value, [i, 0, 0, 0], value))
        self.count.assign(count + 1)
        return h


def _noise_run(method: str, mode: str, knobs: dict, forwards: int, jit_compile):
    """Two fit() steps on the same batch: ``(noise, count, x)``, the noise of every
    forward (2 * forwards, NB, NL, ND), the probe's forward count and the ids."""
    keras.utils.set_random_seed(0)
    inp = keras.Input((NL,), dtype="int32")
    probe = Probe(2 * forwards, name="probe")
    h = probe(keras.layers.Embedding(NV, ND, name="emb")(inp))
    model = keras.Model(inp, keras.layers.Dense(C)(keras.layers.GlobalAveragePooling1D()(h)))
    model.compile(optimizer=keras.optimizers.SGD(0.0), jit_compile=jit_compile,
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    # Distinct ids within a sequence (NL of NV); sequences share rows in matrix mode.
    x = np.stack([np.random.default_rng(i).permutation(NV)[:NL] for i in range(NB)]).astype("int32")
    y = np.random.default_rng(1).integers(0, C, NB).astype("int32")
    wrapped = advgraph.wrap(model, mode=mode, method=method, **knobs)
    clean = np.asarray(keras.ops.convert_to_numpy(emb_of(model).embeddings))[x]
    # One epoch of two batches holding the same ids: two calls of the compiled step.
    wrapped.fit(np.concatenate([x, x]), np.concatenate([y, y]), batch_size=NB, epochs=1, shuffle=False, verbose=0)
    assert np.asarray(keras.ops.convert_to_numpy(emb_of(model).embeddings))[x].tobytes() == clean.tobytes()
    count = int(keras.ops.convert_to_numpy(probe.count))
    seen = np.asarray(keras.ops.convert_to_numpy(probe.seen), dtype=np.float64)
    return seen - clean.astype(np.float64)[None], count, x


def _distinct(z: np.ndarray, x: np.ndarray, mode: str) -> np.ndarray:
    """The independent draws: every entry (output mode); one row per id (matrix mode:
    every occurrence of an id carries its row's delta, taken at its first position)."""
    if mode == "output":
        return z.reshape(-1)
    _, first = np.unique(x.reshape(-1), return_index=True)
    return z.reshape(-1, z.shape[-1])[first].reshape(-1)


@pytest.mark.parametrize("jit_compile", NOISE_JITS)
@pytest.mark.parametrize(
    "method, mode, knobs, forwards, raw, kind", NOISE_CASES,
    ids=[f"{c[0]}-{c[1]}-{c[5]}" for c in NOISE_CASES],
)
def test_real_noise_draws_have_their_distribution_and_change_every_step(
    method: str, mode: str, knobs: dict, forwards: int, raw: int, kind: str, jit_compile
) -> None:
    """Real draws inside the compiled train step (TF: tf.function with and without
    XLA; JAX: jax.jit; torch): the right range and distribution, and a fresh draw in
    the second step. Tolerances are 5 standard errors of each statistic at its
    sample size n (>= 800 entries)."""
    noise, count, x = _noise_run(method, mode, knobs, forwards, jit_compile)
    assert count == 2 * forwards, count  # every forward of both compiled steps ran the probe
    draws = [noise[raw], noise[forwards + raw]]
    # float32 rounding of (e + z) - e with |e| <= 0.05 (Keras' uniform init): <= 1 ulp of 0.1.
    slack = 2.0**-23 * 0.1
    for z in draws:
        if kind == "uniform":
            bound = knobs.get("noise_eps") or knobs["neftune_alpha"] / np.sqrt(NL * ND)
            u = _distinct(z, x, mode)
            n = u.size
            assert n >= 800, n
            assert np.abs(u).max() <= bound + slack
            # U(-b, b): the largest |draw| of n >= 800 is above 0.98 b (P(fail) = 0.98^n
            # < 1e-7); std b / sqrt(3) (relative standard error sqrt(0.8 / 4n)); mean 0.
            assert np.abs(u).max() >= 0.98 * bound
            assert abs(u.std() / (bound / np.sqrt(3)) - 1) < 5 * np.sqrt(0.8 / (4 * n)), u.std()
            assert abs(u.mean()) < 5 * bound / np.sqrt(3 * n), u.mean()
        elif kind == "normal":
            sigma = knobs["noise_eps"]
            u = _distinct(z, x, mode)
            n = u.size
            # N(0, sigma^2): std (relative standard error 1 / sqrt(2n)), mean 0, and
            # |z| > 2 sigma in 4.55% of entries (a uniform of the same std has none).
            assert abs(u.std() / sigma - 1) < 5 / np.sqrt(2 * n), u.std()
            assert abs(u.mean()) < 5 * sigma / np.sqrt(n), u.mean()
            tail = (np.abs(u) > 2 * sigma).mean()
            assert abs(tail - 0.0455) < 5 * np.sqrt(0.0455 * 0.9545 / n), tail
        else:  # VAT's start: xi * z / ||z|| per sample, z standard normal
            xi = knobs["xi"]
            np.testing.assert_allclose(np.sqrt((z**2).sum(axis=(1, 2))), xi, rtol=1e-3)
            unit = (z * np.sqrt(NL * ND) / xi).reshape(-1)  # ~ N(0, 1) entries
            tail = (np.abs(unit) > 2).mean()
            assert abs(tail - 0.0455) < 5 * np.sqrt(0.0455 * 0.9545 / unit.size), tail
    # The clean forwards carry no noise at all.
    clean_slots = {"r3f": [0], "smart": [0, 2], "vat": [0], "neftune": []}[method]
    for k in clean_slots:
        assert not noise[k].any() and not noise[forwards + k].any(), k
    # Step 2 draws afresh: the compiled step must not bake one draw in.
    a, b = (_distinct(z, x, mode) for z in draws)
    assert (a == b).mean() < 0.01, "the same noise in two steps"
    assert abs(np.corrcoef(a, b)[0, 1]) < 5 / np.sqrt(a.size)
