"""The fx pass, tested as torch's own passes are: trace, apply, check graph, check outputs."""

from __future__ import annotations

import copy
import io

import pytest

torch = pytest.importorskip("torch")
from torch import fx, nn  # noqa: E402

from advgraph.adapters.torch._fx import (  # noqa: E402
    PERTURBATION_NAME,
    SITE_ATTR,
    TraceRejected,
    insert_perturbation,
    rewrite_lookup,
)
from advgraph.adapters.torch._site import OutputSite, Stats  # noqa: E402
from torch_models import ConvClassifier, LSTMClassifier, Untraceable  # noqa: E402


@pytest.mark.parametrize("arch", [LSTMClassifier, ConvClassifier])
def test_insert_perturbation_after_embedding(arch):
    torch.manual_seed(0)
    model = arch()
    x = torch.randint(0, 30, (3, 5))
    with torch.no_grad():
        expected = model(x)
    site = OutputSite(Stats())
    model.__dict__[SITE_ATTR] = site
    graph = fx.Tracer().trace(model)
    emb_node = next(n for n in graph.nodes if n.op == "call_module" and n.target == "emb")
    old_users = set(emb_node.users)
    new = insert_perturbation(graph, emb_node)

    # Graph: emb -> perturbation -> (every former user of emb).
    site_node = new.args[0]
    assert site_node.op == "get_attr" and site_node.target == SITE_ATTR
    assert new.op == "call_method" and new.target == "on_output" and new.name == PERTURBATION_NAME
    assert new.args == (site_node, emb_node)
    assert list(emb_node.users) == [new]
    assert set(new.users) == old_users
    graph.lint()
    gm = fx.GraphModule(model, graph)
    assert f"{PERTURBATION_NAME} = _advgraph_site.on_output(emb)" in gm.code

    # delta = 0 (none installed): outputs are bit-identical.
    with torch.no_grad():
        assert torch.equal(gm(x), expected)
    site.set_delta(torch.zeros(3, 5, 8))
    with torch.no_grad():
        assert torch.equal(gm(x), expected)
    site.clear()
    # A non-zero delta changes the output; the parameters are shared, not copied.
    site.set_delta(torch.full((3, 5, 8), 0.5))
    with torch.no_grad():
        assert not torch.equal(gm(x), expected)
    site.clear()
    assert gm.emb.weight is model.emb.weight


def test_rewrite_lookup_adds_delta_to_the_embedding_output_only():
    torch.manual_seed(0)
    emb = nn.Embedding(10, 4, padding_idx=0)
    x = torch.tensor([[1, 2, 0]])
    expected = emb(x)
    site = OutputSite(Stats())
    emb.__dict__[SITE_ATTR] = site
    cls, code = rewrite_lookup(emb)
    assert issubclass(cls, nn.Embedding) and cls.__name__ == "Embedding" and cls is not nn.Embedding
    assert "padding_idx = 0" in code and f"{PERTURBATION_NAME} = _advgraph_site.on_output(embedding)" in code
    emb.__class__ = cls
    assert torch.equal(emb(x), expected)
    delta = torch.randn(1, 3, 4)
    site.set_delta(delta)
    with torch.no_grad():
        torch.testing.assert_close(emb(x), expected + delta, rtol=0, atol=0)
    site.clear()
    # The module pickles on its own as its original class; a deepcopy keeps the rewrite.
    buf = io.BytesIO()
    torch.save(emb, buf)
    buf.seek(0)
    plain = torch.load(buf, weights_only=False)
    assert type(plain) is nn.Embedding and SITE_ATTR not in vars(plain)
    assert type(copy.deepcopy(emb)) is cls
    emb.__class__ = nn.Embedding
    assert torch.equal(emb(x), expected)


def test_rewrite_lookup_rejects_what_does_not_trace_faithfully():
    class ModeDependent(nn.Embedding):
        def forward(self, x):
            out = super().forward(x)
            return out * 2.0 if self.training else out

    class Optional(nn.Embedding):
        def forward(self, x, scale=None):
            return super().forward(x)

    for module in (Untraceable.ScaledEmbedding(10, 4), ModeDependent(10, 4), Optional(10, 4)):
        module.__dict__[SITE_ATTR] = OutputSite(Stats())
        with pytest.raises(TraceRejected):
            rewrite_lookup(module)
        assert module.training  # the mode is restored after the second trace
    hooked = nn.Embedding(10, 4)
    hooked.__dict__[SITE_ATTR] = OutputSite(Stats())
    hooked.forward = lambda x: nn.Embedding.forward(hooked, x)  # e.g. accelerate's hooks
    with pytest.raises(TraceRejected, match="own forward"):
        rewrite_lookup(hooked)
