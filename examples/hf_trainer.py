"""HuggingFace Trainer with adversarial training: change the class, add ``adversarial=``.

A tiny BERT classifier built from a config (no downloads) on generated token ids:
random filler tokens plus two sentiment keywords (ids 1-10 positive, 11-20
negative). Runs in under 20 s on a 2-core CPU (most of it importing transformers), in
one process or several; eval accuracy ends far above the majority-class baseline
(printed first):

    python examples/hf_trainer.py
    torchrun --nproc_per_node 2 examples/hf_trainer.py      # DDP through accelerate (gloo on CPU)

The script is an ordinary Trainer script; the adversarial part is the two marked lines.
"""

from __future__ import annotations

import argparse
import tempfile

import torch
from transformers import BertConfig, BertForSequenceClassification, TrainingArguments

from advgraph.integrations.transformers import AdversarialTrainer  # (1) instead of Trainer

VOCAB, LENGTH = 200, 16


class Sentences(torch.utils.data.Dataset):
    """Generated token ids, one dict per sample as a tokenized dataset gives."""

    def __init__(self, n: int, seed: int) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(21, VOCAB, (n, LENGTH), generator=gen)
        self.labels = torch.randint(0, 2, (n,), generator=gen)
        keywords = torch.randint(1, 11, (n, 2), generator=gen) + 10 * (1 - self.labels).unsqueeze(1)
        where = torch.rand(n, LENGTH, generator=gen).argsort(dim=1)[:, :2]
        self.ids.scatter_(1, where, keywords)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        mask = torch.ones(LENGTH, dtype=torch.long)
        return {"input_ids": self.ids[i], "attention_mask": mask, "labels": self.labels[i]}


def accuracy(eval_pred) -> dict[str, float]:
    logits, labels = eval_pred
    return {"accuracy": float((logits.argmax(-1) == labels).mean())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output-dir", default=None, help="default: a temporary directory")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--mode", choices=["output", "matrix"], default="output")
    # epsilon is the L2 norm of delta per sample (sequence x hidden). HF models start
    # with embeddings of std 0.02, so this tiny BERT's samples have norm ~0.45: keep
    # delta a few percent of that (too large, and the model learns to ignore its input;
    # at 0.02 it stayed at chance for 60 steps under torchrun's larger global batch).
    parser.add_argument("--epsilon", type=float, default=0.01)
    args = parser.parse_args()
    torch.set_num_threads(1)  # tiny model: threads only add overhead
    output_dir = args.output_dir or tempfile.mkdtemp(prefix="advgraph-hf-")

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=LENGTH, num_labels=2,
    )  # fmt: skip
    model = BertForSequenceClassification(config)
    training_args = TrainingArguments(
        output_dir=output_dir,
        max_steps=args.steps,
        per_device_train_batch_size=16,
        gradient_accumulation_steps=2,
        learning_rate=1e-2,
        use_cpu=not torch.cuda.is_available(),
        report_to=[],
        save_strategy="no",
        logging_steps=20,
        disable_tqdm=True,
    )
    trainer = AdversarialTrainer(
        model=model,
        args=training_args,
        train_dataset=Sentences(1024, seed=0),
        eval_dataset=Sentences(256, seed=1),
        compute_metrics=accuracy,
        adversarial={"mode": args.mode, "method": "fgm", "epsilon": args.epsilon},  # (2)
    )
    if trainer.is_world_process_zero():
        labels = trainer.eval_dataset.labels
        print(f"majority-class baseline (always the most common label): "
              f"{torch.bincount(labels).max().item() / len(labels):.3f}")
    trainer.train()
    metrics = trainer.evaluate()
    trainer.save_model(output_dir)  # a plain HF checkpoint: from_pretrained loads it

    if trainer.is_world_process_zero():
        print(f"eval accuracy {metrics['eval_accuracy']:.3f}, eval loss {metrics['eval_loss']:.4f}")
        reloaded = BertForSequenceClassification.from_pretrained(output_dir)
        trained = model.state_dict()
        same = all(torch.equal(t, trained[k]) for k, t in reloaded.state_dict().items())
        print(f"checkpoint reloads into a plain {type(reloaded).__name__}: identical weights = {same}")
    # Every rank: adversarial steps run, and (under torchrun) the same weights everywhere.
    checksum = sum(float(p.detach().double().sum()) for p in model.parameters())
    rank = trainer.args.process_index
    print(f"rank {rank}: advgraph {model.advgraph_stats}, weights checksum {checksum:.10e}")
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()  # orderly teardown under torchrun (see ddp_torchrun.py)
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
