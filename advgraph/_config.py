"""Validated settings shared by every adapter: what ``wrap()`` was asked to do."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from advgraph._delta import NORMS
from advgraph._errors import (
    check_choice,
    check_positive_finite,
    check_positive_int,
    received,
)

__all__ = ["AdversarialConfig", "make_config", "MODES", "METHODS", "OBJECTIVES"]

MODES = ("output", "matrix")
METHODS = ("fgm", "fgsm", "pgd", "freelb", "vat")
OBJECTIVES = ("clean+adv", "adv")

# The knobs each method reads; any other knob given to wrap() is an error.
_KNOBS = {
    "fgm": set(),
    "fgsm": set(),
    "pgd": {"steps", "alpha", "random_init"},
    "freelb": {"steps", "alpha", "random_init", "init_mag"},
    "vat": {"steps", "xi", "vat_weight"},
}
_DEFAULT_NORM = {"fgm": "l2", "fgsm": "linf", "pgd": "l2", "freelb": "l2", "vat": "l2"}


@dataclass(frozen=True)
class AdversarialConfig:
    """The resolved settings of one wrapped model (defaults filled in, all checked).

    Attributes:
        mode: ``"output"`` (delta on the embedding's output, one per sample) or
            ``"matrix"`` (delta on the embedding matrix rows the batch touched).
        method: ``"fgm"``, ``"fgsm"``, ``"pgd"``, ``"freelb"`` or ``"vat"``.
        epsilon: radius of delta (FreeLB: its max norm; ``None`` there = unbounded).
        norm: ``"l2"`` or ``"linf"``.
        per_sample: normalise and project delta separately for each sample.
        objective: ``"clean+adv"`` (clean and adversarial gradients add up) or
            ``"adv"`` (only the adversarial passes drive the update).
        steps: PGD / FreeLB ascent steps; VAT power iterations.
        alpha: PGD / FreeLB step size.
        random_init: PGD / FreeLB random start.
        init_mag: FreeLB initial magnitude.
        xi: VAT finite-difference scale of the power iteration.
        vat_weight: weight of the VAT term.
    """

    mode: str = "output"
    method: str = "fgm"
    epsilon: float | None = 1.0
    norm: str = "l2"
    per_sample: bool = True
    objective: str = "clean+adv"
    steps: int = 1
    alpha: float | None = None
    random_init: bool = False
    init_mag: float = 0.0
    xi: float = 0.0
    vat_weight: float = 1.0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def make_config(
    *,
    mode: str = "output",
    method: str = "fgm",
    epsilon: float | None = 1.0,
    norm: str | None = None,
    per_sample: bool | None = None,
    steps: int | None = None,
    alpha: float | None = None,
    random_init: bool | None = None,
    objective: str | None = None,
    init_mag: float | None = None,
    xi: float | None = None,
    vat_weight: float | None = None,
) -> AdversarialConfig:
    """Check ``wrap()``'s keyword arguments and fill in the method's defaults.

    Nothing is silently dropped: a knob that the chosen method does not read
    raises ``ValueError``.

    Defaults (and where they come from):
        - pgd: ``steps=3``, ``alpha=2.5 * epsilon / steps`` (Madry et al., 2018),
          ``random_init=False``.
        - freelb: ``steps=3``, ``alpha=0.1``, ``random_init=True`` with
          ``init_mag=0.1`` (Zhu et al., 2020), ``objective="adv"`` (every pass is
          adversarial; ``"clean+adv"`` is rejected).
        - vat: ``steps=1`` power iteration, ``xi=0.1`` (Miyato et al.'s released
          text code), ``vat_weight=1.0``.
    """
    mode = check_choice("mode", mode, MODES)
    method = check_choice("method", method, METHODS)
    if epsilon is None and method != "freelb":
        raise TypeError(
            "`epsilon` must be a positive finite number (only method='freelb' takes "
            f"None: no max norm). {received(epsilon=epsilon, method=method)}"
        )
    if epsilon is not None:
        epsilon = check_positive_finite("epsilon", epsilon)
    if objective is None:
        objective = "adv" if method == "freelb" else "clean+adv"
    objective = check_choice("objective", objective, OBJECTIVES)
    if method == "freelb" and objective != "adv":
        raise ValueError(
            "method='freelb' has no clean pass: every one of its passes is adversarial, so "
            f"its objective is 'adv'. {received(method=method, objective=objective)}"
        )
    if norm is None:
        norm = _DEFAULT_NORM[method]
    norm = check_choice("norm", norm, NORMS)
    if method == "fgsm" and norm != "linf":
        raise ValueError(
            "method='fgsm' is the sign method and uses norm='linf'; use method='fgm' for "
            f"an l2 step. {received(method=method, norm=norm)}"
        )
    if method == "vat" and norm != "l2":
        raise ValueError(
            f"method='vat' uses norm='l2' (Miyato et al.). {received(method=method, norm=norm)}"
        )
    if per_sample is None:
        per_sample = mode == "output"
    if not isinstance(per_sample, bool):
        raise TypeError(f"`per_sample` must be True, False or None. {received(per_sample=per_sample)}")
    if mode == "matrix" and per_sample:
        raise ValueError(
            "`per_sample=True` is not meaningful in mode='matrix': one delta on the "
            "embedding matrix is shared by every sample of the batch. Use mode='output' "
            f"for one delta per sample. {received(mode=mode, per_sample=per_sample)}"
        )
    given = {
        "steps": steps,
        "alpha": alpha,
        "random_init": random_init,
        "init_mag": init_mag,
        "xi": xi,
        "vat_weight": vat_weight,
    }
    for name, value in given.items():
        if value is not None and name not in _KNOBS[method]:
            users = [m for m, knobs in _KNOBS.items() if name in knobs]
            raise ValueError(
                f"`{name}` does not apply to method={method!r} (it is read by "
                f"{', '.join(users)}). {received(**{name: value})}"
            )
    if steps is not None:
        steps = check_positive_int("steps", steps)
    else:
        steps = 3 if method in ("pgd", "freelb") else 1
    if alpha is not None:
        alpha = check_positive_finite("alpha", alpha)
    elif method == "pgd":
        alpha = 2.5 * epsilon / steps  # type: ignore[operator]
    elif method == "freelb":
        alpha = 0.1
    if random_init is not None and not isinstance(random_init, bool):
        raise TypeError(f"`random_init` must be True or False. {received(random_init=random_init)}")
    if random_init is None:
        random_init = method == "freelb"
    if init_mag is not None:
        if not random_init:
            raise ValueError(
                "`init_mag` scales FreeLB's random start, which random_init=False turns "
                f"off. {received(init_mag=init_mag, random_init=random_init)}"
            )
        init_mag = check_positive_finite("init_mag", init_mag)
    elif method == "freelb" and random_init:
        init_mag = 0.1
    xi = check_positive_finite("xi", xi) if xi is not None else (0.1 if method == "vat" else 0.0)
    if vat_weight is not None:
        vat_weight = check_positive_finite("vat_weight", vat_weight)
    return AdversarialConfig(
        mode=mode,
        method=method,
        epsilon=epsilon,
        norm=norm,
        per_sample=per_sample,
        objective=objective,
        steps=steps,
        alpha=alpha,
        random_init=random_init,
        init_mag=init_mag or 0.0,
        xi=xi,
        vat_weight=1.0 if vat_weight is None else vat_weight,
    )
