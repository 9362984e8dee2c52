"""Subprocess worker: a target layer called several times in one forward (issue 18).

Run as ``python _keras_multicall_worker.py <out.npz> <part> [methods]`` with
KERAS_BACKEND set.

``part``:

- ``fgm``: a bi-encoder (one functional encoder sub-model, with its Embedding,
  called on two inputs) with fixed weights takes one FGM step (SGD) in each mode;
  the weights after it go to ``out.npz`` as ``<mode>/<weight index>``.
- ``bi-methods`` / ``bart-methods``: every method, each mode it accepts, trains one
  step of the bi-encoder / keras-hub ``BartSeq2SeqLM`` from config with a learning
  rate of 0, so the weights after the step must be the weights before it, byte for
  byte (a perturbation left behind would show). ``out.npz`` gets ``<case>/ok`` and
  the loss; a refusal is recorded as ``<case>/refused`` with its message.
"""

from __future__ import annotations

import os
import sys

import numpy as np

if os.environ.get("KERAS_BACKEND") == "torch":
    import torch  # noqa: F401  (torch before tensorflow in one process)

V, D, H, C, B, L = 11, 4, 3, 2, 3, 5
LR, EPS = 0.3, 0.6
METHODS = ("fgm", "fgsm", "pgd", "freelb", "vat", "gp", "r3f", "smart", "neftune", "awp")
WITH_EPSILON = ("fgm", "fgsm", "pgd", "freelb", "vat", "gp")


def data() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(7)
    a = rng.integers(0, V, (B, L)).astype("int32")
    b = rng.integers(0, V, (B, L)).astype("int32")
    b[:, 0] = a[0, 1]  # an id both encoders look up: its matrix row sums two calls
    return {
        "E": rng.standard_normal((V, D)).astype("float32"),
        "W1": (rng.standard_normal((D, H)) * 0.7).astype("float32"),
        "b1": (rng.standard_normal(H) * 0.1).astype("float32"),
        "W2": (rng.standard_normal((3 * H, C)) * 0.7).astype("float32"),
        "b2": (rng.standard_normal(C) * 0.1).astype("float32"),
        "a": a,
        "b": b,
        "y": rng.integers(0, C, B).astype("int32"),
    }


def bi_encoder():
    import keras

    d = data()
    ids = keras.Input((L,), dtype="int32")
    pooled = keras.layers.GlobalAveragePooling1D()(keras.layers.Embedding(V, D, name="emb")(ids))
    encoder = keras.Model(ids, keras.layers.Dense(H, activation="tanh", name="enc_dense")(pooled), name="enc")
    a, b = keras.Input((L,), dtype="int32"), keras.Input((L,), dtype="int32")
    ea, eb = encoder(a), encoder(b)
    joined = keras.layers.Concatenate()([ea, eb, keras.layers.Multiply()([ea, eb])])
    model = keras.Model([a, b], keras.layers.Dense(C, name="head")(joined))
    model.get_layer("enc").get_layer("emb").set_weights([d["E"]])
    model.get_layer("enc").get_layer("enc_dense").set_weights([d["W1"], d["b1"]])
    model.get_layer("head").set_weights([d["W2"], d["b2"]])
    return model, [d["a"], d["b"]], d["y"]


def bart():
    import keras
    import keras_hub

    keras.utils.set_random_seed(3)
    backbone = keras_hub.models.BartBackbone(
        vocabulary_size=64, num_layers=1, num_heads=2, hidden_dim=16, intermediate_dim=32,
        max_sequence_length=16,
    )
    model = keras_hub.models.BartSeq2SeqLM(backbone=backbone, preprocessor=None)
    rng = np.random.default_rng(1)
    x = {
        "encoder_token_ids": rng.integers(1, 64, (2, 8)).astype("int32"),
        "encoder_padding_mask": np.ones((2, 8), "int32"),
        "decoder_token_ids": rng.integers(1, 64, (2, 6)).astype("int32"),
        "decoder_padding_mask": np.ones((2, 6), "int32"),
    }
    x["decoder_token_ids"][:, 1] = x["encoder_token_ids"][0, 2]  # a row both calls touch
    return model, x, rng.integers(1, 64, (2, 6)).astype("int32")


def _compile(model, lr: float) -> None:
    import keras

    model.compile(
        optimizer=keras.optimizers.SGD(lr),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )


def run_fgm(out: dict[str, np.ndarray]) -> None:
    import advgraph

    for mode in ("output", "matrix"):
        model, x, y = bi_encoder()
        _compile(model, LR)
        wrapped = advgraph.wrap(model, mode=mode, method="fgm", epsilon=EPS)
        wrapped.fit(x, y, batch_size=B, epochs=1, shuffle=False, verbose=0)
        for i, w in enumerate(wrapped.get_weights()):
            out[f"{mode}/{i}"] = np.asarray(w)
        out[f"{mode}/steps"] = np.asarray(wrapped.advgraph_stats["steps"])


def run_methods(build, out: dict[str, np.ndarray], methods=METHODS) -> None:
    import advgraph

    for method in methods:
        for mode in ("output", "matrix"):
            if method == "awp" and mode == "matrix":
                continue  # awp perturbs weights: no mode
            model, x, y = build()
            _compile(model, 0.0)
            before = [np.asarray(w).tobytes() for w in model.get_weights()]
            kwargs = {} if method == "awp" else {"mode": mode}
            if method in WITH_EPSILON:
                kwargs["epsilon"] = 0.5
            if method in ("pgd", "freelb", "vat"):
                kwargs["steps"] = 2
            key = f"{method}-{mode}"
            try:
                wrapped = advgraph.wrap(model, method=method, **kwargs)
                history = wrapped.fit(x, y, batch_size=len(y), epochs=1, verbose=0)
            except ValueError as err:
                out[f"{key}/refused"] = np.asarray(str(err))
                continue
            after = [np.asarray(w).tobytes() for w in wrapped.get_weights()]
            out[f"{key}/ok"] = np.asarray(after == before)
            out[f"{key}/loss"] = np.asarray(history.history["loss"][0])
            out[f"{key}/steps"] = np.asarray(wrapped.advgraph_stats["steps"])


def main() -> None:
    path, part = sys.argv[1], sys.argv[2]
    out: dict[str, np.ndarray] = {}
    if part == "fgm":
        run_fgm(out)
    elif part == "bi-methods":
        run_methods(bi_encoder, out)
    else:
        run_methods(bart, out, sys.argv[3].split(",") if len(sys.argv) > 3 else METHODS)
    np.savez(path, **out)


if __name__ == "__main__":
    main()
