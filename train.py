r"""Train one problem of the paper's zoo with one optimizer: one run = one command.

    python train.py                                   # TNT on the digits autoencoder (offline)
    python train.py --problem=digits_classifier --optimizer=adam
    python train.py --problem=mnist_autoencoder --optimizer=tnt --data_dir=~/tensorflow_datasets
    python train.py --flagfile=best.flags             # e.g. a tuning result

A run writes to ``--output_dir``: ``flags.json`` (every resolved setting), ``history.csv`` (one
row per epoch: training loss, the smoothed minibatch training loss the paper tunes on,
validation loss/accuracy, learning rate, training/wall/process seconds), TensorBoard logs under
``tensorboard/``, a checkpoint after every epoch (``checkpoint-EPOCH.keras`` + ``state.json``) and
``summary.json`` at the end. Started again with the same ``--output_dir`` it resumes from the last
checkpoint, with the optimizer's statistics, step counter and the data order intact, and says so
("Resuming from DIR/checkpoint-00003.keras after step 45 (end of epoch 3)"). A state.json whose
checkpoint is missing is refused; ``--overwrite`` starts a fresh run there instead.
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
import os
import re
import shutil
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

# TensorFlow's C++ log lines: "I0000 00:00:17.5  4326 port.cc:153] ..." (absl) or
# "2025-01-01 12:00:00.1: I tensorflow/...cc:32] ..." (older releases); the letter is the severity.
_NATIVE_LOG_LINE = re.compile(
    r"^(?:([IWEF])\d{4} \d\d:\d\d:[\d.]+\s+\d+ [^\]\s]+\] "
    r"|\d{4}-\d\d-\d\d [\d:.]+: ([IWEF]) [^\]\s]+\] )"
)
_ABSL_PREAMBLE = "WARNING: All log messages before absl::InitializeLog() is called"


def filter_native_log(text: str, min_level: int) -> str:
    """``text`` (C++ stderr) without the log records below ``min_level`` (TF_CPP_MIN_LOG_LEVEL:
    0 INFO, 1 WARNING, 2 ERROR, 3 FATAL) and, from level 1 up, without absl's preamble line
    ("All log messages before absl::InitializeLog() ..."). A record's continuation lines go
    with it; every other line stays."""
    kept, keep = [], True
    for line in text.splitlines(keepends=True):
        match = _NATIVE_LOG_LINE.match(line)
        if match:
            keep = "IWEF".index(match.group(1) or match.group(2)) >= min_level
        elif line.startswith(_ABSL_PREAMBLE):
            keep = min_level < 1
        if keep:
            kept.append(line)
    return "".join(kept)


@contextlib.contextmanager
def _native_start_up_lines_filtered():
    """TensorFlow's import at the level TF_CPP_MIN_LOG_LEVEL asks for.

    TensorFlow 2.21 logs "oneDNN custom operations are on ..." (INFO), headed by absl's "All log
    messages before absl::InitializeLog() ..." line, from two of its shared libraries (loaded by
    ``tensorflow.python`` and by ``tensorflow.python.profiler``), each with its own absl log
    state, and neither follows TF_CPP_MIN_LOG_LEVEL: every command printed both twice before
    its first line. This captures the C++ stderr (file descriptor 2) of the import and writes
    back what :func:`filter_native_log` keeps; Python's own output (warnings, tracebacks) goes to
    the terminal directly, through a ``sys.stderr`` on a copy of descriptor 2 that stays open:
    TensorFlow's logging handler keeps the ``sys.stderr`` it finds at import. Nothing to do when
    TensorFlow is already imported.
    """
    if "tensorflow" in sys.modules or sys.stderr is None:
        yield
        return
    try:
        min_level = int(os.environ.get("TF_CPP_MIN_LOG_LEVEL", "0"))
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError, AttributeError):
        yield
        return
    python_stderr = sys.stderr
    with tempfile.TemporaryFile() as capture:
        os.dup2(capture.fileno(), 2)
        sys.stderr = open(os.dup(saved), "w", buffering=1, errors="backslashreplace")
        try:
            yield
        finally:
            sys.stderr.flush()  # not closed: handlers made during the import write to it
            sys.stderr = python_stderr
            os.dup2(saved, 2)
            os.close(saved)
            capture.seek(0)
            kept = filter_native_log(capture.read().decode(errors="replace"), min_level)
            if kept:
                sys.stderr.write(kept)
                sys.stderr.flush()


with _native_start_up_lines_filtered():
    import keras  # noqa: E402
    import tensorflow as tf  # noqa: E402

from absl import app  # noqa: E402
from absl import flags  # noqa: E402

import keras_tnt  # noqa: E402
from models import data  # noqa: E402
from models import registry  # noqa: E402
from models import runtime  # noqa: E402

FLAGS = flags.FLAGS

flags.DEFINE_enum("problem", "digits_autoencoder", sorted(registry.PROBLEMS), "Problem to train.")
flags.DEFINE_enum("optimizer", "tnt", list(registry.OPTIMIZERS), "Optimizer.")
flags.DEFINE_float("learning_rate", None, "Learning rate (default: the problem's best).")
flags.DEFINE_float(
    "damping", None, "Damping > 0: TNT/Shampoo ε; KFAC λ, √λ per factor (default: problem's best)."
)
flags.DEFINE_float(
    "momentum", 0.9, "Momentum β in [0, 1) (TNT, TNT-EF, Shampoo, KFAC and SGD; Muon keeps 0.95)."
)
flags.DEFINE_float(
    "epsilon", None, "Adam's ε, also where Adam is grafted (default: the problem's best)."
)
flags.DEFINE_float("weight_decay", None, "Decoupled weight decay λ >= 0: W *= 1 - lr*λ.")
flags.DEFINE_integer("batch_size", None, "Minibatch size (default: the paper's).")
flags.DEFINE_integer("epochs", None, "Epochs (default: the paper's).")
flags.DEFINE_float("time_budget_s", None, "Stop after this much training time (0: none).")
flags.DEFINE_integer("lr_decay_epochs", None, "Staircase decay every N epochs (0: constant).")
flags.DEFINE_float("lr_decay_factor", None, "Factor of the staircase decay, in (0, 1].")
flags.DEFINE_integer("curvature_update_period", None, "TNT's T1 (statistics every T1 steps).")
flags.DEFINE_integer("inverse_update_period", None, "TNT's T2 (inverses every T2 steps).")
flags.DEFINE_boolean("warm_start", True, "TNT: warm-start the statistics before training.")
flags.DEFINE_integer("warm_start_batches", 0, "Warm-start batches (0: one pass over the data).")
flags.DEFINE_float("loss_smoothing", 0.99, "Decay of the smoothed minibatch loss, in [0, 1).")
flags.DEFINE_integer("steps_per_epoch", 0, "Limit the steps of an epoch (0: the whole data set).")
flags.DEFINE_integer(
    "seed", 0, "Seed of weights, data order, augmentation and target draws, in [0, 2**31)."
)
flags.DEFINE_string("output_dir", None, "Run directory (default: runs/PROBLEM-OPTIMIZER-sSEED).")
flags.DEFINE_boolean(
    "overwrite",
    False,
    "Start a fresh run even if --output_dir holds one, deleting its checkpoints, state.json, "
    "history.csv, summary.json and TensorBoard logs. Without it, a directory with a checkpoint "
    "resumes, and one whose state.json names a checkpoint that is missing is refused.",
)
flags.DEFINE_string("data_dir", None, "tensorflow-datasets data directory.")
flags.DEFINE_string("faces_path", None, "Path of newfaces_rot_single.mat (FACES problem).")
flags.DEFINE_boolean(
    "jit_compile",
    None,
    "Compile the training step with XLA (default: off on TensorFlow, where XLA is slower on "
    "CPU; on with JAX, whose steps are always jax.jit-compiled unless this is False).",
)
flags.DEFINE_enum(
    "strategy",
    "default",
    ["default", "mirrored", "multi_worker"],
    "How to distribute. TensorFlow: a tf.distribute strategy; multi_worker: run this command on "
    "every worker, each with its TF_CONFIG (docs/guide/distributed.md). JAX: multi_worker runs "
    "one process per host (or per device group) under JAX's distributed runtime: run this "
    "command on every process, each with KERAS_DISTRIBUTION_JOB_ADDRESSES (the coordinator's "
    "host:port), KERAS_DISTRIBUTION_NUM_PROCESSES and its own KERAS_DISTRIBUTION_PROCESS_ID "
    "(docs/guide/jax.md); mirrored is TensorFlow's only.",
)
flags.DEFINE_integer(
    "checkpoint_every_steps",
    0,
    "With --strategy=multi_worker (either backend): also checkpoint every N steps (0: after "
    "every epoch only); a killed run resumes from the latest, mid-epoch.",
)
flags.DEFINE_float(
    "connect_timeout_s",
    300.0,
    "With --strategy=multi_worker: seconds to wait for every worker/process to join; past it "
    "the command stops with a message naming the coordinator (no silent hang).",
)
flags.DEFINE_integer(
    "checkpoint_every_epochs",
    1,
    "Save the checkpoint every N epochs (and after the last one); a killed run resumes from the "
    "latest and repeats at most N - 1 epochs. Raise it for runs of many short epochs.",
)
flags.DEFINE_integer(
    "validation_freq",
    1,
    "Evaluate on the test split every N epochs (and after the last one); the other history rows "
    "leave the validation columns empty.",
)
flags.DEFINE_integer("verbose", 1, "Keras verbosity: 0 silent, 1 progress bar, 2 one line/epoch.")


def _positive(name, allow_zero=False):
    def check(value):
        return value is None or value > 0 or (allow_zero and value == 0)

    bound = ">= 0" if allow_zero else "> 0"
    flags.register_validator(name, check, message=f"--{name} must be {bound}")


for _name in ("learning_rate", "damping", "epsilon", "batch_size", "epochs"):
    _positive(_name)
for _name in ("weight_decay", "time_budget_s", "lr_decay_epochs", "warm_start_batches"):
    _positive(_name, allow_zero=True)
for _name in ("curvature_update_period", "inverse_update_period"):
    _positive(_name)
_positive("steps_per_epoch", allow_zero=True)
_positive("checkpoint_every_epochs")
_positive("validation_freq")
flags.register_validator("momentum", lambda v: 0 <= v < 1, message="--momentum must be in [0, 1)")
flags.register_validator(
    "loss_smoothing", lambda v: 0 <= v < 1, message="--loss_smoothing must be in [0, 1)"
)
flags.register_validator(
    "lr_decay_factor",
    lambda v: v is None or 0 < v <= 1,
    message="--lr_decay_factor must be in (0, 1]",
)
flags.register_validator("verbose", lambda v: v in (0, 1, 2), message="--verbose must be 0, 1 or 2")
# NumPy's global seed takes [0, 2**32); the JAX step puts the seed of the Fisher draws in an int32.
flags.register_validator(
    "seed", lambda v: 0 <= v < 2**31, message="--seed must be in [0, 2**31) (0 to 2147483647)"
)


# ----------------------------------------------------------------- settings


def resolve_config() -> dict:
    """Every setting of the run: the flags, with the problem's defaults filled in."""
    problem = registry.get(FLAGS.problem)
    opt = FLAGS.optimizer
    defaults = problem.defaults.get(opt) or problem.defaults.get(
        "tnt" if opt == "tnt_ef" else "", {}
    )
    first_order = opt not in registry.SECOND_ORDER

    def pick(flag, default):
        value = getattr(FLAGS, flag)
        return default if value is None else value

    decay_epochs = 0
    if problem.lr_decay_epochs:
        decay_epochs = problem.lr_decay_epochs["first_order" if first_order else "second_order"]
    epochs = problem.first_order_epochs if first_order and problem.first_order_epochs else None
    config = {
        "problem": problem.name,
        "optimizer": opt,
        "learning_rate": pick("learning_rate", defaults.get("learning_rate", 1e-3)),
        "damping": pick("damping", defaults.get("damping", 0.1)),
        "momentum": FLAGS.momentum,
        "epsilon": pick("epsilon", defaults.get("epsilon", 1e-7)),
        "weight_decay": pick("weight_decay", defaults.get("weight_decay", 0.0)),
        "batch_size": pick("batch_size", problem.batch_size),
        "epochs": pick("epochs", epochs or problem.epochs),
        # Workers must stop at the same step: no wall-clock budget across several workers.
        "time_budget_s": (
            0.0
            if FLAGS.strategy == "multi_worker"
            else pick("time_budget_s", problem.time_budget_s or 0.0)
        ),
        "lr_decay_epochs": pick("lr_decay_epochs", decay_epochs),
        "lr_decay_factor": pick("lr_decay_factor", problem.lr_decay_factor),
        "curvature_update_period": pick("curvature_update_period", problem.curvature_update_period),
        "inverse_update_period": pick("inverse_update_period", problem.inverse_update_period),
        "warm_start": FLAGS.warm_start and not first_order,
        "warm_start_batches": FLAGS.warm_start_batches,
        "loss_smoothing": FLAGS.loss_smoothing,
        "steps_per_epoch": FLAGS.steps_per_epoch,
        "seed": FLAGS.seed,
        "data_dir": FLAGS.data_dir,
        "faces_path": FLAGS.faces_path,
        "jit_compile": (
            FLAGS.jit_compile if FLAGS.jit_compile is not None else keras.backend.backend() == "jax"
        ),
        "strategy": FLAGS.strategy,
        "checkpoint_every_steps": FLAGS.checkpoint_every_steps,
        "checkpoint_every_epochs": FLAGS.checkpoint_every_epochs,
        "validation_freq": FLAGS.validation_freq,
        "output_dir": FLAGS.output_dir
        or os.path.join("runs", f"{problem.name}-{opt}-s{FLAGS.seed}"),
    }
    return config


def make_optimizer(config: dict, model=None, problem=None) -> keras.optimizers.Optimizer:
    """The run's optimizer. ``model``: the model it trains (Muon keeps its output layer on
    AdamW, as Keras' documentation advises); ``problem``: the run's registry entry (default:
    looked up from ``config``)."""
    wd = config["weight_decay"] or None
    lr = config["learning_rate"]
    if config["optimizer"] in registry.SECOND_ORDER:
        kronecker_settings = {
            "learning_rate": lr,
            "damping": config["damping"],
            "momentum": config["momentum"],
            "curvature_update_period": config["curvature_update_period"],
            "inverse_update_period": config["inverse_update_period"],
            "weight_decay": wd,
        }
        # tnt_graft_adam etc.: TNT or Shampoo with Adam's or SGD-m's per-tensor step length.
        name, grafting = registry.GRAFTED.get(config["optimizer"], (config["optimizer"], None))
        kronecker_settings["grafting"] = grafting
        if grafting == "adam":
            kronecker_settings["grafting_epsilon"] = config["epsilon"]
        if name == "kfac":
            return keras_tnt.KFAC(**kronecker_settings)
        if name == "shampoo":
            problem = problem or registry.get(config["problem"])
            return keras_tnt.Shampoo(
                **kronecker_settings,
                refresh_at_inverse_period_only=problem.shampoo_refresh_at_inverse_period_only,
            )
        return keras_tnt.TNT(**kronecker_settings, empirical_fisher=name == "tnt_ef")
    if config["optimizer"] == "adam":
        # Standard Adam with decoupled weight decay (the paper's release squares the
        # bias-corrected momentum instead of the gradient; see docs/guide/reproduction.md).
        return keras.optimizers.AdamW(
            learning_rate=lr, weight_decay=wd or 0.0, epsilon=config["epsilon"]
        )
    if config["optimizer"] == "muon":
        return make_muon(lr, wd, model)
    # Keras' SGD: v <- βv - αg, W <- W + v, the paper's m <- βm + g, W <- W - αm at constant α.
    return keras.optimizers.SGD(learning_rate=lr, momentum=config["momentum"], weight_decay=wd)


def make_muon(learning_rate, weight_decay, model=None) -> keras.optimizers.Muon:
    """Keras' own Muon as a Keras user would set it up: its recommended momentum 0.95
    (Nesterov), 5 Newton-Schulz steps and Moonlight's ``rms_rate=0.2`` (so AdamW's learning
    rate); AdamW on every tensor that is not 2-D (biases, convolution kernels: Keras' rule) and
    on the output layer (Keras' advice). Weight decay, Muon's and its AdamW part's alike, is
    the problem's (none on the autoencoders, as for every other optimizer there) instead of
    Keras' default 0.004."""
    exclude = []
    if model is not None and model.layers:
        exclude = [f"^{re.escape(v.path)}$" for v in model.layers[-1].trainable_variables]
    return keras.optimizers.Muon(
        learning_rate=learning_rate,
        weight_decay=weight_decay,
        adam_weight_decay=weight_decay,
        exclude_layers=exclude,
    )


def learning_rate_at(config: dict, epoch: int) -> float:
    every = config["lr_decay_epochs"]
    if not every:
        return config["learning_rate"]
    return config["learning_rate"] * config["lr_decay_factor"] ** (epoch // every)


# ---------------------------------------------------------------- callbacks


class RunProgbar(keras.callbacks.ProgbarLogger):
    """Keras' progress bar headed with the run's epoch count ("Epoch 3/30"): train.py calls
    ``fit`` one epoch at a time, so Keras' own header would read "Epoch 3/3"."""

    def __init__(self, epochs: int, budget: float | None = None):
        super().__init__()
        self.run_epochs, self.budget = epochs, budget

    def set_params(self, params):
        super().set_params(params)
        self.epochs = 1  # Keras prints no header of its own for one epoch; ours follows

    def on_epoch_begin(self, epoch, logs=None):
        super().on_epoch_begin(epoch, logs)
        if self.verbose:
            budget = f" (or a time budget of {self.budget:g} s)" if self.budget else ""
            print(f"Epoch {epoch + 1}/{self.run_epochs}{budget}", flush=True)


class RunLog(keras.callbacks.Callback):
    """Training time, the smoothed minibatch loss, and the time budget."""

    def __init__(self, state: dict, config: dict):
        super().__init__()
        self.state = state
        self.decay = config["loss_smoothing"]
        self.budget = config["time_budget_s"]

    def on_epoch_begin(self, epoch, logs=None):
        self._previous_mean = 0.0

    def on_train_batch_begin(self, batch, logs=None):
        self._start = time.perf_counter()

    def on_train_batch_end(self, batch, logs=None):
        self.state["train_seconds"] += time.perf_counter() - self._start
        self.state["steps"] += 1
        # Keras logs the running mean of the epoch; recover this minibatch's loss from it.
        mean = float(logs["loss"])
        loss = (batch + 1) * mean - batch * self._previous_mean
        self._previous_mean = mean
        ema = self.state["smoothed_raw"] = (
            self.decay * self.state["smoothed_raw"] + (1 - self.decay) * loss
        )
        self.state["smoothed_loss"] = ema / (1 - self.decay ** self.state["steps"])
        if math.isfinite(self.state["smoothed_loss"]):
            self.state["best_smoothed_loss"] = min(
                self.state["best_smoothed_loss"], self.state["smoothed_loss"]
            )
        if self.budget and self.state["train_seconds"] >= self.budget:
            self.model.stop_training = True


# -------------------------------------------------------------------- run


def _load_json(path):
    with open(path) as f:
        return json.load(f)


def _write_json(path, obj):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
    os.replace(tmp, path)


def _truncate_history(path, epochs_done):
    """Drops rows of epochs after the checkpoint (a kill can land between row and checkpoint)."""
    if not os.path.exists(path):
        return
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        return
    with open(path + ".tmp", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(r for r in rows if int(r["epoch"]) <= epochs_done)
    os.replace(path + ".tmp", path)


def _new_model(config, problem):
    model = problem.build()
    model.fisher_seed = config["seed"]
    model.compile(
        optimizer=make_optimizer(config, model, problem),
        loss=problem.loss(),
        metrics=["accuracy"] if problem.classifier else None,
        jit_compile=config["jit_compile"],
    )
    return model


class SetupError(Exception):
    """The distributed setup is missing, malformed, or the other processes cannot be reached:
    the command line prints the message and exits with status 2."""


class RunDirectoryError(app.UsageError):
    """The output directory holds a run this command must not resume or write over. The
    command line prints the message alone (not the flags' help) and exits with status 2."""


def _check_settings(out, config):
    """A run directory holds one run: resuming with other settings is refused."""
    path = os.path.join(out, "flags.json")
    if not os.path.exists(path):
        return
    saved = _load_json(path)
    changed = {
        k: (saved.get(k), v)
        for k, v in config.items()
        if k
        not in (
            "epochs",
            "time_budget_s",
            "verbose",
            "checkpoint_every_steps",
            "checkpoint_every_epochs",
            "validation_freq",
        )
        and saved.get(k) != v
    }
    if changed:
        raise RunDirectoryError(
            f"{out} holds a run with other settings {changed}; use another --output_dir."
        )


def _append_row(path, row):
    new_file = not os.path.exists(path)
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(row), extrasaction="ignore")
        if new_file:
            writer.writeheader()
        writer.writerow(row)


def _budget_spent(config, state) -> bool:
    return bool(config["time_budget_s"]) and state["train_seconds"] >= config["time_budget_s"]


def _dataset(config, problem, split, epoch=0):
    return data.load(
        problem.dataset,
        split,
        config["batch_size"],
        data_dir=config["data_dir"],
        faces_path=config["faces_path"],
        target=problem.target,
        seed=config["seed"] * 100_003 + epoch,
        shuffle=split == "train",
        # One pipeline per epoch, seeded by the epoch: the same order however often it is
        # iterated (Keras' JAX trainer iterates once to build the model before training), so
        # a resumed run sees the order an uninterrupted one does.
        reshuffle_each_iteration=False,
    )


def resume_line(path, step, epochs_done, step_in_epoch=0) -> str:
    """What a resumed run prints first: the checkpoint and where in the run it continues."""
    where = (
        f"step {step_in_epoch} of epoch {epochs_done + 1}"
        if step_in_epoch
        else f"end of epoch {epochs_done}"
    )
    return f"Resuming from {path} after step {step} ({where})"


def _delete_run(out):
    """``--overwrite``: removes what a run wrote to ``out`` (nothing else there)."""
    names = ("state.json", "history.csv", "summary.json", "flags.json", "checkpoint.tmp.keras")
    for name in os.listdir(out):
        if name in names or re.fullmatch(r"checkpoint-s?\d+\.keras", name):
            os.remove(os.path.join(out, name))
    shutil.rmtree(os.path.join(out, "tensorboard"), ignore_errors=True)


def run(config: dict, overwrite: bool | None = None) -> dict:
    """Trains (or resumes) the run of ``config``; ``overwrite`` (default: the flag) starts it
    afresh, deleting a run in the directory."""
    out = config["output_dir"]
    # JAX across processes (--strategy=multi_worker): join the others first, before anything
    # touches a device; process 0 (the chief) writes the run directory, the others read it.
    processes = config["strategy"] == "multi_worker" and keras.backend.backend() == "jax"
    chief = True
    if processes:
        from keras_tnt import multi_process

        try:
            multi_process.initialize(
                timeout=FLAGS.connect_timeout_s if FLAGS.is_parsed() else 300.0
            )
        except (ValueError, RuntimeError) as error:
            raise SetupError(str(error)) from None
        chief = multi_process.is_chief()
        local = multi_process.local_batches
    else:
        local = lambda dataset: dataset  # noqa: E731
    os.makedirs(out, exist_ok=True)
    problem = registry.get(config["problem"])
    state_path = os.path.join(out, "state.json")
    history_path = os.path.join(out, "history.csv")
    # state.json names the checkpoint it belongs to and is replaced atomically after that
    # checkpoint is complete, so a kill at any moment leaves a consistent pair.
    saved_state = _load_json(state_path) if os.path.exists(state_path) else None
    if overwrite is None:
        overwrite = FLAGS.overwrite if FLAGS.is_parsed() else False
    if overwrite:
        _delete_run(out)
        saved_state = None
    elif saved_state is not None:
        # A kill cannot lose it (state.json is replaced only after its checkpoint is complete):
        # it was deleted, or the directory was copied without it. Starting afresh here would
        # write a new run over the old one's history.
        checkpoint = os.path.join(out, saved_state.get("checkpoint") or "")
        if not os.path.isfile(checkpoint):
            raise RunDirectoryError(
                f"{state_path} names the checkpoint {checkpoint}, which is missing, so the run in "
                f"{out} cannot be resumed. Restore that file to resume; or pass --overwrite to "
                "start a fresh run there (it deletes the old run's history.csv, state.json, "
                "summary.json, checkpoints and TensorBoard logs); or use another --output_dir."
            )
    resumed = saved_state is not None
    if resumed:
        _check_settings(out, config)
    elif chief:  # history rows of a run killed before its first checkpoint: that run starts again
        _truncate_history(history_path, 0)
    if chief:
        _write_json(os.path.join(out, "flags.json"), config)

    # Before anything random: tf.data's seeded shuffles also depend on the global seed, and a
    # resumed run must see the data order an uninterrupted one would.
    keras.utils.set_random_seed(config["seed"])
    # Fail fast (within seconds) if the data set is not there.
    test_data = _dataset(config, problem, "test")

    strategy = (
        tf.distribute.MirroredStrategy()
        if config["strategy"] == "mirrored"
        else tf.distribute.get_strategy()
    )
    with strategy.scope():
        if resumed:
            checkpoint = os.path.join(out, saved_state["checkpoint"])
            model = keras.models.load_model(checkpoint)
            state = saved_state
            step = int(keras.ops.convert_to_numpy(model.optimizer.iterations))
            print(
                resume_line(checkpoint, step, state["epochs_done"], state.get("step_in_epoch", 0)),
                flush=True,
            )
            if chief:
                _truncate_history(history_path, state["epochs_done"])
        else:
            model = _new_model(config, problem)
            state = {
                "epochs_done": 0,
                "steps": 0,
                "train_seconds": 0.0,
                "wall_seconds": 0.0,
                "process_seconds": 0.0,
                "smoothed_raw": 0.0,
                "smoothed_loss": float("nan"),
                "best_smoothed_loss": float("inf"),
                "warm_start_seconds": 0.0,
            }
    if not resumed and config["warm_start"]:
        steps = config["warm_start_batches"] or None
        print(f"Warm start over {steps or 'one pass of'} training batches")
        warm_start_begin = time.perf_counter()
        verbose = FLAGS.verbose if FLAGS.is_parsed() else 0
        model.warm_start(
            local(_dataset(config, problem, "train", epoch=-1)),
            steps=steps,
            verbose=verbose == 1 and chief,
        )
        # Its own tracing included; not part of train_seconds (see docs/reproduction).
        state["warm_start_seconds"] = time.perf_counter() - warm_start_begin

    log = RunLog(state, config)
    callbacks = [log]
    if chief:
        callbacks.append(keras.callbacks.TensorBoard(os.path.join(out, "tensorboard")))
        callbacks.append(RunProgbar(config["epochs"], config["time_budget_s"]))

    def save_checkpoint(name):
        """The chief saves the model (with its optimizer state) as ``name``, then state.json.
        Every process takes part in a save (reading the variables of several processes is a
        collective): the others save to a temporary file and delete it."""
        if not chief:
            with tempfile.TemporaryDirectory() as scratch:
                model.save(os.path.join(scratch, name))
            return
        model.save(os.path.join(out, "checkpoint.tmp.keras"))
        os.replace(os.path.join(out, "checkpoint.tmp.keras"), os.path.join(out, name))
        previous = state.get("checkpoint")
        state["checkpoint"] = name
        _write_json(state_path, state)
        if previous and previous != name and os.path.exists(os.path.join(out, previous)):
            os.remove(os.path.join(out, previous))

    every = config.get("checkpoint_every_steps") or 0

    class StepCheckpoint(keras.callbacks.Callback):
        """Every ``--checkpoint_every_steps`` steps: a checkpoint within the epoch."""

        def __init__(self, epoch, first_step):
            super().__init__()
            self.epoch, self.first_step = epoch, first_step

        def on_train_batch_end(self, batch, logs=None):
            if not every or state["steps"] % every:
                return
            if batch + 1 == self.params.get("steps"):
                return  # the epoch's last step: its end checkpoints right after
            if keras.backend.backend() == "jax":
                self.model.jax_state_sync()  # fit keeps the state apart until the epoch's end
            state["epochs_done"] = self.epoch
            state["step_in_epoch"] = self.first_step + batch + 1
            save_checkpoint(f"checkpoint-s{state['steps']:08d}.keras")

    verbose = (FLAGS.verbose if FLAGS.is_parsed() else 0) if chief else 0
    evaluator = []

    def evaluate() -> dict:
        """The test split's metrics. Across JAX processes the chief evaluates a copy of the
        model on one of its devices, over every test example (a last batch that does not split
        evenly over the devices could not be fed to all of them), the others nothing."""
        if not processes:
            return model.evaluate(test_data, verbose=0, return_dict=True)
        weights = model.get_weights()  # every process takes part in reading them
        if not chief:
            return {}
        distribution = keras.distribution.distribution()
        keras.distribution.set_distribution(None)
        try:
            if not evaluator:
                copy = problem.build()
                copy.compile(
                    loss=problem.loss(), metrics=["accuracy"] if problem.classifier else None
                )
                evaluator.append(copy)
            evaluator[0].set_weights(weights)
            return evaluator[0].evaluate(test_data, verbose=0, return_dict=True)
        finally:
            keras.distribution.set_distribution(distribution)

    columns = None
    start_wall, start_process = time.time(), time.process_time()
    wall0, process0 = state["wall_seconds"], state["process_seconds"]
    for epoch in range(state["epochs_done"], config["epochs"]):
        if config["time_budget_s"] and state["train_seconds"] >= config["time_budget_s"]:
            break
        lr = learning_rate_at(config, epoch)
        model.optimizer.learning_rate = lr
        # The last epoch of a time budget is only known at its end: a budget run validates
        # at every validation_freq-th epoch and after the budget ran out (below).
        validate = (epoch + 1) % config.get("validation_freq", 1) == 0 or epoch + 1 == config[
            "epochs"
        ]
        # A run resumed from a checkpoint within this epoch skips the steps it had done.
        done = state.get("step_in_epoch", 0) if epoch == state["epochs_done"] else 0
        train = _dataset(config, problem, "train", epoch)
        steps_per_epoch = config["steps_per_epoch"] or None
        if done:
            train = train.skip(done)
            steps_per_epoch = steps_per_epoch and steps_per_epoch - done
        history = model.fit(
            local(train),
            initial_epoch=epoch,
            epochs=epoch + 1,
            steps_per_epoch=steps_per_epoch,
            validation_data=test_data if validate and not processes else None,
            shuffle=False,  # the pipeline shuffles, seeded per epoch
            callbacks=callbacks + [StepCheckpoint(epoch, done)],
            verbose=verbose,
        )
        state["epochs_done"] = epoch + 1
        state["step_in_epoch"] = 0
        state["wall_seconds"] = wall0 + time.time() - start_wall
        state["process_seconds"] = process0 + time.process_time() - start_process
        row = {"epoch": epoch + 1, "learning_rate": lr}
        # Validation columns in every row (empty when not validated), in Keras' order.
        row.update({f"val_{k}": "" for k in history.history if not k.startswith("val_")})
        row.update({k: v[-1] for k, v in history.history.items()})
        if processes and validate:
            row.update({f"val_{k}": v for k, v in evaluate().items()})
        elif not validate and (model.stop_training or _budget_spent(config, state)):
            # The budget ended this run: its last row gets the validation metrics too.
            row.update({f"val_{k}": v for k, v in evaluate().items()})
        row.update(
            {
                k: state[k]
                for k in ("smoothed_loss", "train_seconds", "wall_seconds", "process_seconds")
            }
        )
        if chief:
            new_file = not os.path.exists(history_path)
            if columns is None:  # the file's own header when it has one (a resumed run)
                columns = list(row) if new_file else next(csv.reader(open(history_path)))
            with open(history_path, "a", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
                if new_file:
                    writer.writeheader()
                writer.writerow(row)
        last = epoch + 1 == config["epochs"] or model.stop_training or _budget_spent(config, state)
        if (epoch + 1) % config["checkpoint_every_epochs"] and not last:
            continue
        save_checkpoint(f"checkpoint-{epoch + 1:05d}.keras")
        if model.stop_training:
            break

    rows = []  # the chief's history (another process does not read it: it may be being written)
    if chief and os.path.exists(history_path):
        rows = list(csv.DictReader(open(history_path)))
    summary = {
        "problem": config["problem"],
        "optimizer": config["optimizer"],
        "epochs": state["epochs_done"],
        "steps": state["steps"],
        "train_seconds": state["train_seconds"],
        "wall_seconds": state["wall_seconds"],
        "warm_start_seconds": state.get("warm_start_seconds", 0.0),
        "final_loss": float(rows[-1]["loss"]) if rows else None,
        "best_smoothed_loss": state["best_smoothed_loss"],
        "final_val_loss": float(rows[-1]["val_loss"]) if rows and "val_loss" in rows[-1] else None,
    }
    if problem.classifier and rows:
        summary["final_val_accuracy"] = float(rows[-1]["val_accuracy"])
        summary["best_val_accuracy"] = max(float(r["val_accuracy"]) for r in rows)
    optimizer = getattr(model, "statistics_optimizer", None)
    if optimizer is not None:
        summary["skipped_updates"] = optimizer.skipped_updates
        summary["failed_inversions"] = optimizer.failed_inversions
    if processes:
        summary["processes"] = multi_process.process_count()
    if not chief:
        return None
    _write_json(os.path.join(out, "summary.json"), summary)
    return summary


def run_multi_worker(config: dict) -> dict | None:
    """``--strategy=multi_worker``: this process is one worker of ``TF_CONFIG``'s cluster.

    keras_tnt.multi_worker.DistributedTrainer runs the steps (``fit`` does not work under
    MultiWorkerMirroredStrategy). The chief writes the run directory (flags.json, history.csv,
    TensorBoard, checkpoints, summary.json); the other workers read its checkpoints to resume and
    write nothing there. Returns the summary on the chief, None elsewhere.
    """
    from keras_tnt import multi_worker

    out = config["output_dir"]
    chief = multi_worker.is_chief()
    tf.get_logger().setLevel("WARNING")  # not one INFO line per collective
    strategy = multi_worker.strategy_from_tf_config(
        timeout=FLAGS.connect_timeout_s if FLAGS.is_parsed() else 300.0
    )
    if chief:
        os.makedirs(out, exist_ok=True)
        _check_settings(out, config)
        _write_json(os.path.join(out, "flags.json"), config)
    keras.utils.set_random_seed(config["seed"])
    problem = registry.get(config["problem"])
    test_data = _dataset(config, problem, "test")
    with strategy.scope():
        model = _new_model(config, problem)
    trainer = multi_worker.DistributedTrainer(
        model, strategy, out, checkpoint_every_steps=config["checkpoint_every_steps"] or None
    )
    if trainer.restored_from:
        step = int(keras.ops.convert_to_numpy(trainer.model.optimizer.iterations))
        where = (trainer.state["epoch"], trainer.state["step_in_epoch"])
        print(resume_line(trainer.restored_from, step, *where), flush=True)
    elif config["warm_start"]:
        print(f"Warm start over {config['warm_start_batches'] or 'one pass of'} training batches")
    state = trainer.state.setdefault(
        "log",
        {"steps": 0, "train_seconds": 0.0, "smoothed_raw": 0.0, "smoothed_loss": float("nan")},
    )
    state.setdefault("best_smoothed_loss", float("inf"))
    history_path = os.path.join(out, "history.csv")
    if chief:
        _truncate_history(history_path, trainer.state["epoch"])

    class EpochEnd(keras.callbacks.Callback):
        """Learning rate per epoch; validation (every worker); the history row (chief)."""

        def on_epoch_begin(self, epoch, logs=None):
            self.model.optimizer.learning_rate = learning_rate_at(config, epoch)

        def on_epoch_end(self, epoch, logs=None):
            val = trainer.evaluate(test_data)
            if not chief:
                return
            row = {"epoch": epoch + 1, "learning_rate": learning_rate_at(config, epoch)}
            row.update(logs or {})
            row.update({f"val_{k}": v for k, v in val.items()})
            row.update({k: state[k] for k in ("smoothed_loss", "train_seconds")})
            _append_row(history_path, row)

    callbacks = [RunLog(state, config), EpochEnd()]
    if chief:
        callbacks.append(keras.callbacks.TensorBoard(os.path.join(out, "tensorboard")))
    warm_start = None
    if config["warm_start"]:
        warm_start = lambda: _dataset(config, problem, "train", epoch=-1)  # noqa: E731
    trainer.fit(
        lambda epoch: _dataset(config, problem, "train", epoch),
        epochs=config["epochs"],
        steps_per_epoch=config["steps_per_epoch"] or None,
        callbacks=callbacks,
        verbose=FLAGS.verbose if FLAGS.is_parsed() else 0,
        warm_start_fn=warm_start,
        warm_start_steps=config["warm_start_batches"] or None,
    )
    if not chief:
        return None
    rows = list(csv.DictReader(open(history_path))) if os.path.exists(history_path) else []
    summary = {
        "problem": config["problem"],
        "optimizer": config["optimizer"],
        "workers": strategy.num_replicas_in_sync,
        "epochs": trainer.state["epoch"],
        "steps": trainer.state["steps"],
        "train_seconds": state["train_seconds"],
        "final_loss": float(rows[-1]["loss"]) if rows else None,
        "best_smoothed_loss": state["best_smoothed_loss"],
        "final_val_loss": float(rows[-1]["val_loss"]) if rows else None,
    }
    if problem.classifier and rows:
        summary["final_val_accuracy"] = float(rows[-1]["val_accuracy"])
    _write_json(os.path.join(out, "summary.json"), summary)
    return summary


def main(argv):
    runtime.quiet_tensorflow_logging(FLAGS["verbosity"].present)
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    if FLAGS.strategy == "mirrored" and keras.backend.backend() != "tensorflow":
        raise app.UsageError(
            f"--strategy=mirrored is a tf.distribute strategy and needs KERAS_BACKEND=tensorflow "
            f"(the backend is {keras.backend.backend()!r}). On JAX, --strategy=multi_worker runs "
            "several processes; see docs/guide/jax.md."
        )
    if FLAGS.strategy == "multi_worker" and FLAGS.time_budget_s:
        raise app.UsageError(
            "--time_budget_s cannot be used with --strategy=multi_worker: every worker must "
            "stop at the same step, and their clocks differ. Use --epochs / --steps_per_epoch."
        )
    if not FLAGS.connect_timeout_s > 0:
        raise app.UsageError(
            f"--connect_timeout_s must be > 0; received {FLAGS.connect_timeout_s}."
        )
    if FLAGS.checkpoint_every_steps < 0:
        raise app.UsageError("--checkpoint_every_steps must be >= 0.")
    if FLAGS.checkpoint_every_steps and FLAGS.strategy != "multi_worker":
        raise app.UsageError("--checkpoint_every_steps needs --strategy=multi_worker.")
    if FLAGS.overwrite and FLAGS.strategy == "multi_worker":
        raise app.UsageError(
            "--overwrite cannot be used with --strategy=multi_worker (the other workers read the "
            "chief's directory to resume); delete the run directory or use another --output_dir."
        )
    if FLAGS.checkpoint_every_epochs != 1 and FLAGS.strategy == "multi_worker":
        raise app.UsageError(
            "--checkpoint_every_epochs is for one process; with --strategy=multi_worker the "
            "chief checkpoints every epoch and every --checkpoint_every_steps steps."
        )
    config = resolve_config()
    try:
        if config["strategy"] == "multi_worker" and keras.backend.backend() == "tensorflow":
            summary = run_multi_worker(config)
        else:
            summary = run(config)
    except (data.DataUnavailableError, RunDirectoryError, SetupError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    if summary is not None:
        print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    app.run(main)
