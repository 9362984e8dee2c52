"""The public :class:`Site`: what a method may ask of the model it runs on.

A site is the place where a method perturbs one wrapped model: the embedding's
output (``mode="output"``, delta shaped ``(batch, seq, dim)``), the embedding
matrix rows the batch touched (``mode="matrix"``, delta shaped ``(rows, dim)``) or
a set of weights (``AWP``). Every adapter implements it -- PyTorch output, matrix
and weights; Keras on TensorFlow, JAX and torch -- and every method, built in or
a user's own, is written once against it. A method that needs more asks for a
general primitive that serves every method, implemented once per adapter.

Why each call exists:

* ``forward_backward`` -- the pass: one forward under the current delta and one
  backward; every gradient method is a sequence of these.
* ``site_grad`` -- the gradient at the site of the last pass: the direction every
  attack ascends. One array per call of the target (encoder-decoders, bi-encoders).
* ``set_delta`` / ``clear`` -- install a perturbation, and remove it with the
  parameters restored bit for bit (copied back, never subtracted).
* ``record`` -- count skipped (zero / non-finite) gradients, so a method that
  computes its own delta reports what it skipped like the built-in ones.
* ``site_values`` -- the values at the site (for a delta relative to them: AWP's
  ``||w||``, or a user's FGM with ``delta_b = eps * ||e_b|| * g_b / ||g_b||``): the
  weights of a weight site; in ``mode="output"`` the target's output, without
  delta, of the last pass that kept a gradient (every adapter: PyTorch and Keras on
  TensorFlow, JAX and torch). Matrix sites have none.
* ``penalty_backward`` -- a forward, then a backward of ``loss + penalty(g)`` with
  ``g`` differentiable (a double backward): a penalty on the gradient cannot be
  built from passes that each end in a backward.
* ``joint_backward`` -- several forwards (each under its own delta, or none), one
  backward through all of them: consistency regularisers (R3F, SMART, R-Drop)
  compare outputs of forwards that must all receive gradients.
* ``forward_only`` -- a forward without backward; with ``teacher=True`` under the
  site's second set of parameter values (a momentum copy kept outside the model,
  see ``update_teacher``): a fixed target distribution, a teacher's outputs.
* ``update_teacher`` -- move that second set of values towards the model's.
* ``token_mask`` -- which positions are real tokens, for a delta that must not
  touch padding or is scaled by sequence length.

Guarantees every implementation gives (checked by ``tests/test_site_conformance.py``):

* **Exact restore.** After ``clear()`` -- also when a pass raised, and after
  ``KeyboardInterrupt`` -- every parameter is byte-identical to its value before
  ``set_delta``.
* **Per-call gradients.** When the target ran ``k > 1`` times in one forward,
  ``site_grad()`` is a tuple of ``k`` arrays in call order, and ``set_delta``
  takes the same structure (each call gets its own delta). In matrix mode the site
  is the rows themselves, which every call shares: one array over the union of the
  rows the calls touched, their gradients summed, in ascending id order (where the
  step needs static shapes -- always on JAX, with ``jit_compile=True`` on
  TensorFlow -- the array has one row per id position: the distinct ids' rows
  first, then zero rows, whose delta is never written). A site made of weights gives one
  array per weight (a tuple), whatever the calls.
* **Skipped gradients are counted.** ``record(result)`` of a
  :func:`advgraph.compute_delta` result that skipped a row (NaN/inf or zero
  gradient) adds one to ``skipped_nonfinite`` / ``skipped_zero`` of
  ``advgraph_stats``; a skipped row's delta is exactly 0. ``steps`` counts
  training steps (one per step, whatever the method), the same on every adapter.
* **Pass counting.** Every ``forward_backward``, ``penalty_backward`` and
  ``joint_backward`` is one pass; ``Method.passes()`` says how many a step runs,
  and the adapter treats the last one specially (DDP's gradient all-reduce,
  DeepSpeed's accumulation boundary); each pass's parameter gradients add up into
  the step's update. On PyTorch a step that runs another number of passes than
  ``passes()`` raises ``ValueError``.
"""

from __future__ import annotations

from typing import Any, Callable, Protocol, runtime_checkable

__all__ = ["Site"]

Array = Any
Closure = Callable[[], Any]


@runtime_checkable
class Site(Protocol):
    """The perturbation site of one wrapped model, as a method sees it.

    Arrays are the framework's own (``torch.Tensor``, ``tf.Tensor``, a jax array);
    a method computes with :func:`advgraph.compute_delta`, :func:`advgraph.project`
    and the array's own operators, so it runs on every adapter unchanged.

    Example:
        A method is a sequence of calls on the site (here FGM's step):

        >>> def fgm(site, closure, epsilon=1.0):
        ...     import advgraph
        ...     loss = site.forward_backward(closure, param_grads=True)
        ...     result = advgraph.compute_delta(site.site_grad(), epsilon)
        ...     site.record(result)
        ...     site.set_delta(result.delta)
        ...     try:
        ...         site.forward_backward(closure, param_grads=True, keep_grad=False)
        ...     finally:
        ...         site.clear()
        ...     return loss
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
        """One pass: run ``closure`` (a forward returning a scalar loss) under the
        current delta and backpropagate ``loss * scale``.

        ``param_grads=True``: the parameter gradients accumulate into the step's
        update; ``False``: only the gradient at the site is computed. The site's
        gradient of this pass is kept for :meth:`site_grad` unless
        ``keep_grad=False``. ``allow_none=True``: the closure may return ``None``
        (the forward runs, nothing is backpropagated, ``None`` is returned).
        Returns the loss, detached.
        """

    def site_grad(self) -> Array:
        """The gradient of the last pass's loss with respect to the site, shaped
        like delta; a tuple (one array per call of the target) when the target
        ran several times in the pass. Reading releases it. Under data parallelism
        (PyTorch: ``torch.distributed`` initialized, W ranks averaging gradients) it
        is the rank's share of the global batch's gradient, ``g_r / W``: what one
        process computes at these samples with a mean-reduced loss."""

    def set_delta(self, delta: Any) -> None:
        """Install ``delta`` at the site, replacing any delta installed before.

        ``delta`` is an array (the structure :meth:`site_grad` gave), or a function
        that receives zeros shaped like one call's delta (known only once the next
        forward reaches the site) and returns that call's delta; it is called once
        per call of the target.
        """

    def clear(self) -> None:
        """Remove the delta; every parameter is restored bit for bit."""

    def record(self, result: Any) -> None:
        """Count the rows a :class:`advgraph.DeltaResult` skipped (zero / non-finite)."""

    def site_values(self) -> Array:
        """The values at the site, in the structure :meth:`site_grad` gives.

        A weight site: the weights' current values. ``mode="output"``: the target's
        output (without delta) of each call in the last :meth:`forward_backward` that
        kept a gradient, until the next :meth:`set_delta` or :meth:`clear` (nothing
        O(batch) is held through the passes after it). ``mode="matrix"``: not
        available (``NotImplementedError``)."""

    def penalty_backward(self, closure: Closure, penalty: Callable[[Array], Array]) -> Any:
        """One pass: a forward, then a backward of ``loss + penalty(g)`` into the
        parameters, ``g`` the gradient at the site kept differentiable (a double
        backward). Returns the loss, detached. Under data parallelism (W ranks
        averaging gradients) ``g`` is the rank's share ``g_r / W`` (as
        :meth:`site_grad`) and the adapter counts ``penalty(g)`` W times, so a penalty
        summed over samples gives one process's on the concatenated batch."""

    def joint_backward(
        self, closure: Closure, deltas: Any, objective: Callable[[list[Any]], Array]
    ) -> Any:
        """One pass of several forwards: ``closure`` once per entry of ``deltas``
        (``None``: no delta; else what :meth:`set_delta` takes), every output kept
        differentiable, then one backward of ``objective(outputs)`` (a scalar) into
        the parameters; the delta is removed. Returns the objective, detached."""

    def forward_only(self, closure: Closure, *, teacher: bool = False) -> Any:
        """A forward without backward; the closure's output, detached.
        ``teacher=True``: under the teacher's parameter values (see
        :meth:`update_teacher`), the model's own parameters untouched."""

    def update_teacher(self, beta: float) -> None:
        """``teacher <- beta * teacher + (1 - beta) * params`` over the trainable
        parameters (the first call copies them). Once per optimizer step: a call
        when the parameters did not change since the last one leaves it alone."""

    def token_mask(self, like: Array) -> Array | None:
        """Inside a delta function: 1.0 for real tokens, 0.0 for padding, shaped
        like ``like`` with a last axis of 1; ``None`` when the site cannot tell."""
