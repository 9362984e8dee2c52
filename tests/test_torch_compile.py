"""torch.compile: a wrapped model compiles without graph breaks, with eager's gradients.

Eagerly the site reads the gradient with a tensor hook; inside a compiled region
the output goes through an ``autograd.Function`` whose backward calls the
``advgraph::grad_tap_v2`` custom op instead (a hook with Python side effects would
break the graph). The backend is ``aot_eager``: dynamo
and AOTAutograd trace exactly as with inductor, without the C++ compile time
(benchmarks/bench_torch_compile.py runs inductor).
"""

from __future__ import annotations

import copy
import types

import pytest

torch = pytest.importorskip("torch")
from torch._dynamo.utils import counters  # noqa: E402
from torch.nn import functional as F  # noqa: E402

import advgraph  # noqa: E402
from torch_models import MeanPool, Siamese, grads, param_bytes, tiny_bert  # noqa: E402

BACKEND = "aot_eager"
X = torch.randint(0, 30, (4, 6), generator=torch.Generator().manual_seed(0))
Z = torch.randint(0, 30, (4, 5), generator=torch.Generator().manual_seed(1))
Y = torch.randint(0, 3, (4,), generator=torch.Generator().manual_seed(2))


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def compiled(model, how: str, **options):
    """``how``: compile the wrapped model, compile it in place, or wrap a compiled model."""
    if how == "compile(wrap(model))":
        wrapped = advgraph.wrap(model, **options)
        return wrapped, torch.compile(wrapped, backend=BACKEND)
    if how == "wrap(model).compile()":
        wrapped = advgraph.wrap(model, **options)
        wrapped.compile(backend=BACKEND)
        return wrapped, wrapped
    wrapped = advgraph.wrap(torch.compile(model, backend=BACKEND), **options)
    return wrapped, wrapped


def eager_grads(model, closure_of, **options):
    ref = copy.deepcopy(model)
    wrapped = advgraph.wrap(ref, **options)
    wrapped.adversarial_step(closure_of(wrapped))
    return grads(ref)


def graph_breaks() -> int:
    return sum(counters["graph_break"].values())


@pytest.mark.parametrize("mode", ["output", "matrix"])
@pytest.mark.parametrize("how", ["compile(wrap(model))", "wrap(model).compile()", "wrap(compile(model))"])
def test_no_graph_break_and_eager_gradients(how, mode):
    torch.manual_seed(0)
    model = MeanPool()
    options = dict(mode=mode, epsilon=0.5)
    expected = eager_grads(model, lambda w: lambda: F.cross_entropy(w(X), Y), **options)
    wrapped, run = compiled(model, how, **options)
    for _ in range(2):  # the second step reuses the compiled graphs
        model.zero_grad()
        before = param_bytes(model)
        wrapped.adversarial_step(lambda: F.cross_entropy(run(X), Y))
        assert param_bytes(model) == before
    assert graph_breaks() == 0, dict(counters["graph_break"])
    assert counters["stats"]["unique_graphs"] >= 1  # it did compile
    for name, g in expected.items():
        torch.testing.assert_close(grads(model)[name], g, rtol=1e-5, atol=1e-7)


class _ScalesTheLookupInPlace(torch.nn.Module):
    """A forward that scales the lookup's output in place (``h.mul_``), as some
    models do: the compiled tap must hand on a tensor autograd lets them modify."""

    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(30, 8)
        self.head = torch.nn.Linear(8, 3)

    def forward(self, x):
        h = self.emb(x)
        h.mul_(2.0)
        return self.head(h.mean(1))


@pytest.mark.parametrize("mode", ["output", "matrix"])
def test_a_model_that_modifies_the_lookups_output_in_place_compiles(mode):
    """With a view out of the tap's autograd.Function this raised ("a view created
    inside a custom Function ... is being modified inplace"); the gradients are
    eager's (the eager path is held to hand-written FGM in tests/test_torch_adapter.py)."""
    torch.manual_seed(0)
    model = _ScalesTheLookupInPlace()
    options = dict(mode=mode, epsilon=0.5)
    expected = eager_grads(model, lambda w: lambda: F.cross_entropy(w(X), Y), **options)
    wrapped = advgraph.wrap(model, **options)
    run = torch.compile(wrapped, backend=BACKEND, fullgraph=True)
    before = param_bytes(model)
    wrapped.adversarial_step(lambda: F.cross_entropy(run(X), Y))
    assert param_bytes(model) == before
    assert wrapped.advgraph_stats["steps"] == 1
    for name, g in expected.items():
        torch.testing.assert_close(grads(model)[name], g, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("mode", ["output", "matrix"])
def test_fullgraph_two_calls_per_forward_and_pgd(mode):
    """fullgraph=True raises on any graph break; one delta per call as in eager."""
    torch.manual_seed(0)
    model = Siamese()
    options = dict(mode=mode, method="pgd", steps=2, epsilon=0.5)
    expected = eager_grads(model, lambda w: lambda: F.cross_entropy(w(X, Z), Y), **options)
    wrapped = advgraph.wrap(model, **options)
    run = torch.compile(wrapped, backend=BACKEND, fullgraph=True)
    wrapped.adversarial_step(lambda: F.cross_entropy(run(X, Z), Y))
    for name, g in expected.items():
        torch.testing.assert_close(grads(model)[name], g, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("mode", ["output", "matrix"])
def test_huggingface_model_compiles_without_breaks_from_advgraph(mode):
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(3))
    labels = torch.tensor([0, 1])

    def breaks_of(model) -> int:
        torch._dynamo.reset()
        counters.clear()
        run = torch.compile(model, backend=BACKEND)
        if advgraph.is_wrapped(model):
            model.adversarial_step(lambda: run(input_ids=ids, labels=labels).loss)
        else:
            run(input_ids=ids, labels=labels).loss.backward()
        return graph_breaks()

    model = tiny_bert()
    expected = eager_grads(model, lambda w: lambda: w(input_ids=ids, labels=labels).loss, mode=mode)
    plain_breaks = breaks_of(copy.deepcopy(model))
    wrapped = advgraph.wrap(model, mode=mode)
    assert breaks_of(wrapped) == plain_breaks
    for name, g in expected.items():
        torch.testing.assert_close(grads(model)[name], g, rtol=1e-4, atol=1e-6)


def test_hand_written_loop_with_a_compiled_model():
    torch.manual_seed(0)
    model = MeanPool()
    expected = eager_grads(model, lambda w: lambda: F.cross_entropy(w(X), Y), epsilon=0.5)
    wrapped = advgraph.wrap(model, epsilon=0.5)
    run = torch.compile(wrapped, backend=BACKEND, fullgraph=True)
    F.cross_entropy(run(X), Y).backward()
    with wrapped.perturbed():
        F.cross_entropy(run(X), Y).backward()
    for name, g in expected.items():
        torch.testing.assert_close(grads(model)[name], g, rtol=1e-5, atol=1e-7)
    # Unwrapped, the compiled model recompiles to the plain forward.
    plain = advgraph.unwrap(wrapped)
    with torch.no_grad():
        assert torch.equal(run(X), plain(X))


# --------------------------------------------------------------------------- every method

METHODS = {
    "fgm": {},
    "fgsm": {},
    "pgd": {"steps": 2, "random_init": True},  # the start is drawn inside the forward
    "freelb": {"steps": 2},  # random start (the default): drawn inside the forward
    "vat": {},
    "gp": {},
    "r3f": {"noise_eps": 0.5},  # the default 1e-5 moves the gradients by < 1e-7: invisible
    "smart": {},
    "neftune": {},
    "awp": {"target": ""},
}
CASES = [
    (name, mode)
    for name in METHODS
    for mode in ("output", "matrix")
    if not (mode == "matrix" and name in ("neftune", "awp"))  # output mode / weights only
]

def method_closure(wrapped, run):
    kind = wrapped.advgraph_method.closure

    def closure():
        logits = run(X)
        if kind == "logits":
            return logits
        loss = F.cross_entropy(logits, Y)
        return (loss, logits) if kind == "loss_and_logits" else loss

    return closure


def compiled_against_eager(name: str, mode: str, backend: str) -> tuple[dict, dict]:
    """One step eagerly and one through ``torch.compile``, from the same seed."""
    torch.manual_seed(0)
    model = MeanPool()
    ref = copy.deepcopy(model)
    options = dict(mode=mode, method=name, **METHODS[name])
    eager = advgraph.wrap(ref, **options)
    torch.manual_seed(5)
    eager.adversarial_step(method_closure(eager, eager))
    wrapped = advgraph.wrap(model, **options)
    run = torch.compile(wrapped, backend=backend, dynamic=False)
    before = param_bytes(model)
    torch.manual_seed(5)  # the same draws: the random ops run in the graph, in order
    wrapped.adversarial_step(method_closure(wrapped, run))
    assert param_bytes(model) == before
    return grads(model), grads(ref)


def check_compiled(name: str, got: dict, expected: dict, atol: float) -> None:
    # No break, also in matrix mode with a delta drawn inside the forward (freelb's
    # random start, vat, r3f, smart), whose rows the lookup's pre-hook finds at run
    # time through the advgraph::lookup_rows op.
    breaks = dict(counters["graph_break"])
    assert not breaks, breaks
    if name == "gp":
        # gp's pass needs a double backward, which a compiled forward's backward
        # does not have (torch.compile has no double backward): the adapter runs
        # that pass eagerly (set_stance force_eager).
        assert counters["stats"]["unique_graphs"] == 0
    else:
        assert counters["stats"]["unique_graphs"] >= 1
    for key, g in expected.items():
        torch.testing.assert_close(got[key], g, rtol=1e-5, atol=atol, msg=lambda m: f"{key}: {m}")


@pytest.mark.parametrize("name,mode", CASES)
def test_every_method_compiles_with_eager_gradients(name, mode):
    got, expected = compiled_against_eager(name, mode, BACKEND)
    check_compiled(name, got, expected, atol=1e-7)


# Inductor (what users get), every method in both modes; about a minute on 2 CPU
# cores when inductor's cache is cold (C++ compile; the first compile dominates),
# seconds when warm. fallback_random: inductor then draws with eager's generator,
# so both sides see the same noise. Fused kernels change the rounding of float32
# sums: 1e-5 relative (measured differences ~3e-8).
# A delta drawn inside the compiled forward in matrix mode reaches the forward only
# through the advgraph::lookup_rows op.
DRAWN_IN_FORWARD = [("freelb", "matrix"), ("vat", "matrix"), ("r3f", "matrix"), ("smart", "matrix")]


@pytest.mark.parametrize("name,mode", DRAWN_IN_FORWARD)
def test_check_of_the_check_a_dropped_draw_differs_from_eager(name, mode, monkeypatch):
    """If the op did not perturb the rows, the compiled step would not give eager's
    gradients (or, for smart, would not run): the comparison above can tell (for r3f
    only with a noise large enough to matter, hence its noise_eps)."""
    from advgraph.adapters.torch import _site

    real = _site.MatrixSite.perturb_rows
    eager_site = []

    def perturb_rows(self, ids):
        if not eager_site:
            eager_site.append(self)  # the eager step runs first: its site works
        if self is eager_site[0]:
            return real(self, ids)
        return None  # the compiled model's op perturbs nothing

    monkeypatch.setattr(_site.MatrixSite, "perturb_rows", perturb_rows)
    if name == "smart":  # smart reads back the draw it made: without one it cannot step
        with pytest.raises(IndexError):
            compiled_against_eager(name, mode, BACKEND)
        return
    got, expected = compiled_against_eager(name, mode, BACKEND)
    worst = max((got[k] - g).abs().max().item() for k, g in expected.items())
    assert worst > 1e-4, worst


@pytest.mark.parametrize("how", ["freelb", "pgd-random-start"])
def test_fullgraph_two_calls_with_a_start_drawn_in_the_forward_matrix(how):
    """Two lookups per forward, each drawing its random start inside the compiled
    forward: the union of rows is perturbed as in eager, with fullgraph=True."""
    torch.manual_seed(0)
    model = Siamese()
    options = dict(mode="matrix", method="freelb", steps=2) if how == "freelb" else dict(
        mode="matrix", method="pgd", steps=2, random_init=True)
    ref = copy.deepcopy(model)
    eager = advgraph.wrap(ref, **options)
    torch.manual_seed(5)
    eager.adversarial_step(lambda: F.cross_entropy(eager(X, Z), Y))
    wrapped = advgraph.wrap(model, **options)
    run = torch.compile(wrapped, backend=BACKEND, fullgraph=True)
    before = param_bytes(model)
    torch.manual_seed(5)
    wrapped.adversarial_step(lambda: F.cross_entropy(run(X, Z), Y))
    assert param_bytes(model) == before
    for name, g in grads(ref).items():
        torch.testing.assert_close(grads(model)[name], g, rtol=1e-5, atol=1e-7)


# gp's cases compile nothing (its pass runs eagerly, see check_compiled): they repeat
# the aot_eager check and cost nothing.
@pytest.mark.parametrize("name,mode", CASES)
def test_inductor_every_method(name, mode):
    inductor_config = pytest.importorskip("torch._inductor.config")
    with inductor_config.patch(fallback_random=True):
        got, expected = compiled_against_eager(name, mode, "inductor")
    # vat: its direction is the gradient of a KL between two nearly equal
    # distributions (cancellation), which amplifies the kernels' float32 rounding
    # (measured up to 1.6e-6 on gradients ~1e-2): 1e-5 absolute there.
    check_compiled(name, got, expected, atol=1e-5 if name == "vat" else 1e-6)


def test_a_second_copy_of_the_adapter_is_refused_not_silently_broken(tmp_path):
    """The custom ops are global to the process: a second copy of the adapter (the
    source tree's ``adapters.torch``, importable from the repository root) would
    re-register them against an empty site registry and silently break every
    compiled model. It is refused with an ImportError instead."""
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    code = (
        "import sys; sys.path.insert(0, %r)\n"
        "import advgraph.adapters.torch\n"
        "try:\n"
        "    import adapters.torch\n"
        "except ImportError as err:\n"
        "    print('refused:', err)\n"
    ) % root
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "refused: advgraph's torch adapter is already loaded" in proc.stdout, proc.stdout
    assert "Received: a second copy as 'adapters.torch._taps'" in proc.stdout


# --------------------------------------------------------------------------- what the graphs hold


def graphs_of(wrapped, run_model, steps: int):
    """The FX graphs dynamo hands the backend, and how many there were after each step."""
    seen = []

    def backend(gm, example_inputs):
        seen.append(gm)
        return gm.forward

    run = torch.compile(run_model, backend=backend)
    counts = []
    for _ in range(steps):
        wrapped.adversarial_step(method_closure(wrapped, run))
        counts.append(len(seen))
    return seen, counts


def calls_lookup_rows(gm) -> bool:
    return any("lookup_rows" in str(node.target) for node in gm.graph.nodes)


@pytest.mark.parametrize("name", ["fgm", "pgd", "freelb", "vat"])
def test_matrix_mode_graphs_call_lookup_rows_only_where_a_draw_is_pending(name):
    """A matrix-mode pass with no delta drawn in the forward (every FGM pass, PGD
    without random start) compiles without the lookup_rows op (one opaque call less
    per forward); a pass that draws (freelb's start, vat's probe) has it. Each variant
    compiles once: later steps add no graph (a guard on a bool, not on the draw
    function, which is a new object every step)."""
    torch.manual_seed(0)
    model = MeanPool()
    settings = {"pgd": {"steps": 2}, "freelb": {"steps": 2}}.get(name, {})
    wrapped = advgraph.wrap(model, mode="matrix", method=name, **settings)
    seen, counts = graphs_of(wrapped, wrapped, steps=3)
    assert graph_breaks() == 0, dict(counters["graph_break"])
    assert seen and all(any("embedding" in str(n.target) for n in gm.graph.nodes) for gm in seen)
    with_op = [gm for gm in seen if calls_lookup_rows(gm)]
    if name in ("freelb", "vat"):
        assert with_op and len(with_op) < len(seen), (len(with_op), len(seen))
    else:
        assert not with_op
    assert counts[1] == counts[2] == counts[0], counts


@pytest.mark.parametrize("per_sample", [False, True], ids=["global", "per_sample"])
def test_compute_delta_inside_a_compiled_function_is_eagers_bit_for_bit(per_sample):
    """Inside torch.compile the core cannot branch on the data and always takes the
    masked path; for rows whose plain norm is in range that path computes the
    eager two-pass formula, so the delta a compiled forward draws (vat, smart,
    r3f in output mode) is eager's exactly with aot_eager, which runs the same kernels
    (inductor fuses the reduction: equal to rounding there, as test_inductor_every_method
    checks)."""
    from advgraph import compute_delta

    g = torch.randn(4, 7, 5, generator=torch.Generator().manual_seed(0)) * torch.tensor([1e-3, 1.0, 3.0, 1e3]).view(4, 1, 1)
    run = torch.compile(lambda x: compute_delta(x, 0.7, per_sample=per_sample), backend=BACKEND, fullgraph=True)
    got, want = run(g), compute_delta(g, 0.7, per_sample=per_sample)
    assert torch.equal(got.delta, want.delta)
    # The check can fail: the scaled formula (g / max|g|, normalised) differs here.
    dims = (1, 2) if per_sample else (0, 1, 2)
    scaled = g / g.abs().amax(dim=dims, keepdim=True)
    other = scaled * (0.7 / scaled.square().sum(dim=dims, keepdim=True).sqrt())
    assert not torch.equal(other, want.delta)
    assert torch.equal(got.nonfinite, want.nonfinite) and torch.equal(got.zero, want.zero)


# --------------------------------------------------------------------------- the backward tap


@pytest.mark.parametrize("mode", ["output", "matrix", "matrix-reduced-when-read"])
def test_the_site_keeps_nothing_of_the_buffer_the_compiled_backward_hands_it(mode, monkeypatch):
    """The gradient reaches the site through ``advgraph::grad_tap_v2`` as a buffer of
    the compiled backward, which inductor may reuse for a later result once the tap
    has read it. The site must keep what it made of it (a copy; matrix mode: the
    touched rows' gradient), never the buffer itself. Here the buffer is overwritten
    right after the tap (as a reuse would), and the site's gradient is checked
    against the gradient as it was: output mode the buffer's old values, matrix mode
    what nn.Embedding's own backward gives the touched rows for that output
    gradient. On the CPU matrix mode reduces at the tap; on an accelerator it keeps a
    copy and reduces when read (``torch.unique`` would stall the backward there):
    the third case takes that route on the CPU."""
    from advgraph.adapters.torch._site import MatrixSite

    if mode == "matrix-reduced-when-read":
        monkeypatch.setattr(MatrixSite, "_reduces_at_the_tap", staticmethod(lambda grad: False))
        mode = "matrix"
    torch.manual_seed(0)
    model = MeanPool()
    wrapped = advgraph.wrap(model, mode=mode)
    site = wrapped.__dict__["_advgraph"].site
    grad = torch.randn(4, 6, 8)
    kept = grad.clone()
    site.new_pass()
    torch.ops.advgraph.grad_tap_v2(grad, X if mode == "matrix" else None, site.key, 0, 0)
    grad.fill_(float("nan"))  # the compiled backward writes another result there
    got = site.site_grad()
    if mode == "output":
        assert torch.equal(got, kept)
        return
    weight = model.emb.weight.detach().requires_grad_()
    (dense,) = torch.autograd.grad((F.embedding(X, weight) * kept).sum(), weight)
    rows = torch.unique(X)
    assert torch.equal(site._rows, rows)
    torch.testing.assert_close(got, dense[rows], rtol=1e-6, atol=1e-6)


# --------------------------------------------------------------------------- matrix mode's lookup tap


class _TiedHead(torch.nn.Module):
    """A language-model-like head that reads the embedding matrix (weights tied)."""

    def __init__(self, **emb_kwargs):
        super().__init__()
        self.emb = torch.nn.Embedding(30, 8, **emb_kwargs)
        self.head = torch.nn.Linear(8, 30, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, x):
        return self.head(torch.tanh(self.emb(x)).mean(1))


class _ScaledEmbedding(torch.nn.Embedding):
    """An embedding whose forward is not nn.Embedding's (it scales the lookup, as
    BART's and T5-like scaled embeddings do)."""

    def forward(self, x):
        return super().forward(x) * 3.0


class _ScaledLookup(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = _ScaledEmbedding(30, 8, padding_idx=0)
        self.fc = torch.nn.Linear(8, 3)

    def forward(self, x):
        return self.fc(self.emb(x).mean(1))


def _hooked_before_wrap():
    """A forward hook registered on the embedding before advgraph's (as HF Trainer's
    NEFTune hook is): it changes the output advgraph's hook receives."""
    model = MeanPool(padding_idx=0)
    model.emb.register_forward_hook(lambda module, args, out: out * 2.0)
    return model


def _forward_on_the_instance():
    model = MeanPool()

    def forward(self, x):
        return F.embedding(x, self.weight) * 2.0

    model.emb.forward = types.MethodType(forward, model.emb)
    return model


_LOOKUPS = {
    "plain": (lambda: MeanPool(), "rows"),
    "padding and scale_grad_by_freq": (lambda: MeanPool(padding_idx=0, scale_grad_by_freq=True), "rows"),
    "float64": (lambda: MeanPool().double(), "rows"),
    "tied head": (lambda: _TiedHead(padding_idx=0), "rows"),
    "subclass with its own forward": (lambda: _ScaledLookup(), "output"),
    "max_norm": (lambda: MeanPool(max_norm=10.0), "output"),
    "a forward hook before advgraph's": (_hooked_before_wrap, "output"),
    "forward set on the instance": (_forward_on_the_instance, "output"),
}


@pytest.mark.parametrize("kind", list(_LOOKUPS))
def test_matrix_mode_taps_a_plain_lookup_by_its_own_backward_and_any_other_by_its_output(kind, monkeypatch):
    """Compiled matrix mode reads the touched rows' gradient out of the weight gradient
    a plain ``nn.Embedding``'s own backward computes (``grad_rows_v1``), and any other
    lookup's (a subclass with its own forward, ``max_norm``) by reducing its output's
    gradient (``grad_tap_v2``). Either way the step's gradients are eager's (whose
    δ comes from a tensor hook and the reduction, written independently), with a
    repeated id and the padding id in the batch, and the weights come back bit for bit."""
    from advgraph.adapters.torch._site import MatrixSite

    make, route = _LOOKUPS[kind]
    seen = {"rows": 0, "output": 0}
    by_rows, by_output = MatrixSite.on_compiled_rows, MatrixSite.on_compiled_grad
    monkeypatch.setattr(MatrixSite, "on_compiled_rows", lambda s, *a: (seen.__setitem__("rows", seen["rows"] + 1), by_rows(s, *a))[1])
    monkeypatch.setattr(MatrixSite, "on_compiled_grad", lambda s, *a: (seen.__setitem__("output", seen["output"] + 1), by_output(s, *a))[1])
    torch.manual_seed(0)
    model = make()
    x = X.clone()
    x[0, 0], x[1, 1], x[2, 2] = 0, 7, 7
    y = Y if kind != "tied head" else torch.tensor([1, 7, 0, 29])
    options = dict(mode="matrix", epsilon=0.5)
    expected = eager_grads(model, lambda w: lambda: F.cross_entropy(w(x), y), **options)
    wrapped, run = compiled(model, "compile(wrap(model))", **options)
    for _ in range(2):
        model.zero_grad()
        before = param_bytes(model)
        wrapped.adversarial_step(lambda: F.cross_entropy(run(x), y))
        assert param_bytes(model) == before
    assert graph_breaks() == 0, dict(counters["graph_break"])
    assert seen[route] == 2 and sum(seen.values()) == 2, seen
    for name, g in expected.items():
        torch.testing.assert_close(grads(model)[name], g, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("kind", list(_LOOKUPS))
def test_matrix_mode_compiled_leaves_the_models_own_gradients_bit_for_bit(kind):
    """A plain forward/backward of the compiled wrapped model (the clean pass's
    parameter gradients) gives what the compiled unwrapped model gives, bit for bit:
    the lookup tap's backward is the lookup's own, and nothing else changes."""
    torch.manual_seed(0)
    model = _LOOKUPS[kind][0]()
    x = X.clone()
    x[0, 0], x[1, 1], x[2, 2] = 0, 7, 7
    y = Y if kind != "tied head" else torch.tensor([1, 7, 0, 29])
    plain = copy.deepcopy(model)
    F.cross_entropy(torch.compile(plain, backend=BACKEND)(x), y).backward()
    wrapped = advgraph.wrap(model, mode="matrix", epsilon=0.5)
    F.cross_entropy(torch.compile(wrapped, backend=BACKEND)(x), y).backward()
    assert graph_breaks() == 0, dict(counters["graph_break"])
    for name, g in grads(plain).items():
        assert torch.equal(grads(model)[name], g), name
    assert wrapped.__dict__["_advgraph"].site.has_grad()  # the tap ran


def test_a_compiled_plain_lookup_computes_the_weight_gradient_once():
    """The lookup tap hands on the dense weight gradient the backward computes anyway:
    the clean pass's compiled backward (inductor's partitioner) holds one
    ``embedding_dense_backward``, not a second one for the site."""
    from torch._dynamo.backends.common import aot_autograd
    from torch._functorch.partitioners import min_cut_rematerialization_partition

    counts, lookups = [], []

    def ops(gm, name):
        return sum(1 for n in gm.graph.nodes if str(n.target).startswith(name))

    def forward_compiler(gm, example_inputs):
        lookups.append(ops(gm, "aten.embedding.default"))
        return gm.forward

    def backward_compiler(gm, example_inputs):
        counts.append(
            (ops(gm, "aten.embedding_dense_backward"), ops(gm, "advgraph.grad_rows_v1"), ops(gm, "advgraph.grad_tap_v2"))
        )
        return gm.forward

    backend = aot_autograd(
        fw_compiler=forward_compiler,
        bw_compiler=backward_compiler,
        partition_fn=min_cut_rematerialization_partition,
    )
    torch.manual_seed(0)
    model = MeanPool()
    wrapped = advgraph.wrap(model, mode="matrix", epsilon=0.5)
    run = torch.compile(wrapped, backend=backend)
    wrapped.adversarial_step(lambda: F.cross_entropy(run(X), Y))
    # The clean pass taps the lookup itself; the adversarial pass needs no tap.
    assert counts == [(1, 1, 0), (1, 0, 0)], counts
    assert lookups == [1, 1], lookups  # the module's own lookup is dropped, not run twice
    assert wrapped.advgraph_stats["steps"] == 1


def test_the_site_keeps_nothing_of_the_weight_gradient_buffer_the_lookup_tap_hands_it():
    """``grad_rows_v1`` hands the site the dense weight gradient, a buffer of the
    compiled backward (it becomes ``.grad`` or is reused). The site keeps a copy of
    the touched rows: overwriting the buffer afterwards changes nothing it holds."""
    model = MeanPool()
    wrapped = advgraph.wrap(model, mode="matrix")
    site = wrapped.__dict__["_advgraph"].site
    dense = torch.randn(30, 8)
    kept = dense.clone()
    site.new_pass()
    torch.ops.advgraph.grad_rows_v1(dense, X, site.key, 0, 0)
    dense.fill_(float("nan"))
    got = site.site_grad()
    rows = torch.unique(X)
    assert torch.equal(site._rows, rows)
    assert torch.equal(got, kept[rows])


def test_a_global_forward_hook_keeps_the_output_tap(monkeypatch):
    """A global forward hook (``register_module_forward_hook``) runs before any
    module's own hooks and may change the lookup's output: compiled matrix mode then
    taps the output it receives, not a recomputed lookup, and matches eager."""
    from advgraph.adapters.torch._site import MatrixSite

    seen = []
    by_rows, by_output = MatrixSite.on_compiled_rows, MatrixSite.on_compiled_grad
    monkeypatch.setattr(MatrixSite, "on_compiled_rows", lambda s, *a: (seen.append("rows"), by_rows(s, *a))[1])
    monkeypatch.setattr(MatrixSite, "on_compiled_grad", lambda s, *a: (seen.append("output"), by_output(s, *a))[1])
    doubles = torch.nn.modules.module.register_module_forward_hook(
        lambda module, args, out: out * 2.0 if isinstance(module, torch.nn.Embedding) else None
    )
    try:
        torch.manual_seed(0)
        model = MeanPool()
        options = dict(mode="matrix", epsilon=0.5)
        expected = eager_grads(model, lambda w: lambda: F.cross_entropy(w(X), Y), **options)
        wrapped, run = compiled(model, "compile(wrap(model))", **options)
        wrapped.adversarial_step(lambda: F.cross_entropy(run(X), Y))
    finally:
        doubles.remove()
    assert seen == ["output"], seen
    for name, g in expected.items():
        torch.testing.assert_close(grads(model)[name], g, rtol=1e-5, atol=1e-7)


def test_plain_lookup_declines_where_torchs_hook_registries_are_not_found(monkeypatch):
    """The lookup tap relies on torch's private hook registries to know that no hook
    ran before advgraph's: where a torch version lacks them, it is not used."""
    from advgraph.adapters.torch import _taps

    model = MeanPool()
    wrapped = advgraph.wrap(model, mode="matrix")
    site = wrapped.__dict__["_advgraph"].site
    assert _taps.plain_lookup(model.emb, site.on_forward)
    with monkeypatch.context() as patch:
        patch.delattr(torch.nn.modules.module, "_global_forward_hooks")
        assert not _taps.plain_lookup(model.emb, site.on_forward)
    with monkeypatch.context() as patch:
        patch.delattr(model.emb, "_forward_hooks")
        assert not _taps.plain_lookup(model.emb, site.on_forward)
    assert _taps.plain_lookup(model.emb, site.on_forward)
