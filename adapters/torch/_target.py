"""Find the module that ``wrap(target=...)`` names."""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from advgraph._errors import received

logger = logging.getLogger("advgraph")


def _path_of(model: nn.Module, module: nn.Module) -> str | None:
    for name, candidate in model.named_modules(remove_duplicate=False):
        if candidate is module:
            return name
    return None


def embedding_candidates(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every ``nn.Embedding`` in ``model`` with its dotted path."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Embedding)]


def _describe(cands: list[tuple[str, nn.Module]]) -> str:
    if not cands:
        return "none"
    return ", ".join(
        f"{n or '<root>'} ({type(m).__name__}{tuple(m.weight.shape) if isinstance(getattr(m, 'weight', None), torch.Tensor) else ''})"
        for n, m in cands
    )


def find_target(model: nn.Module, target: Any) -> tuple[str, nn.Module]:
    """Resolve ``target`` to ``(dotted_path, module)`` inside ``model``.

    ``"embedding"``: the input word embedding: HuggingFace ``get_input_embeddings()``
    when the model has it, else the only ``nn.Embedding``, else the one with most
    rows (logged). A dotted module path, or the module object itself, names it
    directly.

    Raises:
        ValueError: target not found or ambiguous; the candidates are listed.
        TypeError: ``target`` is neither a string nor an ``nn.Module``.
    """
    cands = embedding_candidates(model)
    if isinstance(target, nn.Module):
        path = _path_of(model, target)
        if path is None:
            raise ValueError(
                "`target` must be a submodule of the model. Candidates: "
                f"{_describe(cands)}. {received(target=type(target).__name__)}"
            )
        return path, target
    if not isinstance(target, str):
        raise TypeError(
            "`target` must be 'embedding', a dotted module path or an nn.Module inside "
            f"the model. {received(target=target)}"
        )
    if target == "embedding":
        getter = getattr(model, "get_input_embeddings", None)
        inner = getattr(model, "module", None)
        if not callable(getter) and isinstance(inner, nn.Module):
            # DistributedDataParallel / DataParallel around a HuggingFace model.
            getter = getattr(inner, "get_input_embeddings", None)
        if callable(getter):
            try:
                module = getter()
            except (NotImplementedError, AttributeError):
                module = None
            if isinstance(module, nn.Module):
                path = _path_of(model, module)
                if path is not None:
                    logger.info("advgraph: target 'embedding' -> %s (get_input_embeddings)", path)
                    return path, module
        if not cands:
            raise ValueError(
                "target='embedding' found no nn.Embedding in the model. Pass the dotted "
                "path or the module of the embedding to perturb. "
                f"{received(model=type(model).__name__)}"
            )
        if len(cands) == 1:
            return cands[0]
        rows = [m.num_embeddings for _, m in cands]
        largest = max(rows)
        best = [c for c, r in zip(cands, rows) if r == largest]
        if len(best) > 1:
            raise ValueError(
                "target='embedding' is ambiguous: several nn.Embedding modules have the "
                f"most rows ({largest}). Pass one by path. Candidates: {_describe(cands)}. "
                f"{received(target=target)}"
            )
        logger.info(
            "advgraph: target 'embedding' -> %s, the nn.Embedding with most rows (%d) of: %s",
            best[0][0],
            largest,
            _describe(cands),
        )
        return best[0]
    try:
        module = model.get_submodule(target)
    except AttributeError:
        raise ValueError(
            f"`target` names no submodule of the model. Candidates: {_describe(cands)}. "
            f"{received(target=target)}"
        ) from None
    return target, module


def sharing_weight(model: nn.Module, module: nn.Module) -> list[str]:
    """Dotted paths of every module of ``model`` (aliases included) holding ``module``'s weight."""
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor):
        return []
    return [
        name
        for name, m in model.named_modules(remove_duplicate=False)
        if getattr(m, "weight", None) is weight
    ]


def find_lookups(
    model: nn.Module, path: str, module: nn.Module, every: bool
) -> list[tuple[str, nn.Module]]:
    """The modules whose forward looks the target's weight up.

    ``every=True`` (``target="embedding"``): the target and every other module of
    its kind holding the same weight Parameter (T5/BART: ``shared``,
    ``encoder.embed_tokens``, ``decoder.embed_tokens``), each once, in module
    order. An output layer tied to the weight (an ``nn.Linear`` LM head) is not a
    lookup. ``every=False`` (a dotted path or a module object): the target alone.
    """
    weight = getattr(module, "weight", None)
    if not every or not isinstance(weight, torch.Tensor):
        return [(path, module)]
    kind = nn.Embedding if isinstance(module, nn.Embedding) else type(module)
    found = [
        (name, m)
        for name, m in model.named_modules()
        if m is module or (isinstance(m, kind) and getattr(m, "weight", None) is weight)
    ]
    return found or [(path, module)]
