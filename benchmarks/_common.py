"""Shared helpers: interleaved timing, medians, machine facts, JSON output."""

from __future__ import annotations

import json
import math
import os
import platform
import random
import statistics
import sys
import time
from typing import Any, Callable


def machine() -> dict[str, Any]:
    info: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "processor": platform.processor() or platform.machine(),
    }
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    info["cpu_model"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    for name in ("torch", "tensorflow", "keras", "transformers", "advgraph"):
        module = sys.modules.get(name)
        if module is not None:
            info[name] = getattr(module, "__version__", "?")
    torch = sys.modules.get("torch")
    if torch is not None:
        info["torch_threads"] = torch.get_num_threads()
        info["cuda"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return info


def interleaved(
    variants: dict[str, Callable[[], None]],
    repeats: int,
    warmup: int = 2,
    sync: Callable[[], None] = lambda: None,
    seed: int = 0,
) -> dict[str, list[float]]:
    """Time each variant once per round, rounds in a shuffled order; return seconds."""
    rng = random.Random(seed)
    names = list(variants)
    for _ in range(warmup):
        for name in names:
            variants[name]()
    sync()
    times: dict[str, list[float]] = {name: [] for name in names}
    for _ in range(repeats):
        rng.shuffle(names)
        for name in names:
            sync()
            start = time.perf_counter()
            variants[name]()
            sync()
            times[name].append(time.perf_counter() - start)
    return times


def medians(times: dict[str, list[float]]) -> dict[str, float]:
    return {name: statistics.median(values) for name, values in times.items()}


def paired_ratio(times: dict[str, list[float]], name: str, reference: str) -> float:
    """Median over rounds of ``name``'s time / ``reference``'s time in the same round.

    On a shared machine the load changes from second to second; two variants timed in
    the same round see about the same load, so the per-round ratio is steadier than
    the ratio of medians.
    """
    return statistics.median(a / b for a, b in zip(times[name], times[reference]))


def paired_ratios(times: dict[str, list[float]], name: str, reference: str, scale: float = 1.0) -> list[float]:
    """Every round's ``name`` time / (``scale`` x ``reference`` time in the same round)."""
    return [a / (scale * b) for a, b in zip(times[name], times[reference])]


def median_ci95(values: list[float]) -> tuple[float, float]:
    """A 95 % confidence interval of the median, distribution-free: the order
    statistics ``j`` and ``k`` around ``n / 2`` that bracket the median with
    probability >= 0.95 under the binomial(n, 1/2) law (normal approximation,
    ``1.96 * sqrt(n) / 2`` ranks either side). Needs no assumption on the noise's
    shape, which on a shared machine is skewed (slow rounds, never fast ones)."""
    ordered = sorted(values)
    n = len(ordered)
    if n < 6:  # even (min, max) covers the median with probability 1 - 2**(1-n) < 0.95
        return -math.inf, math.inf
    half = 1.96 * math.sqrt(n) / 2.0
    j = max(0, math.floor(n / 2.0 - half) - 1)
    k = min(n - 1, math.ceil(n / 2.0 + half))
    return ordered[j], ordered[k]


def spread(values: list[float]) -> dict[str, float]:
    """Median with its 95 % confidence interval, quartiles (IQR), min and max of
    ``values``: what a ratio's noise looks like, and how well its median is known."""
    q1, q2, q3 = statistics.quantiles(values, n=4, method="inclusive") if len(values) > 1 else (values[0],) * 3
    lo, hi = median_ci95(values)
    return {"median": q2, "ci95_lo": lo, "ci95_hi": hi, "q1": q1, "q3": q3,
            "min": min(values), "max": max(values), "n": len(values)}


def format_spread(s: dict[str, float]) -> str:
    """``0.985 (95% CI 0.975-0.994; IQR 0.962-1.004, min-max 0.931-1.052, n=15)``."""
    ci = f"95% CI {s['ci95_lo']:.3f}-{s['ci95_hi']:.3f}; " if "ci95_lo" in s else ""
    return (f"{s['median']:.3f} ({ci}IQR {s['q1']:.3f}-{s['q3']:.3f}, "
            f"min-max {s['min']:.3f}-{s['max']:.3f}, n={s['n']})")


def write_json(path: str, payload: dict[str, Any]) -> None:
    with open(path, "w") as f:
        json.dump(payload, f, indent=2, sort_keys=True)
    print(f"wrote {path}")


def table(rows: list[tuple[str, ...]], header: tuple[str, ...]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = lambda r: "  ".join(str(c).ljust(w) for c, w in zip(r, widths))  # noqa: E731
    return "\n".join([line(header), line(tuple("-" * w for w in widths)), *map(line, rows)])
