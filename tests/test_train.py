"""train.py end to end: outputs, kill-and-resume, bad flags, missing data, the tfds path."""

import csv
import json
import os
import re
import subprocess
import sys
import time

import keras
import numpy as np
import pytest
from absl import app
from absl import flags

import keras_tnt  # noqa: F401  (registers FisherModel and TNT for load_model)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _env():
    """A user's environment: train.py's own TF_CPP_MIN_LOG_LEVEL default, not the suite's."""
    env = dict(os.environ, PYTHONPATH=ROOT)
    env.pop("TF_CPP_MIN_LOG_LEVEL", None)
    return env


def _train(*args, timeout=300, verbose="--verbose=0"):
    return subprocess.run(
        [sys.executable, os.path.join(ROOT, "train.py"), *filter(None, [verbose]), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        env=_env(),
    )


def _state(run_dir):
    checkpoint = json.load(open(os.path.join(run_dir, "state.json")))["checkpoint"]
    model = keras.models.load_model(os.path.join(run_dir, checkpoint))
    return [np.array(w) for w in model.weights] + [np.array(v) for v in model.optimizer.variables]


def test_default_run_writes_everything_and_resumes_exactly(tmp_path, capsys):
    common = ["--steps_per_epoch=4", "--seed=3"]
    straight = str(tmp_path / "straight")
    resumed = str(tmp_path / "resumed")
    result = _train("--epochs=2", f"--output_dir={straight}", *common)
    assert result.returncode == 0, result.stderr[-2000:]
    for name in ("flags.json", "history.csv", "summary.json", "checkpoint-00002.keras"):
        assert os.path.exists(os.path.join(straight, name)), name
    assert os.listdir(os.path.join(straight, "tensorboard"))
    flags_written = json.load(open(os.path.join(straight, "flags.json")))
    assert flags_written["problem"] == "digits_autoencoder"  # the default problem
    assert flags_written["optimizer"] == "tnt"
    rows = list(csv.DictReader(open(os.path.join(straight, "history.csv"))))
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    for column in ("loss", "smoothed_loss", "val_loss", "wall_seconds", "process_seconds"):
        assert np.isfinite(float(rows[-1][column])), column
    summary = json.load(open(os.path.join(straight, "summary.json")))
    assert summary["epochs"] == 2 and summary["steps"] == 8
    assert summary["skipped_updates"] == 0

    # Interrupted after epoch 1, then started again with the same directory (in this process:
    # the command line was checked above, and every launch costs TensorFlow's import).
    _run_in_process("--verbose=0", "--epochs=1", f"--output_dir={resumed}", *common)
    assert "Warm start" in capsys.readouterr().out
    _run_in_process("--verbose=0", "--epochs=2", f"--output_dir={resumed}", *common)
    out = capsys.readouterr().out
    assert "Warm start" not in out  # statistics came from the checkpoint
    checkpoint = os.path.join(resumed, "checkpoint-00001.keras")
    assert f"Resuming from {checkpoint} after step 4 (end of epoch 1)" in out
    for a, b in zip(_state(straight), _state(resumed), strict=True):
        np.testing.assert_array_equal(a, b)

    # Other settings in the same directory are refused.
    with pytest.raises(app.UsageError, match="other settings"):
        _run_in_process("--epochs=2", "--learning_rate=0.5", f"--output_dir={resumed}", *common)


def test_killed_run_resumes_to_the_uninterrupted_result(tmp_path, capsys):
    """SIGKILLed after epoch 3 or later, started again: it says it continues from the last
    checkpoint with that step counter (no warm start: a fresh start of this seeded run would end
    equal too) and ends bit-identical to the uninterrupted run."""
    common = ["--epochs=12", "--steps_per_epoch=5", "--seed=1"]
    straight, killed = str(tmp_path / "straight"), str(tmp_path / "killed")
    process = subprocess.Popen(
        [sys.executable, os.path.join(ROOT, "train.py"), "--verbose=0", f"--output_dir={killed}"]
        + common,
        cwd=ROOT,
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    state_path = os.path.join(killed, "state.json")
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and process.poll() is None:
        if os.path.exists(state_path) and json.load(open(state_path))["epochs_done"] >= 3:
            break
        time.sleep(0.05)
    process.kill()  # SIGKILL: no chance to clean up
    process.wait()
    saved = json.load(open(state_path))
    done = saved["epochs_done"]
    assert 3 <= done < 12  # it really was interrupted, after a checkpoint
    assert saved["steps"] == 5 * done
    capsys.readouterr()
    _run_in_process("--verbose=0", f"--output_dir={killed}", *common)
    out = capsys.readouterr().out
    checkpoint = os.path.join(killed, f"checkpoint-{done:05d}.keras")
    assert f"Resuming from {checkpoint} after step {5 * done} (end of epoch {done})" in out
    assert "Warm start" not in out
    rows = list(csv.DictReader(open(os.path.join(killed, "history.csv"))))
    assert [int(r["epoch"]) for r in rows] == list(range(1, 13))
    _run_in_process("--verbose=0", f"--output_dir={straight}", *common)
    for a, b in zip(_state(straight), _state(killed), strict=True):
        np.testing.assert_array_equal(a, b)


def test_a_bad_flag_exits_nonzero_with_a_message(tmp_path):
    result = _train("--learning_rate=-1", f"--output_dir={tmp_path}")
    assert result.returncode != 0
    assert "--learning_rate must be > 0" in result.stderr


@pytest.mark.parametrize(
    "flag, message",
    [
        ("--problem=imagenet", "--problem"),
        ("--optimizer=rmsprop", "--optimizer"),
        ("--momentum=1.5", "--momentum must be in [0, 1)"),
        ("--curvature_update_period=0", "--curvature_update_period must be > 0"),
        ("--checkpoint_every_epochs=0", "--checkpoint_every_epochs must be > 0"),
        # Not NumPy's "Seed must be between 0 and 2**32 - 1" in a traceback after start-up.
        ("--seed=-1", "--seed must be in [0, 2**31)"),
        ("--seed=2147483648", "--seed must be in [0, 2**31)"),
    ],
)
def test_bad_flags_are_refused_with_a_message(flag, message):
    """What absl prints on the command line (checked once above), here in this process."""
    import train

    train.FLAGS.unparse_flags()
    try:
        with pytest.raises(flags.IllegalFlagValueError, match=re.escape(message)):
            train.FLAGS(["train.py", flag])
    finally:
        train.FLAGS.unparse_flags()


def _run_in_process(*args):
    import train

    train.FLAGS.unparse_flags()
    train.FLAGS(["train.py", *args])
    try:
        return train.run(train.resolve_config())
    finally:
        train.FLAGS.unparse_flags()


def _main_in_process(*args):
    """train.py's main() on these flags, as the command line runs it after parsing them."""
    import logging

    import train

    logger = logging.getLogger("tensorflow")
    saved = (logger.level, logger.propagate)  # main() sets them for the command line
    train.FLAGS.unparse_flags()
    train.FLAGS(["train.py", *args])
    try:
        train.main(["train.py"])
    finally:
        train.FLAGS.unparse_flags()
        logger.setLevel(saved[0])
        logger.propagate = saved[1]


@pytest.mark.parametrize(
    "optimizer, extra",
    [
        ("shampoo", []),
        ("kfac", []),
        ("adam", []),
        ("muon", []),
        ("tnt_graft_adam", []),  # the graft's second moments resume too
        # The staircase halves the learning rate after epoch 1: the resumed epoch is past it.
        ("tnt_ef", ["--lr_decay_epochs=1", "--lr_decay_factor=0.5"]),
    ],
)
def test_every_optimizer_resumes_bit_exactly(tmp_path, optimizer, extra):
    common = [f"--optimizer={optimizer}", "--steps_per_epoch=3", "--verbose=0", *extra]
    straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
    summary = _run_in_process("--epochs=2", f"--output_dir={straight}", *common)
    assert summary["steps"] == 6 and summary.get("skipped_updates", 0) == 0
    warm = json.load(open(os.path.join(straight, "flags.json")))["warm_start"]
    assert warm is (optimizer not in ("adam", "muon"))  # first-order: nothing to warm-start
    _run_in_process("--epochs=1", f"--output_dir={resumed}", *common)
    _run_in_process("--epochs=2", f"--output_dir={resumed}", *common)
    for a, b in zip(_state(straight), _state(resumed), strict=True):
        np.testing.assert_array_equal(a, b)
    rates = [float(r["learning_rate"]) for r in csv.DictReader(open(f"{resumed}/history.csv"))]
    assert len(rates) == 2
    if extra:
        assert rates[1] == 0.5 * rates[0]


def test_checkpoint_every_n_epochs_resumes_from_the_last_one(tmp_path, monkeypatch):
    """Checkpoints at epochs 2, 4 and the last (5); a run that dies in epoch 4 (after epoch 3's
    history row) resumes from epoch 2, drops row 3, and ends equal to a run that saved every
    epoch."""
    import train

    common = ["--epochs=5", "--steps_per_epoch=2", "--verbose=0", "--seed=2"]
    straight, every2 = str(tmp_path / "straight"), str(tmp_path / "every2")
    summary = _run_in_process(f"--output_dir={straight}", *common)
    assert summary["warm_start_seconds"] > 0  # TNT's warm start, timed on its own

    original = train.learning_rate_at

    def dies_in_epoch_4(config, epoch):
        if epoch == 3:
            raise KeyboardInterrupt
        return original(config, epoch)

    monkeypatch.setattr(train, "learning_rate_at", dies_in_epoch_4)
    with pytest.raises(KeyboardInterrupt):
        _run_in_process(f"--output_dir={every2}", "--checkpoint_every_epochs=2", *common)
    assert sorted(f for f in os.listdir(every2) if f.endswith(".keras")) == [
        "checkpoint-00002.keras"
    ]
    assert len(list(csv.DictReader(open(f"{every2}/history.csv")))) == 3
    monkeypatch.setattr(train, "learning_rate_at", original)
    _run_in_process(f"--output_dir={every2}", "--checkpoint_every_epochs=2", *common)
    rows = list(csv.DictReader(open(f"{every2}/history.csv")))
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3, 4, 5]
    assert json.load(open(f"{every2}/state.json"))["checkpoint"] == "checkpoint-00005.keras"
    for a, b in zip(_state(straight), _state(every2), strict=True):
        np.testing.assert_array_equal(a, b)


def test_a_missing_checkpoint_is_refused_and_overwrite_starts_afresh(tmp_path, capsys):
    """state.json names a checkpoint that is gone (deleted, or lost in a copy): train.py refuses,
    naming the file and --overwrite, and leaves the run as it was; with --overwrite it starts a
    fresh run there, the old history, checkpoints and TensorBoard logs gone."""
    common = ["--optimizer=adam", "--steps_per_epoch=2", "--verbose=0", f"--output_dir={tmp_path}"]
    first = _run_in_process("--epochs=2", *common)
    assert first["steps"] == 4
    checkpoint = tmp_path / "checkpoint-00002.keras"
    events = {p.name for p in (tmp_path / "tensorboard").rglob("*") if p.is_file()}
    assert events
    checkpoint.unlink()
    state = (tmp_path / "state.json").read_text()
    history = (tmp_path / "history.csv").read_text()
    capsys.readouterr()
    with pytest.raises(SystemExit) as refused:  # as `python train.py ...` exits
        _main_in_process("--epochs=3", *common)
    assert refused.value.code == 2
    error = capsys.readouterr().err
    assert error.startswith("error: ")  # the message, not the flags' help first
    assert f"names the checkpoint {checkpoint}, which is missing" in error
    assert "--overwrite" in error
    assert (tmp_path / "state.json").read_text() == state  # nothing written
    assert (tmp_path / "history.csv").read_text() == history

    capsys.readouterr()
    summary = _run_in_process("--epochs=1", "--overwrite", *common)
    assert "Resuming" not in capsys.readouterr().out
    assert summary["epochs"] == 1 and summary["steps"] == 2  # not 4 + 2: a fresh run
    rows = list(csv.DictReader(open(tmp_path / "history.csv")))
    assert [int(r["epoch"]) for r in rows] == [1]  # not the old run's rows 1, 2 and then 1
    assert sorted(p.name for p in tmp_path.glob("*.keras")) == ["checkpoint-00001.keras"]
    assert not events & {p.name for p in (tmp_path / "tensorboard").rglob("*") if p.is_file()}
    assert json.load(open(tmp_path / "state.json"))["steps"] == 2

    # Several workers resume from the chief's directory: no --overwrite there.
    with pytest.raises(app.UsageError, match="--overwrite cannot be used with --strategy"):
        _main_in_process("--strategy=multi_worker", "--overwrite", f"--output_dir={tmp_path}")


def test_progress_shows_the_runs_epoch_count(tmp_path, capsys):
    _run_in_process("--epochs=3", "--steps_per_epoch=2", "--verbose=2", f"--output_dir={tmp_path}")
    out = capsys.readouterr().out
    assert [line for line in out.splitlines() if line.startswith("Epoch ")] == [
        "Epoch 1/3",
        "Epoch 2/3",
        "Epoch 3/3",
    ]


def test_missing_data_set_stops_within_seconds(tmp_path):
    empty = str(tmp_path / "tfds")
    os.makedirs(empty)
    start = time.monotonic()
    result = _train(
        "--problem=mnist_autoencoder",
        f"--data_dir={empty}",
        "--output_dir=" + str(tmp_path / "run"),
    )
    elapsed = time.monotonic() - start
    assert result.returncode == 2
    assert "mnist" in result.stderr and empty in result.stderr
    assert elapsed < 60  # TensorFlow's import included; tfds retries would take minutes


def test_tfds_problem_trains_on_mock_data(tmp_path):
    import tensorflow_datasets as tfds

    import train

    train.FLAGS.unparse_flags()
    train.FLAGS(
        [
            "train.py",
            "--problem=figure1_mlp",
            "--epochs=1",
            "--steps_per_epoch=2",
            "--batch_size=8",
            "--warm_start_batches=2",
            f"--output_dir={tmp_path}",
        ]
    )
    try:
        with tfds.testing.mock_data(num_examples=32):
            summary = train.run(train.resolve_config())
    finally:
        train.FLAGS.unparse_flags()
    assert summary["epochs"] == 1 and summary["steps"] == 2
    assert 0.0 <= summary["final_val_accuracy"] <= 1.0


def test_plot_overlays_runs_into_a_png(tmp_path):
    import matplotlib.image

    import plot

    for optimizer, losses in (("tnt", [30.0, 20.0, 15.0]), ("adam", [40.0, 30.0, 25.0])):
        run = tmp_path / optimizer
        run.mkdir()
        (run / "flags.json").write_text(
            json.dumps({"optimizer": optimizer, "seed": 0, "problem": "digits_autoencoder"})
        )
        with open(run / "history.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["epoch", "loss", "train_seconds"])
            for epoch, loss in enumerate(losses, start=1):
                writer.writerow([epoch, loss, 0.5 * epoch])
    output = str(tmp_path / "fig.png")
    assert plot.main([str(tmp_path / "tnt"), str(tmp_path / "adam"), f"--output={output}"]) == 0
    image = matplotlib.image.imread(output)
    assert image.shape[0] > 100 and image.shape[1] > 200
    assert plot.main([str(tmp_path / "tnt"), "--metric=val_accuracy", f"--output={output}"]) == 2
    assert plot.main([str(tmp_path), f"--output={output}"]) == 2


def test_tools_print_tensorflow_log_lines_once_and_from_warning_up(tmp_path):
    import logging

    import train
    from models import runtime

    # `python train.py` as a user runs it (no TF_CPP_MIN_LOG_LEVEL set): TensorFlow 2.21 logs
    # its start-up lines (absl's "All log messages before absl::InitializeLog() ..." and
    # "oneDNN custom operations are on ...") from two libraries, twice, whatever that variable
    # says; train.py keeps them out, so its first line is its own.
    result = _train("--epochs=1", "--steps_per_epoch=1", f"--output_dir={tmp_path}", verbose=None)
    assert result.returncode == 0, result.stderr[-3000:]
    for line in ("absl::InitializeLog()", "oneDNN custom operations"):
        assert line not in result.stderr + result.stdout
    assert result.stdout.splitlines()[0] == "Warm start over one pass of training batches"
    # The filter drops the records below TF_CPP_MIN_LOG_LEVEL (with their continuation lines),
    # not warnings or errors above it, nor other output.
    native = (
        "libfoo: not a log record\n"
        "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR\n"
        "I0000 00:00:1796514810.536450    4326 port.cc:153] oneDNN custom operations are on.\n"
        "I0000 00:00:1796514810.6    4326 cpu_feature_guard.cc:227] This TensorFlow binary\n"
        "To enable the following instructions: AVX2, in other operations, rebuild\n"
        "W0000 00:00:1796514811.1    4326 gpu_device.cc:2344] Cannot dlopen some GPU libraries.\n"
        "2025-09-17 14:44:05.176998: E external/local_xla/cuda_fft.cc:467] Unable to register\n"
    )
    lines = native.splitlines(keepends=True)
    assert train.filter_native_log(native, 0) == native
    assert train.filter_native_log(native, 1) == "".join([lines[0], *lines[5:]])
    assert train.filter_native_log(native, 2) == lines[0] + lines[6]
    assert train.filter_native_log(native, 3) == lines[0]

    logger = logging.getLogger("tensorflow")
    saved = (logger.level, logger.propagate)
    try:
        runtime.quiet_tensorflow_logging()
        assert not logger.propagate  # absl's root handler would print each record again
        assert not logger.isEnabledFor(logging.INFO)
        assert logger.isEnabledFor(logging.WARNING)
        logger.setLevel(logging.NOTSET)
        runtime.quiet_tensorflow_logging(verbosity_flag_present=True)
        assert logger.level == logging.NOTSET  # --verbosity given: absl's threshold holds
    finally:
        logger.setLevel(saved[0])
        logger.propagate = saved[1]


def test_muon_is_keras_muon_with_the_output_layer_and_non_matrices_on_adamw():
    """--optimizer=muon: Keras' own Muon; its AdamW part (a velocity slot) on exactly the tensors
    that are not 2-D and the output layer's, the Muon step on every other kernel; the
    problem's weight decay (none on the autoencoders) instead of Keras' default 0.004."""
    import train
    from models import registry

    model = registry.get("digits_autoencoder").build()
    config = {"optimizer": "muon", "learning_rate": 3e-4, "weight_decay": 0.0}
    optimizer = train.make_optimizer(config, model)
    assert type(optimizer) is keras.optimizers.Muon
    assert optimizer.weight_decay is None and optimizer.adam_weight_decay is None
    assert (optimizer.momentum, optimizer.nesterov, optimizer.rms_rate) == (0.95, True, 0.2)
    optimizer.build(model.trainable_variables)
    output = {id(v) for v in model.layers[-1].trainable_variables}
    kinds = {
        v.path: optimizer.adam_velocities[i] is not None
        for i, v in enumerate(model.trainable_variables)
    }
    expected = {v.path: len(v.shape) != 2 or id(v) in output for v in model.trainable_variables}
    assert kinds == expected
    assert sum(kinds.values()) < len(kinds)  # some kernels do take the Muon step
    # A weight decay given to the run reaches both parts.
    decayed = train.make_optimizer(dict(config, weight_decay=1e-4), model)
    assert decayed.weight_decay == decayed.adam_weight_decay == 1e-4
