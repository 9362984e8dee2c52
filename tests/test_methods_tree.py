"""Methods on a site whose target runs several times per forward (one gradient per call).

A numpy site with a known quadratic loss L = sum_i ||x_i + delta_i - t_i||^2 over two
calls of different shapes (an encoder's and a decoder's lookup): each call's delta must
come from its own gradient with its own per-sample norm, as if the other did not exist.
"""

from __future__ import annotations

import numpy as np
import pytest

from advgraph._config import make_config
from advgraph._delta import DeltaResult
from advgraph.methods._common import tree_map


class TwoCallSite:
    def __init__(self, xs, ts):
        self.xs, self.ts = xs, ts
        self.delta = None
        self.grad = None
        self.passes = []

    def forward_backward(self, closure, *, param_grads, scale=1.0, allow_none=False, keep_grad=True):
        delta = self.delta
        if callable(delta):
            delta = tuple(delta(np.zeros_like(x)) for x in self.xs)
            self.delta = delta
        if delta is None:
            delta = tuple(np.zeros_like(x) for x in self.xs)
        self.passes.append(delta)
        self.grad = tuple(2 * (x + d - t) for x, d, t in zip(self.xs, delta, self.ts))
        return sum(float(((x + d - t) ** 2).sum()) for x, d, t in zip(self.xs, delta, self.ts))

    def site_grad(self):
        grad, self.grad = self.grad, None
        return grad

    def set_delta(self, delta):
        self.delta = delta

    def clear(self):
        self.delta = None

    def record(self, result: DeltaResult) -> None:
        pass


def _site(seed=0):
    rng = np.random.default_rng(seed)
    xs = (rng.normal(size=(2, 3, 4)), rng.normal(size=(2, 5, 4)))
    ts = (rng.normal(size=(2, 3, 4)), rng.normal(size=(2, 5, 4)))
    return TwoCallSite(xs, ts)


def _per_sample_unit(g, size):
    norms = np.sqrt((g**2).sum(axis=(1, 2), keepdims=True))
    return size * g / norms


def test_tree_map_rejects_mismatched_structure():
    with pytest.raises(ValueError, match="different number of times"):
        tree_map(lambda a, b: a + b, (1, 2), (1, 2, 3))


def test_fgm_gives_each_call_its_own_delta():
    site = _site()
    make_config(mode="output", method="fgm", epsilon=0.5).settings.step(site, lambda: None)
    clean, adv = site.passes
    for x, t, d in zip(site.xs, site.ts, adv):
        expected = _per_sample_unit(2 * (x - t), 0.5)
        np.testing.assert_allclose(d, expected, rtol=1e-12)
        np.testing.assert_allclose(np.sqrt((d**2).sum(axis=(1, 2))), 0.5)


def test_pgd_projects_each_call_separately():
    site = _site(1)
    config = make_config(mode="output", method="pgd", epsilon=0.3, steps=3)
    config.settings.step(site, lambda: None)
    assert len(site.passes) == 4
    # Hand-written PGD on each call alone.
    for i, (x, t) in enumerate(zip(site.xs, site.ts)):
        delta = np.zeros_like(x)
        for step in range(3):
            g = 2 * (x + delta - t)
            delta = delta + _per_sample_unit(g, config.alpha)
            norms = np.sqrt((delta**2).sum(axis=(1, 2), keepdims=True))
            delta = delta * np.minimum(1.0, 0.3 / norms)
            np.testing.assert_allclose(site.passes[step + 1][i], delta, rtol=1e-10, atol=1e-12)


def test_freelb_random_start_is_per_call():
    site = _site(2)
    config = make_config(mode="output", method="freelb", epsilon=None, steps=2)
    config.settings.step(site, lambda: None)
    first, second = site.passes
    for x, t, d0, d1 in zip(site.xs, site.ts, first, second):
        assert d0.shape == x.shape
        g = 2 * (x + d0 - t)
        np.testing.assert_allclose(d1, d0 + _per_sample_unit(g, config.alpha), rtol=1e-10)
