"""The string shorthand: ``method="pgd", steps=3`` builds ``PGD(steps=3)``.

``wrap()``'s keywords keep the names they have always had; a few are longer than
the class's own field (``smart_mu`` is ``SMART.mu``). This module is the only
place that knows those names.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from advgraph._errors import check_choice, received

from ._awp import AWP
from ._base import Method
from ._fgm import FGM, FGSM
from ._freelb import FreeLB
from ._gp import GP
from ._neftune import NEFTune
from ._pgd import PGD
from ._r3f import R3F
from ._smart import SMART
from ._vat import VAT

__all__ = ["BUILTIN", "from_name", "from_config", "resolve"]

BUILTIN: dict[str, type[Method]] = {
    cls.name: cls for cls in (FGM, FGSM, PGD, FreeLB, VAT, GP, R3F, SMART, NEFTune, AWP)
}
# wrap()'s keyword -> the class's field, where they differ.
_ALIASES: dict[str, dict[str, str]] = {
    "vat": {"vat_weight": "weight"},
    "r3f": {"r3f_lambda": "weight"},
    "smart": {"smart_lambda": "weight", "smart_mu": "mu", "smart_beta": "beta"},
    "neftune": {"neftune_alpha": "alpha"},
}
# Why a method's objective is fixed (it has no `objective` setting).
_WHY_OBJECTIVE = {
    "gp": "adds its penalty to the clean loss",
    "r3f": "adds its regulariser to the clean loss",
    "smart": "adds its regularisers to the clean loss",
    "neftune": "has no clean pass: its one forward is the noisy one",
}


def keywords(name: str) -> tuple[str, ...]:
    """The keywords ``wrap(method=name, ...)`` takes for the built-in ``name``."""
    cls = BUILTIN[name]
    back = {field: key for key, field in _ALIASES.get(name, {}).items()}
    fields = [back.get(f.name, f.name) for f in dataclasses.fields(cls)]
    if name in _WHY_OBJECTIVE:
        fields.append("objective")
    return tuple(fields)


def from_name(name: Any, **knobs: Any) -> Method:
    """Build the built-in method ``name`` from ``wrap()``'s keywords.

    A keyword the method does not read raises ``ValueError`` naming the method's
    own keywords and the methods that read it.

    Example:
        >>> from_name("smart", smart_mu=0.0)
        SMART(start=0, noise_eps=1e-05, steps=1, alpha=1e-05, norm='linf', weight=1.0, mu=0.0, beta=0.99)
    """
    name = check_choice("method", name, tuple(BUILTIN))
    own = keywords(name)
    for key, value in knobs.items():
        if key not in own:
            users = [m for m in BUILTIN if key in keywords(m)]
            readers = f"; it is read by {', '.join(users)}" if users else ""
            raise ValueError(
                f"`{key}` does not apply to method={name!r} (it takes {', '.join(own)}{readers}). "
                f"{received(**{key: value})}"
            )
    if name in _WHY_OBJECTIVE and "objective" in knobs:
        fixed = BUILTIN[name].objective
        objective = check_choice("objective", knobs.pop("objective"), ("clean+adv", "adv"))
        if objective != fixed:
            raise ValueError(
                f"method={name!r} {_WHY_OBJECTIVE[name]}, so its objective is {fixed!r}. "
                f"{received(method=name, objective=objective)}"
            )
    aliases = _ALIASES.get(name, {})
    fields = {aliases.get(key, key): value for key, value in knobs.items()}
    try:
        return BUILTIN[name](**fields)
    except (TypeError, ValueError) as error:
        if not aliases:
            raise
        # Say it with the keyword the caller wrote (`smart_mu`, not `mu`).
        message = str(error)
        for key, field in aliases.items():
            for before in (f"`{field}`", f"Received: {field}=", f"Received: {field}(0)="):
                message = message.replace(before, before.replace(field, key))
        raise type(error)(message) from None


def from_config(config: dict[str, Any]) -> Method:
    """Rebuild a built-in method from ``{"method": name, **get_config()}``.

    Example:
        >>> m = from_config({"method": "pgd", "steps": 2})
        >>> m.steps, m.passes()
        (2, 3)
    """
    if not isinstance(config, dict) or "method" not in config:
        raise TypeError(
            "from_config() takes a dict with the method's name under 'method' and its "
            f"settings (as get_config() gives them). {received(config=config)}"
        )
    rest = dict(config)
    name = check_choice("method", rest.pop("method"), tuple(BUILTIN))
    return BUILTIN[name].from_config(rest)


def resolve(method: Any, mode: Any, knobs: dict[str, Any]) -> Method:
    """``wrap()``'s ``method`` (a name or a :class:`Method`) and keywords, checked and
    resolved for ``mode``."""
    if isinstance(method, Method):
        if knobs:
            raise TypeError(
                "A method object carries its own settings: give them to its class "
                f"({type(method).__name__}(...)), not to wrap(). {received(**knobs)}"
            )
        built = method
    elif isinstance(method, type) and issubclass(method, Method):
        raise TypeError(
            f"`method` takes a method object: {method.__name__}(...), not the class. "
            f"{received(method=method.__name__)}"
        )
    elif isinstance(method, str):
        built = from_name(method, **knobs)
    else:
        raise TypeError(
            "`method` must be a method name (" + ", ".join(map(repr, BUILTIN)) + ") or an "
            f"advgraph.Method object. {received(method=method)}"
        )
    return built.for_mode(mode)
