"""Adversarial training methods, each written once against the :class:`Site` interface.

An adapter (PyTorch output/matrix, Keras output/matrix) implements :class:`Site`;
every method here then runs on it unchanged. A method performs every
forward/backward pass of one training step and returns the clean loss.

Passes per training step: fgm/fgsm 2, pgd ``steps + 1``, freelb ``steps``,
vat ``1 + steps + 1`` (``steps`` power iterations).
"""

from __future__ import annotations

from typing import Any, Callable, Protocol

from advgraph._config import AdversarialConfig
from advgraph._delta import DeltaResult, compute_delta, project, random_init
from advgraph._errors import received
from advgraph._ops import Ops, ops_for

__all__ = ["Site", "passes", "run_method", "single_delta", "tree_map"]

Array = Any
Closure = Callable[[], Any]
DeltaLike = Any  # an array (or tuple of arrays), or a function (zeros like one call's delta) -> delta


def tree_map(fn: Callable[..., Any], *trees: Any) -> Any:
    """Apply ``fn`` leaf by leaf to arrays or (nested) tuples of arrays of one structure.

    A site whose target runs several times in one forward (an encoder-decoder's
    shared embedding, a bi-encoder's encoder) hands out one gradient per call, as a
    tuple; the methods treat each call's array alone (its own norm and projection).

    Example:
        >>> tree_map(lambda a, b: a + b, (1, (2, 3)), (10, (20, 30)))
        (11, (22, 33))
    """
    first = trees[0]
    if isinstance(first, tuple):
        if any(not isinstance(t, tuple) or len(t) != len(first) for t in trees[1:]):
            raise ValueError(
                "advgraph internal error: arrays of different structure (the target ran a "
                f"different number of times in two passes of one step). {received(structures=[_structure(t) for t in trees])}"
            )
        return tuple(tree_map(fn, *parts) for parts in zip(*trees))
    return fn(*trees)


def _structure(tree: Any) -> Any:
    return tuple(_structure(t) for t in tree) if isinstance(tree, tuple) else "array"


class Site(Protocol):
    """The perturbation site of one wrapped model, as the methods see it.

    The site is the embedding's output (mode ``"output"``; delta shape ``(b, n, d)``)
    or the rows of the embedding matrix the batch touched (mode ``"matrix"``;
    delta shape ``(rows, d)``).
    """

    def forward_backward(
        self,
        closure: Closure,
        *,
        param_grads: bool,
        scale: float = 1.0,
        allow_none: bool = False,
        keep_grad: bool = True,
    ) -> Any:
        """Run ``closure`` (a forward returning a scalar loss) under the current delta.

        Backpropagates ``loss * scale``. With ``param_grads=True`` the parameter
        gradients accumulate (PyTorch: into ``.grad``); with ``False`` only the
        gradient at the site is computed. The gradient at the site of *this* pass is
        kept for :meth:`site_grad`. Returns the loss, detached. With
        ``allow_none=True`` a closure may return ``None``: the forward runs, nothing
        is backpropagated, and ``None`` is returned. ``keep_grad=False``: the method
        will not read the site's gradient of this pass, so it is not kept.
        """

    def site_grad(self) -> Array:
        """Gradient of the last pass's loss w.r.t. the site (shape of delta).

        When the target ran several times in the pass (output mode), a tuple with one
        array per call, in call order. Each gradient is read once: reading releases it."""

    def set_delta(self, delta: DeltaLike) -> None:
        """Install delta at the site, replacing any delta installed before.

        ``delta`` is an array (a tuple of arrays, one per call of the target, when
        :meth:`site_grad` gave a tuple), or a function that receives zeros shaped like
        one call's delta (known only once the next forward reaches the site) and
        returns that call's delta; the site calls it once per call.
        """

    def clear(self) -> None:
        """Remove the delta; parameters are restored bit for bit."""

    def record(self, result: DeltaResult) -> None:
        """Count skipped (zero / non-finite) gradients of a delta computation."""


def _direction(site: Site, grad: Array, size: float, config: AdversarialConfig) -> Array:
    """``size * g / ||g||`` (l2) or ``size * sign(g)`` (linf), skips recorded.

    A tuple of gradients (one per call of the target) gives a tuple of deltas."""

    def one(g: Array) -> Array:
        result = compute_delta(g, size, norm=config.norm, per_sample=config.per_sample)
        site.record(result)
        return result.delta

    return tree_map(one, grad)


def _add(a: Array, b: Array) -> Array:
    return tree_map(lambda x, y: x + y, a, b)


def _project(delta: Array, eps: float, config: AdversarialConfig) -> Array:
    return tree_map(
        lambda d: project(d, eps, norm=config.norm, per_sample=config.per_sample), delta
    )


def single_delta(site: Site, config: AdversarialConfig) -> Array:
    """The FGM/FGSM delta from the site's last gradient (for ``perturbed()``)."""
    return _direction(site, site.site_grad(), config.epsilon, config)


def fgm_step(site: Site, closure: Closure, config: AdversarialConfig) -> Any:
    """FGM (l2) / FGSM (linf): 2 forward/backward passes.

    Goodfellow et al., "Explaining and Harnessing Adversarial Examples", ICLR 2015
    (FGSM); Miyato et al., "Adversarial Training Methods for Semi-Supervised Text
    Classification", ICLR 2017 (FGM on embeddings).

    1. Clean pass: L(x); the gradient g at the site (and, for
       ``objective="clean+adv"``, the parameter gradients).
    2. delta = epsilon * g / ||g|| (l2) or epsilon * sign(g) (linf).
    3. Adversarial pass with delta installed; parameter gradients of L(x + delta)
       accumulate; delta is removed afterwards, also on error.
    """
    clean_loss = site.forward_backward(closure, param_grads=config.objective == "clean+adv")
    # No local reference to delta: once installed, only the site holds what it needs.
    site.set_delta(_direction(site, site.site_grad(), config.epsilon, config))
    try:
        site.forward_backward(closure, param_grads=True, keep_grad=False)
    finally:
        site.clear()
    return clean_loss


def pgd_step(site: Site, closure: Closure, config: AdversarialConfig) -> Any:
    """PGD-K: ``steps + 1`` passes (Madry et al., "Towards Deep Learning Models
    Resistant to Adversarial Attacks", ICLR 2018).

    Clean pass, then ``steps`` ascent steps ``delta <- Proj_eps(delta + alpha *
    g / ||g||)`` (linf: ``alpha * sign(g)``), each followed by a pass at the new
    delta. As in the common PyTorch PGD loop, the parameter gradients come from
    the clean pass (``objective="clean+adv"``) plus the *last* adversarial pass
    only: the intermediate passes compute the gradient at the site alone, so
    nothing of them reaches the parameters' gradients (and they skip the weight
    gradients' cost). ``random_init`` adds a uniform random start inside the
    ball before the first ascent step, whose direction comes from the clean
    pass (so the pass count stays ``steps + 1``).
    """
    clean_loss = site.forward_backward(closure, param_grads=config.objective == "clean+adv")
    grad = site.site_grad()
    eps = config.epsilon
    delta = None
    if config.random_init:
        delta = tree_map(
            lambda g: random_init(g, eps, norm=config.norm, per_sample=config.per_sample), grad
        )
    try:
        for step in range(config.steps):
            ascent = _direction(site, grad, config.alpha, config)
            delta = ascent if delta is None else _add(delta, ascent)
            delta = _project(delta, eps, config)
            site.set_delta(delta)
            last = step == config.steps - 1
            site.forward_backward(closure, param_grads=last, keep_grad=not last)
            if not last:
                grad = site.site_grad()
    finally:
        site.clear()
    return clean_loss


def _freelb_init(like: Array, config: AdversarialConfig) -> Array:
    """FreeLB's random start: U(-1, 1) * init_mag / sqrt(entries per sample) for l2
    (the reference normalises by sequence length x dim), U(-init_mag, init_mag) for linf."""
    ops = ops_for(like)
    if config.norm == "linf":
        return ops.cast(ops.uniform_like(like, -config.init_mag, config.init_mag), ops.dtype(like))
    axes = tuple(range(1, ops.ndim(like))) if config.per_sample else tuple(range(ops.ndim(like)))
    count = ops.sum(ops.widen(ops.zeros_like(like)) + 1.0, axes)
    noise = ops.uniform_like(like, -1.0, 1.0) * (config.init_mag / ops.sqrt(count))
    return ops.cast(noise, ops.dtype(like))


def freelb_step(site: Site, closure: Closure, config: AdversarialConfig) -> Any:
    """FreeLB-K: exactly ``steps`` passes (Zhu et al., "FreeLB: Enhanced Adversarial
    Training for Natural Language Understanding", ICLR 2020).

    delta starts at FreeLB's random start (``random_init``, scaled by ``init_mag``)
    or 0. Each pass t backpropagates ``L(x + delta) / steps``: the parameter
    gradients of all passes accumulate ("free" training). After each pass but the
    last, ``delta <- delta + alpha * g / ||g||`` and, when ``epsilon`` is set, is
    projected onto the epsilon-ball (FreeLB's max norm; ``epsilon=None``:
    unbounded). Returns the loss of the first pass (the clean loss when there is
    no random start).
    """
    scale = 1.0 / config.steps
    first_loss = None
    box: dict[str, Array] = {}
    starts: list[Array] = []  # the random start of each call of the target, in call order
    if config.random_init:

        def start(like: Array) -> Array:
            starts.append(_freelb_init(like, config))
            return starts[-1]

        site.set_delta(start)
    try:
        for step in range(config.steps):
            last = step == config.steps - 1
            loss = site.forward_backward(closure, param_grads=True, scale=scale, keep_grad=not last)
            if first_loss is None:
                first_loss = loss
            if last:
                break
            grad = site.site_grad()
            if starts and "delta" not in box:
                # One start per call of the target in the first pass (the last calls).
                box["delta"] = tuple(starts[-len(grad):]) if isinstance(grad, tuple) else starts[-1]
            ascent = _direction(site, grad, config.alpha, config)
            delta = _add(box["delta"], ascent) if "delta" in box else ascent
            if config.epsilon is not None:
                delta = _project(delta, config.epsilon, config)
            box["delta"] = delta
            site.set_delta(delta)
    finally:
        site.clear()
    return first_loss


def _split_vat_output(out: Any) -> tuple[Any, Any]:
    if isinstance(out, tuple):
        if len(out) != 2:
            raise TypeError(
                "method='vat': the closure returns `logits` (unlabeled batch) or "
                f"`(loss, logits)` (labeled batch). {received(tuple_length=len(out))}"
            )
        return out
    if isinstance(out, (list, dict)) or out is None or not hasattr(out, "shape"):
        raise TypeError(
            "method='vat': the closure returns `logits` (unlabeled batch) or "
            f"`(loss, logits)` (labeled batch). {received(closure_returned=type(out).__name__)}"
        )
    return None, out


def _log_softmax(ops: Ops, logits: Array) -> Array:
    axes = (ops.ndim(logits) - 1,)
    z = ops.widen(logits)
    shifted = z - ops.stop_gradient(ops.amax(z, axes))
    return shifted - ops.log(ops.sum(ops.exp(shifted), axes))


def _kl_from_log_probs(ops: Ops, log_p: Array, logits_q: Array) -> Array:
    """mean over samples (and positions) of KL(p || softmax(logits_q))."""
    log_q = _log_softmax(ops, logits_q)
    last = (ops.ndim(log_q) - 1,)
    per_row = ops.sum(ops.exp(log_p) * (log_p - log_q), last)
    every = tuple(range(ops.ndim(per_row)))
    mean = ops.sum(per_row, every) / ops.sum(ops.zeros_like(per_row) + 1.0, every)
    return ops.reshape(mean, ())


def vat_step(site: Site, closure: Closure, config: AdversarialConfig) -> Any:
    """Virtual adversarial training: ``1 + steps + 1`` passes (Miyato et al.,
    "Virtual Adversarial Training: A Regularization Method for Supervised and
    Semi-Supervised Learning", TPAMI 2018; on text embeddings: Miyato et al., ICLR 2017).

    Label-free. The closure returns ``logits`` for an unlabeled batch, or
    ``(loss, logits)`` for a labeled one (its supervised loss is backpropagated in
    the clean pass). p = softmax(logits) of the clean pass is held fixed. From a
    random unit direction d, ``steps`` power iterations ``d <- xi * g / ||g||``
    with g the gradient of KL(p || p(x + d)); then ``r_adv = epsilon * g / ||g||``
    and ``vat_weight * KL(p || p(x + r_adv))`` is backpropagated into the
    parameters. Returns the supervised loss, or for an unlabeled batch the VAT loss.
    """
    box: dict[str, Any] = {}

    def clean() -> Any:
        loss, logits = _split_vat_output(closure())
        ops = ops_for(logits)
        box["ops"] = ops
        box["log_p"] = ops.stop_gradient(_log_softmax(ops, logits))
        return loss

    def kl() -> Any:
        _, logits = _split_vat_output(closure())
        return _kl_from_log_probs(box["ops"], box["log_p"], logits)

    clean_loss = site.forward_backward(
        clean, param_grads=config.objective == "clean+adv", allow_none=True
    )

    def unit(like: Array) -> Array:
        ops = ops_for(like)
        noise = ops.normal_like(like)
        return ops.cast(
            compute_delta(noise, config.xi, per_sample=config.per_sample).delta, ops.dtype(like)
        )

    site.set_delta(unit)
    try:
        grad = None
        for step in range(config.steps):
            site.forward_backward(kl, param_grads=False)
            grad = site.site_grad()
            if step < config.steps - 1:
                site.set_delta(_direction(site, grad, config.xi, config))
        site.set_delta(_direction(site, grad, config.epsilon, config))
        vat_loss = site.forward_backward(
            kl, param_grads=True, scale=config.vat_weight, keep_grad=False
        )
    finally:
        site.clear()
    return clean_loss if clean_loss is not None else vat_loss


_STEPS: dict[str, Callable[[Site, Closure, AdversarialConfig], Any]] = {
    "fgm": fgm_step,
    "fgsm": fgm_step,
    "pgd": pgd_step,
    "freelb": freelb_step,
    "vat": vat_step,
}


def passes(config: AdversarialConfig) -> int:
    """Forward/backward passes one training step of ``config.method`` runs.

    Adapters use it to treat the last pass specially (e.g. DDP's gradient sync).
    """
    if config.method in ("fgm", "fgsm"):
        return 2
    if config.method == "pgd":
        return config.steps + 1
    if config.method == "freelb":
        return config.steps
    return config.steps + 2  # vat: clean pass, power iterations, adversarial pass


def run_method(site: Site, closure: Closure, config: AdversarialConfig) -> Any:
    """Run every pass of ``config.method`` on ``site``; return the clean loss."""
    return _STEPS[config.method](site, closure, config)
