"""Adversarial training methods, each written once against the :class:`Site` interface.

An adapter (PyTorch output/matrix, Keras output/matrix) implements :class:`Site`;
every method here then runs on it unchanged. A method performs every
forward/backward pass of one training step and returns the clean loss.

Passes per training step: fgm/fgsm 2, pgd ``steps + 1``, freelb ``steps``,
vat ``1 + steps + 1`` (``steps`` power iterations), gp 1 (one forward, a double
backward), r3f 1 (two forwards, one backward through both), smart ``steps + 1``
(plus one or two forwards without backward: the clean logits and the teacher),
neftune 1, awp 2. :func:`passes` counts the calls that backpropagate.
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

    # -- calls added for gp, r3f, smart, neftune and awp --------------------------
    # Each is one self-contained pass, so that a functional backend (JAX) runs it as
    # one traced function; none keeps a graph alive between calls.

    def penalty_backward(self, closure: Closure, penalty: Callable[[Array], Array]) -> Any:
        """gp: a forward, then a backward of ``loss + penalty(g)`` into the parameters.

        ``g`` is the gradient of the closure's loss at the site (the tree
        :meth:`site_grad` would give), kept differentiable (PyTorch:
        ``create_graph=True``; TF: a nested tape; JAX: a grad inside the grad), so
        the penalty's own gradient reaches the parameters (a double backward).
        Returns the loss, detached. Why: a penalty on the gradient cannot be built
        from passes that each end in a backward.
        """

    def joint_backward(
        self, closure: Closure, deltas: Any, objective: Callable[[list[Any]], Array]
    ) -> Any:
        """r3f / smart: several forwards, one backward through all of them.

        Runs ``closure`` once per entry of ``deltas`` (``None``: no delta; else an
        array or a function as :meth:`set_delta` takes), in order, each under its
        own delta, keeping every output differentiable; then backpropagates
        ``objective(outputs)`` (a scalar) into the parameters and removes the
        delta. Returns the objective, detached. Why: R3F's and SMART's regularisers
        take gradients through the clean and the perturbed forward at once.
        """

    def forward_only(self, closure: Closure, *, teacher: bool = False) -> Any:
        """A forward without backward (no gradient recorded); the closure's output,
        detached. ``teacher=True``: with the teacher's parameter values (see
        :meth:`update_teacher`) instead of the model's, the model untouched (PyTorch:
        ``torch.func.functional_call``). Why: SMART's fixed clean distribution for
        its ascent and its teacher's outputs need no backward.
        """

    def update_teacher(self, beta: float) -> None:
        """SMART's momentum teacher: ``theta~ <- beta * theta~ + (1 - beta) * theta``
        over the trainable parameters; the first call sets ``theta~ <- theta``.
        The teacher lives with the wrapped model, outside its parameters. It moves
        once per optimizer step: a call when the parameters did not change since the
        last one (a further micro-batch of gradient accumulation) leaves it alone."""

    def token_mask(self, like: Array) -> Array | None:
        """Inside a delta function: 1.0 for real tokens, 0.0 for padding, shaped
        like ``like`` with a last axis of 1, for the forward in progress; ``None``
        when the site cannot tell (then every position counts as a token). Why:
        NEFTune scales its noise by each sequence's real length."""

    def site_values(self) -> Array:
        """AWP (a site made of weights): the current values at the site, the same
        tree as :meth:`site_grad` (one array per perturbed parameter). Why: AWP's
        delta is relative to the weights (``||w||``, ``|w|``)."""


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


_LEGACY = ("fgm", "fgsm", "pgd", "freelb", "vat")


def single_delta(site: Site, config: AdversarialConfig) -> Array:
    """The FGM/FGSM delta from the site's last gradient (for ``perturbed()``)."""
    if config.method not in _LEGACY:
        raise ValueError(
            "perturbed() is the hand-written FGM loop (a delta of size epsilon from the "
            f"last backward); method={config.method!r} runs its passes through "
            f"adversarial_step() only. {received(method=config.method)}"
        )
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


# --------------------------------------------------------------------------- new methods


def _split_pair(out: Any, method: str) -> tuple[Any, Any]:
    if not (isinstance(out, tuple) and len(out) == 2 and hasattr(out[1], "shape")):
        raise TypeError(
            f"method={method!r}: the closure returns `(loss, logits)` (its regulariser "
            f"compares output distributions). {received(closure_returned=_describe_out(out))}"
        )
    return out


def _describe_out(out: Any) -> str:
    if isinstance(out, tuple):
        return f"tuple of {len(out)}"
    return type(out).__name__


def _count(ops: Ops, x: Array, axes: tuple[int, ...]) -> Array:
    return ops.sum(ops.widen(ops.zeros_like(x)) + 1.0, axes)


def _kl(ops: Ops, log_p: Array, log_q: Array) -> Array:
    """sum over every entry of p * (log p - log q)."""
    every = tuple(range(ops.ndim(log_p)))
    return ops.reshape(ops.sum(ops.exp(log_p) * (log_p - log_q), every), ())


def _symmetric_kl(ops: Ops, a: Array, b: Array, *, detach_targets: bool) -> Array:
    """``(KL(p_a || p_b) + KL(p_b || p_a)) / batch``, summed over classes (and positions).

    ``detach_targets=False``: gradients through both distributions of both terms
    (fairseq's R3F). ``True``: each KL's first argument is held fixed (mt-dnn's
    ``SymKlCriterion``: ``kl_div(log p_b, p_a.detach()) + kl_div(log p_a, p_b.detach())``).
    """
    log_a, log_b = _log_softmax(ops, a), _log_softmax(ops, b)
    if detach_targets:
        forward = _kl(ops, ops.stop_gradient(log_a), log_b)
        backward = _kl(ops, ops.stop_gradient(log_b), log_a)
    else:
        forward, backward = _kl(ops, log_a, log_b), _kl(ops, log_b, log_a)
    every = tuple(range(ops.ndim(a)))
    rest = tuple(range(1, ops.ndim(a)))
    batch = ops.reshape(_count(ops, a, every) / _count(ops, a, rest)[:1], ())
    return (forward + backward) / batch


def gp_step(site: Site, closure: Closure, config: AdversarialConfig) -> Any:
    """Gradient penalty: 1 pass (a forward and a double backward).

    ``loss + epsilon / 2 * ||dL/de||^2`` with ``e`` the site (output mode: the
    embedding's activations; matrix mode: the rows the batch touched), summed
    over every entry (and every call of the target). As bert4torch's adversarial
    callback and the Keras recipe of Su Jianlin ("gradient penalty", 2020).
    """
    half = config.epsilon / 2.0  # type: ignore[operator]

    def penalty(grad: Array) -> Array:
        total = None
        for g in _leaves(grad):
            ops = ops_for(g)
            w = ops.widen(g)
            part = ops.reshape(ops.sum(w * w, tuple(range(ops.ndim(w)))), ())
            total = part if total is None else total + part
        return total * half

    return site.penalty_backward(closure, penalty)


def _leaves(tree: Any) -> list[Any]:
    if isinstance(tree, tuple):
        return [leaf for part in tree for leaf in _leaves(part)]
    return [tree]


def _noise(config: AdversarialConfig, kind: str) -> Callable[[Array], Array]:
    def draw(like: Array) -> Array:
        ops = ops_for(like)
        if kind == "uniform":
            z = ops.uniform_like(like, -config.noise_eps, config.noise_eps)
        else:
            z = ops.normal_like(like) * config.noise_eps
        return ops.cast(z, ops.dtype(like))

    return draw


def r3f_step(site: Site, closure: Closure, config: AdversarialConfig) -> Any:
    """R3F: 1 pass of two forwards (Aghajanyan et al., "Better Fine-Tuning by
    Reducing Representational Collapse", ICLR 2021; fairseq
    ``examples/rxf/rxf_src/sentence_prediction_r3f.py``).

    The closure returns ``(loss, logits)``. Clean forward, and a forward at
    ``e + z`` with ``z ~ U(-noise_eps, noise_eps)`` (or ``N(0, noise_eps^2)``);
    one backward of ``loss + r3f_lambda * (KL(p || p_z) + KL(p_z || p)) / batch``
    (KL summed over classes) with gradients through both forwards. No ascent
    step. Returns the clean loss.
    """
    box: dict[str, Any] = {}

    def objective(outs: list[Any]) -> Array:
        loss, logits = _split_pair(outs[0], "r3f")
        _, noised = _split_pair(outs[1], "r3f")
        ops = ops_for(logits)
        box["loss"] = ops.stop_gradient(loss)
        return loss + config.r3f_lambda * _symmetric_kl(ops, noised, logits, detach_targets=False)

    site.joint_backward(closure, [None, _noise(config, config.noise_type)], objective)
    return box["loss"]


def _smart_normalise(site: Site, noise: Array, grad: Array, config: AdversarialConfig) -> Array:
    """``v / (max|v| + 1e-6)`` per token (``norm="l2"``: ``v / (||v|| + 1e-6)``),
    ``v = noise + alpha * g`` over the last axis, as mt-dnn's ``_norm_grad``. A
    zero or non-finite gradient gives delta = 0 (counted)."""
    ops = ops_for(grad)
    g = ops.widen(grad)
    every = tuple(range(ops.ndim(g)))
    finite = ops.reshape(ops.amax(ops.abs(g), every), ())  # NaN/inf propagate
    nonfinite = ops.logical_not(ops.isfinite(finite))
    zero = ops.logical_and(ops.logical_not(nonfinite), finite == 0)
    site.record(DeltaResult(grad, nonfinite, zero))
    v = ops.widen(noise) + config.alpha * ops.where(ops.isfinite(g), g, ops.zeros_like(g))
    last = (ops.ndim(v) - 1,)
    if config.norm == "linf":
        size = ops.amax(ops.abs(v), last)
    else:
        size = ops.sqrt(ops.sum(v * v, last))
    out = v / (size + 1e-6)
    ok = ops.logical_and(ops.logical_not(nonfinite), ops.logical_not(zero))
    out = ops.where(ok, out, ops.zeros_like(out))
    return ops.cast(out, ops.dtype(grad))


def smart_step(site: Site, closure: Closure, config: AdversarialConfig) -> Any:
    """SMART: ``steps + 1`` passes plus forwards without backward (Jiang et al.,
    "SMART: Robust and Efficient Fine-Tuning for Pre-trained Natural Language
    Models through Principled Regularized Optimization", ACL 2020; official code
    ``namisan/mt-dnn``, ``mt_dnn/perturbation.py``).

    The closure returns ``(loss, logits)``.

    1. Teacher (``smart_mu > 0``): ``theta~ <- beta theta~ + (1 - beta) theta`` (the
       first step copies ``theta``), then a forward with ``theta~`` (no backward).
    2. A forward without backward: the clean logits, held fixed for the ascent.
    3. noise ``N(0, noise_eps^2)``; ``steps`` times: a pass on the symmetric KL
       between the fixed clean and the noisy distribution, gradient ``g`` at the
       site, ``noise <- (noise + alpha g) / (max|noise + alpha g| + 1e-6)`` per
       token (mt-dnn's inf-norm normalisation; ``norm="l2"``: the l2 norm).
    4. One backward through a clean and a noisy forward of
       ``loss + smart_lambda * SymKL(clean, noisy) + smart_mu * SymKL(clean, teacher)``
       (mt-dnn's ``SymKlCriterion``: each KL's target held fixed; the teacher is
       constant). Returns the clean loss.
    """
    teacher = None
    if config.smart_mu > 0:
        site.update_teacher(config.smart_beta)
        _, teacher = _split_pair(site.forward_only(closure, teacher=True), "smart")
    _, fixed = _split_pair(site.forward_only(closure), "smart")
    ops = ops_for(fixed)
    box: dict[str, Any] = {}
    starts: list[Array] = []

    def noisy_kl() -> Array:
        _, logits = _split_pair(closure(), "smart")
        return _symmetric_kl(ops, fixed, logits, detach_targets=False)

    def start(like: Array) -> Array:
        starts.append(_noise(config, "normal")(like))
        return starts[-1]

    site.set_delta(start)
    try:
        for _ in range(config.steps):
            site.forward_backward(noisy_kl, param_grads=False)
            grad = site.site_grad()
            if "noise" not in box:
                box["noise"] = tuple(starts[-len(grad):]) if isinstance(grad, tuple) else starts[-1]
            box["noise"] = tree_map(
                lambda n, g: _smart_normalise(site, n, g, config), box["noise"], grad
            )
            site.set_delta(box["noise"])
    finally:
        site.clear()

    def objective(outs: list[Any]) -> Array:
        loss, clean = _split_pair(outs[0], "smart")
        _, noisy = _split_pair(outs[1], "smart")
        box["loss"] = ops.stop_gradient(loss)
        total = loss + config.smart_lambda * _symmetric_kl(ops, clean, noisy, detach_targets=True)
        if teacher is not None:
            total = total + config.smart_mu * _symmetric_kl(ops, clean, teacher, detach_targets=False)
        return total

    site.joint_backward(closure, [None, box["noise"]], objective)
    return box["loss"]


def neftune_step(site: Site, closure: Closure, config: AdversarialConfig) -> Any:
    """NEFTune: 1 pass (Jain et al., "NEFTune: Noisy Embeddings Improve Instruction
    Finetuning", 2023).

    The forward runs with ``U(-1, 1) * neftune_alpha / sqrt(L_i * d)`` added to the
    embedding's output, ``L_i`` the number of real tokens of sequence ``i`` and
    ``d`` the embedding width; padding positions get no noise
    (:meth:`Site.token_mask`; without a mask every position counts, as in
    HuggingFace's hook). Returns the loss of that forward.
    """

    def noise(like: Array) -> Array:
        ops = ops_for(like)
        mask = site.token_mask(like)
        nd = ops.ndim(like)
        dim = _count(ops, like, (nd - 1,))  # d at every position
        if mask is None:
            mask = ops.widen(ops.zeros_like(like))[..., :1] + 1.0
        mask = ops.widen(ops.cast(mask, ops.dtype(ops.widen(like))))
        length = ops.sum(mask, tuple(range(1, nd - 1)))  # real tokens per sequence
        length = ops.where(length > 0, length, length + 1.0)
        scale = config.neftune_alpha / ops.sqrt(length * dim)
        out = ops.uniform_like(like, -1.0, 1.0) * scale * mask
        return ops.cast(out, ops.dtype(like))

    site.set_delta(noise)
    try:
        return site.forward_backward(closure, param_grads=True, keep_grad=False)
    finally:
        site.clear()


def _awp_delta(site: Site, grad: Array, weight: Array, config: AdversarialConfig) -> Array:
    ops = ops_for(grad)
    unit = compute_delta(grad, 1.0, norm="l2", per_sample=False)
    site.record(unit)
    w = ops.widen(weight)
    norm_w = ops.sqrt(ops.sum(w * w, tuple(range(ops.ndim(w)))))
    delta = ops.widen(unit.delta) * (config.adv_lr * norm_w)
    return ops.cast(ops.clip_to(delta, ops.abs(w) * config.adv_eps), ops.dtype(weight))


def awp_step(site: Site, closure: Closure, config: AdversarialConfig) -> Any:
    """AWP: 2 passes (Wu et al., "Adversarial Weight Perturbation Helps Robust
    Generalization", NeurIPS 2020; the one-step form of Kaggle NLP solutions).

    The site is a set of weights. Clean pass: ``g`` per parameter (and, for
    ``objective="clean+adv"``, the parameter gradients). Then per parameter
    ``delta_w = adv_lr * ||w|| * g / ||g||``, clamped to ``|delta_w| <= adv_eps *
    |w|`` elementwise; one pass at ``w + delta_w`` accumulates the parameter
    gradients; the weights are restored bit for bit.
    """
    clean_loss = site.forward_backward(closure, param_grads=config.objective == "clean+adv")
    grad = site.site_grad()
    weights = site.site_values()
    site.set_delta(tree_map(lambda g, w: _awp_delta(site, g, w, config), grad, weights))
    try:
        site.forward_backward(closure, param_grads=True, keep_grad=False)
    finally:
        site.clear()
    return clean_loss


_STEPS: dict[str, Callable[[Site, Closure, AdversarialConfig], Any]] = {
    "fgm": fgm_step,
    "fgsm": fgm_step,
    "pgd": pgd_step,
    "freelb": freelb_step,
    "vat": vat_step,
    "gp": gp_step,
    "r3f": r3f_step,
    "smart": smart_step,
    "neftune": neftune_step,
    "awp": awp_step,
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
    if config.method in ("gp", "r3f", "neftune"):
        return 1
    if config.method == "smart":
        return config.steps + 1  # ascent passes, the joint pass
    if config.method == "awp":
        return 2
    return config.steps + 2  # vat: clean pass, power iterations, adversarial pass


def run_method(site: Site, closure: Closure, config: AdversarialConfig) -> Any:
    """Run every pass of ``config.method`` on ``site``; return the clean loss."""
    return _STEPS[config.method](site, closure, config)
