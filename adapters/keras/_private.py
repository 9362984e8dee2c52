"""Every private Keras name the adapter uses, in one place, behind a version check.

Keras 3 has no public API for these: the class ``keras.Model(inputs, outputs)``
instantiates (to recognise a plain functional model), running a functional graph
with another call function (the graph rewrite), the compiled loss tracker that
``train_step`` feeds, the loss computation that handles ``compute_loss`` without a
``training`` argument, whether ``call`` takes ``training``, and the list of metrics
tracked on the model (the JAX step counters live there). Each accessor checks that
the name exists and raises a clear error on a Keras it does not know.
"""

from __future__ import annotations

from typing import Any

import keras

from advgraph._errors import received

__all__ = [
    "KNOWN_KERAS",
    "check_keras_version",
    "functional_class",
    "run_through_graph",
    "loss_tracker",
    "compute_loss",
    "call_has_training_arg",
    "tracked_metrics",
]

KNOWN_KERAS = ((3, 0), (3, 15))  # oldest and newest minor versions tested


def _version() -> tuple[int, ...]:
    parts = []
    for part in keras.version().split(".")[:2]:
        digits = "".join(ch for ch in part if ch.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts)


def check_keras_version() -> None:
    """Raise ImportError on a Keras major version advgraph's Keras adapter does not know."""
    version = _version()
    if version[0] != 3:
        raise ImportError(
            "advgraph's Keras adapter supports Keras 3 (tested 3.0 to 3.15). "
            f"{received(keras_version=keras.version())}"
        )


def _missing(what: str) -> RuntimeError:
    return RuntimeError(
        f"advgraph's Keras adapter relies on {what}, which this Keras version does not "
        "have (advgraph knows Keras "
        f"{KNOWN_KERAS[0][0]}.{KNOWN_KERAS[0][1]} to {KNOWN_KERAS[1][0]}.{KNOWN_KERAS[1][1]}); "
        "please report it with the Keras version. "
        f"{received(keras_version=keras.version())}"
    )


_FUNCTIONAL: list[type] = []


def functional_class() -> type:
    """The class ``keras.Model(inputs, outputs)`` instantiates (Keras' ``Functional``)."""
    if not _FUNCTIONAL:
        try:
            from keras.src.models.functional import Functional
        except ImportError as exc:  # pragma: no cover - depends on the Keras version
            raise _missing("keras.src.models.functional.Functional") from exc
        _FUNCTIONAL.append(Functional)
    return _FUNCTIONAL[0]


def run_through_graph(model: keras.Model, inputs: Any, call_fn: Any) -> Any:
    """Run a functional model's graph on ``inputs``, calling each layer via ``call_fn``."""
    run = getattr(model, "_run_through_graph", None)
    if run is None:  # pragma: no cover - depends on the Keras version
        raise _missing("Functional._run_through_graph")
    return run(inputs, operation_fn=lambda layer: layer, call_fn=call_fn)


def loss_tracker(model: keras.Model) -> Any:
    """The ``Mean`` metric of the compiled loss (``model.metrics[0]``)."""
    tracker = getattr(model, "_loss_tracker", None)
    if tracker is None:  # pragma: no cover - depends on the Keras version
        raise _missing("Trainer._loss_tracker")
    return tracker


def compute_loss(model: keras.Model, x: Any, y: Any, y_pred: Any, sample_weight: Any) -> Any:
    """``model.compute_loss`` in training mode (Keras' wrapper handles overrides without it)."""
    compute = getattr(model, "_compute_loss", None)
    if compute is not None:
        return compute(x=x, y=y, y_pred=y_pred, sample_weight=sample_weight, training=True)
    return model.compute_loss(x=x, y=y, y_pred=y_pred, sample_weight=sample_weight)


def call_has_training_arg(model: keras.Model) -> bool:
    """Whether ``model.call`` takes ``training``."""
    return bool(getattr(model, "_call_has_training_arg", True))


def tracked_metrics(model: keras.Model) -> list[Any]:
    """The model's own list of tracked metrics (part of ``model.metrics``)."""
    metrics = getattr(model, "_metrics", None)
    if not isinstance(metrics, list):  # pragma: no cover - depends on the Keras version
        raise _missing("Layer._metrics")
    return metrics
