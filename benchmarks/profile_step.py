r"""Where a training step's time goes, by operation type: TNT against Adam (TensorFlow).

Profiles ``--steps`` steady-state ``fit`` steps of each optimizer with TensorFlow's profiler
and reads its trace: per step, the time inside the step function (from the start of the
function to its end, as the executor ran it on this machine's threads), how many operations
ran and their summed time (operations run in parallel on the inter-op threads, so the sum can
exceed the function's time), by operation type and by part of the step:

* ``model``: the forward and backward passes (and the loss);
* ``fold``: the Fisher pass under the statistics condition (target draws, sampled backward
  pass, contractions, moving averages);
* ``update``: the optimizer's update (momentum, refresh when due, preconditioning, assignments).

The profiler adds its own overhead to every operation: the times read here are inflated, the
counts are exact, and TNT's and Adam's are comparable with each other. Usage::

    python -m benchmarks.profile_step                                  # digits autoencoder
    python -m benchmarks.profile_step --problem=digits_transformer --top=25
    python -m benchmarks.profile_step --problem=embedding --steps=40   # benchmarks.memory's

``--problem=mnist_autoencoder`` profiles the paper's MNIST autoencoder at batch 1000 (as
:mod:`benchmarks.step_time` times it). ``--problem=embedding`` profiles the
``Embedding(50_000, 512)`` classifier of :mod:`benchmarks.memory` (32 tokens, batch 64,
synthetic tokens), whose TNT step is row-sparse.
"""

from __future__ import annotations

import collections
import glob
import os
import statistics
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
from absl import app  # noqa: E402
from absl import flags  # noqa: E402

import keras_tnt  # noqa: E402
from benchmarks import memory  # noqa: E402
from models import registry  # noqa: E402
from models import runtime  # noqa: E402

FLAGS = flags.FLAGS
PROBLEMS = ("digits_autoencoder", "digits_transformer", "embedding", "mnist_autoencoder")
flags.DEFINE_enum("problem", "digits_autoencoder", PROBLEMS, "Which model to profile.")
flags.DEFINE_integer("steps", 200, "Profiled steps per optimizer.")
flags.DEFINE_integer("top", 15, "Operation types listed.")
flags.DEFINE_integer("t1", 1, "TNT's T1.")
flags.DEFINE_integer("t2", 20, "TNT's T2.")

LR = 1e-5  # finite on a repeated batch; the time does not depend on it


def _data(problem):
    import numpy as np
    import tensorflow as tf
    from sklearn.datasets import load_digits

    if problem == "embedding":
        rng = np.random.default_rng(0)
        x = rng.integers(0, memory.VOCABULARY, size=(64, 32)).astype("int32")
        return tf.data.Dataset.from_tensors((x, rng.integers(0, 10, size=64))).repeat()
    if problem == "mnist_autoencoder":  # synthetic pixels; the time does not depend on them
        x = np.random.default_rng(0).uniform(0, 1, size=(1000, 784)).astype("float32")
        return tf.data.Dataset.from_tensors((x, x)).repeat()
    batch = registry.get(problem).batch_size
    digits = load_digits()
    if problem == "digits_autoencoder":
        x = (digits.data[:batch] / 16.0).astype("float32")
        y = x
    else:
        x, y = digits.data[:batch].astype("int32"), digits.target[:batch]
    return tf.data.Dataset.from_tensors((x, y)).repeat()


def _part(name: str) -> str:
    scope = name.split("/")
    if len(scope) > 1 and scope[0] == "StatefulPartitionedCall":
        scope = scope[1:]
    head = scope[0]
    if head.startswith("cond") and len(scope) > 1:
        return "fold"
    if head in ("tnt", "adam") or head.startswith(("tnt_", "adam_")):
        return "update"
    return "model"


def profile(problem: str, which: str, steps: int) -> dict:
    """Per-step figures of ``steps`` profiled steps of ``which`` ("tnt" or "adam")."""
    import tensorflow as tf
    from tensorflow.tsl.profiler.protobuf import xplane_pb2

    data = _data(problem)
    keras.utils.set_random_seed(0)
    if problem == "embedding":
        model, _ = memory.build("embedding")
        loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    else:
        model, loss = registry.get(problem).build(), registry.get(problem).loss()
    if which == "tnt":
        optimizer = keras_tnt.TNT(LR, 0.1, 0.9, 0.9, FLAGS.t1, FLAGS.t2)
    else:
        optimizer = keras.optimizers.Adam(LR)
    model.compile(optimizer=optimizer, loss=loss)
    if which == "tnt":
        model.warm_start(data, steps=5, verbose=0)
    model.fit(data, steps_per_epoch=3, epochs=1, verbose=0)
    if which == "tnt":  # the steady state: t >= T2
        model.optimizer.iterations.assign(FLAGS.t2 - 1)
    model.fit(data, steps_per_epoch=2 * FLAGS.t2, epochs=1, verbose=0)
    with tempfile.TemporaryDirectory() as logdir:
        tf.profiler.experimental.start(logdir)
        model.fit(data, steps_per_epoch=steps, epochs=1, verbose=0)
        tf.profiler.experimental.stop()
        path = glob.glob(os.path.join(logdir, "**", "*.xplane.pb"), recursive=True)[0]
        space = xplane_pb2.XSpace()
        with open(path, "rb") as f:
            space.ParseFromString(f.read())
    functions = []
    by_type, count = collections.Counter(), collections.Counter()
    by_part, part_count = collections.Counter(), collections.Counter()
    for plane in space.planes:
        metadata = plane.event_metadata
        for line in plane.lines:
            for event in line.events:
                name = metadata[event.metadata_id].name
                if ":" not in name:
                    continue
                op, kind = name.rsplit(":", 1)
                kind = kind.strip()
                us = event.duration_ps / 1e6
                if kind.startswith("__inference_multi_step") or kind.startswith(
                    "__inference_one_step"
                ):
                    functions.append(us)
                    continue
                if "/" not in op or kind in ("Process", "Run", "Start", "Done"):
                    continue
                by_type[kind] += us / steps
                count[kind] += 1 / steps
                part = _part(op)
                by_part[part] += us / steps
                part_count[part] += 1 / steps
    return {
        "function_us": statistics.median(functions) if functions else float("nan"),
        "by_type": by_type,
        "count": count,
        "by_part": by_part,
        "part_count": part_count,
    }


def main(argv):
    del argv
    runtime.quiet_tensorflow_logging(FLAGS["verbosity"].present)
    if keras.backend.backend() != "tensorflow":
        raise app.UsageError(
            "benchmarks.profile_step reads TensorFlow's profiler: KERAS_BACKEND=tensorflow."
        )
    results = {w: profile(FLAGS.problem, w, FLAGS.steps) for w in ("adam", "tnt")}
    a, t = results["adam"], results["tnt"]
    print(
        f"\n== {FLAGS.problem}: {FLAGS.steps} profiled steps, TNT T1={FLAGS.t1} T2={FLAGS.t2} "
        "against Adam (profiler overhead included)"
    )
    print(
        f"step function, median us: Adam {a['function_us']:.0f}, TNT {t['function_us']:.0f} "
        f"({t['function_us'] / a['function_us']:.2f}x)"
    )
    print(
        f"operations per step: Adam {sum(a['count'].values()):.0f}, "
        f"TNT {sum(t['count'].values()):.0f}"
    )
    print("\nby part of the step (operations per step, summed us per step)")
    print(f"{'part':10s} {'Adam ops':>9s} {'Adam us':>9s} {'TNT ops':>9s} {'TNT us':>9s}")
    for part in ("model", "fold", "update"):
        print(
            f"{part:10s} {a['part_count'][part]:9.1f} {a['by_part'][part]:9.1f} "
            f"{t['part_count'][part]:9.1f} {t['by_part'][part]:9.1f}"
        )
    print(f"\nby operation type, the {FLAGS.top} with most TNT time")
    print(f"{'type':28s} {'Adam ops':>9s} {'Adam us':>9s} {'TNT ops':>9s} {'TNT us':>9s}")
    for kind, us in t["by_type"].most_common(FLAGS.top):
        print(
            f"{kind[:28]:28s} {a['count'][kind]:9.1f} {a['by_type'][kind]:9.1f} "
            f"{t['count'][kind]:9.1f} {us:9.1f}"
        )


if __name__ == "__main__":
    app.run(main)
