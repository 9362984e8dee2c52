"""PyTorch Lightning integration: adversarial steps inside a LightningModule.

Lightning's automatic optimization runs one forward and one backward per step, so
adversarial training uses manual optimization (``self.automatic_optimization =
False``): wrap the network with :func:`advgraph.wrap` in ``__init__`` and call
:func:`adversarial_step` in ``training_step``. Every backward goes through
``manual_backward``, so Lightning's precision plugin (``"16-mixed"`` GradScaler,
``"bf16-mixed"`` autocast) and strategy apply; under the DDP strategy every pass
but the last runs without gradient sync, so gradients are all-reduced once per
step. Works with ``lightning`` (``import lightning.pytorch``) and the older
``pytorch_lightning`` package.

Example:
    >>> import torch
    >>> import lightning.pytorch as pl
    >>> import advgraph
    >>> from advgraph.integrations.lightning import adversarial_step
    >>> class Classifier(pl.LightningModule):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.automatic_optimization = False
    ...         emb, head = torch.nn.Embedding(10, 4), torch.nn.Linear(8, 2)
    ...         net = torch.nn.Sequential(emb, torch.nn.Flatten(), head)
    ...         self.net = advgraph.wrap(net, mode="output", epsilon=0.5)
    ...     def training_step(self, batch, batch_idx):
    ...         x, y = batch
    ...         opt = self.optimizers()
    ...         opt.zero_grad()
    ...         loss = adversarial_step(self, lambda: torch.nn.functional.cross_entropy(self.net(x), y))
    ...         opt.step()
    ...         return loss
    ...     def configure_optimizers(self):
    ...         return torch.optim.SGD(self.parameters(), lr=0.1)
"""

from __future__ import annotations

import importlib
from typing import Any, Callable

from advgraph._errors import received, require

_WHAT = "advgraph.integrations.lightning"
require("torch", "lightning", _WHAT)


def _lightning() -> Any:
    """``lightning.pytorch``, else ``pytorch_lightning``; ImportError naming the extra."""
    for name in ("lightning.pytorch", "pytorch_lightning"):
        try:
            return importlib.import_module(name)
        except ImportError:
            continue
    return require("lightning.pytorch", "lightning", _WHAT)


pl = _lightning()

import torch  # noqa: E402
from torch import nn  # noqa: E402

import advgraph  # noqa: E402

__all__ = ["adversarial_step", "find_wrapped"]


def find_wrapped(module: nn.Module) -> nn.Module:
    """The one module inside ``module`` (or ``module`` itself) returned by :func:`advgraph.wrap`.

    Raises:
        ValueError: there is none, or more than one (pass ``wrapped=`` then).

    Example:
        >>> import torch
        >>> import advgraph
        >>> from advgraph.integrations.lightning import find_wrapped
        >>> outer = torch.nn.Module()
        >>> outer.net = advgraph.wrap(torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.Linear(4, 2)))
        >>> find_wrapped(outer) is outer.net
        True
    """
    found = [(name, m) for name, m in module.named_modules() if advgraph.is_wrapped(m)]
    if len(found) != 1:
        raise ValueError(
            "Expected exactly one module wrapped by advgraph.wrap() inside the "
            "LightningModule (wrap the network in __init__, or pass wrapped=...). "
            f"{received(wrapped_modules=[name or '<root>' for name, _ in found])}"
        )
    return found[0][1]


def adversarial_step(
    module: Any,
    closure: Callable[[], torch.Tensor],
    *,
    wrapped: nn.Module | None = None,
) -> torch.Tensor:
    """Run every pass of one adversarial step from a LightningModule's ``training_step``.

    The passes that accumulate parameter gradients are backpropagated with
    ``module.manual_backward`` (precision plugin, strategy). Call
    ``optimizer.zero_grad()`` before and ``optimizer.step()`` after, as in any
    manual-optimization step.

    Args:
        module: the LightningModule, with ``automatic_optimization = False``.
        closure: runs the wrapped network on the batch and returns the scalar loss.
        wrapped: the module :func:`advgraph.wrap` returned; found inside ``module``
            when there is exactly one.

    Returns:
        The clean loss, detached. The method's ``start`` and schedules count
        ``trainer.global_step`` (optimizer steps).

    Raises:
        ValueError: automatic optimization is on, or no (or several) wrapped modules.
        TypeError: ``module`` is not a LightningModule.

    Example:
        In ``training_step`` of a LightningModule with manual optimization (a
        complete module is in this module's docstring)::

            opt = self.optimizers()
            opt.zero_grad()
            loss = adversarial_step(self, lambda: F.cross_entropy(self.net(x), y))
            opt.step()
    """
    if not isinstance(module, pl.LightningModule):
        raise TypeError(
            "adversarial_step() takes the LightningModule whose training_step is running. "
            f"{received(module=type(module).__name__)}"
        )
    if module.automatic_optimization:
        raise ValueError(
            "adversarial_step() runs several forward/backward passes per step, which needs "
            "manual optimization: set `self.automatic_optimization = False` in the "
            "LightningModule's __init__ and step the optimizer yourself. "
            f"{received(automatic_optimization=True)}"
        )
    if wrapped is None:
        wrapped = find_wrapped(module)
    elif not advgraph.is_wrapped(wrapped):
        raise ValueError(
            "`wrapped` must be the module returned by advgraph.wrap(). "
            f"{received(wrapped=type(wrapped).__name__)}"
        )
    # The method's `start` and schedules read the trainer's optimizer step count.
    trainer = getattr(module, "_trainer", None)
    step = int(trainer.global_step) if trainer is not None else None
    return wrapped.adversarial_step(closure, backward=module.manual_backward, step=step)
