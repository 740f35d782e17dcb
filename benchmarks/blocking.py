r"""A mode above ``max_factor_dim``: a diagonal factor or blocks? Measured on real statistics.

TNT bounds a mode's factor (``max_factor_dim``) with a diagonal factor; Distributed Shampoo
splits such a mode into blocks instead. This benchmark measures both on the two kinds of mode
the bound meets in practice, at a size (4,096) where the full factor is still computable, so
that both can be compared with it:

* ``vocabulary``: the vocabulary mode of ``Embedding(4096, 64)`` → mean pool → ``Dense(10)``,
  sequences of 16 tokens drawn from a Zipf law (``p ∝ 1/(rank+1)^1.1``, ids in frequency
  order, as tokenisers number them: consecutive ids are tokens of similar frequency);
  ``vocabulary_shuffled``: the same with ids in random order;
* ``classes``: the class mode of a ``Dense(64 → 4096)`` softmax head on Gaussian inputs, labels
  drawn from a random linear teacher.

For each, TNT with full factors (``max_factor_dim=None``) trains ``--steps`` steps and its
statistics are read. With them, the preconditioned direction of a fresh batch's gradient is
computed with that mode's factor full, block-diagonal (blocks of ``b`` consecutive indices,
``--blocks``; the normalised factor with the entries outside the blocks set to zero, damped
and inverted), or diagonal (what the bound does); the other mode keeps its full factor, and
everything follows eq. (5) and the damping as ``keras_tnt.TNT`` does (float64). Printed per
choice: the relative error of the direction against the full factor's, their cosine, the share
of the factor's off-diagonal Frobenius mass the choice keeps, and its cost for that mode:
numbers stored (``d²``, ``d·b``, ``d``) and refresh work (``d³``, ``d·b²``, ``d``).

Then ``--train_steps`` more steps from the same start, TNT with the mode full against the mode
diagonal (``max_factor_dim=2048``), as a check that the direction error matters or not for the
loss (blocks are not an option of keras_tnt, so they are not trained). Usage::

    python -m benchmarks.blocking
"""

from __future__ import annotations

import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from absl import app  # noqa: E402
from absl import flags  # noqa: E402

import keras_tnt  # noqa: E402
from models import runtime  # noqa: E402

FLAGS = flags.FLAGS
SIZE = 4096
WIDTH = 64
DAMPING = 0.1


def define_flags():
    flags.DEFINE_list("problems", ["vocabulary", "vocabulary_shuffled", "classes"], "Which modes.")
    flags.DEFINE_list("blocks", ["256", "1024"], "Block sizes to compare.")
    flags.DEFINE_integer("steps", 60, "Steps that build the statistics (full factors).")
    flags.DEFINE_integer("train_steps", 200, "Steps of the full-vs-diagonal training check.")
    flags.DEFINE_integer("batch", 64, "Examples per batch.")


def problem(name, rng, batch):
    """``(model builder, batches(n) -> list of (x, y), index of the bounded variable, mode)``."""
    if name in ("vocabulary", "vocabulary_shuffled"):
        p = 1.0 / np.arange(1, SIZE + 1) ** 1.1
        p /= p.sum()
        if name == "vocabulary_shuffled":  # ids unrelated to frequency
            p = p[np.random.default_rng(1).permutation(SIZE)]
        teacher = rng.standard_normal((SIZE, 10))

        def batches(n):
            out = []
            for _ in range(n):
                x = rng.choice(SIZE, size=(batch, 16), p=p).astype("int32")
                y = np.argmax(teacher[x].mean(1) + 0.3 * rng.standard_normal((batch, 10)), 1)
                out.append((x, y.astype("int32")))
            return out

        def build():
            tokens = keras.Input((16,), dtype="int32")
            h = keras.layers.Embedding(SIZE, WIDTH, name="embedding")(tokens)
            h = keras.layers.GlobalAveragePooling1D()(h)
            return keras_tnt.FisherModel(tokens, keras.layers.Dense(10)(h), fisher_seed=1)

        return build, batches, 0, 0
    if name == "classes":
        teacher = rng.standard_normal((WIDTH, SIZE)) * 0.5

        def batches(n):
            out = []
            for _ in range(n):
                x = rng.standard_normal((batch, WIDTH)).astype("float32")
                logits = x @ teacher
                q = np.exp(logits - logits.max(1, keepdims=True))
                q /= q.sum(1, keepdims=True)
                y = np.array([rng.choice(SIZE, p=row) for row in q], "int32")
                out.append((x, y))
            return out

        def build():
            x = keras.Input((WIDTH,))
            return keras_tnt.FisherModel(x, keras.layers.Dense(SIZE)(x), fisher_seed=1)

        return build, batches, 0, 1
    raise ValueError(f"--problems: {name!r} is not one of vocabulary, vocabulary_shuffled, classes")


def compiled(build, max_factor_dim):
    keras.utils.set_random_seed(0)
    model = build()
    model.compile(
        optimizer=keras_tnt.TNT(learning_rate=1e-2, damping=DAMPING, max_factor_dim=max_factor_dim),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    return model


def normalised(statistics):
    """Eq. (5) for a 2-mode tensor, in float64 NumPy."""
    (h1, h2) = statistics
    d1, d2 = len(h1), len(h2)
    c = np.sqrt(np.trace(h1) / (d1 * d2))
    return [h1 / (c * d2), h2 / (c * d1)]


def block_mask(d, b):
    ids = np.arange(d) // b
    return ids[:, None] == ids[None, :]


def direction(g, factors):
    """``A1 g A2`` with ``A_i = (U_i + ε I)^{-1}``."""
    a1, a2 = (np.linalg.inv(u + DAMPING * np.eye(len(u))) for u in factors)
    return a1 @ g @ a2


def compare(name, blocks, steps, train_steps, batch):
    rng = np.random.default_rng(0)
    build, batches, var_index, mode = problem(name, rng, batch)
    model = compiled(build, None)
    data = batches(steps)
    start = time.perf_counter()
    for x, y in data:
        model.train_on_batch(x, y)
    built_s = time.perf_counter() - start
    var = model.trainable_variables[var_index]
    stats = [np.array(h, np.float64) for h in model.optimizer.statistics(var)]
    units = normalised(stats)
    ((x, y),) = batches(1)
    with tf.GradientTape() as tape:
        loss = model.compute_loss(x=x, y=y, y_pred=model(x))
    g = np.array(tf.convert_to_tensor(tape.gradient(loss, var)), np.float64)
    full = direction(g, units)
    u = units[mode]
    d = len(u)
    off = u - np.diag(np.diag(u))
    off_mass = np.sum(off**2)
    rows = []
    for label, mask, stored, work in (
        [("full", np.ones((d, d), bool), d * d, d**3)]
        + [(f"blocks of {b}", block_mask(d, b), d * b, d * b * b) for b in blocks]
        + [("diagonal", np.eye(d, dtype=bool), d, d)]
    ):
        factors = list(units)
        factors[mode] = np.where(mask, u, 0.0)
        got = direction(g, factors)
        error = np.linalg.norm(got - full) / np.linalg.norm(full)
        cosine = np.sum(got * full) / (np.linalg.norm(got) * np.linalg.norm(full))
        kept = np.sum(np.where(mask, off, 0.0) ** 2) / off_mass if off_mass else 1.0
        rows.append((label, error, cosine, kept, stored, work))
    print(
        f"\n{name}: variable {var.path} {tuple(var.shape)}, mode {mode} ({d}); statistics from "
        f"{steps} TNT steps ({built_s:.1f} s); off-diagonal share of the factor's Frobenius "
        f"mass {off_mass / np.sum(u**2):.3f}"
    )
    print(
        "| factor of the mode | direction error | cosine | off-diagonal mass kept | numbers "
        "| refresh work |"
    )
    print("| --- | --- | --- | --- | --- | --- |")
    for label, error, cosine, kept, stored, work in rows:
        print(
            f"| {label} | {error:.3f} | {cosine:.4f} | {kept:.3f} | {stored:,} "
            f"({stored / (d * d):.3g} x full) | {work:.3g} |"
        )
    if train_steps:
        data = batches(train_steps)
        test = batches(8)
        losses = {}
        for label, bound in (("full", None), ("diagonal", SIZE // 2)):
            model = compiled(build, bound)
            start = time.perf_counter()
            for x, y in data:
                model.train_on_batch(x, y)
            seconds = time.perf_counter() - start
            held_out = np.mean([model.evaluate(x, y, verbose=0) for x, y in test])
            losses[label] = (held_out, seconds)
        print(
            f"{train_steps} TNT steps (lr 1e-2, ε {DAMPING}), held-out loss on 8 fresh batches: "
            + ", ".join(f"{k} {v[0]:.4f} ({v[1]:.1f} s)" for k, v in losses.items())
        )


def main(argv):
    del argv
    runtime.quiet_tensorflow_logging(FLAGS["verbosity"].present)
    blocks = [int(b) for b in FLAGS.blocks]
    for name in FLAGS.problems:
        compare(name, blocks, FLAGS.steps, FLAGS.train_steps, FLAGS.batch)


if __name__ == "__main__":
    define_flags()
    app.run(main)
