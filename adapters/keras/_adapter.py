"""``wrap`` / ``unwrap`` for Keras 3 models with the TensorFlow backend.

A wrapped model trains adversarially in ``fit()`` (and ``train_on_batch()``): its
``train_step`` runs every forward/backward pass of the method through
:func:`advgraph._methods.run_method` on a Keras site, sums the parameter gradients
of the passes, and makes ONE ``optimizer.apply_gradients`` call. All of it runs
inside the compiled train function (``tf.function``, XLA with
``jit_compile=True``, the ``steps_per_execution`` loop, ``MirroredStrategy``
replicas): no host round-trip per step. ``evaluate()`` and ``predict()`` are
unchanged.

The override is per instance: ``train_step`` (and a thin ``fit`` that warns
after training when steps were skipped) are attributes of the model object, not
of its class, so the class, ``isinstance``, ``get_config`` and saving stay those
of the original model. ``unwrap`` deletes them. Routes (``model.advgraph_route``):

- ``"matrix"``: mode='matrix', the same model object; the embedding layer's
  ``call`` gets an input-side hook (random starts need the batch's ids).
- ``"functional-rewrite"`` / ``"sequential-rewrite"``: mode='output' on a plain
  functional / Sequential model: a new model of the same layers with a
  :class:`Perturbation` layer after the embedding (see ``_routes``), compiled like
  the original and sharing its optimizer. Its ``get_config`` (so ``save``) is the
  original's: a saved wrapped model loads, without advgraph, as the plain model.
- ``"call-wrap"``: mode='output' on any other model (subclassed, nested target):
  the same model object; the embedding layer's ``call`` gets an output-side hook.

Stateful layers run once per pass: BatchNormalization's moving statistics are
updated in every forward of the step (twice per FGM step), as in the PyTorch loop.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import types
import warnings
from dataclasses import dataclass
from typing import Any, Callable

import keras
import tensorflow as tf

from advgraph._config import AdversarialConfig
from advgraph._errors import AdvGraphWarning, received
from advgraph._methods import run_method

from ._routes import (
    functional_class,
    is_call_wrapped,
    rewrite_functional,
    rewrite_sequential,
    wrap_call,
)
from ._site import MatrixSite, OutputSite, Perturbation, SiteHook, Stats
from ._target import find_target, iter_layers

logger = logging.getLogger("advgraph")

__all__ = ["wrap", "unwrap", "is_wrapped"]

# Instance attributes wrap() sets on the model it returns; unwrap() deletes them.
_PUBLIC_ATTRS = ("advgraph_stats", "advgraph_route", "advgraph_target", "advgraph_config")
_METHOD_ATTRS = ("train_step", "fit", "get_config")


@dataclass
class _State:
    config: AdversarialConfig
    stats: Stats
    route: str
    target_path: str
    target: keras.layers.Layer
    hook: SiteHook
    original: keras.Model | None = None  # rewrite routes: the user's model
    perturbation: Perturbation | None = None  # rewrite routes: the inserted layer
    undo: Callable[[], None] | None = None  # call-wrap route and mode='matrix'


def is_wrapped(model: Any) -> bool:
    """Whether ``model`` was returned by ``advgraph.wrap`` and not unwrapped since.

    Example:
        >>> import keras
        >>> from advgraph.adapters.keras import is_wrapped
        >>> is_wrapped(keras.Sequential([keras.layers.Dense(1)]))
        False
    """
    return "_advgraph" in getattr(model, "__dict__", {})


def _state(model: Any) -> _State:
    state = getattr(model, "__dict__", {}).get("_advgraph")
    if state is None:
        raise TypeError(
            "Expected a Keras model returned by advgraph.wrap() (and not unwrapped since). "
            f"{received(model=getattr(model, 'name', type(model).__name__))}"
        )
    return state


# -- checks ------------------------------------------------------------------------


def _check_model(model: keras.Model) -> None:
    backend = keras.backend.backend()
    if backend != "tensorflow":
        raise ValueError(
            "advgraph's Keras adapter needs the TensorFlow backend (set KERAS_BACKEND="
            f"'tensorflow'). {received(backend=backend)}"
        )
    if is_wrapped(model):
        raise ValueError(
            "The model is already wrapped by advgraph; call advgraph.unwrap() first to "
            f"change the settings. {received(model=model.name, route=_state(model).route)}"
        )
    if not getattr(model, "compiled", False) or getattr(model, "optimizer", None) is None:
        raise ValueError(
            "advgraph.wrap() needs a compiled Keras model: call model.compile(optimizer=..., "
            "loss=...) first; the adversarial train step uses its optimizer and loss. "
            f"{received(model=model.name, compiled=bool(getattr(model, 'compiled', False)))}"
        )
    if type(model).train_step is not keras.Model.train_step:
        raise ValueError(
            "advgraph.wrap() replaces the model's train_step, but this model class defines "
            "its own train_step, which would be silently bypassed. Use the standard "
            "train_step (override compute_loss instead), or call advgraph's methods from "
            f"your train_step. {received(model_class=type(model).__qualname__)}"
        )


def _check_matrix_target(model: keras.Model, path: str, layer: keras.layers.Layer) -> None:
    embeddings = getattr(layer, "embeddings", None)
    if embeddings is None and not isinstance(layer, keras.layers.Embedding):
        raise ValueError(
            "mode='matrix' perturbs the rows of an Embedding layer's `embeddings` matrix; "
            "the target has none (use mode='output' to perturb any layer's output). "
            f"{received(target=f'{path} ({type(layer).__name__})')}"
        )
    if embeddings is None:
        return  # not built yet: the variable is looked up when the step is traced
    dtype = keras.backend.standardize_dtype(embeddings.dtype)
    if not dtype.startswith(("float", "bfloat")):
        raise ValueError(
            "mode='matrix' needs a floating-point embedding matrix. "
            f"{received(target=path, dtype=dtype)}"
        )
    shared = [
        p
        for p, other in iter_layers(model)
        if other is not layer
        and not isinstance(other, keras.Model)
        and any(w is embeddings for w in other.weights)
    ]
    if shared:
        warnings.warn(
            f"advgraph: the embedding matrix of '{path}' is also a weight of "
            f"{', '.join(repr(s) for s in shared)}; in mode='matrix' the perturbation "
            "reaches those layers too (e.g. a tied output layer), and delta then covers the "
            "whole matrix. mode='output' perturbs only the embedding's output.",
            AdvGraphWarning,
            stacklevel=4,
        )


def _check_not_shared(path: str, layer: keras.layers.Layer) -> None:
    if is_call_wrapped(layer):
        raise ValueError(
            "The target layer already carries an advgraph hook (a model sharing it is "
            f"wrapped); unwrap that model first. {received(target=path)}"
        )


# -- the adversarial train_step ------------------------------------------------------


def _unscale_for_distribution(loss: tf.Tensor) -> tf.Tensor:
    # Keras divides the compiled loss by the number of replicas; the logged loss is not.
    replicas = tf.distribute.get_strategy().num_replicas_in_sync
    if replicas > 1:
        loss = loss * tf.cast(replicas, loss.dtype)
    return loss


def _compute_loss(model: keras.Model, x: Any, y: Any, y_pred: Any, sample_weight: Any) -> Any:
    compute = getattr(model, "_compute_loss", None)  # handles compute_loss without `training`
    if compute is not None:
        return compute(x=x, y=y, y_pred=y_pred, sample_weight=sample_weight, training=True)
    return model.compute_loss(x=x, y=y, y_pred=y_pred, sample_weight=sample_weight)


def _adversarial_train_step(self: keras.Model, data: Any) -> dict[str, Any]:
    """The wrapped model's ``train_step``: every pass of the method, one update.

    Mirrors Keras' TensorFlow ``train_step``: the loss tracker and the compiled
    metrics see the clean pass (its loss and predictions; FreeLB: its first pass;
    VAT on an unlabeled batch, ``fit(x)`` with no ``y``: the VAT loss, and the
    model's outputs are taken as logits); the loss is scaled with
    ``optimizer.scale_loss`` in every pass (mixed precision: the
    ``LossScaleOptimizer`` unscales the summed gradients and skips non-finite
    ones); ``optimizer.apply_gradients`` runs once with the summed gradients.
    """
    state = _state(self)
    config = state.config
    x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
    site: Any
    if config.mode == "matrix":
        site = MatrixSite(self, state.stats, state.target, static_shapes=bool(self.jit_compile))
    else:
        site = OutputSite(self, state.stats)
    predictions: list[Any] = []
    vat = config.method == "vat"

    def closure() -> Any:
        # Metrics see the first (clean) pass only: the per-output loss trackers of
        # compile(), and any metric a forward or compute_loss updates, are put back
        # after the later passes (in-graph: the variables' values before the pass).
        later = bool(predictions)
        metric_vars = list(self.metrics_variables) if later else []
        saved = [tf.identity(v) for v in metric_vars]
        if getattr(self, "_call_has_training_arg", True):
            y_pred = self(x, training=True)
        else:
            y_pred = self(x)
        predictions.append(y_pred)
        if vat and y is None:  # unlabeled batch: VAT needs the logits only
            out = y_pred
        else:
            loss = _compute_loss(self, x, y, y_pred, sample_weight)
            out = (loss, y_pred) if vat else loss
        for var, value in zip(metric_vars, saved):
            var.assign(value)
        return out

    with state.hook.activate(site):
        loss = run_method(site, closure, config)

    first = next(t for t in keras.tree.flatten(x) if t is not None)
    self._loss_tracker.update_state(
        _unscale_for_distribution(loss), sample_weight=tf.shape(first)[0]
    )
    if site.variables:
        grads = site.param_grads or [None] * len(site.variables)
        self.optimizer.apply_gradients(zip(grads, site.variables))
    else:
        warnings.warn("The model does not have any trainable weights.", stacklevel=2)
    if y is None:
        return self.get_metrics_result()
    return self.compute_metrics(x, y, predictions[0], sample_weight=sample_weight)


def _make_fit(model: keras.Model) -> Callable[..., Any]:
    original_fit = type(model).fit.__get__(model)

    @functools.wraps(type(model).fit)
    def fit(*args: Any, **kwargs: Any) -> Any:
        state = model.__dict__.get("_advgraph")
        before = state.stats.as_dict() if state is not None else None
        history = original_fit(*args, **kwargs)
        if state is not None and before is not None:
            _warn_skipped(before, state.stats.as_dict())
        return history

    return fit


def _warn_skipped(before: dict[str, int], after: dict[str, int]) -> None:
    steps = after["steps"] - before["steps"]
    for key, what in (("skipped_nonfinite", "held NaN or inf"), ("skipped_zero", "was zero")):
        count = after[key] - before[key]
        if count > 0:
            warnings.warn(
                f"advgraph: in {count} of {steps} adversarial steps of this fit() the "
                f"gradient at the embedding {what}; delta was 0 there (for the affected "
                f"samples in output mode). Counted in model.advgraph_stats['{key}'].",
                AdvGraphWarning,
                stacklevel=3,
            )


# -- installing -----------------------------------------------------------------------


def _compile_like(new: keras.Model, model: keras.Model) -> None:
    """Compile ``new`` as ``model`` was, sharing its optimizer (and its state)."""
    compile_config = getattr(model, "_compile_config", None)
    config = dict(getattr(compile_config, "config", {}) or {})
    new.compile(
        optimizer=model.optimizer,
        loss=config.get("loss", getattr(model, "loss", None)),
        loss_weights=config.get("loss_weights"),
        metrics=config.get("metrics"),
        weighted_metrics=config.get("weighted_metrics"),
        run_eagerly=model.run_eagerly,
        steps_per_execution=model.steps_per_execution,
        jit_compile=model.jit_compile,
        auto_scale_loss=False,  # model.optimizer already is a LossScaleOptimizer if wanted
    )


def _install_output(
    model: keras.Model, path: str, layer: keras.layers.Layer, hook: SiteHook
) -> tuple[keras.Model, str, keras.Model | None, Perturbation | None, Callable[[], None] | None]:
    """Pick the route for mode='output'; return (host, route, original, perturbation, undo)."""
    _check_not_shared(path, layer)
    top_level = any(candidate is layer for candidate in model.layers)
    cls = type(model)
    rewrite: Callable[..., Any] | None = None
    if top_level and cls is keras.Sequential:
        rewrite, route = rewrite_sequential, "sequential-rewrite"
    elif top_level and cls is functional_class():
        rewrite, route = rewrite_functional, "functional-rewrite"
    if rewrite is None:
        why = (
            f"the target '{path}' is nested inside a sub-model"
            if cls in (keras.Sequential, functional_class())
            else f"{cls.__qualname__} is not a plain Functional or Sequential model"
        )
        logger.info("advgraph: graph rewrite not used (%s); wrapping the target's call", why)
        return model, "call-wrap", None, None, wrap_call(layer, hook)
    scope = (
        model.distribute_strategy.scope()
        if getattr(model, "_distribute_strategy", None) is not None
        else contextlib.nullcontext()
    )
    with scope:
        new, pert = rewrite(model, layer, hook)
        _compile_like(new, model)
    return new, route, model, pert, None


def _attach(host: keras.Model, state: _State) -> None:
    setattr_ = object.__setattr__  # not tracked by Keras / tf.Module
    setattr_(host, "_advgraph", state)
    setattr_(host, "train_step", types.MethodType(_adversarial_train_step, host))
    setattr_(host, "fit", _make_fit(host))
    if state.original is not None:
        # Saving / get_config describe the user's model: a saved wrapped model loads
        # without advgraph, as the plain model (wrap it again to keep training).
        setattr_(host, "get_config", state.original.get_config)
    setattr_(host, "advgraph_stats", state.stats)
    setattr_(host, "advgraph_route", state.route)
    setattr_(host, "advgraph_target", state.target_path)
    setattr_(host, "advgraph_config", state.config)
    host.train_function = None  # fit() builds the train function from the new train_step


def wrap(model: keras.Model, target: Any, config: AdversarialConfig) -> keras.Model:
    """Keras side of :func:`advgraph.wrap` (settings already validated).

    Args:
        model: a compiled ``keras.Model`` (Sequential, functional or subclassed).
        target: ``"embedding"``, a layer name / path, or the layer object.
        config: the validated settings.

    Returns:
        The model to train: the same object (mode='matrix', and the call-wrap route
        of mode='output'), or a new model sharing every layer and the optimizer
        (graph-rewrite routes). ``model.advgraph_route`` says which.

    Example:
        >>> import keras, numpy as np
        >>> import advgraph
        >>> model = keras.Sequential([keras.Input((4,), dtype="int32"), keras.layers.Embedding(10, 3),
        ...                           keras.layers.GlobalAveragePooling1D(), keras.layers.Dense(2)])
        >>> model.compile(optimizer="sgd", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        >>> model = advgraph.wrap(model, mode="matrix", epsilon=0.5)
        >>> history = model.fit(np.ones((4, 4), "int32"), np.zeros(4, "int32"), verbose=0)
        >>> model.advgraph_stats["steps"]
        1
        >>> model = advgraph.unwrap(model)
    """
    _check_model(model)
    path, layer = find_target(model, target)
    stats = Stats(model.distribute_strategy)
    original: keras.Model | None = None
    perturbation: Perturbation | None = None
    undo: Callable[[], None] | None = None
    hook = SiteHook()
    if config.mode == "matrix":
        _check_matrix_target(model, path, layer)
        _check_not_shared(path, layer)
        undo = wrap_call(layer, hook, before=True)  # random starts see the ids
        host, route = model, "matrix"
    else:
        host, route, original, perturbation, undo = _install_output(model, path, layer, hook)
    state = _State(
        config=config,
        stats=stats,
        route=route,
        target_path=path,
        target=layer,
        hook=hook,
        original=original,
        perturbation=perturbation,
        undo=undo,
    )
    _attach(host, state)
    logger.info(
        "advgraph: wrapped %s '%s': mode=%s method=%s epsilon=%s objective=%s route=%s target=%s",
        type(model).__name__,
        model.name,
        config.mode,
        config.method,
        config.epsilon,
        config.objective,
        route,
        path,
    )
    return host


def unwrap(model: keras.Model) -> keras.Model:
    """Keras side of :func:`advgraph.unwrap`: the original ``train_step`` again.

    Returns the user's original model object (the same object ``wrap`` was given).
    On the graph-rewrite routes the returned object is the original model, which
    shares every trained weight and the optimizer; the rewritten model is left as a
    plain model too (its perturbation layer inert).

    Raises:
        TypeError: ``model`` was not wrapped by advgraph.
    """
    state = _state(model)
    for name in _METHOD_ATTRS + _PUBLIC_ATTRS + ("_advgraph",):
        if name in model.__dict__:
            object.__delattr__(model, name)
    if state.undo is not None:
        state.undo()
    if state.perturbation is not None:
        state.perturbation._advgraph_hook = None
    model.train_function = None
    logger.info("advgraph: unwrapped '%s' (route=%s)", model.name, state.route)
    return state.original if state.original is not None else model
