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

__all__ = ["AdversarialConfig", "make_config", "MODES", "METHODS", "OBJECTIVES", "NOISE_TYPES", "UNSET"]

MODES = ("output", "matrix")
METHODS = ("fgm", "fgsm", "pgd", "freelb", "vat", "gp", "r3f", "smart", "neftune", "awp")
OBJECTIVES = ("clean+adv", "adv")
NOISE_TYPES = ("uniform", "normal")


class _Unset:
    """``epsilon``'s default: 1.0 for the methods that read it; unread by the others."""

    def __repr__(self) -> str:
        return "1.0"


UNSET: Any = _Unset()

# The knobs each method reads; any other knob given to wrap() is an error.
_KNOBS = {
    "fgm": set(),
    "fgsm": set(),
    "pgd": {"steps", "alpha", "random_init"},
    "freelb": {"steps", "alpha", "random_init", "init_mag"},
    "vat": {"steps", "xi", "vat_weight"},
    "gp": set(),
    "r3f": {"noise_eps", "noise_type", "r3f_lambda"},
    "smart": {"steps", "alpha", "noise_eps", "smart_lambda", "smart_mu", "smart_beta"},
    "neftune": {"neftune_alpha"},
    "awp": {"adv_lr", "adv_eps"},
}
_DEFAULT_NORM = {
    "fgm": "l2",
    "fgsm": "linf",
    "pgd": "l2",
    "freelb": "l2",
    "vat": "l2",
    "smart": "linf",
}
# Methods that read `epsilon`, `norm` and `per_sample` (the others reject them).
_READS_EPSILON = ("fgm", "fgsm", "pgd", "freelb", "vat", "gp")
_READS_NORM = ("fgm", "fgsm", "pgd", "freelb", "vat", "smart")
_READS_PER_SAMPLE = ("fgm", "fgsm", "pgd", "freelb", "vat")
# The objective each new method optimises; only it is accepted.
_FIXED_OBJECTIVE = {"freelb": "adv", "gp": "clean+adv", "r3f": "clean+adv", "smart": "clean+adv", "neftune": "adv"}
_WHY_OBJECTIVE = {
    "freelb": "has no clean pass: every one of its passes is adversarial",
    "gp": "adds its penalty to the clean loss",
    "r3f": "adds its regulariser to the clean loss",
    "smart": "adds its regularisers to the clean loss",
    "neftune": "has no clean pass: its one forward is the noisy one",
}


@dataclass(frozen=True)
class AdversarialConfig:
    """The resolved settings of one wrapped model (defaults filled in, all checked).

    Attributes:
        mode: ``"output"`` (delta on the embedding's output, one per sample),
            ``"matrix"`` (delta on the embedding matrix rows the batch touched) or,
            for ``method="awp"``, ``"weights"`` (delta on the target's weights).
        method: ``"fgm"``, ``"fgsm"``, ``"pgd"``, ``"freelb"``, ``"vat"``, ``"gp"``,
            ``"r3f"``, ``"smart"``, ``"neftune"`` or ``"awp"``.
        epsilon: radius of delta (FreeLB: its max norm; ``None`` there = unbounded;
            gp: the penalty weight).
        norm: ``"l2"`` or ``"linf"``.
        per_sample: normalise and project delta separately for each sample.
        objective: ``"clean+adv"`` (clean and adversarial gradients add up) or
            ``"adv"`` (only the adversarial passes drive the update).
        steps: PGD / FreeLB / SMART ascent steps; VAT power iterations.
        alpha: PGD / FreeLB / SMART step size.
        random_init: PGD / FreeLB random start.
        init_mag: FreeLB initial magnitude.
        xi: VAT finite-difference scale of the power iteration.
        vat_weight: weight of the VAT term.
        noise_eps: R3F / SMART noise size (uniform: U(-eps, eps); normal: N(0, eps^2)).
        noise_type: R3F noise, ``"uniform"`` or ``"normal"`` (SMART: always normal).
        r3f_lambda: weight of R3F's symmetric KL.
        smart_lambda: weight of SMART's smoothness regulariser (lambda_s).
        smart_mu: weight of SMART's Bregman proximal term (mu; 0 turns it off).
        smart_beta: momentum of SMART's teacher (beta).
        neftune_alpha: NEFTune's noise scale alpha.
        adv_lr: AWP's relative step (delta_w = adv_lr * ||w|| * g / ||g||).
        adv_eps: AWP's elementwise bound (|delta_w| <= adv_eps * |w|).
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
    noise_eps: float = 0.0
    noise_type: str = "uniform"
    r3f_lambda: float = 0.0
    smart_lambda: float = 0.0
    smart_mu: float = 0.0
    smart_beta: float = 0.0
    neftune_alpha: float = 0.0
    adv_lr: float = 0.0
    adv_eps: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _check_nonnegative(name: str, value: Any) -> float:
    if value == 0 and not isinstance(value, bool):
        return 0.0
    return check_positive_finite(name, value)


def _check_fraction(name: str, value: Any) -> float:
    """A number in [0, 1)."""
    if value == 0 and not isinstance(value, bool):
        return 0.0
    value = check_positive_finite(name, value)
    if value >= 1.0:
        raise ValueError(f"`{name}` must be in [0, 1). {received(**{name: value})}")
    return value


def make_config(
    *,
    mode: str = "output",
    method: str = "fgm",
    epsilon: Any = UNSET,
    norm: str | None = None,
    per_sample: bool | None = None,
    steps: int | None = None,
    alpha: float | None = None,
    random_init: bool | None = None,
    objective: str | None = None,
    init_mag: float | None = None,
    xi: float | None = None,
    vat_weight: float | None = None,
    noise_eps: float | None = None,
    noise_type: str | None = None,
    r3f_lambda: float | None = None,
    smart_lambda: float | None = None,
    smart_mu: float | None = None,
    smart_beta: float | None = None,
    neftune_alpha: float | None = None,
    adv_lr: float | None = None,
    adv_eps: float | None = None,
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
        - gp: ``epsilon=1.0`` (the weight of ``epsilon / 2 * ||g||^2``, Su's recipe).
        - r3f: ``noise_eps=1e-5``, ``noise_type="uniform"``, ``r3f_lambda=1.0``
          (fairseq ``sentence_prediction_r3f``: ``--eps``, ``--noise-type``,
          ``--r3f-lambda``).
        - smart: ``noise_eps=1e-5``, ``steps=1``, ``alpha=1e-5``, ``norm="linf"``,
          ``smart_lambda=1.0`` (mt-dnn ``--adv_noise_var``, ``--adv_k``,
          ``--adv_step_size``, ``--adv_p_norm``, ``--adv_alpha``), ``smart_mu=1.0``,
          ``smart_beta=0.99`` (Jiang et al., 2020).
        - neftune: ``neftune_alpha=5.0`` (Jain et al., 2023); output mode only.
        - awp: ``adv_lr=0.005`` (Wu et al.'s gamma: ``||delta_w|| = gamma ||w||`` per
          layer), ``adv_eps=0.2`` (the band of the AWP class Kaggle NLP solutions
          share; its ``adv_lr=1`` collapses training from scratch), ``objective="adv"`` (Wu et al.: the update uses the loss at the
          perturbed weights); mode ``"weights"``.

    Example:
        >>> make_config(method="r3f").noise_eps
        1e-05
    """
    method = check_choice("method", method, METHODS)
    mode = check_choice("mode", mode, MODES)
    if method == "neftune" and mode != "output":
        raise ValueError(
            "method='neftune' adds noise to the embedding's output (one draw per token, "
            "scaled by each sequence's length); it has no meaning on the embedding matrix. "
            f"Use mode='output'. {received(method=method, mode=mode)}"
        )
    if method == "awp":
        if mode != "output":
            raise ValueError(
                "method='awp' perturbs the weights of the modules `target` names, not the "
                "embedding's output or matrix; leave `mode` at its default. "
                f"{received(method=method, mode=mode)}"
            )
        mode = "weights"
    if epsilon is UNSET:
        epsilon = 1.0 if method in _READS_EPSILON else None
    elif method not in _READS_EPSILON:
        raise ValueError(
            f"`epsilon` does not apply to method={method!r} (it is read by "
            f"{', '.join(_READS_EPSILON)}). {received(epsilon=epsilon)}"
        )
    if epsilon is None and method in _READS_EPSILON and method != "freelb":
        raise TypeError(
            "`epsilon` must be a positive finite number (only method='freelb' takes "
            f"None: no max norm). {received(epsilon=epsilon, method=method)}"
        )
    if epsilon is not None:
        epsilon = check_positive_finite("epsilon", epsilon)
    if objective is None:
        objective = _FIXED_OBJECTIVE.get(method, "adv" if method == "awp" else "clean+adv")
    objective = check_choice("objective", objective, OBJECTIVES)
    fixed = _FIXED_OBJECTIVE.get(method)
    if fixed is not None and objective != fixed:
        raise ValueError(
            f"method={method!r} {_WHY_OBJECTIVE[method]}, so its objective is {fixed!r}. "
            f"{received(method=method, objective=objective)}"
        )
    if norm is not None and method not in _READS_NORM:
        raise ValueError(
            f"`norm` does not apply to method={method!r} (it is read by "
            f"{', '.join(_READS_NORM)}). {received(norm=norm)}"
        )
    if norm is None:
        norm = _DEFAULT_NORM.get(method, "l2")
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
    if per_sample is not None and method not in _READS_PER_SAMPLE:
        raise ValueError(
            f"`per_sample` does not apply to method={method!r} (it is read by "
            f"{', '.join(_READS_PER_SAMPLE)}). {received(per_sample=per_sample)}"
        )
    if per_sample is None:
        per_sample = mode == "output" and method in _READS_PER_SAMPLE
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
        "noise_eps": noise_eps,
        "noise_type": noise_type,
        "r3f_lambda": r3f_lambda,
        "smart_lambda": smart_lambda,
        "smart_mu": smart_mu,
        "smart_beta": smart_beta,
        "neftune_alpha": neftune_alpha,
        "adv_lr": adv_lr,
        "adv_eps": adv_eps,
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
    elif method == "smart":
        alpha = 1e-5
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

    def knob(name: str, value: Any, default: float, check: Any = check_positive_finite) -> float:
        if value is not None:
            return float(check(name, value))
        return default if name in _KNOBS[method] else 0.0

    if noise_type is not None:
        noise_type = check_choice("noise_type", noise_type, NOISE_TYPES)
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
        noise_eps=knob("noise_eps", noise_eps, 1e-5),
        noise_type=noise_type or ("normal" if method == "smart" else "uniform"),
        r3f_lambda=knob("r3f_lambda", r3f_lambda, 1.0),
        smart_lambda=knob("smart_lambda", smart_lambda, 1.0),
        smart_mu=knob("smart_mu", smart_mu, 1.0, _check_nonnegative),
        smart_beta=knob("smart_beta", smart_beta, 0.99, _check_fraction),
        neftune_alpha=knob("neftune_alpha", neftune_alpha, 5.0),
        adv_lr=knob("adv_lr", adv_lr, 0.005),
        adv_eps=knob("adv_eps", adv_eps, 0.2),
    )
