r"""TNT's step on several JAX processes, its preconditioner work split across them and not.

The MNIST deep autoencoder (784-1000-500-250-30-250-500-1000-784, summed sigmoid cross-entropy),
global batch 1000 (synthetic inputs uniform in [0, 1]), TNT with T1=1, T2=20 under
``keras.distribution.DataParallel`` over every device of ``--processes`` JAX processes on this
machine (one CPU device each; collectives over Gloo on 127.0.0.1; ``keras_tnt.multi_process``).
Each process feeds its block of rows of every global batch (``multi_process.local_batches``).
After 3 untimed steps the step counter jumps to T2 (the steady state: inverses refreshed every
T2 steps), then ``--steps`` steps are timed on process 0 (the first one untimed: ``fit`` sets
up), a window that holds ``--steps`` / T2 refresh steps. Split (``split_preconditioner=True``,
the default) and not split alternate in rounds; the table gives the median and mean step of
each, median [min-max] over the rounds, and the split / unsplit ratios::

    KERAS_BACKEND=jax python -m benchmarks.multi_process_step [--rounds=3] [--steps=41]

Run it alone: the processes share this machine's cores. The processes are started here (free
ports, killed after ``--timeout_s``).
"""

from __future__ import annotations

import json
import os
import socket
import statistics
import subprocess
import sys
import time

os.environ["KERAS_BACKEND"] = "jax"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app  # noqa: E402
from absl import flags  # noqa: E402

flags.DEFINE_integer("processes", 2, "JAX processes (one CPU device each).")
flags.DEFINE_integer("rounds", 3, "Alternating rounds of split and not split.")
flags.DEFINE_integer("steps", 41, "Timed steps per run (the first is not counted).")
flags.DEFINE_integer("timeout_s", 600, "Kill a run's processes after this many seconds.")
flags.DEFINE_string("child", "", "Internal: run one process, 'split' or 'unsplit'.")
flags.DEFINE_string("output", "", "Optional JSON file with every run's step times.")
FLAGS = flags.FLAGS

T1, T2 = 1, 20
BATCH = 1000


def _child(split: bool) -> None:
    import jax
    import keras
    import numpy as np
    import tensorflow as tf

    import keras_tnt
    from keras_tnt import multi_process
    from models import mnist_autoencoder

    multi_process.initialize(timeout=120)
    x = np.random.RandomState(0).rand(BATCH * 8, 784).astype("float32")
    batches = tf.data.Dataset.from_tensor_slices((x, x)).batch(BATCH).repeat()
    data = multi_process.local_batches(batches)
    keras.utils.set_random_seed(0)
    model = mnist_autoencoder()
    model.compile(
        optimizer=keras_tnt.TNT(1e-5, 0.1, 0.9, 0.9, T1, T2, split_preconditioner=split),
        loss=keras_tnt.losses.SummedBinaryCrossentropy(from_logits=True),
        jit_compile=True,
    )
    times = []

    class Timer(keras.callbacks.Callback):
        def on_train_batch_begin(self, batch, logs=None):
            self.start = time.perf_counter()

        def on_train_batch_end(self, batch, logs=None):
            jax.block_until_ready(self.model.optimizer.iterations.value)
            times.append(time.perf_counter() - self.start)

    model.fit(data, steps_per_epoch=3, epochs=1, verbose=0)
    model.optimizer.iterations.assign(T2)
    model.fit(data, steps_per_epoch=FLAGS.steps, epochs=1, verbose=0, callbacks=[Timer()])
    if multi_process.is_chief():
        print("RESULT " + json.dumps([1000 * t for t in times[1:]]), flush=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(split: bool) -> list[float]:
    port = _free_port()
    procs = []
    for pid in range(FLAGS.processes):
        env = dict(
            os.environ,
            KERAS_DISTRIBUTION_JOB_ADDRESSES=f"127.0.0.1:{port}",
            KERAS_DISTRIBUTION_NUM_PROCESSES=str(FLAGS.processes),
            KERAS_DISTRIBUTION_PROCESS_ID=str(pid),
        )
        cmd = [
            sys.executable,
            "-m",
            "benchmarks.multi_process_step",
            f"--child={'split' if split else 'unsplit'}",
            f"--steps={FLAGS.steps}",
        ]
        procs.append(
            subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        )
    deadline = time.monotonic() + FLAGS.timeout_s
    outputs = []
    try:
        for p in procs:
            out, _ = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
            outputs.append(out.decode(errors="replace"))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for p, out in zip(procs, outputs):
        if p.returncode != 0:
            raise RuntimeError(f"a process exited with {p.returncode}:\n{out[-3000:]}")
    for line in outputs[0].splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :])
    raise RuntimeError(f"process 0 printed no result:\n{outputs[0][-3000:]}")


def _summary(values, digits=1):
    low, mid, high = min(values), statistics.median(values), max(values)
    return f"{mid:.{digits}f} [{low:.{digits}f}-{high:.{digits}f}]"


def main(argv):
    del argv
    if FLAGS.child:
        _child(FLAGS.child == "split")
        return
    runs = {"split": [], "not split": []}
    for r in range(FLAGS.rounds):
        for name in runs:
            times = _run(name == "split")
            runs[name].append(times)
            print(
                f"round {r + 1} {name:9s}: median {statistics.median(times):.1f} ms, "
                f"mean {statistics.fmean(times):.1f} ms over {len(times)} steps",
                flush=True,
            )
    medians = {k: [statistics.median(t) for t in v] for k, v in runs.items()}
    means = {k: [statistics.fmean(t) for t in v] for k, v in runs.items()}
    print(
        f"\n== MNIST autoencoder, TNT T1={T1} T2={T2}, global batch {BATCH}, "
        f"{FLAGS.processes} processes, {FLAGS.rounds} rounds (median [min-max] over rounds)"
    )
    print(f"{'':10s} {'median step ms':>24s} {'mean step ms':>24s}")
    for k in runs:
        print(f"{k:10s} {_summary(medians[k]):>24s} {_summary(means[k]):>24s}")
    ratio_median = [s / u for s, u in zip(medians["split"], medians["not split"])]
    ratio_mean = [s / u for s, u in zip(means["split"], means["not split"])]
    print(f"{'split/not':10s} {_summary(ratio_median, 3):>24s} {_summary(ratio_mean, 3):>24s}")
    if FLAGS.output:
        with open(FLAGS.output, "w") as f:
            json.dump({"processes": FLAGS.processes, "runs": runs}, f)


if __name__ == "__main__":
    app.run(main)
