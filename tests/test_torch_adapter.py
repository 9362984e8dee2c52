"""PyTorch adapter: wrap/unwrap contract, routes, modes, objectives, numerics."""

from __future__ import annotations

import copy
import inspect
import io
import logging
import warnings

import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402
from torch.nn import functional as F  # noqa: E402

import advgraph  # noqa: E402
from torch_models import (  # noqa: E402
    ConvClassifier,
    Siamese,
    reference_fgm,
    LSTMClassifier,
    MeanPool,
    Untraceable,
    WithMask,
    grads,
    param_bytes,
    tiny_bert,
    tiny_gpt2,
)


def batch(vocab: int = 30, b: int = 4, n: int = 6, classes: int = 3, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(1, vocab, (b, n), generator=gen), torch.randint(0, classes, (b,), generator=gen)


MODELS = [LSTMClassifier, ConvClassifier, MeanPool]


# --------------------------------------------------------------------------- contract


@pytest.mark.parametrize("model_cls", MODELS)
@pytest.mark.parametrize("mode", ["output", "matrix"])
def test_wrapped_keeps_outputs_parameters_and_state_dict(model_cls, mode):
    torch.manual_seed(0)
    model = model_cls()
    x, _ = batch()
    expected = model(x)
    with torch.no_grad():  # kernels may differ with and without autograd (LSTM does)
        expected_no_grad = model(x)
    params = {n: p for n, p in model.named_parameters()}
    keys = list(model.state_dict())
    wrapped = advgraph.wrap(model, mode=mode)
    assert advgraph.is_wrapped(wrapped)
    assert torch.equal(wrapped(x), expected)
    with torch.no_grad():
        assert torch.equal(wrapped(x), expected_no_grad)
    assert {n: p for n, p in wrapped.named_parameters()}.keys() == params.keys()
    for name, p in wrapped.named_parameters():
        assert p is params[name]
    assert sorted(wrapped.state_dict()) == sorted(keys)
    for key, value in model.state_dict().items():
        assert torch.equal(wrapped.state_dict()[key], value)
    assert wrapped is model and isinstance(wrapped, model_cls)
    assert isinstance(model.emb, nn.Embedding) and type(model.emb).__name__ == "Embedding"
    assert (type(model.emb) is nn.Embedding) == (mode == "matrix")  # output: fx-rewritten subclass
    assert list(inspect.signature(wrapped.forward).parameters) == list(
        inspect.signature(model.forward).parameters
    )


def test_state_dict_loads_both_ways():
    torch.manual_seed(0)
    a, b = MeanPool(), MeanPool()
    wrapped = advgraph.wrap(a)
    wrapped.load_state_dict(b.state_dict())
    assert torch.equal(a.emb.weight, b.emb.weight)
    torch.manual_seed(1)
    c = MeanPool()
    c.load_state_dict(wrapped.state_dict())
    assert torch.equal(c.fc.weight, a.fc.weight)


def test_optimizer_built_before_wrap_keeps_working():
    torch.manual_seed(0)
    model = MeanPool()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    wrapped = advgraph.wrap(model, mode="output")
    x, y = batch()
    before = model.fc.weight.detach().clone()
    opt.zero_grad()
    wrapped.adversarial_step(lambda: F.cross_entropy(wrapped(x), y))
    opt.step()
    assert not torch.equal(model.fc.weight, before)


@pytest.mark.parametrize("mode", ["output", "matrix"])
def test_train_eval_to_and_deepcopy(mode):
    torch.manual_seed(0)
    model = LSTMClassifier()
    wrapped = advgraph.wrap(model, mode=mode)
    x, y = batch()
    wrapped.eval()
    assert not wrapped.training and not model.lstm.training
    wrapped.train()
    assert model.lstm.training
    wrapped.to(torch.float64)
    assert model.emb.weight.dtype == torch.float64
    wrapped.to(torch.float32)
    clone = copy.deepcopy(wrapped)
    assert advgraph.is_wrapped(clone) and clone.advgraph_route == wrapped.advgraph_route
    assert torch.equal(clone(x), wrapped(x))
    assert all(p is not q for p, q in zip(clone.parameters(), wrapped.parameters()))
    before = param_bytes(clone)
    loss = clone.adversarial_step(lambda: F.cross_entropy(clone(x), y))
    assert torch.isfinite(loss)
    assert param_bytes(clone) == before
    # The copy's steps do not touch the original's gradients.
    assert all(p.grad is None for p in wrapped.parameters())


def test_torch_save_whole_wrapped_module_round_trips():
    torch.manual_seed(0)
    model = tiny_bert()
    wrapped = advgraph.wrap(model, mode="output")
    ids = torch.randint(0, 64, (2, 8))
    expected = wrapped(input_ids=ids).logits
    buf = io.BytesIO()
    torch.save(wrapped, buf)
    assert advgraph.is_wrapped(wrapped)  # saving does not unwrap the live model
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    assert advgraph.is_wrapped(loaded) and loaded.advgraph_route == "fx"
    assert torch.equal(loaded(input_ids=ids).logits, expected)
    loss = loaded.adversarial_step(
        lambda: F.cross_entropy(loaded(input_ids=ids).logits, torch.tensor([0, 1]))
    )
    assert torch.isfinite(loss)


def test_adversarial_step_returns_detached_clean_loss_and_leaves_grads():
    torch.manual_seed(0)
    model = MeanPool()
    x, y = batch()
    clean = F.cross_entropy(model(x), y).item()
    wrapped = advgraph.wrap(model)
    loss = wrapped.adversarial_step(lambda: F.cross_entropy(wrapped(x), y))
    assert not loss.requires_grad
    assert loss.item() == pytest.approx(clean, rel=0, abs=0)
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("model_cls", MODELS + [WithMask, Untraceable])
@pytest.mark.parametrize("mode", ["output", "matrix"])
def test_unwrap_restores_original_forward_bitwise(model_cls, mode):
    torch.manual_seed(0)
    model = model_cls()
    x, y = batch()
    expected = model(x)
    if mode == "matrix" and model_cls is Untraceable:
        wrapped = advgraph.wrap(model, target="tok.inner", mode=mode)
    else:
        wrapped = advgraph.wrap(model, mode=mode) if model_cls is not Untraceable else advgraph.wrap(model, target="tok")
    wrapped.adversarial_step(lambda: F.cross_entropy(wrapped(x), y))
    for p in model.parameters():
        p.grad = None
    plain = advgraph.unwrap(wrapped)
    assert plain is model
    assert type(plain) is model_cls
    assert not advgraph.is_wrapped(plain)
    assert torch.equal(plain(x), expected)
    assert not plain._forward_hooks and not plain._forward_pre_hooks
    assert all(not m._forward_hooks for m in plain.modules())
    assert all("advgraph" not in type(m).__name__.lower() for m in plain.modules())


# --------------------------------------------------------------------------- routes


def test_route_fx_keeps_the_users_objects_and_shows_node(caplog):
    class Classifier(LSTMClassifier):
        label_names = ("a", "b", "c")

        def predict(self, x):
            return self(x).argmax(-1)

    torch.manual_seed(0)
    model = Classifier()
    emb = model.emb
    x, y = batch()
    expected = model(x)
    with caplog.at_level(logging.INFO, logger="advgraph"):
        wrapped = advgraph.wrap(model)
    assert wrapped.advgraph_route == "fx"
    assert "route=fx" in caplog.text
    # The user's objects: the model and its embedding stay the same objects of their classes.
    assert wrapped is model and isinstance(wrapped, Classifier) and type(wrapped).__name__ == "Classifier"
    assert wrapped.label_names == ("a", "b", "c")
    assert torch.equal(wrapped.predict(x), expected.argmax(-1))
    assert model.emb is emb and isinstance(emb, nn.Embedding) and type(emb).__name__ == "Embedding"
    assert not isinstance(wrapped, torch.fx.GraphModule) and not isinstance(emb, torch.fx.GraphModule)
    assert emb.num_embeddings == 30 and repr(emb) == "Embedding(30, 8)"
    # The fx pass's node, printed from the rewritten forward of the embedding.
    code = wrapped.advgraph_code
    assert "# emb (Embedding): fx-rewritten forward" in code
    assert "advgraph_perturbation = _advgraph_site.on_output(embedding)" in code
    assert "return advgraph_perturbation" in code
    assert [m for m in model.modules()] == [model, emb, model.lstm, model.fc]


def test_route_fx_with_optional_arguments():
    torch.manual_seed(0)
    model = WithMask()
    x, y = batch()
    mask = torch.ones(x.shape)
    expected = model(x, mask=mask)
    wrapped = advgraph.wrap(model)
    assert wrapped.advgraph_route == "fx"
    assert wrapped is model and isinstance(model.emb, nn.Embedding)
    assert model.emb.num_embeddings == 30 and model.emb.weight is wrapped.emb.weight
    assert torch.equal(wrapped(x, mask=mask), expected)
    wrapped.adversarial_step(lambda: F.cross_entropy(wrapped(x, mask), y))


def test_route_hook_when_nothing_traces():
    torch.manual_seed(0)
    model = Untraceable()
    x, y = batch()
    expected = model(x)
    wrapped = advgraph.wrap(model, target="tok")
    assert wrapped.advgraph_route == "hook"
    assert torch.equal(wrapped(x), expected)
    before = param_bytes(model)
    wrapped.adversarial_step(lambda: F.cross_entropy(wrapped(x), y))
    assert param_bytes(model) == before


def test_output_mode_semantics_identical_across_routes(monkeypatch):
    """fx and hook give the same gradients for the same model."""
    torch.manual_seed(0)
    x, y = batch()
    results = []
    for force_hook in (False, True):
        torch.manual_seed(0)
        model = WithMask()
        if force_hook:
            from advgraph.adapters.torch import _module

            def reject(module):
                raise _module.TraceRejected("test")

            monkeypatch.setattr(_module, "rewrite_lookup", reject)
        wrapped = advgraph.wrap(model, epsilon=0.7)
        assert wrapped.advgraph_route == ("hook" if force_hook else "fx")
        wrapped.adversarial_step(lambda: F.cross_entropy(wrapped(x), y))
        results.append(grads(model))
    for name in results[0]:
        torch.testing.assert_close(results[1][name], results[0][name], rtol=1e-6, atol=1e-7)


def test_bert_and_gpt2_output_and_matrix():
    for build, kwargs in ((tiny_bert, {}), (tiny_gpt2, {})):
        for mode in ("output", "matrix"):
            model = build()
            model.train()
            ids = torch.randint(0, 64, (2, 8))
            before = param_bytes(model)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                wrapped = advgraph.wrap(model, mode=mode, epsilon=0.5)
            tied = [w for w in caught if "tied" in str(w.message)]
            if build is tiny_gpt2 and mode == "matrix":
                assert tied and "lm_head.weight" in str(tied[0].message)
            else:
                assert not tied
            if build is tiny_bert:
                closure = lambda: F.cross_entropy(  # noqa: E731
                    wrapped(input_ids=ids).logits, torch.tensor([0, 1])
                )
                assert wrapped.advgraph_target == "bert.embeddings.word_embeddings"
            else:
                closure = lambda: wrapped(input_ids=ids, labels=ids).loss  # noqa: E731
                assert wrapped.advgraph_target == "transformer.wte"
            loss = wrapped.adversarial_step(closure)
            assert torch.isfinite(loss)
            assert param_bytes(model) == before
            assert wrapped.advgraph_route == ("matrix" if mode == "matrix" else "fx")
            advgraph.unwrap(wrapped)


# --------------------------------------------------------------------------- objectives


@pytest.mark.parametrize("mode", ["output", "matrix"])
def test_objective_adv_uses_only_the_adversarial_gradient(mode):
    torch.manual_seed(0)
    x, y = batch()
    model = MeanPool()
    ref = copy.deepcopy(model)
    w_both = advgraph.wrap(copy.deepcopy(model), mode=mode, epsilon=0.3)
    w_both.adversarial_step(lambda: F.cross_entropy(w_both(x), y))
    w_adv = advgraph.wrap(model, mode=mode, epsilon=0.3, objective="adv")
    w_adv.adversarial_step(lambda: F.cross_entropy(w_adv(x), y))
    F.cross_entropy(ref(x), y).backward()
    clean = grads(ref)
    both, adv = grads(w_both), grads(w_adv)
    for name in clean:
        torch.testing.assert_close(both[name] - clean[name], adv[name], rtol=1e-5, atol=1e-6)
        assert not torch.allclose(adv[name], clean[name])


def test_gradient_accumulation_uses_this_micro_batch():
    """delta comes from the current micro-batch's gradient, not from .grad."""
    torch.manual_seed(0)
    model = MeanPool()
    x1, y1 = batch(seed=1)
    x2, y2 = batch(seed=2)
    wrapped = advgraph.wrap(model, mode="matrix", epsilon=0.5)
    wrapped.adversarial_step(lambda: F.cross_entropy(wrapped(x1), y1))
    # Second micro-batch: its delta must equal the delta computed alone.
    F.cross_entropy(wrapped(x2), y2).backward()
    site = wrapped.__dict__["_advgraph"].site
    g_accumulated_micro = site.site_grad()
    fresh = copy.deepcopy(advgraph.unwrap(copy.deepcopy(wrapped)))
    fresh.zero_grad()
    F.cross_entropy(fresh(x2), y2).backward()
    rows = torch.unique(x2)
    torch.testing.assert_close(g_accumulated_micro, fresh.emb.weight.grad[rows], rtol=1e-6, atol=1e-8)


# --------------------------------------------------------------------------- manual loop


@pytest.mark.parametrize("mode", ["output", "matrix"])
def test_perturbed_matches_adversarial_step(mode):
    torch.manual_seed(0)
    x, y = batch()
    a = MeanPool()
    b = copy.deepcopy(a)
    wa = advgraph.wrap(a, mode=mode, epsilon=0.4)
    wa.adversarial_step(lambda: F.cross_entropy(wa(x), y))
    wb = advgraph.wrap(b, mode=mode, epsilon=0.4)
    F.cross_entropy(wb(x), y).backward()
    before = param_bytes(b)
    with wb.perturbed():
        if mode == "matrix":
            assert param_bytes(b) != before  # the rows are perturbed inside the block
        F.cross_entropy(wb(x), y).backward()
    assert param_bytes(b) == before
    for name, g in grads(a).items():
        torch.testing.assert_close(grads(b)[name], g, rtol=0, atol=0)


def test_perturbed_before_backward_raises():
    wrapped = advgraph.wrap(MeanPool())
    with pytest.raises(RuntimeError, match="Received"):
        with wrapped.perturbed():
            pass


def test_perturbed_removes_delta_on_error():
    torch.manual_seed(0)
    model = MeanPool()
    wrapped = advgraph.wrap(model, mode="matrix")
    x, y = batch()
    F.cross_entropy(wrapped(x), y).backward()
    before = param_bytes(model)
    with pytest.raises(KeyError):
        with wrapped.perturbed():
            raise KeyError("boom")
    assert param_bytes(model) == before
    assert not wrapped.__dict__["_advgraph"].site.active


def test_output_mode_batch_shape_change_raises():
    torch.manual_seed(0)
    wrapped = advgraph.wrap(MeanPool())
    x, y = batch()
    F.cross_entropy(wrapped(x), y).backward()
    with pytest.raises(ValueError, match="Received"):
        with wrapped.perturbed():
            wrapped(x[:2])


def test_matrix_mode_saves_only_touched_rows():
    """Matrix mode copies the batch's rows (4 x 8 here), never the 1000 x 8 matrix, and
    restores them by copying those rows back."""
    torch.manual_seed(0)
    model = MeanPool(vocab=1000)
    wrapped = advgraph.wrap(model, mode="matrix")
    x = torch.tensor([[1, 2, 2, 5], [5, 7, 1, 1]])
    y = torch.tensor([0, 1])
    touched, untouched = [1, 2, 5, 7], [r for r in range(1000) if r not in (1, 2, 5, 7)]
    before = model.emb.weight.detach().clone()
    F.cross_entropy(wrapped(x), y).backward()
    site = wrapped.__dict__["_advgraph"].site
    with wrapped.perturbed():
        assert site._saved.shape == (4, 8)  # rows 1, 2, 5, 7 only, not 1000 x 8
        assert site._rows.tolist() == touched
        assert torch.equal(site._saved, before[touched])  # the rows as they were, unperturbed
        weight = model.emb.weight.detach()
        assert (weight[touched] != before[touched]).any(dim=1).all()  # every touched row moved
        assert torch.equal(weight[untouched], before[untouched])  # the rest never written
    assert site._saved is None  # the copy is dropped once restored
    assert torch.equal(model.emb.weight.detach(), before)  # restored bit for bit


def test_matrix_mode_perturbs_exactly_the_touched_rows():
    torch.manual_seed(0)
    model = MeanPool(vocab=50)
    wrapped = advgraph.wrap(model, mode="matrix", epsilon=0.5)
    x = torch.tensor([[1, 2, 2, 5], [5, 7, 1, 1]])
    y = torch.tensor([0, 1])
    before = model.emb.weight.detach().clone()
    F.cross_entropy(wrapped(x), y).backward()
    g = model.emb.weight.grad.clone()
    with wrapped.perturbed():
        diff = model.emb.weight.detach() - before
    changed_rows = diff.abs().sum(dim=1).nonzero().flatten().tolist()
    assert changed_rows == [1, 2, 5, 7]
    torch.testing.assert_close(diff.norm(), torch.tensor(0.5), rtol=1e-5, atol=0)
    expected = 0.5 * g / g.norm()
    torch.testing.assert_close(diff, expected, rtol=1e-4, atol=1e-6)


def test_padding_idx_row_is_not_perturbed():
    torch.manual_seed(0)
    model = MeanPool(padding_idx=0)
    wrapped = advgraph.wrap(model, mode="matrix")
    x = torch.tensor([[0, 0, 3, 4]])
    y = torch.tensor([1])
    before = model.emb.weight.detach().clone()
    F.cross_entropy(wrapped(x), y).backward()
    with wrapped.perturbed():
        assert torch.equal(model.emb.weight[0], before[0])
        assert not torch.equal(model.emb.weight[3], before[3])


@pytest.mark.parametrize(
    "compiled", [False, "lookup", "output"], ids=["eager", "compiled-lookup-tap", "compiled-output-tap"]
)
@pytest.mark.parametrize(
    "emb_kwargs",
    [
        dict(scale_grad_by_freq=True),
        dict(padding_idx=2, scale_grad_by_freq=True),
        dict(padding_idx=2),
        dict(padding_idx=1),  # the first touched row
        dict(padding_idx=7),  # the last touched row
        dict(padding_idx=3),  # not touched, between touched rows
        dict(padding_idx=0),  # not touched, below every touched row
        dict(padding_idx=9),  # not touched, above every touched row
    ],
    ids=["by_freq", "by_freq+padding", "padding", "padding_first", "padding_last",
         "padding_untouched_between", "padding_untouched_below", "padding_untouched_above"],
)
def test_matrix_delta_follows_the_embeddings_own_weight_gradient(emb_kwargs, compiled, monkeypatch):
    """The rows' gradient is rebuilt from the lookup's output gradient: it must be
    what nn.Embedding's own backward gives its weight (the reference: an unwrapped
    copy run eagerly), with the options that change that backward (by-frequency
    scaling; the padding row, where ever it falls among the touched rows). Compiled,
    the tap in the compiled backward builds it (``aot_eager``; the test checks which
    compiled tap ran): a plain nn.Embedding's lookup tap reads the rows out of the
    weight gradient, the output tap (any other lookup; forced here) reduces the
    output's gradient to them."""
    from advgraph.adapters.torch import _taps
    from advgraph.adapters.torch._site import MatrixSite

    torch.manual_seed(0)
    model = MeanPool(**emb_kwargs)
    reference = copy.deepcopy(model)
    x = torch.tensor([[1, 2, 2, 2], [2, 5, 7, 1]])  # ids 2 (4 times) and 1 (twice): scaling matters
    y = torch.tensor([0, 1])
    F.cross_entropy(reference(x), y).backward()
    g = reference.emb.weight.grad  # nn.Embedding's backward, rows not touched are 0
    taps = []
    by_output, by_rows = MatrixSite.on_compiled_grad, MatrixSite.on_compiled_rows
    monkeypatch.setattr(MatrixSite, "on_compiled_grad", lambda self, *a: (taps.append("output"), by_output(self, *a))[1])
    monkeypatch.setattr(MatrixSite, "on_compiled_rows", lambda self, *a: (taps.append("lookup"), by_rows(self, *a))[1])
    if compiled == "output":
        monkeypatch.setattr(_taps, "plain_lookup", lambda module, hook: False)
    wrapped = advgraph.wrap(model, mode="matrix", epsilon=0.5)
    if compiled:
        torch._dynamo.reset()  # a fresh cache: no earlier test's graphs, no recompile limit
        forward = torch.compile(wrapped, backend="aot_eager", fullgraph=True)
    else:
        forward = wrapped
    before = model.emb.weight.detach().clone()
    F.cross_entropy(forward(x), y).backward()
    assert taps == ([compiled] if compiled else [])
    # The gradient flows on past the tap unchanged (the weight's own gradient).
    torch.testing.assert_close(model.emb.weight.grad, g, rtol=1e-6, atol=1e-7)
    with wrapped.perturbed():
        diff = model.emb.weight.detach() - before
    # diff = (w + d) - w carries half a unit in the last place of w + d.
    ulp = 2.0**-23 * float(before.abs().max())
    torch.testing.assert_close(diff, 0.5 * g / g.norm(), rtol=1e-5, atol=2 * ulp)
    assert torch.equal(model.emb.weight.detach(), before)  # restored, bit for bit


def test_sparse_embedding_works_in_both_modes():
    for mode in ("output", "matrix"):
        torch.manual_seed(0)
        model = MeanPool(sparse=True)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        wrapped = advgraph.wrap(model, mode=mode)
        x, y = batch()
        before = param_bytes(model)
        wrapped.adversarial_step(lambda: F.cross_entropy(wrapped(x), y))
        assert model.emb.weight.grad.is_sparse
        assert param_bytes(model) == before
        opt.step()
        advgraph.unwrap(wrapped)


# --------------------------------------------------------------------------- numerics


@pytest.mark.parametrize("mode", ["output", "matrix"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), 0.0])
def test_bad_gradients_give_zero_delta_and_are_counted(mode, bad):
    torch.manual_seed(0)
    model = MeanPool()
    wrapped = advgraph.wrap(model, mode=mode)
    x, y = batch()
    before = param_bytes(model)

    def closure():
        return (wrapped(x) * bad).sum()

    with pytest.warns(advgraph.AdvGraphWarning):
        wrapped.adversarial_step(closure)
    stats = wrapped.advgraph_stats
    assert stats["steps"] == 1
    key = "skipped_zero" if bad == 0.0 else "skipped_nonfinite"
    assert stats[key] == 1
    after = param_bytes(model)
    assert after == before
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_autocast_bfloat16_cpu():
    # (LSTM under bfloat16 autocast fails in oneDNN itself on some CPUs; use a conv model.)
    torch.manual_seed(0)
    model = ConvClassifier()
    wrapped = advgraph.wrap(model, mode="output")
    x, y = batch()
    before = param_bytes(model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = wrapped.adversarial_step(lambda: F.cross_entropy(wrapped(x), y))
    assert torch.isfinite(loss)
    assert param_bytes(model) == before
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize("mode", ["output", "matrix"])
def test_grad_scaler(mode):
    torch.manual_seed(0)
    model = MeanPool()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    ref = copy.deepcopy(model)
    wrapped = advgraph.wrap(model, mode=mode, epsilon=0.2)
    x, y = batch()
    w_ref = advgraph.wrap(ref, mode=mode, epsilon=0.2)
    w_ref.adversarial_step(lambda: F.cross_entropy(w_ref(x), y))
    wrapped.adversarial_step(lambda: scaler.scale(F.cross_entropy(wrapped(x), y)))
    scaler.unscale_(opt)
    for (name, g), g_ref in zip(grads(model).items(), grads(ref).values()):
        torch.testing.assert_close(g, g_ref, rtol=1e-5, atol=1e-6)
    scaler.step(opt)
    scaler.update()
    assert all(torch.isfinite(p).all() for p in model.parameters())


# --------------------------------------------------------------------------- targets


def test_target_resolution():
    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.pos = nn.Embedding(16, 8)
            self.tok = nn.Embedding(100, 8)
            self.fc = nn.Linear(8, 2)

        def forward(self, x):
            return self.fc((self.tok(x) + self.pos(torch.arange(x.shape[1]))).mean(1))

    model = Two()
    assert advgraph.unwrap(advgraph.wrap(model)) is model
    w = advgraph.wrap(model)
    assert w.advgraph_target == "tok"  # most rows
    model = advgraph.unwrap(w)
    w = advgraph.wrap(model, target="pos")
    assert w.advgraph_target == "pos"
    model = advgraph.unwrap(w)
    w = advgraph.wrap(model, target=model.pos, mode="matrix")
    assert w.advgraph_target == "pos"
    advgraph.unwrap(w)
    with pytest.raises(ValueError, match=r"Candidates: pos .*tok.*Received: target='nope'"):
        advgraph.wrap(model, target="nope")
    with pytest.raises(ValueError, match="Candidates"):
        advgraph.wrap(model, target=nn.Embedding(3, 3))
    with pytest.raises(TypeError, match="Received"):
        advgraph.wrap(model, target=3)


def test_ambiguous_and_missing_embedding():
    class Twins(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Embedding(10, 4)
            self.b = nn.Embedding(10, 4)

        def forward(self, x):
            return self.a(x) + self.b(x)

    with pytest.raises(ValueError, match=r"ambiguous.*Candidates: a .*b "):
        advgraph.wrap(Twins())
    with pytest.raises(ValueError, match="no nn.Embedding"):
        advgraph.wrap(nn.Linear(3, 3))


@pytest.mark.parametrize("mode", ["output", "matrix"])
def test_target_called_twice_per_forward_matches_hand_written_fgm(mode):
    """Output mode: one delta per call from that call's gradient; matrix: union of rows."""
    torch.manual_seed(0)
    model = Siamese()
    ref = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(3)
    x, z = torch.randint(0, 30, (4, 3), generator=gen), torch.randint(0, 30, (4, 5), generator=gen)
    y = torch.randint(0, 3, (4,), generator=gen)
    expected_loss = reference_fgm([ref.emb], lambda: F.cross_entropy(ref(x, z), y), 0.3, mode)
    w = advgraph.wrap(model, mode=mode, epsilon=0.3)
    before = param_bytes(model)
    loss = w.adversarial_step(lambda: F.cross_entropy(w(x, z), y))
    assert param_bytes(model) == before
    assert loss.item() == expected_loss.item()
    for name, g in grads(ref).items():
        torch.testing.assert_close(grads(model)[name], g, rtol=1e-5, atol=1e-7)
    assert not w.__dict__["_advgraph"].site.active
    # The manual loop gives the same, one delta per call as well.
    manual = copy.deepcopy(advgraph.unwrap(w))
    manual.zero_grad()
    wm = advgraph.wrap(manual, mode=mode, epsilon=0.3)
    F.cross_entropy(wm(x, z), y).backward()
    with wm.perturbed():
        F.cross_entropy(wm(x, z), y).backward()
    for name, g in grads(ref).items():
        torch.testing.assert_close(grads(manual)[name], g, rtol=1e-5, atol=1e-7)


def test_frozen_embedding():
    model = MeanPool()
    model.emb.weight.requires_grad_(False)
    with pytest.raises(ValueError, match="frozen"):
        advgraph.wrap(model, mode="matrix")
    assert not advgraph.is_wrapped(model)
    wrapped = advgraph.wrap(model, mode="output")  # output mode works with a frozen table
    x, y = batch()
    wrapped.adversarial_step(lambda: F.cross_entropy(wrapped(x), y))
    assert model.fc.weight.grad is not None and model.emb.weight.grad is None


def test_bad_arguments_leave_the_model_untouched():
    model = MeanPool()
    before = param_bytes(model)
    cases = [
        dict(mode="both"),
        dict(mode=1),
        dict(method="pgdx"),
        dict(steps=0, method="pgd"),
        dict(alpha=0.0, method="pgd"),
        dict(method="freelb", objective="clean+adv"),
        dict(method="vat", norm="linf"),
        dict(xi=0.1),
        dict(init_mag=0.1, method="pgd"),
        dict(epsilon=None),
        dict(objective="sum"),
        dict(epsilon=0),
        dict(epsilon=-1.0),
        dict(epsilon=float("nan")),
        dict(epsilon=float("inf")),
        dict(epsilon="1"),
        dict(norm="l1"),
        dict(method="fgsm", norm="l2"),
        dict(mode="matrix", per_sample=True),
        dict(per_sample="yes"),
        dict(steps=3),
        dict(alpha=0.1),
        dict(random_init=True),
    ]
    for kwargs in cases:
        with pytest.raises((TypeError, ValueError), match="Received"):
            advgraph.wrap(model, **kwargs)
        assert not advgraph.is_wrapped(model)
        assert type(model) is MeanPool
    assert param_bytes(model) == before
    with pytest.raises(TypeError, match="Received"):
        advgraph.wrap(object())
    wrapped = advgraph.wrap(model)
    with pytest.raises(ValueError, match="already wrapped"):
        advgraph.wrap(wrapped)
    with pytest.raises(TypeError, match="Received"):
        advgraph.unwrap(MeanPool())
    with pytest.raises(TypeError, match="Received"):
        wrapped.adversarial_step("not callable")
    x, y = batch()
    with pytest.raises(ValueError, match="scalar"):
        wrapped.adversarial_step(lambda: F.cross_entropy(wrapped(x), y, reduction="none"))
    with pytest.raises(TypeError, match="Received"):
        wrapped.adversarial_step(lambda: None)
    with pytest.raises(ValueError, match="did not run the wrapped embedding"):
        wrapped.adversarial_step(lambda: (model.fc.weight**2).sum())
    assert param_bytes(model) == before


@pytest.mark.parametrize("method", ["freelb", "vat"])
def test_matrix_mode_applies_a_delta_given_as_a_function(method):
    """FreeLB's random start and VAT's random direction reach the rows in matrix mode.

    (They were silently dropped before: the lookup's pre-hook was never installed, so
    FreeLB started from 0 and VAT's power iteration saw a zero gradient.)"""
    torch.manual_seed(0)
    model = MeanPool()
    x, y = batch()
    clean = F.cross_entropy(model(x), y).item()
    wrapped = advgraph.wrap(model, mode="matrix", method=method, epsilon=0.5)
    before = param_bytes(model)
    rows_seen = []
    handle = model.emb.register_forward_hook(lambda m, a, out: rows_seen.append(out.detach().clone()))
    with warnings.catch_warnings():
        warnings.simplefilter("error", advgraph.AdvGraphWarning)  # no zero-gradient skip
        if method == "freelb":
            first = wrapped.adversarial_step(lambda: F.cross_entropy(wrapped(x), y))
            assert first.item() != clean  # the first pass ran at the random start
        else:
            wrapped.adversarial_step(lambda: wrapped(x))
    handle.remove()
    first_perturbed = 0 if method == "freelb" else 1  # vat: after the clean pass
    assert not torch.equal(rows_seen[first_perturbed], model.emb(x))
    assert param_bytes(model) == before and wrapped.advgraph_stats["skipped_zero"] == 0


@pytest.mark.parametrize("delta_dtype", [torch.float64, torch.float32, torch.float16])
@pytest.mark.parametrize("requires_grad", [False, True], ids=["plain", "requires_grad"])
def test_matrix_set_delta_writes_saved_plus_delta_in_the_weights_dtype(delta_dtype, requires_grad):
    """A delta of another dtype (or one that requires grad) is cast to the weight's
    dtype before it is added: the touched rows hold ``saved + delta.to(float32)``, bit
    for bit, the other rows are untouched, the weight does not join delta's autograd
    graph, and clear() restores every byte."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(12, 4), nn.Flatten(), nn.Linear(12, 2))
    wrapped = advgraph.wrap(model, mode="matrix", epsilon=0.5)
    x = torch.tensor([[1, 5, 1], [7, 5, 9]])
    F.cross_entropy(wrapped(x), torch.tensor([0, 1])).backward()
    site = wrapped.__dict__["_advgraph"].site
    rows_grad = site.site_grad()
    weight = model[0].weight
    before = weight.detach().clone()
    delta = (torch.arange(rows_grad.numel(), dtype=torch.float64).reshape(rows_grad.shape) / 7 + 0.1)
    delta = delta.to(delta_dtype).requires_grad_(requires_grad)
    site.set_delta(delta)
    try:
        rows = torch.tensor([1, 5, 7, 9])
        expected = before[rows] + delta.detach().to(torch.float32)
        assert torch.equal(weight.detach()[rows].view(torch.int32), expected.view(torch.int32))
        others = torch.tensor([i for i in range(12) if i not in (1, 5, 7, 9)])
        assert torch.equal(weight.detach()[others], before[others])
        assert weight.grad_fn is None and weight.dtype == torch.float32
    finally:
        site.clear()
    assert torch.equal(weight.detach().view(torch.int32), before.view(torch.int32))


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("method", ["fgm", "freelb"])
def test_matrix_mode_takes_int32_ids(method, compiled):
    """Ids as int32 (what some tokenizers and ONNX exports give): matrix mode perturbs
    the same rows as with int64 ids and gives the same step (it failed in
    ``index_copy_``, which takes int64 rows). freelb draws its start in the forward
    (the lookup's pre-hook finds the rows)."""
    torch._dynamo.reset()
    results = []
    for dtype in (torch.int64, torch.int32):
        torch.manual_seed(0)
        model = MeanPool(padding_idx=0)
        x = torch.tensor([[1, 2, 2, 0], [2, 5, 7, 1]], dtype=dtype)
        y = torch.tensor([0, 1])
        wrapped = advgraph.wrap(model, method=method, mode="matrix", epsilon=0.5)
        forward = torch.compile(wrapped, backend="aot_eager") if compiled else wrapped
        before = param_bytes(model)
        torch.manual_seed(1)
        wrapped.adversarial_step(lambda: F.cross_entropy(forward(x), y))
        assert param_bytes(model) == before
        results.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for name, g in results[0].items():
        assert torch.equal(results[1][name], g), name
