"""advgraph: embedding-level adversarial training for PyTorch and Keras models.

Example:
    >>> import numpy as np
    >>> import advgraph
    >>> advgraph.fgm_delta(np.array([3.0, 4.0]), epsilon=1.0)
    array([0.6, 0.8])
"""

from advgraph import methods
from advgraph._config import AdversarialConfig
from advgraph._delta import DeltaResult, compute_delta, fgm_delta, project, random_init
from advgraph._errors import AdvGraphWarning
from advgraph._schedules import constant_schedule, linear_schedule
from advgraph._wrap import is_wrapped, unwrap, wrap
from advgraph.methods import Method, Site

__version__ = "0.1.0"

__all__ = [
    "AdvGraphWarning",
    "AdversarialConfig",
    "DeltaResult",
    "Method",
    "Site",
    "__version__",
    "compute_delta",
    "constant_schedule",
    "fgm_delta",
    "is_wrapped",
    "linear_schedule",
    "methods",
    "project",
    "random_init",
    "unwrap",
    "wrap",
]
