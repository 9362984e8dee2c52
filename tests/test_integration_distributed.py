"""DDP, FSDP and Lightning-DDP: 2 CPU processes (gloo) launched with torchrun.

One torchrun launch runs every scenario of tests/_integration_dist_worker.py; the
tests below check what each rank wrote. "Matches single-process training" means:
the same steps on the global batch (both ranks' local batches together) in one
process, with the same initial weights.
"""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
dist = pytest.importorskip("torch.distributed")
if not (dist.is_available() and dist.is_gloo_available()):  # pragma: no cover
    pytest.skip("torch.distributed with the gloo backend is not available", allow_module_level=True)

from torch import nn  # noqa: E402
from torch.nn import functional as F  # noqa: E402

import advgraph  # noqa: E402

HERE = Path(__file__).resolve().parent
WORKER = HERE / "_integration_dist_worker.py"
TOLERANCE = 1e-5


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(script: Path, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """``python -m torch.distributed.run --nproc_per_node 2 script args`` on CPU."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", TOKENIZERS_PARALLELISM="false")
    cmd = [
        sys.executable, "-m", "torch.distributed.run",
        "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
        str(script), *args,
    ]  # fmt: skip
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=HERE.parent)


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("dist")
    proc = torchrun(WORKER, str(out))
    files = [out / f"rank{r}.json" for r in range(2)]
    if proc.returncode != 0 or not all(f.exists() for f in files):
        pytest.fail(f"torchrun failed (rc={proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}")
    return [json.loads(f.read_text()) for f in files]


def result(ranks: list[dict], name: str) -> dict:
    per_rank = [r[name] for r in ranks]
    for r in per_rank:
        assert "exception" not in r, r["exception"]
    return per_rank[0] | {"digests": [r.get("digest") for r in per_rank]}


# --------------------------------------------------------------------------- DDP


@pytest.mark.parametrize(
    "name",
    [
        "ddp_a_fgm",  # advgraph.wrap(DDP(model))
        "ddp_b_fgm",  # DDP(advgraph.wrap(model)), closure calls the DDP module
        "ddp_a_fgm_adv",  # objective="adv"
        "ddp_b_pgd",  # 3 passes, only the last one synced
        "ddp_a_freelb",  # every pass accumulates parameter gradients
    ],
)
def test_ddp_all_reduces_once_per_step_and_matches_single_process(ranks, name):
    r = result(ranks, name)
    assert r["adv_steps"] == r["steps"]
    assert r["allreduce_calls"] == r["steps"]  # one bucket, one all-reduce per step
    assert r["digests"][0] == r["digests"][1]  # parameters identical across ranks (bytes)
    # clean + adversarial gradients, all-reduced once: the global-batch update
    assert r["diff_vs_single"] < TOLERANCE


@pytest.mark.parametrize("name", ["ddp_b_neftune", "ddp_a_awp", "ddp_b_awp"])
def test_ddp_local_delta_methods_one_all_reduce_per_step_and_identical_ranks(ranks, name):
    # NEFTune draws its noise per rank; AWP's delta_w comes from each rank's own clean
    # gradient (its sync is deferred, as every pass but the last): the update is not
    # the single process's on the global batch, but the gradients are all-reduced once
    # per step and the ranks stay identical (the weights restored on each rank).
    r = result(ranks, name)
    assert r["adv_steps"] == r["steps"] and r["allreduce_calls"] == r["steps"]
    assert r["digests"][0] == r["digests"][1]


EVERY_METHOD = ["fgm", "fgsm", "pgd", "freelb", "vat", "gp", "r3f", "smart", "neftune"]
# float64 on both sides: the only difference left is the order of summation (a local
# mean of 4 samples, then DDP's average of 2, against one mean of 8), ~1e-16 relative
# per operation on parameters of size ~1; 1e-12 leaves four orders of margin over the
# ~1e-16 measured, and is far below what a wrong scale gives (gp unscaled: 4e-4; smart
# with the rank's own gradient scale in its ascent step: 4e-8).
EVERY_METHOD_TOLERANCE = 1e-12


@pytest.mark.parametrize("method", EVERY_METHOD)
def test_ddp_every_deterministic_method_matches_single_process(ranks, method):
    # Random draws (pgd's and freelb's starts, vat's direction, r3f/smart/neftune noise)
    # are taken for the global batch from one seeded generator and sliced per rank
    # (shared_noise in the worker), so both sides see the same noise per sample.
    per_rank = [r["ddp_every_method"][method] for r in ranks]
    for r in per_rank:
        assert "exception" not in r, r["exception"]
    r = per_rank[0]
    assert r["allreduce_calls"] == 3  # one all-reduce per step, also gp's double backward
    assert per_rank[0]["digest"] == per_rank[1]["digest"]
    assert r["diff_vs_single"] < EVERY_METHOD_TOLERANCE, r


def test_ddp_both_orders_give_the_same_parameters(ranks):
    assert result(ranks, "ddp_a_fgm")["digests"][0] == result(ranks, "ddp_b_fgm")["digests"][0]


def test_ddp_counter_sees_a_second_all_reduce_without_deferral(ranks):
    # The hand-written loop (clean backward, then perturbed()) syncs in both backwards:
    # correct, but twice the communication. The counter used above does see it.
    r = result(ranks, "ddp_hand_written")
    assert r["allreduce_calls"] == 2 * r["steps"]
    assert r["digests"][0] == r["digests"][1]
    assert r["diff_vs_single"] < TOLERANCE


def test_ddp_users_no_sync_for_gradient_accumulation_is_respected(ranks):
    r = result(ranks, "ddp_gradient_accumulation")
    assert r["allreduce_calls"] == r["steps"]  # two micro-batches, one all-reduce
    assert r["digests"][0] == r["digests"][1]
    assert r["diff_vs_single"] < TOLERANCE


def test_ddp_matrix_mode_keeps_ranks_identical(ranks):
    # In matrix mode delta comes from each rank's local batch (one delta for the
    # batch, normalised over it), so it differs from the global-batch delta of one
    # process; parameters stay identical across ranks and exactly restored.
    r = result(ranks, "ddp_b_matrix")
    assert r["allreduce_calls"] == r["steps"]
    assert r["digests"][0] == r["digests"][1]


@pytest.mark.skipif(importlib.util.find_spec("lightning") is None, reason="lightning is not installed")
def test_lightning_ddp_strategy(ranks):
    r = result(ranks, "lightning_ddp")
    assert r["adv_steps"] == r["steps"]
    assert r["allreduce_calls"] == r["steps"]
    assert r["digests"][0] == r["digests"][1]
    assert r["diff_vs_single"] < TOLERANCE


# --------------------------------------------------------------------------- FSDP


@pytest.mark.parametrize(
    "name,route",
    [
        ("fsdp1_wrap_then_shard", "fx"),  # FSDP(advgraph.wrap(model))
        ("fsdp1_shard_then_wrap", "hook"),  # advgraph.wrap(FSDP(model)): forward-hook route
        ("fsdp2_wrap_then_shard", "fx"),  # fully_shard(advgraph.wrap(model))
    ],
)
def test_fsdp_output_mode_matches_single_process(ranks, name, route):
    r = result(ranks, name)
    assert r["route"] == route
    assert r["adv_steps"] == 3
    assert r["digests"][0] == r["digests"][1]
    assert r["diff_vs_single"] < TOLERANCE


@pytest.mark.parametrize(
    "name,why",
    [
        ("fsdp1_matrix_wrap_then_shard", "FullyShardedDataParallel flat parameter"),
        ("fsdp1_matrix_shard_then_wrap", "is FullyShardedDataParallel (FSDP)"),
        ("fsdp2_matrix_wrap_then_shard", "DTensor"),
        ("fsdp2_matrix_shard_then_wrap", "(FSDP)"),
    ],
)
def test_fsdp_matrix_mode_is_refused(ranks, name, why):
    r = result(ranks, name)
    error = r["error"]
    assert error is not None and error.startswith("ValueError: mode='matrix'")
    assert "Use mode='output'" in error and "Received: target=" in error and why in error
    assert r["unchanged"]


# --------------------------------------------------------------------------- one process


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(30, 8)
        self.fc = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.emb(x).mean(dim=1))


@pytest.fixture
def one_rank_group(tmp_path):
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_ddp_around_the_model_works_in_either_order(one_rank_group):
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.manual_seed(0)
    model = Net()
    wrapped = advgraph.wrap(model)  # the user's own object: DDP(model) is DDP(wrapped)
    assert wrapped is model
    x, y = torch.randint(0, 30, (4, 5)), torch.randint(0, 3, (4,))
    # A closure that never reaches the embedding still fails clearly.
    expected = r"give DDP the object advgraph.wrap\(\) returned.*Received: embedding_calls=0"
    with pytest.raises(ValueError, match=expected):
        wrapped.adversarial_step(lambda: (model.fc.weight**2).sum())
    # Either supported order works in the same process group.
    good = DDP(wrapped)
    assert torch.isfinite(wrapped.adversarial_step(lambda: F.cross_entropy(good(x), y)))
    outer = advgraph.wrap(DDP(Net()))
    assert outer.advgraph_target == "module.emb"
    assert torch.isfinite(outer.adversarial_step(lambda: F.cross_entropy(outer(x), y)))
    assert outer.require_backward_grad_sync  # sync flags restored after the step
    assert good.require_backward_grad_sync
