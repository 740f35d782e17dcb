r"""Overlay training runs in the style of the paper's Figures 2 and 3.

    python plot.py runs/digits_autoencoder-tnt-s0 runs/digits_autoencoder-adam-s0 --output=ae.png
    python plot.py runs/cifar10_resnet32-* --metric=val_accuracy --output=cifar.png

Each argument is a run directory written by ``train.py``. The figure has two panels, the metric
against epochs and against training time (seconds), one line per run, labelled by optimizer (and
seed when several runs share an optimizer).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

METRICS = ("loss", "smoothed_loss", "val_loss", "accuracy", "val_accuracy")


def read_run(run_dir: str) -> tuple[dict, dict[str, list[float]]]:
    history = os.path.join(run_dir, "history.csv")
    if not os.path.exists(history):
        raise FileNotFoundError(f"{run_dir} has no history.csv: is it a train.py run directory?")
    with open(os.path.join(run_dir, "flags.json")) as f:
        config = json.load(f)
    columns: dict[str, list[float]] = {}
    with open(history) as f:
        for row in csv.DictReader(f):
            for key, value in row.items():
                columns.setdefault(key, []).append(float(value) if value else float("nan"))
    return config, columns


def plot(run_dirs, metric: str, output: str, title: str | None = None) -> None:
    runs = [read_run(d) for d in run_dirs]
    missing = [d for d, (_, cols) in zip(run_dirs, runs) if metric not in cols]
    if missing:
        raise ValueError(f"--metric={metric} is not in the history of {missing}")
    optimizers = [config["optimizer"] for config, _ in runs]
    fig, (by_epoch, by_time) = plt.subplots(1, 2, figsize=(10, 4))
    for config, cols in runs:
        label = config["optimizer"].upper() if config["optimizer"] == "tnt" else config["optimizer"]
        if optimizers.count(config["optimizer"]) > 1:
            label += f" (seed {config['seed']})"
        by_epoch.plot(cols["epoch"], cols[metric], label=label)
        by_time.plot(cols["train_seconds"], cols[metric], label=label)
    for axis, xlabel in ((by_epoch, "epoch"), (by_time, "training time (s)")):
        axis.set_xlabel(xlabel)
        axis.set_ylabel(metric.replace("_", " "))
        axis.grid(alpha=0.3)
        axis.legend()
    if "loss" in metric:
        for axis in (by_epoch, by_time):
            axis.set_yscale("log")
    fig.suptitle(title or runs[0][0]["problem"])
    fig.tight_layout()
    fig.savefig(output, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="run directories written by train.py")
    parser.add_argument("--metric", default="loss", choices=METRICS)
    parser.add_argument("--output", default="runs.png", help="PNG file to write")
    parser.add_argument("--title", default=None)
    args = parser.parse_args(argv)
    try:
        plot(args.runs, args.metric, args.output, args.title)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
