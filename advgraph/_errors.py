"""Error types and message helpers shared by the core and the adapters.

Every user-facing error says what was expected, then ``Received: name=value``.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Iterable

__all__ = [
    "AdvGraphWarning",
    "received",
    "require",
    "check_positive_finite",
    "check_choice",
    "check_positive_int",
]


class AdvGraphWarning(UserWarning):
    """Warning category for skipped perturbations and risky configurations."""


def _short_repr(value: Any, limit: int = 120) -> str:
    text = repr(value)
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    return text


def received(**values: Any) -> str:
    """Format the ``Received: name=value`` tail of an error message."""
    parts = [f"{name}={_short_repr(value)}" for name, value in values.items()]
    return "Received: " + ", ".join(parts)


def require(module: str, extra: str, what: str) -> Any:
    """Import ``module`` or raise ImportError naming the pip extra that provides it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:  # pragma: no cover - exercised with a missing framework
        raise ImportError(
            f"{what} needs the `{module}` package, which is not installed. "
            f"Install it with: pip install 'advgraph[{extra}]'"
        ) from exc


def check_positive_finite(name: str, value: Any) -> float:
    """Return ``value`` as float if it is a positive finite real number."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(
            f"`{name}` must be a positive finite real number. {received(**{name: value})}"
        )
    as_float = float(value)
    if not math.isfinite(as_float) or as_float <= 0.0:
        raise ValueError(
            f"`{name}` must be a positive finite real number. {received(**{name: value})}"
        )
    return as_float


def check_choice(name: str, value: Any, choices: Iterable[str]) -> str:
    """Check that ``value`` is one of the strings in ``choices``."""
    if type(value) is str and isinstance(choices, tuple) and value in choices:
        return value
    choices = tuple(choices)
    if not isinstance(value, str):
        raise TypeError(
            f"`{name}` must be one of {', '.join(map(repr, choices))}. {received(**{name: value})}"
        )
    if value not in choices:
        raise ValueError(
            f"`{name}` must be one of {', '.join(map(repr, choices))}. {received(**{name: value})}"
        )
    return value


def check_positive_int(name: str, value: Any) -> int:
    """Check that ``value`` is an int >= 1."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"`{name}` must be an integer >= 1. {received(**{name: value})}")
    if value < 1:
        raise ValueError(f"`{name}` must be an integer >= 1. {received(**{name: value})}")
    return value
