"""Keras 3 adapter of advgraph (``advgraph.adapters.keras``): TensorFlow, JAX and torch.

Imported by :func:`advgraph.wrap` when it is given a ``keras.Model``; only the
framework of the active Keras backend is imported (``KERAS_BACKEND``):

    model.compile(optimizer="adam", loss=..., metrics=[...])
    model = advgraph.wrap(model, target="embedding", mode="matrix", epsilon=0.5)
    model.fit(x, y)                # every training step adversarial
    model = advgraph.unwrap(model)
"""

from advgraph._errors import require as _require

_require("keras", "keras", "advgraph's Keras adapter")

from ._private import check_keras_version as _check_keras_version  # noqa: E402

_check_keras_version()

from ._adapter import SUPPORTED_METHODS, is_wrapped, unwrap, wrap  # noqa: E402
from ._hook import Perturbation, StatsBase as Stats  # noqa: E402

__all__ = ["SUPPORTED_METHODS", "Perturbation", "Stats", "is_wrapped", "unwrap", "wrap"]
