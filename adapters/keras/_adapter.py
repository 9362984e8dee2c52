"""``wrap`` / ``unwrap`` for Keras 3 models, on every backend (TensorFlow, JAX, torch).

A wrapped model trains adversarially in ``fit()`` (and ``train_on_batch()``): its
``train_step`` runs every forward/backward pass of the method through
:func:`Method.step` on a site of the model's backend, sums the
parameter gradients of the passes, and makes ONE optimizer update. All of it runs
inside the backend's compiled train function where Keras compiles one
(TensorFlow: ``tf.function``, XLA, ``steps_per_execution``, ``MirroredStrategy``
replicas; JAX: ``jax.jit``, functional, see ``_jax``; torch: eager, see
``_torch``): no host round-trip per step. ``evaluate()`` and ``predict()`` are
unchanged.

The override is per instance: ``train_step`` (and a thin ``fit`` that warns
after training when steps were skipped) are attributes of the model object, not
of its class, so the class, ``isinstance``, ``get_config`` and saving stay those
of the original model. ``unwrap`` deletes them. Routes (``model.advgraph_route``):

- ``"matrix"``: mode='matrix', the same model object; the embedding layer's
  ``call`` is wrapped on both sides: the ids (row layout, random starts) and the
  lookup's output (the lookup gradient; delta of each row when nothing else reads
  the matrix). A ``reverse=True`` call (a tied head) passes through.
- ``"functional-rewrite"`` / ``"sequential-rewrite"``: mode='output' on a plain
  functional / Sequential model: a new model of the same layers with a
  :class:`Perturbation` layer after the embedding (see ``_routes``), compiled like
  the original and sharing its optimizer. Its ``get_config`` (so ``save``) is the
  original's: a saved wrapped model loads, without advgraph, as the plain model.
- ``"call-wrap"``: mode='output' on any other model (subclassed, nested target):
  the same model object; the embedding layer's ``call`` gets an output-side hook.
- ``"weights"``: method='awp': the same model object, no hook; the site is the set of
  variables ``target`` names (``_target.awp_variables``).

Stateful layers run once per pass: BatchNormalization's moving statistics are
updated in every forward of the step (twice per FGM step), as in the PyTorch loop.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import logging
import types
import warnings
from dataclasses import dataclass
from typing import Any, Callable

import keras

from advgraph._config import AdversarialConfig
from advgraph._errors import AdvGraphWarning, received

from . import _private, _schedule
from ._hook import Perturbation, SiteHook, StatsBase, Teacher
from ._routes import (
    CalledMoreThanOnce,
    is_call_wrapped,
    rewrite_functional,
    rewrite_sequential,
    wrap_call,
)
from ._target import awp_variables, find_target, iter_layers

logger = logging.getLogger("advgraph")

__all__ = ["SUPPORTED_METHODS", "wrap", "unwrap", "is_wrapped"]

# The built-in methods, each of which runs on every backend (so does a user's advgraph.Method).
SUPPORTED_METHODS = ("fgm", "fgsm", "pgd", "freelb", "vat", "gp", "r3f", "smart", "neftune", "awp")

# Instance attributes wrap() sets on the model it returns; unwrap() deletes them.
_PUBLIC_ATTRS = ("advgraph_stats", "advgraph_route", "advgraph_target", "advgraph_config", "advgraph_method")
_METHOD_ATTRS = ("train_step", "fit", "get_config", "make_train_function")


# Keras backend -> its module: one per backend, each holding its sites and its step
# behind the same declared interface (BACKEND_INTERFACE), like Keras' own
# ``backend/<name>/trainer.py``. Only the backend in use is imported.
_BACKENDS = {"tensorflow": "_tf", "jax": "_jax", "torch": "_torch"}
# What every backend module provides:
#   make_stats(model) -> Stats                the counters (``advgraph_stats``)
#   train_step(...)                           the adversarial train_step, in the
#                                             backend's own train_step contract
#                                             (JAX: functional, state in and out)
#   adversarial_gradients(...)                every pass, nothing applied
#                                             (``advgraph.keras.adversarial_gradients``)
#   Stats, WeightSite and its embedding site(s): the advgraph.Site implementations
BACKEND_INTERFACE = ("make_stats", "train_step", "adversarial_gradients", "Stats", "WeightSite")


def _backend_module(backend: str) -> Any:
    """The step module of ``backend`` (imports only that backend's framework)."""
    return importlib.import_module(f"{__package__}.{_BACKENDS[backend]}")


@dataclass
class _State:
    config: AdversarialConfig
    stats: StatsBase
    route: str
    target_path: str
    target: keras.layers.Layer
    hook: SiteHook
    original: keras.Model | None = None  # rewrite routes: the user's model
    perturbation: Perturbation | None = None  # rewrite routes: the inserted layer
    undo: Callable[[], None] | None = None  # call-wrap route and mode='matrix'
    backend: str = "tensorflow"
    step: Callable[..., Any] | None = None  # the function bound as train_step
    shared_matrix: bool = True  # mode='matrix': other layers may read the matrix (tied head)
    teacher: Teacher | None = None  # method='smart' with smart_mu > 0
    weights: list[Any] | None = None  # method='awp': the perturbed variables
    own_step: bool = False  # advgraph.keras.prepare(): the model's own train_step calls advgraph
    plain_now: bool = False  # the plain train function (before `start`) is traced / running


def is_wrapped(model: Any) -> bool:
    """Whether ``model`` was returned by ``advgraph.wrap`` and not unwrapped since.

    Example:
        >>> import keras
        >>> from advgraph.adapters.keras import is_wrapped
        >>> is_wrapped(keras.Sequential([keras.layers.Dense(1)]))
        False
    """
    try:
        return "_advgraph" in vars(model)
    except TypeError:  # no __dict__
        return False


def _state(model: Any) -> _State:
    state = getattr(model, "__dict__", {}).get("_advgraph")
    if state is None:
        raise TypeError(
            "Expected a Keras model returned by advgraph.wrap() (and not unwrapped since). "
            f"{received(model=getattr(model, 'name', type(model).__name__))}"
        )
    return state


# -- checks ------------------------------------------------------------------------


def _check_model(model: keras.Model, own_step: bool = False) -> str:
    backend = keras.backend.backend()
    if backend not in _BACKENDS:
        raise ValueError(
            "advgraph's Keras adapter supports the TensorFlow, JAX and PyTorch backends "
            f"(KERAS_BACKEND='tensorflow', 'jax' or 'torch'). {received(backend=backend)}"
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
    if not own_step and type(model).train_step is not keras.Model.train_step:
        raise ValueError(
            "advgraph.wrap() replaces the model's train_step, but this model class defines "
            "its own train_step, which would be silently bypassed. Use the standard "
            "train_step (override compute_loss instead), or keep yours: set the model up "
            "with advgraph.keras.prepare(model, ...) and call "
            "advgraph.keras.adversarial_gradients(self, data) in your train_step. "
            f"{received(model_class=type(model).__qualname__)}"
        )
    nnx = getattr(keras.config, "is_nnx_enabled", lambda: False)
    if backend == "jax" and nnx():
        # Keras' NNX train function calls type(model).train_step: a per-instance step
        # would be bypassed and fit() would train without adversarial steps.
        raise ValueError(
            "advgraph's Keras adapter does not support Flax NNX mode (KERAS_NNX_ENABLED); "
            f"turn it off to train adversarially. {received(nnx_enabled=True)}"
        )
    if backend == "torch" and model.steps_per_execution > 1:  # Keras refuses it too
        raise ValueError(
            "`steps_per_execution` must be 1 with the PyTorch backend. "
            f"{received(steps_per_execution=model.steps_per_execution)}"
        )
    return backend


def _check_matrix_target(model: keras.Model, path: str, layer: keras.layers.Layer) -> bool:
    """Check a mode='matrix' target; return whether other layers may read its matrix."""
    embeddings = getattr(layer, "embeddings", None)
    if embeddings is None and not isinstance(layer, keras.layers.Embedding):
        raise ValueError(
            "mode='matrix' perturbs the rows of an Embedding layer's `embeddings` matrix; "
            "the target has none (use mode='output' to perturb any layer's output). "
            f"{received(target=f'{path} ({type(layer).__name__})')}"
        )
    if embeddings is None:
        return True  # not built yet: the variable is looked up when the step is traced
    dtype = keras.backend.standardize_dtype(embeddings.dtype)
    if not dtype.startswith(("float", "bfloat")):
        raise ValueError(
            "mode='matrix' needs a floating-point embedding matrix. "
            f"{received(target=path, dtype=dtype)}"
        )
    def contains(outer: Any) -> bool:  # e.g. TokenAndPositionEmbedding holds the target
        return any(inner is layer for _, inner in iter_layers(outer))

    shared = [
        p
        for p, other in iter_layers(model)
        if other is not layer
        and not isinstance(other, keras.Model)
        and any(w is embeddings for w in other.weights)
        and not contains(other)
    ]
    tied = bool(getattr(layer, "tie_weights", False))  # ReversibleEmbedding: a head may read it
    if shared:
        warnings.warn(
            f"advgraph: the embedding matrix of '{path}' is also a weight of "
            f"{', '.join(repr(s) for s in shared)}; in mode='matrix' the perturbed rows "
            "reach those layers too (e.g. a tied output layer). delta comes from the "
            "lookup's gradient only. mode='output' perturbs only the embedding's output.",
            AdvGraphWarning,
            stacklevel=4,
        )
    return bool(shared) or tied


def _check_not_shared(path: str, layer: keras.layers.Layer) -> None:
    if is_call_wrapped(layer):
        raise ValueError(
            "The target layer already carries an advgraph hook (a model sharing it is "
            f"wrapped); unwrap that model first. {received(target=path)}"
        )


# -- the adversarial train_step ------------------------------------------------------


def _step_method(backend: str) -> Callable[..., Any]:
    """The ``train_step`` the wrapped model gets: the backend's, with Keras' signature."""
    module = _backend_module(backend)
    if backend == "jax":

        def train_step(self: keras.Model, state: Any, data: Any) -> Any:
            return module.train_step(self, state, data, _state(self))

    else:

        def train_step(self: keras.Model, data: Any) -> Any:
            return module.train_step(self, data, _state(self))

        if backend == "torch":
            import torch

            # Keras compiles the torch step with torch.compile when jit_compile=True;
            # autograd.grad at an intermediate output (the site) is not reliable under
            # it (zero gradients), so the adversarial step itself runs eagerly.
            train_step = torch.compiler.disable(train_step)

    train_step.__doc__ = module.train_step.__doc__
    return train_step


def _make_fit(model: keras.Model) -> Callable[..., Any]:
    original_fit = type(model).fit.__get__(model)

    @functools.wraps(type(model).fit)
    def fit(*args: Any, **kwargs: Any) -> Any:
        state = model.__dict__.get("_advgraph")
        if state is None:
            return original_fit(*args, **kwargs)
        if not state.own_step:
            _check_step_installed(model, state)
        before = state.stats.as_dict()
        updates = _updates(model)
        history = original_fit(*args, **kwargs)
        after = state.stats.as_dict()
        ran = [after[k] - before[k] for k in ("steps", "plain_steps")]
        if _updates(model) > updates and not any(ran):
            why = (
                "its train_step never called advgraph.keras.adversarial_gradients(self, data)"
                if state.own_step
                else "its train function does not run advgraph's train_step (was train_step, "
                "train_function or make_train_function replaced after advgraph.wrap()?). "
                "Call advgraph.unwrap() and wrap() again"
            )
            raise RuntimeError(
                f"fit() updated the wrapped model without any adversarial step: {why}. "
                f"{received(optimizer_updates=_updates(model) - updates, adversarial_steps=0)}"
            )
        _warn_skipped(before, after)
        return history

    return fit


def _updates(model: keras.Model) -> int:
    try:
        return int(keras.ops.convert_to_numpy(model.optimizer.iterations))
    except Exception:  # pragma: no cover - an optimizer without iterations
        return 0


def _check_step_installed(model: keras.Model, state: _State) -> None:
    """Raise if fit() would not reach advgraph's train_step (no silent plain steps)."""
    step = model.__dict__.get("train_step")
    if getattr(step, "__func__", None) is not state.step:
        raise RuntimeError(
            "The wrapped model's train_step is no longer advgraph's (it was replaced after "
            "advgraph.wrap()), so fit() would train without adversarial steps. Call "
            "advgraph.unwrap() and wrap() again. "
            f"{received(train_step=getattr(step, '__qualname__', type(step).__name__))}"
        )


def _warn_skipped(before: dict[str, int], after: dict[str, int]) -> None:
    steps = after["steps"] - before["steps"]
    for key, what in (("skipped_nonfinite", "held NaN or inf"), ("skipped_zero", "was zero")):
        count = after[key] - before[key]
        if count > 0:
            warnings.warn(
                f"advgraph: in this fit() ({steps} adversarial steps) the gradient at the "
                f"embedding {what} {count} time(s); delta was 0 there (for the affected "
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
    elif top_level and cls is _private.functional_class():
        rewrite, route = rewrite_functional, "functional-rewrite"
    if rewrite is None:
        why = (
            f"the target '{path}' is nested inside a sub-model"
            if cls in (keras.Sequential, _private.functional_class())
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
        try:
            new, pert = rewrite(model, layer, hook)
        except CalledMoreThanOnce as error:  # a shared embedding: one delta per call
            logger.info("advgraph: graph rewrite not used (%s); wrapping the target's call", error)
            return model, "call-wrap", None, None, wrap_call(layer, hook)
        _compile_like(new, model)
    return new, route, model, pert, None


def _make_teacher(host: keras.Model, config: AdversarialConfig, backend: str) -> Teacher | None:
    """SMART's teacher (``smart_mu > 0``): one value per trainable variable, made now
    (TensorFlow cannot create variables inside the compiled step)."""
    if not config.settings.uses_teacher:
        return None
    sources = list(host.trainable_variables)
    if not sources:
        raise ValueError(
            "method='smart' keeps a momentum teacher of the trainable weights, so the model "
            "must be built before advgraph.wrap() (call it once on a batch, or give it an "
            f"Input). {received(model=host.name, trainable_weights=0)}"
        )
    scope = (
        host.distribute_strategy.scope()
        if backend == "tensorflow" and getattr(host, "_distribute_strategy", None) is not None
        else contextlib.nullcontext()
    )
    with scope:
        teacher = Teacher(sources, keras.backend.standardize_dtype(host.optimizer.iterations.dtype))
    if backend == "jax":  # carried through the jitted step in the metrics' state
        _private.tracked_metrics(host).append(teacher)
    return teacher


def _attach(host: keras.Model, state: _State) -> None:
    setattr_ = object.__setattr__  # not tracked by Keras / tf.Module
    setattr_(host, "_advgraph", state)
    if not state.own_step:  # advgraph.keras.prepare(): the model's train_step stays
        state.step = _step_method(state.backend)
        setattr_(host, "train_step", types.MethodType(state.step, host))
    _schedule.install(host, state)
    attach = getattr(_backend_module(state.backend), "attach", None)
    if attach is not None:
        attach(host, state.stats)
    setattr_(host, "fit", _make_fit(host))
    if state.original is not None:
        # Saving / get_config describe the user's model: a saved wrapped model loads
        # without advgraph, as the plain model (wrap it again to keep training).
        setattr_(host, "get_config", state.original.get_config)
    setattr_(host, "advgraph_stats", state.stats)
    setattr_(host, "advgraph_route", state.route)
    setattr_(host, "advgraph_target", state.target_path)
    setattr_(host, "advgraph_config", state.config)
    setattr_(host, "advgraph_method", state.config.settings)
    host.train_function = None  # fit() builds the train function from the new train_step


def wrap(model: keras.Model, target: Any, config: AdversarialConfig, own_step: bool = False) -> keras.Model:
    """Keras side of :func:`advgraph.wrap` (settings already validated).

    Args:
        model: a compiled ``keras.Model`` (Sequential, functional or subclassed).
        target: ``"embedding"``, a layer name / path, or the layer object.
        config: the validated settings.
        own_step: keep the model's own ``train_step`` (``advgraph.keras.prepare``):
            it calls ``advgraph.keras.adversarial_gradients``; the model object is
            kept (mode='output' takes the call-wrap route).

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
    backend = _check_model(model, own_step)
    module = _backend_module(backend)
    if config.mode == "weights":
        return _wrap_weights(model, target, config, backend, own_step)
    path, layer = find_target(model, target)
    original: keras.Model | None = None
    perturbation: Perturbation | None = None
    undo: Callable[[], None] | None = None
    shared_matrix = True
    hook = SiteHook(config.mode, path)
    if config.mode == "matrix":
        shared_matrix = _check_matrix_target(model, path, layer)
        if shared_matrix and backend == "torch" and config.settings.edits_between_forwards:
            # The noisy forward edits the matrix in place while the clean forward's graph
            # (a tied head's matmul) still holds it for the one backward through both.
            raise ValueError(
                f"method={config.method!r} in mode='matrix' on the torch backend needs an "
                "embedding matrix no other layer reads (a tied output head would be "
                f"differentiated at the perturbed values); use mode='output'. "
                f"{received(method=config.method, target=path, matrix_shared=True)}"
            )
        _check_not_shared(path, layer)
        undo = wrap_call(layer, hook, before=True)  # the ids, then the lookup's output
        host, route = model, "matrix"
    elif own_step:  # the user's class and train_step: never a rewritten model
        _check_not_shared(path, layer)
        host, route, undo = model, "call-wrap", wrap_call(layer, hook)
    else:
        host, route, original, perturbation, undo = _install_output(model, path, layer, hook)
    stats = module.make_stats(host)
    teacher = _make_teacher(host, config, backend)
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
        backend=backend,
        shared_matrix=shared_matrix,
        teacher=teacher,
        own_step=own_step,
    )
    _attach(host, state)
    logger.info(
        "advgraph: wrapped %s '%s': mode=%s method=%r route=%s target=%s",
        type(model).__name__,
        model.name,
        config.mode,
        config.settings,
        route,
        path,
    )
    return host


def _wrap_weights(
    model: keras.Model, target: Any, config: AdversarialConfig, backend: str, own_step: bool = False
) -> keras.Model:
    """method='awp': the site is a set of variables (no hook; the same model object)."""
    path, weights = awp_variables(model, target)
    state = _State(
        config=config,
        stats=_backend_module(backend).make_stats(model),
        route="weights",
        target_path=path,
        target=model,
        hook=SiteHook(config.mode, path),
        backend=backend,
        weights=weights,
        own_step=own_step,
    )
    _attach(model, state)
    logger.info("advgraph: wrapped %s: method=awp, %d weights under %r", type(model).__name__, len(weights), path)
    return model


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
    detach = getattr(_backend_module(state.backend), "detach", None)
    if detach is not None:
        detach(model, state.stats)
    metrics = _private.tracked_metrics(model)
    for i, metric in enumerate(metrics):
        if metric is state.teacher:
            del metrics[i]
            break
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
