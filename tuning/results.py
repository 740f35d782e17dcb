"""Results of a multi-seed reproduction: per-run metrics, the mean/std table, the figure.

The table has, per optimizer, the mean and sample standard deviation (``ddof=1``; empty for one
seed) over seeds of: the final and the best value of the problem's selection metric (smoothed
minibatch training loss for autoencoders, validation accuracy for classifiers), the final value of
one more metric (test loss for autoencoders, training loss for classifiers), the epochs done and
the training / wall-clock seconds used. "Final" is the last row of ``history.csv``; "best" is the
best row, i.e. the best value at an epoch end. The figure follows the paper's Figures 2 and 3 and
``plot.py``'s style: the mean curve over seeds with a ±1 standard-deviation band, against epochs
and against training time.
"""

from __future__ import annotations

import csv
import dataclasses
import math
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

import plot  # noqa: E402
from models import registry  # noqa: E402
from tuning import common  # noqa: E402

METRIC_LABELS = {
    "smoothed_loss": "smoothed training loss",
    "loss": "training loss",
    "val_loss": "test loss",
    "val_accuracy": "validation accuracy",
    "accuracy": "training accuracy",
}


@dataclasses.dataclass
class Run:
    """One train.py run: its resolved settings (flags.json) and history.csv as arrays."""

    optimizer: str
    seed: int
    config: dict
    history: dict[str, np.ndarray]


def load_run(run_dir: str) -> Run:
    config, columns = plot.read_run(run_dir)
    history = {k: np.asarray(v, dtype=float) for k, v in columns.items()}
    return Run(config["optimizer"], int(config["seed"]), config, history)


def report_metrics(problem: str) -> tuple[common.Criterion, str]:
    """The selection criterion of the problem, and the one other metric reported at the end."""
    criterion = common.criterion_for(problem)
    return criterion, ("loss" if registry.get(problem).classifier else "val_loss")


def run_metrics(run: Run, criterion: common.Criterion, extra: str) -> dict[str, float]:
    """Final and best selection metric, final ``extra`` metric, epochs and seconds of one run."""
    h = run.history
    values = h[criterion.metric]
    return {
        f"final_{criterion.metric}": float(values[-1]),
        f"best_{criterion.metric}": criterion.best(values),
        f"final_{extra}": float(h[extra][-1]),
        "epochs": float(h["epoch"][-1]),
        "train_seconds": float(h["train_seconds"][-1]),
        "wall_seconds": float(h["wall_seconds"][-1]),
    }


def mean_std(values) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof=1; NaN for fewer than two values)."""
    values = np.asarray(values, dtype=float)
    if values.size == 0:
        return math.nan, math.nan
    std = float(np.std(values, ddof=1)) if values.size > 1 else math.nan
    return float(np.mean(values)), std


def _hyperparameters(run: Run) -> dict[str, float | str]:
    damping = common.damping_flag(run.optimizer)
    return {
        "learning_rate": run.config.get("learning_rate"),
        "damping": run.config.get(damping) if damping else "",
        "weight_decay": run.config.get("weight_decay"),
    }


def table_rows(
    runs: dict[str, list[Run]], problem: str, sources: dict[str, str] | None = None
) -> list[dict]:
    """One row per optimizer (in the order of ``runs``): its settings, the number of seeds and
    ``METRIC_mean`` / ``METRIC_std`` for every metric of :func:`run_metrics`."""
    criterion, extra = report_metrics(problem)
    rows = []
    for optimizer, optimizer_runs in runs.items():
        if not optimizer_runs:
            continue
        per_run = [run_metrics(r, criterion, extra) for r in optimizer_runs]
        row = {
            "optimizer": optimizer,
            "seeds": len(optimizer_runs),
            **_hyperparameters(optimizer_runs[0]),
            "source": (sources or {}).get(optimizer, ""),
        }
        for key in per_run[0]:
            row[f"{key}_mean"], row[f"{key}_std"] = mean_std([m[key] for m in per_run])
        rows.append(row)
    return rows


def per_run_rows(runs: dict[str, list[Run]], problem: str) -> list[dict]:
    criterion, extra = report_metrics(problem)
    return [
        {"optimizer": r.optimizer, "seed": r.seed, **run_metrics(r, criterion, extra)}
        for optimizer_runs in runs.values()
        for r in optimizer_runs
    ]


def write_csv(rows: list[dict], path: str) -> None:
    if not rows:
        raise ValueError(f"No results to write to {path}")
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def _number(value) -> str:
    if value is None or value == "":
        return "—"
    value = float(value)
    if math.isnan(value):
        return "—"
    if value == 0 or 1e-3 <= abs(value) < 1e5:
        return f"{value:.4g}"
    return f"{value:.3g}"


def _pm(row: dict, key: str, digits: int = 4) -> str:
    mean, std = row[f"{key}_mean"], row[f"{key}_std"]
    if not math.isfinite(mean):
        return _number(mean) if math.isnan(mean) else str(mean)
    text = f"{mean:.{digits}g}"
    if math.isfinite(std):
        text += f" ± {std:.2g}"
    return text


def markdown_table(rows: list[dict], problem: str) -> str:
    """The table in Markdown: ``mean ± std`` per cell."""
    criterion, extra = report_metrics(problem)
    m, label = criterion.metric, METRIC_LABELS.get
    header = [
        "optimizer",
        "seeds",
        "learning rate",
        "damping (Adam: ε)",
        "weight decay",
        f"final {label(m, m)}",
        f"best {label(m, m)}",
        f"final {label(extra, extra)}",
        "epochs",
        "training s",
        "wall s",
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for row in rows:
        cells = [
            common.label(row["optimizer"]),
            str(row["seeds"]),
            _number(row["learning_rate"]),
            _number(row["damping"]),
            _number(row["weight_decay"]),
            _pm(row, f"final_{m}"),
            _pm(row, f"best_{m}"),
            _pm(row, f"final_{extra}"),
            _pm(row, "epochs", 3),
            _pm(row, "train_seconds", 3),
            _pm(row, "wall_seconds", 3),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------ curves


def _band(stack: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    mean = stack.mean(axis=0)
    std = stack.std(axis=0, ddof=1) if stack.shape[0] > 1 else np.zeros_like(mean)
    return mean, std


def curve_by_epoch(runs: list[Run], metric: str):
    """(epochs, mean, std) over the seeds, up to the epochs that every seed reached."""
    length = min(len(r.history[metric]) for r in runs)
    stack = np.stack([r.history[metric][:length] for r in runs])
    return (runs[0].history["epoch"][:length], *_band(stack))


def curve_by_time(runs: list[Run], metric: str, points: int = 200):
    """(seconds, mean, std) over the seeds, each run linearly interpolated at common training
    times, from the latest first epoch end to the earliest last one."""
    start = max(r.history["train_seconds"][0] for r in runs)
    stop = min(r.history["train_seconds"][-1] for r in runs)
    times = np.linspace(start, stop, points) if stop > start else np.array([stop])
    stack = np.stack(
        [np.interp(times, r.history["train_seconds"], r.history[metric]) for r in runs]
    )
    return (times, *_band(stack))


def plot_curves(runs: dict[str, list[Run]], metrics, output: str, title: str) -> None:
    """Mean ± std of each metric (a row of panels each), against epochs and training time."""
    metrics = list(metrics)
    fig, axes = plt.subplots(len(metrics), 2, figsize=(10, 4 * len(metrics)), squeeze=False)
    for (by_epoch, by_time), metric in zip(axes, metrics):
        means = []
        for optimizer, optimizer_runs in runs.items():
            if not optimizer_runs:
                continue
            name = f"{common.label(optimizer)} ({len(optimizer_runs)} seeds)"
            for axis, curve in ((by_epoch, curve_by_epoch), (by_time, curve_by_time)):
                x, mean, std = curve(optimizer_runs, metric)
                (line,) = axis.plot(x, mean, label=name)
                axis.fill_between(x, mean - std, mean + std, color=line.get_color(), alpha=0.2)
                means.append(mean)
        for axis, xlabel in ((by_epoch, "epoch"), (by_time, "training time (s)")):
            axis.set_xlabel(xlabel)
            axis.set_ylabel(METRIC_LABELS.get(metric, metric))
            axis.grid(alpha=0.3)
            if "loss" in metric:
                axis.set_yscale("log")
                # Limits from the mean curves: a band whose lower edge nears 0 (seeds at very
                # different losses at the same time) would otherwise stretch the log axis.
                values = np.concatenate(means) if means else np.array([])
                values = values[np.isfinite(values) & (values > 0)]
                if values.size:
                    axis.set_ylim(values.min() / 1.5, values.max() * 1.5)
    axes[0][0].legend()
    fig.suptitle(title)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    fig.savefig(output, dpi=120)
    plt.close(fig)


def figure_metrics(problem: str) -> tuple[str, ...]:
    """The paper's panels: training loss for autoencoders (Figure 2); training loss and
    validation accuracy for classifiers (Figure 3)."""
    if registry.get(problem).classifier:
        return ("loss", "val_accuracy")
    return ("smoothed_loss",)
