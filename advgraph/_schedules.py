"""Schedules: a setting that changes with the step count.

A schedule is any callable of the step (an int from 0; inside a compiled Keras
step a scalar tensor of the backend) returning the setting's value. The ones here
are small objects, so a method that uses them can be written as settings
(``get_config``), pickled and rebuilt; they compute with the step's own
operators, so they work on an int and on a traced scalar alike.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import asdict, dataclass
from typing import Any

from advgraph._errors import received

__all__ = ["constant_schedule", "linear_schedule", "schedule_from_config"]


def _number(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise TypeError(f"`{name}` must be a finite real number. {received(**{name: value})}")
    return float(value)


def _fraction(step: Any, begin: int, steps: int) -> Any:
    """``clip((step - begin) / steps, 0, 1)`` on an int or on a scalar array."""
    if isinstance(step, numbers.Real):
        return min(max((float(step) - begin) / steps, 0.0), 1.0)
    from advgraph._ops import ops_for

    ops = ops_for(step, "step")  # a float scalar array (adapters pass the step as float32)
    return ops.clip((step - begin) / steps, 0.0, 1.0)


@dataclass(frozen=True)
class linear_schedule:  # noqa: N801 - a function-like name, as optax's schedules
    """``init`` before ``begin``, then linearly to ``end`` over ``steps`` steps, then ``end``.

    Example:
        >>> import advgraph
        >>> warmup = advgraph.linear_schedule(0.0, 1.0, steps=100)
        >>> warmup(0), warmup(50), warmup(1000)
        (0.0, 0.5, 1.0)
        >>> m = advgraph.methods.FGM(epsilon=advgraph.linear_schedule(0.1, 1.0, steps=100))
    """

    init: float
    end: float
    steps: int
    begin: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "init", _number("init", self.init))
        object.__setattr__(self, "end", _number("end", self.end))
        for name in ("steps", "begin"):
            value = getattr(self, name)
            low = 1 if name == "steps" else 0
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
                raise ValueError(f"`{name}` must be an integer >= {low}. {received(**{name: value})}")

    def __call__(self, step: Any) -> Any:
        return self.init + (self.end - self.init) * _fraction(step, self.begin, self.steps)

    def get_config(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class constant_schedule:  # noqa: N801
    """The same value at every step (mostly useful to build schedules from config).

    Example:
        >>> import advgraph
        >>> advgraph.constant_schedule(0.3)(10)
        0.3
    """

    value: float

    def __call__(self, step: Any) -> Any:
        return self.value

    def get_config(self) -> dict[str, Any]:
        return asdict(self)


_KINDS = {"linear_schedule": linear_schedule, "constant_schedule": constant_schedule}


def schedule_from_config(config: dict[str, Any]) -> Any:
    """Rebuild a schedule from ``{"schedule": name, "config": {...}}``."""
    kind = config.get("schedule")
    if kind not in _KINDS:
        raise ValueError(
            f"Unknown schedule {kind!r}: expected one of {', '.join(map(repr, _KINDS))}. "
            f"{received(schedule=kind)}"
        )
    return _KINDS[kind](**config["config"])
