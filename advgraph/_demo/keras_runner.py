"""Keras 3 side of ``advgraph demo`` (any backend: TensorFlow, JAX, torch).

Thin on purpose: the same model as ``torch_runner``, trained with
``model.compile(...)``, ``model = advgraph.wrap(model, ...)``, ``model.fit(...)``.
The evaluation attack runs a second functional model that starts from the
embedding output and shares every layer (and so every weight) with the trained one.
"""

from __future__ import annotations

import os

from advgraph._demo.quiet import native_stderr_silenced, quiet_tensorflow_environment

quiet_tensorflow_environment()  # the demo's output is the table: before TensorFlow loads

from typing import Any, Callable  # noqa: E402

import numpy as np  # noqa: E402

with native_stderr_silenced():  # TensorFlow's C++ start-up lines (oneDNN, CUDA probing)
    import keras  # noqa: E402

    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf  # noqa: E402

        tf.config.list_physical_devices()  # probes for GPUs (a CUDA error line) here, silently

# The first batch of fit() traces and compiles the train function: the progress bar
# says so instead of showing an ETA computed from it.
FIRST_STEP = "compiling…"

import advgraph  # noqa: E402
from advgraph._demo.data import PAD, Encoded  # noqa: E402
from advgraph._demo.settings import DemoError, DemoSettings, method_kwargs  # noqa: E402

__all__ = ["Trainer", "build_models", "check_methods", "configure"]


def configure() -> None:
    """One TensorFlow thread unless OMP_NUM_THREADS says otherwise: the model is tiny,
    and on a busy machine extra threads only wait for each other."""
    if "OMP_NUM_THREADS" not in os.environ and keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        try:
            tf.config.threading.set_intra_op_parallelism_threads(1)
            tf.config.threading.set_inter_op_parallelism_threads(1)
        except RuntimeError:  # TensorFlow already initialised: keep its setting
            pass


def build_models(vocab_size: int, classes: int, s: DemoSettings) -> tuple[keras.Model, keras.Model]:
    """``(model, from_embedded)``: tokens -> logits, and (embedded, tokens) -> logits.

    Embedding -> mean over non-padding tokens -> Dense+ReLU -> dropout -> Dense,
    as ``torch_runner.MeanPoolClassifier``; both models share the layers after the
    embedding.
    """
    embedding = keras.layers.Embedding(
        vocab_size,
        s.embed_dim,
        embeddings_initializer=keras.initializers.RandomNormal(stddev=s.embed_init_std),
        embeddings_constraint=keras.constraints.MaxNorm(s.max_norm, axis=1),
        name="embedding",
    )
    hidden = keras.layers.Dense(s.hidden, activation="relu", name="hidden")
    dropout = keras.layers.Dropout(s.dropout, name="dropout")
    head = keras.layers.Dense(classes, name="head")

    def classify(embedded: Any, tokens: Any) -> Any:
        mask = keras.ops.expand_dims(keras.ops.cast(keras.ops.not_equal(tokens, PAD), "float32"), -1)
        pooled = keras.ops.sum(embedded * mask, axis=1) / keras.ops.maximum(keras.ops.sum(mask, axis=1), 1.0)
        return head(dropout(hidden(pooled)))

    tokens = keras.Input((s.max_len,), dtype="int32", name="tokens")
    model = keras.Model(tokens, classify(embedding(tokens), tokens), name="mean_pool_classifier")
    embedded_in = keras.Input((s.max_len, s.embed_dim), name="embedded")
    tokens_in = keras.Input((s.max_len,), dtype="int32", name="tokens_for_mask")
    from_embedded = keras.Model([embedded_in, tokens_in], classify(embedded_in, tokens_in), name="from_embedded")
    return model, from_embedded


def _compile(model: keras.Model, s: DemoSettings) -> None:
    model.compile(
        optimizer=keras.optimizers.Adam(s.learning_rate),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )


def check_methods(settings: DemoSettings) -> None:
    """Fail early, naming every requested method the Keras adapter cannot train.

    Each adversarial method is tried on a tiny model for one step.
    """
    try:
        import advgraph.adapters.keras  # noqa: F401
    except ImportError as exc:
        raise DemoError(
            f"--framework keras needs advgraph's Keras adapter (advgraph.adapters.keras), which "
            f"cannot be imported here: {exc}. Use --framework torch."
        ) from None
    tiny = DemoSettings(max_len=4, embed_dim=4, hidden=4, mode=settings.mode, epsilon=settings.epsilon)
    x = np.array([[2, 3, 0, 0], [4, 5, 6, 0]], dtype=np.int32)
    y = np.array([0, 1], dtype=np.int32)
    failed = []
    for method in settings.methods:
        if method == "none":
            continue
        model, _ = build_models(8, 2, tiny)
        _compile(model, tiny)
        try:
            model = advgraph.wrap(model, **method_kwargs(method, tiny))
            model.train_on_batch(x, y)
        except Exception as exc:  # noqa: BLE001 - reported to the user below
            first_line = (str(exc).strip().splitlines() or [""])[0]
            failed.append(f"{method} ({type(exc).__name__}: {first_line[:160]})")
    if failed:
        supported = [m for m in settings.methods if m == "none" or not any(f.startswith(m + " ") for f in failed)]
        raise DemoError(
            f"advgraph's Keras adapter cannot train these methods in mode={settings.mode!r} yet: "
            + "; ".join(failed)
            + f". Run them with --framework torch, or leave them out: --methods {','.join(supported)}"
        )


class _Progress(keras.callbacks.Callback):
    def __init__(self, on_batch: Callable[[], None]) -> None:
        super().__init__()
        self._on_batch = on_batch

    def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
        self._on_batch()


class Trainer:
    """One model trained with one method and one seed (see ``run.Trainer``)."""

    def __init__(self, method: str, seed: int, enc: Encoded, settings: DemoSettings) -> None:
        keras.utils.set_random_seed(seed)
        self.settings = settings
        self.model, self.from_embedded = build_models(enc.vocab_size, enc.num_classes, settings)
        _compile(self.model, settings)
        self.trained = self.model
        if method != "none":
            self.trained = advgraph.wrap(self.model, **method_kwargs(method, settings))
        self.embedding = self.model.get_layer("embedding")

    def train_epoch(self, x: np.ndarray, y: np.ndarray, on_batch: Callable[[], None]) -> float:
        history = self.trained.fit(
            x, y, batch_size=self.settings.batch_size, epochs=1, shuffle=False, verbose=0,
            callbacks=[_Progress(on_batch)],
        )
        return float(history.history["loss"][-1])

    def embed(self, x: np.ndarray) -> Any:
        return self.embedding(keras.ops.convert_to_tensor(x))

    def _loss(self, embedded: Any, x: np.ndarray, y: np.ndarray) -> Any:
        logits = self.from_embedded([embedded, keras.ops.convert_to_tensor(x)], training=False)
        return keras.ops.mean(
            keras.losses.sparse_categorical_crossentropy(keras.ops.convert_to_tensor(y), logits, from_logits=True)
        )

    def loss_grad(self, embedded: Any, x: np.ndarray, y: np.ndarray, delta: Any) -> Any:
        """d loss / d delta at ``embedded + delta``, with the backend's own autodiff."""
        backend = keras.backend.backend()
        if backend == "jax":
            import jax

            return jax.grad(lambda d: self._loss(embedded + d, x, y))(delta)
        if backend == "torch":
            import torch

            d = delta.detach().requires_grad_(True)
            return torch.autograd.grad(self._loss(embedded.detach() + d, x, y), d)[0]
        import tensorflow as tf

        with tf.GradientTape() as tape:
            tape.watch(delta)
            loss = self._loss(embedded + delta, x, y)
        return tape.gradient(loss, delta)

    def predict(self, embedded: Any, x: np.ndarray) -> np.ndarray:
        logits = self.from_embedded([embedded, keras.ops.convert_to_tensor(x)], training=False)
        return np.asarray(keras.ops.convert_to_numpy(keras.ops.argmax(logits, axis=-1)))

    def close(self) -> None:
        if self.trained is not self.model:
            advgraph.unwrap(self.trained)
        self.trained = self.model
        keras.backend.clear_session()
