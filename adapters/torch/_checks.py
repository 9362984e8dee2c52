"""Checks of what a user's closure returns (a leaf module: no import of the sites)."""

from __future__ import annotations

from typing import Any

import torch

from advgraph._errors import received

__all__ = ["check_loss"]


def check_loss(loss: Any) -> torch.Tensor:
    if not isinstance(loss, torch.Tensor):
        raise TypeError(
            "The closure must return the loss as a scalar torch.Tensor. "
            f"{received(closure_returned=type(loss).__name__)}"
        )
    if loss.numel() != 1:
        raise ValueError(
            "The closure must return a scalar loss (one element); reduce it first, e.g. "
            f".mean(). {received(loss_shape=tuple(loss.shape))}"
        )
    if not loss.requires_grad:
        raise ValueError(
            "The closure's loss does not require grad: it must come from a forward of the "
            "wrapped model with autograd enabled (not under torch.no_grad()). "
            f"{received(loss_requires_grad=False)}"
        )
    return loss
