"""Quick start: FGM adversarial training of a tiny PyTorch text classifier.

Runs in a few seconds on a CPU, with generated data (no downloads). The task:
a sentence is positive when it holds more tokens from the "positive" half of
the vocabulary than from the negative half.

    python examples/quickstart.py
"""

from __future__ import annotations

import torch
from torch import nn

import advgraph


class TextClassifier(nn.Module):
    def __init__(self, vocab: int = 200, dim: int = 32, classes: int = 2) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocab, dim)
        self.encoder = nn.LSTM(dim, dim, batch_first=True)
        self.head = nn.Linear(dim, classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        hidden, _ = self.encoder(self.embedding(tokens))
        return self.head(hidden.mean(dim=1))


def make_data(n: int, vocab: int = 200, length: int = 16, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab, (n, length), generator=gen)
    labels = ((tokens < vocab // 2).sum(dim=1) > length // 2).long()
    return tokens, labels


def main() -> None:
    torch.manual_seed(0)
    x_train, y_train = make_data(2048, seed=0)
    x_test, y_test = make_data(512, seed=1)
    model = TextClassifier()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    loss_fn = nn.CrossEntropyLoss()

    wrapped = advgraph.wrap(model, target="embedding", mode="output", epsilon=1.0)
    print(f"wrapped {type(model).__name__}: route={wrapped.advgraph_route} target={wrapped.advgraph_target}")
    for epoch in range(3):
        wrapped.train()
        for i in range(0, len(x_train), 64):
            x, y = x_train[i : i + 64], y_train[i : i + 64]
            optimizer.zero_grad()
            loss = wrapped.adversarial_step(lambda: loss_fn(wrapped(x), y))
            optimizer.step()
        wrapped.eval()
        with torch.no_grad():
            accuracy = (wrapped(x_test).argmax(dim=1) == y_test).float().mean().item()
        print(f"epoch {epoch + 1}: last clean loss {loss.item():.4f}, test accuracy {accuracy:.3f}")
    print("stats:", wrapped.advgraph_stats)
    model = advgraph.unwrap(wrapped)


if __name__ == "__main__":
    main()
