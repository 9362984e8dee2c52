"""What every Keras backend shares: the hook at the target layer, the inserted
perturbation layer and the read-only view of the step counters.

Nothing here imports a backend (TensorFlow, JAX or torch): the backend's site
(``_site`` for TensorFlow, ``_jax``, ``_torch``) does the array work. A site
implements :class:`advgraph._methods.Site` and, for the hook, three calls:

- ``in_pass()``: whether a forward of the adversarial step runs now;
- ``on_output(x)``: the target's output in such a forward (returns ``x`` plus delta);
- ``before_lookup(ids)``: the target's input (mode='matrix': the token ids).
"""

from __future__ import annotations

import threading
import warnings
from collections.abc import Mapping
from contextlib import contextmanager
from typing import Any, Iterator

import keras

from advgraph._errors import AdvGraphWarning

__all__ = ["STAT_KEYS", "SiteHook", "Perturbation", "StatsBase", "is_reverse_call"]

STAT_KEYS = ("steps", "skipped_nonfinite", "skipped_zero")


class StatsBase(Mapping):
    """Counters of one wrapped model, read on the host as ``model.advgraph_stats``.

    ``steps``: adversarial deltas computed; ``skipped_nonfinite`` / ``skipped_zero``:
    steps whose gradient at the site held NaN/inf or was zero (for some sample in
    output mode), so delta was 0 there. The training step updates them on the
    device, inside the compiled step; reading a key copies the value to the host.
    Each backend stores them its own way (``_values``, ``reset``, ``record``).
    """

    def _values(self) -> list[int]:
        raise NotImplementedError

    def __getitem__(self, key: str) -> int:
        return self._values()[STAT_KEYS.index(key)]

    def __iter__(self) -> Iterator[str]:
        return iter(STAT_KEYS)

    def __len__(self) -> int:
        return len(STAT_KEYS)

    def __repr__(self) -> str:
        return f"advgraph_stats({dict(zip(STAT_KEYS, self._values()))})"

    def as_dict(self) -> dict[str, int]:
        return dict(zip(STAT_KEYS, self._values()))

    def reset(self) -> None:  # pragma: no cover - every backend overrides it
        raise NotImplementedError


def is_reverse_call(args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    """Whether a ``ReversibleEmbedding`` call is its output head (``reverse=True``).

    The head (a matmul with the transposed matrix, as GPT-2's tied LM head) is not
    the lookup: it is never perturbed in mode='output' and gives no gradient at the site.
    """
    reverse = kwargs.get("reverse", args[1] if len(args) > 1 else False)
    return reverse is True


class SiteHook:
    """Connects the target layer (perturbation layer or wrapped ``call``) to the site.

    One per wrapped model, shared by every trace; the site of the step being traced
    is thread-local (MirroredStrategy traces each replica in its own thread).
    Outside an adversarial step it does nothing: the output is returned unchanged,
    the same object, so predict/evaluate see the original model bit for bit.
    """

    def __init__(self, mode: str = "output", path: str = "") -> None:
        self._local = threading.local()
        self.mode = mode
        self.path = path
        self.warned_tied = False

    def active_site(self) -> Any:
        return getattr(self._local, "site", None)

    @contextmanager
    def activate(self, site: Any) -> Iterator[None]:
        previous = self.active_site()
        self._local.site = site
        try:
            yield
        finally:
            self._local.site = previous

    def __call__(self, x: Any) -> Any:
        """After the target: its output (mode='output')."""
        site = self.active_site()
        if site is None or not site.in_pass():
            return x
        return site.on_output(x)

    def before(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """Before the target: its inputs (mode='matrix': the token ids)."""
        site = self.active_site()
        if site is None or not site.in_pass():
            return
        inputs = args[0] if args else kwargs.get("inputs")
        site.before_lookup(inputs)

    def reverse(self) -> None:
        """The target's ``reverse=True`` call (a tied output head) ran in a pass."""
        site = self.active_site()
        if site is None or not site.in_pass() or self.mode != "matrix" or self.warned_tied:
            return
        self.warned_tied = True
        warnings.warn(
            f"advgraph: the embedding matrix of '{self.path}' is also the model's output "
            "head (ReversibleEmbedding with tied weights, reverse=True); in mode='matrix' the "
            "perturbed rows reach that head too. delta comes from the lookup's gradient "
            "only. mode='output' perturbs only the lookup's output.",
            AdvGraphWarning,
            stacklevel=2,
        )


@keras.saving.register_keras_serializable(package="advgraph")
class Perturbation(keras.layers.Layer):
    """The layer the graph rewrite inserts right after the embedding's output.

    Identity (it returns its input, the same tensor) except inside an adversarial
    training step, where it adds the current delta. It has no weights.

    Example:
        >>> import numpy as np
        >>> from advgraph.adapters.keras import Perturbation
        >>> x = np.ones((1, 2, 3), "float32")
        >>> bool((np.asarray(Perturbation()(x)) == x).all())
        True
    """

    def __init__(self, hook: SiteHook | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.supports_masking = True
        self._advgraph_hook = hook

    def call(self, inputs: Any) -> Any:
        hook = self._advgraph_hook
        if hook is None:
            return inputs
        return hook(inputs)

    def compute_output_shape(self, input_shape: Any) -> Any:
        return input_shape

    def get_config(self) -> dict[str, Any]:
        return super().get_config()
