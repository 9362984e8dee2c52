"""HuggingFace Trainer integration: AdversarialTrainer / AdversarialTrainerMixin.

Tiny BertForSequenceClassification built from a config, generated token ids, CPU.
"""

from __future__ import annotations

import copy
import doctest
import importlib
import sys
import warnings

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from torch.nn import functional as F  # noqa: E402
from transformers import (  # noqa: E402
    BertForSequenceClassification,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

import advgraph  # noqa: E402
from advgraph.integrations import transformers as hf_integration  # noqa: E402
from advgraph.integrations.transformers import (  # noqa: E402
    AdversarialTrainer,
    AdversarialTrainerMixin,
)
from torch_models import param_bytes, tiny_bert  # noqa: E402

SEQ = 8


class TokenDataset(torch.utils.data.Dataset):
    """Generated token ids; a sample is a dict, as a tokenized HF dataset gives."""

    def __init__(self, n: int = 40, seed: int = 0) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(1, 64, (n, SEQ), generator=gen)
        self.labels = (self.ids < 32).sum(dim=1).gt(SEQ // 2).long()

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {
            "input_ids": self.ids[i],
            "attention_mask": torch.ones(SEQ, dtype=torch.long),
            "labels": self.labels[i],
        }


@pytest.fixture(autouse=True)
def one_thread():
    # The test machines are small and shared: one intra-op thread is much faster there.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def training_args(tmp_path, **overrides) -> TrainingArguments:
    kwargs = dict(
        output_dir=str(tmp_path / "out"),
        max_steps=20,
        per_device_train_batch_size=4,
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        logging_strategy="no",
        disable_tqdm=True,
        train_sampling_strategy="sequential",
        seed=0,
    )
    kwargs.update(overrides)
    return TrainingArguments(**kwargs)


def sgd(model, lr: float = 0.5):
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)


def micro_batches(dataset: TokenDataset, size: int):
    for start in range(0, len(dataset), size):
        items = [dataset[i] for i in range(start, start + size)]
        yield {k: torch.stack([it[k] for it in items]) for k in items[0]}


def max_abs_diff(a, b) -> float:
    pa, pb = dict(a.named_parameters()), dict(b.named_parameters())
    assert pa.keys() == pb.keys()
    with torch.no_grad():
        return max(float((pa[k] - pb[k]).abs().max()) for k in pa)


# --------------------------------------------------------------------------- training


@pytest.mark.parametrize("mode", ["output", "matrix"])
def test_twenty_steps_and_checkpoint_round_trip(tmp_path, mode):
    model = tiny_bert()
    keys = sorted(model.state_dict())
    initial = param_bytes(model)
    trainer = AdversarialTrainer(
        model=model,
        args=training_args(tmp_path),
        train_dataset=TokenDataset(),
        adversarial={"mode": mode, "epsilon": 1.0},
    )
    assert trainer.model is model and advgraph.is_wrapped(model)
    assert model.advgraph_route == ("matrix" if mode == "matrix" else "fx")
    result = trainer.train()
    assert result.global_step == 20
    assert model.advgraph_stats["steps"] == 20  # one adversarial step per micro-batch
    assert torch.isfinite(torch.tensor(result.training_loss))
    assert param_bytes(model) != initial
    assert all(torch.isfinite(p).all() for p in model.parameters())

    # The model stays a HF model: same class name, state_dict keys, checkpoint format.
    assert type(model).__name__ == "BertForSequenceClassification"
    assert sorted(model.state_dict()) == keys
    trainer.save_model(str(tmp_path / "final"))
    plain = BertForSequenceClassification.from_pretrained(str(tmp_path / "final"))
    assert type(plain) is BertForSequenceClassification and not advgraph.is_wrapped(plain)
    assert sorted(plain.state_dict()) == keys
    assert param_bytes(plain) == param_bytes(model)
    ids = TokenDataset().ids[:2]
    model.eval()
    plain.eval()
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, plain(input_ids=ids).logits)


def train_by_hand(data, steps, accumulation, batch, divisor, options=None):
    """SGD steps of ``accumulation`` micro-batches each; the loss divided by ``divisor``."""
    model = tiny_bert()
    opt, _ = sgd(model)
    wrapped = advgraph.wrap(model, **options) if options is not None else model
    wrapped.train()
    batches = micro_batches(data, batch)
    for _ in range(steps):
        opt.zero_grad()
        for _ in range(accumulation):
            mb = next(batches)
            if options is None:
                (wrapped(**mb).loss / divisor).backward()
            else:
                wrapped.adversarial_step(lambda: wrapped(**mb).loss / divisor)
        opt.step()
    return model


@pytest.mark.parametrize("mode", ["output", "matrix"])
def test_gradient_accumulation_matches_the_same_steps_by_hand(tmp_path, mode):
    options = {"mode": mode, "epsilon": 0.5}
    data = TokenDataset()
    steps, accumulation, batch = 3, 2, 4
    args = training_args(
        tmp_path,
        max_steps=steps,
        gradient_accumulation_steps=accumulation,
        per_device_train_batch_size=batch,
        max_grad_norm=0.0,
    )

    # How this transformers version scales a micro-batch's loss (it divides by the
    # accumulation steps, or not when it expects the model to normalise by
    # num_items_in_batch): read it off a plain Trainer.
    plain = tiny_bert()
    Trainer(model=plain, args=args, train_dataset=data, optimizers=sgd(plain)).train()
    divisors = [
        d for d in (1, accumulation)
        if max_abs_diff(plain, train_by_hand(data, steps, accumulation, batch, d)) < 1e-5
    ]
    assert len(divisors) == 1, divisors
    divisor = divisors[0]

    trained = tiny_bert()
    trainer = AdversarialTrainer(
        model=trained, args=args, train_dataset=data, optimizers=sgd(trained), adversarial=options
    )
    trainer.train()
    assert trained.advgraph_stats["steps"] == steps * accumulation

    # The same adversarial steps by hand, every pass's loss scaled as the Trainer scales it.
    by_hand = train_by_hand(data, steps, accumulation, batch, divisor, options)
    assert max_abs_diff(trained, by_hand) < 1e-5
    # ... and not what a plain Trainer gives: the integration is not a silent no-op.
    assert max_abs_diff(trained, plain) > 1e-3


def test_bf16_autocast_on_cpu(tmp_path):
    model = tiny_bert()
    trainer = AdversarialTrainer(
        model=model,
        args=training_args(tmp_path, max_steps=4, bf16=True),
        train_dataset=TokenDataset(),
        adversarial={"mode": "output", "epsilon": 1.0},
    )
    dtypes = []
    query = model.bert.encoder.layer[0].attention.self.query  # a Linear: bf16 under autocast
    handle = query.register_forward_hook(lambda m, a, out: dtypes.append(out.dtype))
    result = trainer.train()
    handle.remove()
    assert model.advgraph_stats["steps"] == 4
    assert len(dtypes) == 8 and set(dtypes) == {torch.bfloat16}  # 2 passes per step, autocast
    assert torch.isfinite(torch.tensor(result.training_loss))
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in model.parameters())


class _InjectInfScale(TrainerCallback):
    """At one step, set the GradScaler's scale to inf (an overflowing fp16 step)."""

    def __init__(self, scaler, at_step: int) -> None:
        self.scaler, self.at_step = scaler, at_step
        self.before = self.after = None
        self.skipped: list[bool] = []

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        if state.global_step == self.at_step:
            self.scaler.update(new_scale=float("inf"))
            self.before = param_bytes(model)
        elif state.global_step == self.at_step + 1:
            self.scaler.update(new_scale=2.0**8)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step == self.at_step + 1:
            self.after = param_bytes(model)


def test_grad_scaler_inf_step_is_skipped_and_parameters_stay_finite(tmp_path):
    # CPU has no fp16 Trainer path; give accelerate a (CPU) GradScaler, as fp16 on a GPU does.
    model = tiny_bert()
    trainer = AdversarialTrainer(
        model=model,
        args=training_args(tmp_path, max_steps=5, max_grad_norm=0.0),
        train_dataset=TokenDataset(),
        adversarial={"mode": "output", "epsilon": 1.0},
    )
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    trainer.accelerator.scaler = scaler
    inject = _InjectInfScale(scaler, at_step=2)
    trainer.add_callback(inject)
    scaled = []
    real_scale = scaler.scale
    scaler.scale = lambda t: scaled.append(1) or real_scale(t)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train()
    assert len(scaled) == 5 * 2  # every parameter-gradient pass went through the scaler
    stats = model.advgraph_stats
    assert stats["steps"] == 5 and stats["skipped_nonfinite"] == 1  # delta = 0 at the inf step
    assert any(isinstance(w.message, advgraph.AdvGraphWarning) for w in caught)
    assert inject.before is not None and inject.before == inject.after  # optimizer step skipped
    assert scaler.get_scale() == 2.0**8
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_mixin_with_a_custom_trainer(tmp_path):
    calls = []

    class SmoothedTrainer(Trainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            labels = inputs.pop("labels")
            outputs = model(**inputs)
            calls.append(1)
            loss = F.cross_entropy(outputs.logits, labels, label_smoothing=0.1)
            return (loss, outputs) if return_outputs else loss

    class AdversarialSmoothedTrainer(AdversarialTrainerMixin, SmoothedTrainer):
        pass

    model = tiny_bert()
    before = param_bytes(model)
    trainer = AdversarialSmoothedTrainer(
        model=model,
        args=training_args(tmp_path, max_steps=3),
        train_dataset=TokenDataset(),
        adversarial={"method": "pgd", "steps": 2, "epsilon": 0.5},
    )
    trainer.train()
    assert len(calls) == 3 * 3  # pgd-2: 3 passes per step, each through compute_loss
    assert model.advgraph_stats["steps"] == 3
    assert param_bytes(model) != before


def test_model_init_is_wrapped(tmp_path):
    trainer = AdversarialTrainer(
        model_init=lambda: tiny_bert(),
        args=training_args(tmp_path, max_steps=2),
        train_dataset=TokenDataset(),
        adversarial={"mode": "matrix", "epsilon": 0.5},
    )
    trainer.train()
    assert advgraph.is_wrapped(trainer.model)
    assert trainer.model.advgraph_stats["steps"] == 2


def test_evaluate_is_unchanged(tmp_path):
    model = tiny_bert()
    reference = copy.deepcopy(model)
    args = training_args(tmp_path, per_device_eval_batch_size=8)
    adv = AdversarialTrainer(model=model, args=args, eval_dataset=TokenDataset(), adversarial={})
    plain = Trainer(model=reference, args=args, eval_dataset=TokenDataset())
    assert adv.evaluate()["eval_loss"] == plain.evaluate()["eval_loss"]
    assert model.advgraph_stats["steps"] == 0


# --------------------------------------------------------------------------- errors


def test_bad_adversarial_options(tmp_path):
    args = training_args(tmp_path)
    expected = r"dict of advgraph.wrap\(\) keyword arguments.*Received: adversarial="
    with pytest.raises(TypeError, match=expected):
        AdversarialTrainer(model=tiny_bert(), args=args, adversarial="fgm")
    expected = r"keyword arguments of advgraph.wrap\(\).*Received: unknown=\['eps'\]"
    with pytest.raises(TypeError, match=expected):
        AdversarialTrainer(model=tiny_bert(), args=args, adversarial={"eps": 1.0})
    with pytest.raises(ValueError, match="Received: mode='bogus'"):
        AdversarialTrainer(model=tiny_bert(), args=args, adversarial={"mode": "bogus"})
    wrapped = advgraph.wrap(tiny_bert())
    with pytest.raises(ValueError, match="already wrapped.*Received: adversarial="):
        AdversarialTrainer(model=wrapped, args=args, adversarial={"epsilon": 0.1})
    # A wrapped model without `adversarial` is used as it is.
    assert AdversarialTrainer(model=wrapped, args=args).model is wrapped


def test_missing_transformers_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)
    monkeypatch.delitem(sys.modules, "advgraph.integrations.transformers")
    with pytest.raises(ImportError, match=r"pip install 'advgraph\[transformers\]'"):
        importlib.import_module("advgraph.integrations.transformers")


def test_docstring_examples(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = doctest.testmod(hf_integration, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0
