"""What the sweep and the reproduction share: train.py runs, flag files, criteria and grids.

Every run, a sweep's trial or a reproduction's seed, is one ``python train.py --flagfile=FILE``
process: the numbers a sweep ranks are exactly the ones ``train.py`` gives for that flag file.
"""

from __future__ import annotations

import dataclasses
import datetime
import math
import os
import signal
import subprocess
import sys

import numpy as np

from models import registry

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN_PY = os.path.join(ROOT, "train.py")

# train.py flags that say where a run writes and how it reports, not what it computes.
RUN_FLAGS = ("output_dir", "verbose")
# train.py flags that set how long a run is and which seed it uses: a reproduction sets these
# for all optimizers alike, whatever the sweep that chose their hyper-parameters used.
BUDGET_FLAGS = ("epochs", "time_budget_s", "steps_per_epoch", "seed")

LAUNCH_MARK = "=== launch: "
OPTIMIZER_LABELS = {
    "tnt": "TNT",
    "tnt_ef": "TNT-EF",
    "shampoo": "Shampoo",
    "kfac": "KFAC",
    "adam": "Adam",
    "sgd": "SGD-m",
    "muon": "Muon",
    "tnt_graft_adam": "TNT (Adam graft)",
    "tnt_graft_sgd": "TNT (SGD-m graft)",
    "shampoo_graft_adam": "Shampoo (Adam graft)",
}


def label(optimizer: str) -> str:
    """The optimizer's name as the paper writes it (its flag value for unknown ones)."""
    return OPTIMIZER_LABELS.get(optimizer, optimizer)


def damping_flag(optimizer: str) -> str | None:
    """The train.py flag that is this optimizer's damping: ε for Adam, none for SGD and Muon."""
    return {"adam": "epsilon", "sgd": None, "muon": None}.get(optimizer, "damping")


# ---------------------------------------------------------------- criteria


@dataclasses.dataclass(frozen=True)
class Criterion:
    """The paper's selection rule for a problem: the best value of one history.csv column."""

    metric: str  # a history.csv column
    direction: str  # "min" or "max"

    @property
    def objective(self) -> str:
        return f"best_{self.metric}"

    def best(self, values) -> float:
        """Best finite value; a run with none (diverged) gets the worst possible score."""
        values = np.asarray(values, dtype=float)
        finite = values[np.isfinite(values)]
        if self.direction == "min":
            return float(finite.min()) if finite.size else math.inf
        return float(finite.max()) if finite.size else -math.inf


def criterion_for(problem: str) -> Criterion:
    """Autoencoders: the lowest smoothed minibatch training loss within the budget; classifiers:
    the highest validation accuracy (the paper's Sections 6.1 and 6.2)."""
    if registry.get(problem).classifier:
        return Criterion("val_accuracy", "max")
    return Criterion("smoothed_loss", "min")


def tuned_flags(problem: str, optimizer: str) -> tuple[str, ...]:
    """The train.py flags the paper grid-searched: learning rate x damping on the autoencoders,
    learning rate x weight decay on the classifiers."""
    if registry.get(problem).classifier:
        return ("learning_rate", "weight_decay")
    damping = damping_flag(optimizer)
    return ("learning_rate",) if damping is None else ("learning_rate", damping)


# ------------------------------------------------------------------- grids


def _ladder_index(value: float) -> int | None:
    """Position of ``value`` on the 1-3 log ladder (..., 1e-4, 3e-4, 1e-3, ...), if it is on it."""
    decade = math.floor(math.log10(value))
    for step, mantissa in enumerate((1.0, 3.0)):
        for d in (decade - 1, decade, decade + 1):
            if math.isclose(value, mantissa * 10.0**d, rel_tol=1e-9):
                return 2 * d + step
    return None


def _ladder_value(index: int) -> float:
    decade, step = divmod(index, 2)
    return float(f"{(1, 3)[step]}e{decade}")


def log_grid(center: float, points_each_side: int = 1) -> list[float]:
    """The authors' 1-3 log grid (..., 1e-4, 3e-4, 1e-3, 3e-3, ...) centred on ``center``.

    ``points_each_side`` neighbours on each side: ``log_grid(1e-4, 1)`` is ``[3e-5, 1e-4, 3e-4]``.
    A centre off the ladder gets half-decade steps (x sqrt(10)); a centre of 0 (no published
    value, e.g. no weight decay) gives ``[0.0]``.
    """
    if points_each_side < 0:
        raise ValueError(f"points_each_side must be >= 0, got {points_each_side}")
    if not math.isfinite(center) or center < 0:
        raise ValueError(f"A grid centre must be a finite number >= 0, got {center}")
    if center == 0:
        return [0.0]
    offsets = range(-points_each_side, points_each_side + 1)
    index = _ladder_index(center)
    if index is not None:
        return [_ladder_value(index + k) for k in offsets]
    return [float(f"{center * 10 ** (k / 2):.3g}") for k in offsets]


def parse_grid(values, flag: str, allow_zero: bool = False) -> list[float]:
    """Numbers of a list flag (strings or numbers), checked; errors name ``--flag``."""
    grid = []
    for value in values:
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"--{flag}: {value!r} is not a number") from None
        if not math.isfinite(number) or number < 0 or (number == 0 and not allow_zero):
            bound = ">= 0" if allow_zero else "> 0"
            raise ValueError(f"--{flag}: every value must be finite and {bound}, got {value!r}")
        if number in grid:
            raise ValueError(f"--{flag}: {value!r} is listed twice")
        grid.append(number)
    if not grid:
        raise ValueError(f"--{flag}: give at least one value")
    return grid


# -------------------------------------------------------------- flag files


def flag_line(name: str, value) -> str:
    if isinstance(value, float):
        value = repr(value)
    return f"--{name}={value}"


def flag_name(line: str) -> str:
    """``--name=value`` -> ``name`` (``--noname`` of a boolean stays ``noname``)."""
    return line.strip().lstrip("-").split("=", 1)[0]


def read_flagfile(path: str) -> list[str]:
    """The flag lines of an absl flag file (comments and blank lines dropped)."""
    with open(path) as f:
        lines = [line.strip() for line in f]
    return [line for line in lines if line and not line.startswith(("#", "//"))]


def write_flagfile(path: str, lines, comments=()) -> None:
    """Writes an absl flag file (``# comment`` lines first), atomically."""
    text = "".join(f"# {c}\n" for c in comments) + "".join(f"{line}\n" for line in lines)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


# ----------------------------------------------------------------- runs


def _die_with_parent():  # pragma: no cover - runs in the child
    # A killed sweep must not leave its train.py writing into a trial directory that the next
    # sweep resumes (Linux only; elsewhere stop the child by hand).
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def run_train(lines, flagfile: str, log_path: str) -> int:
    """Runs ``python train.py --flagfile=FLAGFILE`` (written from ``lines``) from the repository
    root; its output is appended to ``log_path`` after a launch line. Returns the exit status."""
    write_flagfile(flagfile, lines)
    command = [sys.executable, TRAIN_PY, f"--flagfile={os.path.abspath(flagfile)}"]
    env = dict(os.environ)
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, env.get("PYTHONPATH")) if p)
    with open(log_path, "a") as log:
        now = datetime.datetime.now().isoformat(timespec="seconds")
        log.write(f"{LAUNCH_MARK}{now} {' '.join(command)}\n")
        log.flush()
        process = subprocess.Popen(
            command,
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,
        )
        try:
            return process.wait()
        except BaseException:
            process.kill()
            process.wait()
            raise


def launches(log_path: str) -> int:
    """How many times ``run_train`` started train.py with this log."""
    if not os.path.exists(log_path):
        return 0
    with open(log_path) as f:
        return sum(line.startswith(LAUNCH_MARK) for line in f)


def log_tail(log_path: str, lines: int = 15) -> str:
    if not os.path.exists(log_path):
        return ""
    with open(log_path) as f:
        return "".join(f.readlines()[-lines:])
