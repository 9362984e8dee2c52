"""The statistics the benchmark scripts report (benchmarks/_common.py)."""

from __future__ import annotations

import math
import os
import random
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))

from _common import median_ci95, spread  # noqa: E402


def coverage(n: int) -> float:
    """The exact probability that median_ci95's interval holds the true median of
    any continuous distribution: the number B of samples below the median is
    binomial(n, 1/2), and (x_(j), x_(k)) (0-based) holds it iff j < B <= k."""
    ranks = median_ci95([float(i) for i in range(n)])
    j, k = int(ranks[0]), int(ranks[1])
    return sum(math.comb(n, b) for b in range(j + 1, k + 1)) / 2**n


def test_median_ci95_covers_the_median_with_probability_at_least_95_percent():
    for n in range(6, 501):
        assert coverage(n) >= 0.95, n
    # Not wider than it needs to be: the textbook ranks at n = 100 are the 40th and
    # 61st values (1-based), coverage 0.965; one rank narrower on each side is < 0.95.
    assert median_ci95([float(i) for i in range(100)]) == (39.0, 60.0)
    assert sum(math.comb(100, b) for b in range(41, 60)) / 2**100 < 0.95


def test_median_ci95_has_no_interval_below_six_rounds():
    assert median_ci95([1.0, 2.0, 3.0, 4.0, 5.0]) == (-math.inf, math.inf)


def test_median_ci95_narrows_with_more_rounds_and_spread_reports_it():
    rng = random.Random(1)
    widths = []
    for n in (15, 60, 240):
        lo, hi = median_ci95([rng.gauss(1.0, 0.05) for _ in range(n)])
        widths.append(hi - lo)
    assert widths[0] > widths[1] > widths[2]
    values = [rng.gauss(1.0, 0.05) for _ in range(40)]
    s = spread(values)
    assert (s["ci95_lo"], s["ci95_hi"]) == median_ci95(values)
    assert s["ci95_lo"] < s["median"] < s["ci95_hi"] and s["n"] == 40
