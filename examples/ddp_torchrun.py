"""Adversarial training with PyTorch DistributedDataParallel, launched by torchrun.

    torchrun --nproc_per_node 2 examples/ddp_torchrun.py

(``python -m torch.distributed.run`` is the same launcher.) CPU processes talk over
gloo, GPUs over nccl. A small LSTM text classifier on generated data; runs in under
20 s on a 2-core CPU. Test accuracy passes the majority-class baseline (printed first)
in the first epoch.

The order: wrap first, then DDP, and call the DDP module in the closure::

    wrapped = advgraph.wrap(model, mode="output", epsilon=1.0)
    ddp = DistributedDataParallel(wrapped)
    loss = wrapped.adversarial_step(lambda: loss_fn(ddp(x), y))

(``wrapped = advgraph.wrap(DistributedDataParallel(model))`` with
``wrapped.adversarial_step(lambda: loss_fn(wrapped(x), y))`` works as well.) Every
pass of the step but the last runs without gradient sync, as under ``ddp.no_sync()``;
the last pass's backward all-reduces the accumulated gradients -- clean and
adversarial -- once per step.
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import advgraph

VOCAB, LENGTH = 200, 16


class TextClassifier(nn.Module):
    def __init__(self, vocab: int = VOCAB, dim: int = 32, classes: int = 2) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocab, dim)
        self.encoder = nn.LSTM(dim, dim, batch_first=True)
        self.head = nn.Linear(dim, classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        hidden, _ = self.encoder(self.embedding(tokens))
        return self.head(hidden.mean(dim=1))


def make_data(n: int, seed: int) -> torch.utils.data.TensorDataset:
    """Random filler tokens plus two keywords: ids 1-10 positive, 11-20 negative."""
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(21, VOCAB, (n, LENGTH), generator=gen)
    labels = torch.randint(0, 2, (n,), generator=gen)
    keywords = torch.randint(1, 11, (n, 2), generator=gen) + 10 * (1 - labels).unsqueeze(1)
    tokens.scatter_(1, torch.rand(n, LENGTH, generator=gen).argsort(dim=1)[:, :2], keywords)
    return torch.utils.data.TensorDataset(tokens, labels)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--mode", choices=["output", "matrix"], default="output")
    parser.add_argument("--epsilon", type=float, default=1.0)
    args = parser.parse_args()

    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    torch.set_num_threads(1)

    torch.manual_seed(0)  # the same initial weights on every rank (DDP also broadcasts them)
    model = TextClassifier().to(device)
    wrapped = advgraph.wrap(model, mode=args.mode, epsilon=args.epsilon)  # 1. wrap
    ddp = DistributedDataParallel(wrapped, device_ids=[device.index] if cuda else None)  # 2. DDP
    optimizer = torch.optim.Adam(ddp.parameters(), lr=3e-3)
    loss_fn = nn.CrossEntropyLoss()

    train = make_data(2048, seed=0)
    sampler = torch.utils.data.DistributedSampler(train, num_replicas=world, rank=rank, seed=0)
    loader = torch.utils.data.DataLoader(train, batch_size=32, sampler=sampler)
    x_test, y_test = make_data(512, seed=1).tensors
    if rank == 0:
        print(f"majority-class baseline (always the most common label): "
              f"{torch.bincount(y_test).max().item() / len(y_test):.3f}")

    for epoch in range(args.epochs):
        sampler.set_epoch(epoch)
        ddp.train()
        for x, y in loader:
            x, y = x.to(device), y.to(device)
            optimizer.zero_grad()
            loss = wrapped.adversarial_step(lambda: loss_fn(ddp(x), y))  # 3. the closure calls DDP
            optimizer.step()
        ddp.eval()
        with torch.no_grad():
            accuracy = (ddp(x_test.to(device)).argmax(dim=1).cpu() == y_test).float().mean().item()
        if rank == 0:
            print(f"epoch {epoch + 1}: last clean loss {loss.item():.4f}, test accuracy {accuracy:.3f}")

    # Every rank holds the same weights: compare a checksum across ranks.
    total = sum(float(p.detach().double().sum()) for p in model.parameters())
    checksum = torch.tensor([total], dtype=torch.float64)
    sums = [torch.zeros_like(checksum) for _ in range(world)]
    dist.all_gather(sums, checksum)
    if rank == 0:
        same = all(torch.equal(s, sums[0]) for s in sums)
        print(f"advgraph {wrapped.advgraph_stats}; {world} ranks hold identical weights: {same}")
    # Orderly teardown: every rank done with collectives, DDP's reducer gone, then the
    # process group (gloo can abort at exit when a rank tears down mid-collective).
    dist.barrier()
    del ddp
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
