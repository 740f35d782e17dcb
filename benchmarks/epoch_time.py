r"""Seconds per epoch of ``train.py``, TNT (or any optimizer) against Adam, as a user pays them.

``benchmarks.step_time`` times single steps of a bare ``fit``; this times whole epochs of the
training command (its callbacks, its data pipeline, its learning-rate schedule), from the
``train_seconds`` column of ``history.csv``: the time of the training steps, validation and
checkpoints not included. Each run is a fresh ``train.py`` process with a time budget; the
first epoch (which carries the tracing of the step function) is left out, the rest give the
median epoch. The optimizers alternate across ``--runs`` rounds, and each round's ratio to the
baseline (the first of ``--optimizers``) is printed with the median [min-max] over rounds::

    python -m benchmarks.epoch_time                                  # digits autoencoder
    python -m benchmarks.epoch_time --problem=digits_transformer --time_budget_s=60
"""

from __future__ import annotations

import csv
import os
import statistics
import subprocess
import sys
import tempfile

from absl import app
from absl import flags

FLAGS = flags.FLAGS
flags.DEFINE_string("problem", "digits_autoencoder", "Registry problem.")
flags.DEFINE_list("optimizers", ["adam", "tnt"], "Optimizers; the first is the baseline.")
flags.DEFINE_integer("runs", 3, "Rounds (a fresh process per optimizer and round).")
flags.DEFINE_float("time_budget_s", 10.0, "Training seconds per run.")
flags.DEFINE_list("extra_flags", [], "More train.py flags, e.g. --extra_flags=--seed=1.")


def epoch_seconds(
    problem: str, optimizer: str, budget: float, extra=()
) -> tuple[float, float, int]:
    """``(median epoch s without the first, first epoch s, epochs)`` of one train.py run."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with tempfile.TemporaryDirectory() as out:
        subprocess.run(
            [
                sys.executable,
                os.path.join(root, "train.py"),
                f"--problem={problem}",
                f"--optimizer={optimizer}",
                "--epochs=1000000",
                f"--time_budget_s={budget}",
                "--validation_freq=1000000",
                "--checkpoint_every_epochs=1000000",
                "--verbose=0",
                f"--output_dir={out}",
                *extra,
            ],
            check=True,
            cwd=root,
            stdout=subprocess.DEVNULL,
        )
        with open(os.path.join(out, "history.csv"), newline="") as f:
            times = [float(row["train_seconds"]) for row in csv.DictReader(f)]
    if len(times) < 3:
        raise RuntimeError(
            f"{optimizer}: {len(times)} epochs in {budget} s; raise --time_budget_s."
        )
    epochs = [b - a for a, b in zip(times, times[1:])]
    return statistics.median(epochs), times[0], len(times)


def main(argv):
    del argv
    if len(FLAGS.optimizers) < 2:
        raise app.UsageError("--optimizers: a baseline and at least one more.")
    results = {o: [] for o in FLAGS.optimizers}
    for r in range(FLAGS.runs):
        for o in FLAGS.optimizers:
            results[o].append(
                epoch_seconds(FLAGS.problem, o, FLAGS.time_budget_s, FLAGS.extra_flags)
            )
            median, first, n = results[o][-1]
            print(
                f"round {r + 1} {o}: median epoch {1000 * median:.2f} ms, first epoch "
                f"{first:.2f} s, {n} epochs",
                flush=True,
            )
    base = FLAGS.optimizers[0]
    print(f"\n== {FLAGS.problem}: epoch time against {base}, {FLAGS.runs} rounds")
    print(f"{'optimizer':12s} {'epoch ms':>10s} {'ratio: median [min-max]':>28s} {'first s':>8s}")
    for o in FLAGS.optimizers:
        ratios = [a[0] / b[0] for a, b in zip(results[o], results[base])]
        ms = 1000 * statistics.median(a[0] for a in results[o])
        first = statistics.median(a[1] for a in results[o])
        print(
            f"{o:12s} {ms:10.2f} {statistics.median(ratios):10.2f} "
            f"[{min(ratios):.2f}-{max(ratios):.2f}]{'':8s} {first:8.2f}"
        )


if __name__ == "__main__":
    app.run(main)
