"""PyTorch adapter of advgraph (``advgraph.adapters.torch``).

Imported by :func:`advgraph.wrap` when it is given a ``torch.nn.Module``.
"""

from advgraph._errors import require as _require

_require("torch", "torch", "advgraph's PyTorch adapter")

from ._module import AdversarialModule, is_wrapped, unwrap, wrap  # noqa: E402

__all__ = ["AdversarialModule", "is_wrapped", "unwrap", "wrap"]
