"""``wrap`` / ``unwrap``: find the model's framework and hand over to its adapter.

The framework is recognised through ``sys.modules``: a torch model can only exist
if torch is already imported, a Keras model only if keras is. Keras is asked
first: on Keras' torch backend a ``keras.Model`` is also a ``torch.nn.Module``,
and it must reach the Keras adapter. Only the adapter of that framework is imported.
"""

from __future__ import annotations

import sys
from typing import Any, TypeVar

from advgraph._config import make_config
from advgraph._errors import received

__all__ = ["wrap", "unwrap", "is_wrapped"]

M = TypeVar("M")


def _framework_of(model: Any) -> str | None:
    # Keras first: on the torch backend a keras.Model is also a torch.nn.Module.
    keras = sys.modules.get("keras")
    if keras is not None and isinstance(model, getattr(keras, "Model", ())):
        return "keras"
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(model, torch.nn.Module):
        return "torch"
    return None


def _adapter(framework: str) -> Any:
    if framework == "torch":
        from advgraph.adapters import torch as adapter
    else:
        from advgraph.adapters import keras as adapter
    return adapter


def wrap(
    model: M,
    target: Any = "embedding",
    mode: str = "output",
    *,
    method: Any = "fgm",
    **knobs: Any,
) -> M:
    """Add embedding-level adversarial training to a PyTorch or Keras model.

    Args:
        model: a ``torch.nn.Module`` or a compiled ``keras.Model``.
        target: ``"embedding"`` (the input word embedding), a dotted module path /
            layer name, or the module / layer object itself. ``method="awp"``: the
            module(s) whose weights are perturbed -- a path, a module, or a list of
            them; the model itself (or ``""``) means every module. Every parameter
            named ``weight`` under them that requires grad is perturbed.
        mode: ``"output"``: delta on the embedding's output, one per sample (Miyato
            et al.). ``"matrix"``: delta on the embedding matrix rows the batch
            touched, shared by every occurrence of a token (the classic Keras recipe).
        method: a method object -- ``advgraph.methods.FGM(...)``, ``FGSM``, ``PGD``,
            ``FreeLB``, ``VAT``, ``GP``, ``R3F``, ``SMART``, ``NEFTune``, ``AWP``, or a
            user's own :class:`advgraph.Method` -- or the lower-case name of a
            built-in one (default ``"fgm"``), with its settings as keywords.
        **knobs: with a name, that method's settings (``epsilon``, ``norm``,
            ``per_sample``, ``steps``, ``alpha``, ``random_init``, ``objective``,
            ``init_mag``, ``xi``, ``vat_weight``, ``noise_eps``, ``noise_type``,
            ``r3f_lambda``, ``smart_lambda``, ``smart_mu``, ``smart_beta``,
            ``neftune_alpha``, ``adv_lr``, ``adv_eps``, ``start``); each method's
            class documents its own and their defaults. A keyword the method does
            not read raises ``ValueError`` naming the ones it does.

    Returns:
        The wrapped model. Always use this object. PyTorch: it is ``model`` itself
        (same object, an instance of its class), with the same Parameter objects,
        state_dict keys and, with no perturbation active, outputs bit for bit; it adds
        ``adversarial_step(closure)`` and ``perturbed()``.
        Keras: ``fit()`` trains adversarially.

    Raises:
        TypeError: ``model`` is neither a torch nor a Keras model, or an argument
            has the wrong type.
        ValueError: an argument is out of range, or the target is not found / is
            ambiguous (the candidates are listed).

    Example:
        >>> import torch
        >>> import advgraph
        >>> model = torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.Flatten(), torch.nn.Linear(8, 2))
        >>> wrapped = advgraph.wrap(model, mode="output", epsilon=0.5)
        >>> x, y = torch.tensor([[1, 2], [3, 4]]), torch.tensor([0, 1])
        >>> loss = wrapped.adversarial_step(lambda: torch.nn.functional.cross_entropy(wrapped(x), y))
        >>> model = advgraph.unwrap(wrapped)
        >>> wrapped = advgraph.wrap(model, method=advgraph.methods.PGD(epsilon=0.5, steps=2))
        >>> wrapped.advgraph_method.passes()
        3
        >>> model = advgraph.unwrap(wrapped)
    """
    framework = _framework_of(model)
    if framework is None:
        raise TypeError(
            "`model` must be a torch.nn.Module or a keras.Model. "
            f"{received(model=type(model).__name__)}"
        )
    config = make_config(mode=mode, method=method, **knobs)
    return _adapter(framework).wrap(model, target, config)


def unwrap(model: M) -> M:
    """Remove what :func:`wrap` added; return the plain model.

    PyTorch: the returned module is the same object, with its original classes (its
    own and its embedding's) and a bit-identical forward. Keras: the original train_step.

    Raises:
        TypeError: ``model`` is not a model, or was not wrapped by advgraph.

    Example:
        >>> import torch
        >>> import advgraph
        >>> model = torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.Flatten(), torch.nn.Linear(8, 2))
        >>> advgraph.unwrap(advgraph.wrap(model)) is model
        True
    """
    framework = _framework_of(model)
    if framework is None:
        raise TypeError(
            "`model` must be a model returned by advgraph.wrap(). "
            f"{received(model=type(model).__name__)}"
        )
    return _adapter(framework).unwrap(model)


def is_wrapped(model: Any) -> bool:
    """Whether ``model`` was returned by :func:`wrap` and not yet unwrapped.

    Example:
        >>> import advgraph
        >>> advgraph.is_wrapped(object())
        False
    """
    try:
        framework = _framework_of(model)
        if framework is None:
            return False
        return bool(_adapter(framework).is_wrapped(model))
    except Exception:  # an adapter that cannot load (framework missing) wrapped nothing
        return False
