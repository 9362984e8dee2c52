"""(b) Keras 3 fit() time on each backend: advgraph against a hand-written in-graph FGM step.

Model: Embedding(V, d) -> Conv1D -> global max-pool -> Dense; random token ids.
Variants, each a full ``fit`` epoch, timed interleaved in one process (medians), on
the backend chosen with ``--backend`` (``all``: one subprocess per backend):

- plain ``fit``;
- hand FGM: a ``train_step`` override written for that backend (the seed's matrix
  recipe: gradient of the embedding matrix, delta = eps*g/||g||, second pass at
  E + delta, one optimizer update of the summed gradients), inside Keras' compiled
  train function (TensorFlow: tf.function with assign_add/assign_sub; JAX: jax.jit,
  functional, E + delta passed into the stateless call; torch: eager, in place);
- advgraph FGM ``fit`` in matrix and in output mode.

Target: advgraph <= 1.05 x the hand-written step. The hand-written step is the
like-for-like reference: two passes and one optimizer update, in the same compiled
train function. Twice a plain fit is not (it counts the optimizer update and Keras'
per-step overhead twice), so the report does not divide by it; plain is shown for scale.

    python benchmarks/bench_keras_fit.py --backend all [--repeats 5] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import numpy as np

BACKENDS = ("tensorflow", "jax", "torch")


def build(keras, vocab: int, dim: int, seq: int, cls=None, seed: int = 0):
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((seq,), dtype="int32")
    h = keras.layers.Embedding(vocab, dim, name="embedding")(inputs)
    h = keras.layers.Conv1D(dim, 3, padding="same", activation="relu")(h)
    h = keras.layers.GlobalMaxPooling1D()(h)
    outputs = keras.layers.Dense(2)(h)
    return (cls or keras.Model)(inputs, outputs)


def hand_written_fgm(keras, backend: str) -> type:
    """The seed's FGM (matrix) as a train_step of ``backend``."""
    epsilon = 1.0

    def update_metrics(model, loss, y, y_pred):
        for metric in model.metrics:
            if metric.name == "loss":
                metric.update_state(loss)
            else:
                metric.update_state(y, y_pred)
        return {m.name: m.result() for m in model.metrics}

    if backend == "tensorflow":
        import tensorflow as tf

        class HandFGM(keras.Model):
            def train_step(self, data):
                x, y = data
                emb = self.get_layer("embedding").embeddings
                variables = self.trainable_variables
                with tf.GradientTape() as tape:
                    y_pred = self(x, training=True)
                    loss = self.compute_loss(x=x, y=y, y_pred=y_pred)
                grads = tape.gradient(loss, variables)
                index = next(i for i, v in enumerate(variables) if v is emb)
                g = tf.convert_to_tensor(grads[index])
                delta = epsilon * g / (tf.norm(g) + 1e-8)
                emb.assign_add(delta)
                with tf.GradientTape() as tape:
                    loss_adv = self.compute_loss(x=x, y=y, y_pred=self(x, training=True))
                grads_adv = tape.gradient(loss_adv, variables)
                emb.assign_sub(delta)
                summed = [tf.convert_to_tensor(a) + tf.convert_to_tensor(b) for a, b in zip(grads, grads_adv)]
                self.optimizer.apply(summed, variables)
                return update_metrics(self, loss, y, y_pred)

        return HandFGM

    if backend == "torch":
        import torch

        class HandFGM(keras.Model):
            def train_step(self, data):
                x, y = data
                emb = self.get_layer("embedding").embeddings
                variables = self.trainable_variables
                params = [v.value for v in variables]
                y_pred = self(x, training=True)
                loss = self.compute_loss(x=x, y=y, y_pred=y_pred)
                grads = torch.autograd.grad(loss, params)
                g = grads[next(i for i, v in enumerate(variables) if v is emb)]
                delta = epsilon * g / (g.norm() + 1e-8)
                with torch.no_grad():
                    emb.value.add_(delta)
                loss_adv = self.compute_loss(x=x, y=y, y_pred=self(x, training=True))
                grads_adv = torch.autograd.grad(loss_adv, params)
                with torch.no_grad():
                    emb.value.sub_(delta)
                    self.optimizer.apply([a + b for a, b in zip(grads, grads_adv)], variables)
                return update_metrics(self, loss.detach(), y, y_pred.detach())

        return HandFGM

    import jax
    import jax.numpy as jnp

    class HandFGM(keras.Model):
        def train_step(self, state, data):
            trainable, non_trainable, optimizer_values, metrics_values = state
            x, y = data
            index = next(i for i, v in enumerate(self.trainable_variables) if v is self.get_layer("embedding").embeddings)

            def loss_fn(t, n):
                y_pred, n = self.stateless_call(t, n, x, training=True)
                return self.compute_loss(x=x, y=y, y_pred=y_pred), (y_pred, n)

            (loss, (y_pred, non_trainable)), grads = jax.value_and_grad(loss_fn, has_aux=True)(trainable, non_trainable)
            g = grads[index]
            perturbed = list(trainable)
            perturbed[index] = trainable[index] + epsilon * g / (jnp.linalg.norm(g) + 1e-8)
            (_, (_, non_trainable)), grads_adv = jax.value_and_grad(loss_fn, has_aux=True)(perturbed, non_trainable)
            summed = [a + b for a, b in zip(grads, grads_adv)]
            trainable, optimizer_values = self.optimizer.stateless_apply(optimizer_values, summed, trainable)
            with keras.StatelessScope(state_mapping=list(zip(self.metrics_variables, metrics_values))) as scope:
                logs = update_metrics(self, loss, y, y_pred)
            metrics_values = [
                scope.get_current_value(v) if scope.get_current_value(v) is not None else value
                for v, value in zip(self.metrics_variables, metrics_values)
            ]
            return logs, (trainable, non_trainable, optimizer_values, metrics_values)

    return HandFGM


def run_backend(args: argparse.Namespace) -> dict:
    os.environ["KERAS_BACKEND"] = args.backend
    if args.backend == "torch":
        import torch  # noqa: F401  (before tensorflow, when both are installed)
    import keras

    import advgraph
    from _common import interleaved, machine, medians

    assert keras.backend.backend() == args.backend, keras.backend.backend()
    rng = np.random.default_rng(0)
    x = rng.integers(0, args.vocab, (args.samples, args.seq)).astype("int32")
    y = rng.integers(0, 2, (args.samples,)).astype("int32")

    def compiled(model):
        model.compile(
            optimizer=keras.optimizers.Adam(1e-3),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            metrics=["accuracy"],
        )
        return model

    shape = (args.vocab, args.dim, args.seq)
    models = {
        "plain": compiled(build(keras, *shape)),
        "hand FGM (matrix)": compiled(build(keras, *shape, cls=hand_written_fgm(keras, args.backend))),
        "advgraph FGM matrix": advgraph.wrap(compiled(build(keras, *shape)), mode="matrix"),
        "advgraph FGM output": advgraph.wrap(compiled(build(keras, *shape)), mode="output"),
    }
    variants = {
        name: (lambda m=m: m.fit(x, y, batch_size=args.batch, epochs=1, verbose=0, shuffle=False))
        for name, m in models.items()
    }
    times = interleaved(variants, args.repeats, warmup=1)
    med = medians(times)
    return {"backend": args.backend, "median_s": med, "times_s": times, "machine": machine()}


def report(results: list[dict]) -> str:
    from _common import format_spread, paired_ratios, spread, table

    rows = []
    for r in results:
        med = r["median_s"]
        hand, plain = med["hand FGM (matrix)"], med["plain"]
        for name in ("advgraph FGM matrix", "advgraph FGM output"):
            ratio = med[name] / hand
            per_round = spread(paired_ratios(r["times_s"], name, "hand FGM (matrix)"))
            rows.append((r["backend"], name.replace("advgraph FGM ", ""), f"{plain * 1e3:.0f}",
                         f"{hand * 1e3:.0f}", f"{med[name] * 1e3:.0f}", f"{ratio:.3f}",
                         format_spread(per_round), "ok" if per_round["median"] <= 1.05 else "MISSED"))
    header = ("backend", "mode", "plain ms", "hand FGM ms", "advgraph ms", "adv/hand (medians)",
              "adv/hand per round: median (IQR, min-max)", "<=1.05 (per round)")
    return table(rows, header)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default="all", choices=(*BACKENDS, "all"))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--vocab", type=int, default=20000)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--samples", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--json", default="bench-keras-fit.json")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    if args.child:
        print(json.dumps(run_backend(args)))
        return
    backends = BACKENDS if args.backend == "all" else (args.backend,)
    results = []
    for backend in backends:
        argv = [sys.executable, os.path.abspath(__file__), "--child", "--backend", backend]
        for key in ("repeats", "vocab", "dim", "seq", "samples", "batch"):
            argv += [f"--{key}", str(getattr(args, key))]
        env = dict(os.environ, KERAS_BACKEND=backend, TF_CPP_MIN_LOG_LEVEL="2")
        proc = subprocess.run(argv, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            print(f"{backend}: failed\n{proc.stderr[-3000:]}", file=sys.stderr)
            continue
        results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    print(report(results))
    from _common import write_json

    write_json(args.json, {"benchmark": "keras_fit", "args": vars(args), "results": results})


if __name__ == "__main__":
    main()
