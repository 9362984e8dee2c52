"""``start`` and schedules in Keras ``fit()``, on every backend.

Schedules: the compiled step evaluates the method's schedules at the optimizer's
iteration count, read in-graph as a float32 scalar of the backend
(``method.at(step)``; TensorFlow: the ``iterations`` variable's value; JAX: its
value in the optimizer state the jitted step carries; torch: the tensor). Nothing
crosses to the host.

``start``: the step before the start is one plain forward/backward, so the choice
is made on the host, between two train functions Keras builds from the same
``train_step`` (``make_train_function`` is overridden on the wrapped model):
the adversarial one, and a plain one traced while ``state.plain_now`` is set, in
which :func:`method_now` gives the plain step (one pass, no perturbation). A
compiled plain function is exactly the plain step's cost, with no branch of the
adversarial passes in its graph, which an in-graph ``cond`` would not guarantee
(JAX's ``lax.cond`` compiles both branches and needs both to return the same
state; TensorFlow's ``tf.cond`` densifies the embedding's sparse gradients).
Before each call the host reads the iteration count (a sync, only until the
method has switched on: afterwards the adversarial function is called directly)
(the plain step counts itself in ``advgraph_stats["plain_steps"]``). With
``steps_per_execution=k`` the switch is made between executions, so the method
switches on at the first execution that starts at or after ``start`` (warned when
that is later than ``start``).
"""

from __future__ import annotations

import types
import warnings
from typing import Any

import keras
import numpy as np

from advgraph._errors import AdvGraphWarning
from advgraph.methods._plain import PLAIN

__all__ = ["install", "method_now", "step_value"]


def step_value(model: keras.Model, optimizer_values: list[Any] | None = None) -> Any:
    """The optimizer's iteration count as a float32 scalar of the backend, in-graph.

    ``optimizer_values``: JAX's stateless step, the optimizer state it carries.
    """
    optimizer = model.optimizer
    iterations = optimizer.iterations
    value: Any = None
    if optimizer_values is not None:
        value = next((v for var, v in zip(optimizer.variables, optimizer_values) if var is iterations), None)
    if value is None:
        value = iterations.value
    return keras.ops.cast(value, "float32")


def method_now(model: keras.Model, state: Any, optimizer_values: list[Any] | None = None) -> Any:
    """The method a step of ``model`` runs: the plain step while the plain train
    function is traced or run, else the method with its schedules evaluated at the
    optimizer's iteration count (the method itself when nothing is scheduled)."""
    method = state.config.settings
    if state.plain_now:
        return PLAIN.get(method.closure, PLAIN["loss"])
    if method.scheduled():
        return method.at(step_value(model, optimizer_values))
    return method


def install(model: keras.Model, state: Any) -> None:
    """Give ``model`` the host dispatch of :class:`StartDispatch` when ``start > 0``."""
    if state.config.settings.start > 0:
        object.__setattr__(model, "make_train_function", types.MethodType(_make_train_function, model))


def _make_train_function(self: keras.Model, force: bool = False) -> Any:
    if self.train_function is not None and not force:
        return self.train_function
    state = self.__dict__["_advgraph"]
    build = type(self).make_train_function.__get__(self)
    build(force=True)
    adversarial = self.train_function
    # The plain function gets a train_step of its own: jax.jit caches traces by
    # function, and the bound method is the same (or an equal) object both times.
    own = self.__dict__.get("train_step")
    bound = self.train_step

    def plain_train_step(*args: Any, **kwargs: Any) -> Any:
        return bound(*args, **kwargs)

    object.__setattr__(self, "train_step", plain_train_step)
    try:
        build(force=True)  # traced (JAX, TensorFlow) or run (torch) with state.plain_now set
    finally:
        if own is None:
            object.__delattr__(self, "train_step")
        else:
            object.__setattr__(self, "train_step", own)
    plain = self.train_function
    self.train_function = StartDispatch(self, state, adversarial, plain)
    return self.train_function


class StartDispatch:
    """The wrapped model's ``train_function`` while its method has a ``start``:
    the plain train function before it, the adversarial one from it on."""

    def __init__(self, model: keras.Model, state: Any, adversarial: Any, plain: Any) -> None:
        self.model = model
        self.state = state
        self.adversarial = adversarial
        self.plain = plain
        self.switched = False
        self.jax = keras.backend.backend() == "jax"

    def _iterations(self, jax_state: Any) -> int:
        if self.jax:
            optimizer = self.model.optimizer
            values = jax_state[2]
            for var, value in zip(optimizer.variables, values):
                if var is optimizer.iterations:
                    return int(np.asarray(value))
        return int(keras.ops.convert_to_numpy(self.model.optimizer.iterations))

    def __call__(self, *args: Any) -> Any:
        if self.switched:
            return self.adversarial(*args)
        start = self.state.config.settings.start
        before = self._iterations(args[0] if self.jax else None)
        if before >= start:
            self.switched = True
            return self.adversarial(*args)
        per_call = int(getattr(self.model, "steps_per_execution", 1) or 1)
        if before + per_call > start:
            warnings.warn(
                f"advgraph: with steps_per_execution={per_call} the method switches on "
                f"between executions: steps {before}..{before + per_call - 1} run as plain "
                f"steps although start={start}.",
                AdvGraphWarning,
                stacklevel=2,
            )
        self.state.plain_now = True
        try:
            out = self.plain(*args)
        finally:
            self.state.plain_now = False
        return out  # its plain steps counted themselves (plain_steps, in the step)
