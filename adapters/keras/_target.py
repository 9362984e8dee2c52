"""Find the layer that ``wrap(target=...)`` names inside a Keras model."""

from __future__ import annotations

import logging
from typing import Any, Iterator

import keras

from advgraph._errors import received

logger = logging.getLogger("advgraph")

__all__ = ["find_target", "iter_layers", "embedding_candidates", "layer_path"]

_MAX_LISTED = 25


def iter_layers(model: keras.Model) -> Iterator[tuple[str, keras.layers.Layer]]:
    """Every layer nested in ``model`` (depth first), with its ``outer/inner`` name path.

    A layer reached twice (shared between sub-models) is listed once.
    """
    seen: set[int] = set()

    def walk(layer: Any, prefix: str) -> Iterator[tuple[str, keras.layers.Layer]]:
        children = getattr(layer, "_layers", None)
        if children is None:
            children = getattr(layer, "layers", [])
        for child in list(children):
            if not isinstance(child, keras.layers.Layer) or id(child) in seen:
                continue
            if isinstance(child, keras.layers.InputLayer):
                continue
            seen.add(id(child))
            path = f"{prefix}{child.name}"
            yield path, child
            yield from walk(child, path + "/")

    yield from walk(model, "")


def layer_path(model: keras.Model, layer: keras.layers.Layer) -> str | None:
    """The ``outer/inner`` name path of ``layer`` in ``model``, or None if absent."""
    for path, candidate in iter_layers(model):
        if candidate is layer:
            return path
    return None


def embedding_candidates(model: keras.Model) -> list[tuple[str, keras.layers.Layer]]:
    """Every ``keras.layers.Embedding`` (or subclass) in ``model`` with its name path."""
    return [(p, l) for p, l in iter_layers(model) if isinstance(l, keras.layers.Embedding)]


def _describe(cands: list[tuple[str, keras.layers.Layer]]) -> str:
    if not cands:
        return "none"
    parts = []
    for path, layer in cands[:_MAX_LISTED]:
        dim = getattr(layer, "input_dim", None)
        shape = f", input_dim={dim}" if dim is not None else ""
        parts.append(f"'{path}' ({type(layer).__name__}{shape})")
    if len(cands) > _MAX_LISTED:
        parts.append(f"... {len(cands) - _MAX_LISTED} more")
    return "[" + ", ".join(parts) + "]"


def find_target(model: keras.Model, target: Any) -> tuple[str, keras.layers.Layer]:
    """Resolve ``target`` to ``(name_path, layer)`` inside ``model``.

    Args:
        model: the Keras model.
        target: ``"embedding"`` (the only ``Embedding`` layer; with several, the one
            with the largest ``input_dim``, logged), a layer name (e.g. the seed's
            ``"Embedding-Token"``), an ``outer/inner`` name path, a dotted attribute
            path of a subclassed model (``"encoder.token_embedding"``), or the layer
            object itself.

    Returns:
        ``(path, layer)``.

    Raises:
        ValueError: not found, or ambiguous; the candidates are listed.
        TypeError: ``target`` is neither a string nor a Keras layer.

    Example:
        >>> import keras
        >>> from advgraph.adapters.keras._target import find_target
        >>> model = keras.Sequential([keras.Input((3,)), keras.layers.Embedding(9, 2, name="tok")])
        >>> find_target(model, "embedding")[0]
        'tok'
    """
    layers = list(iter_layers(model))
    embeddings = [(p, l) for p, l in layers if isinstance(l, keras.layers.Embedding)]
    if isinstance(target, keras.layers.Layer):
        if target is model:
            raise ValueError(
                "`target` must be a layer inside the model (the embedding), not the model "
                f"itself. Embedding layers: {_describe(embeddings)}. {received(target=target.name)}"
            )
        for path, layer in layers:
            if layer is target:
                return path, layer
        raise ValueError(
            "`target` must be a layer of the model. Embedding layers: "
            f"{_describe(embeddings)}. {received(target=target.name)}"
        )
    if not isinstance(target, str):
        raise TypeError(
            "`target` must be 'embedding', a layer name or a keras layer of the model. "
            f"{received(target=target)}"
        )
    if target == "embedding":
        if not embeddings:
            raise ValueError(
                "target='embedding' found no keras.layers.Embedding in the model. Pass the "
                "name or the object of the layer to perturb. Layers: "
                f"{_describe(layers)}. {received(target=target)}"
            )
        if len(embeddings) == 1:
            return embeddings[0]
        largest = max(int(getattr(l, "input_dim", 0) or 0) for _, l in embeddings)
        best = [(p, l) for p, l in embeddings if int(getattr(l, "input_dim", 0) or 0) == largest]
        if len(best) > 1:
            raise ValueError(
                "target='embedding' is ambiguous: several Embedding layers share the largest "
                "input_dim. Pass the layer name. Embedding layers: "
                f"{_describe(embeddings)}. {received(target=target)}"
            )
        logger.info(
            "advgraph: target 'embedding' -> '%s' (largest input_dim=%d of %s)",
            best[0][0],
            largest,
            _describe(embeddings),
        )
        return best[0]
    by_name = [(p, l) for p, l in layers if l.name == target or p == target]
    if len(by_name) == 1:
        return by_name[0]
    if len(by_name) > 1:
        raise ValueError(
            "`target` names several layers (nested models may repeat a name); pass an "
            f"'outer/inner' path or the layer object. Matches: {_describe(by_name)}. "
            f"{received(target=target)}"
        )
    obj: Any = model
    for part in target.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            break
    if isinstance(obj, keras.layers.Layer) and obj is not model:
        for path, layer in layers:
            if layer is obj:
                return path, layer
    raise ValueError(
        "`target` must be 'embedding', the name of a layer of the model, or the layer "
        f"itself. Embedding layers: {_describe(embeddings)}; all layers: "
        f"{_describe(layers)}. {received(target=target)}"
    )


# Keras' names of the variables AWP perturbs: the counterpart of PyTorch's `weight`
# (dense / convolution kernels, embedding matrices, normalisation scales); biases,
# `beta` and statistics are never perturbed.
AWP_NAMES = ("kernel", "embeddings", "gamma", "depthwise_kernel", "pointwise_kernel", "recurrent_kernel")


def awp_variables(model: keras.Model, target: Any) -> tuple[str, list[Any]]:
    """Resolve method='awp''s ``target`` to ``(description, [variable, ...])``.

    ``target``: a layer (name, path or object), a list of them, a comma-separated
    string, or the model itself / ``""`` for every layer. Every trainable variable
    named in :data:`AWP_NAMES` under them is perturbed, each once.
    """
    from advgraph._errors import received

    if isinstance(target, str) and "," in target:
        target = [t.strip() for t in target.split(",")]
    targets = list(target) if isinstance(target, (list, tuple)) else [target]
    if not targets:
        raise ValueError(f"`target` names no layer. {received(target=target)}")
    paths: list[str] = []
    found: list[Any] = []
    for item in targets:
        if item is model or item == "":
            path, layer = "", model
        else:
            path, layer = find_target(model, item)
        paths.append(path)
        for var in layer.trainable_variables:
            name = var.name.rsplit("/", 1)[-1]
            if name in AWP_NAMES and not any(var is seen for seen in found):
                found.append(var)
    if not found:
        raise ValueError(
            "method='awp' perturbs the trainable kernels, embedding matrices and "
            f"normalisation scales ({', '.join(AWP_NAMES)}) under `target`; there are none. "
            f"{received(target=','.join(paths) or '<model>')}"
        )
    return ",".join(paths) or "<model>", found
