"""Subprocess worker (TensorFlow): an error raised inside the compiled train step,
in the adversarial pass only, must leave every weight byte-identical (issue 18).

Run as ``python _keras_fault_worker.py <out.json>``. Two logical CPUs are set up
before TensorFlow starts, so one case can run under a 2-replica MirroredStrategy.
For each case a ``Probe`` layer right after the embedding asserts, with
``tf.debugging.assert_equal`` (an op of the compiled graph), that the lookup's
output equals the lookup of a frozen copy of the matrix, and (awp) that a Dense
kernel equals its frozen copy: true in the clean pass, false in the adversarial
one, so ``fit`` raises from inside the graph after delta was installed. The case
records whether fit raised and whether every weight kept its bytes.
"""

from __future__ import annotations

import json
import os
import sys

os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import numpy as np
import tensorflow as tf

cpus = tf.config.list_physical_devices("CPU")
tf.config.set_logical_device_configuration(
    cpus[0], [tf.config.LogicalDeviceConfiguration(), tf.config.LogicalDeviceConfiguration()]
)

import keras  # noqa: E402

import advgraph  # noqa: E402

V, D, L, B = 17, 8, 6, 4


class TiedHead(keras.layers.Layer):
    """Logits from the embedding matrix itself (a tied output head)."""

    def __init__(self, embedding, **kwargs):
        super().__init__(**kwargs)
        self.embedding = embedding

    def call(self, h):
        return keras.ops.matmul(h, keras.ops.transpose(self.embedding.embeddings))


class Probe(keras.layers.Layer):
    """Asserts in-graph that nothing is perturbed: fires in the adversarial pass."""

    def __init__(self, embedding, dense=None, **kwargs):
        super().__init__(**kwargs)
        self.embedding, self.dense = embedding, dense

    def build(self, shapes):
        self.copy = self.add_weight(shape=(V, D), trainable=False, name="copy")
        if self.dense is not None:
            self.kernel_copy = self.add_weight(shape=(D, D), trainable=False, name="kernel_copy")

    def snapshot(self):
        self.copy.assign(self.embedding.embeddings)
        if self.dense is not None:
            self.kernel_copy.assign(self.dense.kernel)

    def call(self, inputs):
        ids, out = inputs
        expected = tf.gather(tf.cast(self.copy.value, out.dtype), ids)
        checks = [tf.debugging.assert_equal(out, expected, message="advgraph-fault-probe")]
        if self.dense is not None:
            kernel = tf.cast(self.dense.kernel.value, self.kernel_copy.dtype)
            checks.append(tf.debugging.assert_equal(kernel, self.kernel_copy.value, message="advgraph-fault-probe"))
        with tf.control_dependencies(checks):
            return tf.identity(out)


def build(tied: bool, awp: bool):
    ids = keras.Input((L,), dtype="int32")
    emb = keras.layers.Embedding(V, D, name="emb")
    out = emb(ids)
    dense = keras.layers.Dense(D, name="mid")
    dense.build((None, D))
    probe = Probe(emb, dense if awp else None, name="probe")
    h = probe([ids, out])
    h = keras.layers.GlobalAveragePooling1D()(dense(h))
    logits = TiedHead(emb, name="tied")(h) if tied else keras.layers.Dense(V, name="head")(h)
    model = keras.Model(ids, logits)
    probe.snapshot()
    return model, probe


def run_case(name: str, tied: bool, mirrored: bool = False, awp: bool = False, **compile_kw):
    policy = compile_kw.pop("policy", None)
    keras.mixed_precision.set_global_policy(policy or "float32")
    keras.utils.set_random_seed(0)
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"]) if mirrored else tf.distribute.get_strategy()
    with strategy.scope():
        model, probe = build(tied, awp)
        model.compile(
            optimizer=keras.optimizers.SGD(0.1),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            **compile_kw,
        )
    if awp:
        wrapped = advgraph.wrap(model, method="awp")
    else:
        wrapped = advgraph.wrap(model, mode="matrix", method="fgm", epsilon=0.5)
    rng = np.random.default_rng(0)
    x = rng.integers(0, V, (2 * B, L)).astype("int32")
    y = rng.integers(0, V, (2 * B,)).astype("int32")
    before = [np.asarray(w).tobytes() for w in model.get_weights()]
    raised = ""
    try:
        wrapped.fit(x, y, batch_size=B, epochs=1, verbose=0, shuffle=False)
    except Exception as err:  # the in-graph assertion
        raised = type(err).__name__ + (" probe" if "advgraph-fault-probe" in str(err) else "")
    after = [np.asarray(w).tobytes() for w in model.get_weights()]
    keras.mixed_precision.set_global_policy("float32")
    return {"case": name, "raised": raised, "restored": after == before,
            "changed": [i for i, (a, b) in enumerate(zip(before, after)) if a != b]}


CASES = {
    "tied": dict(tied=True),
    "tied-xla": dict(tied=True, jit_compile=True),
    "tied-steps_per_execution": dict(tied=True, steps_per_execution=2),
    "tied-mixed_float16": dict(tied=True, policy="mixed_float16"),
    "mirrored-2-replicas": dict(tied=False, mirrored=True),
    "mirrored-2-replicas-tied": dict(tied=True, mirrored=True),
    "untied": dict(tied=False),
    "awp": dict(tied=False, awp=True),
    "awp-xla": dict(tied=False, awp=True, jit_compile=True),
    "awp-mirrored": dict(tied=False, awp=True, mirrored=True),
}


def main() -> None:
    names = sys.argv[2].split(",") if len(sys.argv) > 2 else list(CASES)
    results = []
    for n in names:
        results.append(run_case(n, **CASES[n]))
        print(json.dumps(results[-1]), flush=True)
    with open(sys.argv[1], "w") as f:
        json.dump(results, f)


if __name__ == "__main__":
    main()
