"""The adversarial ``train_step`` on the PyTorch backend (eager, as Keras runs it).

Every pass: the closure's forward, then ``torch.autograd.grad`` of the (scaled)
loss w.r.t. the target's output (the site) and, when asked, the trainable
parameters; the parameter gradients of the passes are summed and ONE
``optimizer.apply`` runs, as in Keras' torch ``train_step``.

mode='output': delta is added to the target's output in the forward.
mode='matrix': delta is added in place to the looked-up rows of the ``embeddings``
Parameter (same object) before the lookup, and the saved rows are copied back
afterwards (bit-exact, also when a pass raises). The gradient is the *lookup*
gradient: the gradient at the lookup's output summed per token, never a tied
head's. Rows: the distinct ids of the batch in ascending order (``torch.unique``).
"""

from __future__ import annotations

import warnings
from typing import Any, Callable

import keras
import torch

from advgraph._delta import DeltaResult
from advgraph._errors import received

from . import _private
from ._hook import (
    ReadOnceGrad,
    StatsBase,
    check_labels,
    delta_for_call,
    run_method,
    token_mask_of,
)
from ._schedule import method_now

__all__ = ["Stats", "TorchSite", "WeightSite", "adversarial_gradients", "make_stats", "train_step"]


class Stats(StatsBase):
    """PyTorch: the counters are one int64 tensor, updated without a host sync.

    Example:
        >>> from advgraph.adapters.keras._torch import Stats
        >>> dict(Stats())
        {'steps': 0, 'plain_steps': 0, 'skipped_nonfinite': 0, 'skipped_zero': 0}
    """

    def __init__(self) -> None:
        self.counts = torch.zeros(4, dtype=torch.int64)  # in STAT_KEYS order

    def _values(self) -> list[int]:
        return [int(v) for v in self.counts.tolist()]

    def reset(self) -> None:
        """Set every counter to 0."""
        self.counts.zero_()

    def count_step(self, plain: bool = False) -> None:
        self.counts[1 if plain else 0] += 1

    def record(self, result: DeltaResult) -> None:
        flags = torch.stack([torch.as_tensor(result.nonfinite).any(), torch.as_tensor(result.zero).any()])
        self.counts[2:] += flags.long().to(self.counts.device)


def make_stats(model: keras.Model) -> Stats:
    return Stats()


def _check_loss(loss: Any) -> torch.Tensor:
    if not isinstance(loss, torch.Tensor):
        raise TypeError(
            "The training step's loss must be a scalar tensor. "
            f"{received(loss_type=type(loss).__name__)}"
        )
    if loss.dim() != 0:
        raise ValueError(
            "The training step's loss must be a scalar (compute_loss reduces it). "
            f"{received(loss_shape=tuple(loss.shape))}"
        )
    return loss


class TorchSite(ReadOnceGrad):
    """A :class:`advgraph.Site` for one PyTorch ``train_step``.

    A new site call is one method here: run the closure between
    :meth:`_begin_pass` and :meth:`_end_pass` and differentiate what it needs.
    """

    def __init__(self, model: keras.Model, stats: Stats, layer: keras.layers.Layer, mode: str) -> None:
        self.model = model
        self.stats = stats
        self.layer = layer
        self.mode = mode
        self.variables = list(model.trainable_variables)
        self.param_grads: list[Any] | None = None
        self.delta: Any = None  # an array, a tuple (one per call), a function or None
        self._made: list[Any] = []  # output: what a function gave, one per call
        self._grad: Any = None
        self._values: Any = None  # site_values(): output mode
        self._pass: list[Any] | None = None  # target outputs captured in this pass
        self._rows: tuple[Any, Any] | None = None  # matrix: (uids, seg) of every lookup
        self._saved: Any = None  # matrix: (uids, rows saved before the installed delta)
        self._pass_ids: list[Any] = []  # matrix: flat ids of each lookup of the pass
        self._next_ids: Any = None
        self._applied: Any = None  # matrix: (uids, delta) a function gave in this pass

    # -- the hook ----------------------------------------------------------------------
    def in_pass(self) -> bool:
        return self._pass is not None

    def on_output(self, x: Any) -> Any:
        """Each call of the target in a pass: its output (one delta per call)."""
        assert self._pass is not None
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise ValueError(
                "The target must return one floating-point tensor (an embedding's vectors). "
                f"{received(output=type(x).__name__ if not isinstance(x, torch.Tensor) else str(x.dtype))}"
            )
        if self.mode == "matrix":
            ids, self._next_ids = self._next_ids, None
            if ids is None:  # not a lookup of token ids: no site here
                return x
            self._pass_ids.append(ids)
        if not x.requires_grad:  # a frozen embedding: still differentiate at its output
            x = x.detach().requires_grad_(True)
        call = len(self._pass)
        self._pass.append(x)
        if self.mode == "output":
            zeros = lambda like: torch.zeros_like(like, dtype=self._widened(like.dtype))  # noqa: E731
            delta = delta_for_call(self, call, x, zeros)
            if delta is not None:
                x = x + delta.to(x.dtype)
        return x

    def before_lookup(self, inputs: Any) -> None:
        """Before a lookup: its ids; materialise a delta given as a function.

        The function gets zeros for the rows touched so far in the pass; when a later
        lookup of the pass (a decoder, a second encoder) touches more ids, it is
        called again for the union and the rows perturbed already keep their values,
        written into the array it returned (as the PyTorch adapter does).
        """
        if self.mode != "matrix" or not isinstance(inputs, torch.Tensor):
            return
        if inputs.is_floating_point() or inputs.is_complex():
            return
        self._next_ids = inputs.reshape(-1)
        if not callable(self.delta):
            return
        ids = torch.cat(self._pass_ids + [self._next_ids])
        uids, seg = torch.unique(ids, sorted=True, return_inverse=True)
        matrix = self._matrix()
        if self._applied is not None:
            old_uids, old = self._applied
            if old_uids.shape == uids.shape and torch.equal(old_uids, uids):
                return
        like = torch.zeros(
            (uids.shape[0], matrix.shape[1]), dtype=self._widened(matrix.dtype), device=matrix.device
        )
        delta = self.delta(like)
        if self._applied is not None:
            with torch.no_grad():
                delta[torch.searchsorted(uids, old_uids.to(uids.device))] = old.to(delta.dtype)
        self._rows = (uids, seg)
        self._applied = (uids, delta)
        self._write(delta)

    @staticmethod
    def _widened(dtype: Any) -> Any:
        return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype

    # -- matrix edits ------------------------------------------------------------------
    def _matrix(self) -> torch.Tensor:
        return self.layer.embeddings.value

    def _restore(self) -> None:
        if self._saved is not None:
            uids, saved = self._saved
            with torch.no_grad():
                self._matrix().data[uids] = saved
            self._saved = None

    def _write(self, delta: Any) -> None:
        """Rows ``uids`` of the layout <- their saved values + delta (saved first)."""
        self._restore()
        uids = self._rows[0]
        with torch.no_grad():
            data = self._matrix().data
            saved = data[uids].clone()
            self._saved = (uids, saved)
            data[uids] = saved + delta.to(data.dtype)

    def _install(self, delta: Any) -> None:
        self.delta = delta
        self._applied = None
        self._write(delta)

    # -- Site interface ----------------------------------------------------------------
    def forward_backward(
        self,
        closure: Callable[[], Any],
        *,
        param_grads: bool,
        scale: float = 1.0,
        allow_none: bool = False,
        keep_grad: bool = True,
    ) -> Any:
        out, captured = self._forward(closure)
        if out is None and allow_none:
            return None
        loss = _check_loss(out)
        target = loss if scale == 1.0 else loss * scale
        if self.model.optimizer is not None:
            target = self.model.optimizer.scale_loss(target)
        sources = captured if keep_grad else []
        params = [v.value for v in self.variables] if param_grads else []
        if sources or params:
            grads = torch.autograd.grad(target, sources + params, allow_unused=True)
        else:
            grads = ()
        if keep_grad:
            self._grad = self._to_site(grads[: len(sources)], captured)
            if self.mode == "output":  # site_values(): the output without delta, per call
                values = tuple(c.detach() for c in captured)
                self._values = values[0] if len(values) == 1 else values
        if param_grads:
            new = list(grads[len(sources) :])
            if self.param_grads is None:
                self.param_grads = new
            else:
                self.param_grads = [
                    b if a is None else a if b is None else a + b
                    for a, b in zip(self.param_grads, new)
                ]
        return loss.detach()

    def _to_site(self, grads: Any, captured: list[Any]) -> Any:
        """The gradient at the site: one per call (a tuple when the target ran several
        times) in mode='output'; mode='matrix': the lookup gradients of every call
        summed per row of the union of their ids."""
        grads = [torch.zeros_like(x) if g is None else g for g, x in zip(grads, captured)]
        if self.mode == "output":
            return grads[0] if len(grads) == 1 else tuple(grads)
        ids = torch.cat(self._pass_ids) if len(self._pass_ids) > 1 else self._pass_ids[0]
        uids, seg = torch.unique(ids, sorted=True, return_inverse=True)
        self._rows = (uids, seg)
        flat = torch.cat([g.reshape(-1, g.shape[-1]) for g in grads])
        rows = torch.zeros((uids.shape[0], flat.shape[1]), dtype=flat.dtype, device=flat.device)
        return rows.index_add_(0, seg.to(flat.device), flat)

    def set_delta(self, delta: Any) -> None:
        self._made = []
        self._applied = None
        self._values = None
        if self.mode == "output" or callable(delta):
            self._restore()
            self.delta = delta
            return
        if self._rows is None:
            raise RuntimeError(
                "set_delta() before any gradient at the site: the rows to perturb are not "
                f"known. {received(rows_known=False)}"
            )
        self._install(delta)

    def clear(self) -> None:
        self.delta = None
        self._made = []
        self._applied = None
        self._values = None
        self._restore()

    def record(self, result: DeltaResult) -> None:
        self.stats.record(result)

    def count_step(self, plain: bool = False) -> None:
        self.stats.count_step(plain)

    # -- calls for gp, r3f, smart and neftune (see advgraph.Site) -----------
    mask: Any = None  # set by the hook: a function giving the target's Keras mask

    def _forward(self, closure: Callable[[], Any]) -> tuple[Any, list[Any]]:
        if self.mode == "matrix" and self._applied is not None:
            self.delta, self._applied = self._applied[1], None  # a function's draw: kept
        self._pass = []
        self._pass_ids = []
        self._next_ids = None
        try:
            out = closure()
            captured = self._pass
        finally:
            self._pass = None
        if not captured:
            raise ValueError(
                "The forward of the training step did not run the target layer, so there is "
                "no perturbation site. Train the model returned by advgraph.wrap(). "
                f"{received(target_calls=0)}"
            )
        return out, captured

    def _backward_params(self, total: Any) -> None:
        if self.model.optimizer is not None:
            total = self.model.optimizer.scale_loss(total)
        new = list(torch.autograd.grad(total, [v.value for v in self.variables], allow_unused=True))
        if self.param_grads is None:
            self.param_grads = new
        else:
            self.param_grads = [
                b if a is None else a if b is None else a + b for a, b in zip(self.param_grads, new)
            ]

    def penalty_backward(self, closure: Callable[[], Any], penalty: Callable[[Any], Any]) -> Any:
        """gp: the site's gradient with ``create_graph=True``, then one backward."""
        out, captured = self._forward(closure)
        loss = _check_loss(out)
        grads = torch.autograd.grad(loss, captured, create_graph=True, allow_unused=True)
        total = loss + penalty(self._to_site(grads, captured)).to(loss.dtype)
        self._backward_params(total)
        return loss.detach()

    def joint_backward(
        self, closure: Callable[[], Any], deltas: Any, objective: Callable[[list[Any]], Any]
    ) -> Any:
        """r3f / smart: every forward kept differentiable, one backward of the objective."""
        try:
            outs = []
            for delta in deltas:
                self.clear()
                if delta is not None:
                    self.set_delta(delta)
                outs.append(self._forward(closure)[0])
            total = _check_loss(objective(outs))
            del outs
            self._backward_params(total)
        finally:
            self.clear()
        return total.detach()

    def forward_only(self, closure: Callable[[], Any], *, teacher: bool = False) -> Any:
        """A forward without autograd (outside a pass: the hook leaves outputs alone)."""
        with torch.no_grad():
            if teacher:
                return keras.tree.map_structure(_detach, self.teacher_forward(closure))
            return keras.tree.map_structure(_detach, closure())

    teacher: Any = None  # SMART's Teacher (set by the train step)
    teacher_pass = False  # the closure's forward is the teacher's (metrics skip it)

    def update_teacher(self, beta: float) -> None:
        with torch.no_grad():
            self.teacher.update([v.value for v in self.variables], beta, self.model.optimizer.iterations)

    def teacher_forward(self, closure: Callable[[], Any]) -> Any:
        """The closure with the teacher's values read for the trainable variables."""
        mapping = [(v, t.value) for v, t in zip(self.variables, self.teacher.values)]
        self.teacher_pass = True
        try:
            with keras.StatelessScope(state_mapping=mapping):
                return closure()
        finally:
            self.teacher_pass = False

    def token_mask(self, like: Any) -> Any:
        return token_mask_of(self, like, lambda m: m.to(like.dtype).unsqueeze(-1))

    def site_values(self) -> Any:
        """mode='output': the target's output (without delta) in the last pass that kept
        a gradient, until a delta is installed or removed."""
        if self._values is None:
            raise NotImplementedError(
                "site_values() is the target's output in mode='output' (and the weights of "
                "a weight site); in mode='matrix', or before a forward_backward() that kept "
                f"a gradient, there is none. {received(mode=self.mode)}"
            )
        return self._values


class WeightSite(TorchSite):
    """method='awp': delta on a set of variables (a tuple, one array per variable).

    The perturbed values are copied into the parameters in place; restore copies the
    saved values back (bit-exact, also when a pass raises)."""

    def __init__(self, model: keras.Model, stats: Stats, weights: list[Any]) -> None:
        super().__init__(model, stats, model, "weights")
        self.weights = list(weights)
        self._grads: list[Any] = []
        self._chosen: list[int] = []
        self._saved_weights: list[Any] | None = None

    def in_pass(self) -> bool:
        return False  # no hook

    def forward_backward(
        self,
        closure: Callable[[], Any],
        *,
        param_grads: bool,
        scale: float = 1.0,
        allow_none: bool = False,
        keep_grad: bool = True,
    ) -> Any:
        out = closure()
        if out is None and allow_none:
            return None
        loss = _check_loss(out)
        target = loss if scale == 1.0 else loss * scale
        if self.model.optimizer is not None:
            target = self.model.optimizer.scale_loss(target)
        sources = [w.value for w in self.weights] if keep_grad else []
        params = [v.value for v in self.variables] if param_grads else []
        grads = torch.autograd.grad(target, sources + params, allow_unused=True) if sources or params else ()
        if keep_grad:
            self._grads = list(grads[: len(sources)])
        if param_grads:
            new = list(grads[len(sources) :])
            if self.param_grads is None:
                self.param_grads = new
            else:
                self.param_grads = [
                    b if a is None else a if b is None else a + b for a, b in zip(self.param_grads, new)
                ]
        return loss.detach()

    def site_grad(self) -> Any:
        self._chosen = [i for i, g in enumerate(self._grads) if g is not None]
        if not self._chosen:
            raise RuntimeError(
                "No gradient at the perturbed weights: the loss does not depend on them. "
                f"{received(weights=len(self.weights))}"
            )
        grads = tuple(self._grads[i] for i in self._chosen)
        self._grads = []
        return grads

    def site_values(self) -> Any:
        return tuple(self.weights[i].value.detach() for i in self._chosen)

    def set_delta(self, delta: Any) -> None:
        if callable(delta) or not isinstance(delta, tuple):
            raise TypeError(
                "advgraph internal error: the weight site takes one delta per weight (a tuple). "
                f"{received(delta=type(delta).__name__)}"
            )
        params = [self.weights[i].value for i in self._chosen]
        with torch.no_grad():
            if self._saved_weights is None:
                self._saved_weights = [p.detach().clone() for p in params]
            for p, saved, d in zip(params, self._saved_weights, delta):
                p.copy_(saved + d.to(p.dtype))

    def clear(self) -> None:
        if self._saved_weights is not None:
            with torch.no_grad():
                for i, saved in zip(self._chosen, self._saved_weights):
                    self.weights[i].value.copy_(saved)
            self._saved_weights = None


def _detach(x: Any) -> Any:
    return x.detach() if isinstance(x, torch.Tensor) else x


def train_step(self: keras.Model, data: Any, adv: Any) -> dict[str, Any]:
    """The wrapped model's torch ``train_step``; metrics see the clean pass."""
    x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
    loss, site, predictions = _passes(self, x, y, sample_weight, adv)
    first = next(t for t in keras.tree.flatten(x) if t is not None)
    _private.loss_tracker(self).update_state(loss, sample_weight=first.shape[0])
    if site.variables:
        grads = site.param_grads or [None] * len(site.variables)
        with torch.no_grad():
            self.optimizer.apply(grads, site.variables)
    else:
        warnings.warn("The model does not have any trainable weights.", stacklevel=2)
    if y is None:
        return self.get_metrics_result()
    return self.compute_metrics(x, y, predictions[0], sample_weight=sample_weight)


def adversarial_gradients(self: keras.Model, data: Any, adv: Any) -> tuple[Any, list[Any], Any]:
    """``advgraph.keras.adversarial_gradients`` on torch: every pass of the method
    (``torch.autograd.grad`` per pass), nothing applied; ``(loss, grads, y_pred)``,
    ``grads`` in ``self.trainable_variables`` order (``None`` where a variable has
    no gradient). The weights are exactly as before when it returns."""
    x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
    loss, site, predictions = _passes(self, x, y, sample_weight, adv)
    grads = site.param_grads or [None] * len(site.variables)
    return loss, list(grads), predictions[0]


def _passes(self: keras.Model, x: Any, y: Any, sample_weight: Any, adv: Any) -> tuple[Any, Any, list[Any]]:
    """Every pass of the method on a torch site: ``(loss, site, predictions)``."""
    config = adv.config
    check_labels(config.settings, y)
    if config.mode == "weights":
        site = WeightSite(self, adv.stats, adv.weights)
    else:
        site = TorchSite(self, adv.stats, adv.target, config.mode)
    site.teacher = adv.teacher
    predictions: list[Any] = []
    vat = config.settings.closure == "logits"
    pair = config.settings.closure != "loss"  # the closure returns (loss, logits)

    def closure() -> Any:
        later = bool(predictions)
        metric_vars = list(self.metrics_variables) if later else []
        saved = [v.value.detach().clone() for v in metric_vars]
        if _private.call_has_training_arg(self):
            y_pred = self(x, training=True)
        else:
            y_pred = self(x)
        if not site.teacher_pass:  # SMART's teacher forward: not the clean pass
            predictions.append(y_pred)
        if vat and y is None:
            out = y_pred
        else:
            loss = _private.compute_loss(self, x, y, y_pred, sample_weight)
            out = (loss, y_pred) if pair else loss
        for var, value in zip(metric_vars, saved):
            var.assign(value)
        return out

    with adv.hook.activate(site):
        loss = run_method(site, closure, method_now(self, adv))
    return loss, site, predictions
