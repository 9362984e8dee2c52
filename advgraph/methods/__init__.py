"""The adversarial training methods, one module each, and the base a user's own subclasses.

Each method is a frozen dataclass of its settings (checked when built), its pass
count and its step, written once against :class:`advgraph.Site`; every adapter
runs it unchanged. ``advgraph.wrap(model, method=advgraph.methods.PGD(steps=2))``
is the object form; ``method="pgd", steps=2`` its shorthand.

Example:
    >>> import advgraph
    >>> advgraph.methods.PGD(epsilon=0.5, steps=2)
    PGD(start=0, epsilon=0.5, norm='l2', per_sample=None, objective='clean+adv', steps=2, alpha=0.625, random_init=False)
    >>> advgraph.methods.from_config({"method": "fgm", "epsilon": 0.5})
    FGM(start=0, epsilon=0.5, norm='l2', per_sample=None, objective='clean+adv')
"""

from ._awp import AWP
from ._base import Method
from ._fgm import FGM, FGSM, GradientMethod
from ._freelb import FreeLB
from ._gp import GP
from ._names import BUILTIN, from_config, from_name
from ._neftune import NEFTune
from ._pgd import PGD
from ._r3f import R3F
from ._site import Site
from ._smart import SMART
from ._vat import VAT

__all__ = [
    "AWP",
    "BUILTIN",
    "FGM",
    "FGSM",
    "FreeLB",
    "GP",
    "GradientMethod",
    "Method",
    "NEFTune",
    "PGD",
    "R3F",
    "SMART",
    "Site",
    "VAT",
    "from_config",
    "from_name",
]
