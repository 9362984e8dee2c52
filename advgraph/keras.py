"""Adversarial training inside a Keras ``train_step`` you own (every Keras backend).

:func:`advgraph.wrap` replaces a Keras model's ``train_step``. A model whose class
defines its own ``train_step`` (a keras-hub task with extra losses, a GAN-style
step, gradient clipping by hand) keeps it instead:

1. :func:`prepare` sets the method up on the model (the hook at the target, the
   step counters, SMART's teacher, ``start``) and leaves its ``train_step`` alone;
2. the ``train_step`` calls :func:`adversarial_gradients`, which runs every
   forward/backward pass of the method and returns the clean loss, the summed
   parameter gradients and the clean pass's predictions; the step applies them.

Each backend keeps its ``train_step`` contract: TensorFlow and torch return
gradients of ``self.trainable_variables`` for ``optimizer.apply_gradients`` /
``optimizer.apply``; JAX is functional: it takes the step's ``state`` and returns
it with the non-trainable and metric values the passes produced (the
trainable and optimizer values untouched), for ``optimizer.stateless_apply``.
The weights are exactly as before when it returns (no perturbation is left in
them), and ``model.advgraph_stats``, schedules and ``start`` work as with
``fit()`` on a wrapped model. :func:`advgraph.unwrap` undoes :func:`prepare`.

On PyTorch no setup is needed: a trainer that owns its loop (TRL-style trainers,
Accelerate, Lightning's manual optimisation) calls
``wrapped.adversarial_step(closure, backward=accelerator.backward)`` in place of
its ``loss.backward()`` and then its own ``optimizer.step()``.

Importing this module imports Keras (``import advgraph`` does not).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import keras

from advgraph._config import make_config
from advgraph._errors import received

__all__ = ["AdversarialGradients", "adversarial_gradients", "prepare"]


class AdversarialGradients(NamedTuple):
    """What :func:`adversarial_gradients` returns.

    Attributes:
        loss: the clean loss (the value ``fit()`` logs as ``loss``).
        grads: the parameter gradients of every pass, summed, one per
            ``model.trainable_variables`` entry (TensorFlow / torch: ``None`` where
            a variable has no gradient; JAX: zeros).
        y_pred: the clean pass's predictions (for ``compute_metrics``).
        state: JAX: the train step's ``(trainable, non_trainable, optimizer,
            metrics)`` values after the passes, trainable and optimizer values
            unchanged; ``None`` on TensorFlow and torch.
    """

    loss: Any
    grads: list[Any]
    y_pred: Any
    state: Any = None


def prepare(
    model: keras.Model, target: Any = "embedding", mode: str = "output", *, method: Any = "fgm", **knobs: Any
) -> keras.Model:
    """Set a method up on a compiled Keras model whose own ``train_step`` runs it.

    Takes what :func:`advgraph.wrap` takes; unlike it, the model's ``train_step``
    is kept: it must call :func:`adversarial_gradients` (a ``fit()`` whose steps
    never do raises ``RuntimeError``). The same model object is returned.

    Example (TensorFlow backend; see :func:`adversarial_gradients` for JAX):
        >>> import keras, numpy as np
        >>> import advgraph.keras
        >>> class Net(keras.Model):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.emb, self.pool = keras.layers.Embedding(10, 4), keras.layers.GlobalAveragePooling1D()
        ...         self.out = keras.layers.Dense(2)
        ...     def call(self, x):
        ...         return self.out(self.pool(self.emb(x)))
        ...     def train_step(self, data):
        ...         result = advgraph.keras.adversarial_gradients(self, data)
        ...         self.optimizer.apply_gradients(zip(result.grads, self.trainable_variables))
        ...         return {"loss": result.loss}
        >>> model = Net()
        >>> model.compile(optimizer="sgd", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        >>> _ = model(np.ones((1, 3), "int32"))
        >>> model = advgraph.keras.prepare(model, method="fgm", epsilon=0.5)
        >>> _ = model.fit(np.ones((4, 3), "int32"), np.zeros(4, "int32"), verbose=0)
        >>> model.advgraph_stats["steps"]
        1
        >>> model = advgraph.unwrap(model)
    """
    from advgraph.adapters import keras as adapter

    if not isinstance(model, keras.Model):
        raise TypeError(f"prepare() takes a keras.Model. {received(model=type(model).__name__)}")
    config = make_config(mode=mode, method=method, **knobs)
    return adapter._adapter.wrap(model, target, config, own_step=True)


def adversarial_gradients(model: keras.Model, data: Any, state: Any = None) -> AdversarialGradients:
    """Run every pass of the model's method on ``data``; return loss and gradients.

    Call it from the ``train_step`` of a model set up with :func:`prepare`, in place
    of the step's forward and ``GradientTape`` / ``jax.grad`` / ``backward``. The loss
    of each pass is the model's ``compute_loss`` (override it for a custom loss).
    Nothing is applied: the step applies ``grads`` with its optimizer (and may clip
    or otherwise process them first). The model's weights are exactly as before.

    Args:
        model: the model (``self`` in ``train_step``), prepared by :func:`prepare`.
        data: the ``data`` Keras gives ``train_step``: ``x``, ``(x, y)`` or
            ``(x, y, sample_weight)``.
        state: JAX only (and required there): the ``state`` Keras gives
            ``train_step(self, state, data)``.

    Returns:
        An :class:`AdversarialGradients` ``(loss, grads, y_pred, state)``.

    Example (JAX backend: functional, the state goes in and comes back):
        >>> def train_step(self, state, data):  # doctest: +SKIP
        ...     trainable, _, optimizer_values, _ = state
        ...     result = advgraph.keras.adversarial_gradients(self, data, state)
        ...     _, non_trainable, _, metrics = result.state
        ...     trainable, optimizer_values = self.optimizer.stateless_apply(
        ...         optimizer_values, result.grads, trainable)
        ...     return {"loss": result.loss}, (trainable, non_trainable, optimizer_values, metrics)
    """
    from advgraph.adapters import keras as adapter

    adv = adapter._adapter._state(model)
    backend = adv.backend
    if not adv.own_step:
        raise ValueError(
            "adversarial_gradients() is for a model whose own train_step runs the method: "
            "set it up with advgraph.keras.prepare(), not advgraph.wrap() (whose model "
            f"already trains adversarially in fit()). {received(model=model.name, prepared=False)}"
        )
    module = adapter._adapter._backend_module(backend)
    if backend == "jax":
        if not isinstance(state, (tuple, list)) or len(state) != 4:
            raise TypeError(
                "On the JAX backend adversarial_gradients() needs the train step's state: "
                "(trainable, non_trainable, optimizer, metrics) values, as Keras passes it "
                f"to train_step(self, state, data). {received(state=type(state).__name__)}"
            )
        return AdversarialGradients(*module.adversarial_gradients(model, tuple(state), data, adv))
    if state is not None:
        raise TypeError(
            f"adversarial_gradients() takes a state on the JAX backend only. "
            f"{received(backend=backend, state=type(state).__name__)}"
        )
    run = module.adversarial_gradients
    if backend == "torch":  # autograd.grad at the site is not reliable under torch.compile
        import torch

        run = torch.compiler.disable(run)
    return AdversarialGradients(*run(model, data, adv))
