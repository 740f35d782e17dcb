"""Results of a multi-seed reproduction: per-run metrics, the mean/std table, the figure.

The table has, per optimizer, the mean and sample standard deviation (``ddof=1``; empty for one
seed) over seeds of: the final and the best value of the problem's selection metric (smoothed
minibatch training loss for autoencoders, validation accuracy for classifiers), the final value
of one more metric (test loss for autoencoders, training loss for classifiers), the epochs and
the steps done and the training / wall-clock seconds used. "Final" is the last row of
``history.csv``; "best" is the best row, i.e. the best value at an epoch end. Training seconds
count the training steps only (not validation, checkpoints or the warm start, which has its own
column); the one-off tracing part of them is estimated per run (:func:`tracing_seconds`) and
reported on its own. The figure follows the paper's Figures 2 and 3 and ``plot.py``'s style: the
mean curve over seeds with a ±1 standard-deviation band, against epochs and against training time
without tracing. The target table (:func:`target_rows`) has the paper's practical metric: the
seconds (without tracing) and epochs each optimizer took to first reach a target value.
"""

from __future__ import annotations

import csv
import dataclasses
import json
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
    """One train.py run: its resolved settings (flags.json), history.csv as arrays and
    summary.json (empty when absent)."""

    optimizer: str
    seed: int
    config: dict
    history: dict[str, np.ndarray]
    summary: dict = dataclasses.field(default_factory=dict)


def load_run(run_dir: str) -> Run:
    config, columns = plot.read_run(run_dir)
    history = {k: np.asarray(v, dtype=float) for k, v in columns.items()}
    summary_path = os.path.join(run_dir, "summary.json")
    summary = {}
    if os.path.exists(summary_path):
        with open(summary_path) as f:
            summary = json.load(f)
    return Run(config["optimizer"], int(config["seed"]), config, history, summary)


# ----------------------------------------------------- time without tracing


def tracing_seconds(run: Run) -> float:
    """The one-off cost in a run's training time: the first epoch's training seconds minus the
    median of the later epochs' (NaN for a run of one epoch).

    ``train_seconds`` counts the training steps only, and a step traces (and, with XLA,
    compiles) its function the first time it sees an input shape: the first step, and the first
    partial last batch, both in the first epoch of a process. Every epoch computes the same
    number of steps, so what the first epoch takes beyond a typical one is that tracing. (A run
    resumed in another process traces again; that is not removed.)
    """
    seconds = run.history["train_seconds"]
    if len(seconds) < 2:
        return math.nan
    per_epoch = np.diff(seconds, prepend=0.0)
    return float(max(0.0, per_epoch[0] - np.median(per_epoch[1:])))


def compute_seconds(run: Run) -> np.ndarray:
    """Cumulative training seconds at each epoch end without :func:`tracing_seconds`."""
    tracing = tracing_seconds(run)
    return run.history["train_seconds"] - (0.0 if math.isnan(tracing) else tracing)


def time_to_target(run: Run, metric: str, target: float, direction: str = "min"):
    """``(seconds, epochs)`` at the first epoch end where ``metric`` reaches ``target``
    (``<=`` for ``direction="min"``, ``>=`` for ``"max"``); seconds without tracing. None if
    the run never reaches it."""
    values = run.history[metric]
    reached = values <= target if direction == "min" else values >= target
    hits = np.flatnonzero(reached & np.isfinite(values))
    if hits.size == 0:
        return None
    i = int(hits[0])
    return float(compute_seconds(run)[i]), float(run.history["epoch"][i])


def resolve_targets(specs, rows: list[dict], metric: str) -> list[tuple[str, float]]:
    """``(label, value)`` per target spec: a number, or ``OPTIMIZER_final`` for that
    optimizer's mean final ``metric`` over seeds (a row of :func:`table_rows`)."""
    by_optimizer = {r["optimizer"]: r for r in rows}
    targets = []
    for spec in specs:
        spec = str(spec).strip()
        if spec.endswith("_final"):
            name = spec[: -len("_final")]
            if name not in by_optimizer:
                raise ValueError(
                    f"--targets: {spec!r} names no optimizer of this report; use a number or "
                    f"one of {', '.join(o + '_final' for o in by_optimizer)}"
                )
            value = float(by_optimizer[name][f"final_{metric}_mean"])
            targets.append((f"{common.label(name)}'s final ({value:.4g})", value))
            continue
        try:
            value = float(spec)
        except ValueError:
            raise ValueError(
                f"--targets: {spec!r} is neither a number nor OPTIMIZER_final"
            ) from None
        if not math.isfinite(value):
            raise ValueError(f"--targets: {spec!r} must be finite")
        targets.append((f"{value:.4g}", value))
    return targets


def target_rows(runs: dict[str, list[Run]], problem: str, targets) -> list[dict]:
    """Per optimizer and target: how many seeds reached it, and the mean and std over those of
    the seconds (without tracing) and epochs it took."""
    criterion, _ = report_metrics(problem)
    rows = []
    for optimizer, optimizer_runs in runs.items():
        for label, value in targets:
            hits = [
                time_to_target(r, criterion.metric, value, criterion.direction)
                for r in optimizer_runs
            ]
            hits = [h for h in hits if h is not None]
            row = {
                "optimizer": optimizer,
                "target": label,
                "target_value": value,
                "seeds": len(optimizer_runs),
                "reached": len(hits),
            }
            for i, key in enumerate(("seconds", "epochs")):
                row[f"{key}_mean"], row[f"{key}_std"] = mean_std([h[i] for h in hits])
            rows.append(row)
    return rows


def markdown_target_table(rows: list[dict]) -> str:
    """Seconds (epochs) to each target: mean ± std over the seeds that reached it."""
    labels = list(dict.fromkeys(r["target"] for r in rows))
    optimizers = list(dict.fromkeys(r["optimizer"] for r in rows))
    cell = {(r["optimizer"], r["target"]): r for r in rows}
    lines = [
        "| optimizer | " + " | ".join(f"to {t}: s (epochs)" for t in labels) + " |",
        "|" + " --- |" * (len(labels) + 1),
    ]
    for optimizer in optimizers:
        cells = [common.label(optimizer)]
        for label in labels:
            r = cell[(optimizer, label)]
            if not r["reached"]:
                cells.append(f"not reached (0/{r['seeds']})")
                continue
            text = f"{_pm(r, 'seconds', 3)} ({_pm(r, 'epochs', 3)})"
            if r["reached"] < r["seeds"]:
                text += f", {r['reached']}/{r['seeds']} seeds"
            cells.append(text)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


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
        "steps": float(run.summary.get("steps", math.nan)),
        "train_seconds": float(h["train_seconds"][-1]),
        "tracing_seconds": tracing_seconds(run),
        "warm_start_seconds": float(run.summary.get("warm_start_seconds", math.nan)),
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
        "steps",
        "training s",
        "of which tracing s",
        "warm start s",
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
            _pm(row, "steps", 3),
            _pm(row, "train_seconds", 3),
            _pm(row, "tracing_seconds", 2),
            _pm(row, "warm_start_seconds", 2),
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
    times without tracing (:func:`compute_seconds`), from the latest first epoch end to the
    earliest last one."""
    seconds = [compute_seconds(r) for r in runs]
    start = max(s[0] for s in seconds)
    stop = min(s[-1] for s in seconds)
    times = np.linspace(start, stop, points) if stop > start else np.array([stop])
    stack = np.stack([np.interp(times, s, r.history[metric]) for s, r in zip(seconds, runs)])
    return (times, *_band(stack))


def plot_curves(
    runs: dict[str, list[Run]], metrics, output: str, title: str, zoom: bool = False
) -> None:
    """Mean ± std of each metric (a row of panels each), against epochs and training time.

    ``zoom``: for loss metrics, one more row on a linear axis from just below the lowest mean
    to just above the highest final mean, where long runs differ (their log-scale row is
    dominated by the first epochs).
    """
    metrics = list(metrics)
    rows = [(m, False) for m in metrics]
    if zoom:
        rows += [(m, True) for m in metrics if "loss" in m]
    fig, axes = plt.subplots(len(rows), 2, figsize=(10, 4 * len(rows)), squeeze=False)
    for (by_epoch, by_time), (metric, zoomed) in zip(axes, rows):
        means, finals = [], []
        for optimizer, optimizer_runs in runs.items():
            if not optimizer_runs:
                continue
            name = f"{common.label(optimizer)} ({len(optimizer_runs)} seeds)"
            for axis, curve in ((by_epoch, curve_by_epoch), (by_time, curve_by_time)):
                x, mean, std = curve(optimizer_runs, metric)
                (line,) = axis.plot(x, mean, label=name)
                axis.fill_between(x, mean - std, mean + std, color=line.get_color(), alpha=0.2)
                means.append(mean)
                finals.append(mean[-1])
        for axis, xlabel in ((by_epoch, "epoch"), (by_time, "training time without tracing (s)")):
            axis.set_xlabel(xlabel)
            axis.set_ylabel(METRIC_LABELS.get(metric, metric) + (" (zoomed)" if zoomed else ""))
            axis.grid(alpha=0.3)
            values = np.concatenate(means) if means else np.array([])
            values = values[np.isfinite(values) & (values > 0)]
            last = np.array([f for f in finals if np.isfinite(f)])
            if zoomed and values.size and last.size:
                low, high = values.min(), last.max()
                axis.set_ylim(low - 0.05 * (high - low), high + 0.5 * (high - low))
            elif "loss" in metric:
                axis.set_yscale("log")
                # Limits from the mean curves: a band whose lower edge nears 0 (seeds at very
                # different losses at the same time) would otherwise stretch the log axis.
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
