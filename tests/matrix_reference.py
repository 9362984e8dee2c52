"""Matrix-mode PGD, FreeLB and VAT written out by hand in plain torch (no advgraph).

The model is the one the cross-framework tests share: ids (B, L) -> Embedding
``E`` (V, D) -> mean over L -> Dense (``W`` (D, C), ``b`` (C,)), softmax
cross-entropy. In mode="matrix" delta lives on the rows of ``E`` the batch touched
(``rows = unique(x)``, ascending) and is one array for the whole batch: every norm
and projection is taken over all touched rows together (no per-sample split).

The forward at a perturbed matrix is written functionally, ``E + scatter(rows,
delta)``; the gradient of a pass at the rows is the gradient of its loss with
respect to ``E`` (at the perturbed values), read at ``rows``. Parameter gradients
are those of ``E``, ``W`` and ``b`` summed over the passes each method trains on.

Random draws come in as arguments (``normal``: a standard normal array shaped
(rows, D); ``uniform``: U(0, 1) values, at least rows * D of them), so that a test
can hand the same draws to advgraph (by replacing its draw functions) and to this
reference. Conventions (advgraph/_config.py documents them; they are the
published updates):

- PGD (Madry et al., 2018, as the common PyTorch loop): clean pass (its parameter
  gradients kept for objective "clean+adv"), then ``steps`` times ``delta <-
  Proj_eps(delta + alpha g / ||g||)`` (linf: ``alpha sign(g)``, clip) with g the
  gradient of the last pass (the first from the clean pass), each followed by a
  pass at the new delta; only the last adversarial pass's parameter gradients count.
  ``random_init`` (l2): ``delta_0 = eps * u ** (1 / n) * z / ||z||`` (uniform in the
  ball; z normal, u uniform, n = rows * D), added before the first ascent step.
- FreeLB (Zhu et al., 2020): ``steps`` passes, each backpropagating ``L / steps``
  into the parameters; between passes ``delta <- delta + alpha g / ||g||``,
  projected onto the eps-ball (no projection when eps is None). Random start (l2):
  ``U(-1, 1) * init_mag / sqrt(rows * D)``.
- VAT (Miyato et al., 2018): p = softmax(clean logits) held fixed; d = xi z/||z||;
  ``steps`` power iterations ``d <- xi g / ||g||``, g the gradient of KL(p || p(x +
  d)) (mean over samples) at the rows; ``r_adv = eps g / ||g||``; ``vat_weight *
  KL(p || p(x + r_adv))`` backpropagated; a labeled batch's cross-entropy from the
  clean pass counts too (objective "clean+adv").
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch.nn import functional as F


def _t(a: Any, dtype: torch.dtype) -> torch.Tensor:
    return torch.as_tensor(np.asarray(a)).to(dtype)


class _Model:
    def __init__(self, E, W, b, x, y, dtype):
        self.E = _t(E, dtype).requires_grad_()
        self.W = _t(W, dtype).requires_grad_()
        self.b = _t(b, dtype).requires_grad_()
        self.x = torch.as_tensor(np.asarray(x)).long()
        self.y = torch.as_tensor(np.asarray(y)).long()
        self.rows = torch.unique(self.x)  # ascending
        self.params = [self.E, self.W, self.b]
        self.total = [torch.zeros_like(p) for p in self.params]

    def logits(self, delta: torch.Tensor | None) -> torch.Tensor:
        E = self.E if delta is None else self.E.index_add(0, self.rows, delta)
        return E[self.x].mean(dim=1) @ self.W + self.b

    def ce(self, delta=None) -> torch.Tensor:
        return F.cross_entropy(self.logits(delta), self.y)

    def rows_grad(self, loss: torch.Tensor) -> torch.Tensor:
        (g,) = torch.autograd.grad(loss, [self.E], retain_graph=True)
        return g[self.rows]

    def train_on(self, loss: torch.Tensor) -> None:
        """Add this loss's parameter gradients to the step's total."""
        for t, g in zip(self.total, torch.autograd.grad(loss, self.params)):
            t += g


def _direction(g: torch.Tensor, size: float, norm: str) -> torch.Tensor:
    return size * (g.sign() if norm == "linf" else g / g.norm())


def _project(d: torch.Tensor, eps: float | None, norm: str) -> torch.Tensor:
    if eps is None:
        return d
    if norm == "linf":
        return d.clamp(-eps, eps)
    n = d.norm()
    return d * (eps / n) if n > eps else d


def _kl(log_p: torch.Tensor, logits_q: torch.Tensor) -> torch.Tensor:
    return (log_p.exp() * (log_p - F.log_softmax(logits_q, dim=-1))).sum(-1).mean()


def matrix_step(
    E, W, b, x, y, method: str, *,
    epsilon: float | None = 1.0,
    norm: str = "l2",
    steps: int = 1,
    alpha: float | None = None,
    objective: str = "clean+adv",
    random_init: bool = False,
    init_mag: float = 0.1,
    xi: float = 0.1,
    vat_weight: float = 1.0,
    labeled: bool = True,
    normal=None,
    uniform=None,
    dtype: torch.dtype = torch.float32,
) -> dict[str, np.ndarray]:
    """One matrix-mode step of ``method``; returns the loss advgraph reports
    (``loss``) and the summed parameter gradients ``dE`` (V, D), ``dW``, ``db``."""
    m = _Model(E, W, b, x, y, dtype)
    shape = (m.rows.shape[0], m.E.shape[1])
    n = shape[0] * shape[1]
    if normal is not None:
        normal = _t(normal, dtype).reshape(shape)
    if uniform is not None:
        uniform = _t(uniform, dtype).reshape(-1)

    if method == "pgd":
        clean = m.ce()
        g = m.rows_grad(clean)
        if objective == "clean+adv":
            m.train_on(clean)
        delta = torch.zeros(shape, dtype=dtype)
        if random_init:
            assert norm == "l2"
            delta = epsilon * uniform[0] ** (1.0 / n) * normal / normal.norm()
        for step in range(steps):
            delta = _project(delta + _direction(g, alpha, norm), epsilon, norm).detach()
            loss = m.ce(delta)
            if step == steps - 1:
                m.train_on(loss)
            else:
                g = m.rows_grad(loss)
        reported = clean
    elif method == "freelb":
        delta = torch.zeros(shape, dtype=dtype)
        if random_init:
            delta = (2.0 * uniform[:n].reshape(shape) - 1.0) * init_mag / n**0.5
        reported = None
        for step in range(steps):
            loss = m.ce(delta) / steps
            reported = loss * steps if reported is None else reported
            g = m.rows_grad(loss)
            m.train_on(loss)
            if step < steps - 1:
                delta = _project(delta + _direction(g, alpha, norm), epsilon, norm).detach()
    elif method == "vat":
        clean_logits = m.logits(None)
        log_p = F.log_softmax(clean_logits, dim=-1).detach()
        clean = F.cross_entropy(clean_logits, m.y) if labeled else None
        if clean is not None and objective == "clean+adv":
            m.train_on(clean)
        d = xi * normal / normal.norm()
        for step in range(steps):
            g = m.rows_grad(_kl(log_p, m.logits(d)))
            d = (xi if step < steps - 1 else epsilon) * g / g.norm()
        vat = vat_weight * _kl(log_p, m.logits(d.detach()))
        m.train_on(vat)
        reported = clean if clean is not None else vat / vat_weight
    else:
        raise ValueError(f"no reference for method={method!r}")
    dE, dW, db = (t.detach().numpy().astype(np.float64) for t in m.total)
    return {"loss": float(reported.detach()), "dE": dE, "dW": dW, "db": db}
