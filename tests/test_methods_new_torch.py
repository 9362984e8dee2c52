"""gp, r3f, smart, neftune and awp on PyTorch: one full step against hand-written
references of the published updates (fairseq R3F, mt-dnn SMART, NEFTune, the Kaggle
AWP class), pass counts, SMART's teacher, NEFTune's padding."""

from __future__ import annotations

import copy

import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402
from torch.nn import functional as F  # noqa: E402

import advgraph  # noqa: E402
import advgraph.methods._common as methods  # noqa: E402
from torch_models import MeanPool, param_bytes  # noqa: E402

LR = 0.5


def data(seed=0, b=6, n=5, vocab=30):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(1, vocab, (b, n), generator=gen), torch.randint(0, 3, (b,), generator=gen)


def head(model, e):
    """The MeanPool forward after the embedding."""
    return model.fc(e.mean(dim=1))


def sgd(model):
    with torch.no_grad():
        for p in model.parameters():
            if p.grad is not None:
                p -= LR * p.grad
            p.grad = None


def assert_same_params(a, b, rtol=1e-5, atol=1e-6):
    for (name, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        torch.testing.assert_close(p, q, rtol=rtol, atol=atol, msg=name)


def adv_step(model, method, x, y, *, mode="output", pair=False, mask=None, **kwargs):
    wrapped = advgraph.wrap(model, mode=mode, method=method, **kwargs)

    def closure():
        out = wrapped(x)
        loss = F.cross_entropy(out, y)
        return (loss, out) if pair else loss

    before = param_bytes(model)
    loss = wrapped.adversarial_step(closure, mask=mask)
    assert param_bytes(model) == before  # restored bit for bit before the update
    return wrapped, loss


def sym_kl_both(a, b):
    """fairseq's _get_symm_kl: gradients through both distributions."""
    la, lb = F.log_softmax(a, -1), F.log_softmax(b, -1)
    return (F.kl_div(la, lb.exp(), reduction="sum") + F.kl_div(lb, la.exp(), reduction="sum")) / a.size(0)


def sym_kl_mtdnn(inp, target):
    """mt-dnn's SymKlCriterion(input, target): each KL's target detached."""
    return F.kl_div(F.log_softmax(inp, -1), F.softmax(target.detach(), -1), reduction="batchmean") + F.kl_div(
        F.log_softmax(target, -1), F.softmax(inp.detach(), -1), reduction="batchmean"
    )


# --------------------------------------------------------------------------- gp


@pytest.mark.parametrize("mode", ["output", "matrix"])
def test_gp_equals_double_backward_reference(mode):
    eps = 0.7
    torch.manual_seed(0)
    model = MeanPool()
    ref = copy.deepcopy(model)
    x, y = data()
    # Reference: loss + eps/2 * ||dL/de||^2 with e the activations (output) or the matrix.
    if mode == "output":
        e = ref.emb(x)
        loss = F.cross_entropy(head(ref, e), y)
        (g,) = torch.autograd.grad(loss, e, create_graph=True)
    else:
        loss = F.cross_entropy(head(ref, ref.emb(x)), y)
        (g,) = torch.autograd.grad(loss, ref.emb.weight, create_graph=True)
    (loss + eps / 2 * (g**2).sum()).backward()
    sgd(ref)

    _, got = adv_step(model, "gp", x, y, mode=mode, epsilon=eps)
    torch.testing.assert_close(got, loss.detach())
    sgd(model)
    assert_same_params(model, ref)
    # The penalty matters: plain training gives another update.
    torch.manual_seed(0)
    plain = MeanPool()
    F.cross_entropy(plain(x), y).backward()
    sgd(plain)
    assert not torch.allclose(plain.fc.weight, ref.fc.weight, rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------- r3f


@pytest.mark.parametrize("noise_type", ["uniform", "normal"])
@pytest.mark.parametrize("mode", ["output", "matrix"])
def test_r3f_equals_fairseq_reference(mode, noise_type):
    sigma, lam = 0.3, 2.0
    torch.manual_seed(0)
    model = MeanPool()
    ref = copy.deepcopy(model)
    fairseq = copy.deepcopy(model)
    x, y = data(1)
    rows = torch.unique(x)

    def draw(shape):
        z = torch.empty(shape)
        return z.uniform_(-sigma, sigma) if noise_type == "uniform" else z.normal_() * sigma

    def reference(net, detach_noisy_embedding):
        torch.manual_seed(7)
        e = net.emb(x)
        logits = head(net, e)
        if mode == "output":
            z = draw(e.shape)
            base = e.detach().clone() if detach_noisy_embedding else e
            noisy = head(net, base + z)
        else:
            z = draw((rows.numel(), e.shape[-1]))
            weight = net.emb.weight
            if detach_noisy_embedding:
                weight = weight.detach()
            noisy = head(net, F.embedding(x, weight.index_add(0, rows, z)))
        loss = F.cross_entropy(logits, y)
        (loss + lam * sym_kl_both(noisy, logits)).backward()
        return loss.detach()

    expected = reference(ref, detach_noisy_embedding=False)
    reference(fairseq, detach_noisy_embedding=True)
    torch.manual_seed(7)
    _, got = adv_step(model, "r3f", x, y, mode=mode, pair=True, noise_eps=sigma, noise_type=noise_type, r3f_lambda=lam)
    torch.testing.assert_close(got, expected)
    # fairseq detaches the token embeddings in the noisy branch: every other weight's
    # gradient is fairseq's exactly; the embedding also learns from the noisy forward.
    torch.testing.assert_close(model.fc.weight.grad, fairseq.fc.weight.grad, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(model.fc.bias.grad, fairseq.fc.bias.grad, rtol=1e-5, atol=1e-7)
    sgd(model)
    sgd(ref)
    assert_same_params(model, ref)


# --------------------------------------------------------------------------- smart


def smart_reference(net, x, y, *, sigma, eta, steps, lam, mu, teacher, norm="linf", seed=11):
    """mt-dnn's SmartPerturbation (K steps, per-token normalisation) + the proximal term."""
    e_fixed = net.emb(x).detach()
    with torch.no_grad():
        fixed = head(net, e_fixed)
        teacher_logits = None
        if mu > 0:
            teacher_net = copy.deepcopy(net)
            for name, p in teacher_net.named_parameters():
                p.copy_(teacher[name])
            teacher_logits = head(teacher_net, teacher_net.emb(x))
    torch.manual_seed(seed)
    noise = torch.empty(e_fixed.shape).normal_() * sigma
    for _ in range(steps):
        noise.requires_grad_()
        adv = head(net, net.emb(x) + noise)
        (g,) = torch.autograd.grad(sym_kl_both(fixed, adv), noise)
        v = noise.detach() + eta * g
        size = v.abs().amax(-1, keepdim=True) if norm == "linf" else v.norm(dim=-1, keepdim=True)
        noise = v / (size + 1e-6)
    e = net.emb(x)
    logits = head(net, e)
    adv = head(net, e + noise.detach())
    loss = F.cross_entropy(logits, y)
    total = loss + lam * sym_kl_mtdnn(logits, adv)
    if mu > 0:
        total = total + mu * sym_kl_both(logits, teacher_logits)
    total.backward()
    return loss.detach()


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_smart_two_steps_equal_mtdnn_reference_with_teacher(norm):
    """Step 1: the teacher is theta_0; step 2: beta * theta_0 + (1 - beta) * theta_1."""
    kw = dict(sigma=0.05, eta=0.3, steps=2, lam=1.5, mu=2.0)
    beta = 0.6
    torch.manual_seed(0)
    model = MeanPool()
    ref = copy.deepcopy(model)
    x, y = data(2)
    wrapped = advgraph.wrap(
        model, method="smart", norm=norm, noise_eps=kw["sigma"], alpha=kw["eta"], steps=kw["steps"],
        smart_lambda=kw["lam"], smart_mu=kw["mu"], smart_beta=beta,
    )

    def closure():
        out = wrapped(x)
        return F.cross_entropy(out, y), out

    teacher = {n: p.detach().clone() for n, p in ref.named_parameters()}
    for step in range(2):
        if step == 1:
            teacher = {n: beta * teacher[n] + (1 - beta) * p.detach() for n, p in ref.named_parameters()}
        expected = smart_reference(ref, x, y, teacher=teacher, norm=norm, **kw)
        torch.manual_seed(11)
        got = wrapped.adversarial_step(closure)
        torch.testing.assert_close(got, expected)
        for name, p in model.named_parameters():
            torch.testing.assert_close(p.grad, dict(ref.named_parameters())[name].grad, rtol=1e-5, atol=1e-6, msg=name)
        sgd(model)
        sgd(ref)
        assert_same_params(model, ref)
    # The teacher's momentum update, read from the wrapped model's state.
    values = wrapped.__dict__["_advgraph"].teacher.values
    for name, value in teacher.items():
        torch.testing.assert_close(values[name], value, rtol=1e-6, atol=1e-7, msg=name)


def test_smart_proximal_term_gradient():
    """grad(mu) - grad(mu=0) is the gradient of mu * SymKL(f_theta, f_teacher), by hand."""
    mu, beta = 3.0, 0.5
    torch.manual_seed(0)
    base = MeanPool()
    x, y = data(3)
    # A teacher different from theta: one step with the proximal term, one SGD step.
    grads = {}
    for m in (mu, 1e-300):
        model = copy.deepcopy(base)
        wrapped = advgraph.wrap(model, method="smart", smart_mu=m, smart_beta=beta, noise_eps=0.01, alpha=0.1)

        def closure():
            out = wrapped(x)
            return F.cross_entropy(out, y), out

        torch.manual_seed(5)
        wrapped.adversarial_step(closure)
        sgd(model)
        torch.manual_seed(5)
        wrapped.adversarial_step(closure)
        grads[m] = {n: p.grad.clone() for n, p in model.named_parameters()}
        theta1 = copy.deepcopy(model)
    teacher = copy.deepcopy(base)
    with torch.no_grad():
        for (n, t), p in zip(teacher.named_parameters(), theta1.parameters()):
            t.copy_(beta * t + (1 - beta) * p)
        teacher_logits = teacher(x)
    probe = copy.deepcopy(theta1)
    probe.zero_grad()
    (mu * sym_kl_both(probe(x), teacher_logits)).backward()
    for name, p in probe.named_parameters():
        assert p.grad.abs().max() > 1e-6, name  # the term is not trivially zero
        torch.testing.assert_close(grads[mu][name] - grads[1e-300][name], p.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_smart_matrix_mode_equals_reference():
    sigma, eta, lam = 0.05, 0.3, 1.0
    torch.manual_seed(0)
    model = MeanPool()
    ref = copy.deepcopy(model)
    x, y = data(4)
    rows = torch.unique(x)
    w = ref.emb.weight
    with torch.no_grad():
        fixed = head(ref, ref.emb(x))
    torch.manual_seed(3)
    noise = torch.empty(rows.numel(), w.shape[1]).normal_() * sigma
    noise.requires_grad_()
    adv = head(ref, F.embedding(x, w.detach().index_add(0, rows, noise)))
    (g,) = torch.autograd.grad(sym_kl_both(fixed, adv), noise)
    v = noise.detach() + eta * g
    noise = v / (v.abs().amax(-1, keepdim=True) + 1e-6)
    logits = head(ref, ref.emb(x))
    adv = head(ref, F.embedding(x, w.index_add(0, rows, noise)))
    loss = F.cross_entropy(logits, y)
    (loss + lam * sym_kl_mtdnn(logits, adv)).backward()
    torch.manual_seed(3)
    adv_step(model, "smart", x, y, mode="matrix", pair=True, noise_eps=sigma, alpha=eta, smart_lambda=lam, smart_mu=0)
    sgd(model)
    sgd(ref)
    assert_same_params(model, ref)


# --------------------------------------------------------------------------- neftune


class Probed(nn.Module):
    """MeanPool with a probe after the embedding: records what the rest of the model sees."""

    def __init__(self, padding_idx=0):
        super().__init__()
        self.emb = nn.Embedding(30, 8, padding_idx=padding_idx)
        self.probe = nn.Identity()
        self.fc = nn.Linear(8, 3)
        self.seen = []
        self.probe.register_forward_hook(lambda m, a, out: self.seen.append(out.detach().clone()))

    def forward(self, x):
        return self.fc(self.probe(self.emb(x)).mean(dim=1))


def padded_batch():
    x = torch.tensor([[5, 6, 7, 8, 9, 10], [11, 12, 13, 0, 0, 0], [14, 15, 0, 0, 0, 0], [16, 0, 0, 0, 0, 0]])
    return x, torch.tensor([0, 1, 2, 1]), (x != 0)


@pytest.mark.parametrize("source", ["padding_idx", "mask"])
def test_neftune_noise_is_zero_on_padding_and_scaled_per_sequence(source):
    alpha = 5.0
    torch.manual_seed(0)
    model = Probed(padding_idx=0 if source == "padding_idx" else None)
    ref = copy.deepcopy(model)
    x, y, real = padded_batch()
    torch.manual_seed(9)
    adv_step(model, "neftune", x, y, neftune_alpha=alpha, mask=real.long() if source == "mask" else None)
    (seen,) = model.seen
    noise = seen - ref.emb(x).detach()
    assert torch.all(noise[~real] == 0)  # exactly zero on padding
    lengths = real.sum(1).float()
    scale = alpha / torch.sqrt(lengths * 8)
    unit = noise / scale.view(-1, 1, 1)
    assert unit[real].abs().max() <= 1.0 + 1e-5
    assert torch.all(unit[real].abs().amax(-1) > 0)
    # The reference: U(-1, 1) * alpha / sqrt(L_i * d), masked, then one forward/backward.
    torch.manual_seed(9)
    u = torch.empty(4, 6, 8).uniform_(-1.0, 1.0)
    expected = u * scale.view(-1, 1, 1) * real.unsqueeze(-1)
    torch.testing.assert_close(noise, expected, rtol=1e-5, atol=1e-6)
    F.cross_entropy(ref.fc(ref.probe(ref.emb(x) + expected).mean(1)), y).backward()
    sgd(ref)
    sgd(model)
    assert_same_params(model, ref)


def test_neftune_without_padding_information_scales_by_padded_length():
    """No padding_idx, no mask: every position counts (HuggingFace's scale)."""
    torch.manual_seed(0)
    model = Probed(padding_idx=None)
    ref_emb = copy.deepcopy(model.emb)
    x, y, _ = padded_batch()
    torch.manual_seed(4)
    adv_step(model, "neftune", x, y, neftune_alpha=2.0)
    torch.manual_seed(4)
    u = torch.empty(4, 6, 8).uniform_(-1.0, 1.0)
    torch.testing.assert_close(model.seen[0] - ref_emb(x).detach(), u * 2.0 / (6 * 8) ** 0.5, rtol=1e-5, atol=1e-6)


def test_neftune_mask_of_wrong_shape_is_rejected_and_model_intact():
    model = Probed()
    x, y, _ = padded_batch()
    before = param_bytes(model)
    with pytest.raises(ValueError, match="token mask"):
        adv_step(model, "neftune", x, y, mask=torch.ones(4, 5))
    assert param_bytes(model) == before
    with pytest.raises(ValueError, match="does not read it"):
        adv_step(Probed(), "fgm", x, y, mask=torch.ones(4, 6))


# --------------------------------------------------------------------------- awp


@pytest.mark.parametrize("objective", ["adv", "clean+adv"])
def test_awp_equals_kaggle_reference(objective):
    adv_lr, adv_eps = 0.5, 0.05
    torch.manual_seed(0)
    model = MeanPool()
    ref = copy.deepcopy(model)
    x, y = data(5)
    # Reference: delta_w = adv_lr * ||w|| * g / ||g||, clamped to |delta| <= adv_eps |w|,
    # one adversarial forward/backward, restore.
    weights = [ref.emb.weight, ref.fc.weight]
    loss = F.cross_entropy(ref(x), y)
    grads = torch.autograd.grad(loss, weights, retain_graph=True)
    if objective == "clean+adv":
        loss.backward()
    saved = [w.detach().clone() for w in weights]
    clamped = 0
    with torch.no_grad():
        for w, g in zip(weights, grads):
            d = adv_lr * w.norm() * g / g.norm()
            bound = adv_eps * w.abs()
            clamped += int((d.abs() > bound).sum())
            w += torch.maximum(torch.minimum(d, bound), -bound)
    assert clamped > 0  # the clamp is exercised
    F.cross_entropy(ref(x), y).backward()
    with torch.no_grad():
        for w, s in zip(weights, saved):
            w.copy_(s)
    _, got = adv_step(model, "awp", x, y, target=model, adv_lr=adv_lr, adv_eps=adv_eps, objective=objective)
    torch.testing.assert_close(got, loss.detach())
    assert model.fc.bias.grad is not None  # biases are not perturbed, but they train
    sgd(model)
    sgd(ref)
    assert_same_params(model, ref)


def test_awp_target_names_modules_and_their_weights():
    model = MeanPool()
    wrapped = advgraph.wrap(model, target="fc", method="awp")
    assert wrapped.advgraph_route == "weights"
    assert wrapped.__dict__["_advgraph"].site.names == ["fc.weight"]
    advgraph.unwrap(wrapped)
    wrapped = advgraph.wrap(model, target=["emb", model.fc], method="awp")
    assert wrapped.__dict__["_advgraph"].site.names == ["emb.weight", "fc.weight"]
    advgraph.unwrap(wrapped)
    wrapped = advgraph.wrap(model, target="", method="awp")
    assert wrapped.advgraph_target == ""
    advgraph.unwrap(wrapped)
    model.fc.weight.requires_grad_(False)
    with pytest.raises(ValueError, match="named `weight`"):
        advgraph.wrap(model, target="fc", method="awp")
    with pytest.raises(ValueError, match="awp"):
        advgraph.wrap(model, "fc", "matrix", method="awp")


# --------------------------------------------------------------------------- passes


NEW = [
    # method, kwargs, forwards, backpropagating passes
    ("gp", {}, 1, 1),
    ("r3f", {}, 2, 1),
    ("smart", {}, 5, 2),  # teacher, clean, 1 ascent, clean + noisy
    ("smart", {"steps": 3, "smart_mu": 0}, 6, 4),
    ("neftune", {}, 1, 1),
    ("awp", {}, 2, 2),
]


@pytest.mark.parametrize("mode", ["output", "matrix"])
@pytest.mark.parametrize("method,kwargs,forwards,counted", NEW)
def test_new_methods_pass_counts(mode, method, kwargs, forwards, counted):
    if mode == "matrix" and method in ("neftune", "awp"):
        pytest.skip("output mode only")
    torch.manual_seed(0)
    model = MeanPool()
    wrapped = advgraph.wrap(model, mode=mode, method=method, **kwargs)
    x, y = data()
    calls = []

    def closure():
        calls.append(torch.is_grad_enabled())
        out = wrapped(x)
        loss = F.cross_entropy(out, y)
        return (loss, out) if method in ("r3f", "smart") else loss

    before = param_bytes(model)
    runs = []
    from advgraph.adapters.torch import _module

    original = _module._StepRunner.__init__

    def spy(self, *a, **k):
        original(self, *a, **k)
        runs.append(self)

    _module._StepRunner.__init__ = spy
    try:
        wrapped.adversarial_step(closure)
    finally:
        _module._StepRunner.__init__ = original
    assert len(calls) == forwards
    assert wrapped.advgraph_method.passes() == counted == runs[0].done
    assert param_bytes(model) == before
    assert not wrapped.__dict__["_advgraph"].site.active
    assert all(p.grad is not None for p in model.parameters())


def test_vat_matrix_mode_draws_its_random_start():
    """Regression: a delta given as a function was never drawn in torch matrix mode, so
    VAT's first power iteration ran at d = 0, where the KL's gradient is zero."""
    torch.manual_seed(0)
    model = MeanPool()
    wrapped = advgraph.wrap(model, mode="matrix", method="vat", epsilon=0.5)
    x, y = data()

    def closure():
        out = wrapped(x)
        return F.cross_entropy(out, y), out

    wrapped.adversarial_step(closure)
    assert wrapped.advgraph_stats["skipped_zero"] == 0


@pytest.mark.parametrize("method", ["gp", "r3f", "smart", "neftune", "awp"])
def test_perturbed_block_is_fgm_only(method):
    model = MeanPool()
    wrapped = advgraph.wrap(model, method=method)
    x, y = data()
    F.cross_entropy(wrapped(x), y).backward()
    with pytest.raises(ValueError, match="adversarial_step"):
        with wrapped.perturbed():
            pass
    assert not wrapped.__dict__["_advgraph"].site.active


@pytest.mark.parametrize("method", ["r3f", "smart"])
def test_pair_closure_contract(method):
    model = MeanPool()
    before = param_bytes(model)
    x, y = data()
    with pytest.raises(TypeError, match=r"\(loss, logits\)"):
        adv_step(model, method, x, y, pair=False)
    assert param_bytes(model) == before


@pytest.mark.parametrize("mode", ["output", "matrix"])
def test_smart_teacher_moves_once_per_optimizer_step_not_per_micro_batch(mode):
    beta = 0.5
    torch.manual_seed(0)
    model = MeanPool()
    wrapped = advgraph.wrap(model, mode=mode, method="smart", smart_beta=beta, alpha=0.1)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    x, y = data(6)

    def closure():
        out = wrapped(x)
        return F.cross_entropy(out, y), out

    teacher = {n: p.detach().clone() for n, p in model.named_parameters()}
    for _ in range(2):
        for _micro in range(3):  # gradient accumulation: three micro-batches, one step
            wrapped.adversarial_step(closure)
            values = wrapped.__dict__["_advgraph"].teacher.values
            for name, value in values.items():
                torch.testing.assert_close(value, teacher[name], rtol=1e-6, atol=1e-7, msg=name)
        opt.step()
        opt.zero_grad()
        teacher = {n: beta * teacher[n] + (1 - beta) * p.detach() for n, p in model.named_parameters()}
