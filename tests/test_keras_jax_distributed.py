"""Keras on JAX with ``keras.distribution.DataParallel`` over two CPU devices.

A wrapped model trained data-parallel (the batch sharded over 2 devices by
``XLA_FLAGS=--xla_force_host_platform_device_count=2``) ends with the same
weights and counters as the same model trained on one device: the jitted step
sees the global batch, so per-sample deltas, the matrix rows and the update
are those of the whole batch. Runs in a subprocess (backend and device count are
fixed per process).
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPT = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    import jax, keras
    import advgraph

    assert len(jax.devices()) == 2, jax.devices()
    mode, method = sys.argv[1], sys.argv[2]
    rng = np.random.default_rng(0)
    x = rng.integers(0, 30, (16, 6)).astype("int32")
    y = rng.integers(0, 3, 16).astype("int32")

    def train():
        keras.utils.set_random_seed(0)
        inp = keras.Input((6,), dtype="int32")
        h = keras.layers.Embedding(30, 8, name="emb")(inp)
        out = keras.layers.Dense(3)(keras.layers.GlobalAveragePooling1D()(h))
        model = keras.Model(inp, out)
        model.compile(optimizer=keras.optimizers.SGD(0.5),
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        wrapped = advgraph.wrap(model, mode=mode, method=method, epsilon=0.5)
        wrapped.fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0)
        devices = model.get_layer("emb").embeddings.value.sharding.device_set
        assert len(devices) == (2 if keras.distribution.distribution() else 1), devices
        return [np.asarray(w) for w in model.get_weights()], dict(wrapped.advgraph_stats)

    single, single_stats = train()
    keras.distribution.set_distribution(keras.distribution.DataParallel(devices=jax.devices()))
    parallel, parallel_stats = train()
    keras.distribution.set_distribution(None)
    diff = max(float(np.abs(a - b).max()) for a, b in zip(single, parallel))
    moved = max(float(np.abs(a).max()) for a in single)
    print(json.dumps({"diff": diff, "single": single_stats, "parallel": parallel_stats, "moved": moved}))
    """
)


@pytest.mark.skipif(importlib.util.find_spec("jax") is None, reason="jax is not installed")
@pytest.mark.parametrize("mode, method", [("output", "fgm"), ("matrix", "fgm"), ("output", "pgd")])
def test_data_parallel_equals_single_device(mode: str, method: str) -> None:
    import json

    env = dict(os.environ, KERAS_BACKEND="jax", XLA_FLAGS="--xla_force_host_platform_device_count=2")
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, mode, method], env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-5000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["single"] == result["parallel"]
    assert result["single"]["steps"] == 4  # training steps, whatever the method
    assert result["diff"] < 1e-5, result
