"""What ``wrap()`` was asked to do: the mode and the method, resolved and checked.

The method's own settings live in its class (:mod:`advgraph.methods`); this module
knows none of them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from advgraph._errors import check_choice

__all__ = ["AdversarialConfig", "make_config", "MODES"]

MODES = ("output", "matrix")


@dataclass(frozen=True)
class AdversarialConfig:
    """The resolved settings of one wrapped model.

    Attributes:
        mode: ``"output"`` (delta on the embedding's output, one per sample),
            ``"matrix"`` (delta on the embedding matrix rows the batch touched) or,
            for a method whose site is a set of weights (AWP), ``"weights"``.
        settings: the method object (an :class:`advgraph.Method`), its defaults for
            this mode filled in.

    ``config.method`` is the method's name (``"pgd"``; a user's method: its class
    name), and a method's setting reads through: ``config.steps`` is
    ``config.settings.steps`` (the longer keyword names ``wrap()`` takes work too).

    Example:
        >>> import advgraph
        >>> config = make_config(mode="output", method="pgd", steps=2)
        >>> config.method, config.steps, config.per_sample
        ('pgd', 2, True)
    """

    mode: str
    settings: Any

    @property
    def method(self) -> str:
        return self.settings.name or type(self.settings).__name__

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or name == "settings":
            raise AttributeError(name)
        from advgraph.methods._names import _ALIASES

        field = _ALIASES.get(self.settings.name, {}).get(name, name)
        try:
            return getattr(self.settings, field)
        except AttributeError:
            raise AttributeError(
                f"{type(self.settings).__name__} has no setting {name!r}"
            ) from None

    def as_dict(self) -> dict[str, Any]:
        return {"mode": self.mode, "method": self.method, **self.settings.get_config()}


def make_config(*, mode: Any = "output", method: Any = "fgm", **knobs: Any) -> AdversarialConfig:
    """Check ``wrap()``'s ``mode``, ``method`` and the method's keywords.

    Nothing is silently dropped: a keyword the method does not read raises
    ``ValueError``.

    Example:
        >>> make_config(method="r3f").settings.noise_eps
        1e-05
    """
    from advgraph.methods._names import resolve

    if not isinstance(mode, str):
        check_choice("mode", mode, MODES)
    settings = resolve(method, mode, knobs)
    return AdversarialConfig(mode="weights" if settings.site == "weights" else mode, settings=settings)
