"""(d) Inference: a wrapped model in eval mode against the original. Target <= 1.01x.

BERT from config and a custom Embedding -> LSTM -> Linear model; on both, the wrapped
model is the same object and its embedding's forward is the fx-rewritten code with the
perturbation node (route ``fx``). Interleaved medians.

    python benchmarks/bench_torch_inference.py [--repeats 30] [--json out.json]
"""

from __future__ import annotations

import argparse
import copy

import torch
from torch import nn

import advgraph
from _common import interleaved, machine, medians, paired_ratio, table, write_json
from bench_torch_step import build


class LSTMClassifier(nn.Module):
    def __init__(self, vocab=30522, dim=256):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.lstm = nn.LSTM(dim, dim, batch_first=True)
        self.fc = nn.Linear(dim, 2)

    def forward(self, x):
        h, _ = self.lstm(self.emb(x))
        return self.fc(h[:, -1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", default="bench-torch-inference.json")
    args = parser.parse_args()
    device = args.device
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 30522, (16, 128), generator=gen).to(device)
    variants = {}
    routes = {}
    for label, original in (
        ("bert", build(device, 30522, 256, 4, 4).eval()),
        ("lstm", LSTMClassifier().to(device).eval()),
    ):
        torch.manual_seed(0)
        wrapped = advgraph.wrap(copy.deepcopy(original), mode="output").eval()
        routes[label] = wrapped.advgraph_route
        call = (lambda m: m(input_ids=ids)) if label == "bert" else (lambda m: m(ids))

        def run(model=original, call=call):
            with torch.no_grad():
                call(model)

        def run_wrapped(model=wrapped, call=call):
            with torch.no_grad():
                call(model)

        variants[f"{label} original"] = run
        variants[f"{label} wrapped ({routes[label]})"] = run_wrapped
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    times = interleaved(variants, args.repeats, 3, sync)
    med = medians(times)
    ratios = {
        label: med[f"{label} wrapped ({routes[label]})"] / med[f"{label} original"]
        for label in routes
    }
    paired = {
        label: paired_ratio(times, f"{label} wrapped ({routes[label]})", f"{label} original")
        for label in routes
    }
    print(table([(n, f"{t * 1e3:.2f}") for n, t in med.items()], ("variant", "median ms")))
    print()
    fastest = {
        label: min(times[f"{label} wrapped ({routes[label]})"]) / min(times[f"{label} original"])
        for label in routes
    }
    rows = [
        (f"{l} wrapped / original", f"{r:.3f}", f"{paired[l]:.3f}", f"{fastest[l]:.3f}", "<= 1.01",
         "ok" if paired[l] <= 1.01 else "MISSED")
        for l, r in ratios.items()
    ]
    print(table(rows, ("ratio", "of medians", "paired (per round)", "of minima", "target", "verdict (paired)")))
    write_json(args.json, {"benchmark": "torch_inference", "args": vars(args), "machine": machine(), "median_s": med, "times_s": times, "ratios": ratios, "paired_ratios": paired, "min_ratios": fastest, "routes": routes})


if __name__ == "__main__":
    main()
