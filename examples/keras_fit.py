"""Keras 3 quick start: adversarial fit() of a tiny text classifier in one line.

Runs in under 20 s on a 2-core CPU (most of it importing TensorFlow), with generated
data (no downloads). Validation accuracy passes the majority-class baseline (printed
first) in the first epoch. The task: a
sentence is positive when it holds more tokens from the "positive" half of the
vocabulary than from the negative half.

    python examples/keras_fit.py
"""

from __future__ import annotations

import logging

import numpy as np

import keras  # the TensorFlow backend (KERAS_BACKEND=tensorflow, the default)

import advgraph

VOCAB, LENGTH = 200, 16


def make_data(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    tokens = rng.integers(1, VOCAB, (n, LENGTH)).astype("int32")
    positive = (tokens >= VOCAB // 2).sum(axis=1) > LENGTH // 2
    return tokens, positive.astype("int32")


def build_model() -> keras.Model:
    tokens = keras.Input((LENGTH,), dtype="int32", name="tokens")
    h = keras.layers.Embedding(VOCAB, 32, name="Embedding-Token")(tokens)
    h = keras.layers.GlobalAveragePooling1D()(h)
    h = keras.layers.Dense(32, activation="relu")(h)
    logits = keras.layers.Dense(2)(h)
    return keras.Model(tokens, logits, name="text_classifier")


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    keras.utils.set_random_seed(0)
    x_train, y_train = make_data(2048, seed=0)
    x_val, y_val = make_data(512, seed=1)
    majority = np.bincount(y_val).max() / len(y_val)
    print(f"majority-class baseline (always the most common label): {majority:.3f}")

    model = build_model()
    model.compile(
        optimizer=keras.optimizers.Adam(1e-2),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    # The one line: every training step of fit() is now an FGM step on the
    # embedding matrix (the seed's Keras recipe), inside the compiled train function.
    model = advgraph.wrap(model, target="Embedding-Token", mode="matrix", epsilon=0.5)

    model.fit(
        x_train,
        y_train,
        batch_size=64,
        epochs=3,
        validation_data=(x_val, y_val),
        callbacks=[keras.callbacks.EarlyStopping(monitor="val_loss", patience=2)],
        verbose=2,
    )
    loss, accuracy = model.evaluate(x_val, y_val, verbose=0)  # unchanged by wrap()
    print(f"validation: loss={loss:.4f} accuracy={accuracy:.3f}")
    print(f"route={model.advgraph_route} stats={dict(model.advgraph_stats)}")

    model = advgraph.unwrap(model)  # the original train_step again
    print("unwrapped:", not advgraph.is_wrapped(model))


if __name__ == "__main__":
    main()
