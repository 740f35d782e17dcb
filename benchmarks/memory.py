r"""Optimizer-state memory and step time of TNT on models with large modes, against Adam.

Two models, side by side in one process:

* ``embedding``: ``Embedding(50_000, 512)`` over 32 tokens, mean pooling, ``Dense(10)`` (25.6M
  parameters, nearly all in the table);
* ``transformer``: :func:`models.transformer_classifier` (vocabulary 50,000, 64 tokens, width
  128, 4 heads, 2 blocks): the same table feeding attention, LayerNorm and MLPs.

For each: the optimizer state of Adam (allocated), of TNT without a bound (``max_factor_dim=None``,
from :meth:`keras_tnt.TNT.plan`, which allocates nothing: the 50,000² vocabulary factors are not
allocatable here) and of TNT with the default bound (4096: the vocabulary mode gets a diagonal
factor; allocated, and equal to the plan), then the median step time of ``model.fit`` over
``--steps`` steps (batch ``--batch``, synthetic tokens, after a warm-up), TNT (T1=1, T2=20,
inverse refresh included in the mean) against Adam. Usage::

    python -m benchmarks.memory
"""

from __future__ import annotations

import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
from absl import app  # noqa: E402
from absl import flags  # noqa: E402

import keras_tnt  # noqa: E402
from keras_tnt._variables import format_bytes  # noqa: E402
from models import runtime  # noqa: E402
from models import transformer_classifier  # noqa: E402

FLAGS = flags.FLAGS
VOCABULARY = 50_000


def define_flags():
    flags.DEFINE_list("models", ["embedding", "transformer"], "Which models.")
    flags.DEFINE_integer("steps", 40, "Timed steps per optimizer (two T2 periods).")
    flags.DEFINE_integer("batch", 64, "Sequences per batch.")


def build(name):
    keras.utils.set_random_seed(0)
    if name == "embedding":
        tokens = keras.Input((32,), dtype="int32")
        x = keras.layers.Embedding(VOCABULARY, 512, name="embedding")(tokens)
        x = keras.layers.GlobalAveragePooling1D()(x)
        return keras_tnt.FisherModel(tokens, keras.layers.Dense(10)(x)), 32
    if name == "transformer":
        return transformer_classifier(VOCABULARY, 64, 10, width=128, heads=4, mlp_width=256), 64
    raise ValueError(f"--models: {name!r} is not one of embedding, transformer")


def state_bytes(optimizer) -> int:
    return int(sum(np.prod(v.shape) * np.dtype(v.dtype).itemsize for v in optimizer.variables))


class StepTimer(keras.callbacks.Callback):
    def on_train_batch_begin(self, batch, logs=None):
        self.start = time.perf_counter()

    def on_train_batch_end(self, batch, logs=None):
        self.times.append(time.perf_counter() - self.start)


def step_times(model, data, steps):
    x, y = data
    model.fit(x[: 2 * FLAGS.batch], y[: 2 * FLAGS.batch], batch_size=FLAGS.batch, verbose=0)
    timer = StepTimer()
    timer.times = []
    n = steps * FLAGS.batch
    model.fit(x[:n], y[:n], batch_size=FLAGS.batch, verbose=0, shuffle=False, callbacks=[timer])
    return np.array(timer.times)


def run(name):
    rng = np.random.default_rng(0)
    model, length = build(name)
    n = (FLAGS.steps + 2) * FLAGS.batch
    data = (
        rng.integers(0, VOCABULARY, size=(n, length)).astype("int32"),
        rng.integers(0, 10, size=n),
    )
    variables = model.trainable_variables
    unbounded = sum(e["state_bytes"] for e in keras_tnt.TNT(max_factor_dim=None).plan(variables))
    rows = {}
    for label, make in (
        ("Adam", lambda: keras.optimizers.Adam(1e-4)),
        ("TNT, max_factor_dim=4096", lambda: keras_tnt.TNT(1e-4, 0.1)),
    ):
        model, _ = build(name)
        optimizer = make()
        model.compile(
            optimizer=optimizer,
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        )
        if isinstance(optimizer, keras_tnt.TNT):
            model.warm_start(data[0][: FLAGS.batch], batch_size=FLAGS.batch, verbose=0)
        times = step_times(model, data, FLAGS.steps)
        rows[label] = (state_bytes(optimizer), float(np.median(times)), float(times.mean()))
        if isinstance(optimizer, keras_tnt.TNT):
            planned = sum(e["state_bytes"] for e in optimizer.plan())
            print(optimizer.describe_plan())
            print(f"plan {planned} bytes; allocated {rows[label][0]} bytes (with global counters)")
    params = sum(int(np.prod(v.shape)) for v in variables)
    adam_bytes, adam_median, adam_mean = rows["Adam"]
    print(f"\n== {name}: {params:,} parameters, batch {FLAGS.batch}, {FLAGS.steps} timed steps")
    print(
        f"{'optimizer':<28} {'state':>12} {'state x':>8} {'median ms':>10} {'mean ms':>9} "
        f"{'median x':>9} {'mean x':>7}"
    )
    print(
        f"{'TNT, no bound (plan only)':<28} {format_bytes(unbounded):>12} "
        f"{unbounded / adam_bytes:>8.1f} {'not run':>10}"
    )
    for label, (size, median, mean) in rows.items():
        print(
            f"{label:<28} {format_bytes(size):>12} {size / adam_bytes:>8.2f} "
            f"{1e3 * median:>10.1f} {1e3 * mean:>9.1f} {median / adam_median:>9.2f} "
            f"{mean / adam_mean:>7.2f}"
        )


def main(argv):
    runtime.quiet_tensorflow_logging(FLAGS["verbosity"].present)
    for name in FLAGS.models:
        run(name)


if __name__ == "__main__":
    define_flags()
    app.run(main)
