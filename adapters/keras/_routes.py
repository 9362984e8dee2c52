"""How mode='output' puts the perturbation after the target layer's output.

Three routes, same semantics (delta added to the target's output inside the
adversarial step; identity everywhere else):

- ``"functional-rewrite"``: the Keras counterpart of a torch.fx pass. The layer
  graph of a plain functional model is run again on new ``Input`` s with every
  layer reused (weights shared) and a :class:`Perturbation` layer inserted right
  after the target's (single) call; a new ``Functional`` model is built from it.
- ``"sequential-rewrite"``: the same for a plain ``Sequential`` model (a new
  ``Sequential`` with the same layer objects and the perturbation after the target).
- ``"call-wrap"``: subclassed models, subclasses of Functional/Sequential, and
  targets nested inside a sub-model: the target layer instance's ``call`` is
  wrapped (an instance attribute, removed by ``unwrap``).

mode='matrix' wraps the embedding's ``call`` too, on its input side: a random start
(a delta given as a function, known in shape only once the batch's ids are seen)
is installed right before the lookup.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import keras

from advgraph._errors import received

from ._hook import Perturbation, SiteHook, is_reverse_call
from ._private import functional_class, run_through_graph

__all__ = [
    "PERTURBATION_NAME",
    "rewrite_functional",
    "rewrite_sequential",
    "wrap_call",
    "is_call_wrapped",
    "functional_class",
]

PERTURBATION_NAME = "advgraph_perturbation"


def _unique_name(model: keras.Model) -> str:
    names = {layer.name for layer in model.layers}
    name, i = PERTURBATION_NAME, 1
    while name in names:
        name = f"{PERTURBATION_NAME}_{i}"
        i += 1
    return name


def rewrite_functional(
    model: keras.Model, target: keras.layers.Layer, hook: SiteHook
) -> tuple[keras.Model, Perturbation]:
    """Insert a :class:`Perturbation` after ``target`` in a functional model.

    Every layer object is reused, so the new model shares all weights with
    ``model``; only the new ``Input`` s and the perturbation layer are new.

    Returns:
        ``(new_model, perturbation_layer)``; ``new_model`` is not compiled.

    Example:
        >>> import keras
        >>> from advgraph.adapters.keras._routes import rewrite_functional
        >>> from advgraph.adapters.keras._hook import SiteHook
        >>> inp = keras.Input((4,), dtype="int32")
        >>> emb = keras.layers.Embedding(10, 3)
        >>> out = keras.layers.Dense(1)(keras.layers.GlobalAveragePooling1D()(emb(inp)))
        >>> new, pert = rewrite_functional(keras.Model(inp, out), emb, SiteHook())
        >>> [layer.name for layer in new.layers][1:3] == [emb.name, pert.name]
        True
    """
    pert = Perturbation(hook, name=_unique_name(model), dtype=target.dtype_policy)
    calls = []

    def call_fn(layer: Any, *args: Any, **kwargs: Any) -> Any:
        out = layer(*args, **kwargs)
        if layer is target:
            calls.append(out)
            out = pert(out)
        return out

    def new_input(x: Any) -> Any:
        history = getattr(x, "_keras_history", None)
        layer = getattr(history, "operation", None)
        name = layer.name if isinstance(layer, keras.layers.InputLayer) else x.name
        return keras.Input(batch_shape=x.shape, dtype=x.dtype, name=name)

    inputs = keras.tree.map_structure(new_input, model.input)
    outputs = run_through_graph(model, inputs, call_fn)
    if len(calls) != 1:
        raise CalledMoreThanOnce(
            "The graph rewrite puts one perturbation layer after the target's one call; "
            f"this target is called {len(calls)} times (the call-wrap route gives each call "
            f"its own delta). {received(target=target.name, calls=len(calls))}"
        )
    new = functional_class()(inputs, outputs, name=model.name, trainable=model.trainable)
    return new, pert


class CalledMoreThanOnce(ValueError):
    """The target runs several times in the functional graph: use the call-wrap route."""


def rewrite_sequential(
    model: keras.Sequential, target: keras.layers.Layer, hook: SiteHook
) -> tuple[keras.Sequential, Perturbation]:
    """A new ``Sequential`` with the same layer objects and a perturbation after ``target``.

    Example:
        >>> import keras
        >>> from advgraph.adapters.keras._routes import rewrite_sequential
        >>> from advgraph.adapters.keras._hook import SiteHook
        >>> emb = keras.layers.Embedding(10, 3)
        >>> model = keras.Sequential([keras.Input((4,), dtype="int32"), emb, keras.layers.Flatten()])
        >>> new, pert = rewrite_sequential(model, emb, SiteHook())
        >>> new.layers[1] is pert
        True
    """
    pert = Perturbation(hook, name=_unique_name(model), dtype=target.dtype_policy)
    layers: list[Any] = []
    for layer in model.layers:
        layers.append(layer)
        if layer is target:
            layers.append(pert)
    first = model._layers[0] if model._layers else None
    if isinstance(first, keras.layers.InputLayer):
        inp = keras.Input(
            batch_shape=first.batch_shape,
            dtype=first.dtype,
            name=first.name,
            optional=getattr(first, "optional", False),
        )
        layers = [inp] + layers
    new = keras.Sequential(layers, name=model.name, trainable=model.trainable)
    return new, pert


def wrap_call(layer: keras.layers.Layer, hook: SiteHook, *, before: bool = False) -> Callable[[], None]:
    """Route ``layer.call`` through ``hook``; return the undo function.

    ``before=False``: the output goes through ``hook(output)`` (mode='output').
    ``before=True``: ``hook.before(args, kwargs)`` sees the inputs first (mode='matrix':
    the token ids, for the row layout and random starts), then ``hook(output)`` the
    lookup's output (the lookup gradient). The wrapper is an attribute of this layer
    instance only; ``functools.wraps`` keeps the signature Keras inspects. A
    ``ReversibleEmbedding``'s ``reverse=True`` call (its tied output head) is passed
    through untouched: only the lookup is the site.
    """
    had_own = "call" in layer.__dict__
    previous = layer.__dict__.get("call")
    original = layer.call

    if before:

        @functools.wraps(original)
        def call(*args: Any, **kwargs: Any) -> Any:
            if is_reverse_call(args, kwargs):  # a tied output head: not the lookup
                hook.reverse()
                return original(*args, **kwargs)
            hook.before(args, kwargs)
            return hook(original(*args, **kwargs))

    else:

        @functools.wraps(original)
        def call(*args: Any, **kwargs: Any) -> Any:
            if is_reverse_call(args, kwargs):  # a tied output head: not the lookup
                return original(*args, **kwargs)
            inputs = args[0] if args else kwargs.get("inputs")
            return hook(original(*args, **kwargs), mask=lambda: _mask_of(layer, inputs))

    call.__advgraph_hook__ = hook  # type: ignore[attr-defined]
    object.__setattr__(layer, "call", call)

    def undo() -> None:
        if had_own:
            object.__setattr__(layer, "call", previous)
        else:
            object.__delattr__(layer, "call")

    return undo


def _mask_of(layer: keras.layers.Layer, inputs: Any) -> Any:
    """The Keras mask ``layer`` gives its output (``Embedding(mask_zero=True)``), or None."""
    try:
        return layer.compute_mask(inputs, None)
    except (TypeError, ValueError, NotImplementedError):
        return None


def is_call_wrapped(layer: keras.layers.Layer) -> bool:
    """Whether ``layer.call`` is currently wrapped by :func:`wrap_call`."""
    return hasattr(layer.__dict__.get("call"), "__advgraph_hook__")
