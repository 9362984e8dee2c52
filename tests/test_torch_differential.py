"""advgraph against hand-written references of the same update rules."""

from __future__ import annotations

import copy

import pytest

torch = pytest.importorskip("torch")
from torch.nn import functional as F  # noqa: E402

import advgraph  # noqa: E402
from torch_models import LSTMClassifier, MeanPool, tiny_bert  # noqa: E402


class HandWrittenFGM:
    """The attack()/restore() class PyTorch users copy: back up the whole matrix."""

    def __init__(self, model, name="emb.weight"):
        self.model, self.name, self.backup = model, name, {}

    def attack(self, epsilon):
        for name, param in self.model.named_parameters():
            if name == self.name:
                self.backup[name] = param.data.clone()
                norm = torch.norm(param.grad)
                if norm != 0 and not torch.isnan(norm):
                    param.data.add_(epsilon * param.grad / norm)

    def restore(self):
        for name, param in self.model.named_parameters():
            if name in self.backup:
                param.data = self.backup[name]
        self.backup = {}


@pytest.mark.parametrize("arch", [MeanPool, LSTMClassifier])
def test_matrix_fgm_equals_hand_written_loop_for_20_sgd_steps(arch):
    torch.manual_seed(0)
    ref = arch()
    ours = copy.deepcopy(ref)
    opt_ref = torch.optim.SGD(ref.parameters(), lr=0.5)
    opt_ours = torch.optim.SGD(ours.parameters(), lr=0.5)
    wrapped = advgraph.wrap(ours, mode="matrix", epsilon=0.8)
    fgm = HandWrittenFGM(ref)
    gen = torch.Generator().manual_seed(1)
    for _ in range(20):
        x = torch.randint(0, 30, (8, 6), generator=gen)
        y = torch.randint(0, 3, (8,), generator=gen)
        opt_ref.zero_grad()
        F.cross_entropy(ref(x), y).backward()
        fgm.attack(0.8)
        F.cross_entropy(ref(x), y).backward()
        fgm.restore()
        opt_ref.step()

        opt_ours.zero_grad()
        wrapped.adversarial_step(lambda: F.cross_entropy(wrapped(x), y))
        opt_ours.step()
    for (name, p_ref), p_ours in zip(ref.named_parameters(), ours.parameters()):
        torch.testing.assert_close(p_ours, p_ref, rtol=1e-6, atol=1e-6, msg=name)
    assert wrapped.advgraph_stats["steps"] == 20


def test_output_fgm_on_bert_equals_manual_inputs_embeds():
    """Gradient at the embedding output, per-sample delta, second pass with inputs_embeds + delta."""
    eps = 0.7
    model = tiny_bert()
    model.train()  # dropout is 0 in tiny_bert
    ref = copy.deepcopy(model)
    ids = torch.randint(0, 64, (3, 9), generator=torch.Generator().manual_seed(3))
    labels = torch.tensor([0, 1, 1])
    mask = torch.ones_like(ids)
    mask[0, 6:] = 0

    # Manual computation.
    embeds = ref.get_input_embeddings()(ids)
    embeds.retain_grad()
    F.cross_entropy(ref(inputs_embeds=embeds, attention_mask=mask).logits, labels).backward()
    g = embeds.grad
    delta = eps * g / g.flatten(1).norm(dim=1).view(-1, 1, 1)
    embeds_adv = ref.get_input_embeddings()(ids) + delta
    F.cross_entropy(ref(inputs_embeds=embeds_adv, attention_mask=mask).logits, labels).backward()

    wrapped = advgraph.wrap(model, mode="output", epsilon=eps)
    wrapped.adversarial_step(
        lambda: F.cross_entropy(wrapped(input_ids=ids, attention_mask=mask).logits, labels)
    )
    for (name, p_ref), p in zip(ref.named_parameters(), model.parameters()):
        torch.testing.assert_close(p.grad, p_ref.grad, rtol=1e-5, atol=1e-6, msg=name)


def test_fgsm_is_sign_step():
    torch.manual_seed(0)
    model = MeanPool()
    ref = copy.deepcopy(model)
    x = torch.randint(0, 30, (4, 5))
    y = torch.randint(0, 3, (4,))
    emb_out = ref.emb(x)
    emb_out.retain_grad()
    F.cross_entropy(ref.fc(emb_out.mean(1)), y).backward()
    delta = 0.05 * emb_out.grad.sign()
    F.cross_entropy(ref.fc((ref.emb(x) + delta).mean(1)), y).backward()
    wrapped = advgraph.wrap(model, method="fgsm", epsilon=0.05)
    wrapped.adversarial_step(lambda: F.cross_entropy(wrapped(x), y))
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-6, atol=1e-7)
