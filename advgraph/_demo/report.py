"""The demo's results table, plain-language summary and plot (framework-free)."""

from __future__ import annotations

import math
import textwrap
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from advgraph._demo.run import RunResult
from advgraph._demo.settings import DemoSettings

__all__ = ["MethodSummary", "summarize", "format_table", "format_notes", "format_summary", "save_plot"]


@dataclass(frozen=True)
class MethodSummary:
    """Mean and spread over seeds of one method's results."""

    method: str
    seeds: int
    clean_mean: float
    clean_std: float
    robust_mean: float
    robust_std: float
    seconds_per_epoch: float  # mean over seeds of the per-run median epoch time
    relative_cost: float | None  # seconds_per_epoch / that of "none"; None without "none"
    train_loss: tuple[float, ...]  # per epoch, mean over seeds
    test_accuracy: tuple[float, ...]  # per epoch, mean over seeds


def _std(values: Sequence[float]) -> float:
    return float(np.std(values, ddof=1)) if len(values) > 1 else math.nan


def summarize(results: Sequence[RunResult], methods: Sequence[str]) -> list[MethodSummary]:
    """One :class:`MethodSummary` per method, in the order of ``methods``."""
    rows = []
    for method in methods:
        runs = [r for r in results if r.method == method]
        rows.append(
            (
                method,
                runs,
                float(np.mean([r.seconds_per_epoch for r in runs])),
            )
        )
    base = next((sec for method, _, sec in rows if method == "none"), None)
    out = []
    for method, runs, sec in rows:
        clean = [r.clean_accuracy for r in runs]
        robust = [r.robust_accuracy for r in runs]
        out.append(
            MethodSummary(
                method=method,
                seeds=len(runs),
                clean_mean=float(np.mean(clean)),
                clean_std=_std(clean),
                robust_mean=float(np.mean(robust)),
                robust_std=_std(robust),
                seconds_per_epoch=sec,
                relative_cost=sec / base if base else None,
                train_loss=tuple(np.mean([r.train_loss for r in runs], axis=0).tolist()),
                test_accuracy=tuple(np.mean([r.test_accuracy for r in runs], axis=0).tolist()),
            )
        )
    return out


def _pm(mean: float, std: float) -> str:
    return f"{mean:.3f}" if math.isnan(std) else f"{mean:.3f} ± {std:.3f}"


def table_rows(rows: Sequence[MethodSummary], settings: DemoSettings) -> tuple[list[str], list[list[str]]]:
    """Header and cells of the results table (shared by the text table and the plot)."""
    header = [
        "method",
        "clean acc",
        f"robust acc (PGD-{settings.attack_steps}, eps={settings.attack_epsilon:g})",
        "s/epoch",
        "cost vs none",
    ]
    cells = [
        [
            row.method,
            _pm(row.clean_mean, row.clean_std),
            _pm(row.robust_mean, row.robust_std),
            f"{row.seconds_per_epoch:.2f}",
            "n/a" if row.relative_cost is None else f"{row.relative_cost:.2f}x",
        ]
        for row in rows
    ]
    return header, cells


def format_table(rows: Sequence[MethodSummary], settings: DemoSettings) -> str:
    """The results as an aligned text table."""
    header, cells = table_rows(rows, settings)
    widths = [max(len(line[i]) for line in [header] + cells) for i in range(len(header))]

    def line(parts: Sequence[str]) -> str:
        first = parts[0].ljust(widths[0])
        rest = [p.rjust(w) for p, w in zip(parts[1:], widths[1:])]
        return "  ".join([first] + rest).rstrip()

    rule = "-" * len(line(header))
    return "\n".join([line(header), rule] + [line(c) for c in cells])


def _points(diff: float) -> str:
    return f"{100 * diff:+.1f} points"


# Two-sided 95% quantiles of Student's t, by degrees of freedom (1.96 beyond 30).
_T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306,
        9: 2.262, 10: 2.228, 12: 2.179, 15: 2.131, 20: 2.086, 25: 2.060, 30: 2.042}

WIDTH = 88  # notes are wrapped to this many columns
# A method whose clean accuracy is at most this far above the majority-class share
# has not learned more than "always predict the most common class".
_AT_MAJORITY = 0.01


def _t95(df: int) -> float:
    return next((_T95[k] for k in sorted(_T95) if k >= df), 1.96)


def _clear(a: MethodSummary, b: MethodSummary, what: str) -> bool | None:
    """Whether mean(a) - mean(b) lies outside a 95% t-interval over seeds (None: 1 seed)."""
    sa, sb = getattr(a, f"{what}_std"), getattr(b, f"{what}_std")
    if math.isnan(sa) or math.isnan(sb):
        return None
    se = math.sqrt(sa**2 / a.seeds + sb**2 / b.seeds)
    diff = getattr(a, f"{what}_mean") - getattr(b, f"{what}_mean")
    return abs(diff) > _t95(a.seeds + b.seeds - 2) * se if se > 0 else diff != 0


def _names(methods: Sequence[str]) -> str:
    """``a``, ``a and b``, ``a, b and c``."""
    return methods[0] if len(methods) == 1 else ", ".join(methods[:-1]) + " and " + methods[-1]


def _wrap(text: str, indent: str = "") -> str:
    return textwrap.fill(text, width=WIDTH, subsequent_indent=indent, break_on_hyphens=False)


def _change(r: MethodSummary, base: MethodSummary, what: str) -> str:
    mean = getattr(r, f"{what}_mean")
    return f"{r.method} {_points(mean - getattr(base, f'{what}_mean'))} (to {100 * mean:.1f}%)"


def _comparison(others: Sequence[MethodSummary], base: MethodSummary, what: str, name: str) -> list[str]:
    """One sentence per outcome (raised / lowered / within seed noise / unchanged)."""
    ranked = sorted(others, key=lambda r: -getattr(r, f"{what}_mean"))
    groups: dict[str, list[MethodSummary]] = {"up": [], "down": [], "noise": [], "same": []}
    for r in ranked:
        diff = getattr(r, f"{what}_mean") - getattr(base, f"{what}_mean")
        if _clear(r, base, what) is False:
            groups["noise"].append(r)
        elif diff > 0:
            groups["up"].append(r)
        elif diff < 0:
            groups["down"].append(r)
        else:
            groups["same"].append(r)
    out = []
    if groups["up"]:
        out.append(f"Raised {name} over 'none': " + "; ".join(_change(r, base, what) for r in groups["up"]) + ".")
    if groups["down"]:
        out.append(f"Lowered {name}: " + "; ".join(_change(r, base, what) for r in groups["down"]) + ".")
    if groups["noise"]:
        out.append(
            f"{name[0].upper() + name[1:]} within seed noise of 'none' (95% t-interval): "
            + "; ".join(_change(r, base, what) for r in groups["noise"]) + "."
        )
    if groups["same"]:
        out.append(f"Same {name} as 'none': {_names([r.method for r in groups['same']])}.")
    return out


def format_notes(rows: Sequence[MethodSummary], settings: DemoSettings, majority: float | None = None,
                 majority_class: str | None = None, test_size: int | None = None) -> str:
    """What the table's columns mean (one wrapped paragraph)."""
    seeds = rows[0].seeds if rows else settings.seeds
    texts = f"the {test_size} test texts" if test_size else "the test split"
    parts = [f"Clean acc: accuracy on {texts}"]
    if majority is not None:
        which = f" ({majority_class})" if majority_class else ""
        parts[0] += f"; always predicting the most common class{which} scores {majority:.3f}"
    parts[0] += "."
    parts.append(
        f"Robust acc: accuracy under {settings.describe_attack()} (step {settings.attack_alpha():.3g}, "
        "no random start)."
    )
    spread = f"Mean ± std over {seeds} seeds" if seeds > 1 else "1 seed, so no spread"
    parts.append(f"{spread}; adversarial training used epsilon={settings.epsilon:g} in mode={settings.mode!r}.")
    parts.append(
        "s/epoch: median wall-clock seconds of a training epoch (noisy on a busy machine); "
        "cost vs none: s/epoch relative to 'none'."
    )
    return _wrap(" ".join(parts))


def format_summary(rows: Sequence[MethodSummary], settings: DemoSettings, majority: float | None = None,
                   majority_class: str | None = None, test_size: int | None = None) -> str:
    """The notes, then a few plain sentences computed from the table; wrapped to 88 columns.

    One message per condition, worded for the methods and seeds that were run: no
    noise talk with 1 seed, no "most robust / cheapest" unless two or more
    adversarial methods raised robustness, a warning when a method is no better
    than always predicting the majority class.
    """
    paragraphs = [format_notes(rows, settings, majority, majority_class, test_size)]
    findings: list[str] = []
    base = next((r for r in rows if r.method == "none"), None)
    others = [r for r in rows if r.method != "none"]
    seeds = rows[0].seeds if rows else settings.seeds
    if base is None:
        findings.append("No 'none' baseline was run: add it to --methods to compare with plain training.")
    elif not others:
        findings.append(
            "Only plain training ('none') was run: add adversarial methods to --methods "
            "(e.g. --methods none,fgm) to compare."
        )
    else:
        findings.append(
            f"Under the attack, plain training ('none') keeps {100 * base.robust_mean:.1f}% accuracy "
            f"(clean: {100 * base.clean_mean:.1f}%)."
        )
        findings += _comparison(others, base, "robust", "robust accuracy")
        findings += _comparison(others, base, "clean", "clean accuracy")
        if seeds == 1:
            findings.append(
                "With 1 seed there is no error estimate: a difference of a point or so may be "
                "seed noise (--seeds 3 reports mean ± std and marks it)."
            )
        findings += _cost_sentence(others, base)
    if majority is not None:
        stuck = [r.method for r in rows if r.clean_mean <= majority + _AT_MAJORITY]
        if stuck:
            verb = "is" if len(stuck) == 1 else "are"
            findings.append(
                f"{_names(stuck)} {verb} at the majority-class share ({majority:.3f}): no better "
                "than always predicting the most common class. Train longer (--epochs) or with a "
                "smaller --epsilon."
            )
        late = [r for r in rows if r.method not in stuck and _first_epoch_above(r, majority) > 1]
        if late:
            by_epoch: dict[int, list[str]] = {}
            for r in late:
                by_epoch.setdefault(_first_epoch_above(r, majority) - 1, []).append(r.method)
            parts = [f"{_names(m)} after {_epochs(e)}" for e, m in sorted(by_epoch.items())]
            findings.append(
                f"Still at the majority-class share (always the most common class): {'; '.join(parts)}; "
                "each learned later (see the clean-accuracy curves with --plot)."
            )
    paragraphs.append("\n".join(_wrap(f, indent="  ") for f in findings))
    return "\n\n".join(paragraphs)


def _first_epoch_above(row: MethodSummary, majority: float) -> int:
    """The first epoch (1-based) whose clean test accuracy is above the majority share."""
    return next(
        (i + 1 for i, acc in enumerate(row.test_accuracy) if acc > majority + _AT_MAJORITY),
        len(row.test_accuracy) + 1,
    )


def _epochs(n: int) -> str:
    return "epoch 1" if n == 1 else f"epochs 1-{n}"


def _cost_sentence(others: Sequence[MethodSummary], base: MethodSummary) -> list[str]:
    """Most robust vs cheapest, when at least two methods raised robust accuracy."""
    gains = [r for r in others if r.robust_mean > base.robust_mean and _clear(r, base, "robust") is not False]
    if len(gains) < 2 or any(r.relative_cost is None for r in gains):
        return []
    best = max(gains, key=lambda r: r.robust_mean)
    cheapest = min(gains, key=lambda r: r.relative_cost)  # type: ignore[arg-type, return-value]
    if cheapest is best:
        return [
            f"{best.method} is both the most robust and the cheapest of them "
            f"({best.relative_cost:.1f}x the time per epoch of 'none')."
        ]
    gap = best.robust_mean - cheapest.robust_mean
    less = "as robust" if gap == 0 else f"{100 * gap:.1f} points less robust"
    sentence = (
        f"Most robust: {best.method}, at {best.relative_cost:.1f}x the time per epoch of 'none'; "
        f"the cheapest, {cheapest.method}, costs {cheapest.relative_cost:.1f}x and is {less}"
    )
    if gap and _clear(cheapest, best, "robust") is False:
        sentence += " (within seed noise)"
    return [sentence + "."]


def save_plot(path: str, rows: Sequence[MethodSummary], settings: DemoSettings, title: str,
              majority: float | None = None, majority_class: str | None = None) -> None:
    """Learning curves, clean vs robust accuracy, and the table, as one PNG.

    Titles say what is drawn: "mean over N seeds" (and error bars of one std) with
    several seeds, "1 seed" (no error bars) with one. ``majority`` (the share of the
    most common test class) is drawn as a dashed line on both accuracy panels.
    """
    from matplotlib import pyplot as plt

    fig = figure(rows, settings, title, majority, majority_class)
    fig.savefig(path, format="png", dpi=110)
    plt.close(fig)


def figure(rows: Sequence[MethodSummary], settings: DemoSettings, title: str,
           majority: float | None = None, majority_class: str | None = None) -> Any:
    """The matplotlib figure of :func:`save_plot` (the caller closes it)."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    from matplotlib import pyplot as plt

    seeds = rows[0].seeds if rows else settings.seeds
    over = f"mean over {seeds} seeds" if seeds > 1 else "1 seed"
    fig = plt.figure(figsize=(13, 8.5))
    grid = fig.add_gridspec(2, 3, height_ratios=[3, 1.4])
    ax_loss, ax_acc, ax_bar = (fig.add_subplot(grid[0, i]) for i in range(3))
    epochs = np.arange(1, settings.epochs + 1)
    for row in rows:
        ax_loss.plot(epochs, row.train_loss, marker="o", label=row.method)
        ax_acc.plot(epochs, row.test_accuracy, marker="o", label=row.method)
    baseline = None
    if majority is not None:
        which = f" ({majority_class})" if majority_class else ""
        baseline = f"majority class{which}: {majority:.3f}"
        for ax in (ax_acc, ax_bar):
            ax.axhline(majority, color="0.35", linestyle="--", linewidth=1, label=baseline)
    ax_loss.set(title=f"training loss (clean, {over})", xlabel="epoch", ylabel="loss")
    ax_acc.set(title=f"clean test accuracy ({over})", xlabel="epoch", ylabel="accuracy")
    for ax in (ax_loss, ax_acc):
        ax.set_xticks(epochs)
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    where = np.arange(len(rows))
    width = 0.38
    errors = seeds > 1

    def err(values: list[float]) -> list[float] | None:
        return values if errors and not any(math.isnan(v) for v in values) else None

    ax_bar.bar(where - width / 2, [r.clean_mean for r in rows], width,
               yerr=err([r.clean_std for r in rows]), capsize=3, label="clean")
    ax_bar.bar(where + width / 2, [r.robust_mean for r in rows], width,
               yerr=err([r.robust_std for r in rows]), capsize=3,
               label=f"under attack (eps={settings.attack_epsilon:g})")
    ax_bar.set_xticks(where, [r.method for r in rows])
    bar_title = f"test accuracy (mean ± std over {seeds} seeds)" if errors else "test accuracy (1 seed)"
    ax_bar.set(title=bar_title, ylim=(0, 1))
    ax_bar.grid(alpha=0.3, axis="y")
    ax_bar.legend(loc="upper right", fontsize="small")
    ax_table = fig.add_subplot(grid[1, :])
    ax_table.axis("off")
    header, cells = table_rows(rows, settings)
    table = ax_table.table(cellText=cells, colLabels=header, loc="center", cellLoc="center")
    table.scale(1, 1.4)
    if baseline is not None:
        ax_table.set_title(f"always predicting the most common class{which} scores {majority:.3f}", y=0.0,
                           fontsize="small", pad=-14)
    fig.suptitle(title)
    fig.tight_layout()
    return fig
