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
- ``bart-fgm``: ``BartSeq2SeqLM`` with fixed weights and no dropout takes one FGM
  step (SGD) in each mode, as ``fgm`` does; on the torch backend the same step is
  also written by hand (``bart_fgm_by_hand``).
"""

from __future__ import annotations

import os
import sys
import zlib

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


def bart(fixed: bool = False):
    """keras-hub's BartSeq2SeqLM from config, a batch of 2 and its labels.

    ``fixed``: no dropout and weights drawn with numpy (the same on every backend,
    whose own initializers draw differently), for the FGM comparisons.
    """
    import keras
    import keras_hub

    keras.utils.set_random_seed(3)
    backbone = keras_hub.models.BartBackbone(
        vocabulary_size=64, num_layers=1, num_heads=2, hidden_dim=16, intermediate_dim=32,
        max_sequence_length=16, **({"dropout": 0.0} if fixed else {}),
    )
    model = keras_hub.models.BartSeq2SeqLM(backbone=backbone, preprocessor=None)
    if fixed:
        # Seeded by path: the order of model.weights differs between backends.
        for v in model.weights:
            wrng = np.random.default_rng(zlib.crc32(v.path.encode()))
            v.assign((("gamma" in v.path) + 0.2 * wrng.standard_normal(v.shape)).astype("float32"))
    rng = np.random.default_rng(1)
    x = {
        "encoder_token_ids": rng.integers(1, 64, (2, 8)).astype("int32"),
        "encoder_padding_mask": np.ones((2, 8), "int32"),
        "decoder_token_ids": rng.integers(1, 64, (2, 6)).astype("int32"),
        "decoder_padding_mask": np.ones((2, 6), "int32"),
    }
    x["decoder_token_ids"][:, 1] = x["encoder_token_ids"][0, 2]  # a row both calls touch
    return model, x, rng.integers(1, 64, (2, 6)).astype("int32")


def _compile(model, lr: float, jit: bool = True) -> None:
    import keras

    model.compile(
        jit_compile="auto" if jit else False,
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


def run_bart_fgm(out: dict[str, np.ndarray]) -> None:
    """One FGM step (SGD) of the fixed BART in each mode; on the torch backend also
    the same step written by hand (no advgraph), as ``ref-<mode>/<weight path>``."""
    import keras

    if keras.backend.backend() == "torch":  # by hand first, before advgraph is imported
        for mode in ("output", "matrix", "none"):
            for path, w in bart_fgm_by_hand(mode).items():
                out[f"ref-{mode}/{path}"] = w
    import advgraph

    for mode in ("output", "matrix"):
        model, x, y = bart(fixed=True)
        _compile(model, LR)
        wrapped = advgraph.wrap(model, mode=mode, method="fgm", epsilon=EPS)
        wrapped.fit(x, y, batch_size=len(y), epochs=1, shuffle=False, verbose=0)
        for v in wrapped.weights:  # by path: the order differs between backends
            out[f"{mode}/{v.path}"] = np.asarray(v)
        out[f"{mode}/steps"] = np.asarray(wrapped.advgraph_stats["steps"])
        out[f"{mode}/count"] = np.asarray(len(wrapped.weights))


def bart_fgm_by_hand(mode: str) -> dict[str, np.ndarray]:
    """The FGM step of ``run_bart_fgm`` with torch autograd on the Keras torch backend.

    The shared token embedding's ``call`` is wrapped on the instance (no advgraph) so
    that each lookup's output is kept (and can get a delta); the LM head's call
    (``reverse=True``, the tied matrix) is left alone. ``mode='output'``: each lookup
    call gets ``eps * g_c / ||g_c||`` per sample from its own output gradient;
    ``mode='matrix'``: the rows both lookups touched get ``eps * G / ||G||`` (global
    norm), ``G`` the lookup gradient summed over the calls (the head's gradient not
    included); the matrix itself changes, so the tied head sees it too.
    """
    import torch

    assert "advgraph" not in sys.modules  # the reference owes advgraph nothing
    model, x, y = bart(fixed=True)
    emb = model.backbone.token_embedding
    lookup = emb.call
    seen: list[torch.Tensor] = []
    deltas: list[torch.Tensor] = []

    def call(inputs, reverse=False):
        result = lookup(inputs, reverse=reverse)
        if reverse:
            return result
        result.retain_grad()
        seen.append(result)
        return result + deltas[len(seen) - 1] if deltas else result

    emb.call = call
    weights = list(model.trainable_weights)
    xs = {k: torch.as_tensor(v) for k, v in x.items()}
    labels = torch.as_tensor(y).long()

    def gradients() -> list[torch.Tensor]:
        seen.clear()
        for w in weights:
            w.value.grad = None
        logits = model(xs, training=True)
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))
        loss.backward()
        return [w.value.grad.detach().clone() for w in weights]

    clean = gradients()
    assert len(seen) == 2, len(seen)  # encoder and decoder lookups (the head is excluded)
    outputs = [(ids, out.grad.detach()) for ids, out in zip(
        (xs["encoder_token_ids"], xs["decoder_token_ids"]), seen)]
    table = emb.embeddings.value
    if mode == "output":
        deltas.extend(EPS * g / g.flatten(1).norm(dim=1)[:, None, None] for _, g in outputs)
        adv = gradients()
    elif mode == "none":  # no delta: the clean gradient twice (a check of the check)
        adv = clean
    else:
        G = torch.zeros_like(table)
        for ids, g in outputs:
            G.index_add_(0, ids.reshape(-1).long(), g.reshape(-1, g.shape[-1]))
        rows = torch.unique(torch.cat([ids.reshape(-1) for ids, _ in outputs])).long()
        delta = torch.zeros_like(table)
        delta[rows] = EPS * G[rows] / G[rows].norm()
        saved = table.detach().clone()
        with torch.no_grad():
            table.add_(delta)
        adv = gradients()
        with torch.no_grad():
            table.copy_(saved)
    updated = {w.path: (w.value - LR * (c + a)).detach().numpy() for w, c, a in zip(weights, clean, adv)}
    assert len({w.path for w in model.weights}) == len(model.weights)
    return {w.path: updated.get(w.path, np.asarray(w)) for w in model.weights}


def run_methods(build, out: dict[str, np.ndarray], methods=METHODS) -> None:
    import advgraph

    for spec in methods:
        method, _, how = spec.partition(":")  # "<method>:eager": jit_compile=False
        for mode in ("output", "matrix"):
            if method == "awp" and mode == "matrix":
                continue  # awp perturbs weights: no mode
            model, x, y = build()
            _compile(model, 0.0, jit=how != "eager")
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
    elif part == "bart-fgm":
        run_bart_fgm(out)
    elif part == "bi-methods":
        run_methods(bi_encoder, out)
    else:
        run_methods(bart, out, sys.argv[3].split(",") if len(sys.argv) > 3 else METHODS)
    np.savez(path, **out)


if __name__ == "__main__":
    main()
