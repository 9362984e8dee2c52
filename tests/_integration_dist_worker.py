"""Worker of tests/test_integration_distributed.py, launched by torchrun (2 CPU processes, gloo).

Runs every DDP / FSDP scenario in one launch (process start-up dominates the cost)
and writes what it measured to ``<out>/rank<r>.json``; the test reads both files.

    python -m torch.distributed.run --nproc_per_node 2 tests/_integration_dist_worker.py OUT
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import importlib.util
import json
import os
import sys
import traceback
import warnings

import torch
import torch.distributed as dist
from torch import nn
from torch.nn import functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

import advgraph

STEPS = 3
LR = 0.5


class Net(nn.Module):
    """Embedding -> mean -> Linear -> tanh -> Linear (traces as a whole: fx route)."""

    def __init__(self, vocab: int = 30, dim: int = 8, classes: int = 3) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.hidden = nn.Linear(dim, 16)
        self.fc = nn.Linear(16, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.tanh(self.hidden(self.emb(x).mean(dim=1))))


def make_net() -> Net:
    torch.manual_seed(0)
    return Net()


def global_batches(steps: int = STEPS, b: int = 8, n: int = 6) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(1234)
    return [
        (torch.randint(1, 30, (b, n), generator=gen), torch.randint(0, 3, (b,), generator=gen))
        for _ in range(steps)
    ]


def local(batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    rank, world = dist.get_rank(), dist.get_world_size()
    x, y = batch
    per = x.shape[0] // world
    return x[rank * per : (rank + 1) * per], y[rank * per : (rank + 1) * per]


def clean_name(name: str) -> str:
    for prefix in ("module.", "_fsdp_wrapped_module.", "_orig_mod."):
        name = name.replace(prefix, "")
    return name


def full_params(model: nn.Module) -> dict[str, torch.Tensor]:
    out = {}
    for name, p in model.named_parameters():
        t = p.full_tensor() if hasattr(p, "full_tensor") else p
        out[clean_name(name)] = t.detach().clone()
    return out


def digest(params: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(params):
        h.update(name.encode())
        h.update(params[name].contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def single_process_reference(wrap_kwargs: dict, steps: int = STEPS) -> dict[str, torch.Tensor]:
    """The same training on the global batch in one process."""
    model = make_net()
    wrapped = advgraph.wrap(model, **wrap_kwargs)
    opt = torch.optim.SGD(wrapped.parameters(), lr=LR)
    for x, y in global_batches(steps):
        opt.zero_grad()
        wrapped.adversarial_step(lambda: F.cross_entropy(wrapped(x), y))
        opt.step()
    return full_params(wrapped)


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert set(a) == set(b), (sorted(a), sorted(b))
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def counting_hook(state, bucket):  # no annotations: DDP checks them (and this file's are strings)
    """An all-reduce (mean) comm hook that counts its calls."""
    state["calls"] += 1
    buf = bucket.buffer().div_(dist.get_world_size())
    return dist.all_reduce(buf, async_op=True).get_future().then(lambda fut: fut.value()[0])


# --------------------------------------------------------------------------- scenarios


def ddp_run(order: str, wrap_kwargs: dict, steps: int = STEPS) -> dict:
    model = make_net()
    if order == "wrap(DDP(model))":
        ddp = DDP(model)
        wrapped = advgraph.wrap(ddp, **wrap_kwargs)
        forward, stepper = wrapped, wrapped
    else:  # "DDP(wrap(model))"
        wrapped = advgraph.wrap(model, **wrap_kwargs)
        ddp = DDP(wrapped)
        forward, stepper = ddp, wrapped
    counter = {"calls": 0}
    ddp.register_comm_hook(counter, counting_hook)
    opt = torch.optim.SGD(ddp.parameters(), lr=LR)
    for batch in global_batches(steps):
        x, y = local(batch)
        opt.zero_grad()
        stepper.adversarial_step(lambda: F.cross_entropy(forward(x), y))
        opt.step()
    params = full_params(ddp)
    return {
        "allreduce_calls": counter["calls"],
        "steps": steps,
        "route": stepper.advgraph_route,
        "adv_steps": stepper.advgraph_stats["steps"],
        "digest": digest(params),
        "diff_vs_single": max_diff(params, single_process_reference(wrap_kwargs, steps)),
    }


def ddp_hand_written_loop() -> dict:
    """The familiar loop (clean backward, then perturbed()) syncs twice: the counter sees it."""
    model = make_net()
    wrapped = advgraph.wrap(model, mode="output", epsilon=0.5)
    ddp = DDP(wrapped)
    counter = {"calls": 0}
    ddp.register_comm_hook(counter, counting_hook)
    opt = torch.optim.SGD(ddp.parameters(), lr=LR)
    for batch in global_batches():
        x, y = local(batch)
        opt.zero_grad()
        F.cross_entropy(ddp(x), y).backward()
        with wrapped.perturbed():
            F.cross_entropy(ddp(x), y).backward()
        opt.step()
    params = full_params(ddp)
    return {
        "allreduce_calls": counter["calls"],
        "steps": STEPS,
        "digest": digest(params),
        "diff_vs_single": max_diff(params, single_process_reference({"mode": "output", "epsilon": 0.5})),
    }


def ddp_gradient_accumulation() -> dict:
    """Two micro-batches per optimizer step, the first under the user's no_sync()."""
    wrap_kwargs = {"mode": "output", "epsilon": 0.5}
    model = make_net()
    wrapped = advgraph.wrap(model, **wrap_kwargs)
    ddp = DDP(wrapped)
    counter = {"calls": 0}
    ddp.register_comm_hook(counter, counting_hook)
    opt = torch.optim.SGD(ddp.parameters(), lr=LR)
    for batch in global_batches():
        x, y = local(batch)
        opt.zero_grad()
        halves = [(x[:2], y[:2]), (x[2:], y[2:])]
        with ddp.no_sync():
            xa, ya = halves[0]
            wrapped.adversarial_step(lambda: F.cross_entropy(ddp(xa), ya) / 2)
        xb, yb = halves[1]
        wrapped.adversarial_step(lambda: F.cross_entropy(ddp(xb), yb) / 2)
        opt.step()
    params = full_params(ddp)
    return {
        "allreduce_calls": counter["calls"],
        "steps": STEPS,
        "digest": digest(params),
        "diff_vs_single": max_diff(params, single_process_reference(wrap_kwargs)),
    }


def fsdp_run(kind: str, order: str) -> dict:
    wrap_kwargs = {"mode": "output", "epsilon": 0.5}
    model = make_net()
    if kind == "fsdp1":
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        def shard(m: nn.Module) -> nn.Module:
            return FSDP(m, device_id=torch.device("cpu"))

    else:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (dist.get_world_size(),))

        def shard(m: nn.Module) -> nn.Module:
            return fully_shard(m, mesh=mesh)

    if order == "wrap-then-shard":
        wrapped = advgraph.wrap(model, **wrap_kwargs)
        sharded = shard(wrapped)
        forward, stepper = sharded, wrapped
    else:
        sharded = shard(model)
        wrapped = advgraph.wrap(sharded, **wrap_kwargs)
        forward, stepper = wrapped, wrapped
    opt = torch.optim.SGD(sharded.parameters(), lr=LR)
    for batch in global_batches():
        x, y = local(batch)
        opt.zero_grad()
        stepper.adversarial_step(lambda: F.cross_entropy(forward(x), y))
        opt.step()
    if kind == "fsdp1":
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        with FSDP.summon_full_params(sharded):
            params = full_params(sharded)
    else:
        params = full_params(sharded)
    return {
        "route": stepper.advgraph_route,
        "adv_steps": stepper.advgraph_stats["steps"],
        "digest": digest(params),
        "diff_vs_single": max_diff(params, single_process_reference(wrap_kwargs)),
    }


def fsdp_matrix_refused(kind: str, order: str) -> dict:
    model = make_net()
    if kind == "fsdp1":
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        def shard(m: nn.Module) -> nn.Module:
            return FSDP(m, device_id=torch.device("cpu"), use_orig_params=order == "wrap-then-shard")

    else:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (dist.get_world_size(),))

        def shard(m: nn.Module) -> nn.Module:
            return fully_shard(m, mesh=mesh)

    before = None
    try:
        if order == "wrap-then-shard":
            wrapped = advgraph.wrap(model, mode="matrix", epsilon=0.5)
            sharded = shard(wrapped)
            before = digest(full_params(wrapped)) if kind == "fsdp2" else None
            x, y = local(global_batches(1)[0])
            wrapped.adversarial_step(lambda: F.cross_entropy(sharded(x), y))
        else:
            advgraph.wrap(shard(model), mode="matrix", epsilon=0.5)
    except ValueError as exc:
        after = digest(full_params(wrapped)) if before is not None else None
        return {"error": f"ValueError: {exc}", "unchanged": before == after}
    return {"error": None}


def lightning_ddp() -> dict:
    """Lightning's DDP strategy, manual optimization, advgraph.integrations.lightning."""
    import lightning.pytorch as pl
    from lightning.pytorch.strategies import DDPStrategy

    from advgraph.integrations.lightning import adversarial_step

    wrap_kwargs = {"mode": "output", "epsilon": 0.5}

    class Lit(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.automatic_optimization = False
            self.net = advgraph.wrap(make_net(), **wrap_kwargs)

        def training_step(self, batch, batch_idx):
            x, y = batch
            opt = self.optimizers()
            opt.zero_grad()
            loss = adversarial_step(self, lambda: F.cross_entropy(self.net(x), y))
            opt.step()
            return loss

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=LR)

        def on_train_start(self) -> None:
            # (Lightning registers DDPStrategy(ddp_comm_hook=...) on CUDA only.)
            ddp = self.trainer.strategy.model
            assert isinstance(ddp, DDP), type(ddp)
            ddp.register_comm_hook(counter, counting_hook)

    counter = {"calls": 0}
    module = Lit()
    trainer = pl.Trainer(
        max_steps=STEPS,
        accelerator="cpu",
        devices=dist.get_world_size(),
        strategy=DDPStrategy(),
        use_distributed_sampler=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        logger=False,
        enable_checkpointing=False,
    )
    batches = [local(batch) for batch in global_batches()]  # this rank's share
    trainer.fit(module, torch.utils.data.DataLoader(batches, batch_size=None))
    params = full_params(module.net)
    return {
        "allreduce_calls": counter["calls"],
        "steps": STEPS,
        "adv_steps": module.net.advgraph_stats["steps"],
        "digest": digest(params),
        "diff_vs_single": max_diff(params, single_process_reference(wrap_kwargs)),
    }


# --------------------------------------------------------------------------- every method

# One entry per method that is deterministic given its random draws: under DDP each rank
# must give the single process's update on the concatenated batch (output mode: one
# delta per sample). float64 so that only summation order differs between the two sides.
EVERY_METHOD = {
    "fgm": {"epsilon": 0.5},
    "fgsm": {"method": "fgsm", "epsilon": 0.05},
    "pgd": {"method": "pgd", "steps": 2, "epsilon": 0.5, "random_init": True},
    "freelb": {"method": "freelb", "steps": 2},  # random start (the default)
    "vat": {"method": "vat"},
    "gp": {"method": "gp", "epsilon": 0.5},
    "r3f": {"method": "r3f"},
    "smart": {"method": "smart", "alpha": 1e-2, "noise_eps": 1e-3},
    "neftune": {"method": "neftune", "neftune_alpha": 5.0},
}


@contextlib.contextmanager
def shared_noise(parts: int, index: int):
    """Every random draw of advgraph's core on a torch array, drawn for the whole batch.

    A draw shaped ``(b, ...)`` takes ``(parts * b, ...)`` values from one generator,
    seeded the same on every side, and keeps rows ``index * b ...``: rank r of W ranks
    (``parts=W, index=r``) gets exactly the rows the single process (``parts=1``)
    draws for its samples. (All draws of the output-mode methods are batch-first.)
    """
    from advgraph import _ops

    gen = torch.Generator().manual_seed(2024)
    cls = _ops._ArrayApiOps
    saved = cls.uniform_like, cls.normal_like

    def rows(x, fill):
        if x.ndim == 0:  # pragma: no cover - every draw here has a batch axis
            raise AssertionError("a draw without a batch axis")
        b = x.shape[0]
        full = torch.empty((parts * b, *x.shape[1:]), dtype=x.dtype, device=x.device)
        fill(full)
        return full[index * b : (index + 1) * b]

    def uniform_like(self, x, low, high, rng=None):
        if self.name != "torch" or rng is not None:
            return saved[0](self, x, low, high, rng)
        return rows(self.widen(x), lambda t: t.uniform_(low, high, generator=gen))

    def normal_like(self, x, rng=None):
        if self.name != "torch" or rng is not None:
            return saved[1](self, x, rng)
        return rows(self.widen(x), lambda t: t.normal_(generator=gen))

    cls.uniform_like, cls.normal_like = uniform_like, normal_like
    try:
        yield
    finally:
        cls.uniform_like, cls.normal_like = saved


def method_closure(kind: str, forward, x, y):
    def closure():
        logits = forward(x)
        if kind == "logits":
            return logits
        loss = F.cross_entropy(logits, y)
        return (loss, logits) if kind == "loss_and_logits" else loss

    return closure


def train_every_method(wrap_kwargs: dict, order: str | None) -> tuple[dict[str, torch.Tensor], int]:
    """STEPS steps in float64; order None: one process on the global batch."""
    model = make_net().double()
    wrapped = advgraph.wrap(model, mode="output", **wrap_kwargs)
    kind = wrapped.advgraph_method.closure
    if order is None:
        forward, stepper, owner, parts, index = wrapped, wrapped, wrapped, 1, 0
    elif order == "wrap(DDP(model))":
        ddp = DDP(make_net().double())
        wrapped = advgraph.wrap(ddp, mode="output", **wrap_kwargs)
        forward, stepper, owner = wrapped, wrapped, ddp
        parts, index = dist.get_world_size(), dist.get_rank()
    else:
        ddp = DDP(wrapped)
        forward, stepper, owner = ddp, wrapped, ddp
        parts, index = dist.get_world_size(), dist.get_rank()
    counter = {"calls": 0}
    if order is not None:
        owner.register_comm_hook(counter, counting_hook)
    opt = torch.optim.SGD(owner.parameters(), lr=LR)
    with shared_noise(parts, index):
        for batch in global_batches():
            x, y = local(batch) if order is not None else batch
            opt.zero_grad()
            stepper.adversarial_step(method_closure(kind, forward, x, y))
            opt.step()
    assert stepper.advgraph_stats["steps"] == STEPS
    return full_params(owner), counter["calls"]


SINGLE: dict[str, dict[str, torch.Tensor]] = {}


def single_process_every_method() -> None:
    """The references, computed before torch.distributed is initialized: one process."""
    assert not dist.is_initialized()
    for name, wrap_kwargs in EVERY_METHOD.items():
        SINGLE[name] = train_every_method(wrap_kwargs, None)[0]


def ddp_every_method() -> dict:
    """Every deterministic method, both DDP orders, against one process (float64)."""
    out = {}
    orders = ("DDP(wrap(model))", "wrap(DDP(model))")
    for i, (name, wrap_kwargs) in enumerate(EVERY_METHOD.items()):
        order = orders[i % 2]
        try:
            params, calls = train_every_method(wrap_kwargs, order)
            single = SINGLE[name]
            out[name] = {
                "order": order,
                "allreduce_calls": calls,
                "digest": digest(params),
                "diff_vs_single": max_diff(params, single),
            }
        except Exception:
            out[name] = {"exception": traceback.format_exc()}
    return out


SCENARIOS = {
    "lightning_ddp": lightning_ddp,
    "ddp_a_fgm": lambda: ddp_run("wrap(DDP(model))", {"mode": "output", "epsilon": 0.5}),
    "ddp_b_fgm": lambda: ddp_run("DDP(wrap(model))", {"mode": "output", "epsilon": 0.5}),
    "ddp_a_fgm_adv": lambda: ddp_run(
        "wrap(DDP(model))", {"mode": "output", "epsilon": 0.5, "objective": "adv"}
    ),
    "ddp_b_pgd": lambda: ddp_run(
        "DDP(wrap(model))", {"mode": "output", "method": "pgd", "steps": 2, "epsilon": 0.5}
    ),
    "ddp_a_freelb": lambda: ddp_run(
        "wrap(DDP(model))", {"mode": "output", "method": "freelb", "steps": 2, "random_init": False}
    ),
    "ddp_b_matrix": lambda: ddp_run("DDP(wrap(model))", {"mode": "matrix", "epsilon": 0.5}),
    "ddp_a_awp": lambda: ddp_run("wrap(DDP(model))", {"method": "awp", "target": "", "adv_lr": 0.05}),
    "ddp_b_awp": lambda: ddp_run("DDP(wrap(model))", {"method": "awp", "target": "", "adv_lr": 0.05}),
    "ddp_b_neftune": lambda: ddp_run("DDP(wrap(model))", {"method": "neftune"}),
    "ddp_hand_written": ddp_hand_written_loop,
    "ddp_every_method": ddp_every_method,
    "ddp_gradient_accumulation": ddp_gradient_accumulation,
    "fsdp1_wrap_then_shard": lambda: fsdp_run("fsdp1", "wrap-then-shard"),
    "fsdp1_shard_then_wrap": lambda: fsdp_run("fsdp1", "shard-then-wrap"),
    "fsdp2_wrap_then_shard": lambda: fsdp_run("fsdp2", "wrap-then-shard"),
    "fsdp1_matrix_wrap_then_shard": lambda: fsdp_matrix_refused("fsdp1", "wrap-then-shard"),
    "fsdp1_matrix_shard_then_wrap": lambda: fsdp_matrix_refused("fsdp1", "shard-then-wrap"),
    "fsdp2_matrix_wrap_then_shard": lambda: fsdp_matrix_refused("fsdp2", "wrap-then-shard"),
    "fsdp2_matrix_shard_then_wrap": lambda: fsdp_matrix_refused("fsdp2", "shard-then-wrap"),
}


def main() -> None:
    out_dir = sys.argv[1]
    only = sys.argv[2].split(",") if len(sys.argv) > 2 else list(SCENARIOS)
    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    if "ddp_every_method" in only:
        single_process_every_method()
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    results = {}
    for name in only:
        if name.startswith("lightning") and importlib.util.find_spec("lightning") is None:
            continue
        try:
            results[name] = SCENARIOS[name]()
        except Exception:  # reported to the test, which fails with the traceback
            results[name] = {"exception": traceback.format_exc()}
        dist.barrier()
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as fh:
        json.dump(results, fh, indent=1)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
