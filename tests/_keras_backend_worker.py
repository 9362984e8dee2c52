"""Subprocess worker: one adversarial step of a small model on one framework.

Run as ``python _keras_backend_worker.py <framework> <out.npz> <cases.json>`` with
``<framework>`` one of ``keras`` (the Keras backend is KERAS_BACKEND's) or
``torch-adapter`` (advgraph's PyTorch adapter, no Keras). For every case
(mode, method, wrap kwargs, run_eagerly) it records the clean loss, every delta
the core computed (spy on ``advgraph.methods._common.compute_delta``) and the weights
after one step, into ``out.npz`` under ``<case index>/<name>``.

Model (same weights everywhere): ids (B, L) -> Embedding(V, D) -> mean over L ->
Dense(C), softmax cross-entropy, plain SGD. VAT's random start direction is the
same fixed numpy draw on every framework (``normal_like`` is replaced), so VAT's
update is deterministic too; so are R3F's and NEFTune's noises (``uniform_like``
is replaced by a fixed U(0, 1) draw mapped to the asked range).
"""

from __future__ import annotations

import json
import sys

import numpy as np

V, D, C, B, L = 13, 5, 3, 6, 7
LR, EPS = 0.3, 0.6


def data() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(5)
    x = rng.integers(0, V, (B, L)).astype("int32")
    x[:, 0] = 3  # repeated ids: matrix rows are shared by several positions
    return {
        "E": rng.standard_normal((V, D)).astype("float32"),
        "W": (rng.standard_normal((D, C)) * 0.5).astype("float32"),
        "b": (rng.standard_normal(C) * 0.1).astype("float32"),
        "x": x,
        "y": rng.integers(0, C, B).astype("int32"),
    }


def fixed_noise(shape: tuple[int, ...], rows: int) -> np.ndarray:
    """The VAT start direction: a fixed draw; row slots past the batch's ids are 0."""
    # TensorFlow without XLA: the number of rows is the data-dependent count of ids.
    shape = tuple(rows if s is None else int(s) for s in shape)
    noise = np.random.default_rng(11).standard_normal(shape).astype("float32")
    if len(shape) == 2 and shape[0] > rows:  # JAX's padded matrix layout
        noise[rows:] = 0.0
    return noise


def patch_noise(to_native) -> None:
    import advgraph._ops as ops

    rows = len(np.unique(data()["x"]))

    def normal_like(self, x, rng=None):
        return to_native(fixed_noise(tuple(x.shape), rows))

    def uniform_like(self, x, low, high, rng=None):
        # R3F's and NEFTune's noise: a fixed U(0, 1) draw mapped to [low, high).
        u = fixed_uniform(tuple(x.shape), rows)
        return to_native((low + (high - low) * u).astype("float32"))

    for cls in (ops._ArrayApiOps, ops._TensorFlowOps):
        cls.normal_like = normal_like
        cls.uniform_like = uniform_like


def fixed_uniform(shape: tuple[int, ...], rows: int) -> np.ndarray:
    """A fixed U(0, 1) draw (the first ``rows`` rows agree whatever the row count)."""
    shape = tuple(rows if s is None else int(s) for s in shape)
    return np.random.default_rng(13).random(shape).astype("float32")


def spy(to_numpy, seen: list[np.ndarray]) -> None:
    import advgraph.methods._common as methods

    original = methods.compute_delta

    def compute_delta(*args, **kwargs):
        result = original(*args, **kwargs)
        seen.append(to_numpy(result.delta))
        return result

    methods.compute_delta = compute_delta


def knobs(case: dict) -> dict:
    """The case's wrap kwargs, with ``epsilon=EPS`` for the methods that read it."""
    eps = {} if case["method"] in ("r3f", "smart", "neftune", "awp") else {"epsilon": EPS}
    return {**eps, **case["kwargs"]}


def keras_case(case: dict, d: dict, seen: list) -> dict[str, np.ndarray]:
    import keras

    import advgraph

    inp = keras.Input((L,), dtype="int32")
    emb = keras.layers.Embedding(V, D, name="emb")
    out = keras.layers.Dense(C, name="fc")(keras.layers.GlobalAveragePooling1D()(emb(inp)))
    model = keras.Model(inp, out)
    model.compile(
        optimizer=keras.optimizers.SGD(LR),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        run_eagerly=case["eager"],
    )
    model.get_layer("emb").set_weights([d["E"]])
    model.get_layer("fc").set_weights([d["W"], d["b"]])
    wrapped = advgraph.wrap(model, mode=case["mode"], method=case["method"], **knobs(case))
    firsts = {}
    for step in range(case.get("repeat", 1)):
        if step == 1:  # the weights after the first step (SMART's teacher mixes them in)
            firsts = {
                "E1": np.asarray(model.get_layer("emb").get_weights()[0]),
                "W1": np.asarray(model.get_layer("fc").get_weights()[0]),
                "b1": np.asarray(model.get_layer("fc").get_weights()[1]),
            }
        logs = wrapped.train_on_batch(d["x"], d["y"], return_dict=True)
    teacher = getattr(wrapped.__dict__["_advgraph"], "teacher", None)
    if teacher is not None:  # the teacher's values, in trainable-variable order (E, W, b)
        for name, var in zip(("tE", "tW", "tb"), teacher.values):
            firsts[name] = np.asarray(keras.ops.convert_to_numpy(var.value))
    return {
        **firsts,
        "loss": np.asarray(float(logs["loss"])),
        "E": np.asarray(model.get_layer("emb").get_weights()[0]),
        "W": np.asarray(model.get_layer("fc").get_weights()[0]),
        "b": np.asarray(model.get_layer("fc").get_weights()[1]),
        "steps": np.asarray(wrapped.advgraph_stats["steps"]),
    }


def torch_case(case: dict, d: dict, seen: list) -> dict[str, np.ndarray]:
    import torch

    import advgraph

    emb = torch.nn.Embedding(V, D)
    fc = torch.nn.Linear(D, C)
    with torch.no_grad():
        emb.weight.copy_(torch.from_numpy(d["E"]))
        fc.weight.copy_(torch.from_numpy(d["W"].T.copy()))
        fc.bias.copy_(torch.from_numpy(d["b"]))

    class MeanPool(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb, self.fc = emb, fc

        def forward(self, x):
            return self.fc(self.emb(x).mean(dim=1))

    model = MeanPool()
    wrapped = advgraph.wrap(model, mode=case["mode"], method=case["method"], **knobs(case))
    optimizer = torch.optim.SGD(wrapped.parameters(), lr=LR)
    x, y = torch.from_numpy(d["x"]).long(), torch.from_numpy(d["y"]).long()

    def closure():
        logits = wrapped(x)
        if case["method"] in ("vat", "r3f", "smart"):
            return torch.nn.functional.cross_entropy(logits, y), logits
        return torch.nn.functional.cross_entropy(logits, y)

    for _ in range(case.get("repeat", 1)):
        optimizer.zero_grad()
        loss = wrapped.adversarial_step(closure)
        optimizer.step()
    return {
        "loss": np.asarray(float(loss)),
        "E": emb.weight.detach().numpy().copy(),
        "W": fc.weight.detach().numpy().T.copy(),
        "b": fc.bias.detach().numpy().copy(),
        "steps": np.asarray(-1),
    }


def main() -> None:
    framework, out_path, cases_json = sys.argv[1], sys.argv[2], sys.argv[3]
    cases = json.loads(cases_json)
    if framework == "torch-adapter":
        import torch

        to_numpy = lambda a: a.detach().cpu().numpy().copy()  # noqa: E731
        to_native = torch.from_numpy
        run = torch_case
    else:
        import keras

        backend = keras.backend.backend()
        if backend == "torch":
            import torch

            to_numpy = lambda a: a.detach().cpu().numpy().copy()  # noqa: E731
            to_native = torch.from_numpy
        elif backend == "jax":
            import jax.numpy as jnp

            to_numpy = lambda a: np.asarray(a).copy()  # noqa: E731
            to_native = jnp.asarray
        else:
            import tensorflow as tf

            to_numpy = lambda a: a.numpy().copy()  # noqa: E731
            to_native = tf.convert_to_tensor
        run = keras_case
    patch_noise(to_native)
    results: dict[str, np.ndarray] = {}
    d = data()
    for i, case in enumerate(cases):
        seen: list[np.ndarray] = []
        if case["eager"]:
            import advgraph.methods._common as methods

            plain = methods.compute_delta
            spy(to_numpy, seen)
        try:
            result = run(case, d, seen)
        finally:
            if case["eager"]:
                methods.compute_delta = plain
        for key, value in result.items():
            results[f"{i}/{key}"] = value
        results[f"{i}/ndeltas"] = np.asarray(len(seen))
        for j, delta in enumerate(seen):
            results[f"{i}/delta{j}"] = delta
    np.savez(out_path, **results)


if __name__ == "__main__":
    main()
