"""HuggingFace ``Trainer`` integration: adversarial training by changing one class name.

An existing script keeps its model, data, ``TrainingArguments`` and callbacks; it
swaps ``Trainer`` for :class:`AdversarialTrainer` and passes the keyword arguments
of :func:`advgraph.wrap` as ``adversarial={...}``::

    trainer = AdversarialTrainer(
        model=model, args=args, train_dataset=train,
        adversarial={"mode": "output", "method": "fgm", "epsilon": 1.0},
    )
    trainer.train()

How it hooks in (tested with transformers 5.23 and accelerate 1.15):

- The model is wrapped with :func:`advgraph.wrap` in ``__init__`` (and in
  ``call_model_init`` for ``model_init=``), i.e. on the plain model, *before*
  accelerate prepares it (DDP / FSDP / mixed-precision forward). The wrapped model
  is still the HF model: same class name, Parameter objects and state_dict keys, so
  ``save_model`` / ``save_pretrained`` / ``from_pretrained`` are unchanged.
- ``training_step`` runs ``wrapped.adversarial_step``; each of its passes is the
  parent ``Trainer.training_step`` itself, with ``accelerator.backward`` captured:
  the parent computes the loss exactly as it always does (``compute_loss``,
  autocast, ``n_gpu`` mean, the division by the gradient accumulation steps or
  ``num_items_in_batch``), and the passes that accumulate parameter gradients are
  backpropagated through the real ``accelerator.backward`` with the parent's
  arguments (GradScaler for fp16, DeepSpeed's engine, ...). Under DDP every pass
  but the last runs without gradient sync (see ``adversarial_step``); under
  DeepSpeed every pass but the last is not a gradient-accumulation boundary (no
  ``engine.step()``), so ZeRO keeps the clean pass's gradients; the Trainer's own
  ``no_sync`` / accumulation micro-batches are respected.
- Evaluation and prediction are untouched (no perturbation is active there).
- Methods that compare output distributions (``vat``, ``r3f``, ``smart``) get the
  logits of each pass from the model's output (``outputs.logits``), so the closure
  contract ``(loss, logits)`` holds without a custom ``compute_loss``. Their
  regulariser is not divided by ``gradient_accumulation_steps`` as the loss is.
  ``neftune`` takes the batch's ``attention_mask`` as its token mask.

For a Trainer subclass of your own (e.g. from TRL), put the mixin first:
``class MyAdversarialTrainer(AdversarialTrainerMixin, MyTrainer): ...``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from advgraph._errors import received, require

_WHAT = "advgraph.integrations.transformers"
require("torch", "transformers", _WHAT)
transformers = require("transformers", "transformers", _WHAT)
require("accelerate", "transformers", _WHAT)

import torch  # noqa: E402
from torch import nn  # noqa: E402

import advgraph  # noqa: E402

__all__ = ["AdversarialTrainer", "AdversarialTrainerMixin"]

_WRAP_OPTIONS = ("target", "mode", "method")
# The Trainer's own option: plain steps before this epoch (the Kaggle AWP form).
_TRAINER_OPTIONS = ("start_epoch",)


def _knobs() -> tuple[str, ...]:
    """Every keyword some built-in method takes through wrap()."""
    from advgraph.methods._names import BUILTIN, keywords

    return tuple(sorted({k for name in BUILTIN for k in keywords(name)}))


def _check_options(adversarial: Any) -> dict[str, Any]:
    if not isinstance(adversarial, Mapping):
        raise TypeError(
            "`adversarial` must be a dict of advgraph.wrap() keyword arguments, e.g. "
            f'{{"mode": "output", "epsilon": 1.0}}. {received(adversarial=adversarial)}'
        )
    allowed = _WRAP_OPTIONS + _knobs() + _TRAINER_OPTIONS
    unknown = sorted(str(k) for k in adversarial if k not in allowed)
    if unknown:
        raise TypeError(
            f"`adversarial` takes the keyword arguments of advgraph.wrap() "
            f"({', '.join(_WRAP_OPTIONS)} and the method's settings: {', '.join(_knobs())}) "
            f"and `start_epoch`. {received(unknown=unknown)}"
        )
    options = dict(adversarial)
    start_epoch = options.get("start_epoch", 0)
    if isinstance(start_epoch, bool) or not isinstance(start_epoch, (int, float)) or start_epoch < 0:
        raise TypeError(
            "`start_epoch` must be a non-negative number: the epoch from which steps are "
            f"adversarial (plain steps before it). {received(start_epoch=start_epoch)}"
        )
    return options


def _not_a_boundary(accelerator: Any, backward: Any) -> Any:
    """``backward`` for the passes before a step's last one under DeepSpeed.

    accelerate's DeepSpeed backward makes each call a gradient-accumulation boundary
    (and runs ``engine.step()``) when ``sync_gradients`` is set; the passes before the
    last run with it off, so their gradients accumulate and the step is taken once.
    """

    def before_last(loss: torch.Tensor) -> None:
        state = accelerator.gradient_state
        saved = state.sync_gradients
        state._set_sync_gradients(False)
        try:
            backward(loss)
        finally:
            state._set_sync_gradients(saved)

    return before_last


class AdversarialTrainerMixin:
    """Adds embedding-level adversarial training to a ``transformers.Trainer`` (sub)class.

    Put it first in the bases. It takes one extra keyword argument, ``adversarial``:
    the keyword arguments of :func:`advgraph.wrap` (``None`` = its defaults:
    ``mode="output"``, ``method="fgm"``, ``epsilon=1.0``). A model that is already
    wrapped by advgraph is used as it is (then leave ``adversarial`` out).

    Example:
        >>> from transformers import Trainer
        >>> from advgraph.integrations.transformers import AdversarialTrainerMixin
        >>> class MyAdversarialTrainer(AdversarialTrainerMixin, Trainer):
        ...     pass
    """

    def __init__(self, *args: Any, adversarial: Mapping[str, Any] | None = None, **kwargs: Any) -> None:
        self._advgraph_options: dict[str, Any] | None = (
            None if adversarial is None else _check_options(adversarial)
        )
        self._advgraph_cache: tuple[Any, nn.Module] | None = None
        if args:
            args = (self._advgraph_wrap(args[0]), *args[1:])
        elif kwargs.get("model") is not None:
            kwargs["model"] = self._advgraph_wrap(kwargs["model"])
        elif kwargs.get("model_init") is None:
            raise ValueError(
                "AdversarialTrainer needs `model` (or `model_init`) to wrap. "
                f"{received(model=None, model_init=None)}"
            )
        super().__init__(*args, **kwargs)
        n_gpu = getattr(self.args, "n_gpu", 1)  # type: ignore[attr-defined]
        if n_gpu > 1:
            raise ValueError(
                "AdversarialTrainer expects one process per device (launch with torchrun or "
                "`accelerate launch`); torch.nn.DataParallel over several GPUs in one process "
                f"is not supported. {received(n_gpu=n_gpu)}"
            )

    # -- wrapping -----------------------------------------------------------------
    def _advgraph_wrap(self, model: Any) -> Any:
        if not isinstance(model, nn.Module):
            return model  # Trainer itself reports a model of the wrong type
        if advgraph.is_wrapped(model):
            if self._advgraph_options is not None:
                raise ValueError(
                    "The model is already wrapped by advgraph; pass either a wrapped model or "
                    "`adversarial=...`, not both. "
                    f"{received(adversarial=self._advgraph_options)}"
                )
            return model
        options = {k: v for k, v in (self._advgraph_options or {}).items() if k not in _TRAINER_OPTIONS}
        return advgraph.wrap(model, **options)

    def call_model_init(self, trial: Any = None) -> nn.Module:
        """``Trainer.call_model_init`` with the fresh model wrapped by advgraph."""
        return self._advgraph_wrap(super().call_model_init(trial))  # type: ignore[misc]

    def _advgraph_module(self, model: nn.Module) -> nn.Module:
        """The advgraph-wrapped module inside ``model`` (which may be DDP/FSDP-wrapped)."""
        cache = self._advgraph_cache
        if cache is not None and cache[0] is model and advgraph.is_wrapped(cache[1]):
            return cache[1]
        found = next((m for m in model.modules() if advgraph.is_wrapped(m)), None)
        if found is None:
            raise RuntimeError(
                "AdversarialTrainer: the model being trained holds no module wrapped by "
                "advgraph (was it unwrapped or replaced after the Trainer was built?). "
                f"{received(model=type(model).__name__)}"
            )
        self._advgraph_cache = (model, found)
        return found

    # -- the training step --------------------------------------------------------
    def training_step(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        num_items_in_batch: Any = None,
    ) -> torch.Tensor:
        """All adversarial passes of one micro-batch; returns the clean loss (detached).

        Each pass runs the parent ``training_step`` with ``accelerator.backward``
        captured, so the loss is computed and scaled exactly as the Trainer does;
        the passes that accumulate parameter gradients then go through the real
        ``accelerator.backward``.
        """
        wrapped = self._advgraph_module(model)
        accelerator = self.accelerator  # type: ignore[attr-defined]
        parent = super().training_step  # type: ignore[misc]
        # (Trainers before transformers 4.46 have no num_items_in_batch argument.)
        step_args: tuple[Any, ...] = (model, inputs)
        if num_items_in_batch is not None:
            step_args += (num_items_in_batch,)
        captured: dict[str, Any] = {}

        def capture(loss: torch.Tensor, **kwargs: Any) -> None:
            captured["loss"], captured["kwargs"] = loss, kwargs

        def closure() -> torch.Tensor:
            captured.clear()
            own = accelerator.__dict__.get("backward")
            accelerator.backward = capture
            try:
                parent(*step_args)
            finally:
                if own is None:
                    del accelerator.backward
                else:
                    accelerator.backward = own
            if "loss" not in captured:
                raise RuntimeError(
                    "AdversarialTrainer: the parent training_step did not call "
                    "accelerator.backward(), so its loss cannot be captured (SageMaker model "
                    f"parallel is not supported). {received(trainer=type(self).__name__)}"
                )
            return captured["loss"]

        def backward(loss: torch.Tensor) -> None:
            accelerator.backward(loss, **captured.get("kwargs", {}))

        if getattr(accelerator, "deepspeed_engine_wrapped", None) is not None:
            backward.advgraph_before_last = _not_a_boundary(accelerator, backward)  # type: ignore[attr-defined]

        settings = wrapped.advgraph_method
        method = wrapped.advgraph_config.method
        # The optimizer step is the step the method's `start` and schedules read;
        # before `start_epoch` every step is plain (the Kaggle AWP form).
        state = self.state  # type: ignore[attr-defined]
        start_epoch = (self._advgraph_options or {}).get("start_epoch", 0)
        plain = bool(start_epoch) and float(state.epoch or 0.0) < start_epoch
        run = {"backward": backward, "step": int(state.global_step), "plain": plain}
        if settings.closure == "loss":
            mask = inputs.get("attention_mask") if settings.needs_token_mask else None
            return wrapped.adversarial_step(closure, mask=mask, **run)

        def keep_logits(module: nn.Module, args: Any, output: Any) -> None:
            captured["logits"] = getattr(output, "logits", None)

        def closure_with_logits() -> tuple[torch.Tensor, torch.Tensor]:
            loss = closure()
            logits = captured.get("logits")
            if not isinstance(logits, torch.Tensor):
                raise TypeError(
                    f"AdversarialTrainer: method={method!r} compares output distributions and "
                    "reads `logits` from the model's output, which has none. "
                    f"{received(output_logits=type(logits).__name__)}"
                )
            return loss, logits

        handle = wrapped.register_forward_hook(keep_logits)
        try:
            return wrapped.adversarial_step(closure_with_logits, **run)
        finally:
            handle.remove()


class AdversarialTrainer(AdversarialTrainerMixin, transformers.Trainer):
    """``transformers.Trainer`` with embedding-level adversarial training.

    Takes every argument of ``Trainer`` plus ``adversarial``: the keyword arguments of
    :func:`advgraph.wrap` (``target``, ``mode``, ``method``, ``epsilon``, ...).
    Gradient accumulation, fp16/bf16 (autocast and GradScaler) and multi-process
    training (torchrun / ``accelerate launch``) work as with ``Trainer``. The model
    stays a HF model: ``trainer.save_model()`` writes a checkpoint that
    ``from_pretrained`` loads into the plain class.

    Example:
        >>> from transformers import BertConfig, BertForSequenceClassification, TrainingArguments
        >>> from advgraph.integrations.transformers import AdversarialTrainer
        >>> model = BertForSequenceClassification(BertConfig(
        ...     vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        ...     intermediate_size=32, max_position_embeddings=16))
        >>> args = TrainingArguments("out", max_steps=2, use_cpu=True, report_to=[], save_strategy="no")
        >>> trainer = AdversarialTrainer(
        ...     model=model, args=args, adversarial={"mode": "output", "epsilon": 1.0})
        >>> trainer.model.advgraph_route
        'fx'
    """
