"""The fx pass, tested as torch's own passes are: trace, apply, check graph, check outputs."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
from torch import fx, nn  # noqa: E402

from advgraph.adapters.torch._fx import PERTURBATION_NAME, insert_perturbation  # noqa: E402
from advgraph.adapters.torch._site import OutputSite, Perturbation, Stats  # noqa: E402
from torch_models import ConvClassifier, LSTMClassifier  # noqa: E402


@pytest.mark.parametrize("arch", [LSTMClassifier, ConvClassifier])
def test_insert_perturbation_after_embedding(arch):
    torch.manual_seed(0)
    model = arch()
    x = torch.randint(0, 30, (3, 5))
    with torch.no_grad():
        expected = model(x)
    gm = fx.symbolic_trace(model)
    emb_node = next(n for n in gm.graph.nodes if n.op == "call_module" and n.target == "emb")
    old_users = set(emb_node.users)
    site = OutputSite(Stats())
    new = insert_perturbation(gm, emb_node, Perturbation(site))

    # Graph: emb -> perturbation -> (every former user of emb).
    assert new.op == "call_module" and new.target == PERTURBATION_NAME
    assert new.args == (emb_node,)
    assert list(emb_node.users) == [new]
    assert set(new.users) == old_users
    assert emb_node.next is new
    gm.graph.lint()
    assert f"self.{PERTURBATION_NAME}(emb)" in gm.code

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
    assert sum(1 for _ in gm.parameters()) == sum(1 for _ in model.parameters())
    assert not any(isinstance(m, Perturbation) for m in model.modules())


def test_perturbation_adds_delta_to_the_embedding_output_only():
    class Probe(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(10, 4)

        def forward(self, x):
            return self.emb(x) * 2.0

    model = Probe()
    gm = fx.symbolic_trace(model)
    node = next(n for n in gm.graph.nodes if n.op == "call_module")
    site = OutputSite(Stats())
    insert_perturbation(gm, node, Perturbation(site))
    x = torch.tensor([[1, 2]])
    delta = torch.randn(1, 2, 4)
    site.set_delta(delta)
    with torch.no_grad():
        torch.testing.assert_close(gm(x), (model.emb(x) + delta) * 2.0, rtol=0, atol=0)
