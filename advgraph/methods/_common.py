"""Math shared by several methods, written once over any array type (via ``advgraph._ops``).

The methods reach the core (``compute_delta``, ``project``, ``random_init``,
``ops_for``) through this module's attributes: one seam where a test can spy on
or fault every computation of every method."""

from __future__ import annotations

from typing import Any, Callable

from advgraph._delta import compute_delta, project, random_init
from advgraph._errors import received
from advgraph._ops import Ops, ops_for

from ._site import Site

__all__ = [
    "add",
    "compute_delta",
    "ops_for",
    "project",
    "random_init",
    "count",
    "describe",
    "direction",
    "kl_from_log_probs",
    "last_calls",
    "leaves",
    "log_softmax",
    "noise",
    "project_tree",
    "split_pair",
    "symmetric_kl",
    "tree_map",
]

Array = Any


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


def leaves(tree: Any) -> list[Any]:
    if isinstance(tree, tuple):
        return [leaf for part in tree for leaf in leaves(part)]
    return [tree]


def last_calls(starts: list[Array], grad: Any) -> Any:
    """The delta-function draws of the last pass, in the structure of ``grad``."""
    return tuple(starts[-len(grad):]) if isinstance(grad, tuple) else starts[-1]


def direction(site: Site, grad: Any, size: Any, norm: str, per_sample: bool) -> Any:
    """``size * g / ||g||`` (l2) or ``size * sign(g)`` (linf) per call, skips recorded."""

    def one(g: Array) -> Array:
        result = compute_delta(g, size, norm=norm, per_sample=per_sample)
        site.record(result)
        return result.delta

    return tree_map(one, grad)


def add(a: Any, b: Any) -> Any:
    return tree_map(lambda x, y: x + y, a, b)


def project_tree(delta: Any, eps: Any, norm: str, per_sample: bool) -> Any:
    return tree_map(lambda d: project(d, eps, norm=norm, per_sample=per_sample), delta)


def count(ops: Ops, x: Array, axes: tuple[int, ...]) -> Array:
    return ops.sum(ops.widen(ops.zeros_like(x)) + 1.0, axes)


def log_softmax(ops: Ops, logits: Array) -> Array:
    axes = (ops.ndim(logits) - 1,)
    z = ops.widen(logits)
    shifted = z - ops.stop_gradient(ops.amax(z, axes))
    return shifted - ops.log(ops.sum(ops.exp(shifted), axes))


def kl_from_log_probs(ops: Ops, log_p: Array, logits_q: Array) -> Array:
    """mean over samples (and positions) of KL(p || softmax(logits_q))."""
    log_q = log_softmax(ops, logits_q)
    last = (ops.ndim(log_q) - 1,)
    per_row = ops.sum(ops.exp(log_p) * (log_p - log_q), last)
    every = tuple(range(ops.ndim(per_row)))
    mean = ops.sum(per_row, every) / ops.sum(ops.zeros_like(per_row) + 1.0, every)
    return ops.reshape(mean, ())


def _kl(ops: Ops, log_p: Array, log_q: Array) -> Array:
    """sum over every entry of p * (log p - log q)."""
    every = tuple(range(ops.ndim(log_p)))
    return ops.reshape(ops.sum(ops.exp(log_p) * (log_p - log_q), every), ())


def symmetric_kl(ops: Ops, a: Array, b: Array, *, detach_targets: bool) -> Array:
    """``(KL(p_a || p_b) + KL(p_b || p_a)) / batch``, summed over classes (and positions).

    ``detach_targets=False``: gradients through both distributions of both terms
    (fairseq's R3F). ``True``: each KL's first argument is held fixed (mt-dnn's
    ``SymKlCriterion``: ``kl_div(log p_b, p_a.detach()) + kl_div(log p_a, p_b.detach())``).
    """
    log_a, log_b = log_softmax(ops, a), log_softmax(ops, b)
    if detach_targets:
        forward = _kl(ops, ops.stop_gradient(log_a), log_b)
        backward = _kl(ops, ops.stop_gradient(log_b), log_a)
    else:
        forward, backward = _kl(ops, log_a, log_b), _kl(ops, log_b, log_a)
    every = tuple(range(ops.ndim(a)))
    rest = tuple(range(1, ops.ndim(a)))
    batch = ops.reshape(count(ops, a, every) / count(ops, a, rest)[:1], ())
    return (forward + backward) / batch


def describe(out: Any) -> str:
    if isinstance(out, tuple):
        return f"tuple of {len(out)}"
    return type(out).__name__


def split_pair(out: Any, label: str) -> tuple[Any, Any]:
    """A closure's ``(loss, logits)``, or a clear ``TypeError``."""
    if not (isinstance(out, tuple) and len(out) == 2 and hasattr(out[1], "shape")):
        raise TypeError(
            f"{label}: the closure returns `(loss, logits)` (its regulariser "
            f"compares output distributions). {received(closure_returned=describe(out))}"
        )
    return out


def noise(size: Any, kind: str) -> Callable[[Array], Array]:
    """A delta function drawing ``U(-size, size)`` or ``N(0, size^2)`` noise."""

    def draw(like: Array) -> Array:
        ops = ops_for(like)
        if kind == "uniform":
            z = ops.uniform_like(like, -size, size)
        else:
            z = ops.normal_like(like) * size
        return ops.cast(z, ops.dtype(like))

    return draw
