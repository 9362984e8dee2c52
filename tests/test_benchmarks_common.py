"""The statistics the benchmark scripts report (benchmarks/_common.py)."""

from __future__ import annotations

import os
import random
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))

from _common import median_ci95, spread  # noqa: E402


def test_median_ci95_covers_the_true_median_about_95_percent_of_the_time():
    """Skewed noise (what a shared machine adds: slow rounds, never fast ones): the
    interval must hold the true median in >= ~95 % of samples, and not in all of
    them (an interval that always covers is too wide to decide anything)."""
    rng = random.Random(0)
    true_median = 1.0 + 0.05 * 0.6931471805599453  # median of 1 + Exp(mean 0.05)
    for n in (15, 60, 100):
        covered = 0
        trials = 2000
        for _ in range(trials):
            values = [1.0 + rng.expovariate(1 / 0.05) for _ in range(n)]
            lo, hi = median_ci95(values)
            covered += lo <= true_median <= hi
        assert 0.93 <= covered / trials <= 0.995, (n, covered / trials)


def test_median_ci95_narrows_with_more_rounds_and_spread_reports_it():
    rng = random.Random(1)
    widths = []
    for n in (15, 60, 240):
        lo, hi = median_ci95([rng.gauss(1.0, 0.05) for _ in range(n)])
        widths.append(hi - lo)
    assert widths[0] > widths[1] > widths[2]
    s = spread([1.0, 2.0, 3.0, 4.0, 5.0])
    assert s["median"] == 3.0 and s["ci95_lo"] <= 3.0 <= s["ci95_hi"] and s["n"] == 5
