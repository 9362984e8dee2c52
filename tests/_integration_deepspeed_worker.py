"""Worker of tests/test_integration_deepspeed.py: one process, gloo on 127.0.0.1, CPU accelerator.

    python tests/_integration_deepspeed_worker.py engine|trainer OUT.json

``engine`` runs every ``deepspeed.initialize`` scenario (ZeRO stages 1-3, output and
matrix mode), ``trainer`` every ``AdversarialTrainer`` + DeepSpeed-config scenario;
each scenario's measurements go into OUT.json under its name. Everything is
compared with a hand-written FGM step (no advgraph) on the same tiny BERT and batch.
A process per group keeps DeepSpeed's process-group and config state from leaking
into the test process.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import socket
import sys
import traceback
import warnings
from typing import Any, Callable

with socket.socket() as _s:
    _s.bind(("127.0.0.1", 0))
    _PORT = _s.getsockname()[1]
os.environ.update(
    MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_PORT), RANK="0", WORLD_SIZE="1",
    LOCAL_RANK="0", LOCAL_WORLD_SIZE="1",
)  # fmt: skip
warnings.simplefilter("ignore")

import torch  # noqa: E402
from torch.nn import functional as F  # noqa: E402
from transformers import BertConfig, BertForSequenceClassification  # noqa: E402

import advgraph  # noqa: E402

EPS = 1.0
LR = 1.0
EMB = "bert.embeddings.word_embeddings.weight"


def make_model() -> BertForSequenceClassification:
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=32, max_position_embeddings=16, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )  # fmt: skip
    return BertForSequenceClassification(config)


def batch(seed: int = 7) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 64, (4, 8), generator=gen), torch.tensor([0, 1, 0, 1])


def reference_grads(mode: str, seed: int = 7) -> dict[str, torch.Tensor]:
    """One FGM step written by hand: clean backward, delta from its gradient, adversarial backward."""
    model = make_model()
    x, y = batch(seed)
    emb = model.bert.embeddings.word_embeddings
    if mode == "output":
        out = emb(x).detach().requires_grad_()
        F.cross_entropy(model(inputs_embeds=out).logits, y).backward()
        g = out.grad
        norms = g.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1)
        delta = EPS * g / norms  # per-sample l2, the output-mode default
        # The clean pass also reaches the lookup's weight through `out`:
        weight_grad = torch.zeros_like(emb.weight).index_add_(0, x.reshape(-1), g.reshape(-1, 16))
        weight_grad[emb.padding_idx] = 0.0  # BERT's pad row gets no gradient
        emb.weight.grad = weight_grad
        F.cross_entropy(model(inputs_embeds=emb(x) + delta).logits, y).backward()
    else:
        F.cross_entropy(model(input_ids=x).logits, y).backward()
        g = emb.weight.grad.clone()  # rows the batch did not touch are 0
        delta = EPS * g / g.norm()  # one global l2 norm, the matrix-mode default
        saved = emb.weight.detach().clone()
        with torch.no_grad():
            emb.weight.add_(delta)
        F.cross_entropy(model(input_ids=x).logits, y).backward()
        with torch.no_grad():
            emb.weight.copy_(saved)
    return {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def worst(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> dict[str, float]:
    return {n: float((a[n] - b[n]).abs().max()) for n in a}


def ds_config(stage: int, auto: bool = False) -> dict[str, Any]:
    return {
        "train_micro_batch_size_per_gpu": "auto" if auto else 4,
        "gradient_accumulation_steps": "auto" if auto else 1,
        "optimizer": {"type": "SGD", "params": {"lr": "auto" if auto else LR}},
        "zero_optimization": {"stage": stage},
        "zero_allow_untested_optimizer": True,
        "gradient_clipping": "auto" if auto else 0.0,
    }


def engine_scenario(stage: int, mode: str, wrap_first: bool) -> dict[str, Any]:
    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_grad

    model = make_model()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    x, y = batch()
    if wrap_first:  # wrap, then hand the wrapped model to DeepSpeed
        model = advgraph.wrap(model, mode=mode, epsilon=EPS)
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds_config(stage))
    wrapped = engine.module if wrap_first else advgraph.wrap(engine.module, mode=mode, epsilon=EPS)
    emb_bytes = safe_get_full_fp32_param(engine.module.get_parameter(EMB)).numpy().tobytes()
    wrapped.adversarial_step(lambda: engine(input_ids=x, labels=y).loss, backward=engine.backward)
    restored = safe_get_full_fp32_param(engine.module.get_parameter(EMB)).numpy().tobytes() == emb_bytes
    grads = {n: safe_get_full_grad(p).detach().clone() for n, p in engine.module.named_parameters()}
    engine.step()
    after = {n: safe_get_full_fp32_param(p).detach().clone() for n, p in engine.module.named_parameters()}
    ref = reference_grads(mode)
    return {
        "grad_error": worst(grads, ref),
        "update_error": worst({n: (before[n] - after[n]) / LR for n in before}, ref),
        "restored": restored,
        "route": wrapped.advgraph_route,
    }


def accumulation_scenario(stage: int) -> dict[str, Any]:
    """gradient_accumulation_steps=2: two adversarial micro-batches, one optimizer step.

    DeepSpeed scales each loss by 1/2; the update is the mean of the two micro-batches'
    hand-written FGM gradients (each micro-batch's delta from its own clean pass).
    """
    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param

    model = advgraph.wrap(make_model(), mode="output", epsilon=EPS)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    config = ds_config(stage) | {"gradient_accumulation_steps": 2, "train_batch_size": 8}
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
    boundaries = []
    for seed in (7, 8):
        x, y = batch(seed)
        boundaries.append(engine.is_gradient_accumulation_boundary())
        model.adversarial_step(lambda: engine(input_ids=x, labels=y).loss, backward=engine.backward)
        engine.step()
    after = {n: safe_get_full_fp32_param(p).detach().clone() for n, p in engine.module.named_parameters()}
    first, second = reference_grads("output", 7), reference_grads("output", 8)
    ref = {n: (first[n] + second[n]) / 2 for n in first}
    return {
        "boundaries": boundaries,
        "global_steps": engine.global_steps,
        "update_error": worst({n: (before[n] - after[n]) / LR for n in before}, ref),
    }


def refused_scenario() -> dict[str, Any]:
    """mode='matrix' on ZeRO-3: refused at wrap, parameters untouched."""
    import deepspeed

    model = make_model()
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds_config(3))
    try:
        advgraph.wrap(engine.module, mode="matrix", epsilon=EPS)
    except ValueError as error:
        return {"error": str(error), "wrapped": advgraph.is_wrapped(engine.module)}
    return {"error": None}


def plain_backward_scenario(stage: int) -> dict[str, Any]:
    """adversarial_step without backward=engine.backward: refused on ZeRO-1/2, fine on ZeRO-3."""
    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_grad

    model = advgraph.wrap(make_model(), mode="output", epsilon=EPS)
    x, y = batch()
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds_config(stage))
    before = {n: safe_get_full_fp32_param(p).clone() for n, p in engine.module.named_parameters()}
    try:
        model.adversarial_step(lambda: engine(input_ids=x, labels=y).loss)
    except ValueError as error:
        after = {n: safe_get_full_fp32_param(p) for n, p in engine.module.named_parameters()}
        return {"error": str(error), "untouched": all(torch.equal(before[n], after[n]) for n in before)}
    grads = {n: safe_get_full_grad(p).detach().clone() for n, p in engine.module.named_parameters()}
    return {"error": None, "grad_error": worst(grads, reference_grads("output"))}


def trainer_scenario(stage: int, mode: str) -> dict[str, Any]:
    from deepspeed.utils import safe_get_full_fp32_param
    from transformers import TrainingArguments

    from advgraph.integrations.transformers import AdversarialTrainer

    model = make_model()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    x, y = batch()
    args = TrainingArguments(
        os.environ.get("TMPDIR", "/tmp") + "/advgraph-ds-trainer", max_steps=1,
        per_device_train_batch_size=4, learning_rate=LR, lr_scheduler_type="constant",
        weight_decay=0.0, max_grad_norm=0.0, report_to=[], save_strategy="no",
        logging_strategy="no", disable_tqdm=True, use_cpu=True, deepspeed=ds_config(stage, auto=True),
    )  # fmt: skip
    data = [{"input_ids": x[i], "labels": y[i]} for i in range(len(y))]
    trainer = AdversarialTrainer(
        model=model, args=args, train_dataset=data, adversarial={"mode": mode, "epsilon": EPS}
    )
    try:
        trainer.train()
        error = None
    except ValueError as caught:
        error = str(caught)
    engine = trainer.model_wrapped
    after = {n: safe_get_full_fp32_param(p).detach().clone() for n, p in engine.module.named_parameters()}
    if error is not None:
        return {"error": error, "untouched": all(torch.equal(before[n], after[n]) for n in before)}
    return {
        "engine": type(engine).__name__,
        "update_error": worst({n: (before[n] - after[n]) / LR for n in before}, reference_grads(mode)),
    }


SCENARIOS: dict[str, dict[str, Callable[[], dict[str, Any]]]] = {
    "engine": {
        **{
            f"zero{s}_{m}_{'wrap_first' if first else 'wrap_after'}": (
                lambda s=s, m=m, first=first: engine_scenario(s, m, first)
            )
            for s, m, first in [
                (1, "output", True), (2, "output", True), (3, "output", False),
                (1, "matrix", True), (2, "matrix", False), (2, "output", False),
            ]
        },
        "zero3_matrix_refused": refused_scenario,
        "zero1_accumulation": lambda: accumulation_scenario(1),
        "zero2_accumulation": lambda: accumulation_scenario(2),
        "zero2_plain_backward": lambda: plain_backward_scenario(2),
        "zero3_plain_backward": lambda: plain_backward_scenario(3),
    },
    "trainer": {
        f"trainer_zero{s}_{m}": (lambda s=s, m=m: trainer_scenario(s, m))
        for s, m in [(2, "output"), (3, "output"), (1, "matrix"), (3, "matrix")]
    },
}


def main() -> None:
    group, out = sys.argv[1], sys.argv[2]
    logging.disable(logging.WARNING)
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")
    results: dict[str, Any] = {}
    for name, run in SCENARIOS[group].items():
        try:
            results[name] = run()
        except Exception:  # reported by the test, scenario by scenario
            results[name] = {"exception": traceback.format_exc()}
    with open(out, "w") as f:
        json.dump(results, f)


if __name__ == "__main__":
    main()
