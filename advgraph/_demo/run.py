"""The demo's driver and evaluation attack, written once for every framework.

A framework runner (``torch_runner``, ``keras_runner``) only builds the model and
provides a :class:`Trainer`: one training epoch, predictions, and the gradient of
the loss with respect to a perturbation of the embedding output. Everything else
(epochs, data order, timing, progress bars, the PGD attack, results) lives here.
"""

from __future__ import annotations

import importlib
import sys
import time
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Protocol

import numpy as np

import advgraph
from advgraph import AdvGraphWarning
from advgraph._demo.data import Encoded
from advgraph._demo.settings import DemoSettings

__all__ = ["RunResult", "Trainer", "load_runner", "pgd_attack", "run_all", "robust_accuracy"]

Array = Any
_EVAL_BATCH = 512


class Trainer(Protocol):
    """What a framework runner provides for one (method, seed) training run."""

    def train_epoch(self, x: np.ndarray, y: np.ndarray, on_batch: Callable[[], None]) -> float:
        """Train one epoch on ``x, y`` in the given order (batches of
        ``settings.batch_size``); call ``on_batch()`` after each batch; return the
        mean training loss (the clean loss)."""

    def embed(self, x: np.ndarray) -> Array:
        """Embedding output of token ids ``x`` (framework array, shape (b, n, d))."""

    def loss_grad(self, embedded: Array, x: np.ndarray, y: np.ndarray, delta: Array) -> Array:
        """Gradient w.r.t. ``delta`` of the mean cross-entropy of the model run from
        ``embedded + delta`` (inference mode: no dropout)."""

    def predict(self, embedded: Array, x: np.ndarray) -> np.ndarray:
        """Predicted class ids (numpy) of the model run from ``embedded`` (inference mode)."""

    def close(self) -> None:
        """Unwrap the model; free what can be freed."""


@dataclass(frozen=True)
class RunResult:
    """One trained model: a method, a seed, and what was measured."""

    method: str
    seed: int
    clean_accuracy: float
    robust_accuracy: float
    epoch_seconds: tuple[float, ...]
    train_loss: tuple[float, ...]  # per epoch
    test_accuracy: tuple[float, ...]  # clean, per epoch

    @property
    def seconds_per_epoch(self) -> float:
        """Median training time of an epoch (the median ignores the first Keras
        epoch's graph tracing when there are 3 epochs or more)."""
        return float(np.median(self.epoch_seconds))


# -- the evaluation attack ------------------------------------------------------------


def pgd_attack(
    grad: Callable[[Array], Array], zeros: Array, epsilon: float, steps: int, alpha: float
) -> Array:
    """l2 PGD, per sample: ``delta <- project(delta + alpha * g / ||g||, epsilon)``.

    Written once with advgraph's framework-agnostic :func:`advgraph.fgm_delta` and
    :func:`advgraph.project`: ``zeros`` and the gradients may be torch or TensorFlow
    tensors. Starts at ``zeros`` (no random start).
    """
    delta = zeros
    for _ in range(steps):
        step = advgraph.fgm_delta(grad(delta), alpha, per_sample=True)
        delta = advgraph.project(delta + step, epsilon, per_sample=True)
    return delta


def _batches(n: int, size: int) -> list[slice]:
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


def clean_accuracy(trainer: Trainer, x: np.ndarray, y: np.ndarray) -> float:
    """Accuracy of the model on ``x, y`` (no perturbation)."""
    correct = 0
    for part in _batches(len(x), _EVAL_BATCH):
        correct += int(np.sum(trainer.predict(trainer.embed(x[part]), x[part]) == y[part]))
    return correct / len(x)


def robust_accuracy(trainer: Trainer, x: np.ndarray, y: np.ndarray, settings: DemoSettings) -> float:
    """Accuracy under :func:`pgd_attack` on the embedding output (settings' attack)."""
    correct = 0
    for part in _batches(len(x), _EVAL_BATCH):
        xb, yb = x[part], y[part]
        embedded = trainer.embed(xb)
        delta = pgd_attack(
            lambda d: trainer.loss_grad(embedded, xb, yb, d),
            embedded * 0.0,
            settings.attack_epsilon,
            settings.attack_steps,
            settings.attack_alpha(),
        )
        correct += int(np.sum(trainer.predict(embedded + delta, xb) == yb))
    return correct / len(x)


# -- the driver ------------------------------------------------------------------------


def load_runner(framework: str) -> Any:
    """Import the runner module of ``framework`` (which imports the framework)."""
    return importlib.import_module(f"advgraph._demo.{framework}_runner")


class Progress:
    """A tqdm bar of training batches on stderr, honest while the first step compiles.

    With ``first_step`` (e.g. ``"compiling…"``, for a runner whose first batch traces
    and compiles the train function) the bar shows that text instead of a rate and an
    ETA until the first batch is done; the bar that follows measures its rate from
    the batches after it, so the compile time does not inflate the ETA.
    """

    def __init__(self, total: int, desc: str, first_step: str | None = None) -> None:
        self.total, self.desc = total, desc
        self.waiting = first_step is not None
        fmt = None if first_step is None else "{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} " + first_step
        self.bar = self._bar(initial=0, bar_format=fmt)

    def _bar(self, initial: int, bar_format: str | None) -> Any:
        from tqdm.auto import tqdm

        return tqdm(total=self.total, initial=initial, desc=self.desc, unit="batch", file=sys.stderr,
                    leave=False, dynamic_ncols=True, bar_format=bar_format)

    def update(self) -> None:
        if self.waiting:
            self.waiting = False
            self.bar.close()
            self.bar = self._bar(initial=1, bar_format=None)
        else:
            self.bar.update(1)

    def set_postfix(self, **values: Any) -> None:
        self.bar.set_postfix(**values)

    def set_postfix_str(self, text: str) -> None:
        self.bar.set_postfix_str(text)

    def close(self) -> None:
        self.bar.close()


def run_one(runner: Any, method: str, seed: int, enc: Encoded, settings: DemoSettings) -> RunResult:
    """Train one model from scratch with ``method`` and ``seed``; evaluate it."""
    with warnings.catch_warnings():
        # A sample the model already fits with probability 1.0 (in float32) has an
        # exactly zero gradient; advgraph then uses delta = 0 for it and warns. That is
        # expected in a demo that trains to convergence; non-finite gradients still warn.
        warnings.filterwarnings("ignore", message=r"advgraph: .*(is|was) zero", category=AdvGraphWarning)
        return _run_one(runner, method, seed, enc, settings)


def _run_one(runner: Any, method: str, seed: int, enc: Encoded, settings: DemoSettings) -> RunResult:
    trainer: Trainer = runner.Trainer(method, seed, enc, settings)
    rng = np.random.default_rng(seed)  # same data order for every method
    n_batches = len(_batches(len(enc.x_train), settings.batch_size))
    seconds, losses, accuracies = [], [], []
    bar = Progress(settings.epochs * n_batches, f"{method:>6} seed {seed}", getattr(runner, "FIRST_STEP", None))
    try:
        for epoch in range(settings.epochs):
            order = rng.permutation(len(enc.x_train))
            start = time.perf_counter()
            loss = trainer.train_epoch(enc.x_train[order], enc.y_train[order], bar.update)
            seconds.append(time.perf_counter() - start)
            losses.append(float(loss))
            accuracies.append(clean_accuracy(trainer, enc.x_test, enc.y_test))
            bar.set_postfix(epoch=epoch + 1, loss=f"{loss:.3f}", test_acc=f"{accuracies[-1]:.3f}")
        bar.set_postfix_str("attacking the test split")
        robust = robust_accuracy(trainer, enc.x_test, enc.y_test, settings)
    finally:
        bar.close()
        trainer.close()
    return RunResult(
        method=method,
        seed=seed,
        clean_accuracy=accuracies[-1],
        robust_accuracy=robust,
        epoch_seconds=tuple(seconds),
        train_loss=tuple(losses),
        test_accuracy=tuple(accuracies),
    )


def run_all(enc: Encoded, settings: DemoSettings) -> list[RunResult]:
    """Every method, every seed (seeds 0 .. settings.seeds - 1), in that order."""
    runner = load_runner(settings.framework)
    runner.configure()
    runner.check_methods(settings)
    results = []
    for method in settings.methods:
        for seed in range(settings.seeds):
            results.append(run_one(runner, method, seed, enc, settings))
    return results
