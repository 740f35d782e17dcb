r"""KerasTuner grid search of one (problem, optimizer) over the paper's grid, resumable.

    python -m tuning.sweep --problem=digits_autoencoder --optimizer=tnt
    python -m tuning.sweep --problem=digits_classifier --optimizer=sgd --weight_decays=0,1e-4,1e-3
    python -m tuning.sweep --problem=mnist_autoencoder --optimizer=shampoo \
        --data_dir=~/tensorflow_datasets --time_budget_s=500
    python train.py --flagfile=runs/sweeps/digits_autoencoder-tnt/best.flags

The grid is the authors' (Section 6 of the paper): learning rate x damping on the autoencoders
(Adam's damping is its ε; SGD has only the learning rate), selected by the lowest smoothed
minibatch training loss within the budget; learning rate x weight decay on the classifiers,
selected by the highest validation accuracy. Each axis defaults to the 1-3 log grid (..., 1e-4,
3e-4, 1e-3, ...) centred on what ``train.py`` would use, i.e. the published best values of
``models/registry.py``, ``--grid_points_each_side`` neighbours on each side; ``--learning_rates``,
``--dampings`` and ``--weight_decays`` replace an axis (and add one the paper did not search).

Every trial is one ``python train.py --flagfile=trial_N/trial.flags`` run into ``trial_N/run``;
every other ``train.py`` flag given here (``--epochs``, ``--time_budget_s``,
``--steps_per_epoch``, ``--seed``, ``--data_dir``, ...) goes to every trial. The project directory
``DIRECTORY/PROBLEM-OPTIMIZER`` holds KerasTuner's state (``oracle.json``, ``trial_N/trial.json``),
``sweep.json`` (the settings), ``trials.csv`` (one row per trial) and, after every trial,
``best.flags`` (the best trial's flags, which ``train.py --flagfile`` accepts as is) and
``best.json``. Started again with the same directory, a sweep skips finished trials and resumes an
interrupted one from its last ``train.py`` checkpoint.
"""

from __future__ import annotations

import csv
import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # before TensorFlow's C++ logging starts

import keras_tuner  # noqa: E402
from absl import app  # noqa: E402
from absl import flags  # noqa: E402

import plot  # noqa: E402
import train  # noqa: E402
from models import registry  # noqa: E402
from models import runtime  # noqa: E402
from tuning import common  # noqa: E402

FLAGS = flags.FLAGS

flags.DEFINE_list("learning_rates", None, "Learning-rate grid (default: centred on the best).")
flags.DEFINE_list(
    "dampings", None, "Damping grid (Adam: its ε; default on autoencoders: centred on the best)."
)
flags.DEFINE_list(
    "weight_decays", None, "Weight-decay grid (default on classifiers: centred on the best)."
)
flags.DEFINE_integer(
    "grid_points_each_side", 1, "Default grids: neighbours on the 1-3 log ladder on each side."
)
flags.DEFINE_string("directory", os.path.join("runs", "sweeps"), "Directory of sweep projects.")
flags.DEFINE_string("project_name", None, "Project name (default: PROBLEM-OPTIMIZER).")
flags.register_validator(
    "grid_points_each_side", lambda v: v >= 0, message="--grid_points_each_side must be >= 0"
)


class FixedGridOracle(keras_tuner.Oracle):
    """Tries every point of a fixed grid once, in order.

    Which points are left is read from the trials themselves, so a reloaded project resumes
    correctly (KerasTuner's GridSearchOracle keeps its queue in memory only and stops early after
    a reload). Interrupted trials are retried first by the base ``Oracle.reload``.
    """

    def __init__(self, objective, grid: dict[str, list[float]], **kwargs):
        if not grid or any(not values for values in grid.values()):
            raise ValueError(f"The grid needs at least one value per flag, got {grid}")
        hyperparameters = keras_tuner.HyperParameters()
        for name, values in grid.items():
            hyperparameters.Choice(name, values, ordered=False)
        self.points = [{}]
        for name, values in grid.items():
            self.points = [dict(point, **{name: v}) for point in self.points for v in values]
        super().__init__(
            objective=objective,
            max_trials=len(self.points),
            hyperparameters=hyperparameters,
            allow_new_entries=False,
            tune_new_entries=False,
            **kwargs,
        )

    def populate_space(self, trial_id):
        tried = [trial.hyperparameters.values for trial in self.trials.values()]
        for point in self.points:
            if point not in tried:
                return {"status": keras_tuner.engine.trial.TrialStatus.RUNNING, "values": point}
        if self.ongoing_trials:
            return {"status": keras_tuner.engine.trial.TrialStatus.IDLE, "values": None}
        return {"status": keras_tuner.engine.trial.TrialStatus.STOPPED, "values": None}


def best_trial(trials, direction: str):
    """The best completed trial; ties (common for accuracies on a small test set) go to the
    earliest grid point. KerasTuner's ``get_best_trials`` breaks ties by the order in which the
    trial files were read back, which can change after a reload."""
    completed = [t for t in trials if t.status == "COMPLETED"]
    if not completed:
        return None
    sign = 1 if direction == "min" else -1
    return min(completed, key=lambda t: (sign * t.score, int(t.trial_id)))


class TrainPyTuner(keras_tuner.engine.base_tuner.BaseTuner):
    """Runs each trial as ``python train.py --flagfile=...`` and scores its history.csv."""

    def __init__(self, oracle, base_flags, criterion, shown_dir=None, **kwargs):
        self.base_flags = list(base_flags)
        self.criterion = criterion
        super().__init__(oracle, hypermodel=None, overwrite=False, **kwargs)
        # The project directory as the user named it (relative paths stay relative in best.*).
        self.shown_dir = shown_dir or self.project_dir

    def trial_paths(self, trial_id) -> dict[str, str]:
        trial_dir = self.get_trial_dir(trial_id)
        return {
            "flags": os.path.join(trial_dir, "trial.flags"),
            "log": os.path.join(trial_dir, "train.log"),
            "run": os.path.join(trial_dir, "run"),
        }

    def run_trial(self, trial):
        paths = self.trial_paths(trial.trial_id)
        lines = self.base_flags + [
            common.flag_line(name, value) for name, value in trial.hyperparameters.values.items()
        ]
        lines += [common.flag_line("output_dir", paths["run"]), "--verbose=2"]
        status = common.run_train(lines, paths["flags"], paths["log"])
        if status != 0:
            message = (
                f"train.py exited with status {status}; the end of {paths['log']}:\n"
                + common.log_tail(paths["log"])
            )
            raise keras_tuner.errors.FailedTrialError(message)
        _, history = plot.read_run(paths["run"])
        values = history[self.criterion.metric]
        return {
            self.criterion.objective: self.criterion.best(values),
            f"final_{self.criterion.metric}": values[-1],
            "epochs": history["epoch"][-1],
            "train_seconds": history["train_seconds"][-1],
        }

    def on_trial_end(self, trial):
        super().on_trial_end(trial)
        self.write_results()

    def write_results(self) -> dict | None:
        """Writes trials.csv, and best.flags + best.json when a trial has completed."""
        trials = sorted(self.oracle.trials.values(), key=lambda t: int(t.trial_id))
        names = list(self.oracle.points[0])
        columns = ["trial", "status", *names, self.criterion.objective, "epochs", "train_seconds"]
        rows = []
        for t in trials:
            row = {"trial": t.trial_id, "status": t.status, **t.hyperparameters.values}
            for metric in columns[-3:]:
                if t.metrics.exists(metric):
                    row[metric] = t.metrics.get_last_value(metric)
            rows.append(row)
        path = os.path.join(self.project_dir, "trials.csv")
        with open(path + ".tmp", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)
        os.replace(path + ".tmp", path)

        completed = [t for t in trials if t.status == "COMPLETED"]
        best = best_trial(trials, self.criterion.direction)
        if best is None:
            return None
        lines = [
            line
            for line in common.read_flagfile(self.trial_paths(best.trial_id)["flags"])
            if common.flag_name(line) not in common.RUN_FLAGS
        ]
        best_path = os.path.join(self.shown_dir, "best.flags")
        common.write_flagfile(
            os.path.join(self.project_dir, "best.flags"),
            lines,
            comments=[
                f"Best of {len(completed)} completed trials (grid of {len(self.oracle.points)}) "
                f"of {self.shown_dir}: trial {best.trial_id}, "
                f"{self.criterion.objective} = {float(best.score)!r}.",
                f"Run it with: python train.py --flagfile={best_path}",
            ],
        )
        result = {
            "trial": best.trial_id,
            "score": float(best.score),
            "objective": self.criterion.objective,
            "direction": self.criterion.direction,
            "hyperparameters": best.hyperparameters.values,
            "completed_trials": len(completed),
            "grid_points": len(self.oracle.points),
            "flags": lines,
            "flagfile": best_path,
        }
        with open(os.path.join(self.project_dir, "best.json.tmp"), "w") as f:
            json.dump(result, f, indent=1)
        os.replace(
            os.path.join(self.project_dir, "best.json.tmp"),
            os.path.join(self.project_dir, "best.json"),
        )
        return result


def project_dir(directory: str, problem: str, optimizer: str, project_name=None) -> str:
    return os.path.join(directory, project_name or f"{problem}-{optimizer}")


def run_sweep(
    problem: str,
    optimizer: str,
    grid: dict[str, list[float]],
    train_flags=(),
    directory: str = os.path.join("runs", "sweeps"),
    project_name: str | None = None,
    verbose: int = 1,
) -> dict | None:
    """Runs (or resumes) the grid search; returns best.json's content (None if nothing finished).

    ``grid`` maps train.py flags to their values; ``train_flags`` are more ``--name=value``
    lines for every trial (budgets, data directory, ...).
    """
    registry.get(problem)  # a ValueError naming the problems if unknown
    if optimizer not in registry.OPTIMIZERS:
        raise ValueError(
            f"--optimizer={optimizer} is unknown; choose one of: {', '.join(registry.OPTIMIZERS)}"
        )
    train_flags = list(train_flags)
    reserved = {"problem", "optimizer", *common.RUN_FLAGS, *grid}
    for line in train_flags:
        if not line.startswith("--") or common.flag_name(line) in reserved:
            raise ValueError(
                f"train flag {line!r} is not allowed here: the sweep sets --problem, --optimizer, "
                f"--output_dir, --verbose and the tuned flags ({', '.join(grid)}) of every trial"
            )
    criterion = common.criterion_for(problem)
    shown_dir = project_dir(directory, problem, optimizer, project_name)
    directory = os.path.abspath(directory)
    project_name = project_name or f"{problem}-{optimizer}"
    settings = {
        "problem": problem,
        "optimizer": optimizer,
        "grid": {name: [float(v) for v in values] for name, values in grid.items()},
        "train_flags": train_flags,
        "objective": criterion.objective,
        "direction": criterion.direction,
    }
    path = project_dir(directory, problem, optimizer, project_name)
    os.makedirs(path, exist_ok=True)
    settings_path = os.path.join(path, "sweep.json")
    if os.path.exists(settings_path):
        with open(settings_path) as f:
            saved = json.load(f)
        changed = {k: (saved.get(k), v) for k, v in settings.items() if saved.get(k) != v}
        if changed:
            raise ValueError(
                f"{path} holds a sweep with other settings {changed}; use another --directory "
                "or --project_name"
            )
    else:
        with open(settings_path, "w") as f:
            json.dump(settings, f, indent=1)

    oracle = FixedGridOracle(
        objective=keras_tuner.Objective(criterion.objective, criterion.direction), grid=grid
    )
    oracle.verbose = verbose
    base_flags = [f"--problem={problem}", f"--optimizer={optimizer}", *train_flags]
    tuner = TrainPyTuner(
        oracle,
        base_flags,
        criterion,
        shown_dir=shown_dir,
        directory=directory,
        project_name=project_name,
    )
    tuner.search()
    return tuner.write_results()


# ------------------------------------------------------------------ CLI


def train_flags_present(exclude) -> list[str]:
    """``--name=value`` of every train.py flag given on the command line (or in a flag file)."""
    train_module_flags = FLAGS.flags_by_module_dict().get(train.__name__, [])
    return [f.serialize() for f in train_module_flags if f.present and f.name not in exclude]


def grid_from_flags() -> dict[str, list[float]]:
    """The grid of the parsed flags: given lists, else the 1-3 ladder around train.py's value."""
    config = train.resolve_config()  # train.py's own defaults for this problem and optimizer
    problem, optimizer = config["problem"], config["optimizer"]
    tuned = common.tuned_flags(problem, optimizer)
    damping = common.damping_flag(optimizer)
    axes = [("learning_rate", "learning_rates"), (damping, "dampings")]
    axes.append(("weight_decay", "weight_decays"))
    grid = {}
    for name, list_flag in axes:
        given = FLAGS[list_flag].value
        if given is not None:
            if name is None:
                raise ValueError(f"--{list_flag}: --optimizer={optimizer} has no damping to tune")
            grid[name] = common.parse_grid(given, list_flag, allow_zero=name == "weight_decay")
        elif name in tuned:
            if config[name] == 0:
                print(
                    f"note: {problem}/{optimizer} has no default {name}: it stays 0; "
                    f"pass --{list_flag} to search it"
                )
            grid[name] = common.log_grid(config[name], FLAGS.grid_points_each_side)
    return grid


def main(argv):
    runtime.quiet_tensorflow_logging(FLAGS["verbosity"].present)
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    try:
        if FLAGS["output_dir"].present:
            raise ValueError("--output_dir: each trial writes to PROJECT/trial_N/run")
        grid = grid_from_flags()
        exclude = {"problem", "optimizer", *common.RUN_FLAGS, *grid}
        result = run_sweep(
            FLAGS.problem,
            FLAGS.optimizer,
            grid,
            train_flags=train_flags_present(exclude),
            directory=FLAGS.directory,
            project_name=FLAGS.project_name,
        )
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    if result is None:
        print("No trial completed.", file=sys.stderr)
        sys.exit(1)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    app.run(main)
