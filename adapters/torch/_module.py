"""The wrapped module: ``wrap`` / ``unwrap`` and the methods a wrapped module gains.

``wrap`` returns the user's own module object, whose class is swapped for a
subclass that adds :class:`AdversarialModule`'s methods, as
``torch.nn.utils.parametrize`` does. The subclass keeps the original class name,
so ``isinstance`` checks, ``repr``, HuggingFace ``save_pretrained`` (which records
the class name) and state_dict keys are unchanged. Parameter objects are never
replaced: an optimizer built before ``wrap`` keeps working.

The perturbation sits in the *lookups*: the modules whose forward looks the
target weight up (for T5/BART the encoder's and the decoder's ``embed_tokens``
beside ``shared``). In output mode each lookup's class is swapped in the same way
for a generated subclass whose forward is the fx-rewritten code with the
perturbation node (:mod:`._fx`), or, when its forward does not trace, a forward
hook does the same. In matrix mode hooks on the lookups read their ids and
output gradients. Before each step the lookups are checked again, so a replaced
or resized embedding (``resize_token_embeddings``) is followed.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import sys
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from advgraph._config import AdversarialConfig
from advgraph._errors import AdvGraphWarning, received

from advgraph.methods._plain import PLAIN as _PLAIN
from advgraph.methods._plain import PlainStep

from ._calls import RunnerCalls, Teacher
from ._deepspeed import backward_before_last, check_backward
from ._fx import SITE_ATTR, TraceRejected, rewrite_lookup, scalar_attributes
from ._site import MatrixSite, OutputSite, Stats
from ._target import find_lookups, find_target, sharing_weight
from ._weights import WeightSite, awp_parameters

logger = logging.getLogger("advgraph")

__all__ = ["AdversarialModule", "wrap", "unwrap", "is_wrapped"]


@dataclass
class _Lookup:
    """One module that looks the target weight up, as installed."""

    path: str
    module: nn.Module
    base: type  # the module's own class
    route: str  # "fx" (class swapped), "hook" (forward hook) or "matrix" (hooks)
    code: str | None = None  # fx: the rewritten forward's source
    attrs: dict[str, Any] = field(default_factory=dict)  # fx: scalars traced as constants
    handles: list[Any] = field(default_factory=list)


@dataclass
class _State:
    config: AdversarialConfig
    site: Any
    stats: Stats
    target_path: str
    spec: Any  # "embedding", a dotted path, or the module object given as target
    target: nn.Module
    weight: Any  # the target's weight when the lookups were found
    lookups: list[_Lookup]
    original_class: type
    sharding: str | None = None
    handles: list[Any] = field(default_factory=list)
    sync: "_SyncDeferral | None" = None
    teacher: Any = None  # SMART's momentum teacher (adapters/torch/_calls.py)
    weights_route: bool = False  # method='awp': the site is a set of weights

    @property
    def route(self) -> str:
        if self.weights_route:
            return "weights"
        routes = sorted({lookup.route for lookup in self.lookups})
        return "+".join(routes) if routes else "none"


# --------------------------------------------------------------------------- distributed


class _SyncDeferral:
    """Keeps DistributedDataParallel from all-reducing in every pass of a step but the last.

    While ``active`` (set for the passes before the last one of ``adversarial_step``),
    the forward pre-hook of the wrapped module turns off ``require_backward_grad_sync``
    -- what ``DistributedDataParallel.no_sync()`` does -- on

    * the wrapped module itself when it is a DDP module (``advgraph.wrap(DDP(model))``;
      its pre-hook runs before DDP's forward reads the flag), and
    * the DDP module whose forward is running (``DDP(advgraph.wrap(model))`` with the
      closure calling the DDP module; Lightning, whose DDP forward runs the whole
      ``training_step``). DDP reads the flag after the inner forward, and Lightning
      before ``manual_backward``, so turning it off here is as good as ``no_sync()``.

    Those passes accumulate their gradients locally; the last pass's synced backward
    all-reduces the accumulated ``.grad`` once (DDP's gradient-accumulation semantics),
    so the clean gradients of ``objective="clean+adv"`` are included. ``resume`` turns
    the flags back on after each pass. A flag already off (the user's or the
    Trainer's ``no_sync()`` for a gradient-accumulation micro-batch) is left alone.
    """

    def __init__(self) -> None:
        self.active = False
        self.deferred = 0  # passes of the current step whose sync was deferred
        self._paused: list[Any] = []

    def before_forward(self, module: nn.Module, *_: Any) -> None:
        if not self.active:
            return
        for ddp in (module, getattr(DistributedDataParallel, "_active_ddp_module", None)):
            if isinstance(ddp, DistributedDataParallel) and ddp.require_backward_grad_sync:
                ddp.require_backward_grad_sync = False
                self._paused.append(ddp)
                self.deferred += 1

    def resume(self) -> None:
        while self._paused:
            self._paused.pop().require_backward_grad_sync = True

    def __getstate__(self) -> dict[str, Any]:
        return {"active": False, "deferred": 0, "_paused": []}

    def __deepcopy__(self, memo: dict[int, Any]) -> "_SyncDeferral":
        new = _SyncDeferral()
        memo[id(self)] = new
        return new


class _StepRunner(RunnerCalls):
    """The site as the method sees it during one ``adversarial_step``.

    Counts the passes: every pass but the last runs with DDP's gradient sync
    deferred; the passes that accumulate parameter gradients backpropagate with
    the caller's ``backward`` (e.g. ``accelerator.backward``) when one is given.
    """

    def __init__(self, site: Any, sync: _SyncDeferral, backward: Any, passes: int) -> None:
        self.site = site
        self.sync = sync
        self.backward = backward
        self.passes = passes
        self.done = 0
        self.backward_before_last = backward_before_last(backward)  # DeepSpeed: no boundary

    def forward_backward(self, closure: Callable[[], Any], **kwargs: Any) -> Any:
        self.done += 1
        self.sync.active = self.done < self.passes
        self.site.backward = self.backward if self.done >= self.passes else self.backward_before_last
        try:
            return self.site.forward_backward(closure, **kwargs)
        finally:
            self.sync.active = False
            self.sync.resume()
            self.site.backward = None

    def __getattr__(self, name: str) -> Any:
        return getattr(self.site, name)

    def __setattr__(self, name: str, value: Any) -> None:
        if name in ("site", "sync", "backward", "passes", "done", "backward_before_last", "host"):
            object.__setattr__(self, name, value)
        else:
            setattr(self.site, name, value)


def _fsdp_classes() -> tuple[type, ...]:
    fsdp = sys.modules.get("torch.distributed.fsdp")
    if fsdp is None:
        return ()
    names = ("FullyShardedDataParallel", "FSDPModule")
    return tuple(c for c in (getattr(fsdp, n, None) for n in names) if isinstance(c, type))


def _sharded_weight(weight: Any) -> str | None:
    """Why ``weight`` is a sharded parameter, or None."""
    if getattr(weight, "_fsdp_flattened", False):
        return "FullyShardedDataParallel flat parameter"
    dtensor_module = sys.modules.get("torch.distributed.tensor")
    dtensor = getattr(dtensor_module, "DTensor", None)
    if isinstance(dtensor, type) and isinstance(weight, dtensor):
        return "DTensor (FSDP2 fully_shard / tensor parallel)"
    if hasattr(weight, "ds_id"):
        return "DeepSpeed ZeRO-3 partitioned parameter"
    return None


def _sharding_of(model: nn.Module, path: str, module: nn.Module) -> str | None:
    """Why the target's parameters are sharded (FSDP / ZeRO-3) at wrap time, or None."""
    classes = _fsdp_classes()
    parts = path.split(".")
    for depth in range(len(parts) + 1):
        prefix = ".".join(parts[:depth])
        owner = model.get_submodule(prefix) if prefix else model
        if classes and isinstance(owner, classes):
            return f"{prefix or '<root>'} is {type(owner).__name__} (FSDP)"
    return _sharded_weight(getattr(module, "weight", None))


def _refuse_sharded_matrix(state: _State) -> None:
    """mode='matrix' at step time: the weight must still be the plain Parameter."""
    weight = getattr(state.site.embedding, "weight", None)
    why = _sharded_weight(weight)
    if why is None and not isinstance(weight, nn.Parameter):
        why = f"the embedding weight is now a {type(weight).__name__}, not an nn.Parameter (FSDP flattening)"
    if why is not None:
        raise ValueError(_SHARDED_MATRIX + received(target=state.target_path, sharding=why))


_SHARDED_MATRIX = (
    "mode='matrix' edits the rows of the embedding weight in place and restores them by "
    "copying; on a sharded parameter (FSDP, FSDP2 fully_shard, DeepSpeed ZeRO-3) the "
    "rows cannot be edited and restored exactly. Use mode='output', which works with "
    "sharded parameters. "
)


def _state(module: Any) -> _State:
    state = getattr(module, "__dict__", {}).get("_advgraph")
    if state is None:
        raise TypeError(
            "Expected a module returned by advgraph.wrap() (and not unwrapped since). "
            f"{received(model=type(module).__name__)}"
        )
    return state


class AdversarialModule:
    """Methods every module returned by ``advgraph.wrap`` has (PyTorch).

    Example:
        >>> import torch
        >>> import advgraph
        >>> model = torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.Flatten(), torch.nn.Linear(8, 2))
        >>> wrapped = advgraph.wrap(model, mode="matrix", epsilon=0.5)
        >>> x, y = torch.tensor([[1, 2], [3, 4]]), torch.tensor([0, 1])
        >>> loss = torch.nn.functional.cross_entropy(wrapped(x), y)
        >>> loss.backward()
        >>> with wrapped.perturbed():
        ...     torch.nn.functional.cross_entropy(wrapped(x), y).backward()
        >>> wrapped.advgraph_stats["steps"]
        1
    """

    def adversarial_step(
        self,
        closure: Callable[[], torch.Tensor],
        *,
        backward: Callable[[torch.Tensor], Any] | None = None,
        mask: torch.Tensor | None = None,
        step: int | None = None,
        plain: bool = False,
    ) -> torch.Tensor:
        """Run every forward/backward pass of the method for one training step.

        ``closure`` runs the wrapped model on the batch and returns the scalar loss
        (with a GradScaler, return ``scaler.scale(loss)``). Gradients accumulate in
        ``.grad`` as the method and ``objective`` prescribe; call
        ``optimizer.step()`` afterwards. Parameters are left exactly as they were
        (bit for bit), also when a pass raises.

        Under ``DistributedDataParallel`` (either ``advgraph.wrap(DDP(model))``, or
        ``DDP(advgraph.wrap(model))`` with the closure calling the DDP module) every
        pass but the last runs without gradient sync, as under ``no_sync()``: the
        gradients are all-reduced once per step, clean gradients included.

        Args:
            closure: runs the forward on the batch and returns the scalar loss.
            backward: backpropagates the loss of the passes that accumulate
                parameter gradients instead of ``loss.backward()``, e.g.
                ``accelerator.backward`` or a LightningModule's ``manual_backward``
                (they scale the loss for gradient accumulation / mixed precision).
                With DeepSpeed pass ``engine.backward``: every pass but the last then
                runs outside a gradient-accumulation boundary, so ZeRO keeps the
                clean pass's gradients.
                The passes that only need the gradient at the embedding use
                ``torch.autograd.grad`` on the closure's loss.
            mask: ``method="neftune"``: the batch's token mask, shape (batch,
                sequence), nonzero for real tokens (e.g. ``attention_mask``); padding
                gets no noise and does not count in the length. Without it, padding
                is known from the embedding's ``padding_idx``, if it has one.
            step: the step count the method's ``start`` and schedules read (e.g. the
                optimizer step under gradient accumulation, ``trainer.global_step``).
                Default: the number of ``adversarial_step`` calls so far.
            plain: run one plain forward/backward instead of the method (counted in
                ``plain_steps``), for a loop that decides itself when adversarial
                training starts (``AdversarialTrainer``'s ``start_epoch``).

        Returns:
            The clean loss, detached. Before the method's ``start``, a step is one
            plain forward/backward (counted in ``advgraph_stats["plain_steps"]``).
        """
        state = _state(self)
        if not callable(closure):
            raise TypeError(
                "adversarial_step() takes a closure: a function of no arguments that runs "
                f"the wrapped model and returns the loss. {received(closure=closure)}"
            )
        if backward is not None and not callable(backward):
            raise TypeError(
                "adversarial_step(backward=...) takes a function that backpropagates a loss "
                f"(e.g. accelerator.backward), or None. {received(backward=backward)}"
            )
        check_backward(self, backward)  # DeepSpeed ZeRO-1/2: engine.backward is needed
        if state.site.active:
            raise RuntimeError(
                "adversarial_step() was called inside perturbed(); leave the block first. "
                f"{received(perturbation_active=True)}"
            )
        if state.config.mode == "matrix":
            _refuse_sharded_matrix(state)
        if mask is not None:
            _check_mask(state, mask)
        if not state.weights_route:
            _follow(self, state)
        if state.sync is None:  # a module wrapped before this field existed
            state.sync = _SyncDeferral()
        index = state.stats.steps + state.stats.plain_steps if step is None else _check_step(step)
        method = state.config.settings
        if plain or index < method.start:
            method = _PLAIN.get(method.closure, _PLAIN["loss"])
        else:
            method = method.at(index)
        runner = _StepRunner(state.site, state.sync, backward, method.passes())
        runner.host = self
        state.sync.deferred = 0
        if mask is not None:
            state.site.step_mask = mask
        try:
            loss = method.step(runner, closure)
        finally:
            if mask is not None:
                state.site.step_mask = None
        if runner.done != runner.passes:
            # Checked on every step, not only under DDP: with fewer passes the last one ran
            # with DDP's sync deferred (gradients not all-reduced) and outside DeepSpeed's
            # accumulation boundary; with more, the sync and the boundary ran twice.
            raise ValueError(
                "A method's passes() must return the number of passes (forward_backward, "
                "penalty_backward and joint_backward calls) its step runs: DDP and DeepSpeed "
                "treat the last pass specially. The gradients of this step are accumulated "
                "and the parameters restored. "
                f"{received(method=method.label, passes_run=runner.done, passes_declared=runner.passes)}"
            )
        if isinstance(method, PlainStep):
            state.stats.plain_steps += 1
            return loss
        state.stats.steps += 1
        return loss

    @contextlib.contextmanager
    def perturbed(self) -> Iterator[Any]:
        """Install delta from the last backward's gradient; remove it on exit.

        The hand-written FGM loop: ``loss.backward()``; then inside
        ``with wrapped.perturbed():`` the adversarial forward and backward. The delta
        is removed when the block ends, also on error, leaving parameters bit-exact.
        """
        state = _state(self)
        site = state.site
        if site.active:
            raise RuntimeError(
                f"perturbed() blocks cannot be nested. {received(perturbation_active=True)}"
            )
        if state.config.mode == "matrix":
            _refuse_sharded_matrix(state)
        if not state.weights_route:
            _follow(self, state)
        # No local reference to delta: in matrix mode the site applies it in place and
        # keeps only the saved rows, so the block holds O(rows x d) once, not twice.
        site.set_delta(state.config.settings.delta(site))
        state.stats.steps += 1
        site.capturing = False  # the pass inside the block needs no gradient at the site
        try:
            yield self
        finally:
            site.capturing = True
            site.clear()

    @property
    def advgraph_stats(self) -> dict[str, int]:
        """Counters: ``steps``, ``skipped_nonfinite``, ``skipped_zero``."""
        return _state(self).stats.as_dict()

    @property
    def advgraph_route(self) -> str:
        """How the perturbation is installed in the lookups.

        ``"fx"``: each lookup's class is swapped for a generated subclass whose forward
        is the fx-rewritten code with the perturbation node (see ``advgraph_code``);
        ``"hook"``: a forward hook (a lookup whose forward does not trace, or sharded
        parameters); ``"fx+hook"`` when both occur; ``"matrix"`` in matrix mode.
        """
        return _state(self).route

    @property
    def advgraph_target(self) -> str:
        """Dotted path of the target embedding module."""
        return _state(self).target_path

    @property
    def advgraph_lookups(self) -> tuple[str, ...]:
        """Dotted paths of the modules perturbed: the target and every module that
        looks its weight up (T5/BART: ``shared``, ``encoder.embed_tokens``,
        ``decoder.embed_tokens``)."""
        return tuple(lookup.path for lookup in _state(self).lookups)

    @property
    def advgraph_code(self) -> str:
        """The rewritten forward of each lookup on the fx route, with the perturbation node.

        Example:
            >>> import torch
            >>> import advgraph
            >>> model = torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.Flatten())
            >>> print(advgraph.wrap(model).advgraph_code.splitlines()[0])
            # 0 (Embedding): fx-rewritten forward
        """
        parts = []
        for lookup in _state(self).lookups:
            if lookup.code is not None:
                header = f"# {lookup.path} ({lookup.base.__name__}): fx-rewritten forward"
                parts.append(header + "\n" + lookup.code.strip() + "\n")
            else:
                parts.append(f"# {lookup.path} ({lookup.base.__name__}): {lookup.route} route, no fx code\n")
        return "\n".join(parts)

    @property
    def advgraph_config(self) -> AdversarialConfig:
        """The resolved settings: ``mode`` and the method (``settings``)."""
        return _state(self).config

    @property
    def advgraph_method(self) -> Any:
        """The method object this model trains with (an :class:`advgraph.Method`,
        its defaults for the mode filled in)."""
        return _state(self).config.settings

    def __deepcopy__(self, memo: dict[int, Any]) -> Any:
        cls = type(self)
        new = cls.__new__(cls)
        memo[id(self)] = new
        for key, value in self.__dict__.items():
            new.__dict__[key] = copy.deepcopy(value, memo)
        # SMART's teacher: the copy's own values, and "an optimizer step happened since
        # its last update" carried over (the copy's parameters have new version counters).
        _state(new).teacher = _carry_teacher(self, _state(self).teacher, new)
        return new

    def __reduce_ex__(self, protocol: Any) -> Any:
        # Pickle (torch.save of the whole module) an unwrapped copy plus the settings,
        # the counters and SMART's teacher; loading wraps it again. The dynamic class
        # itself is not importable.
        state = _state(self)
        plain = unwrap(copy.deepcopy(self))
        spec = state.spec if isinstance(state.spec, str) else state.target_path
        teacher = _teacher_payload(self, state.teacher)
        return (_rewrap, (plain, spec, state.config, state.stats.as_dict(), teacher))


def _teacher_stale(host: nn.Module, teacher: Teacher) -> bool:
    """Whether a watched parameter was modified in place since the teacher's last update."""
    versions = {n: p._version for n, p in host.named_parameters()}
    return any(versions.get(n) != v for n, v in teacher.versions.items())


_TeacherPayload = tuple[dict[str, Any], list[str], bool]  # values, watched names, stale


def _teacher_payload(host: nn.Module, teacher: Teacher | None) -> _TeacherPayload | None:
    if teacher is None or teacher.values is None:
        return None
    values = {n: v.detach().clone() for n, v in teacher.values.items()}
    return values, list(teacher.versions), _teacher_stale(host, teacher)


def _restore_teacher(host: nn.Module, payload: _TeacherPayload | None) -> Teacher | None:
    if payload is None:
        return None
    values, watched, stale = payload
    teacher = Teacher()
    teacher.values = values
    params = dict(host.named_parameters())
    teacher.versions = {} if stale else {n: params[n]._version for n in watched if n in params}
    return teacher


def _carry_teacher(host: nn.Module, teacher: Teacher | None, new_host: nn.Module) -> Teacher | None:
    return _restore_teacher(new_host, _teacher_payload(host, teacher))


def _rewrap(
    plain: nn.Module,
    target_path: str,
    config: AdversarialConfig,
    stats: dict[str, int],
    teacher: _TeacherPayload | None = None,
) -> nn.Module:
    wrapped = _wrap(plain, target_path, config)
    wrapped.__dict__["_advgraph"].stats.__dict__.update(stats)
    wrapped.__dict__["_advgraph"].teacher = _restore_teacher(wrapped, teacher)
    return wrapped


_CLASSES: dict[type, type] = {}


def _wrapped_class(base: type) -> type:
    cls = _CLASSES.get(base)
    if cls is None:
        cls = type(base.__name__, (AdversarialModule, base), {"__module__": base.__module__})
        cls.__qualname__ = base.__qualname__
        _CLASSES[base] = cls
    return cls


def is_wrapped(module: Any) -> bool:
    return "_advgraph" in getattr(module, "__dict__", {})


def _check_matrix_target(
    model: nn.Module, path: str, module: nn.Module, lookups: list[tuple[str, nn.Module]]
) -> None:
    if not isinstance(module, nn.Embedding):
        raise TypeError(
            "mode='matrix' perturbs the rows of an nn.Embedding's weight; the target is not "
            f"an nn.Embedding (use mode='output'). {received(target=f'{path} ({type(module).__name__})')}"
        )
    if not module.weight.requires_grad:
        raise ValueError(
            "mode='matrix' needs the embedding weight to require grad (its gradient gives "
            "delta); the target is frozen. Use mode='output', which works with frozen "
            f"embeddings. {received(requires_grad=False)}"
        )
    looked_up = [m for _, m in lookups]
    shared = [
        f"{name}.weight"
        for name, m in model.named_modules(remove_duplicate=False)
        if getattr(m, "weight", None) is module.weight and not any(m is k for k in looked_up)
    ]
    if shared:
        warnings.warn(
            f"advgraph: the embedding weight {path}.weight is tied to {', '.join(shared)}; in "
            "mode='matrix' the perturbation reaches those layers too (e.g. an LM output head). "
            "mode='output' perturbs only the embedding's output.",
            AdvGraphWarning,
            stacklevel=6,
        )


def _install(path: str, module: nn.Module, site: Any, mode: str, sharding: str | None) -> _Lookup:
    """Put the site into one lookup module (see the module docstring)."""
    base = type(module)
    module.__dict__[SITE_ATTR] = site  # also marks the module as perturbed
    if mode == "matrix":
        handles = [
            module.register_forward_pre_hook(site.before_lookup),
            module.register_forward_hook(site.on_forward),
        ]
        return _Lookup(path, module, base, "matrix", handles=handles)
    try:
        if sharding is not None:
            # FSDP / ZeRO-3 swap the parameters of the module in and out around its
            # forward; tracing would read the sharded (or gathered) tensor of this moment.
            raise TraceRejected(f"the target's parameters are sharded: {sharding}")
        cls, code = rewrite_lookup(module)
    except TraceRejected as why:
        logger.info("advgraph: fx rewrite of %s not used (forward hook instead): %s", path, why)
        handle = module.register_forward_hook(site.output_hook)
        return _Lookup(path, module, base, "hook", handles=[handle])
    except BaseException:
        module.__dict__.pop(SITE_ATTR, None)
        raise
    module.__class__ = cls
    return _Lookup(path, module, base, "fx", code=code, attrs=scalar_attributes(module))


def _uninstall(lookup: _Lookup) -> None:
    for handle in lookup.handles:
        handle.remove()
    module = lookup.module
    if lookup.route == "fx" and type(module).__dict__.get("_advgraph_base") is lookup.base:
        module.__class__ = lookup.base
    module.__dict__.pop(SITE_ATTR, None)


def _find(
    model: nn.Module, spec: Any, config: AdversarialConfig
) -> tuple[str, nn.Module, list[tuple[str, nn.Module]], str | None]:
    """Target path and module, its lookups, and why its parameters are sharded (or None)."""
    path, module = find_target(model, spec)
    if path == "":
        raise ValueError(
            "`target` must be a submodule of the model (the embedding), not the model "
            f"itself. {received(target=type(module).__name__)}"
        )
    sharding = _sharding_of(model, path, module)
    lookups = find_lookups(model, path, module, every=spec == "embedding" and sharding is None)
    for lookup_path, lookup in lookups:
        if SITE_ATTR in vars(lookup):
            raise ValueError(
                "The embedding module is already perturbed by another model wrapped by advgraph "
                f"(they share the module); unwrap that model first. {received(target=lookup_path)}"
            )
    if config.mode == "matrix":
        if sharding is not None:
            raise ValueError(_SHARDED_MATRIX + received(target=path, sharding=sharding))
        _check_matrix_target(model, path, module, lookups)
        _refuse_tied_joint(model, path, module, config)
    return path, module, lookups, sharding


def _install_all(
    model: nn.Module,
    path: str,
    lookups: list[tuple[str, nn.Module]],
    site: Any,
    config: AdversarialConfig,
    sharding: str | None,
) -> list[_Lookup]:
    done: list[_Lookup] = []
    try:
        for path, module in lookups:
            done.append(_install(path, module, site, config.mode, sharding))
    except BaseException:
        for lookup in reversed(done):
            _uninstall(lookup)
        raise
    if isinstance(site, MatrixSite):
        site.lookups = [lookup.module for lookup in done]
    if config.settings.needs_token_mask:
        # NEFTune's padding: the ids of each call of a lookup and the target's padding_idx.
        for lookup in done:
            lookup.handles.append(lookup.module.register_forward_pre_hook(site.record_ids, with_kwargs=True))
        first = done[0].module if done else None
        site.padding_idx = getattr(first, "padding_idx", None)
    site.names = {
        "target": path,
        "sharing": sorted({p for _, m in lookups for p in sharing_weight(model, m)} - {path}),
    }
    return done


def _current_target(model: nn.Module, state: _State) -> Any:
    """The module the target names now (cheap: no walk over the model's modules)."""
    if state.spec == "embedding":
        getter = getattr(model, "get_input_embeddings", None)
        if callable(getter):
            try:
                return getter()
            except (NotImplementedError, AttributeError):
                return None
        return state.target  # a plain model: the largest / only embedding, checked at wrap
    if isinstance(state.spec, str):
        try:
            return model.get_submodule(state.spec)
        except AttributeError:
            return None
    return state.spec


_MISSING = object()


def _traced_attributes_changed(lookup: _Lookup) -> bool:
    """Whether a plain attribute the trace may have baked in as a constant changed."""
    now = vars(lookup.module)
    return any(now.get(name, _MISSING) != value for name, value in lookup.attrs.items())


def _follow(model: nn.Module, state: _State) -> None:
    """Before a step: follow a replaced or resized embedding.

    The lookups are found again when the target module or its weight Parameter was
    replaced (``set_input_embeddings``, a new ``weight``), or when a lookup's plain
    attributes that tracing turned into constants changed (``resize_token_embeddings``
    sets ``num_embeddings`` / ``padding_idx``; T5 then makes ``shared`` every lookup).
    """
    current = _current_target(model, state)
    if current is None:  # the path moved (a sharding wrapper): keep what is installed
        return
    weight = getattr(current, "weight", None)
    # A weight that FSDP / ZeRO-3 turned into a shard is the same weight: the fx-rewritten
    # forward reads ``self.weight`` when it runs, as the original forward does.
    replaced = (
        weight is not state.weight and isinstance(weight, nn.Parameter) and _sharded_weight(weight) is None
    )
    changed = current is not state.target or replaced
    if not changed:
        changed = any(
            lookup.route == "fx" and _traced_attributes_changed(lookup) for lookup in state.lookups
        )
    if not changed:
        return
    for lookup in reversed(state.lookups):
        _uninstall(lookup)
    state.lookups = []
    path, module, lookups, sharding = _find(model, state.spec, state.config)
    state.lookups = _install_all(model, path, lookups, state.site, state.config, sharding)
    state.target_path, state.target = path, module
    state.weight = getattr(module, "weight", None)
    state.sharding = sharding
    logger.info(
        "advgraph: the embedding changed; perturbing %s (route=%s)",
        ", ".join(lookup.path for lookup in state.lookups),
        state.route,
    )


def _check_step(step: Any) -> int:
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        if hasattr(step, "item") and getattr(step, "ndim", 1) == 0:
            return _check_step(step.item())
        raise TypeError(
            "adversarial_step(step=...) takes the step count, a non-negative int (e.g. "
            f"the optimizer step), or None. {received(step=step)}"
        )
    return step


def _check_mask(state: _State, mask: Any) -> None:
    if not state.config.settings.needs_token_mask:
        raise ValueError(
            "adversarial_step(mask=...) tells method='neftune' where the padding is; "
            f"method={state.config.method!r} does not read it. {received(method=state.config.method)}"
        )
    if not isinstance(mask, torch.Tensor) or mask.dim() != 2:
        raise TypeError(
            "adversarial_step(mask=...) takes a (batch, sequence) tensor, nonzero for real "
            f"tokens (e.g. attention_mask). {received(mask=getattr(mask, 'shape', mask))}"
        )


def _refuse_tied_joint(model: nn.Module, path: str, module: nn.Module, config: AdversarialConfig) -> None:
    """r3f / smart in matrix mode run a clean and a perturbed forward before one
    backward; the rows are edited in place in between, which autograd refuses when
    another layer (a tied LM head) saved the same weight for its backward."""
    if not config.settings.edits_between_forwards:
        return
    lookups = {p for p, _ in find_lookups(model, path, module, every=True)} | {path}
    tied = [
        name
        for name, param in model.named_parameters(remove_duplicate=False)
        if param is module.weight and name.rpartition(".")[0] not in lookups
    ]
    if tied:
        raise ValueError(
            f"method={config.method!r} in mode='matrix' backpropagates through a clean and a "
            "perturbed forward at once, but the embedding weight is tied to another layer "
            "that uses it after the rows are edited. Use mode='output'. "
            + received(method=config.method, tied_to=", ".join(tied))
        )


def _wrap_weights(model: nn.Module, target: Any, config: AdversarialConfig) -> nn.Module:
    """method='awp': the site is the target's weights (adapters/torch/_weights.py)."""
    path, named = awp_parameters(model, target)
    for name, param in named:
        why = _sharded_weight(param)
        if why is not None:
            raise ValueError(
                "method='awp' edits the target's weights in place and restores them by "
                "copying, which a sharded parameter (FSDP, ZeRO-3) does not allow. "
                + received(parameter=name, sharding=why)
            )
    stats = Stats()
    site = WeightSite(named, stats)
    sync = _SyncDeferral()
    handles = [model.register_forward_pre_hook(sync.before_forward)]
    state = _State(
        config=config,
        site=site,
        stats=stats,
        target_path=path,
        spec=target,
        target=model,
        weight=None,
        lookups=[],
        original_class=type(model),
        handles=handles,
        sync=sync,
        weights_route=True,
    )
    model.__class__ = _wrapped_class(type(model))
    model.__dict__["_advgraph"] = state
    logger.info("advgraph: wrapped %s: method=awp, %d weights under %r", type(model).__name__, len(named), path)
    return model


def _wrap(model: nn.Module, target: Any, config: AdversarialConfig) -> nn.Module:
    if config.mode == "weights":
        return _wrap_weights(model, target, config)
    path, module, lookups, sharding = _find(model, target, config)
    stats = Stats()
    site: Any = MatrixSite([m for _, m in lookups], stats) if config.mode == "matrix" else OutputSite(stats)
    installed = _install_all(model, path, lookups, site, config, sharding)
    sync = _SyncDeferral()
    handles = [
        model.register_forward_pre_hook(site.begin_forward),
        model.register_forward_pre_hook(sync.before_forward),
    ]
    state = _State(
        config=config,
        site=site,
        stats=stats,
        target_path=path,
        spec=target,
        target=module,
        weight=getattr(module, "weight", None),
        lookups=installed,
        original_class=type(model),
        sharding=sharding,
        handles=handles,
        sync=sync,
    )
    model.__class__ = _wrapped_class(type(model))
    model.__dict__["_advgraph"] = state
    logger.info(
        "advgraph: wrapped %s: mode=%s method=%s route=%s target=%s lookups=%s",
        type(model).__name__,
        config.mode,
        config.method,
        state.route,
        path,
        ", ".join(lookup.path for lookup in installed),
    )
    return model


def wrap(model: nn.Module, target: Any, config: AdversarialConfig) -> nn.Module:
    """PyTorch side of :func:`advgraph.wrap` (settings already validated)."""
    if is_wrapped(model):
        raise ValueError(
            "The model is already wrapped by advgraph; call advgraph.unwrap() first to "
            f"change the settings. {received(model=type(model).__name__)}"
        )
    for sub_name, sub in model.named_modules():
        if sub is not model and is_wrapped(sub):
            raise ValueError(
                "A submodule of the model is already wrapped by advgraph; unwrap it first. "
                f"{received(submodule=sub_name)}"
            )
    return _wrap(model, target, config)


def unwrap(model: nn.Module) -> nn.Module:
    """PyTorch side of :func:`advgraph.unwrap`."""
    state = _state(model)
    if state.site.active:
        raise RuntimeError(
            f"unwrap() inside perturbed(); leave the block first. {received(perturbation_active=True)}"
        )
    for handle in state.handles:
        handle.remove()
    for lookup in reversed(state.lookups):
        _uninstall(lookup)
    model.__class__ = state.original_class
    del model.__dict__["_advgraph"]
    return model
