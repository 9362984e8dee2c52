"""advgraph: embedding-level adversarial training for PyTorch and Keras models.

Example:
    >>> import numpy as np
    >>> import advgraph
    >>> advgraph.fgm_delta(np.array([3.0, 4.0]), epsilon=1.0)
    array([0.6, 0.8])
"""

from advgraph._config import AdversarialConfig
from advgraph._delta import DeltaResult, compute_delta, fgm_delta, project, random_init
from advgraph._errors import AdvGraphWarning
from advgraph._wrap import is_wrapped, unwrap, wrap

__version__ = "0.1.0"

__all__ = [
    "AdvGraphWarning",
    "AdversarialConfig",
    "DeltaResult",
    "__version__",
    "compute_delta",
    "fgm_delta",
    "is_wrapped",
    "project",
    "random_init",
    "unwrap",
    "wrap",
]
