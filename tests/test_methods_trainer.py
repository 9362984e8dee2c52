"""AdversarialTrainer(adversarial={"method": ...}) with gp, r3f, smart, neftune, awp."""

from __future__ import annotations

import copy

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("accelerate")
from transformers import TrainingArguments  # noqa: E402

import advgraph  # noqa: E402
from advgraph.integrations.transformers import AdversarialTrainer  # noqa: E402
from torch_models import param_bytes, tiny_bert  # noqa: E402

SEQ = 8


class PaddedDataset(torch.utils.data.Dataset):
    """Token ids with padding (id 0, BERT's pad_token_id) and the matching attention_mask."""

    def __init__(self, n: int = 8, seed: int = 0) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(1, 64, (n, SEQ), generator=gen)
        self.lengths = torch.randint(2, SEQ + 1, (n,), generator=gen)
        for i, length in enumerate(self.lengths):
            self.ids[i, length:] = 0
        self.labels = (self.ids < 32).sum(dim=1).gt(SEQ // 2).long()

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {
            "input_ids": self.ids[i],
            "attention_mask": (self.ids[i] != 0).long(),
            "labels": self.labels[i],
        }


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def args(tmp_path, steps=2):
    return TrainingArguments(
        output_dir=str(tmp_path / "out"), max_steps=steps, per_device_train_batch_size=4, use_cpu=True,
        report_to=[], save_strategy="no", logging_strategy="no", disable_tqdm=True,
        train_sampling_strategy="sequential", seed=0, learning_rate=0.1, lr_scheduler_type="constant",
        optim="sgd", weight_decay=0.0, max_grad_norm=0.0,
    )


OPTIONS = {
    "gp": {"method": "gp", "epsilon": 0.5},
    "r3f": {"method": "r3f", "noise_eps": 0.1},
    "smart": {"method": "smart", "smart_beta": 0.5},
    "neftune": {"method": "neftune"},
    "awp": {"method": "awp", "target": "bert.encoder", "adv_lr": 0.1, "adv_eps": 0.05},
}


@pytest.mark.parametrize("method", list(OPTIONS))
def test_adversarial_trainer_runs_each_new_method(tmp_path, method, monkeypatch):
    model = tiny_bert()
    initial = param_bytes(model)
    masks = []
    original = type(advgraph.wrap(copy.deepcopy(model), **OPTIONS[method])).adversarial_step

    def spy(self, closure, **kwargs):
        masks.append(kwargs.get("mask"))
        return original(self, closure, **kwargs)

    trainer = AdversarialTrainer(model=model, args=args(tmp_path), train_dataset=PaddedDataset(), adversarial=OPTIONS[method])
    monkeypatch.setattr(type(model), "adversarial_step", spy)
    result = trainer.train()
    assert result.global_step == 2
    assert model.advgraph_stats["steps"] == 2
    assert model.advgraph_config.method == method
    assert param_bytes(model) != initial
    assert all(torch.isfinite(p).all() for p in model.parameters())
    if method == "neftune":  # the batch's attention_mask is the token mask
        assert all(m is not None and m.shape == (4, SEQ) for m in masks)
    else:
        assert masks == [None, None]


@pytest.mark.parametrize("method", ["gp", "awp"])
def test_trainer_step_equals_adversarial_step_by_hand(tmp_path, method):
    """Deterministic methods: the Trainer's update is the hand-written loop's."""
    model = tiny_bert()
    ref = advgraph.wrap(copy.deepcopy(model), **OPTIONS[method])
    AdversarialTrainer(model=model, args=args(tmp_path, steps=1), train_dataset=PaddedDataset(), adversarial=OPTIONS[method]).train()
    data = PaddedDataset()
    batch = {k: torch.stack([data[i][k] for i in range(4)]) for k in data[0]}
    ref.train()
    ref.adversarial_step(lambda: ref(**batch).loss)
    with torch.no_grad():
        for p in ref.parameters():
            if p.grad is not None:
                p -= 0.1 * p.grad
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)


def test_neftune_on_a_hf_model_knows_padding_from_padding_idx():
    """No mask passed: BERT's word embedding has padding_idx = pad_token_id = 0."""
    model = tiny_bert()
    plain = copy.deepcopy(model)
    wrapped = advgraph.wrap(model, method="neftune", neftune_alpha=5.0)
    assert wrapped.advgraph_route == "fx"
    seen = []
    handle = model.bert.embeddings.word_embeddings.register_forward_hook(lambda m, a, out: seen.append(out.detach()))
    data = PaddedDataset()
    batch = {k: torch.stack([data[i][k] for i in range(4)]) for k in data[0]}
    wrapped.train()
    wrapped.adversarial_step(lambda: wrapped(**batch).loss)
    handle.remove()
    noise = seen[0] - plain.bert.embeddings.word_embeddings(batch["input_ids"]).detach()
    pad = batch["input_ids"] == 0
    assert pad.any()
    assert torch.all(noise[pad] == 0)
    lengths = (~pad).sum(1).float()
    bound = 5.0 / torch.sqrt(lengths * noise.shape[-1])
    assert torch.all(noise.abs().amax(dim=(1, 2)) <= bound + 1e-6)
    assert torch.all(noise.abs().amax(dim=(1, 2)) > 0.5 * bound)


def _trained(tmp_path, adversarial, steps=4):
    model = tiny_bert()
    trainer = AdversarialTrainer(
        model=model, args=args(tmp_path, steps=steps), train_dataset=PaddedDataset(n=8), adversarial=adversarial
    )
    trainer.train()
    return trainer.model


def test_start_epoch_trains_plainly_until_that_epoch_then_adversarially(tmp_path):
    """The Kaggle AWP form: 8 samples, batch 4 = 2 steps an epoch; ``start_epoch=1``
    makes the first epoch's 2 steps plain (one pass each) and the next 2 adversarial,
    the Trainer passing its optimizer step to the method."""
    awp = {"method": "awp", "target": "bert.encoder", "adv_lr": 0.1, "adv_eps": 0.05}
    model = _trained(tmp_path / "a", {**awp, "start_epoch": 1})
    assert model.advgraph_stats["plain_steps"] == 2 and model.advgraph_stats["steps"] == 2
    # The same as a method held off for 2 optimizer steps by its own `start`:
    held = _trained(tmp_path / "b", {**awp, "start": 2})
    assert held.advgraph_stats["plain_steps"] == 2 and held.advgraph_stats["steps"] == 2
    for a, b in zip(model.parameters(), held.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    # ...and different from AWP on every step.
    always = _trained(tmp_path / "c", awp)
    assert always.advgraph_stats == {**always.advgraph_stats, "plain_steps": 0, "steps": 4}
    assert any(not torch.equal(a, b) for a, b in zip(model.parameters(), always.parameters()))
    with pytest.raises(TypeError, match="Received: start_epoch=-1"):
        AdversarialTrainer(model=tiny_bert(), args=args(tmp_path), train_dataset=PaddedDataset(),
                           adversarial={**awp, "start_epoch": -1})
