"""PyTorch Lightning integration: adversarial_step() in a manual-optimization LightningModule."""

from __future__ import annotations

import doctest
import importlib
import sys

import pytest

torch = pytest.importorskip("torch")
pl = pytest.importorskip("lightning.pytorch")

from torch.nn import functional as F  # noqa: E402

import advgraph  # noqa: E402
from advgraph.integrations import lightning as lightning_integration  # noqa: E402
from advgraph.integrations.lightning import adversarial_step, find_wrapped  # noqa: E402
from torch_models import MeanPool, param_bytes  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:.*LeafSpec.*")

STEPS = 6
LR = 0.5


@pytest.fixture(autouse=True)
def one_thread():
    # The test machines are small and shared: one intra-op thread is much faster there.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def dataset(n: int = 4 * STEPS, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randint(1, 30, (n, 6), generator=gen)
    return torch.utils.data.TensorDataset(x, torch.randint(0, 3, (n,), generator=gen))


def loader():
    return torch.utils.data.DataLoader(dataset(), batch_size=4, shuffle=False)


class Classifier(pl.LightningModule):
    def __init__(self, mode: str = "output", automatic: bool = False, **options) -> None:
        super().__init__()
        self.automatic_optimization = automatic
        torch.manual_seed(0)
        self.net = advgraph.wrap(MeanPool(), mode=mode, **options)
        self.losses: list[float] = []

    def training_step(self, batch, batch_idx):
        x, y = batch
        opt = self.optimizers()
        opt.zero_grad()
        loss = adversarial_step(self, lambda: F.cross_entropy(self.net(x), y))
        opt.step()
        self.losses.append(float(loss))
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=LR)


def fit(module: pl.LightningModule, **trainer_kwargs) -> pl.Trainer:
    kwargs = dict(
        max_steps=STEPS,
        accelerator="cpu",
        devices=1,
        enable_progress_bar=False,
        enable_model_summary=False,
        logger=False,
        enable_checkpointing=False,
    )
    kwargs.update(trainer_kwargs)
    trainer = pl.Trainer(**kwargs)
    trainer.fit(module, loader())
    return trainer


def by_hand(mode: str, **options):
    torch.manual_seed(0)
    model = MeanPool()
    wrapped = advgraph.wrap(model, mode=mode, **options)
    opt = torch.optim.SGD(wrapped.parameters(), lr=LR)
    for x, y in loader():
        opt.zero_grad()
        wrapped.adversarial_step(lambda: F.cross_entropy(wrapped(x), y))
        opt.step()
    return model


@pytest.mark.parametrize("mode", ["output", "matrix"])
def test_fit_trains_adversarially(mode):
    module = Classifier(mode=mode, epsilon=0.5)
    before = param_bytes(module.net)
    fit(module)
    assert module.net.advgraph_stats["steps"] == STEPS  # the adversarial passes ran
    assert len(module.losses) == STEPS
    assert param_bytes(module.net) != before
    # Same result as the same steps by hand: every pass's backward went through manual_backward.
    reference = by_hand(mode, epsilon=0.5)
    got = dict(module.net.named_parameters())
    for name, p in reference.named_parameters():
        torch.testing.assert_close(got[name], p, rtol=1e-5, atol=1e-6)


def test_bf16_mixed_precision():
    module = Classifier(mode="output", method="pgd", steps=2, epsilon=0.5)
    before = param_bytes(module.net)
    fit(module, precision="bf16-mixed", max_steps=3)
    assert module.net.advgraph_stats["steps"] == 3
    assert param_bytes(module.net) != before
    assert all(torch.isfinite(p).all() for p in module.parameters())


def test_automatic_optimization_is_refused():
    module = Classifier(automatic=True)
    with pytest.raises(ValueError, match=r"manual optimization.*Received: automatic_optimization=True"):
        fit(module, max_steps=1)


def test_find_wrapped_and_errors():
    module = Classifier()
    assert find_wrapped(module) is module.net
    module.other = advgraph.wrap(MeanPool())
    with pytest.raises(ValueError, match=r"exactly one.*Received: wrapped_modules=\['net', 'other'\]"):
        find_wrapped(module)
    with pytest.raises(ValueError, match="exactly one.*Received: wrapped_modules=\\[\\]"):
        find_wrapped(torch.nn.Linear(2, 2))
    with pytest.raises(TypeError, match="LightningModule.*Received: module='Linear'"):
        adversarial_step(torch.nn.Linear(2, 2), lambda: None)
    with pytest.raises(ValueError, match="advgraph.wrap.*Received: wrapped='MeanPool'"):
        adversarial_step(Classifier(), lambda: None, wrapped=MeanPool())


def test_missing_lightning_names_the_extra(monkeypatch):
    for name in ("lightning", "lightning.pytorch", "pytorch_lightning"):
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.delitem(sys.modules, "advgraph.integrations.lightning")
    with pytest.raises(ImportError, match=r"pip install 'advgraph\[lightning\]'"):
        importlib.import_module("advgraph.integrations.lightning")


def test_docstring_examples():
    result = doctest.testmod(lightning_integration, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0
