"""gp, smart and neftune on a site whose target runs twice per forward (a tuple of
gradients / deltas, one per call): each call is treated alone."""

from __future__ import annotations

import numpy as np

from advgraph._config import make_config


class TupleSite:
    """A numpy site with two calls of different shapes and fixed site gradients."""

    def __init__(self, seed=0):
        rng = np.random.default_rng(seed)
        self.xs = (rng.normal(size=(2, 3, 4)), rng.normal(size=(2, 5, 4)))
        self.grads = (rng.normal(size=(2, 3, 4)), rng.normal(size=(2, 5, 4)))
        self.delta = None
        self.installed = []
        self.penalties = []
        self.joint = []
        self.mask = None

    def _materialise(self):
        if callable(self.delta):
            self.delta = tuple(self.delta(np.zeros_like(x)) for x in self.xs)
            self.installed.append(self.delta)

    def forward_backward(self, closure, *, param_grads, scale=1.0, allow_none=False, keep_grad=True):
        self._materialise()
        closure()
        self.grad = self.grads
        return 0.0

    def site_grad(self):
        return self.grad

    def set_delta(self, delta):
        self.delta = delta
        if not callable(delta):
            self.installed.append(delta)

    def clear(self):
        self.delta = None

    def record(self, result):
        pass

    def penalty_backward(self, closure, penalty):
        self.penalties.append(penalty(self.grads))
        return 0.0

    def forward_only(self, closure, *, teacher=False):
        return closure()

    def update_teacher(self, beta):
        pass

    def joint_backward(self, closure, deltas, objective):
        outs = []
        for delta in deltas:
            self.delta = delta
            self._materialise()
            outs.append(closure())
        self.joint.append([d for d in deltas])
        return objective(outs)

    def token_mask(self, like):
        return self.mask[: like.shape[0], : like.shape[1], None] if self.mask is not None else None


def closure_pair():
    logits = np.array([[0.1, 0.2, 0.3], [0.3, -0.1, 0.0]])
    return 0.5, logits


def test_gp_penalty_sums_every_call():
    site = TupleSite()
    make_config(method="gp", epsilon=0.4).settings.step(site, lambda: 0.0)
    expected = 0.2 * sum(float((g**2).sum()) for g in site.grads)
    np.testing.assert_allclose(site.penalties[0], expected, rtol=1e-12)


def test_smart_normalises_each_call_per_token():
    site = TupleSite(1)
    config = make_config(method="smart", steps=2, alpha=0.3, noise_eps=0.05, smart_mu=0)
    config.settings.step(site, closure_pair)
    start = site.installed[0]
    noise = start
    for step in range(2):
        expected = []
        for n, g in zip(noise, site.grads):
            v = n + 0.3 * g
            expected.append(v / (np.abs(v).max(-1, keepdims=True) + 1e-6))
        noise = tuple(expected)
        for got, want in zip(site.installed[step + 1], noise):
            np.testing.assert_allclose(got, want, rtol=1e-12)
    final = site.joint[0][1]
    for got, want in zip(final, noise):
        np.testing.assert_allclose(got, want, rtol=1e-12)


def test_neftune_scales_each_call_by_its_own_length():
    site = TupleSite(2)
    make_config(method="neftune", neftune_alpha=3.0).settings.step(site, lambda: 0.0)
    for x, d in zip(site.xs, site.installed[0]):
        n = x.shape[1]
        scale = 3.0 / np.sqrt(n * 4)
        assert np.abs(d).max() <= scale + 1e-12
        assert np.abs(d).max() > 0.5 * scale


def test_ops_clip_to_clamps_to_a_symmetric_band():
    from advgraph._ops import ops_for

    x = np.array([-3.0, -0.5, 0.0, 0.5, 2.0])
    bound = np.array([1.0, 1.0, 0.0, 0.25, 5.0])
    expected = np.array([-1.0, -0.5, 0.0, 0.25, 2.0])
    np.testing.assert_array_equal(ops_for(x).clip_to(x, bound), expected)
    torch = __import__("pytest").importorskip("torch")
    t = torch.from_numpy(x)
    np.testing.assert_array_equal(ops_for(t).clip_to(t, torch.from_numpy(bound)).numpy(), expected)
