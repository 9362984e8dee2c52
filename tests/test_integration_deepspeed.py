"""DeepSpeed (ZeRO stages 1-3, CPU accelerator, gloo): ``deepspeed.initialize`` and the HF Trainer.

Each group of scenarios runs in its own process (tests/_integration_deepspeed_worker.py),
so DeepSpeed's process group and config state never reach this one. Every
scenario is compared with one FGM step written by hand on the same tiny BERT and
batch, without DeepSpeed and without advgraph: the first step's gradients (and,
with SGD at lr=1, the update) must be the clean pass's plus the adversarial
pass's. Before the fix, ZeRO-1/2 kept only the adversarial pass's gradients
(the word-embedding gradient was off by 0.02) and the Trainer stepped the
optimizer after the clean pass.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("deepspeed")

HERE = Path(__file__).resolve().parent
WORKER = HERE / "_integration_deepspeed_worker.py"
TOLERANCE = 1e-6  # float32 reduction order; the bug this guards against is 2e-2

pytestmark = pytest.mark.slow


def run_group(group: str, tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp(group) / "results.json"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run(
        [sys.executable, str(WORKER), group, str(out)],
        capture_output=True, text=True, timeout=600, env=env, cwd=HERE.parent,
    )  # fmt: skip
    if proc.returncode != 0 or not out.exists():
        pytest.fail(f"worker failed (rc={proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def engine_results(tmp_path_factory) -> dict:
    return run_group("engine", tmp_path_factory)


@pytest.fixture(scope="module")
def trainer_results(tmp_path_factory) -> dict:
    return run_group("trainer", tmp_path_factory)


def scenario(results: dict, name: str) -> dict:
    found = results[name]
    assert "exception" not in found, found["exception"]
    return found


def worst(errors: dict[str, float]) -> tuple[str, float]:
    return max(errors.items(), key=lambda item: item[1])


@pytest.mark.parametrize(
    "name",
    [
        "zero1_output_wrap_first",
        "zero2_output_wrap_first",
        "zero2_output_wrap_after",
        "zero3_output_wrap_after",
        "zero1_matrix_wrap_first",
        "zero2_matrix_wrap_after",
    ],
)
def test_engine_first_step_equals_the_hand_written_step(engine_results, name):
    found = scenario(engine_results, name)
    assert worst(found["grad_error"])[1] < TOLERANCE, worst(found["grad_error"])
    assert worst(found["update_error"])[1] < TOLERANCE, worst(found["update_error"])  # it trains
    assert found["restored"], "the embedding weight was not restored bit for bit after the step"


@pytest.mark.parametrize("name", ["zero1_accumulation", "zero2_accumulation"])
def test_engine_gradient_accumulation_is_kept(engine_results, name):
    """Two micro-batches per optimizer step: advgraph's deferral inside each micro-batch
    leaves DeepSpeed's own accumulation boundary where it was."""
    found = scenario(engine_results, name)
    assert found["boundaries"] == [False, True]
    assert found["global_steps"] == 1
    assert worst(found["update_error"])[1] < TOLERANCE, worst(found["update_error"])


def test_engine_zero3_refuses_matrix_mode_clearly(engine_results):
    found = scenario(engine_results, "zero3_matrix_refused")
    assert found["error"] is not None, "mode='matrix' on ZeRO-3 was accepted"
    assert "DeepSpeed ZeRO-3" in found["error"] and "mode='output'" in found["error"]
    assert "Received: " in found["error"]
    assert found["wrapped"] is False


def test_engine_zero2_without_engine_backward_is_refused_before_anything_changes(engine_results):
    found = scenario(engine_results, "zero2_plain_backward")
    assert found["error"] is not None, "ZeRO-2 with loss.backward() was accepted (it loses the clean gradients)"
    assert "backward=engine.backward" in found["error"]
    assert "Received: backward='loss.backward()'" in found["error"]
    assert found["untouched"]


def test_engine_zero3_with_plain_backward_keeps_every_pass(engine_results):
    found = scenario(engine_results, "zero3_plain_backward")
    assert found["error"] is None
    assert worst(found["grad_error"])[1] < TOLERANCE, worst(found["grad_error"])


@pytest.mark.parametrize("name", ["trainer_zero2_output", "trainer_zero3_output", "trainer_zero1_matrix"])
def test_trainer_with_deepspeed_config_first_step_equals_the_hand_written_step(trainer_results, name):
    found = scenario(trainer_results, name)
    assert found["engine"] == "DeepSpeedEngine"
    assert worst(found["update_error"])[1] < TOLERANCE, worst(found["update_error"])


def test_trainer_zero3_refuses_matrix_mode_and_leaves_the_model_untouched(trainer_results):
    found = scenario(trainer_results, "trainer_zero3_matrix")
    assert "DeepSpeed ZeRO-3" in found.get("error", ""), found
    assert found["untouched"]


def test_a_plain_backward_is_used_unchanged_for_every_pass():
    from advgraph.adapters.torch._deepspeed import backward_before_last

    def backward(loss):
        return loss

    assert backward_before_last(None) is None
    assert backward_before_last(backward) is backward
    backward.advgraph_before_last = print
    assert backward_before_last(backward) is print
