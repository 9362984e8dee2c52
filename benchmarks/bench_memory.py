"""(c) Extra peak memory of matrix mode at vocabulary 250,000 x 256.

Model: embedding (250k x 256) -> mean-pool -> linear; batch 16 x seq 128. For each
variant the adversarial phase (after the clean backward: perturb, forward/backward,
restore) runs under the PyTorch profiler with memory profiling; the peak of the
time-ordered allocations minus frees is compared with the same phase without a
perturbation. Target: advgraph's extra peak <= 2 x touched rows x d x itemsize; the
backup-everything recipe holds a full copy of the matrix (256 MB).

    python benchmarks/bench_memory.py [--vocab 250000] [--dim 256] [--json out.json]
"""

from __future__ import annotations

import argparse

import torch
from torch import nn
from torch.nn import functional as F
from torch.profiler import ProfilerActivity, profile

import advgraph
from _common import machine, table, write_json
from bench_torch_step import HandWrittenFGM


class Bag(nn.Module):
    def __init__(self, vocab, dim):
        super().__init__()
        self.word_embeddings = nn.Embedding(vocab, dim)
        self.fc = nn.Linear(dim, 2)

    def forward(self, x):
        return self.fc(self.word_embeddings(x).mean(1))


def peak_bytes(fn) -> int:
    """Peak of (allocated - freed) CPU bytes while ``fn`` runs, from profiler events."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted(prof.events(), key=lambda e: e.time_range.start)
    current = peak = 0
    for event in events:
        current += event.self_cpu_memory_usage
        peak = max(peak, current)
    return peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, default=250_000)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--json", default="bench-memory.json")
    args = parser.parse_args()
    torch.manual_seed(0)
    model = Bag(args.vocab, args.dim)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))
    y = torch.randint(0, 2, (args.batch,))
    touched = int(torch.unique(ids).numel())
    itemsize = model.word_embeddings.weight.element_size()
    target = 2 * touched * args.dim * itemsize

    def clean_backward():
        model.zero_grad(set_to_none=False)
        F.cross_entropy(model(ids), y).backward()

    def second_pass():
        F.cross_entropy(model(ids), y).backward()

    results = {}
    clean_backward()
    results["no perturbation"] = peak_bytes(second_pass)

    fgm = HandWrittenFGM(model)
    clean_backward()

    def recipe():
        fgm.attack()
        second_pass()
        fgm.restore()

    results["hand-written recipe"] = peak_bytes(recipe)

    wrapped = advgraph.wrap(model, mode="matrix")
    clean_backward()

    def ours():
        with wrapped.perturbed():
            second_pass()

    results["advgraph matrix"] = peak_bytes(ours)
    base = results["no perturbation"]
    extra = {k: v - base for k, v in results.items()}
    mb = lambda b: f"{b / 2**20:.2f} MB"  # noqa: E731
    print(f"vocab {args.vocab} x dim {args.dim}, touched rows {touched}, target 2 x rows x d x itemsize = {mb(target)}")
    print(table([(k, mb(results[k]), mb(extra[k])) for k in results], ("variant", "phase peak", "extra vs none")))
    ok = extra["advgraph matrix"] <= target
    print(f"\nadvgraph extra {mb(extra['advgraph matrix'])} <= {mb(target)}: {'ok' if ok else 'MISSED'}; "
          f"recipe extra {mb(extra['hand-written recipe'])}")
    write_json(args.json, {"benchmark": "memory", "args": vars(args), "machine": machine(), "touched_rows": touched,
                           "peak_bytes": results, "extra_bytes": extra, "target_bytes": target, "ok": ok})


if __name__ == "__main__":
    main()
