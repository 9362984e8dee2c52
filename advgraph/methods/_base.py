""":class:`Method`: the base of every adversarial training method, built in or a user's.

A method is a small frozen dataclass: its settings are fields, checked when it is
built; ``passes()`` says how many forward/backward passes a step runs, ``step()``
runs them on a :class:`~advgraph.Site`. Adapters read a few class attributes to
know what a method needs (``modes``, ``site``, ``closure``); nothing in an adapter
names a method.

Any float setting may be a *schedule*: a function of the step count (from 0)
returning the value, e.g. :func:`advgraph.linear_schedule`. ``start`` holds the
method off for the first ``start`` steps: those are one plain forward/backward.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import numbers
from dataclasses import dataclass
from typing import Any, Callable, ClassVar

from advgraph._errors import check_choice, received

from ._site import Closure, Site

__all__ = ["Method", "OBJECTIVES", "check_number", "check_int", "check_flag"]

OBJECTIVES = ("clean+adv", "adv")


def _is_schedule(value: Any) -> bool:
    return callable(value) and not isinstance(value, (numbers.Real, str, bool, type))


def check_number(
    method: "Method", name: str, *, low: float = 0.0, open_low: bool = True, high: float | None = None,
    none: bool = False,
) -> None:
    """Check the float setting ``name`` of ``method`` (a number, or a schedule whose
    value at step 0 is checked), and store it as a float.

    The range is ``(low, high)`` (``open_low=False``: ``[low, high)``); ``none``:
    ``None`` is allowed.
    """
    value = getattr(method, name)
    if value is None and none:
        return
    if _is_schedule(value):
        try:
            first = value(0)
        except Exception as error:  # a schedule that cannot be evaluated is bad input
            raise TypeError(
                f"`{name}` is a schedule (a function of the step), which must return a number "
                f"for step 0; it raised {type(error).__name__}: {error}. {received(**{name: value})}"
            ) from error
        _check_range(name, first, low, open_low, high, label=f"{name}(0)")
        return
    number = _check_range(name, value, low, open_low, high, label=name)
    object.__setattr__(method, name, number)


def _check_range(name: str, value: Any, low: float, open_low: bool, high: float | None, *, label: str) -> float:
    bound = f"> {low}" if open_low else f">= {low}"
    if high is not None:
        bound += f" and < {high}"
    what = f"`{name}` must be a finite real number {bound}, or a schedule (a function of the step)."
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{what} {received(**{label: value})}")
    number = float(value)
    bad = not math.isfinite(number) or (number <= low if open_low else number < low)
    if bad or (high is not None and number >= high):
        raise ValueError(f"{what} {received(**{label: value})}")
    return number


def check_int(method: "Method", name: str, *, low: int = 1) -> None:
    """``name`` must be an int ``>= low`` (not a bool, not a float)."""
    value = getattr(method, name)
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"`{name}` must be an integer >= {low}. {received(**{name: value})}")
    if value < low:
        raise ValueError(f"`{name}` must be an integer >= {low}. {received(**{name: value})}")
    object.__setattr__(method, name, int(value))


def check_flag(method: "Method", name: str, *, none: bool = False) -> None:
    value = getattr(method, name)
    if value is None and none:
        return
    if not isinstance(value, bool):
        allowed = "True, False or None" if none else "True or False"
        raise TypeError(f"`{name}` must be {allowed}. {received(**{name: value})}")


@dataclass(frozen=True, kw_only=True)
class Method:
    """Base class of every method: subclass it (as a frozen dataclass) to add your own.

    Class attributes an adapter reads:
        name: the lower-case name (``method="fgm"``); a user's method may leave it.
        modes: the ``mode`` values it runs in (``("output", "matrix")``).
        site: ``"embedding"`` (delta at the embedding) or ``"weights"`` (AWP).
        closure: what the step's closure returns -- ``"loss"``, ``"loss_and_logits"``
            (``(loss, logits)``: a regulariser compares output distributions) or
            ``"logits"`` (label-free: ``logits``, or ``(loss, logits)`` when labels
            exist). Keras builds the closure from this.
        needs_token_mask: the step reads :meth:`Site.token_mask` (the adapter then
            records each batch's padding).
        edits_between_forwards: a joint pass whose forwards run under different
            deltas (matrix mode then refuses an embedding tied to another layer).

    Fields:
        start: the number of steps before the method switches on; until then a
            step is one plain forward/backward (counted in ``plain_steps``).

    Subclasses implement :meth:`passes` and :meth:`step`; :meth:`delta` when the
    method can run in ``perturbed()`` (a delta from the last backward's gradient).

    Example:
        >>> from dataclasses import dataclass
        >>> import advgraph
        >>> @dataclass(frozen=True, kw_only=True)
        ... class Plain(advgraph.Method):
        ...     def passes(self):
        ...         return 1
        ...     def step(self, site, closure):
        ...         return site.forward_backward(closure, param_grads=True, keep_grad=False)
        >>> Plain(start=10)
        Plain(start=10)
    """

    name: ClassVar[str] = ""
    modes: ClassVar[tuple[str, ...]] = ("output", "matrix")
    site: ClassVar[str] = "embedding"
    closure: ClassVar[str] = "loss"
    needs_token_mask: ClassVar[bool] = False
    edits_between_forwards: ClassVar[bool] = False

    start: int = 0

    def __post_init__(self) -> None:
        check_int(self, "start", low=0)

    # -- what a subclass implements ----------------------------------------------------
    def passes(self) -> int:
        """Forward/backward passes (calls that backpropagate) one step runs."""
        raise NotImplementedError(f"{type(self).__name__} must implement passes()")

    def step(self, site: Site, closure: Closure) -> Any:
        """Run every pass of one training step on ``site``; return the clean loss."""
        raise NotImplementedError(f"{type(self).__name__} must implement step(site, closure)")

    def delta(self, site: Site) -> Any:
        """The delta ``perturbed()`` installs, from the last backward's gradient."""
        raise ValueError(
            "perturbed() is the hand-written FGM loop (a delta of size epsilon from the "
            f"last backward); {self.label} runs its passes through adversarial_step() "
            f"only. {received(method=self.label)}"
        )

    # -- resolved by wrap() ------------------------------------------------------------
    def for_mode(self, mode: str) -> "Method":
        """This method with the defaults that depend on ``mode`` filled in (checked).

        Returns ``self`` when nothing depends on the mode. Raises ``ValueError`` when
        the method does not run in ``mode``.
        """
        mode = check_choice("mode", mode, ("output", "matrix"))
        if mode not in self.modes:
            raise ValueError(
                f"{self.label} runs in mode {' or '.join(map(repr, self.modes))}. "
                f"{received(method=self.label, mode=mode)}"
            )
        return self

    @property
    def label(self) -> str:
        """How messages name the method: ``method='pgd'`` or the class name."""
        return f"method={self.name!r}" if self.name else type(self).__name__

    @property
    def uses_teacher(self) -> bool:
        """Whether steps call :meth:`Site.update_teacher` (the adapter keeps a teacher)."""
        return False

    # -- schedules ---------------------------------------------------------------------
    def scheduled(self) -> tuple[str, ...]:
        """Names of the settings given as schedules."""
        return tuple(f.name for f in dataclasses.fields(self) if _is_schedule(getattr(self, f.name)))

    def at(self, step: Any) -> "Method":
        """This method with every schedule evaluated at ``step`` (an int, or a scalar
        array inside a compiled step). Returns ``self`` when nothing is scheduled.

        Example:
            >>> import advgraph
            >>> m = advgraph.methods.FGM(epsilon=advgraph.linear_schedule(0.0, 1.0, 10))
            >>> m.at(5).epsilon
            0.5
        """
        names = self.scheduled()
        if not names:
            return self
        now = copy.copy(self)
        for name in names:
            object.__setattr__(now, name, getattr(self, name)(step))
        return now

    # -- settings as data ----------------------------------------------------------------
    def get_config(self) -> dict[str, Any]:
        """The settings as a dict (schedules as their own ``get_config()`` where they
        have one); :meth:`from_config` rebuilds the method from it.

        Example:
            >>> import advgraph
            >>> m = advgraph.methods.PGD(epsilon=0.5, steps=2)
            >>> advgraph.methods.PGD.from_config(m.get_config()) == m
            True
        """
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if _is_schedule(value):
                get = getattr(value, "get_config", None)
                if get is None:
                    raise TypeError(
                        f"`{f.name}` is a plain function, which cannot be written as settings; "
                        "use a schedule object such as advgraph.linear_schedule. "
                        f"{received(**{f.name: value})}"
                    )
                value = {"schedule": type(value).__name__, "config": get()}
            out[f.name] = value
        return out

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "Method":
        """Rebuild a method from :meth:`get_config`'s dict."""
        from advgraph._schedules import schedule_from_config

        if not isinstance(config, dict):
            raise TypeError(f"from_config() takes the dict get_config() gave. {received(config=config)}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(config) - names)
        if unknown:
            raise ValueError(
                f"{cls.__name__} has no setting {', '.join(map(repr, unknown))} (its settings: "
                f"{', '.join(sorted(names))}). {received(config=config)}"
            )
        values = {
            k: schedule_from_config(v) if isinstance(v, dict) and "schedule" in v else v
            for k, v in config.items()
        }
        return cls(**values)

    def knobs(self) -> tuple[str, ...]:
        """The names of the settings (``wrap()`` takes them as keywords with the name)."""
        return tuple(f.name for f in dataclasses.fields(self))
