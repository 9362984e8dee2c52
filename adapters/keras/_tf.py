"""The adversarial ``train_step`` on the TensorFlow backend.

Runs inside Keras' compiled train function (``tf.function``, XLA with
``jit_compile=True``, the ``steps_per_execution`` loop, ``MirroredStrategy``
replicas): every pass of the method on a GradientTape site (``_site``), the
parameter gradients summed, ONE ``optimizer.apply_gradients``.
"""

from __future__ import annotations

import warnings
from typing import Any

import keras
import tensorflow as tf


from . import _private
from ._hook import run_method, check_labels
from ._schedule import method_now
from ._site import MatrixSite, OutputSite, Stats, WeightSite

__all__ = ["adversarial_gradients", "make_stats", "train_step"]


def make_stats(model: keras.Model) -> Stats:
    """Counters in ``tf.Variable`` s created in the model's distribution strategy."""
    return Stats(model.distribute_strategy)


def _unscale_for_distribution(loss: tf.Tensor) -> tf.Tensor:
    # Keras divides the compiled loss by the number of replicas; the logged loss is not.
    replicas = tf.distribute.get_strategy().num_replicas_in_sync
    if replicas > 1:
        loss = loss * tf.cast(replicas, loss.dtype)
    return loss


def train_step(self: keras.Model, data: Any, state: Any) -> dict[str, Any]:
    """The wrapped model's ``train_step``: every pass of the method, one update.

    Mirrors Keras' TensorFlow ``train_step``: the loss tracker and the compiled
    metrics see the clean pass (its loss and predictions; FreeLB: its first pass;
    VAT on an unlabeled batch, ``fit(x)`` with no ``y``: the VAT loss, and the
    model's outputs are taken as logits); the loss is scaled with
    ``optimizer.scale_loss`` in every pass (mixed precision: the
    ``LossScaleOptimizer`` unscales the summed gradients and skips non-finite
    ones); ``optimizer.apply_gradients`` runs once with the summed gradients.
    """
    x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
    loss, site, predictions = _passes(self, x, y, sample_weight, state)
    first = next(t for t in keras.tree.flatten(x) if t is not None)
    _private.loss_tracker(self).update_state(
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


def adversarial_gradients(self: keras.Model, data: Any, state: Any) -> tuple[Any, list[Any], Any]:
    """``advgraph.keras.adversarial_gradients`` on TensorFlow: every pass of the
    method (a GradientTape per pass), nothing applied; ``(loss, grads, y_pred)``,
    ``grads`` in ``self.trainable_variables`` order (``None`` where a variable has
    no gradient)."""
    x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
    loss, site, predictions = _passes(self, x, y, sample_weight, state)
    grads = site.param_grads or [None] * len(site.variables)
    return loss, list(grads), predictions[0]


def _passes(self: keras.Model, x: Any, y: Any, sample_weight: Any, state: Any) -> tuple[Any, Any, list[Any]]:
    """Every pass of the method on a GradientTape site: ``(loss, site, predictions)``."""
    config = state.config
    check_labels(config.settings, y)
    site: Any
    if config.mode == "matrix":
        site = MatrixSite(
            self,
            state.stats,
            state.target,
            static_shapes=bool(self.jit_compile),
            whole_matrix=state.shared_matrix,
        )
    elif config.mode == "weights":
        site = WeightSite(self, state.stats, state.weights)
    else:
        site = OutputSite(self, state.stats)
    site.teacher = state.teacher
    predictions: list[Any] = []
    vat = config.settings.closure == "logits"
    pair = config.settings.closure != "loss"  # the closure returns (loss, logits)

    def closure() -> Any:
        # Metrics see the first (clean) pass only: the per-output loss trackers of
        # compile(), and any metric a forward or compute_loss updates, are put back
        # after the later passes (in-graph: the variables' values before the pass).
        later = bool(predictions)
        metric_vars = list(self.metrics_variables) if later else []
        saved = [tf.identity(v) for v in metric_vars]
        if _private.call_has_training_arg(self):
            y_pred = self(x, training=True)
        else:
            y_pred = self(x)
        if not site.teacher_pass:  # SMART's teacher forward: not the clean pass
            predictions.append(y_pred)
        if vat and y is None:  # unlabeled batch: VAT needs the logits only
            out = y_pred
        else:
            loss = _private.compute_loss(self, x, y, y_pred, sample_weight)
            out = (loss, y_pred) if pair else loss
        for var, value in zip(metric_vars, saved):
            var.assign(value)
        return out

    with state.hook.activate(site):
        loss = run_method(site, closure, method_now(self, state))
    return loss, site, predictions
