"""keras-hub models built from constructor arguments (no presets, preprocessor=None).

BERT / DistilBERT / RoBERTa classifiers and GPT-2 / Gemma causal LMs, whose
``ReversibleEmbedding`` is also the LM head (``reverse=True``): target="embedding"
is the token embedding; mode='output' perturbs the lookup call only; mode='matrix'
takes the lookup's gradient only (checked against a hand computation: the whole
matrix gradient minus the head's), touches only the looked-up rows, and warns
that the tied head sees the perturbation; container layers (TokenAndPositionEmbedding)
give no false warning. TensorFlow backend here; JAX and torch run the GPT-2 case in
keras_backend_cases.py.
"""

from __future__ import annotations

import os
import warnings

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")
keras_hub = pytest.importorskip("keras_hub")

import advgraph  # noqa: E402
import advgraph.methods._common as methods  # noqa: E402
from advgraph._errors import AdvGraphWarning  # noqa: E402

if keras.backend.backend() != "tensorflow":  # pragma: no cover
    pytest.skip(
        f"this file is the TensorFlow run (tf.GradientTape references); KERAS_BACKEND="
        f"{os.environ.get('KERAS_BACKEND')!r} selects {keras.backend.backend()!r} "
        "(JAX and torch run the GPT-2 case in keras_backend_cases.py via test_keras_backends.py)",
        allow_module_level=True,
    )

V, L, B, EPS = 50, 8, 4, 0.5
SMALL = dict(num_layers=1, num_heads=2, hidden_dim=8, intermediate_dim=16, max_sequence_length=L)


def bert():
    return keras_hub.models.BertTextClassifier(
        keras_hub.models.BertBackbone(vocabulary_size=V, **SMALL), 2, preprocessor=None, dropout=0.0
    )


def distilbert():
    return keras_hub.models.DistilBertTextClassifier(
        keras_hub.models.DistilBertBackbone(vocabulary_size=V, **SMALL), 2, preprocessor=None, dropout=0.0
    )


def roberta():
    return keras_hub.models.RobertaTextClassifier(
        keras_hub.models.RobertaBackbone(vocabulary_size=V, **SMALL), 2, preprocessor=None, dropout=0.0
    )


def gpt2():
    return keras_hub.models.GPT2CausalLM(
        keras_hub.models.GPT2Backbone(vocabulary_size=V, dropout=0.0, **SMALL), preprocessor=None
    )


def gemma():
    backbone = keras_hub.models.GemmaBackbone(
        vocabulary_size=V, num_layers=1, num_query_heads=2, num_key_value_heads=1,
        hidden_dim=8, intermediate_dim=16, head_dim=4,
    )
    return keras_hub.models.GemmaCausalLM(backbone, preprocessor=None)


MODELS = {"bert": bert, "distilbert": distilbert, "roberta": roberta, "gpt2": gpt2, "gemma": gemma}
CAUSAL = ("gpt2", "gemma")


def batch(name: str, seed: int = 0):
    rng = np.random.default_rng(seed)
    x = {"token_ids": rng.integers(1, V // 2, (B, L)).astype("int32"), "padding_mask": np.ones((B, L), "int32")}
    if name == "bert":
        x["segment_ids"] = np.zeros((B, L), "int32")
    y = rng.integers(1, V // 2, (B, L)) if name in CAUSAL else rng.integers(0, 2, B)
    return x, y.astype("int32")


def compiled(name: str):
    keras.utils.set_random_seed(0)
    model = MODELS[name]()
    model.compile(
        optimizer=keras.optimizers.SGD(0.1),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        run_eagerly=True,  # the spies below read concrete values
    )
    return model


@pytest.fixture
def deltas(monkeypatch):
    seen = []
    original = methods.compute_delta

    def spy(*args, **kwargs):
        result = original(*args, **kwargs)
        seen.append(result.delta.numpy())
        return result

    monkeypatch.setattr(methods, "compute_delta", spy)
    return seen


@pytest.mark.parametrize("mode", ["output", "matrix"])
@pytest.mark.parametrize("name", list(MODELS))
def test_trains_on_the_token_embedding_without_false_warnings(name, mode, deltas) -> None:
    model = compiled(name)
    x, y = batch(name)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        wrapped = advgraph.wrap(model, mode=mode, epsilon=EPS)
        history = wrapped.fit(x, y, verbose=0)
    ours = [str(w.message) for w in caught if issubclass(w.category, AdvGraphWarning)]
    assert wrapped.advgraph_target.endswith("token_embedding")
    assert wrapped.advgraph_stats["steps"] == 1
    assert np.isfinite(history.history["loss"]).all()
    (delta,) = deltas
    if mode == "output":  # the lookup's output (b, n, d), never the head's logits (b, n, V)
        assert delta.shape == (B, L, 8)
        assert ours == []
    else:  # the looked-up rows only
        assert delta.shape == (len(np.unique(x["token_ids"])), 8)
        if name in CAUSAL:
            assert len(ours) == 1 and "output head" in ours[0]
        else:
            assert ours == []


@pytest.mark.parametrize("name", CAUSAL)
def test_matrix_delta_comes_from_the_lookup_gradient_only(name, deltas) -> None:
    model = compiled(name)
    x, y = batch(name, seed=1)
    emb = model.backbone.token_embedding
    # By hand: the matrix gradient through both uses, minus the tied head's part
    # (logits = H @ E^T, so dL/dE|head = dL/dlogits^T @ H).
    with tf.GradientTape(persistent=True) as tape:
        hidden = model.backbone(x, training=True)
        logits = emb(hidden, reverse=True)
        loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)(y, logits)
    total = tf.convert_to_tensor(tape.gradient(loss, emb.embeddings)).numpy()
    g_logits = tape.gradient(loss, logits).numpy().reshape(-1, V)
    head = g_logits.T @ hidden.numpy().reshape(-1, hidden.shape[-1])
    lookup = (total - head)[np.unique(x["token_ids"])]
    expected = EPS * lookup / np.linalg.norm(lookup)
    assert np.abs(head).max() > 1e-3  # the head's part is not negligible: the test can fail
    before = emb.embeddings.numpy().copy()
    with pytest.warns(AdvGraphWarning, match="output head"):
        wrapped = advgraph.wrap(model, mode="matrix", epsilon=EPS)
        wrapped.train_on_batch(x, y)
    np.testing.assert_allclose(deltas[0], expected, rtol=1e-4, atol=1e-6)
    assert not np.array_equal(before, emb.embeddings.numpy())  # trained


@pytest.mark.parametrize("name", CAUSAL)
def test_output_mode_perturbs_the_lookup_not_the_head(name) -> None:
    model = compiled(name)
    x, y = batch(name)
    wrapped = advgraph.wrap(model, mode="output", epsilon=EPS)
    calls = []
    site_hook = wrapped._advgraph.hook
    original = type(site_hook).__call__

    def counting(self, out, *args, **kwargs):
        if self.active_site() is not None:
            calls.append(tuple(out.shape))
        return original(self, out, *args, **kwargs)

    type(site_hook).__call__ = counting
    try:
        wrapped.train_on_batch(x, y)
    finally:
        type(site_hook).__call__ = original
    assert calls and set(calls) == {(B, L, 8)}  # only lookups, never (B, L, V) logits
    assert wrapped.advgraph_stats["steps"] == 1
