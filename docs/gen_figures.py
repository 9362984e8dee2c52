"""Regenerate the figures of the documentation site (docs/img/*.png).

    python docs/gen_figures.py            # the step-time chart, from BENCHMARKS.md
    python docs/gen_figures.py --demo     # also the demo's learning curves (runs `advgraph demo`, 1-2 min)

The step-time chart reads its numbers from BENCHMARKS.md, the file that records every
figure with its command, date and machine; nothing is typed here twice. Each bar is a
method's measured step time divided by its pass-count limit (the time of the passes it
runs, measured in the same run); 1.0 is the limit.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
IMG = ROOT / "docs" / "img"

# (label on the chart, the row of a BENCHMARKS.md ratio table; its first occurrence is the latest run)
RATIOS = [
    ("fgm (output)", "advgraph FGM output / hand FGM"),
    ("fgm (matrix)", "advgraph FGM matrix / hand FGM"),
    ("pgd-3", "advgraph PGD-3 / ideal (4 passes)"),
    ("freelb-3", "advgraph FreeLB-3 / ideal (3 passes)"),
    ("gp", "advgraph gp / hand GP"),
    ("r3f", "advgraph r3f / ideal (2 passes)"),
    ("smart", "advgraph smart / ideal (3 passes + 2 forwards)"),
    ("neftune", "advgraph neftune / ideal (1 pass)"),
    ("awp", "advgraph awp / ideal (2 passes)"),
]


def benchmark_ratios(text: str) -> list[tuple[str, float]]:
    """The latest ratio of each row (the paired ratio where the table has one)."""
    out = []
    for label, row in RATIOS:
        match = re.search(r"^\| " + re.escape(row) + r" \| ([0-9.]+) \|(?: ([0-9.]+) \|)?", text, re.M)
        if not match:
            raise ValueError(f"Expected a row `| {row} | ...` in BENCHMARKS.md. Received: no such row")
        out.append((label, float(match.group(2) or match.group(1))))
    return out


def step_time_chart(path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ratios = benchmark_ratios((ROOT / "BENCHMARKS.md").read_text(encoding="utf-8"))
    fig, ax = plt.subplots(figsize=(7, 3.6), dpi=110)
    labels = [label for label, _ in ratios]
    values = [value for _, value in ratios]
    ax.barh(labels, values, color=["#3b75af" if v <= 1.05 else "#c44e52" for v in values])
    ax.axvline(1.0, color="black", lw=1)
    ax.text(1.0, len(labels) - 0.4, " pass-count limit", va="center", fontsize=8)
    for i, v in enumerate(values):
        ax.text(v + 0.01, i, f"{v:.2f}", va="center", fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, max(values) + 0.2)
    ax.set_xlabel("step time / pass-count limit (lower is better)")
    ax.set_title("advgraph step time against its pass-count limit (BENCHMARKS.md, 2026-12-06, 2-vCPU Xeon)", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    print(f"wrote {path}")


def demo_curves(path: Path) -> None:
    subprocess.run([sys.executable, "-m", "advgraph", "demo", "--plot", str(path)], check=True, cwd=ROOT)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--demo", action="store_true", help="also run `advgraph demo --plot` (1-2 minutes)")
    args = parser.parse_args()
    IMG.mkdir(parents=True, exist_ok=True)
    step_time_chart(IMG / "step_time_vs_limit.png")
    if args.demo:
        demo_curves(IMG / "demo_curves.png")


if __name__ == "__main__":
    main()
