"""A wrapped model trains under tf.distribute.MirroredStrategy (two logical CPUs).

Logical devices must be configured before TensorFlow initialises, so the check
runs in a fresh subprocess. It trains the same model, weights and batches on one
device and mirrored over two, in both modes, and compares: the replicas agree on
delta (matrix mode all-reduces the site gradient; output mode is per sample), so
the two runs give the same weights, and the mirrors of every variable stay equal.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("tensorflow")
pytest.importorskip("keras")

SCRIPT = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    import tensorflow as tf

    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    import keras
    import advgraph
    from test_keras_support import batch, functional, loss_fn, weights

    def train(mode, strategy, method="fgm", **kwargs):
        with strategy.scope():
            model = functional(weights(seed=2))
            model.compile(optimizer=keras.optimizers.SGD(0.5), loss=loss_fn(), metrics=["accuracy"])
            wrapped = advgraph.wrap(model, mode=mode, method=method, epsilon=0.8, **kwargs)
        x, y = batch(seed=2, n=16)
        history = wrapped.fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0)
        mirrors_equal = all(
            all(np.array_equal(v.value.values[0].numpy(), part.numpy()) for part in v.value.values)
            for v in wrapped.weights
            if hasattr(v.value, "values")
        )
        return {
            "weights": [v.numpy().tolist() for v in wrapped.weights],
            "stats": dict(wrapped.advgraph_stats),
            "loss": history.history["loss"],
            "mirrors_equal": mirrors_equal,
            "route": wrapped.advgraph_route,
        }

    mirrored = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    assert mirrored.num_replicas_in_sync == 2
    out = {}
    for mode in ("matrix", "output"):
        out[mode] = {"single": train(mode, tf.distribute.get_strategy()), "mirrored": train(mode, mirrored)}
    # Random starts are drawn per replica; matrix mode installs replica 0's everywhere.
    out["random"] = {"pgd": train("matrix", mirrored, method="pgd", steps=2, random_init=True)}
    print("RESULT " + json.dumps(out))
    """
)


@pytest.mark.slow
def test_mirrored_strategy_trains_like_one_device() -> None:
    tests_dir = Path(__file__).resolve().parent
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(tests_dir), env.get("PYTHONPATH", "")])
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(lines[-1][len("RESULT ") :])

    for method, run in result.pop("random").items():
        assert run["mirrors_equal"], method
        assert run["stats"]["steps"] == 4, method  # 4 training steps (of 2 ascent steps each)
        assert all(np.isfinite(np.array(w)).all() for w in run["weights"]), method
    for mode, runs in result.items():
        single, mirrored = runs["single"], runs["mirrored"]
        assert mirrored["mirrors_equal"], mode
        assert single["stats"] == mirrored["stats"] == {"steps": 4, "plain_steps": 0, "skipped_nonfinite": 0, "skipped_zero": 0}
        np.testing.assert_allclose(mirrored["loss"], single["loss"], rtol=1e-5, err_msg=mode)
        for a, b in zip(single["weights"], mirrored["weights"]):
            np.testing.assert_allclose(np.array(b), np.array(a), rtol=1e-5, atol=1e-6, err_msg=mode)
