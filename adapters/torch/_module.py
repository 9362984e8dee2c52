"""The wrapped module: ``wrap`` / ``unwrap`` and the methods a wrapped module gains.

A wrapped module is the user's module (or, on the whole-model fx route, its
traced GraphModule) whose class is swapped for a subclass that adds
:class:`AdversarialModule`'s methods, as ``torch.nn.utils.parametrize`` does. The
subclass keeps the original class name, so ``isinstance`` checks, ``repr``,
HuggingFace ``save_pretrained`` (which records the class name) and state_dict
keys are unchanged. Parameter objects are never replaced: an optimizer built
before ``wrap`` keeps working.
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
from advgraph._methods import passes, run_method, single_delta

from ._calls import RunnerCalls
from ._fx import TraceRejected, trace_model, trace_module
from ._site import MatrixSite, OutputSite, Perturbation, Stats
from ._target import find_target
from ._weights import WeightSite, awp_parameters

logger = logging.getLogger("advgraph")

__all__ = ["AdversarialModule", "wrap", "unwrap", "is_wrapped"]


@dataclass
class _State:
    config: AdversarialConfig
    site: Any
    stats: Stats
    route: str
    target_path: str
    original_class: type
    original: nn.Module | None = None  # fx route: the untouched user model
    replaced: tuple[str, str, nn.Module] | None = None  # (parent path, child, module)
    handles: list[Any] = field(default_factory=list)
    sync: "_SyncDeferral | None" = None
    teacher: Any = None  # SMART's momentum teacher (adapters/torch/_calls.py)


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

    def forward_backward(self, closure: Callable[[], Any], **kwargs: Any) -> Any:
        self.done += 1
        self.sync.active = self.done < self.passes
        self.site.backward = self.backward
        try:
            return self.site.forward_backward(closure, **kwargs)
        finally:
            self.sync.active = False
            self.sync.resume()
            self.site.backward = None

    def __getattr__(self, name: str) -> Any:
        return getattr(self.site, name)

    def __setattr__(self, name: str, value: Any) -> None:
        if name in ("site", "sync", "backward", "passes", "done", "host"):
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
                The passes that only need the gradient at the embedding use
                ``torch.autograd.grad`` on the closure's loss.
            mask: ``method="neftune"``: the batch's token mask, shape (batch,
                sequence), nonzero for real tokens (e.g. ``attention_mask``); padding
                gets no noise and does not count in the length. Without it, padding
                is known from the embedding's ``padding_idx``, if it has one.

        Returns:
            The clean loss, detached.
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
        if state.config.mode == "matrix":
            _refuse_sharded_matrix(state)
        if state.site.active:
            raise RuntimeError(
                "adversarial_step() was called inside perturbed(); leave the block first. "
                f"{received(perturbation_active=True)}"
            )
        if state.sync is None:  # a module wrapped before this field existed
            state.sync = _SyncDeferral()
        runner = _StepRunner(state.site, state.sync, backward, passes(state.config))
        runner.host = self
        state.sync.deferred = 0
        if mask is not None:
            _check_mask(state, mask)
            state.site.step_mask = mask
        try:
            loss = run_method(runner, closure, state.config)
        finally:
            if mask is not None:
                state.site.step_mask = None
        if runner.done < runner.passes and state.sync.deferred:
            # The last pass ran with DDP's sync deferred: gradients were not all-reduced.
            raise RuntimeError(
                "advgraph internal error: the method ran fewer passes than advgraph._methods.passes() "
                "expects, so DDP's gradient sync was deferred in its last pass. "
                f"{received(method=state.config.method, passes=runner.done, expected=runner.passes)}"
            )
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
        # No local reference to delta: in matrix mode the site applies it in place and
        # keeps only the saved rows, so the block holds O(rows x d) once, not twice.
        site.set_delta(single_delta(site, state.config))
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
        """How the perturbation was installed: ``fx``, ``fx-submodule``, ``hook``, ``matrix`` or ``weights`` (awp)."""
        return _state(self).route

    @property
    def advgraph_target(self) -> str:
        """Dotted path of the perturbed embedding module."""
        return _state(self).target_path

    @property
    def advgraph_config(self) -> AdversarialConfig:
        """The resolved settings."""
        return _state(self).config

    def __deepcopy__(self, memo: dict[int, Any]) -> Any:
        state = _state(self)
        if state.route == "fx":
            original = copy.deepcopy(state.original, memo)
            new = _wrap(original, state.target_path, state.config)
            new.__dict__["_advgraph"].stats.__dict__.update(state.stats.__dict__)
            memo[id(self)] = new
            return new
        cls = type(self)
        new = cls.__new__(cls)
        memo[id(self)] = new
        for key, value in self.__dict__.items():
            new.__dict__[key] = copy.deepcopy(value, memo)
        return new

    def __reduce_ex__(self, protocol: Any) -> Any:
        # Pickle (torch.save of the whole module) an unwrapped copy plus the settings;
        # loading wraps it again. The dynamic class itself is not importable.
        state = _state(self)
        plain = unwrap(copy.deepcopy(self))
        return (_rewrap, (plain, state.target_path, state.config, state.stats.as_dict()))


def _rewrap(
    plain: nn.Module, target_path: str, config: AdversarialConfig, stats: dict[str, int]
) -> nn.Module:
    wrapped = _wrap(plain, target_path, config)
    wrapped.__dict__["_advgraph"].stats.__dict__.update(stats)
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


def _check_matrix_target(model: nn.Module, path: str, module: nn.Module) -> None:
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
    shared = [
        name
        for name, param in model.named_parameters(remove_duplicate=False)
        if param is module.weight and name != (f"{path}.weight" if path else "weight")
    ]
    if shared:
        warnings.warn(
            f"advgraph: the embedding weight {path}.weight is tied to {', '.join(shared)}; in "
            "mode='matrix' the perturbation reaches those layers too (e.g. an LM output head). "
            "mode='output' perturbs only the embedding's output.",
            AdvGraphWarning,
            stacklevel=4,
        )


def _check_mask(state: _State, mask: Any) -> None:
    if state.config.method != "neftune":
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
    if config.method not in ("r3f", "smart"):
        return
    tied = [
        name
        for name, param in model.named_parameters(remove_duplicate=False)
        if param is module.weight and name != f"{path}.weight"
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
        route="weights",
        target_path=path,
        original_class=type(model),
        handles=handles,
        sync=sync,
    )
    model.__class__ = _wrapped_class(type(model))
    model.__dict__["_advgraph"] = state
    logger.info("advgraph: wrapped %s: method=awp, %d weights under %r", type(model).__name__, len(named), path)
    return model


def _wrap(model: nn.Module, target: Any, config: AdversarialConfig) -> nn.Module:
    if config.method == "awp":
        return _wrap_weights(model, target, config)
    path, module = find_target(model, target)
    if path == "":
        raise ValueError(
            "`target` must be a submodule of the model (the embedding), not the model "
            f"itself. {received(target=type(module).__name__)}"
        )
    stats = Stats()
    handles: list[Any] = []
    original: nn.Module | None = None
    replaced: tuple[str, str, nn.Module] | None = None
    sharding = _sharding_of(model, path, module)
    if config.mode == "matrix":
        if sharding is not None:
            raise ValueError(_SHARDED_MATRIX + received(target=path, sharding=sharding))
        _check_matrix_target(model, path, module)
        _refuse_tied_joint(model, path, module, config)
        site: Any = MatrixSite(module, stats)
        handles.append(module.register_forward_hook(site.on_forward))
        # A delta given as a function (a random start) is drawn when the rows are known.
        handles.append(module.register_forward_pre_hook(site.before_lookup))
        host, route = model, "matrix"
    else:
        site = OutputSite(stats)

        def make() -> nn.Module:
            return Perturbation(site)

        try:
            if sharding is not None:
                # FSDP / ZeRO-3 manage the target's parameters through the module
                # object itself; a traced copy would read stale parameters.
                raise TraceRejected(f"the target's parameters are sharded: {sharding}")
            host, route, original = trace_model(model, path, make), "fx", model
        except TraceRejected as why_model:
            logger.info("advgraph: whole-model fx trace not used: %s", why_model)
            parent_path, _, child = path.rpartition(".")
            parent = model.get_submodule(parent_path)
            try:
                if sharding is not None:
                    raise TraceRejected(f"the target's parameters are sharded: {sharding}")
                gm = trace_module(module, make)
            except TraceRejected as why_module:
                logger.info("advgraph: fx trace of %s not used: %s", path, why_module)
                handles.append(module.register_forward_hook(site.output_hook))
                host, route = model, "hook"
            else:
                setattr(parent, child, gm)
                replaced = (parent_path, child, module)
                host, route = model, "fx-submodule"
    if config.method == "neftune":
        # NEFTune's padding: the ids of each call of the target and its padding_idx.
        called = host.get_submodule(path)
        site.padding_idx = getattr(called, "padding_idx", getattr(module, "padding_idx", None))
        handles.append(called.register_forward_pre_hook(site.record_ids, with_kwargs=True))
    handles.append(host.register_forward_pre_hook(site.begin_forward))
    sync = _SyncDeferral()
    handles.append(host.register_forward_pre_hook(sync.before_forward))
    state = _State(
        config=config,
        site=site,
        stats=stats,
        route=route,
        target_path=path,
        original_class=type(host),
        original=original,
        replaced=replaced,
        handles=handles,
        sync=sync,
    )
    host.__class__ = _wrapped_class(type(host))
    host.__dict__["_advgraph"] = state
    logger.info(
        "advgraph: wrapped %s: mode=%s method=%s route=%s target=%s",
        type(model).__name__,
        config.mode,
        config.method,
        route,
        path,
    )
    return host


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
    if state.replaced is not None:
        parent_path, child, module = state.replaced
        setattr(model.get_submodule(parent_path), child, module)
    model.__class__ = state.original_class
    del model.__dict__["_advgraph"]
    if state.original is not None:
        return state.original
    return model
