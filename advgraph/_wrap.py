"""``wrap`` / ``unwrap``: find the model's framework and hand over to its adapter.

The framework is recognised through ``sys.modules``: a torch model can only exist
if torch is already imported, a Keras model only if keras is. Keras is asked
first: on Keras' torch backend a ``keras.Model`` is also a ``torch.nn.Module``,
and it must reach the Keras adapter. Only the adapter of that framework is imported.
"""

from __future__ import annotations

import sys
from typing import Any, TypeVar

from advgraph._config import UNSET, make_config
from advgraph._errors import received

__all__ = ["wrap", "unwrap", "is_wrapped"]

M = TypeVar("M")

# Methods added after the Keras adapter: a Keras model gets them only where the
# adapter lists them in SUPPORTED_METHODS (today it lists all of them).
_KERAS_PENDING = ("gp", "r3f", "smart", "neftune", "awp")


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
    method: str = "fgm",
    epsilon: float | None = UNSET,
    norm: str | None = None,
    per_sample: bool | None = None,
    steps: int | None = None,
    alpha: float | None = None,
    random_init: bool | None = None,
    objective: str | None = None,
    init_mag: float | None = None,
    xi: float | None = None,
    vat_weight: float | None = None,
    noise_eps: float | None = None,
    noise_type: str | None = None,
    r3f_lambda: float | None = None,
    smart_lambda: float | None = None,
    smart_mu: float | None = None,
    smart_beta: float | None = None,
    neftune_alpha: float | None = None,
    adv_lr: float | None = None,
    adv_eps: float | None = None,
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
        method: ``"fgm"`` (l2, default), ``"fgsm"`` (linf sign), ``"pgd"`` (Madry et
            al.), ``"freelb"`` (Zhu et al.), ``"vat"`` (Miyato et al., label-free;
            the closure returns ``logits`` or ``(loss, logits)``), ``"gp"``
            (gradient penalty), ``"r3f"`` (Aghajanyan et al.) and ``"smart"``
            (Jiang et al.; both: the closure returns ``(loss, logits)``),
            ``"neftune"`` (Jain et al.; output mode) or ``"awp"`` (Wu et al.;
            adversarial weight perturbation). See README's method table.
        epsilon: radius of the perturbation (FreeLB: max norm, ``None`` =
            unbounded; gp: the penalty weight). Default 1.0; not read by r3f,
            smart, neftune, awp.
        norm: ``"l2"`` or ``"linf"``; default from the method.
        per_sample: normalise per sample; default True for output, False for matrix.
        steps: pgd/freelb ascent steps (default 3); vat power iterations (default 1).
        alpha: pgd step size (default ``2.5 * epsilon / steps``); freelb (default 0.1).
        random_init: pgd random start (default False); freelb (default True).
        objective: ``"clean+adv"`` (clean and adversarial gradients add up; default)
            or ``"adv"`` (only the adversarial passes drive the update; FreeLB's only
            objective and its default).
        init_mag: freelb random-start magnitude (default 0.1).
        xi: vat power-iteration scale (default 0.1).
        vat_weight: weight of the VAT term (default 1.0).
        noise_eps: r3f / smart noise size (default 1e-5).
        noise_type: r3f noise, ``"uniform"`` (default) or ``"normal"``.
        r3f_lambda: weight of R3F's symmetric KL (default 1.0).
        smart_lambda: weight of SMART's smoothness term (default 1.0).
        smart_mu: weight of SMART's proximal term (default 1.0; 0 turns it off).
        smart_beta: momentum of SMART's teacher (default 0.99).
        neftune_alpha: NEFTune's alpha (default 5.0).
        adv_lr: AWP's relative step (default 0.005, Wu et al.'s gamma).
        adv_eps: AWP's relative elementwise bound (default 0.2).
        A knob the chosen method does not read raises ``ValueError``.

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
    """
    framework = _framework_of(model)
    if framework is None:
        raise TypeError(
            "`model` must be a torch.nn.Module or a keras.Model. "
            f"{received(model=type(model).__name__)}"
        )
    config = make_config(
        mode=mode,
        method=method,
        epsilon=epsilon,
        norm=norm,
        per_sample=per_sample,
        steps=steps,
        alpha=alpha,
        random_init=random_init,
        objective=objective,
        init_mag=init_mag,
        xi=xi,
        vat_weight=vat_weight,
        noise_eps=noise_eps,
        noise_type=noise_type,
        r3f_lambda=r3f_lambda,
        smart_lambda=smart_lambda,
        smart_mu=smart_mu,
        smart_beta=smart_beta,
        neftune_alpha=neftune_alpha,
        adv_lr=adv_lr,
        adv_eps=adv_eps,
    )
    if framework == "keras" and config.method in _KERAS_PENDING and not _keras_has(config.method):
        raise ValueError(
            f"method={config.method!r} runs on the PyTorch adapter; the Keras adapter does "
            f"not implement it yet. {received(method=config.method, framework='keras')}"
        )
    return _adapter(framework).wrap(model, target, config)


def _keras_has(method: str) -> bool:
    """Whether the Keras adapter says it runs ``method`` (``SUPPORTED_METHODS``)."""
    return method in getattr(_adapter("keras"), "SUPPORTED_METHODS", ())


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
