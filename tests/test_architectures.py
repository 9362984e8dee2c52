"""Every architecture users bring, from tiny transformers configs (no downloads).

For each model and both modes: one FGM step of ``adversarial_step`` gives the
gradients of a hand-written FGM step (forward hooks on the modules that look the
embedding up, see ``torch_models.reference_fgm``); parameters are byte-identical
after the step; ``unwrap`` gives back a bit-identical forward and the original
classes. Then the things around training: PEFT LoRA, gradient checkpointing,
``resize_token_embeddings`` after ``wrap``, ``generate()``, ``save_pretrained``,
a bi-encoder that runs one encoder twice per forward.
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass
from typing import Any, Callable

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from torch import nn  # noqa: E402
from torch.nn import functional as F  # noqa: E402

import advgraph  # noqa: E402
from torch_models import grads, param_bytes, reference_fgm  # noqa: E402

VOCAB, B, N = 64, 2, 7
EPS = 0.5


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _encoder_kwargs(**extra: Any) -> dict[str, Any]:
    kwargs = dict(
        vocab_size=VOCAB,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=40,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        num_labels=2,
    )
    kwargs.update(extra)
    return kwargs


def _decoder_kwargs(**extra: Any) -> dict[str, Any]:
    kwargs = dict(
        vocab_size=VOCAB,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=40,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    kwargs.update(extra)
    return kwargs


@dataclass
class Arch:
    build: Callable[[], nn.Module]
    task: str  # "cls": labels per sample; "lm": labels = ids; "seq2seq": labels of another length
    lookups: Callable[[nn.Module], list[nn.Module]] = lambda m: [m.get_input_embeddings()]


def _t5() -> nn.Module:
    cfg = transformers.T5Config(
        vocab_size=VOCAB, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_decoder_layers=1,
        num_heads=2, dropout_rate=0.0, decoder_start_token_id=0, pad_token_id=0, eos_token_id=2,
    )
    return transformers.T5ForConditionalGeneration(cfg)


def _bart() -> nn.Module:
    cfg = transformers.BartConfig(
        vocab_size=VOCAB, d_model=16, encoder_layers=1, decoder_layers=1,
        encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=32,
        decoder_ffn_dim=32, max_position_embeddings=40, dropout=0.0, num_labels=2,
        pad_token_id=1, eos_token_id=2, bos_token_id=0, decoder_start_token_id=2,
    )
    return transformers.BartForSequenceClassification(cfg)


def _t5_lookups(m: nn.Module) -> list[nn.Module]:
    return [m.encoder.embed_tokens, m.decoder.embed_tokens]


def _bart_lookups(m: nn.Module) -> list[nn.Module]:
    return [m.model.encoder.embed_tokens, m.model.decoder.embed_tokens]


T = transformers
ARCHS: dict[str, Arch] = {
    "bert": Arch(lambda: T.BertForSequenceClassification(T.BertConfig(**_encoder_kwargs())), "cls"),
    "roberta": Arch(
        lambda: T.RobertaForSequenceClassification(T.RobertaConfig(**_encoder_kwargs(pad_token_id=1))), "cls"
    ),
    "distilbert": Arch(
        lambda: T.DistilBertForSequenceClassification(
            T.DistilBertConfig(vocab_size=VOCAB, dim=16, n_layers=1, n_heads=2, hidden_dim=32,
                               max_position_embeddings=40, dropout=0.0, attention_dropout=0.0,
                               seq_classif_dropout=0.0, num_labels=2)
        ),
        "cls",
    ),
    "albert": Arch(
        lambda: T.AlbertForSequenceClassification(T.AlbertConfig(**_encoder_kwargs(embedding_size=8, classifier_dropout_prob=0.0))),
        "cls",
    ),
    "electra": Arch(
        lambda: T.ElectraForSequenceClassification(T.ElectraConfig(**_encoder_kwargs(embedding_size=8))), "cls"
    ),
    "deberta-v2": Arch(
        lambda: T.DebertaV2ForSequenceClassification(
            T.DebertaV2Config(**_encoder_kwargs(relative_attention=True, position_buckets=8,
                                                pos_att_type=["p2c", "c2p"], pooler_dropout=0.0))
        ),
        "cls",
    ),
    "xlm-roberta": Arch(
        lambda: T.XLMRobertaForSequenceClassification(T.XLMRobertaConfig(**_encoder_kwargs(pad_token_id=1))),
        "cls",
    ),
    "modernbert": Arch(
        lambda: T.ModernBertForSequenceClassification(
            T.ModernBertConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                               num_attention_heads=2, max_position_embeddings=40, num_labels=2,
                               pad_token_id=0, bos_token_id=1, eos_token_id=2, cls_token_id=1, sep_token_id=2,
                               embedding_dropout=0.0, mlp_dropout=0.0, attention_dropout=0.0)
        ),
        "cls",
    ),
    "gpt2": Arch(
        lambda: T.GPT2LMHeadModel(
            T.GPT2Config(vocab_size=VOCAB, n_embd=16, n_layer=1, n_head=2, n_positions=40, bos_token_id=1,
                         eos_token_id=2, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
        ),
        "lm",
    ),
    "llama": Arch(lambda: T.LlamaForCausalLM(T.LlamaConfig(**_decoder_kwargs())), "lm"),
    "mistral": Arch(lambda: T.MistralForCausalLM(T.MistralConfig(**_decoder_kwargs())), "lm"),
    "qwen2": Arch(lambda: T.Qwen2ForCausalLM(T.Qwen2Config(**_decoder_kwargs())), "lm"),
    "gemma": Arch(lambda: T.GemmaForCausalLM(T.GemmaConfig(**_decoder_kwargs(head_dim=8))), "lm"),
    "t5": Arch(_t5, "seq2seq", _t5_lookups),
    "bart": Arch(_bart, "cls", _bart_lookups),
}


def build(name: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return ARCHS[name].build().eval()  # eval: no dropout; gradients flow as in training


def batch(name: str, seed: int = 1) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (B, N), generator=gen)
    ids[:, -1] = 2  # an eos token (BART's classification head pools it)
    task = ARCHS[name].task
    if task == "cls":
        return {"input_ids": ids, "labels": torch.randint(0, 2, (B,), generator=gen)}
    if task == "lm":
        return {"input_ids": ids, "labels": ids}
    return {"input_ids": ids, "labels": torch.randint(3, VOCAB, (B, 4), generator=gen)}


def logits(model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits


def check_fgm_step(wrapped: nn.Module, ref: nn.Module, ref_lookups: list[nn.Module], inputs, mode: str) -> None:
    """One advgraph FGM step == the hand-written one; parameters byte-identical after it."""
    expected_loss = reference_fgm(ref_lookups, lambda: ref(**inputs).loss, EPS, mode)
    before = param_bytes(wrapped)
    loss = wrapped.adversarial_step(lambda: wrapped(**inputs).loss)
    assert param_bytes(wrapped) == before
    assert loss.item() == expected_loss.item()
    got, want = grads(wrapped), grads(ref)
    assert got.keys() == want.keys()
    for name, g in want.items():
        if g is None:
            assert got[name] is None, name
        else:
            torch.testing.assert_close(got[name], g, rtol=1e-4, atol=1e-6, msg=name)
    assert any(g is not None and g.abs().sum() > 0 for g in got.values())


@pytest.mark.parametrize("mode", ["output", "matrix"])
@pytest.mark.parametrize("name", list(ARCHS))
def test_fgm_step_equals_hand_written_and_unwrap_is_bit_identical(name, mode):
    model = build(name)
    ref = copy.deepcopy(model)
    inputs = batch(name)
    expected = logits(model, inputs)
    classes = {n: type(m) for n, m in model.named_modules()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", advgraph.AdvGraphWarning)  # tied LM heads (matrix)
        wrapped = advgraph.wrap(model, mode=mode, epsilon=EPS)
    assert wrapped is model and isinstance(wrapped, type(ref)) and type(wrapped).__name__ == type(ref).__name__
    assert wrapped.config.model_type == ref.config.model_type  # HF attributes reachable
    emb = wrapped.get_input_embeddings()
    assert isinstance(emb, type(ref.get_input_embeddings()))
    lookups = ARCHS[name].lookups(wrapped)
    assert set(map(id, lookups)) <= {id(m) for m in map(wrapped.get_submodule, wrapped.advgraph_lookups)}
    assert wrapped.advgraph_route == ("matrix" if mode == "matrix" else "fx")
    assert torch.equal(logits(wrapped, inputs), expected)  # invisible when idle

    check_fgm_step(wrapped, ref, ARCHS[name].lookups(ref), inputs, mode)

    plain = advgraph.unwrap(wrapped)
    assert plain is model
    assert {n: type(m) for n, m in plain.named_modules()} == classes
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in plain.modules())
    assert torch.equal(logits(plain, inputs), expected)


def test_encoder_decoder_lookups_and_a_target_never_called():
    model = build("t5")
    wrapped = advgraph.wrap(model)
    assert wrapped.advgraph_target == "shared"
    assert wrapped.advgraph_lookups == ("shared", "encoder.embed_tokens", "decoder.embed_tokens")
    assert "# encoder.embed_tokens (Embedding): fx-rewritten forward" in wrapped.advgraph_code
    model = advgraph.unwrap(wrapped)
    # A dotted path selects one module; `shared` itself is never called by T5's forward.
    wrapped = advgraph.wrap(model, target="shared")
    assert wrapped.advgraph_lookups == ("shared",)
    inputs = batch("t5")
    before = param_bytes(model)
    with pytest.raises(ValueError, match=r"\(shared\).*Received: embedding_calls=0, target='shared'") as caught:
        wrapped.adversarial_step(lambda: wrapped(**inputs).loss)
    assert "encoder.embed_tokens" in str(caught.value) and "decoder.embed_tokens" in str(caught.value)
    assert param_bytes(model) == before and not wrapped.__dict__["_advgraph"].site.active
    model = advgraph.unwrap(wrapped)
    # The decoder's lookup alone: only its calls are perturbed.
    ref = copy.deepcopy(model)
    wrapped = advgraph.wrap(model, target="decoder.embed_tokens", epsilon=EPS)
    assert wrapped.advgraph_lookups == ("decoder.embed_tokens",)
    check_fgm_step(wrapped, ref, [ref.decoder.embed_tokens], inputs, "output")


# --------------------------------------------------------------------------- around training


def test_peft_lora_output_mode_and_matrix_refused():
    peft = pytest.importorskip("peft")
    base = build("bert")
    ref = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=2, target_modules=["query", "value"]))
    model = peft.get_peft_model(base, peft.LoraConfig(r=2, target_modules=["query", "value"]))
    with torch.no_grad():  # LoRA's B starts at zero: give it values so its gradient is not trivial
        for (n, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
            if "lora_B" in n:
                p.copy_(torch.full_like(p, 0.05))
            q.copy_(p)
    inputs = batch("bert")
    before = param_bytes(model)
    with pytest.raises(ValueError, match=r"frozen.*Received: requires_grad=False"):
        advgraph.wrap(model, mode="matrix")
    assert not advgraph.is_wrapped(model) and param_bytes(model) == before
    wrapped = advgraph.wrap(model, epsilon=EPS)
    assert wrapped is model and isinstance(wrapped, peft.PeftModel)
    assert wrapped.get_nb_trainable_parameters() == ref.get_nb_trainable_parameters()  # PEFT's own method
    check_fgm_step(wrapped, ref, [ref.get_input_embeddings()], inputs, "output")
    assert model.get_input_embeddings().weight.grad is None  # frozen: never touched
    assert advgraph.unwrap(wrapped) is model


@pytest.mark.parametrize("mode", ["output", "matrix"])
@pytest.mark.parametrize("reentrant", [True, False])
def test_gradient_checkpointing(reentrant, mode):
    model = build("llama").train()
    ref = copy.deepcopy(model)
    for m in (model, ref):
        m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    inputs = batch("llama")
    wrapped = advgraph.wrap(model, mode=mode, epsilon=EPS)
    check_fgm_step(wrapped, ref, [ref.get_input_embeddings()], inputs, mode)


@pytest.mark.parametrize("mode", ["output", "matrix"])
@pytest.mark.parametrize("name", ["bert", "t5"])
def test_resize_token_embeddings_after_wrap(name, mode):
    model = build(name)
    ref = copy.deepcopy(model)
    wrapped = advgraph.wrap(model, mode=mode, epsilon=EPS)
    new_vocab = VOCAB + 8
    for m in (ref, wrapped):
        torch.manual_seed(5)
        m.resize_token_embeddings(new_vocab)
    emb = wrapped.get_input_embeddings()
    assert isinstance(emb, nn.Embedding) and emb.num_embeddings == new_vocab
    assert torch.equal(emb.weight, ref.get_input_embeddings().weight)
    inputs = batch(name)
    inputs["input_ids"][:, 0] = VOCAB + 3  # a new token: its row must be perturbed too
    check_fgm_step(wrapped, ref, ARCHS[name].lookups(ref), inputs, mode)
    if mode == "output":
        assert "fx-rewritten forward" in wrapped.advgraph_code


@pytest.mark.parametrize("name", ["gpt2", "t5"])
def test_generate_is_unchanged(name):
    model = build(name)
    inputs = batch(name)
    ids = inputs["input_ids"][:, :4]
    kwargs = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    expected = model.generate(ids, **kwargs)
    wrapped = advgraph.wrap(model)
    assert torch.equal(wrapped.generate(ids, **kwargs), expected)
    wrapped.adversarial_step(lambda: wrapped(**inputs).loss)  # no optimizer step: same weights
    assert torch.equal(wrapped.generate(ids, **kwargs), expected)


def test_save_pretrained_and_config(tmp_path):
    model = build("t5")
    wrapped = advgraph.wrap(model)
    assert wrapped.config.model_type == "t5"
    inputs = batch("t5")
    wrapped.adversarial_step(lambda: wrapped(**inputs).loss)
    torch.optim.SGD(wrapped.parameters(), lr=0.5).step()
    wrapped.save_pretrained(str(tmp_path))
    plain = transformers.T5ForConditionalGeneration.from_pretrained(str(tmp_path)).eval()
    assert type(plain) is transformers.T5ForConditionalGeneration
    assert type(plain.get_input_embeddings()) is nn.Embedding
    assert sorted(plain.state_dict()) == sorted(wrapped.state_dict())
    assert torch.equal(logits(plain, inputs), logits(wrapped, inputs))


class BiEncoder(nn.Module):
    """One BERT encoder run on the query and on the document (in-batch contrastive loss)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.encoder = transformers.BertModel(transformers.BertConfig(**_encoder_kwargs()))

    def forward(self, query: torch.Tensor, doc: torch.Tensor) -> torch.Tensor:
        q = self.encoder(input_ids=query).last_hidden_state[:, 0]
        d = self.encoder(input_ids=doc).last_hidden_state[:, 0]
        return F.cross_entropy(q @ d.T, torch.arange(q.shape[0]))


@pytest.mark.parametrize("what", ["bi-encoder", "encoder", "encoder, by hand"])
@pytest.mark.parametrize("mode", ["output", "matrix"])
def test_bi_encoder_runs_one_encoder_twice(mode, what):
    """Wrap the bi-encoder, or only its encoder (then the closure calls it twice), or
    only its encoder with the hand-written perturbed() loop."""
    model = BiEncoder().eval()
    ref = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(2)
    query, doc = torch.randint(3, VOCAB, (3, 5), generator=gen), torch.randint(3, VOCAB, (3, 9), generator=gen)
    expected_loss = reference_fgm(
        [ref.encoder.embeddings.word_embeddings], lambda: ref(query, doc), EPS, mode
    )
    before = param_bytes(model)
    if what == "bi-encoder":
        wrapped = advgraph.wrap(model, mode=mode, epsilon=EPS)
        assert wrapped.advgraph_lookups == ("encoder.embeddings.word_embeddings",)
        loss = wrapped.adversarial_step(lambda: wrapped(query, doc))
    else:
        wrapped = advgraph.wrap(model.encoder, mode=mode, epsilon=EPS)
        assert wrapped.advgraph_lookups == ("embeddings.word_embeddings",)
        if what == "encoder":
            loss = wrapped.adversarial_step(lambda: model(query, doc))
        else:
            loss = model(query, doc)
            loss.backward()
            with wrapped.perturbed():
                model(query, doc).backward()
    assert param_bytes(model) == before and loss.item() == expected_loss.item()
    for name, g in grads(ref).items():
        torch.testing.assert_close(grads(model)[name], g, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("mode", ["output", "matrix"])
def test_a_replaced_embedding_is_followed(mode):
    model = build("bert")
    ref = copy.deepcopy(model)
    wrapped = advgraph.wrap(model, mode=mode, epsilon=EPS)
    old = wrapped.get_input_embeddings()
    torch.manual_seed(7)
    new = nn.Embedding(VOCAB + 4, 16, padding_idx=0)
    ref.set_input_embeddings(copy.deepcopy(new))
    wrapped.set_input_embeddings(new)
    inputs = batch("bert")
    check_fgm_step(wrapped, ref, [ref.get_input_embeddings()], inputs, mode)
    assert wrapped.get_input_embeddings() is new and isinstance(new, nn.Embedding)
    assert type(old) is nn.Embedding and "_advgraph_site" not in vars(old)  # given back, plain
    assert wrapped.advgraph_lookups == ("bert.embeddings.word_embeddings",)
    advgraph.unwrap(wrapped)
    assert type(new) is nn.Embedding and not new._forward_hooks


def test_torch_save_and_deepcopy_of_an_encoder_decoder():
    import io

    model = build("t5")
    wrapped = advgraph.wrap(model, epsilon=EPS)
    inputs = batch("t5")
    buf = io.BytesIO()
    torch.save(wrapped, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    clone = copy.deepcopy(wrapped)
    for other in (loaded, clone):
        assert advgraph.is_wrapped(other) and other.advgraph_lookups == wrapped.advgraph_lookups
        assert other.encoder.embed_tokens is other.shared or other.encoder.embed_tokens.weight is other.shared.weight
        ref = advgraph.unwrap(copy.deepcopy(other))
        check_fgm_step(other, ref, _t5_lookups(ref), inputs, "output")
    assert all(p.grad is None for p in model.parameters())  # the copies' steps stay theirs


def test_an_embedding_shared_by_two_models_is_refused():
    model = build("bert")
    other = build("bert", seed=1)
    other.set_input_embeddings(model.get_input_embeddings())
    advgraph.wrap(model)
    before = param_bytes(other)
    with pytest.raises(ValueError, match=r"already perturbed.*Received: target='bert.embeddings.word_embeddings'"):
        advgraph.wrap(other)
    assert not advgraph.is_wrapped(other) and param_bytes(other) == before


@pytest.mark.parametrize("mode", ["output", "matrix"])
@pytest.mark.parametrize(
    "method,kwargs",
    [("fgsm", {}), ("pgd", {"steps": 2, "random_init": True}), ("freelb", {"steps": 2}), ("vat", {})],
)
def test_every_method_on_an_encoder_decoder(method, kwargs, mode):
    """Several lookups per pass touching different rows: random starts included."""
    model = build("t5")
    inputs = batch("t5")
    wrapped = advgraph.wrap(model, mode=mode, method=method, epsilon=EPS, **kwargs)
    before = param_bytes(model)
    seen = []
    handle = model.decoder.embed_tokens.register_forward_hook(lambda m, a, out: seen.append(out.detach()))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", advgraph.AdvGraphWarning)  # tied LM head (matrix)
        warnings.simplefilter("error", RuntimeWarning)
        if method == "vat":
            wrapped.adversarial_step(lambda: wrapped(**inputs).logits)
        else:
            wrapped.adversarial_step(lambda: wrapped(**inputs).loss)
    handle.remove()
    assert param_bytes(model) == before
    assert wrapped.advgraph_stats == {"steps": 1, "plain_steps": 0, "skipped_nonfinite": 0, "skipped_zero": 0}
    assert not torch.equal(seen[-1], seen[0])  # the decoder's lookup was perturbed
    assert all(p.grad is not None for n, p in model.named_parameters() if "relative_attention_bias" not in n)
