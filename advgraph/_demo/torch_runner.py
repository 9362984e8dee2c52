"""PyTorch side of ``advgraph demo``: the model and one training run. Thin on purpose."""

from __future__ import annotations

import os
from typing import Any, Callable

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

import advgraph
from advgraph._demo.data import PAD, Encoded
from advgraph._demo.settings import PAIR_METHODS, DemoError, DemoSettings, method_kwargs

__all__ = ["MeanPoolClassifier", "Trainer", "check_methods", "configure"]


def configure() -> None:
    """One torch thread unless OMP_NUM_THREADS says otherwise: the model is tiny, and
    on a busy 2-core machine two threads were several times slower than one."""
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(1)


class MeanPoolClassifier(nn.Module):
    """Embedding -> mean over non-padding tokens -> Linear+ReLU -> dropout -> Linear."""

    def __init__(self, vocab_size: int, classes: int, s: DemoSettings) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, s.embed_dim)
        self.hidden = nn.Linear(s.embed_dim, s.hidden)
        self.dropout = nn.Dropout(s.dropout)
        self.head = nn.Linear(s.hidden, classes)
        # Same initialisers as the Keras model (Keras' defaults for Dense).
        nn.init.normal_(self.embedding.weight, std=s.embed_init_std)
        for layer in (self.hidden, self.head):
            nn.init.xavier_uniform_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.classify(self.embedding(tokens), tokens)

    def classify(self, embedded: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Everything after the embedding (the attack runs the model from here)."""
        mask = (tokens != PAD).unsqueeze(-1).to(embedded.dtype)
        pooled = (embedded * mask).sum(1) / mask.sum(1).clamp(min=1.0)
        return self.head(self.dropout(F.relu(self.hidden(pooled))))


def check_methods(settings: DemoSettings) -> None:
    """Fail early on a method the chosen mode does not allow (e.g. neftune in matrix mode)."""
    from advgraph._config import make_config

    failed = []
    for method in settings.methods:
        if method == "none":
            continue
        kwargs = {k: v for k, v in method_kwargs(method, settings).items() if k != "target"}
        try:
            make_config(**kwargs)
        except (TypeError, ValueError) as exc:
            failed.append(f"{method} ({exc})")
    if failed:
        raise DemoError(f"These methods cannot run in mode={settings.mode!r}: " + "; ".join(failed))


def _tensor(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a)).long()


class Trainer:
    """One model trained with one method and one seed (see ``run.Trainer``)."""

    def __init__(self, method: str, seed: int, enc: Encoded, settings: DemoSettings) -> None:
        torch.manual_seed(seed)
        self.settings = settings
        self.method = method
        self.model = MeanPoolClassifier(enc.vocab_size, enc.num_classes, settings)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=settings.learning_rate)
        self.wrapped: Any = None
        if method != "none":
            self.wrapped = advgraph.wrap(self.model, **method_kwargs(method, settings))

    def _step(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        model, wrapped = self.model, self.wrapped
        if wrapped is None:
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            return loss.detach()
        if self.method in PAIR_METHODS:

            def closure() -> Any:
                logits = wrapped(x)
                return F.cross_entropy(logits, y), logits

            return wrapped.adversarial_step(closure)
        mask = (x != PAD) if self.method == "neftune" else None
        return wrapped.adversarial_step(lambda: F.cross_entropy(wrapped(x), y), mask=mask)

    def train_epoch(self, x: np.ndarray, y: np.ndarray, on_batch: Callable[[], None]) -> float:
        (self.wrapped or self.model).train()
        size, total, seen = self.settings.batch_size, 0.0, 0
        for i in range(0, len(x), size):
            xb, yb = _tensor(x[i : i + size]), _tensor(y[i : i + size])
            self.optimizer.zero_grad()
            loss = self._step(xb, yb)
            self.optimizer.step()
            with torch.no_grad():  # the embedding max-norm constraint (as Keras' MaxNorm)
                self.model.embedding.weight.renorm_(2, 0, self.settings.max_norm)
            total += float(loss) * len(xb)
            seen += len(xb)
            on_batch()
        self.model.eval()
        return total / seen

    def embed(self, x: np.ndarray) -> torch.Tensor:
        with torch.no_grad():
            return self.model.embedding(_tensor(x))

    def loss_grad(self, embedded: torch.Tensor, x: np.ndarray, y: np.ndarray, delta: torch.Tensor) -> torch.Tensor:
        delta = delta.detach().requires_grad_()
        loss = F.cross_entropy(self.model.classify(embedded + delta, _tensor(x)), _tensor(y))
        (grad,) = torch.autograd.grad(loss, [delta])
        return grad

    def predict(self, embedded: torch.Tensor, x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return self.model.classify(embedded, _tensor(x)).argmax(-1).numpy()

    def close(self) -> None:
        if self.wrapped is not None:
            advgraph.unwrap(self.wrapped)
            self.wrapped = None
