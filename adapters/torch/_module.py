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
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch
from torch import nn

from advgraph._config import AdversarialConfig
from advgraph._errors import AdvGraphWarning, received
from advgraph._methods import run_method, single_delta

from ._fx import TraceRejected, trace_model, trace_module
from ._site import MatrixSite, OutputSite, Perturbation, Stats
from ._target import find_target

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

    def adversarial_step(self, closure: Callable[[], torch.Tensor]) -> torch.Tensor:
        """Run every forward/backward pass of the method for one training step.

        ``closure`` runs the wrapped model on the batch and returns the scalar loss
        (with a GradScaler, return ``scaler.scale(loss)``). Gradients accumulate in
        ``.grad`` as the method and ``objective`` prescribe; call
        ``optimizer.step()`` afterwards. Parameters are left exactly as they were
        (bit for bit), also when a pass raises.

        Returns:
            The clean loss, detached.
        """
        state = _state(self)
        if not callable(closure):
            raise TypeError(
                "adversarial_step() takes a closure: a function of no arguments that runs "
                f"the wrapped model and returns the loss. {received(closure=closure)}"
            )
        if state.site.active:
            raise RuntimeError(
                "adversarial_step() was called inside perturbed(); leave the block first. "
                f"{received(perturbation_active=True)}"
            )
        loss = run_method(state.site, closure, state.config)
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
        delta = single_delta(site, state.config)
        site.set_delta(delta)
        state.stats.steps += 1
        try:
            yield self
        finally:
            site.clear()

    @property
    def advgraph_stats(self) -> dict[str, int]:
        """Counters: ``steps``, ``skipped_nonfinite``, ``skipped_zero``."""
        return _state(self).stats.as_dict()

    @property
    def advgraph_route(self) -> str:
        """How the perturbation was installed: ``fx``, ``fx-submodule``, ``hook`` or ``matrix``."""
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


def _wrap(model: nn.Module, target: Any, config: AdversarialConfig) -> nn.Module:
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
    if config.mode == "matrix":
        _check_matrix_target(model, path, module)
        site: Any = MatrixSite(module, stats)
        handles.append(module.register_forward_hook(site.on_forward))
        host, route = model, "matrix"
    else:
        site = OutputSite(stats)

        def make() -> nn.Module:
            return Perturbation(site)

        try:
            host, route, original = trace_model(model, path, make), "fx", model
        except TraceRejected as why_model:
            logger.info("advgraph: whole-model fx trace not used: %s", why_model)
            parent_path, _, child = path.rpartition(".")
            parent = model.get_submodule(parent_path)
            try:
                gm = trace_module(module, make)
            except TraceRejected as why_module:
                logger.info("advgraph: fx trace of %s not used: %s", path, why_module)
                handles.append(module.register_forward_hook(lambda m, a, out: site.on_output(out)))
                host, route = model, "hook"
            else:
                setattr(parent, child, gm)
                replaced = (parent_path, child, module)
                host, route = model, "fx-submodule"
    handles.append(host.register_forward_pre_hook(site.begin_forward))
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
