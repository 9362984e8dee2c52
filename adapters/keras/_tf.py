"""The TensorFlow backend of the Keras adapter: its sites and its ``train_step``.

The step: The adversarial ``train_step`` on the TensorFlow backend.

Runs inside Keras' compiled train function (``tf.function``, XLA with
``jit_compile=True``, the ``steps_per_execution`` loop, ``MirroredStrategy``
replicas): every pass of the method on a GradientTape site (below), the
parameter gradients summed, ONE ``optimizer.apply_gradients``.

The sites: Perturbation sites for Keras 3 on the TensorFlow backend, and its step counters.

Both sites implement :class:`advgraph.Site`, so the methods of
``advgraph._methods`` run on them unchanged. Everything here is graph-safe: it
runs inside the compiled train function (``tf.function``, also with
``jit_compile=True``), with no host round-trip.

A site lives for one trace of ``train_step``: the Python state it holds (the
captured tensors, the parameter gradients summed so far) is symbolic state of that
trace. Under ``tf.distribute.MirroredStrategy`` each replica traces its own
``train_step`` in its own thread, so each replica gets its own site; the target
layer reaches the right one through :class:`SiteHook`, which is thread-local.

Matrix mode:
    g is the *lookup* gradient of the touched rows: the gradient at each lookup's
    output (one row per id *position*, ``N`` = batch x sequence positions), summed per
    id (a tied output head's gradient is not part of it). Rows are laid out
    canonically, the distinct ids in ascending order (the layout depends only on the
    set of ids, so every pass, replica and random start agrees):

    1. ``order = argsort(ids)``; a position of the sorted ids starts a new row when
       its id differs from the previous one; ``rank = cumsum(starts) - 1``;
       ``seg[order] = rank`` maps every position to its row.
    2. ``rows = unsorted_segment_sum(values, seg, num)``; ``delta = epsilon * rows /
       ||rows||`` is the global-norm delta of the touched rows.
    3. No other layer reads the matrix (single replica): ``delta[seg]`` is added to
       the lookup's output, the values of looking up ``E + delta``; nothing is
       written. Else every position ``i`` writes matrix row ``ids[i]`` with
       ``saved[i] + delta[seg[i]]`` (``scatter_update``: assign semantics; positions
       sharing an id write identical bytes). Restore writes ``saved[i]``, the bytes
       read before: bit-exact, never a subtraction.

    ``num`` = the number of distinct ids is data-dependent (as ``tf.unique``'s
    output shape), which XLA cannot compile. With ``jit_compile=True`` the site uses
    ``num = N`` instead: the distinct rows first, zero rows after. Zero rows change
    neither an l2 norm nor a sign, so every gradient-driven delta (FGM, FGSM, PGD
    and FreeLB ascent steps, VAT's directions) is the same; only a random start
    (PGD/FreeLB ``random_init``, VAT's first direction) also draws noise for the
    padding rows, which is never written to the matrix but counts in its norm, so
    the start is somewhat smaller than without XLA. argsort, cumsum, scatter_nd,
    segment sums, gather and scatter_update all compile with static shapes.

    Extra memory per step: ``O(N * d)`` (the saved rows and delta), never a copy
    of the whole matrix.
"""

from __future__ import annotations

import warnings
from typing import Any, Callable

import keras
import tensorflow as tf

from advgraph._delta import DeltaResult
from advgraph._errors import received

from . import _private
from ._hook import (
    ReadOnceGrad,
    STAT_KEYS,
    Perturbation,
    SiteHook,
    StatsBase,
    check_labels,
    delta_for_call,
    is_reverse_call,
    run_method,
    token_mask_of,
)
from ._schedule import method_now

__all__ = [
    "MatrixSite",
    "OutputSite",
    "Perturbation",
    "SiteHook",
    "Stats",
    "WeightSite",
    "add_grads",
    "adversarial_gradients",
    "make_stats",
    "train_step",
]


def _all_reduce_sum(value: Any) -> Any:
    ctx = tf.distribute.get_replica_context()
    if ctx is None or ctx.num_replicas_in_sync <= 1:
        return value
    return ctx.all_reduce(tf.distribute.ReduceOp.SUM, value)


class Stats(StatsBase):
    """TensorFlow: the counters live in ``tf.Variable`` s that the train function
    updates in-graph (also under MirroredStrategy, where replicas agree on them).

    Example:
        >>> import tensorflow as tf
        >>> from advgraph.adapters.keras._tf import Stats
        >>> stats = Stats(tf.distribute.get_strategy())
        >>> dict(stats)
        {'steps': 0, 'plain_steps': 0, 'skipped_nonfinite': 0, 'skipped_zero': 0}
    """

    def __init__(self, strategy: Any) -> None:
        with strategy.scope():
            self._vars = {
                key: tf.Variable(
                    tf.constant(0, tf.int64),
                    trainable=False,
                    name=f"advgraph_{key}",
                    synchronization=tf.VariableSynchronization.ON_READ,
                    aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA,
                )
                for key in STAT_KEYS
            }

    def _values(self) -> list[int]:
        return [int(self._vars[key].numpy()) for key in STAT_KEYS]

    def reset(self) -> None:
        """Set every counter to 0 (host side)."""
        for var in self._vars.values():
            var.assign(tf.constant(0, tf.int64))

    def count_step(self, plain: bool = False) -> None:
        """Count one training step (in-graph)."""
        self._vars["plain_steps" if plain else "steps"].assign_add(tf.constant(1, tf.int64))

    def record(self, result: DeltaResult) -> None:
        """Count a skipped gradient (in-graph; replicas agree on the flags)."""
        flags = tf.stack(
            [
                tf.reduce_any(tf.convert_to_tensor(result.nonfinite)),
                tf.reduce_any(tf.convert_to_tensor(result.zero)),
            ]
        )
        flags = tf.cast(flags, tf.int64)
        flags = tf.minimum(_all_reduce_sum(flags), 1)
        self._vars["skipped_nonfinite"].assign_add(flags[0])
        self._vars["skipped_zero"].assign_add(flags[1])


def add_grads(a: Any, b: Any) -> Any:
    """Sum two gradients of one variable (None, dense tensors or IndexedSlices).

    Two ``IndexedSlices`` are concatenated (duplicate indices add up when the
    optimizer applies them), so a sparse gradient stays sparse.
    """
    if a is None:
        return b
    if b is None:
        return a
    if isinstance(a, tf.IndexedSlices) and isinstance(b, tf.IndexedSlices):
        indices = tf.concat([a.indices, tf.cast(b.indices, a.indices.dtype)], axis=0)
        return tf.IndexedSlices(
            tf.concat([a.values, b.values], axis=0), indices, a.dense_shape
        )
    return tf.convert_to_tensor(a) + tf.convert_to_tensor(b)


def check_loss(loss: Any) -> tf.Tensor:
    if not tf.is_tensor(loss):
        raise TypeError(
            "The training step's loss must be a scalar tensor. "
            f"{received(loss_type=type(loss).__name__)}"
        )
    if loss.shape.rank not in (None, 0):
        raise ValueError(
            "The training step's loss must be a scalar (compute_loss reduces it). "
            f"{received(loss_shape=tuple(loss.shape))}"
        )
    return loss


class _KerasSite(ReadOnceGrad):
    """What both sites share: one forward/backward under a GradientTape."""

    mode = "abstract"

    def __init__(self, model: keras.Model, stats: Stats) -> None:
        self.model = model
        self.stats = stats
        self.param_grads: list[Any] | None = None
        self.variables: list[Any] = list(model.trainable_variables)
        self._grad: Any = None
        self._tape: tf.GradientTape | None = None
        self._graph: Any = None

    # -- hooks for the subclasses -------------------------------------------------
    def _begin_pass(self, tape: tf.GradientTape) -> None:
        pass

    def _sources(self) -> list[Any]:
        raise NotImplementedError

    def _take_grad(self, grads: list[Any]) -> None:
        raise NotImplementedError

    def in_pass(self) -> bool:
        """Whether a forward of this step runs now (not a Keras shape-inference call).

        Keras' ``compute_output_spec`` calls layers in a scratch graph while building;
        those calls are not passes of the step and must be left alone.
        """
        return self._tape is not None and tf.compat.v1.get_default_graph() is self._graph

    # -- Site interface -----------------------------------------------------------
    def forward_backward(
        self,
        closure: Callable[[], Any],
        *,
        param_grads: bool,
        scale: float = 1.0,
        allow_none: bool = False,
        keep_grad: bool = True,
    ) -> Any:
        optimizer = getattr(self.model, "optimizer", None)
        with tf.GradientTape() as tape:
            self._tape = tape
            self._graph = tf.compat.v1.get_default_graph()
            self._begin_pass(tape)
            try:
                loss = closure()
            finally:
                self._tape = None
            if loss is None and allow_none:
                return None
            loss = check_loss(loss)
            unit = isinstance(scale, (int, float)) and scale == 1.0
            target = loss if unit else loss * tf.cast(scale, loss.dtype)
            if optimizer is not None:
                target = optimizer.scale_loss(target)
        sources = self._sources()
        if not keep_grad:
            sources = []
        if not self.variables:  # a model built by its first call, inside this trace
            self.variables = list(self.model.trainable_variables)
        variables = self.variables if param_grads else []
        if not sources and not variables:
            return tf.stop_gradient(loss)
        grads = tape.gradient(target, sources + variables)
        if keep_grad:
            self._take_grad(grads[: len(sources)])
        if param_grads:
            new = grads[len(sources) :]
            if self.param_grads is None:
                self.param_grads = list(new)
            else:
                self.param_grads = [add_grads(a, b) for a, b in zip(self.param_grads, new)]
        return tf.stop_gradient(loss)

    def record(self, result: DeltaResult) -> None:
        self.stats.record(result)

    def count_step(self, plain: bool = False) -> None:
        self.stats.count_step(plain)

    # -- calls for gp, r3f, smart and neftune (see advgraph.Site) -----------
    mask: Any = None  # set by the hook: a function giving the target's Keras mask

    def _accumulate(self, new: list[Any]) -> None:
        if self.param_grads is None:
            self.param_grads = list(new)
        else:
            self.param_grads = [add_grads(a, b) for a, b in zip(self.param_grads, new)]

    def _scaled(self, total: Any) -> Any:
        optimizer = getattr(self.model, "optimizer", None)
        return total if optimizer is None else optimizer.scale_loss(total)

    def _open(self, tape: tf.GradientTape) -> None:
        self._tape = tape
        self._graph = tf.compat.v1.get_default_graph()
        self._begin_pass(tape)

    def penalty_backward(self, closure: Callable[[], Any], penalty: Callable[[Any], Any]) -> Any:
        """gp: the site's gradient under an inner tape, recorded by an outer one."""
        if not self.variables:
            self.variables = list(self.model.trainable_variables)
        with tf.GradientTape() as outer:
            with tf.GradientTape() as inner:
                self._open(inner)
                try:
                    loss = check_loss(closure())
                finally:
                    self._tape = None
            self._take_grad(inner.gradient(loss, self._sources()))
            total = loss + tf.cast(penalty(self.site_grad()), loss.dtype)
            target = self._scaled(total)
        self._accumulate(outer.gradient(target, self.variables))
        return tf.stop_gradient(loss)

    def joint_backward(
        self, closure: Callable[[], Any], deltas: Any, objective: Callable[[list[Any]], Any]
    ) -> Any:
        """r3f / smart: every forward under one tape, one gradient of the objective."""
        if not self.variables:
            self.variables = list(self.model.trainable_variables)
        try:
            with tf.GradientTape() as tape:
                outs = []
                for delta in deltas:
                    self.clear()
                    if delta is not None:
                        self.set_delta(delta)
                    self._open(tape)
                    try:
                        outs.append(closure())
                    finally:
                        self._tape = None
                    self._sources()  # the target ran (once, in output mode)
                total = check_loss(objective(outs))
                target = self._scaled(total)
            self._accumulate(tape.gradient(target, self.variables))
        finally:
            self.clear()
        return tf.stop_gradient(total)

    def forward_only(self, closure: Callable[[], Any], *, teacher: bool = False) -> Any:
        """A forward outside any tape (the hook passes outputs through unchanged)."""
        if teacher:
            return self.teacher_forward(closure)
        return tf.nest.map_structure(tf.stop_gradient, closure())

    teacher: Any = None  # SMART's Teacher (set by the train step)
    teacher_pass = False  # the closure's forward is the teacher's (metrics skip it)

    def update_teacher(self, beta: float) -> None:
        if not self.variables:
            self.variables = list(self.model.trainable_variables)
        self.teacher.update([v.value for v in self.variables], beta, self.model.optimizer.iterations)

    def teacher_forward(self, closure: Callable[[], Any]) -> Any:
        """The closure with the teacher's values read for the trainable variables."""
        mapping = [(v, t.value) for v, t in zip(self.variables, self.teacher.values)]
        self.teacher_pass = True
        try:
            with keras.StatelessScope(state_mapping=mapping):
                return tf.nest.map_structure(tf.stop_gradient, closure())
        finally:
            self.teacher_pass = False

    def token_mask(self, like: Any) -> Any:
        return token_mask_of(self, like, lambda m: tf.cast(m, like.dtype)[..., None])

    def site_values(self) -> Any:
        raise NotImplementedError(
            "site_values() is the target's output in mode='output' (and the weights of a "
            f"weight site); mode='matrix' has none. {received(mode=self.mode)}"
        )


class OutputSite(_KerasSite):
    """delta on the target layer's output, shape ``(b, n, d)`` (one per sample)."""

    mode = "output"

    def __init__(self, model: keras.Model, stats: Stats) -> None:
        super().__init__(model, stats)
        self.delta: Any = None  # an array, a tuple (one per call), a function or None
        self._made: list[Any] = []  # what a function gave, one per call
        self._captured: list[Any] = []
        self._values: Any = None  # site_values()

    def _begin_pass(self, tape: tf.GradientTape) -> None:
        self._captured = []

    def on_output(self, x: Any) -> Any:
        """Called with the target's output during a forward of this step (each call)."""
        if not tf.is_tensor(x):
            raise ValueError(
                "mode='output' needs a target layer that returns one tensor. "
                f"{received(output_type=type(x).__name__)}"
            )
        if not x.dtype.is_floating:
            raise ValueError(
                "mode='output' needs a target whose output is floating point (an "
                f"embedding's vectors). {received(output_dtype=x.dtype.name)}"
            )
        self._tape.watch(x)  # also when the embedding is frozen
        call = len(self._captured)
        self._captured.append(x)
        delta = delta_for_call(self, call, x, lambda like: tf.zeros_like(like))
        if delta is not None:
            x = x + tf.cast(delta, x.dtype)
        return x

    def _sources(self) -> list[Any]:
        if not self._captured:
            raise ValueError(
                "The forward of the training step did not run the target layer, so there is "
                "no perturbation site. Train the model returned by advgraph.wrap(). "
                f"{received(target_calls=0)}"
            )
        return self._captured

    def _take_grad(self, grads: list[Any]) -> None:
        # One gradient per call of the target (a tuple when it ran several times).
        parts = tuple(
            tf.zeros_like(x) if g is None else tf.convert_to_tensor(g)  # None: delta = 0
            for x, g in zip(self._captured, grads)
        )
        self._grad = parts[0] if len(parts) == 1 else parts
        captured = tuple(self._captured)
        self._values = captured[0] if len(captured) == 1 else captured

    def site_values(self) -> Any:
        """The target's output (without delta) in the last pass that kept a gradient
        (a tuple, one per call, when the target ran several times)."""
        if self._values is None:
            raise RuntimeError(
                "No values at the perturbation site: site_values() reads the target's output "
                "of the last forward_backward() that kept a gradient, before any set_delta() "
                f"or clear(). {received(recorded_values=0)}"
            )
        return tf.nest.map_structure(tf.stop_gradient, self._values)

    def set_delta(self, delta: Any) -> None:
        self.delta = delta
        self._made = []
        self._values = None

    def clear(self) -> None:
        self.delta = None
        self._made = []
        self._values = None


class MatrixSite(_KerasSite):
    """delta on the rows of the ``embeddings`` variable that the batch touched.

    See the module docstring for the row layout (and its static-shape variant
    under XLA). Restore copies the saved rows back: bit-exact.
    """

    mode = "matrix"

    def __init__(
        self,
        model: keras.Model,
        stats: Stats,
        layer: keras.layers.Layer,
        static_shapes: bool,
        whole_matrix: bool = True,
    ) -> None:
        super().__init__(model, stats)
        self.layer = layer
        self.static_shapes = static_shapes
        # False: no other layer reads the matrix, so delta[row] is added to the lookup's
        # output (the values of looking up E + delta) and nothing is written to the
        # variable: an error anywhere in the compiled step leaves the matrix untouched.
        self.whole_matrix = whole_matrix
        self.rows_delta: Any = None  # the installed delta (functional path)
        self._offset: Any = 0
        self._ids: Any = None  # layout of the latest gradient / random start
        self._seg: Any = None
        self._dense = False
        self._saved: Any = None  # rows (or matrix) saved before the installed delta
        self._saved_ids: Any = None
        self._pending: Callable[[Any], Any] | None = None
        self._applied: tuple[Any, Any] | None = None  # (delta, seg) the function gave
        self._pass_ids: list[Any] = []
        self._lookups: list[tuple[Any, Any]] = []
        self._next_ids: Any = None

    @property
    def keras_variable(self) -> Any:
        """The layer's ``embeddings`` (a Keras variable)."""
        return self.layer.embeddings

    @property
    def variable(self) -> Any:
        """The backing ``tf.Variable`` (a ``MirroredVariable`` under MirroredStrategy)."""
        return self.keras_variable.value

    def _begin_pass(self, tape: tf.GradientTape) -> None:
        self._lookups = []  # (ids, output) of each lookup in this pass
        self._next_ids = None
        self._offset = 0
        self._pass_ids = []  # flat ids of this pass's lookups so far (a pending delta)
        if self._applied is not None:  # a function's delta, drawn in the last pass: kept
            self._pending = self._applied = None

    def _functional(self) -> bool:
        ctx = tf.distribute.get_replica_context()
        return not self.whole_matrix and (ctx is None or ctx.num_replicas_in_sync <= 1)

    def on_output(self, x: Any) -> Any:
        """The lookup's output: its gradient is the lookup gradient (functional path:
        plus the installed delta of each looked-up row)."""
        ids, self._next_ids = self._next_ids, None
        if ids is None or not tf.is_tensor(x) or not x.dtype.is_floating:
            return x
        self._tape.watch(x)  # also when the embedding is frozen
        self._lookups.append((ids, x))
        if self.rows_delta is not None:
            count = tf.size(ids, out_type=tf.int32)
            seg = tf.slice(self._seg, tf.reshape(self._offset, [1]), tf.reshape(count, [1]))
            self._offset = self._offset + count
            rows = tf.gather(tf.cast(self.rows_delta, x.dtype), seg)
            x = x + tf.reshape(rows, tf.shape(x))
        return x

    def _sources(self) -> list[Any]:
        if not self._lookups:
            raise ValueError(
                "The forward of the training step did not run the target layer, so there is "
                "no perturbation site. Train the model returned by advgraph.wrap(). "
                f"{received(target_calls=0)}"
            )
        return [out for _, out in self._lookups]

    # -- the row layout -------------------------------------------------------------
    def _layout(self, ids: Any) -> tuple[Any, Any, Any]:
        """``(ids, seg, num)``: flat ids, each position's row, the number of rows.

        Rows are the distinct ids in ascending order (the layout depends on the set of
        ids only, so every pass, replica and random start agrees on it). With
        ``static_shapes`` (XLA) there are ``num = N`` rows, the distinct ids first and
        zero rows after; else ``num`` = the number of distinct ids.
        """
        ids = tf.reshape(ids, [-1])
        count = tf.shape(ids, out_type=tf.int32)[0]
        order = tf.argsort(ids, stable=True)
        ordered = tf.gather(ids, order)
        positions = tf.range(count)
        first = tf.logical_or(
            tf.not_equal(ordered, tf.roll(ordered, 1, axis=0)), tf.equal(positions, 0)
        )
        rank = tf.cumsum(tf.cast(first, tf.int32)) - 1
        seg = tf.scatter_nd(order[:, None], rank, tf.reshape(count, [1]))
        num = count if self.static_shapes else tf.reduce_sum(tf.cast(first, tf.int32))
        return ids, seg, num

    def _take_grad(self, grads: list[Any]) -> None:
        """The lookup gradient of the touched rows (a tied head's gradient is not in it).

        The gradient at each lookup's output, per position, summed per id: what the
        lookup contributes to the matrix's gradient (its IndexedSlices).
        """
        dim = self.variable.shape[-1]
        ids, values = [], []
        for (call_ids, out), grad in zip(self._lookups, grads):
            if grad is None:  # the loss does not depend on the lookup: delta = 0
                grad = tf.zeros_like(out)
            ids.append(tf.reshape(call_ids, [-1]))
            values.append(tf.reshape(tf.convert_to_tensor(grad), [-1, dim]))
        ids = ids[0] if len(ids) == 1 else tf.concat(ids, axis=0)
        values = values[0] if len(values) == 1 else tf.concat(values, axis=0)
        ctx = tf.distribute.get_replica_context()
        if ctx is not None and ctx.num_replicas_in_sync > 1:
            # Every replica must write the same delta: the rows of the global batch.
            ids = ctx.all_gather(ids, axis=0)
            values = ctx.all_gather(values, axis=0)
        self._ids, self._seg, num = self._layout(ids)
        self._dense = False
        self._grad = tf.math.unsorted_segment_sum(values, self._seg, num_segments=num)

    # -- installing delta -------------------------------------------------------------
    def _same_on_all_replicas(self, delta: Any) -> Any:
        """Replica 0's delta everywhere (random starts are drawn per replica)."""
        ctx = tf.distribute.get_replica_context()
        if ctx is None or ctx.num_replicas_in_sync <= 1:
            return delta
        first = tf.equal(ctx.replica_id_in_sync_group, 0)
        return ctx.all_reduce(
            tf.distribute.ReduceOp.SUM, tf.where(first, delta, tf.zeros_like(delta))
        )

    def _restore(self) -> None:
        if self._saved is None:
            return
        var = self.variable
        if self._saved_ids is None:
            var.assign(self._saved)
        else:
            var.scatter_update(tf.IndexedSlices(self._saved, self._saved_ids))
        self._saved = self._saved_ids = None

    def _install(self, delta: Any) -> None:
        var = self.variable
        delta = self._same_on_all_replicas(tf.cast(delta, var.dtype))
        if self._functional():
            self.rows_delta = delta  # added at the lookup's output: nothing written
            return
        self._restore()
        if self._dense:
            self._saved = tf.identity(var.read_value())
            var.assign(self._saved + delta)
            return
        self._saved, self._saved_ids = tf.gather(var, self._ids), self._ids
        rows = self._saved + tf.gather(delta, self._seg)
        # Positions sharing an id write identical bytes: duplicates are harmless.
        var.scatter_update(tf.IndexedSlices(rows, self._ids))

    def before_lookup(self, inputs: Any) -> None:
        """Before the embedding's lookup: its ids; materialise a delta given as a function.

        The function gets zeros for the rows touched so far in the pass. When a later
        lookup of the same pass (an encoder-decoder's decoder, a bi-encoder's second
        encoder) touches more ids, it is called again with zeros for the union of
        rows; the rows perturbed already keep the values they were perturbed by (a
        method keeping the function's last array sees new draws on those rows only
        in that first pass).
        """
        if not tf.is_tensor(inputs) or not inputs.dtype.is_integer:
            return
        self._next_ids = inputs
        if self._pending is None:
            return
        ids = tf.reshape(inputs, [-1])
        ctx = tf.distribute.get_replica_context()
        if ctx is not None and ctx.num_replicas_in_sync > 1:
            ids = ctx.all_gather(ids, axis=0)  # the rows of the whole global batch
        self._pass_ids.append(ids)
        ids = ids if len(self._pass_ids) == 1 else tf.concat(self._pass_ids, axis=0)
        self._ids, self._seg, num = self._layout(ids)
        self._dense = False
        var = self.variable
        dtype = tf.float32 if var.dtype in (tf.float16, tf.bfloat16) else var.dtype
        delta = tf.convert_to_tensor(self._pending(tf.zeros(tf.stack([num, var.shape[1]]), dtype)))
        if self._applied is not None:  # rows of earlier lookups keep their delta
            old, old_seg = self._applied
            earlier = tf.slice(self._seg, [0], tf.shape(old_seg))
            delta = tf.tensor_scatter_nd_update(
                delta, earlier[:, None], tf.gather(tf.cast(old, delta.dtype), old_seg)
            )
        self._applied = (delta, self._seg)
        self._install(delta)

    def set_delta(self, delta: Any) -> None:
        self._applied = None
        if callable(delta):  # installed by the next lookup, which knows the rows
            self._restore()
            self.rows_delta = None
            self._pending = delta
            return
        self._pending = None
        if self._ids is None and not self._dense:
            raise RuntimeError(
                "set_delta() before any gradient at the site: the rows to perturb are not "
                f"known. {received(rows_known=False)}"
            )
        self._install(delta)

    def clear(self) -> None:
        self._pending = self._applied = None
        self.rows_delta = None
        self._restore()


class WeightSite(_KerasSite):
    """method='awp': delta on a set of variables (one array per variable, a tuple).

    The gradient at the site is this pass's gradient of each variable (dense). The
    perturbed values are assigned; restore assigns the values read before (bit-exact).
    """

    mode = "weights"

    def __init__(self, model: keras.Model, stats: Stats, weights: list[Any]) -> None:
        super().__init__(model, stats)
        self.weights = list(weights)
        self._chosen: list[int] = []
        self._saved: list[Any] | None = None

    def in_pass(self) -> bool:
        return False  # no hook: nothing happens at a layer's output

    def _sources(self) -> list[Any]:
        return list(self.weights)

    def _take_grad(self, grads: list[Any]) -> None:
        # Weights the loss does not reach (no gradient) are left alone, as on PyTorch.
        self._chosen = [i for i, g in enumerate(grads) if g is not None]
        if not self._chosen:
            raise RuntimeError(
                "No gradient at the perturbed weights: the loss does not depend on them. "
                f"{received(weights=len(self.weights))}"
            )
        self._grad = tuple(tf.convert_to_tensor(grads[i]) for i in self._chosen)

    def site_values(self) -> Any:
        return tuple(tf.identity(self.weights[i].value) for i in self._chosen)

    def set_delta(self, delta: Any) -> None:
        if callable(delta) or not isinstance(delta, tuple):
            raise TypeError(
                "advgraph internal error: the weight site takes one delta per weight (a tuple). "
                f"{received(delta=type(delta).__name__)}"
            )
        chosen = [self.weights[i] for i in self._chosen]
        if self._saved is None:
            self._saved = [tf.identity(v.value) for v in chosen]
        for var, saved, d in zip(chosen, self._saved, delta):
            var.assign(saved + tf.cast(d, saved.dtype))

    def clear(self) -> None:
        if self._saved is not None:
            for var, saved in zip([self.weights[i] for i in self._chosen], self._saved):
                var.assign(saved)
            self._saved = None


# --------------------------------------------------------------------------- the step

def make_stats(model: keras.Model) -> Stats:
    """Counters in ``tf.Variable`` s created in the model's distribution strategy."""
    return Stats(model.distribute_strategy)


def _unscale_for_distribution(loss: tf.Tensor) -> tf.Tensor:
    # Keras divides the compiled loss by the number of replicas; the logged loss is not.
    replicas = tf.distribute.get_strategy().num_replicas_in_sync
    if replicas > 1:
        loss = loss * tf.cast(replicas, loss.dtype)
    return loss


def train_step(self: keras.Model, data: Any, state: Any) -> dict[str, Any]:
    """The wrapped model's ``train_step``: every pass of the method, one update.

    Mirrors Keras' TensorFlow ``train_step``: the loss tracker and the compiled
    metrics see the clean pass (its loss and predictions; FreeLB: its first pass;
    VAT on an unlabeled batch, ``fit(x)`` with no ``y``: the VAT loss, and the
    model's outputs are taken as logits); the loss is scaled with
    ``optimizer.scale_loss`` in every pass (mixed precision: the
    ``LossScaleOptimizer`` unscales the summed gradients and skips non-finite
    ones); ``optimizer.apply_gradients`` runs once with the summed gradients.
    """
    x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
    loss, site, predictions = _passes(self, x, y, sample_weight, state)
    first = next(t for t in keras.tree.flatten(x) if t is not None)
    _private.loss_tracker(self).update_state(
        _unscale_for_distribution(loss), sample_weight=tf.shape(first)[0]
    )
    if site.variables:
        grads = site.param_grads or [None] * len(site.variables)
        self.optimizer.apply_gradients(zip(grads, site.variables))
    else:
        warnings.warn("The model does not have any trainable weights.", stacklevel=2)
    if y is None:
        return self.get_metrics_result()
    return self.compute_metrics(x, y, predictions[0], sample_weight=sample_weight)


def adversarial_gradients(self: keras.Model, data: Any, state: Any) -> tuple[Any, list[Any], Any]:
    """``advgraph.keras.adversarial_gradients`` on TensorFlow: every pass of the
    method (a GradientTape per pass), nothing applied; ``(loss, grads, y_pred)``,
    ``grads`` in ``self.trainable_variables`` order (``None`` where a variable has
    no gradient)."""
    x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
    loss, site, predictions = _passes(self, x, y, sample_weight, state)
    grads = site.param_grads or [None] * len(site.variables)
    return loss, list(grads), predictions[0]


def _passes(self: keras.Model, x: Any, y: Any, sample_weight: Any, state: Any) -> tuple[Any, Any, list[Any]]:
    """Every pass of the method on a GradientTape site: ``(loss, site, predictions)``."""
    config = state.config
    check_labels(config.settings, y)
    site: Any
    if config.mode == "matrix":
        site = MatrixSite(
            self,
            state.stats,
            state.target,
            static_shapes=bool(self.jit_compile),
            whole_matrix=state.shared_matrix,
        )
    elif config.mode == "weights":
        site = WeightSite(self, state.stats, state.weights)
    else:
        site = OutputSite(self, state.stats)
    site.teacher = state.teacher
    predictions: list[Any] = []
    vat = config.settings.closure == "logits"
    pair = config.settings.closure != "loss"  # the closure returns (loss, logits)

    def closure() -> Any:
        # Metrics see the first (clean) pass only: the per-output loss trackers of
        # compile(), and any metric a forward or compute_loss updates, are put back
        # after the later passes (in-graph: the variables' values before the pass).
        later = bool(predictions)
        metric_vars = list(self.metrics_variables) if later else []
        saved = [tf.identity(v) for v in metric_vars]
        if _private.call_has_training_arg(self):
            y_pred = self(x, training=True)
        else:
            y_pred = self(x)
        if not site.teacher_pass:  # SMART's teacher forward: not the clean pass
            predictions.append(y_pred)
        if vat and y is None:  # unlabeled batch: VAT needs the logits only
            out = y_pred
        else:
            loss = _private.compute_loss(self, x, y, y_pred, sample_weight)
            out = (loss, y_pred) if pair else loss
        for var, value in zip(metric_vars, saved):
            var.assign(value)
        return out

    with state.hook.activate(site):
        loss = run_method(site, closure, method_now(self, state))
    return loss, site, predictions
