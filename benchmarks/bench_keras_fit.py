"""(b) Keras 3 fit() time: advgraph against a hand-written in-graph FGM train_step.

Model: Embedding(V, d) -> Conv1D -> global max-pool -> Dense; random token ids.
Variants, each a full ``fit`` epoch, timed interleaved in one process (medians):

- plain ``fit``;
- hand FGM: a ``train_step`` override with the seed's recipe ported to TF2, inside the
  compiled train function (gradient of the embedding matrix, delta = eps*g/||g||,
  assign_add, second pass, assign_sub, one optimizer update of the summed gradients);
- advgraph FGM ``fit`` in matrix and in output mode.

Target: advgraph <= 1.05 x the hand-written step.

    python benchmarks/bench_keras_fit.py [--repeats 7] [--json out.json]
"""

from __future__ import annotations

import argparse

import numpy as np

try:  # torch before tensorflow when both are installed
    import torch  # noqa: F401
except ImportError:
    pass
import keras
import tensorflow as tf

import advgraph
from _common import interleaved, machine, medians, table, write_json


def build(vocab: int, dim: int, seq: int, seed: int = 0) -> keras.Model:
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((seq,), dtype="int32")
    h = keras.layers.Embedding(vocab, dim, name="embedding")(inputs)
    h = keras.layers.Conv1D(dim, 3, padding="same", activation="relu")(h)
    h = keras.layers.GlobalMaxPooling1D()(h)
    outputs = keras.layers.Dense(2)(h)
    return keras.Model(inputs, outputs)


class HandWrittenFGM(keras.Model):
    """The seed's matrix recipe as a TF2 train_step (in-graph, no host round-trip)."""

    epsilon = 1.0

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
        delta = self.epsilon * g / (tf.norm(g) + 1e-8)
        emb.assign_add(delta)
        with tf.GradientTape() as tape:
            y_adv = self(x, training=True)
            loss_adv = self.compute_loss(x=x, y=y, y_pred=y_adv)
        grads_adv = tape.gradient(loss_adv, variables)
        emb.assign_sub(delta)
        summed = [tf.convert_to_tensor(a) + tf.convert_to_tensor(b) for a, b in zip(grads, grads_adv)]
        self.optimizer.apply(summed, variables)
        for metric in self.metrics:
            if metric.name == "loss":
                metric.update_state(loss)
            else:
                metric.update_state(y, y_pred)
        return {m.name: m.result() for m in self.metrics}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--vocab", type=int, default=20000)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--samples", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--json", default="bench-keras-fit.json")
    args = parser.parse_args()
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

    base = build(args.vocab, args.dim, args.seq)
    hand = HandWrittenFGM(base.inputs, base.outputs)
    models = {
        "plain": compiled(build(args.vocab, args.dim, args.seq)),
        "hand FGM (matrix)": compiled(hand),
        "advgraph FGM matrix": advgraph.wrap(compiled(build(args.vocab, args.dim, args.seq)), mode="matrix"),
        "advgraph FGM output": advgraph.wrap(compiled(build(args.vocab, args.dim, args.seq)), mode="output"),
    }
    variants = {
        name: (lambda m=m: m.fit(x, y, batch_size=args.batch, epochs=1, verbose=0, shuffle=False))
        for name, m in models.items()
    }
    times = interleaved(variants, args.repeats, warmup=1)
    med = medians(times)
    hand_t = med["hand FGM (matrix)"]
    ratios = {
        "advgraph FGM matrix / hand FGM": med["advgraph FGM matrix"] / hand_t,
        "advgraph FGM output / hand FGM": med["advgraph FGM output"] / hand_t,
    }
    print(table([(n, f"{t * 1e3:.0f}", f"{t / med['plain']:.2f}x") for n, t in med.items()], ("variant (1 epoch)", "median ms", "vs plain")))
    print()
    print(table([(n, f"{r:.3f}", "<= 1.05", "ok" if r <= 1.05 else "MISSED") for n, r in ratios.items()], ("ratio", "value", "target", "")))
    write_json(args.json, {"benchmark": "keras_fit", "args": vars(args), "machine": machine(), "median_s": med, "times_s": times, "ratios": ratios})


if __name__ == "__main__":
    main()
