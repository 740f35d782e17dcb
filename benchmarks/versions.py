r"""TNT's step on the MNIST autoencoder against another keras-tnt version's, interleaved in one
process (TensorFlow).

Differences of a few percent between versions are below the drift between processes on a
shared CPU (±10% between runs of :mod:`benchmarks.step_time` in a noisy window). Here every
configuration is built in the same process and timed in alternating windows of ``--steps``
steps, ``--windows`` times (the order reversed every other round), so that drift hits all of
them alike:

* Adam, the baseline of the ratios;
* this tree's TNT (T1=1, T2=20, as :mod:`benchmarks.step_time` times it);
* the same TNT with every factor in its size's buffer (``--shared_layout``): 0.5's layout,
  before a factor of 65,536 numbers or more got a buffer of its own (docs/algorithm.md §2);
* with ``--old=DIR``, the TNT of the keras-tnt checkout in ``DIR`` (its ``keras_tnt`` package
  is copied and imported as ``keras_tnt_old``; its own ``FisherModel`` and loss drive it).

Prints each configuration's median and mean step (schedule-weighted, as step_time's) × Adam's,
and the ratios of this tree's TNT to the others. Usage::

    git worktree add /tmp/keras-tnt-0.4 dcd888c
    python -m benchmarks.versions --old=/tmp/keras-tnt-0.4
    python -m benchmarks.versions --windows=4         # this tree, both layouts, and Adam
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
from absl import app  # noqa: E402
from absl import flags  # noqa: E402

import keras_tnt  # noqa: E402
from benchmarks import step_time  # noqa: E402
from models import runtime  # noqa: E402
from models.autoencoder import MNIST_WIDTHS  # noqa: E402
from models.mlp import linear  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("old", None, "A checkout of another keras-tnt version to time side by side.")
flags.DEFINE_boolean("shared_layout", True, "Also time this tree's TNT with 0.5's buffer layout.")
flags.DEFINE_integer("windows", 8, "Alternating windows of every configuration.", lower_bound=1)
flags.DEFINE_integer("steps", 20, "Timed steps per configuration and window (T2 = 20).")
# --output (a JSON file of the results) is step_time's flag.


def import_old(checkout: str):
    """The ``keras_tnt`` package of ``checkout``, imported as ``keras_tnt_old``."""
    source = os.path.join(checkout, "keras_tnt")
    if not os.path.isfile(os.path.join(source, "__init__.py")):
        raise app.UsageError(f"--old={checkout!r}: no keras_tnt package in that directory.")
    root = tempfile.mkdtemp(prefix="keras_tnt_old_")
    target = os.path.join(root, "keras_tnt_old")
    shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__"))
    for folder, _, files in os.walk(target):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                with open(path) as f:
                    text = f.read()
                with open(path, "w") as f:
                    f.write(re.sub(r"\bkeras_tnt\b", "keras_tnt_old", text))
    sys.path.insert(0, root)
    import keras_tnt_old

    return keras_tnt_old


def build(config, package, dataset):
    """The MNIST autoencoder as ``models.mnist_autoencoder`` builds it, as ``package``'s
    FisherModel, compiled with ``config``'s optimizer, warm-started and stepped to t = T2 - 1."""
    keras.utils.set_random_seed(0)
    inputs = keras.Input((MNIST_WIDTHS[0],), name="pixels")
    h, code = inputs, len(MNIST_WIDTHS) // 2
    for i, width in enumerate(MNIST_WIDTHS[1:], start=1):
        activation = None if i in (code, len(MNIST_WIDTHS) - 1) else "relu"
        h = linear(width, MNIST_WIDTHS[i - 1], activation=activation, name=f"dense_{i}")(h)
    model = package.FisherModel(inputs, h, name="mnist_autoencoder")
    loss = package.losses.SummedBinaryCrossentropy(from_logits=True)
    model.compile(optimizer=config.make_optimizer(), loss=loss)
    if config.t1 is not None:
        model.warm_start(dataset, steps=5, verbose=0)
    model.fit(dataset, steps_per_epoch=3, epochs=1, verbose=0, shuffle=False)
    if config.t2 is not None:
        model.optimizer.iterations.assign(config.t2 - 1)
    config.model = model


def main(argv):
    del argv
    if keras.backend.backend() != "tensorflow":
        raise app.UsageError("benchmarks.versions runs on TensorFlow (KERAS_BACKEND=tensorflow).")
    runtime.quiet_tensorflow_logging(FLAGS["verbosity"].present)
    lr, dataset = step_time.LR, step_time._dataset("autoencoder", 1000)

    def tnt(package, **attributes):
        def make():
            optimizer = package.TNT(lr, 0.1, 0.9, 0.9, 1, 20)
            for name, value in attributes.items():
                setattr(optimizer, name, value)
            return optimizer

        return make

    configs = [
        (step_time.Config("Adam", lambda: keras.optimizers.Adam(lr)), keras_tnt),
        (step_time.Config(f"TNT {keras_tnt.__version__}", tnt(keras_tnt), 1, 20), keras_tnt),
    ]
    if FLAGS.shared_layout:
        shared = tnt(keras_tnt, _own_buffer_size=2**62)  # no factor keeps a buffer of its own
        configs.append((step_time.Config("TNT, 0.5's layout", shared, 1, 20), keras_tnt))
    if FLAGS.old:
        old = import_old(FLAGS.old)
        label = f"TNT {old.__version__} (--old)"
        configs.append((step_time.Config(label, tnt(old), 1, 20), old))
    for config, package in configs:
        build(config, package, dataset)
    configs = [c for c, _ in configs]
    print(f"MNIST autoencoder, batch 1000, T1=1 T2=20: {FLAGS.windows} windows of {FLAGS.steps}")
    for r in range(FLAGS.windows):
        order = configs if r % 2 == 0 else configs[:1] + configs[:0:-1]
        for config in order:
            step_time._measure(config, dataset, FLAGS.steps)
        last = {c.label: np.median(c.times[-FLAGS.steps :]) for c in configs}
        medians = {label: round(float(1e3 * t), 1) for label, t in last.items()}
        print(f"window {r}, median ms: {medians}", flush=True)
    summaries = {c.label: step_time._summary(c) for c in configs}
    base = summaries["Adam"]
    width = max(len(c.label) for c in configs) + 2
    print(f"{'optimizer':<{width}}median ms  mean ms  median x  mean x")
    for label, s in summaries.items():
        print(
            f"{label:<{width}}{1e3 * s['median_s']:>9.1f}{1e3 * s['mean_s']:>9.1f}"
            f"{s['median_s'] / base['median_s']:>10.3f}{s['mean_s'] / base['mean_s']:>8.3f}"
        )
    this = summaries[configs[1].label]
    for label, s in list(summaries.items())[2:]:
        print(
            f"{configs[1].label} / {label}: median step {this['median_s'] / s['median_s']:.4f}, "
            f"mean step {this['mean_s'] / s['mean_s']:.4f}"
        )
    if FLAGS.output:
        with open(FLAGS.output, "w") as f:
            json.dump(summaries, f, indent=1)


if __name__ == "__main__":
    app.run(main)
