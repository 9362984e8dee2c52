"""Small Keras models and helpers shared by the Keras adapter tests (no tests here).

Every model is embedding -> mean over the sequence -> dense (the cross-framework
model), built three ways: Sequential, functional and subclassed. Weights come from
a numpy generator so that tests can rebuild the same model twice.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")

if keras.backend.backend() != "tensorflow":  # pragma: no cover - depends on the environment
    pytest.skip(
        "the in-process Keras tests are written for the TensorFlow backend (several compute "
        f"their references with TensorFlow); KERAS_BACKEND={os.environ.get('KERAS_BACKEND')!r} "
        f"selects {keras.backend.backend()!r} here. The adapter on JAX and torch: "
        "tests/test_keras_backends.py (one subprocess per backend)",
        allow_module_level=True,
    )

VOCAB, DIM, CLASSES, LENGTH = 13, 4, 3, 5


def weights(seed: int = 0, vocab: int = VOCAB, dim: int = DIM, classes: int = CLASSES) -> dict[str, np.ndarray]:
    """Embedding matrix, dense kernel (in, out) and bias, float32."""
    rng = np.random.default_rng(seed)
    return {
        "E": rng.normal(0.0, 1.0, (vocab, dim)).astype(np.float32),
        "W": rng.normal(0.0, 0.5, (dim, classes)).astype(np.float32),
        "b": rng.normal(0.0, 0.1, (classes,)).astype(np.float32),
    }


def batch(seed: int = 0, n: int = 6, vocab: int = VOCAB, length: int = LENGTH) -> tuple[np.ndarray, np.ndarray]:
    """Token ids (n, length) int32 and labels (n,) int32; ids repeat (small vocabulary)."""
    rng = np.random.default_rng(1000 + seed)
    x = rng.integers(0, vocab, (n, length)).astype(np.int32)
    y = rng.integers(0, CLASSES, (n,)).astype(np.int32)
    return x, y


def _layers(w: dict[str, np.ndarray], emb_name: str = "Embedding-Token") -> tuple[Any, Any, Any]:
    vocab, dim = w["E"].shape
    emb = keras.layers.Embedding(
        vocab, dim, name=emb_name, embeddings_initializer=keras.initializers.Constant(w["E"])
    )
    pool = keras.layers.GlobalAveragePooling1D(name="pool")
    dense = keras.layers.Dense(
        w["W"].shape[1],
        name="dense",
        kernel_initializer=keras.initializers.Constant(w["W"]),
        bias_initializer=keras.initializers.Constant(w["b"]),
    )
    return emb, pool, dense


def sequential(w: dict[str, np.ndarray] | None = None, **kw: Any) -> keras.Model:
    emb, pool, dense = _layers(w or weights(), **kw)
    return keras.Sequential([keras.Input((LENGTH,), dtype="int32", name="tokens"), emb, pool, dense], name="seq")


def functional(w: dict[str, np.ndarray] | None = None, **kw: Any) -> keras.Model:
    emb, pool, dense = _layers(w or weights(), **kw)
    tokens = keras.Input((LENGTH,), dtype="int32", name="tokens")
    return keras.Model(tokens, dense(pool(emb(tokens))), name="func")


class Subclassed(keras.Model):
    """A subclassed model with the same layers (no graph to rewrite)."""

    def __init__(self, w: dict[str, np.ndarray] | None = None, **kwargs: Any) -> None:
        super().__init__(name="sub", **kwargs)
        self.emb, self.pool, self.dense = _layers(w or weights())

    def call(self, x: Any) -> Any:
        return self.dense(self.pool(self.emb(x)))


def subclassed(w: dict[str, np.ndarray] | None = None) -> keras.Model:
    model = Subclassed(w)
    model(np.zeros((1, LENGTH), np.int32))  # build: weights exist before wrap
    return model


BUILDERS = {"sequential": sequential, "functional": functional, "subclassed": subclassed}


def loss_fn() -> Any:
    return keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def compiled(kind: str = "functional", lr: float = 0.1, seed: int = 0, **compile_kw: Any) -> keras.Model:
    """A model of ``kind`` with the weights of ``seed``, compiled with plain SGD."""
    model = BUILDERS[kind](weights(seed))
    compile_kw.setdefault("optimizer", keras.optimizers.SGD(learning_rate=lr))
    model.compile(loss=loss_fn(), **compile_kw)
    return model


def embedding_of(model: keras.Model) -> Any:
    """The (only) Embedding layer of a test model."""
    return next(
        layer for layer in model._flatten_layers() if isinstance(layer, keras.layers.Embedding)
    )


def snapshot(model: keras.Model) -> list[bytes]:
    """Bytes of every weight, in order (compare bytes: -0.0 == 0.0 and NaN != NaN)."""
    return [v.numpy().tobytes() for v in model.weights]


def fgm(g: np.ndarray, epsilon: float, per_sample: bool) -> np.ndarray:
    """The seed's formula by hand, in float64: epsilon * g / ||g|| (0 for g == 0)."""
    g = np.asarray(g, np.float64)
    axes = tuple(range(1, g.ndim)) if per_sample else None
    norm = np.sqrt((g * g).sum(axis=axes, keepdims=per_sample))
    return np.where(norm > 0, epsilon * g / np.where(norm > 0, norm, 1.0), 0.0)
