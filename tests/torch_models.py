"""Small PyTorch models shared by the adapter tests (no downloads)."""

from __future__ import annotations

import torch
from torch import nn


class LSTMClassifier(nn.Module):
    """Embedding -> LSTM -> Linear."""

    def __init__(self, vocab: int = 30, dim: int = 8, classes: int = 3, **emb_kwargs) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, dim, **emb_kwargs)
        self.lstm = nn.LSTM(dim, dim, batch_first=True)
        self.fc = nn.Linear(dim, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, _ = self.lstm(self.emb(x))
        return self.fc(h[:, -1])


class ConvClassifier(nn.Module):
    """Embedding -> Conv1d -> max-pool -> Linear."""

    def __init__(self, vocab: int = 30, dim: int = 8, classes: int = 3) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.conv = nn.Conv1d(dim, dim, kernel_size=3, padding=1)
        self.fc = nn.Linear(dim, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv(self.emb(x).transpose(1, 2)))
        return self.fc(h.amax(dim=2))


class MeanPool(nn.Module):
    """Embedding -> mean over the sequence -> Linear (the cross-framework model)."""

    def __init__(self, vocab: int = 30, dim: int = 8, classes: int = 3, **emb_kwargs) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, dim, **emb_kwargs)
        self.fc = nn.Linear(dim, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.emb(x).mean(dim=1))


class WithMask(nn.Module):
    """A forward with an optional argument: not traced whole (fx would specialise it)."""

    def __init__(self, vocab: int = 30, dim: int = 8, classes: int = 3) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.fc = nn.Linear(dim, classes)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        h = self.emb(x)
        if mask is not None:
            h = h * mask.unsqueeze(-1)
        return self.fc(h.mean(dim=1))


class Untraceable(nn.Module):
    """Data-dependent control flow inside the target module: only a hook can do it."""

    class ScaledEmbedding(nn.Module):
        def __init__(self, vocab: int, dim: int) -> None:
            super().__init__()
            self.inner = nn.Embedding(vocab, dim)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out = self.inner(x)
            if bool(x.max() > 1000):  # data-dependent: symbolic tracing fails
                out = out * 0.5
            return out

    def __init__(self, vocab: int = 30, dim: int = 8, classes: int = 3) -> None:
        super().__init__()
        self.tok = self.ScaledEmbedding(vocab, dim)
        self.fc = nn.Linear(dim, classes)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.fc(self.tok(x).mean(dim=1))


def tiny_bert(vocab: int = 64, seed: int = 0):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    cfg = BertConfig(
        vocab_size=vocab,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=32,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        num_labels=2,
    )
    return BertForSequenceClassification(cfg)


def tiny_gpt2(vocab: int = 64, seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(
        vocab_size=vocab,
        n_embd=16,
        n_layer=2,
        n_head=2,
        n_positions=32,
        bos_token_id=0,
        eos_token_id=0,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    return GPT2LMHeadModel(cfg)


def param_bytes(model: nn.Module) -> dict[str, bytes]:
    """Every parameter and buffer as raw bytes (NaN != NaN and -0.0 == 0.0 do not matter)."""
    out = {}
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        out[name] = t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
    return out


def grads(model: nn.Module) -> dict[str, torch.Tensor | None]:
    return {
        n: (p.grad.to_dense().clone() if p.grad is not None else None)
        for n, p in model.named_parameters()
    }


def reference_fgm(lookups, closure, epsilon: float, mode: str) -> torch.Tensor:
    """Hand-written FGM step (clean + adversarial gradients) on a plain model.

    Forward hooks on ``lookups`` (the modules that look the embedding up) record
    every call's output and ids. Output mode: call ``i`` gets
    ``epsilon * g_i / ||g_i||`` per sample from its own output gradient ``g_i``.
    Matrix mode: the rows' gradient is the sum over calls of the output gradients
    scattered by id (padding rows zero), normalised globally, added to the weight
    and copied back afterwards. Returns the clean loss.
    """
    lookups = list({id(m): m for m in lookups}.values())  # a module listed twice runs once
    calls: list[tuple[torch.Tensor, torch.Tensor]] = []

    def grab(module, args, out):
        if not out.requires_grad:
            out = out.detach().requires_grad_()
        out.retain_grad()
        calls.append((args[0], out))
        return out

    handles = [m.register_forward_hook(grab) for m in lookups]
    loss = closure()
    loss.backward()
    for h in handles:
        h.remove()
    if mode == "output":
        deltas = iter(
            [
                epsilon * o.grad / o.grad.flatten(1).norm(dim=1).view(-1, *([1] * (o.dim() - 1)))
                for _, o in calls
            ]
        )
        handles = [m.register_forward_hook(lambda m, a, out: out + next(deltas)) for m in lookups]
        try:
            closure().backward()
        finally:
            for h in handles:
                h.remove()
        return loss.detach()
    weight = lookups[0].weight
    g = torch.zeros_like(weight)
    for ids, o in calls:
        g.index_add_(0, ids.reshape(-1), o.grad.reshape(-1, weight.shape[1]))
    padding_idx = getattr(lookups[0], "padding_idx", None)
    if padding_idx is not None:
        g[padding_idx] = 0.0
    saved = weight.detach().clone()
    with torch.no_grad():
        weight.add_(epsilon * g / g.norm())
    try:
        closure().backward()
    finally:
        with torch.no_grad():
            weight.copy_(saved)
    return loss.detach()


class Siamese(nn.Module):
    """One embedding looked up twice per forward, on inputs of different lengths."""

    def __init__(self, vocab: int = 30, dim: int = 8, classes: int = 3) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.fc = nn.Linear(dim, classes)

    def forward(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.tanh(self.emb(x).mean(1)) - self.emb(z).mean(1) ** 2)
