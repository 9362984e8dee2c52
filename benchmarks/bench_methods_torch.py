"""PyTorch step time of gp, r3f, smart, neftune and awp against their pass-count ideal.

The BERT-like model of ``bench_torch_step.py`` (BERT from config, AdamW), the same
interleaved timing. Costs measured in the same run:

- ``plain``: one forward/backward; ``plain 2 passes``: two forward/backwards, gradients
  summed; one pass = ``plain 2 passes - plain`` (every variant makes ONE optimizer
  step, so the optimizer is counted once in every ideal); ``hand FGM``: the copied FGM
  class (2 passes, shown for scale); ``forward``: a forward without gradient;
- ``hand GP``: loss + eps/2 ||dL/de||^2 written by hand (autograd.grad with
  create_graph on the embedding output, then backward; math attention kernel);
- ``hand AWP``: the AWP class Kaggle NLP solutions copy (every parameter named
  ``weight``; backup, add adv_lr * ||w|| * g / ||g||, clamp to the adv_eps band,
  zero_grad, adversarial backward, restore), adv_lr=1, adv_eps=0.2.

Ideals: gp = hand GP; r3f = 2 passes (two forwards, one backward through both);
smart (steps=1, mu > 0) = 3 passes + 2 forwards (teacher, fixed clean logits);
neftune = 1 pass (plain); awp (every weight) = 2 passes, and the hand AWP class.

    python benchmarks/bench_methods_torch.py [--repeats 5] [--device cpu|cuda] [--json out.json]
"""

from __future__ import annotations

import argparse
import copy

import torch

import advgraph
from _common import interleaved, machine, medians, table, write_json
from bench_torch_step import HandWrittenFGM, build


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--vocab", type=int, default=30522)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--json", default="bench-methods-torch.json")
    args = parser.parse_args()
    device = args.device
    base = build(device, args.vocab, args.hidden, args.layers, args.heads)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(1, args.vocab, (args.batch, args.seq), generator=gen).to(device)
    labels = torch.randint(0, 2, (args.batch,), generator=gen).to(device)
    mask = torch.ones_like(ids)

    def out_of(model):
        return model(input_ids=ids, attention_mask=mask, labels=labels)

    variants = {}

    def add(name, model, step):
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5)

        def run():
            opt.zero_grad(set_to_none=True)
            step(model)
            opt.step()

        variants[name] = run

    add("plain", copy.deepcopy(base), lambda m: out_of(m).loss.backward())

    def two_passes(m):
        out_of(m).loss.backward()
        out_of(m).loss.backward()

    add("plain 2 passes", copy.deepcopy(base), two_passes)
    forward_model = copy.deepcopy(base)

    def forward_only():
        with torch.no_grad():
            out_of(forward_model)

    variants["forward"] = forward_only
    hand_model = copy.deepcopy(base)
    fgm = HandWrittenFGM(hand_model)

    def hand_fgm(m):
        out_of(m).loss.backward()
        fgm.attack()
        out_of(m).loss.backward()
        fgm.restore()

    add("hand FGM", hand_model, hand_fgm)

    gp_model = copy.deepcopy(base)
    captured = {}
    gp_model.get_input_embeddings().register_forward_hook(lambda mod, a, out: captured.__setitem__("e", out))

    def hand_gp(m):
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel([SDPBackend.MATH]):
            loss = out_of(m).loss
        (g,) = torch.autograd.grad(loss, captured.pop("e"), create_graph=True)
        (loss + 0.5 * (g**2).sum()).backward()

    add("hand GP", gp_model, hand_gp)

    awp_model = copy.deepcopy(base)

    def hand_awp(m, adv_lr=1.0, adv_eps=0.2, e=1e-6):
        out_of(m).loss.backward()
        backup, bands = {}, {}
        for name, p in m.named_parameters():
            if p.requires_grad and p.grad is not None and "weight" in name:
                backup[name] = p.data.clone()
                grad_eps = adv_eps * p.abs().detach()
                bands[name] = (backup[name] - grad_eps, backup[name] + grad_eps)
        for name, p in m.named_parameters():
            if name in backup:
                norm1, norm2 = torch.norm(p.grad), torch.norm(p.data.detach())
                if norm1 != 0 and not torch.isnan(norm1):
                    p.data.add_(adv_lr * p.grad / (norm1 + e) * (norm2 + e))
                    p.data = torch.min(torch.max(p.data, bands[name][0]), bands[name][1])
        m.zero_grad(set_to_none=True)
        out_of(m).loss.backward()
        for name, p in m.named_parameters():
            if name in backup:
                p.data = backup[name]

    add("hand AWP", awp_model, hand_awp)

    def pair(m):
        out = out_of(m)
        return out.loss, out.logits

    for name, kwargs, closure in [
        ("advgraph gp", dict(method="gp"), lambda m: out_of(m).loss),
        ("advgraph r3f", dict(method="r3f"), pair),
        ("advgraph smart", dict(method="smart"), pair),
        ("advgraph neftune", dict(method="neftune"), lambda m: out_of(m).loss),
        ("advgraph awp", dict(method="awp", target="", adv_lr=1.0, adv_eps=0.2), lambda m: out_of(m).loss),
    ]:
        wrapped = advgraph.wrap(copy.deepcopy(base), **kwargs)
        add(name, wrapped, lambda m, c=closure: m.adversarial_step(lambda: c(m)))

    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    times = interleaved(variants, args.repeats, args.warmup, sync)
    med = medians(times)
    plain, fwd = med["plain"], med["forward"]
    per_pass = med["plain 2 passes"] - plain  # one forward/backward, no second optimizer step
    ideal = {
        "advgraph gp": med["hand GP"],
        "advgraph r3f": plain + per_pass,
        "advgraph smart": plain + 2 * per_pass + 2 * fwd,
        "advgraph neftune": plain,
        "advgraph awp": plain + per_pass,
    }
    ratios = {f"{name} / ideal": med[name] / ideal[name] for name in ideal}
    ratios["advgraph awp / hand AWP"] = med["advgraph awp"] / med["hand AWP"]
    print(table([(n, f"{t * 1e3:.1f}", f"{t / plain:.2f}x") for n, t in med.items()], ("variant", "median ms", "vs plain")))
    print()
    refs = {**{f"{n} / ideal": ideal[n] for n in ideal}, "advgraph awp / hand AWP": med["hand AWP"]}
    print(table([(n, f"{refs[n] * 1e3:.1f}", f"{r:.3f}") for n, r in ratios.items()], ("ratio", "reference ms", "value")))
    write_json(args.json, {
        "benchmark": "methods_torch", "args": vars(args), "machine": machine(),
        "median_s": med, "times_s": times, "ideal_s": ideal, "ratios": ratios,
    })


if __name__ == "__main__":
    main()
