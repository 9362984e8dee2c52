"""TensorFlow: an error raised inside the compiled train step leaves no weight
perturbed (issue 18, README "Limitations").

``_keras_fault_worker.py`` (a subprocess: it sets up two logical CPUs before
TensorFlow starts) trains one step where an in-graph ``tf.debugging.assert_equal``
right after the embedding fails in the adversarial pass only (the lookup differs
from the lookup of a frozen copy of the matrix; for awp, a kernel differs from its
copy), i.e. after delta was written into the variable. Cases: a tied head (the
matrix is written, not substituted), ``steps_per_execution=2``, ``mixed_float16``,
a 2-replica ``MirroredStrategy`` (tied and untied), an untied matrix (the
functional path) and awp (single device and mirrored): fit must raise the probe's
error and every weight must keep its bytes. Under XLA (``jit_compile=True``) the
assertion is compiled out (XLA has no in-graph errors), so fit trains normally:
that is recorded, not a restore check.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("tensorflow")

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
RAISING = [
    "tied",
    "tied-steps_per_execution",
    "tied-mixed_float16",
    "mirrored-2-replicas",
    "mirrored-2-replicas-tied",
    "untied",
    "awp",
    "awp-mirrored",
]
XLA = ["tied-xla", "awp-xla"]


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict[str, dict]:
    out = tmp_path_factory.mktemp("fault") / "fault.json"
    env = dict(os.environ, KERAS_BACKEND="tensorflow", TF_CPP_MIN_LOG_LEVEL="2")
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run(
        [sys.executable, os.path.join(HERE, "_keras_fault_worker.py"), str(out), ",".join(RAISING + XLA)],
        env=env, capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    with open(out) as f:
        return {r["case"]: r for r in json.load(f)}


@pytest.mark.slow
@pytest.mark.parametrize("case", RAISING)
def test_error_in_the_adversarial_pass_leaves_weights_unperturbed(results, case: str) -> None:
    result = results[case]
    if "mirrored" in case and result["raised"] == "InternalError":
        # Two replicas: when the other replica's collective is cancelled first, TensorFlow
        # reports the aborted all-reduce (InternalError) instead of the probe's error.
        pass
    else:
        assert result["raised"] == "InvalidArgumentError probe", result  # the fault fired in-graph
    assert result["restored"], f"{case}: weights {result['changed']} changed bytes"


@pytest.mark.slow
@pytest.mark.parametrize("case", XLA)
def test_xla_compiles_the_assertion_out(results, case: str) -> None:
    result = results[case]
    assert result["raised"] == "", result  # no in-graph error exists under XLA
    assert 0 in result["changed"]  # the step trained: the embedding moved by SGD
