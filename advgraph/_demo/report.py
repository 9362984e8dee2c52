"""The demo's results table, plain-language summary and plot (framework-free)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from advgraph._demo.run import RunResult
from advgraph._demo.settings import DemoSettings

__all__ = ["MethodSummary", "summarize", "format_table", "format_summary", "save_plot"]


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


def _noise_note(flag: bool | None) -> str:
    if flag is None:
        return " (1 seed: no error estimate)"
    return "" if flag else " (within seed noise)"


def _changes(rows: Sequence[MethodSummary], base: MethodSummary, what: str) -> str:
    parts = []
    for r in sorted(rows, key=lambda r: -getattr(r, f"{what}_mean")):
        diff = getattr(r, f"{what}_mean") - getattr(base, f"{what}_mean")
        parts.append(f"{r.method} {_points(diff)} (to {100 * getattr(r, f'{what}_mean'):.1f}%)"
                     f"{_noise_note(_clear(r, base, what))}")
    return "; ".join(parts)


def format_summary(rows: Sequence[MethodSummary], settings: DemoSettings) -> str:
    """A few plain sentences computed from the table."""
    base = next((r for r in rows if r.method == "none"), None)
    lines = [
        f"Robust accuracy = accuracy on the test split under {settings.describe_attack()} "
        f"(step {settings.attack_alpha():.3g}, no random start); adversarial training used "
        f"epsilon={settings.epsilon:g} in mode={settings.mode!r}. '(within seed noise)' marks a "
        "difference to 'none' inside a 95% t-interval over seeds. s/epoch is the median wall-clock "
        "time of a training epoch (noisy on a busy machine); cost = s/epoch / that of 'none'.",
    ]
    if base is None:
        lines.append("No 'none' baseline was run: add it to --methods to compare against plain training.")
        return "\n".join(lines)
    others = [r for r in rows if r.method != "none"]
    if not others:
        lines.append("Only the 'none' baseline was run: add adversarial methods to --methods to compare.")
        return "\n".join(lines)
    lines.append(
        f"Under the attack, plain training ('none') keeps {100 * base.robust_mean:.1f}% accuracy "
        f"(clean: {100 * base.clean_mean:.1f}%)."
    )
    for what, name in (("robust", "robust accuracy"), ("clean", "clean accuracy")):
        up = [r for r in others if getattr(r, f"{what}_mean") > getattr(base, f"{what}_mean")]
        down = [r for r in others if getattr(r, f"{what}_mean") <= getattr(base, f"{what}_mean")]
        if up:
            lines.append(f"Raised {name} over 'none': {_changes(up, base, what)}.")
        if down:
            lines.append(f"Did not raise {name}: {_changes(down, base, what)}.")
    best = max(others, key=lambda r: r.robust_mean)
    if best.robust_mean > base.robust_mean and best.relative_cost is not None:
        cheapest = min(others, key=lambda r: r.relative_cost or math.inf)
        lines.append(
            f"Most robust: {best.method}, at {best.relative_cost:.1f}x the training time per "
            f"epoch of 'none'; cheapest: {cheapest.method} ({cheapest.relative_cost:.1f}x, "
            f"{_points(cheapest.robust_mean - base.robust_mean)} robust)."
        )
    return "\n".join(lines)


def save_plot(path: str, rows: Sequence[MethodSummary], settings: DemoSettings, title: str) -> None:
    """Learning curves, clean vs robust accuracy, and the table, as one PNG."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    from matplotlib import pyplot as plt

    fig = plt.figure(figsize=(13, 8.5))
    grid = fig.add_gridspec(2, 3, height_ratios=[3, 1.4])
    ax_loss, ax_acc, ax_bar = (fig.add_subplot(grid[0, i]) for i in range(3))
    epochs = np.arange(1, settings.epochs + 1)
    for row in rows:
        ax_loss.plot(epochs, row.train_loss, marker="o", label=row.method)
        ax_acc.plot(epochs, row.test_accuracy, marker="o", label=row.method)
    ax_loss.set(title="training loss (clean, mean over seeds)", xlabel="epoch", ylabel="loss")
    ax_acc.set(title="clean test accuracy (mean over seeds)", xlabel="epoch", ylabel="accuracy")
    for ax in (ax_loss, ax_acc):
        ax.set_xticks(epochs)
        ax.grid(alpha=0.3)
        ax.legend()
    where = np.arange(len(rows))
    width = 0.38

    def err(values: list[float]) -> list[float] | None:
        return None if any(math.isnan(v) for v in values) else values

    ax_bar.bar(where - width / 2, [r.clean_mean for r in rows], width,
               yerr=err([r.clean_std for r in rows]), capsize=3, label="clean")
    ax_bar.bar(where + width / 2, [r.robust_mean for r in rows], width,
               yerr=err([r.robust_std for r in rows]), capsize=3,
               label=f"under attack (eps={settings.attack_epsilon:g})")
    ax_bar.set_xticks(where, [r.method for r in rows])
    ax_bar.set(title="test accuracy (mean ± std over seeds)", ylim=(0, 1))
    ax_bar.grid(alpha=0.3, axis="y")
    ax_bar.legend(loc="upper right")
    ax_table = fig.add_subplot(grid[1, :])
    ax_table.axis("off")
    header, cells = table_rows(rows, settings)
    table = ax_table.table(cellText=cells, colLabels=header, loc="center", cellLoc="center")
    table.scale(1, 1.4)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=110)
    plt.close(fig)
