"""Probe methods and the drivers that run them on every Site (tests/test_site_conformance.py).

A probe is a small :class:`advgraph.Method` written against the public Site only, as
a user's own method would be; it runs through ``advgraph.wrap(model, method=probe)``
and notes what it saw (losses, gradients, deltas) in ``NOTES``. A driver builds the
same small model on one adapter, runs one probe for a few steps and returns plain
data (JSON): the notes, ``advgraph_stats``, the weights' bytes (sha256) before and
after and the weights themselves.

Run as ``python _site_probes.py <out.json> <mode> <probe>[:compiled]...`` with
``KERAS_BACKEND`` set: the Keras driver, one process per backend (the backend is
fixed per process). The PyTorch driver runs in the test process.

Model (same weights everywhere): ids (B, L) -> Embedding(V, D) -> mean over L ->
Dense(C) (``twice``: a second id array through the same embedding -> mean -> a
second Dense without bias, added), softmax cross-entropy, plain SGD with ``LR``.
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
from dataclasses import dataclass
from typing import Any

import numpy as np

import advgraph

V, D, C, B, L = 11, 4, 3, 4, 5
LR = 0.25
DELTA = 40.0  # Restore: delta = DELTA * the site's gradient
SCALES = (20.0, -30.0)  # Calls: call i gets delta = SCALES[i] * its own gradient
NOTES: dict[str, Any] = {}
RECORD = {"on": True}  # False in compiled steps: their arrays are symbolic


def data() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(3)
    x = rng.integers(0, V, (B, L)).astype("int32")
    x[:, 0] = 2  # a repeated id: matrix rows shared by several positions
    return {
        "E": rng.standard_normal((V, D)).astype("float32"),
        "W": (rng.standard_normal((D, C)) * 0.5).astype("float32"),
        "W2": (rng.standard_normal((D, C)) * 0.5).astype("float32"),
        "b": (rng.standard_normal(C) * 0.1).astype("float32"),
        "x": x,
        "x2": rng.integers(0, V, (B, L)).astype("int32"),
        "y": rng.integers(0, C, B).astype("int32"),
    }


# -- framework-agnostic helpers (the array's own operators only) ------------------------


def to_numpy(a: Any) -> np.ndarray:
    if hasattr(a, "detach"):
        return a.detach().cpu().numpy()
    if hasattr(a, "numpy"):
        return a.numpy()
    return np.asarray(a)


def tmap(fn: Any, tree: Any) -> Any:
    return tuple(tmap(fn, t) for t in tree) if isinstance(tree, tuple) else fn(tree)


def leaves(tree: Any) -> list[Any]:
    return [leaf for t in tree for leaf in leaves(t)] if isinstance(tree, tuple) else [tree]


def total(a: Any) -> Any:
    if type(a).__module__.startswith("tensorflow"):
        import tensorflow as tf

        return tf.reduce_sum(a)
    return a.sum()


def note(key: str, value: Any) -> None:
    if RECORD["on"]:
        NOTES.setdefault(key, []).append(tmap(lambda a: to_numpy(a).tolist(), value))


class ProbeError(Exception):
    """Raised by a probe inside a pass."""


# -- the probes -------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class Restore(advgraph.Method):
    """Two passes; the second under ``DELTA * g`` (``fail``: its closure raises
    after the forward); ``clear()`` in ``finally``."""

    fail: bool = False

    def passes(self) -> int:
        return 2

    def step(self, site: Any, closure: Any) -> Any:
        loss = site.forward_backward(closure, param_grads=True)
        note("clean_loss", loss)
        site.set_delta(tmap(lambda g: g * DELTA, site.site_grad()))
        fail = self.fail

        def second() -> Any:
            out = closure()
            if fail:
                raise ProbeError("the probe's perturbed pass raises")
            return out

        try:
            note("perturbed_loss", site.forward_backward(second, param_grads=True, keep_grad=False))
        finally:
            site.clear()
        return loss


@dataclass(frozen=True, kw_only=True)
class Calls(advgraph.Method):
    """The gradient of a target called twice, then each call its own delta."""

    def passes(self) -> int:
        return 2

    def step(self, site: Any, closure: Any) -> Any:
        loss = site.forward_backward(closure, param_grads=True)
        grad = site.site_grad()
        note("clean_loss", loss)
        note("grad", grad)
        if isinstance(grad, tuple) and len(grad) == len(SCALES):
            site.set_delta(tuple(g * s for g, s in zip(grad, SCALES)))
        else:  # matrix mode: one array over the union of the rows the calls touched
            site.set_delta(tmap(lambda g: g * SCALES[0], grad))
        try:
            note("perturbed_loss", site.forward_backward(closure, param_grads=False, keep_grad=False))
        finally:
            site.clear()
        return loss


@dataclass(frozen=True, kw_only=True)
class Skips(advgraph.Method):
    """Records a NaN, a zero and a good compute_delta result; the pass runs under the
    NaN result's delta (which must be 0: the loss is the clean loss, bit for bit)."""

    def passes(self) -> int:
        return 2

    def step(self, site: Any, closure: Any) -> Any:
        loss = site.forward_backward(closure, param_grads=True)
        grad = site.site_grad()
        first = leaves(grad)[0]
        bad = advgraph.compute_delta(first * math.nan, 0.5)
        zero = advgraph.compute_delta(first * 0.0, 0.5)
        good = advgraph.compute_delta(first, 0.5)
        for result in (bad, zero, good):
            site.record(result)
        note("clean_loss", loss)
        note("deltas", (bad.delta, zero.delta, good.delta))
        if isinstance(grad, tuple):  # one delta per weight: the NaN one first, zeros after
            delta = (bad.delta,) + tuple(g * 0.0 for g in grad[1:])
        else:
            delta = bad.delta
        site.set_delta(delta)
        try:
            note("perturbed_loss", site.forward_backward(closure, param_grads=True, keep_grad=False))
        finally:
            site.clear()
        return loss


@dataclass(frozen=True, kw_only=True)
class Passes(advgraph.Method):
    """``declared`` passes declared; ``run`` of them run, one of each kind (a
    forward_backward, a penalty_backward with a zero penalty, a joint_backward of
    one forward, then more forward_backwards): each adds the clean gradient."""

    declared: int = 3
    run: int = 3

    def passes(self) -> int:
        return self.declared

    def step(self, site: Any, closure: Any) -> Any:
        loss = site.forward_backward(closure, param_grads=True, keep_grad=False)
        if self.run >= 2:
            site.penalty_backward(closure, lambda g: sum(total(leaf) for leaf in leaves(g)) * 0.0)
        if self.run >= 3:
            site.joint_backward(closure, [None], lambda outs: outs[0])
        for _ in range(self.run - 3):
            site.forward_backward(closure, param_grads=True, keep_grad=False)
        return loss


PROBES: dict[str, tuple[Any, str, int]] = {
    # name: (method, model, steps)
    "restore": (Restore(), "single", 1),
    "restore_raising": (Restore(fail=True), "single", 1),
    "calls": (Calls(), "twice", 1),
    "skips": (Skips(), "single", 2),
    "passes": (Passes(), "single", 1),
    "passes_short": (Passes(declared=3, run=2), "single", 1),
    "passes_long": (Passes(declared=3, run=4), "single", 1),
}


def method_for(name: str, site: str) -> advgraph.Method:
    """The probe; for a site made of weights, the same probe with ``site="weights"``."""
    method = PROBES[name][0]
    if site != "weights":
        return method
    cls = type(f"{type(method).__name__}OnWeights", (type(method),), {"site": "weights"})
    return cls(**{k: getattr(method, k) for k in method.knobs()})


def _digest(arrays: list[np.ndarray]) -> str:
    h = hashlib.sha256()
    for a in arrays:
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def _finish(before: list[np.ndarray], after: list[np.ndarray], names: list[str], stats: Any, error: Any) -> dict:
    return {
        "before": _digest(before),
        "after": _digest(after),
        "weights": {n: a.tolist() for n, a in zip(names, after)},
        "stats": {k: int(v) for k, v in dict(stats).items()},
        "error": error,
        "notes": {k: v for k, v in NOTES.items()},
    }


# -- PyTorch ---------------------------------------------------------------------------


def run_torch(site: str, probe: str) -> dict:
    """``site``: ``"output"``, ``"matrix"`` or ``"weights"`` (the Dense ``fc``)."""
    import torch

    d = data()
    _, kind, steps = PROBES[probe]

    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = torch.nn.Embedding(V, D)
            self.fc = torch.nn.Linear(D, C)
            self.fc2 = torch.nn.Linear(D, C, bias=False)

        def forward(self, x: Any, x2: Any = None) -> Any:
            out = self.fc(self.emb(x).mean(dim=1))
            if x2 is not None:
                out = out + self.fc2(self.emb(x2).mean(dim=1))
            return out

    model = Net()
    with torch.no_grad():
        model.emb.weight.copy_(torch.from_numpy(d["E"]))
        model.fc.weight.copy_(torch.from_numpy(d["W"].T.copy()))
        model.fc.bias.copy_(torch.from_numpy(d["b"]))
        model.fc2.weight.copy_(torch.from_numpy(d["W2"].T.copy()))
    if kind == "single":
        model.fc2.weight.requires_grad_(False)
    target = "fc" if site == "weights" else "emb"
    mode = "output" if site == "weights" else site
    wrapped = advgraph.wrap(model, target=target, mode=mode, method=method_for(probe, site))
    x, x2, y = (torch.from_numpy(d[k]).long() for k in ("x", "x2", "y"))
    params = [("E", model.emb.weight), ("W", model.fc.weight), ("b", model.fc.bias), ("W2", model.fc2.weight)]

    def weights() -> list[np.ndarray]:
        out = [p.detach().numpy().copy() for _, p in params]
        out[1], out[3] = out[1].T.copy(), out[3].T.copy()  # (D, C) as Keras' kernels
        return out

    def closure() -> Any:
        logits = wrapped(x, x2) if kind == "twice" else wrapped(x)
        return torch.nn.functional.cross_entropy(logits, y)

    # The restore probes check bytes: a learning rate of 0 leaves every finite weight as it was.
    lr = 0.0 if probe.startswith("restore") else LR
    optimizer = torch.optim.SGD([p for _, p in params if p.requires_grad], lr=lr)
    NOTES.clear()
    before = weights()
    after_step = None
    error = None
    for _ in range(steps):
        optimizer.zero_grad()
        try:
            wrapped.adversarial_step(closure)
        except (ProbeError, ValueError) as e:
            error = f"{type(e).__name__}: {e}"
            after_step = weights()  # the parameters right after the failed step
            break
        optimizer.step()
    after = weights() if after_step is None else after_step
    return _finish(before, after, [n for n, _ in params], wrapped.advgraph_stats, error)


# -- Keras (the backend is KERAS_BACKEND's) ----------------------------------------------


def run_keras(mode: str, probe: str, eager: bool) -> dict:
    import keras

    d = data()
    _, kind, steps = PROBES[probe]
    inp = keras.Input((L,), dtype="int32", name="x")
    emb = keras.layers.Embedding(V, D, name="emb")
    fc = keras.layers.Dense(C, name="fc")
    out = fc(keras.layers.GlobalAveragePooling1D()(emb(inp)))
    inputs: Any = inp
    fc2 = None
    if kind == "twice":
        inp2 = keras.Input((L,), dtype="int32", name="x2")
        fc2 = keras.layers.Dense(C, use_bias=False, name="fc2")
        out = keras.layers.Add()([out, fc2(keras.layers.GlobalAveragePooling1D()(emb(inp2)))])
        inputs = [inp, inp2]
    model = keras.Model(inputs, out)
    # The restore probes check bytes: a learning rate of 0 leaves every finite weight as it was.
    lr = 0.0 if probe.startswith("restore") else LR
    model.compile(
        optimizer=keras.optimizers.SGD(lr),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        run_eagerly=eager,
    )
    emb.set_weights([d["E"]])
    fc.set_weights([d["W"], d["b"]])
    if fc2 is not None:
        fc2.set_weights([d["W2"]])
    target = "fc" if mode == "weights" else "emb"
    try:
        wrapped = advgraph.wrap(model, target=target, mode="output" if mode == "weights" else mode,
                                method=method_for(probe, mode))  # fmt: skip
    except ValueError as e:  # a site that refuses the model (a target called twice)
        return {"error": f"{type(e).__name__}: {e}", "notes": {}, "stats": {}, "weights": {}, "before": "", "after": ""}

    def weights() -> list[np.ndarray]:
        out = [np.asarray(emb.get_weights()[0]), *map(np.asarray, fc.get_weights())]
        out.append(np.asarray(fc2.get_weights()[0]) if fc2 is not None else d["W2"])
        return out

    xs = [d["x"], d["x2"]] if kind == "twice" else d["x"]
    NOTES.clear()
    RECORD["on"] = eager
    before = weights()
    error = None
    for _ in range(steps):
        try:
            wrapped.train_on_batch(xs, d["y"])
        except Exception as e:  # noqa: BLE001 - reported to the parent, which asserts on it
            error = f"{type(e).__name__}: {e}"
            break
    return _finish(before, weights(), ["E", "W", "b", "W2"], wrapped.advgraph_stats, error)


def main() -> None:
    """``probes``: names; ``name:compiled`` runs the compiled train function."""
    out_path, mode, *probes = sys.argv[1:]
    results = {p: run_keras(mode, p.split(":")[0], not p.endswith(":compiled")) for p in probes}
    with open(out_path, "w") as f:
        json.dump(results, f)


if __name__ == "__main__":
    main()
