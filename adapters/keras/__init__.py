"""Keras 3 adapter of advgraph (``advgraph.adapters.keras``; TensorFlow backend).

Imported by :func:`advgraph.wrap` when it is given a ``keras.Model``:

    model.compile(optimizer="adam", loss=..., metrics=[...])
    model = advgraph.wrap(model, target="embedding", mode="matrix", epsilon=0.5)
    model.fit(x, y)                # every training step adversarial
    model = advgraph.unwrap(model)
"""

from advgraph._errors import require as _require

_require("tensorflow", "tensorflow", "advgraph's Keras adapter")
_require("keras", "tensorflow", "advgraph's Keras adapter")

from ._adapter import is_wrapped, unwrap, wrap  # noqa: E402
from ._site import Perturbation, Stats  # noqa: E402

__all__ = ["Perturbation", "Stats", "is_wrapped", "unwrap", "wrap"]
