"""The adversarial ``train_step`` on the JAX backend: functional, inside ``jax.jit``.

Keras' JAX trainer calls ``train_step(state, data)`` with the values of every
variable and expects the new values back. The adversarial step keeps that
contract: every pass of the method is a ``jax.value_and_grad`` of a function of
the trainable values and of ``z``, a zero added to the target's output (its
gradient is the gradient at the site). Perturbed values go INTO the stateless
call (mode='output': ``output + delta`` at the target; mode='matrix': the
embedding matrix with delta added to the looked-up rows, assigned inside the
call's ``StatelessScope``, so a tied head sees it too). Nothing is written to a
stored variable, so nothing is restored: after the step the trainable values are
exactly what ``optimizer.stateless_apply`` makes of the summed gradients.

Matrix mode takes the *lookup* gradient (the gradient at the lookup's output,
summed per token), never the gradient of a tied head. Row layout: the ids of the
batch (N positions) give N row slots, the distinct ids in ascending order first
and zero rows after (``jax.jit`` needs static shapes; zero rows change neither
an l2 norm nor a sign, only a random start also draws noise for them, which is
never added to the matrix).

The step counters (``advgraph_stats``) and the random key live in the variables
of a metric tracked by the model (``_Counters``: its ``result()`` is empty and
``reset_state()`` does nothing, so logs and epochs do not see it), so they flow
through the jitted step with the rest of the state, also under
``keras.distribution``. They are read back when Keras syncs the state (at the
end of each epoch of ``fit``).
"""

from __future__ import annotations

import random
from typing import Any, Callable

import jax
import jax.numpy as jnp
import keras

from advgraph._delta import DeltaResult
from advgraph._errors import received
from advgraph._ops import jax_keys

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

__all__ = [
    "Stats", "JaxSite", "WeightSite", "adversarial_gradients", "make_stats", "train_step", "attach", "detach",
]


class _Counters(keras.metrics.Metric):
    """steps / skipped counters and the random key, as metric variables."""

    def __init__(self, seed: int, name: str = "advgraph_counters") -> None:
        super().__init__(name=name)
        key = [0, seed & 0xFFFFFFFF]
        self.counts = self.add_variable(
            shape=(4,), initializer="zeros", dtype="int32", name="counts"  # STAT_KEYS order
        )
        self.key = self.add_variable(
            shape=(2,),
            initializer=lambda shape, dtype: jnp.asarray(key, dtype="uint32"),
            dtype="uint32",
            name="key",
        )

    def update_state(self, *args: Any, **kwargs: Any) -> None:
        """Updated by the adversarial step only."""

    def result(self) -> dict[str, Any]:
        return {}  # nothing in the logs

    def reset_state(self) -> None:
        """Counters persist across epochs and evaluations (``Stats.reset`` zeroes them)."""


class Stats(StatsBase):
    """JAX: the counters are metric variables that the jitted step carries.

    Example:
        >>> from advgraph.adapters.keras._jax import Stats
        >>> dict(Stats())
        {'steps': 0, 'plain_steps': 0, 'skipped_nonfinite': 0, 'skipped_zero': 0}
    """

    def __init__(self) -> None:
        self.counters = _Counters(random.randint(0, 2**31 - 1))

    def _values(self) -> list[int]:
        return [int(v) for v in keras.ops.convert_to_numpy(self.counters.counts.value)]

    def reset(self) -> None:
        """Set every counter to 0 (host side)."""
        self.counters.counts.assign(jnp.zeros((4,), "int32"))


def make_stats(model: keras.Model) -> Stats:
    """Counters (and the random key) for the JAX step; see :func:`attach`."""
    return Stats()


def attach(model: keras.Model, stats: Stats) -> None:
    """Track the counters on the model, so they travel in the jitted step's state."""
    _private.tracked_metrics(model).append(stats.counters)


def detach(model: keras.Model, stats: Stats) -> None:
    metrics = _private.tracked_metrics(model)
    for i, metric in enumerate(metrics):
        if metric is stats.counters:
            del metrics[i]
            break


def _check_loss(loss: Any) -> Any:
    if not hasattr(loss, "shape") or not hasattr(loss, "dtype"):
        raise TypeError(
            "The training step's loss must be a scalar array. "
            f"{received(loss_type=type(loss).__name__)}"
        )
    if tuple(loss.shape) != ():
        raise ValueError(
            "The training step's loss must be a scalar (compute_loss reduces it). "
            f"{received(loss_shape=tuple(loss.shape))}"
        )
    return loss


def _layout(ids: Any) -> tuple[Any, Any, Any]:
    """``(uids, seg, valid)`` for flat ``ids`` of N positions (static shapes).

    ``uids[r]``: the id of row slot r (distinct ids ascending, then 0); ``seg[i]``:
    the row slot of position i; ``valid[r]``: whether slot r holds an id.
    """
    count = ids.shape[0]
    order = jnp.argsort(ids, stable=True)
    ordered = ids[order]
    first = jnp.concatenate([jnp.ones((1,), bool), ordered[1:] != ordered[:-1]])
    rank = jnp.cumsum(first.astype(jnp.int32)) - 1
    seg = jnp.zeros((count,), jnp.int32).at[order].set(rank)
    uids = jnp.zeros((count,), ids.dtype).at[rank].set(ordered)
    valid = jnp.arange(count) <= rank[-1]
    return uids, seg, valid


class JaxSite(ReadOnceGrad):
    """A :class:`advgraph.Site` for one trace of the JAX ``train_step``.

    A new site call is one method here: run the closure inside
    :meth:`_run_pass` (which makes the trainable values and ``z`` the inputs of
    the function differentiated) and read what it needs from the pass record.
    """

    def __init__(
        self,
        model: keras.Model,
        layer: keras.layers.Layer,
        mode: str,
        trainable: list[Any],
        non_trainable: list[Any],
        optimizer_values: list[Any],
        key: Any,
        probe: Callable[[], Any],
        shared_matrix: bool = True,
    ) -> None:
        self.model = model
        self.layer = layer
        self.mode = mode
        self.trainable = list(trainable)
        self.non_trainable = list(non_trainable)
        self.optimizer_values = optimizer_values
        self.key = key
        self.counts = jnp.zeros((4,), jnp.int32)  # STAT_KEYS order
        self.param_grads: list[Any] | None = None
        self.records: list[dict[str, Any]] = []  # what each pass's closure reported
        self.delta: Any = None
        self._grad: Any = None
        self._values: Any = None  # site_values(): output mode, the last pass keeping a gradient
        self._layout: tuple[Any, Any, Any] | None = None  # over every lookup of a pass
        self._layout_full = False  # a whole pass has run: the layout covers every lookup
        self._made: list[Any] = []  # output: what a function gave, one per call
        self._applied: tuple[Any, Any] | None = None  # matrix: (delta, seg) a function gave
        self._pass: dict[str, Any] | None = None  # scratch of the pass being traced
        self._probe = probe
        # mode='matrix' with no other reader of the matrix: delta[seg] is added to the
        # lookup's output (the same bytes as looking up E + delta) instead of
        # materialising the V x d perturbed matrix in every adversarial pass.
        self._whole_matrix = shared_matrix
        self._spec: Any = None
        self._frozen = [
            i for i, v in enumerate(model.non_trainable_variables) if v is _embeddings(layer)
        ]

    # -- what the closure and the hook see ---------------------------------------
    def in_pass(self) -> bool:
        return self._pass is not None

    def values(self) -> tuple[list[Any], list[Any]]:
        """The trainable and non-trainable values the closure's forward uses."""
        assert self._pass is not None
        return self._pass["trainable"], self.non_trainable

    def report(self, **values: Any) -> None:
        """The closure hands back what the step needs (predictions, new states)."""
        assert self._pass is not None
        self._pass["report"].update(values)

    def next_key(self) -> Any:
        self.key, sub = jax.random.split(self.key)
        return sub

    def on_output(self, x: Any) -> Any:
        """Each call of the target in a pass: ``z`` of that call (and its delta) added."""
        scratch = self._pass
        assert scratch is not None
        if scratch.get("probe"):
            scratch["specs"].append(x)
            return x
        if not hasattr(x, "dtype") or not jnp.issubdtype(x.dtype, jnp.floating):
            raise ValueError(
                "The target must return one floating-point array (an embedding's vectors). "
                f"{received(output=type(x).__name__ if not hasattr(x, 'dtype') else str(x.dtype))}"
            )
        call = scratch["calls"]
        scratch["calls"] += 1
        zs = scratch["z"]
        if call >= len(zs) or tuple(zs[call].shape) != tuple(x.shape):
            raise ValueError(
                "On the JAX backend the target must run the same number of times, with the "
                "same output shapes, in every forward of a step (they were read from a first "
                "trace of the forward); make the calls of the target independent of the "
                "values of the batch, or use the TensorFlow or torch backend. "
                f"{received(call=call, calls_traced=len(zs), output_shape=tuple(x.shape))}"
            )
        if self.mode == "matrix":
            ids = scratch["ids"]
            if len(ids) != call + 1:  # not a lookup of token ids: no delta here
                ids.insert(call, None)
            elif not self._whole_matrix and self._current() is not None:
                _, seg, valid = self._layout
                start = scratch["offset"]
                count = ids[call].shape[0]
                rows = jnp.where(valid[:, None], self._current(), 0).astype(x.dtype)
                part = jax.lax.slice_in_dim(seg, start, start + count)
                x = x + jnp.reshape(jnp.take(rows, part, axis=0), x.shape)  # (E + delta)[ids]
            scratch["offset"] += 0 if ids[call] is None else ids[call].shape[0]
        if self.mode == "output":  # site_values(): the output without delta, per call
            scratch["report"].setdefault("site_values", []).append(x)
        x = x + zs[call].astype(x.dtype)
        if self.mode == "output":
            zeros = lambda like: jnp.zeros(like.shape, self._widened(like.dtype))  # noqa: E731
            delta = delta_for_call(self, call, x, zeros)
            if delta is not None:
                x = x + delta.astype(x.dtype)
        return x

    def before_lookup(self, inputs: Any) -> None:
        """Before a lookup: its ids. The layout covers the ids of every lookup of the
        pass (an encoder-decoder's, a bi-encoder's calls); a delta given as a function
        is drawn for the rows known so far, again for the union when a later lookup
        adds ids (the rows perturbed already keep their values)."""
        scratch = self._pass
        assert scratch is not None
        if scratch.get("probe") or self.mode != "matrix":
            return
        if not hasattr(inputs, "dtype") or not jnp.issubdtype(inputs.dtype, jnp.integer):
            return
        ids = scratch["ids"]
        ids.append(jnp.reshape(inputs, (-1,)))
        flat = [i for i in ids if i is not None]
        total = sum(i.shape[0] for i in flat)
        if not self._layout_full:  # the first pass of the step: the lookups so far
            self._layout = _layout(flat[0] if len(flat) == 1 else jnp.concatenate(flat))
        uids, seg, valid = self._layout
        var = _embeddings(self.layer)
        if "matrix" not in scratch:
            scratch["matrix"] = var.value  # before any delta of this pass
        matrix = scratch["matrix"]
        if callable(self.delta):
            like = jnp.zeros((uids.shape[0], matrix.shape[1]), self._widened(matrix.dtype))
            delta = self.delta(like)
            if self._applied is not None:  # rows of earlier lookups keep their delta
                old, old_seg = self._applied
                earlier = seg[: old_seg.shape[0]]
                delta = delta.at[earlier].set(jnp.take(old, old_seg, axis=0).astype(delta.dtype))
            self._applied = (delta, seg[:total])
        current = self._current()
        if current is not None and self._whole_matrix:
            rows = jnp.where(valid[:, None], current, 0).astype(matrix.dtype)
            var.assign(matrix.at[uids].add(rows))  # in the call's StatelessScope only

    def _current(self) -> Any:
        """mode='matrix': the delta of the rows (a function's draw once made), or None."""
        if callable(self.delta):
            return None if self._applied is None else self._applied[0]
        return self.delta

    @staticmethod
    def _widened(dtype: Any) -> Any:
        return jnp.float32 if dtype in (jnp.float16, jnp.bfloat16) else dtype

    # -- one pass --------------------------------------------------------------------
    def _spec_of_output(self) -> Any:
        if self._spec is None:
            self._pass = {"probe": True, "trainable": self.trainable, "report": {}, "specs": []}
            try:
                self._probe()
            finally:
                specs = self._pass["specs"]
                self._pass = None
            if not specs:
                raise ValueError(
                    "The forward of the training step did not run the target layer, so there "
                    "is no perturbation site. Train the model returned by advgraph.wrap(). "
                    f"{received(target_calls=0)}"
                )
            self._spec = [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in specs]
        return self._spec

    def _zeros(self) -> tuple[Any, ...]:
        """``z``: one zero per call of the target, its gradient the gradient there."""
        return tuple(jnp.zeros(spec.shape, spec.dtype) for spec in self._spec_of_output())

    def _run_pass(
        self,
        closure: Callable[[], Any],
        trainable: list[Any],
        z: Any,
        scale: float,
        allow_none: bool,
        raw: bool = False,
    ) -> tuple[Any, tuple[Any, dict[str, Any]]]:
        """One forward; ``raw=True``: the closure's output as it is (no loss checks)."""
        self._pass = {"trainable": trainable, "z": z, "calls": 0, "report": {}, "ids": [], "offset": 0}
        try:
            out = closure()
            calls = self._pass["calls"]
            report = self._pass["report"]
        finally:
            self._pass = None
        if self.mode == "matrix" and calls:
            self._layout_full = True
            if callable(self.delta) and self._applied is not None:
                self.delta, self._applied = self._applied[0], None  # the draw is kept
        if calls == 0:
            raise ValueError(
                "The forward of the training step did not run the target layer, so there is "
                "no perturbation site. Train the model returned by advgraph.wrap(). "
                f"{received(target_calls=0)}"
            )
        if raw:
            return None, (out, report)
        if out is None:
            if not allow_none:
                raise TypeError(
                    "The training step's loss must be a scalar array. "
                    f"{received(loss_type='NoneType')}"
                )
            return jnp.zeros((), jnp.float32), (None, report)
        loss = _check_loss(out)
        target = loss if scale == 1.0 else loss * jnp.asarray(scale, loss.dtype)
        optimizer = self.model.optimizer
        mapping = list(zip(optimizer.variables, self.optimizer_values))
        with keras.StatelessScope(state_mapping=mapping):
            target = optimizer.scale_loss(target)
        return target, (loss, report)

    # -- Site interface ------------------------------------------------------------
    def forward_backward(
        self,
        closure: Callable[[], Any],
        *,
        param_grads: bool,
        scale: float = 1.0,
        allow_none: bool = False,
        keep_grad: bool = True,
    ) -> Any:
        z = self._zeros()

        def f(trainable: list[Any], z: Any) -> Any:
            return self._run_pass(closure, trainable, z, scale, allow_none)

        argnums = tuple(i for i, on in ((0, param_grads), (1, keep_grad)) if on)
        if argnums:
            (_, (loss, report)), grads = jax.value_and_grad(f, argnums=argnums, has_aux=True)(
                self.trainable, z
            )
            grads = dict(zip(argnums, grads))
        else:
            _, (loss, report) = f(self.trainable, z)
            grads = {}
        self._absorb(report)
        if loss is None:
            return None
        if keep_grad:
            self._grad = self._to_site(grads[1])
            values = report.get("site_values")
            self._values = None if not values else values[0] if len(values) == 1 else tuple(values)
        if param_grads:
            new = grads[0]
            if self.param_grads is None:
                self.param_grads = list(new)
            else:
                self.param_grads = [a + b for a, b in zip(self.param_grads, new)]
        return jax.lax.stop_gradient(loss)

    def _absorb(self, report: dict[str, Any]) -> None:
        """Keep a pass's outputs: its non-trainable updates chain into the next pass."""
        self._chain(report)
        self.records.append(report)

    def _chain(self, report: dict[str, Any]) -> None:
        non_trainable = report.get("non_trainable")
        if non_trainable is not None:
            non_trainable = list(non_trainable)
            for i in self._frozen:  # a frozen matrix: its perturbed value is not a state
                non_trainable[i] = self.non_trainable[i]
            self.non_trainable = non_trainable

    def _to_site(self, grad_z: Any) -> Any:
        """One gradient per call (a tuple when the target ran several times) in
        mode='output'; mode='matrix': every lookup's gradient summed per row."""
        if self.mode == "output":
            return grad_z[0] if len(grad_z) == 1 else tuple(grad_z)
        assert self._layout is not None
        _, seg, _ = self._layout
        flat = [jnp.reshape(g, (-1, g.shape[-1])) for g in grad_z]
        flat = flat[0] if len(flat) == 1 else jnp.concatenate(flat)
        if flat.shape[0] != seg.shape[0]:
            raise ValueError(
                "On the JAX backend, mode='matrix' needs every call of the target to be a "
                "lookup of integer token ids; use mode='output'. "
                f"{received(positions=flat.shape[0], ids=seg.shape[0])}"
            )
        return jax.ops.segment_sum(flat, seg, num_segments=flat.shape[0])

    def set_delta(self, delta: Any) -> None:
        self.delta = delta
        self._made = []
        self._applied = None

    def clear(self) -> None:
        self.delta, self._made, self._applied = None, [], None  # nothing stored changed

    def count_step(self, plain: bool = False) -> None:
        self.counts = self.counts.at[1 if plain else 0].add(1)

    def record(self, result: DeltaResult) -> None:
        flags = jnp.stack([jnp.any(result.nonfinite), jnp.any(result.zero)]).astype(jnp.int32)
        self.counts = self.counts + jnp.concatenate([jnp.zeros((2,), jnp.int32), flags])

    # -- calls for gp, r3f, smart and neftune (see advgraph.Site) -----------
    mask: Any = None  # set by the hook: a function giving the target's Keras mask

    def _accumulate(self, new: list[Any]) -> None:
        if self.param_grads is None:
            self.param_grads = list(new)
        else:
            self.param_grads = [a + b for a, b in zip(self.param_grads, new)]

    def _scaled(self, total: Any) -> Any:
        optimizer = self.model.optimizer
        mapping = list(zip(optimizer.variables, self.optimizer_values))
        with keras.StatelessScope(state_mapping=mapping):
            return optimizer.scale_loss(total)

    def penalty_backward(self, closure: Callable[[], Any], penalty: Callable[[Any], Any]) -> Any:
        """gp: ``grad`` of the loss w.r.t. ``z`` inside the ``value_and_grad`` over the
        trainable values (a double backward)."""
        z = self._zeros()

        def f(trainable: list[Any]) -> Any:
            def inner(z: Any) -> Any:
                _, (loss, report) = self._run_pass(closure, trainable, z, 1.0, False)
                return loss, (loss, report)

            (_, (loss, report)), grad_z = jax.value_and_grad(inner, has_aux=True)(z)
            total = loss + penalty(self._to_site(grad_z)).astype(loss.dtype)
            return self._scaled(total), (loss, report)

        (_, (loss, report)), grads = jax.value_and_grad(f, has_aux=True)(self.trainable)
        self._absorb(report)
        self._accumulate(grads)
        return jax.lax.stop_gradient(loss)

    def joint_backward(
        self, closure: Callable[[], Any], deltas: Any, objective: Callable[[list[Any]], Any]
    ) -> Any:
        """r3f / smart: the forwards inside one ``value_and_grad``; non-trainable
        states chain from one forward to the next, as on the other backends."""
        z = self._zeros()
        start = self.non_trainable

        def f(trainable: list[Any]) -> Any:
            outs, reports = [], []
            try:
                for delta in deltas:
                    self.clear()
                    self.delta = delta
                    _, (out, report) = self._run_pass(closure, trainable, z, 1.0, True, raw=True)
                    outs.append(out)
                    reports.append(report)
                    self._chain(report)
            finally:
                self.non_trainable = start
                self.clear()
            total = _check_loss(objective(outs))
            return self._scaled(total), (total, reports)

        (_, (total, reports)), grads = jax.value_and_grad(f, has_aux=True)(self.trainable)
        for report in reports:
            self._absorb(report)
        self._accumulate(grads)
        return jax.lax.stop_gradient(total)

    def forward_only(self, closure: Callable[[], Any], *, teacher: bool = False) -> Any:
        """A forward of the current values (``teacher=True``: the teacher's), no gradient."""
        z = self._zeros()
        values = self.teacher_values() if teacher else self.trainable
        _, (out, report) = self._run_pass(closure, values, z, 1.0, True, raw=True)
        if not teacher:  # the teacher's forward leaves the model's states alone
            self._absorb(report)
        return jax.tree.map(jax.lax.stop_gradient, out)

    teacher: Any = None  # SMART's Teacher (a metric carried in the step's state)
    teacher_state: list[Any] | None = None  # its variables' values (in, then out)

    def update_teacher(self, beta: float) -> None:
        """The Teacher's update, run statelessly on the values the step carries."""
        assert self.teacher_state is not None
        optimizer = self.model.optimizer
        own = list(self.teacher.variables)
        mapping = list(zip(own, self.teacher_state))
        mapping += list(zip(optimizer.variables, self.optimizer_values))
        with keras.StatelessScope(state_mapping=mapping) as scope:
            self.teacher.update(self.trainable, beta, optimizer.iterations)
        self.teacher_state = [
            value if scope.get_current_value(v) is None else scope.get_current_value(v)
            for v, value in zip(own, self.teacher_state)
        ]

    def teacher_values(self) -> list[Any]:
        assert self.teacher_state is not None
        return self.teacher_state[: len(self.teacher.values)]

    def token_mask(self, like: Any) -> Any:
        return token_mask_of(self, like, lambda m: jnp.asarray(m, like.dtype)[..., None])

    def site_values(self) -> Any:
        """mode='output': the target's output (without delta) in the last pass that kept
        a gradient."""
        if self._values is None:
            raise NotImplementedError(
                "site_values() is the target's output in mode='output' (and the weights of "
                "a weight site); in mode='matrix', or before a forward_backward() that kept "
                f"a gradient, there is none. {received(mode=self.mode)}"
            )
        return jax.tree_util.tree_map(jax.lax.stop_gradient, self._values)


class WeightSite(JaxSite):
    """method='awp': delta on a set of trainable variables, functionally: each pass
    differentiates at ``value + delta`` (handed to the stateless call); nothing
    stored is written, so nothing is restored."""

    def __init__(self, *args: Any, indices: list[int], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.indices = list(indices)  # positions of the perturbed variables in trainable

    def in_pass(self) -> bool:
        return False  # no hook; values() reads the pass through _pass

    def _perturbed(self, trainable: list[Any]) -> list[Any]:
        if self.delta is None:
            return trainable
        out = list(trainable)
        for j, d in zip(self.indices, self.delta):
            out[j] = trainable[j] + d.astype(trainable[j].dtype)
        return out

    def forward_backward(
        self,
        closure: Callable[[], Any],
        *,
        param_grads: bool,
        scale: float = 1.0,
        allow_none: bool = False,
        keep_grad: bool = True,
    ) -> Any:
        def f(trainable: list[Any]) -> Any:
            self._pass = {"trainable": self._perturbed(trainable), "report": {}}
            try:
                out = closure()
                report = self._pass["report"]
            finally:
                self._pass = None
            loss = _check_loss(out)
            target = loss if scale == 1.0 else loss * jnp.asarray(scale, loss.dtype)
            return self._scaled(target), (loss, report)

        (_, (loss, report)), grads = jax.value_and_grad(f, has_aux=True)(self.trainable)
        self._absorb(report)
        if keep_grad:
            self._grad = tuple(grads[j] for j in self.indices)
        if param_grads:
            self._accumulate(grads)
        return jax.lax.stop_gradient(loss)

    def site_values(self) -> Any:
        return tuple(self.trainable[j] for j in self.indices)

    def set_delta(self, delta: Any) -> None:
        if callable(delta) or not isinstance(delta, tuple):
            raise TypeError(
                "advgraph internal error: the weight site takes one delta per weight (a tuple). "
                f"{received(delta=type(delta).__name__)}"
            )
        self.delta = delta


def _embeddings(layer: keras.layers.Layer) -> Any:
    return getattr(layer, "embeddings", None)


def _metric_update(
    model: keras.Model, metrics_values: list[Any], loss: Any, x: Any, y: Any, y_pred: Any, sw: Any
) -> tuple[dict[str, Any], list[Any]]:
    """The loss tracker and compiled metrics on the clean pass, statelessly."""
    mapping = list(zip(model.metrics_variables, metrics_values))
    with keras.StatelessScope(state_mapping=mapping) as scope:
        first = next(t for t in keras.tree.flatten(x) if t is not None)
        _private.loss_tracker(model).update_state(loss, sample_weight=first.shape[0])
        if y is None:
            logs = model.get_metrics_result()
        else:
            logs = model.compute_metrics(x, y, y_pred, sample_weight=sw)
    new = []
    for ref, value in zip(model.metrics_variables, metrics_values):
        current = scope.get_current_value(ref)
        new.append(value if current is None else current)
    return logs, new


def train_step(self: keras.Model, state: Any, data: Any, adv: Any) -> tuple[Any, Any]:
    """The wrapped model's JAX ``train_step(state, data) -> (logs, state)``.

    Metrics see the clean pass (FreeLB: its first pass; VAT on an unlabeled batch:
    the VAT loss); non-trainable states (BatchNormalization statistics, dropout
    seeds) advance in every pass, as each forward on the other backends updates them.
    """
    x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
    loss, grads, y_pred, (trainable, non_trainable, optimizer_values, metrics_values) = _passes(
        self, state, x, y, sample_weight, adv
    )
    new_trainable, new_optimizer = self.optimizer.stateless_apply(
        optimizer_values, grads, trainable
    )
    logs, new_metrics = _metric_update(self, metrics_values, loss, x, y, y_pred, sample_weight)
    return logs, (new_trainable, non_trainable, new_optimizer, new_metrics)


def adversarial_gradients(self: keras.Model, state: Any, data: Any, adv: Any) -> tuple[Any, list[Any], Any, Any]:
    """``advgraph.keras.adversarial_gradients`` on JAX: every pass of the method,
    functionally; ``(loss, grads, y_pred, state)``: ``grads`` in trainable-variable
    order, ``state`` the train step's state with the non-trainable values and the
    metrics' values (advgraph's counters and random key among them) of after the
    passes; trainable and optimizer values are the ones given (nothing applied)."""
    x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
    return _passes(self, state, x, y, sample_weight, adv)


def _passes(
    self: keras.Model, state: Any, x: Any, y: Any, sample_weight: Any, adv: Any
) -> tuple[Any, list[Any], Any, tuple[Any, Any, Any, list[Any]]]:
    """Every pass of the method: ``(loss, grads, y_pred, state after the passes)``."""
    trainable, non_trainable, optimizer_values, metrics_values = state
    config = adv.config
    check_labels(config.settings, y)
    vat = config.settings.closure == "logits"
    pair = config.settings.closure != "loss"  # the closure returns (loss, logits)
    counters = adv.stats.counters
    slots = {id(v): i for i, v in enumerate(self.metrics_variables)}
    counts_slot, key_slot = slots[id(counters.counts)], slots[id(counters.key)]
    kwargs = {"training": True} if _private.call_has_training_arg(self) else {}
    site: JaxSite

    def probe() -> Any:
        spec = lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype)  # noqa: E731
        fn = lambda t, n, xx: self.stateless_call(t, n, xx, **kwargs)  # noqa: E731
        return jax.eval_shape(
            fn,
            jax.tree.map(spec, site.trainable),
            jax.tree.map(spec, site.non_trainable),
            jax.tree.map(spec, x),
        )

    site_class: Any = JaxSite
    extra: dict[str, Any] = {}
    if config.mode == "weights":
        position = {id(v): i for i, v in enumerate(self.trainable_variables)}
        site_class, extra = WeightSite, {"indices": [position[id(w)] for w in adv.weights]}
    site = site_class(
        self,
        adv.target,
        config.mode,
        trainable,
        non_trainable,
        optimizer_values,
        jax.random.wrap_key_data(metrics_values[key_slot]),
        probe,
        adv.shared_matrix,
        **extra,
    )

    def closure() -> Any:
        t, n = site.values()
        if vat and y is None:  # unlabeled batch: VAT needs the logits only
            y_pred, n = self.stateless_call(t, n, x, **kwargs)
            site.report(y_pred=y_pred, non_trainable=n)
            return y_pred
        _, (loss, y_pred, n, m) = self.compute_loss_and_updates(
            t, n, metrics_values, x, y, sample_weight, training=True,
            optimizer_variables=optimizer_values,
        )
        site.report(y_pred=y_pred, non_trainable=n, metrics=m)
        return (loss, y_pred) if pair else loss

    teacher_slots: list[int] = []
    if adv.teacher is not None:
        site.teacher = adv.teacher
        teacher_slots = [slots[id(v)] for v in adv.teacher.variables]
        site.teacher_state = [metrics_values[i] for i in teacher_slots]

    with adv.hook.activate(site), jax_keys(site.next_key):
        loss = run_method(site, closure, method_now(self, adv, optimizer_values))

    first = site.records[0]
    grads = site.param_grads
    if grads is None:
        grads = [jnp.zeros_like(t) for t in trainable]
    grads = [jnp.zeros_like(t) if g is None else g for g, t in zip(grads, trainable)]
    new_metrics = list(first.get("metrics", metrics_values))
    new_metrics[counts_slot] = metrics_values[counts_slot] + site.counts
    new_metrics[key_slot] = jax.random.key_data(site.key)
    for i, value in zip(teacher_slots, site.teacher_state or []):
        new_metrics[i] = value
    return loss, grads, first["y_pred"], (trainable, site.non_trainable, optimizer_values, new_metrics)
