"""tuning/: grids, a resumable KerasTuner sweep driving train.py, the reproduction table math."""

import csv
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from models import registry
from tuning import common
from tuning import reproduce
from tuning import results
from tuning import sweep

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def parsed_flags():
    """Parses absl flags as a command line would (train.py's and tuning's), then resets them."""
    sweep.FLAGS.unparse_flags()

    def parse(*args):
        sweep.FLAGS.unparse_flags()
        sweep.FLAGS(["prog", *args])

    yield parse
    sweep.FLAGS.unparse_flags()


# ------------------------------------------------------------------ grids


def test_log_grid_steps_along_the_authors_one_three_ladder():
    assert common.log_grid(1e-4) == [3e-5, 1e-4, 3e-4]
    assert common.log_grid(3e-4, 2) == [3e-5, 1e-4, 3e-4, 1e-3, 3e-3]
    assert common.log_grid(10.0) == [3.0, 10.0, 30.0]
    assert common.log_grid(0.1, 0) == [0.1]
    assert common.log_grid(0.0) == [0.0]  # no published weight decay: stays 0
    assert common.log_grid(5e-4) == [1.58e-4, 5e-4, 1.58e-3]  # off the ladder: half decades
    with pytest.raises(ValueError, match="points_each_side"):
        common.log_grid(1e-3, -1)


def test_default_grids_are_centred_on_the_registry_values(parsed_flags):
    parsed_flags("--problem=mnist_autoencoder", "--optimizer=tnt")
    assert sweep.grid_from_flags() == {
        "learning_rate": [3e-5, 1e-4, 3e-4],
        "damping": [0.03, 0.1, 0.3],
    }
    parsed_flags("--problem=mnist_autoencoder", "--optimizer=adam")  # Adam's damping is ε
    assert sweep.grid_from_flags() == {
        "learning_rate": [3e-5, 1e-4, 3e-4],
        "epsilon": [3e-5, 1e-4, 3e-4],
    }
    parsed_flags("--problem=mnist_autoencoder", "--optimizer=sgd")
    assert sweep.grid_from_flags() == {"learning_rate": [1e-3, 3e-3, 1e-2]}
    # Keras' Muon: its learning rate only (AdamW's, the Moonlight scaling), around Adam's.
    parsed_flags("--problem=mnist5k_autoencoder", "--optimizer=muon")
    assert sweep.grid_from_flags() == {"learning_rate": [3e-5, 1e-4, 3e-4]}
    parsed_flags("--problem=cifar10_resnet32", "--optimizer=muon")
    assert sweep.grid_from_flags() == {
        "learning_rate": [3e-4, 1e-3, 3e-3],
        "weight_decay": [3e-5, 1e-4, 3e-4],
    }
    parsed_flags("--problem=cifar10_resnet32", "--optimizer=tnt", "--grid_points_each_side=2")
    assert sweep.grid_from_flags() == {
        "learning_rate": [1e-5, 3e-5, 1e-4, 3e-4, 1e-3],
        "weight_decay": [1.0, 3.0, 10.0, 30.0, 100.0],
    }
    # Given lists replace an axis; --learning_rate moves the centre of the default one.
    parsed_flags(
        "--problem=cifar10_resnet32", "--optimizer=sgd", "--learning_rate=0.1", "--dampings=0.01"
    )
    with pytest.raises(ValueError, match="--dampings: --optimizer=sgd has no damping"):
        sweep.grid_from_flags()
    parsed_flags("--problem=cifar10_resnet32", "--optimizer=sgd", "--learning_rate=0.1")
    assert sweep.grid_from_flags()["learning_rate"] == [0.03, 0.1, 0.3]


@pytest.mark.parametrize(
    "values, flag, message",
    [
        (["1e-3", "x"], "learning_rates", "--learning_rates: 'x' is not a number"),
        (["0"], "dampings", "--dampings: every value must be finite and > 0"),
        (["-1"], "weight_decays", "--weight_decays: every value must be finite and >= 0"),
        (["1e-3", "0.001"], "learning_rates", "--learning_rates: '0.001' is listed twice"),
    ],
)
def test_bad_grid_values_name_the_flag(values, flag, message):
    with pytest.raises(ValueError, match=message):
        common.parse_grid(values, flag, allow_zero=flag == "weight_decays")


def test_sweep_refuses_flags_it_sets_per_trial(tmp_path):
    grid = {"learning_rate": [1e-3]}
    for line in ("--output_dir=x", "--learning_rate=0.1", "--optimizer=adam"):
        with pytest.raises(ValueError, match="not allowed"):
            sweep.run_sweep("digits_autoencoder", "tnt", grid, [line], directory=str(tmp_path))
    with pytest.raises(ValueError, match="--optimizer=rmsprop is unknown"):
        sweep.run_sweep("digits_autoencoder", "rmsprop", grid, directory=str(tmp_path))


# ------------------------------------------------------------------ sweep


def test_best_trial_breaks_ties_by_the_earliest_grid_point():
    from types import SimpleNamespace as Trial

    trials = [
        Trial(trial_id="2", status="COMPLETED", score=0.99),
        Trial(trial_id="10", status="COMPLETED", score=0.99),
        Trial(trial_id="1", status="FAILED", score=None),
        Trial(trial_id="3", status="COMPLETED", score=0.5),
    ]
    assert sweep.best_trial(trials, "max").trial_id == "2"
    assert sweep.best_trial(trials, "min").trial_id == "3"
    assert sweep.best_trial(trials[2:3], "min") is None


def _trial(project, trial_id):
    return json.load(open(os.path.join(project, f"trial_{trial_id}", "trial.json")))


def test_sweep_resumes_after_a_kill_and_its_best_flags_drive_train_py(tmp_path):
    directory = str(tmp_path / "sweeps")
    project = os.path.join(directory, "digits_autoencoder-tnt")
    epochs = 8
    budget = [f"--epochs={epochs}", "--steps_per_epoch=3"]
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=ROOT)
    command = [sys.executable, "-m", "tuning.sweep", "--problem=digits_autoencoder"]
    command += ["--learning_rates=1e-3,3e-3", "--dampings=0.1", f"--directory={directory}"]
    process = subprocess.Popen(
        command + budget,
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # the sweep and its train.py: one process group to kill
    )
    second_state = os.path.join(project, "trial_1", "run", "state.json")
    deadline = time.monotonic() + 150
    try:
        while time.monotonic() < deadline and process.poll() is None:
            if os.path.exists(second_state) and json.load(open(second_state))["epochs_done"] >= 1:
                break
            time.sleep(0.05)
    finally:
        os.killpg(process.pid, signal.SIGKILL)  # no chance to clean up
        process.wait()
    assert _trial(project, "0")["status"] == "COMPLETED"
    assert _trial(project, "1")["status"] == "RUNNING"
    assert json.load(open(second_state))["epochs_done"] < epochs  # interrupted mid-trial
    first_summary = os.path.join(project, "trial_0", "run", "summary.json")
    first_mtime = os.stat(first_summary).st_mtime_ns

    # Started again (here in-process, with the settings the command line gave).
    best = sweep.run_sweep(
        "digits_autoencoder",
        "tnt",
        {"learning_rate": [1e-3, 3e-3], "damping": [0.1]},
        budget,
        directory=directory,
        verbose=0,
    )
    oracle = json.load(open(os.path.join(project, "oracle.json")))
    assert oracle["end_order"] == ["0", "1"] and not oracle["ongoing_trials"]
    assert [_trial(project, i)["status"] for i in "01"] == ["COMPLETED", "COMPLETED"]
    assert not os.path.exists(os.path.join(project, "trial_2"))
    # Trial 0 was not run again; trial 1 was started twice and resumed from its checkpoint.
    assert common.launches(os.path.join(project, "trial_0", "train.log")) == 1
    assert os.stat(first_summary).st_mtime_ns == first_mtime
    log = open(os.path.join(project, "trial_1", "train.log")).read()
    assert common.launches(os.path.join(project, "trial_1", "train.log")) == 2
    assert "Warm start" not in log.split(common.LAUNCH_MARK)[-1]
    rows = list(csv.DictReader(open(os.path.join(project, "trial_1", "run", "history.csv"))))
    assert [int(r["epoch"]) for r in rows] == list(range(1, epochs + 1))
    trials = list(csv.DictReader(open(os.path.join(project, "trials.csv"))))
    assert [(t["trial"], t["status"]) for t in trials] == [("0", "COMPLETED"), ("1", "COMPLETED")]
    scores = [float(t["best_smoothed_loss"]) for t in trials]
    assert best["completed_trials"] == 2 and best["score"] == min(scores)
    assert best["trial"] == str(int(np.argmin(scores)))

    # A completed sweep started again runs nothing.
    assert (
        sweep.run_sweep(
            "digits_autoencoder",
            "tnt",
            {"learning_rate": [1e-3, 3e-3], "damping": [0.1]},
            budget,
            directory=directory,
            verbose=0,
        )
        == best
    )
    assert common.launches(os.path.join(project, "trial_1", "train.log")) == 2

    # The best flag file drives train.py as it is, and gives the number the sweep ranked.
    run_dir = str(tmp_path / "best")
    result = subprocess.run(
        [sys.executable, "train.py", f"--flagfile={best['flagfile']}", f"--output_dir={run_dir}"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    written = json.load(open(os.path.join(run_dir, "flags.json")))
    for name, value in best["hyperparameters"].items():
        assert written[name] == value, name
    assert written["epochs"] == epochs and written["steps_per_epoch"] == 3
    assert json.load(open(os.path.join(run_dir, "summary.json")))["epochs"] == epochs
    _, history = results.plot.read_run(run_dir)
    np.testing.assert_allclose(min(history["smoothed_loss"]), best["score"], rtol=1e-6)


# ------------------------------------------------------------- reproduce


def _write_run(run_dir, optimizer, seed, columns, classifier):
    os.makedirs(run_dir, exist_ok=True)
    config = {"optimizer": optimizer, "seed": seed, "problem": "x", "learning_rate": 0.01}
    config.update({"damping": 0.1, "epsilon": 1e-7, "weight_decay": 0.0})
    with open(os.path.join(run_dir, "flags.json"), "w") as f:
        json.dump(config, f)
    names = list(columns)
    with open(os.path.join(run_dir, "history.csv"), "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(names)
        writer.writerows(zip(*(columns[n] for n in names), strict=True))
    with open(os.path.join(run_dir, "summary.json"), "w") as f:
        json.dump({"steps": 3 * int(columns["epoch"][-1]) + seed}, f)  # train.py's step count


def _synthetic_history(rng, epochs, classifier):
    columns = {
        "epoch": np.arange(1, epochs + 1),
        "train_seconds": np.cumsum(rng.uniform(0.5, 1.5, epochs)),
        "wall_seconds": np.cumsum(rng.uniform(1.0, 2.0, epochs)),
        "loss": rng.uniform(10, 50, epochs),
        "smoothed_loss": rng.uniform(10, 50, epochs),
        "val_loss": rng.uniform(10, 50, epochs),
    }
    if classifier:
        columns["val_accuracy"] = rng.uniform(0.5, 1.0, epochs)
    return columns


@pytest.mark.parametrize("problem", ["digits_autoencoder", "digits_classifier"])
def test_reproduce_table_is_the_mean_and_std_over_seeds(tmp_path, monkeypatch, problem):
    # An optimizer added to the registry later is picked up without any change to tuning/.
    optimizers = (*registry.OPTIMIZERS, "newopt")
    monkeypatch.setattr(registry, "OPTIMIZERS", optimizers)
    classifier = registry.get(problem).classifier
    metric = "val_accuracy" if classifier else "smoothed_loss"
    extra = "loss" if classifier else "val_loss"
    rng = np.random.default_rng(0)
    histories, calls = {}, []

    def fake_train(lines, flagfile, log):
        common.write_flagfile(flagfile, lines)
        values = dict(line[2:].split("=", 1) for line in lines)
        key = (values["optimizer"], int(values["seed"]))
        calls.append((key, lines))
        histories[key] = _synthetic_history(rng, int(rng.integers(3, 7)), classifier)
        _write_run(values["output_dir"], *key, histories[key], classifier)
        return 0

    best_dir = tmp_path / "sweeps"
    (best_dir / f"{problem}-adam").mkdir(parents=True)
    common.write_flagfile(
        str(best_dir / f"{problem}-adam" / "best.flags"),
        [f"--problem={problem}", "--optimizer=adam", "--epochs=99", "--seed=7"]
        + ["--learning_rate=0.5", "--epsilon=0.001"],
        comments=["a sweep's best"],
    )
    output = str(tmp_path / "report" / problem)
    kwargs = dict(
        best_dir=str(best_dir),
        train_flags=["--epochs=4"],
        runs_dir=str(tmp_path / "runs"),
        runner=fake_train,
        targets=["adam_final"],
    )
    rows = reproduce.reproduce(problem, [0, 1, 2], output, **kwargs)

    assert [r["optimizer"] for r in rows] == list(optimizers)
    assert sorted(k for k, _ in calls) == sorted((o, s) for o in optimizers for s in range(3))
    adam_lines = [lines for (o, _), lines in calls if o == "adam"][0]
    assert "--learning_rate=0.5" in adam_lines and "--epsilon=0.001" in adam_lines
    assert "--epochs=99" not in adam_lines and "--seed=7" not in adam_lines  # budget: ours
    assert adam_lines.index("--learning_rate=0.5") < adam_lines.index("--epochs=4")
    assert all("--learning_rate=0.5" not in lines for (o, _), lines in calls if o != "adam")
    by_optimizer = {r["optimizer"]: r for r in rows}
    assert by_optimizer["adam"]["source"].startswith("sweep")
    assert by_optimizer["tnt"]["source"] == "registry defaults"

    with open(output + ".csv") as f:
        table = {r["optimizer"]: r for r in csv.DictReader(f)}
    assert set(table) == set(optimizers)
    for optimizer in optimizers:
        runs = [histories[(optimizer, s)] for s in range(3)]
        best = [(max if classifier else min)(h[metric]) for h in runs]
        expected = {
            f"final_{metric}": [h[metric][-1] for h in runs],
            f"best_{metric}": best,
            f"final_{extra}": [h[extra][-1] for h in runs],
            "epochs": [h["epoch"][-1] for h in runs],
            "steps": [3 * h["epoch"][-1] + s for s, h in enumerate(runs)],
            "train_seconds": [h["train_seconds"][-1] for h in runs],
            "wall_seconds": [h["wall_seconds"][-1] for h in runs],
        }
        for key, values in expected.items():
            np.testing.assert_allclose(float(table[optimizer][f"{key}_mean"]), np.mean(values))
            np.testing.assert_allclose(
                float(table[optimizer][f"{key}_std"]), np.std(values, ddof=1)
            )
        assert int(table[optimizer]["seeds"]) == 3

    # Time to Adam's mean final value, by hand: tracing = first epoch - median later epoch.
    adam_final = np.mean([histories[("adam", s)][metric][-1] for s in range(3)])
    targets = {r["optimizer"]: r for r in csv.DictReader(open(output + "_targets.csv"))}
    for optimizer in optimizers:
        assert float(targets[optimizer]["target_value"]) == pytest.approx(adam_final)
        hits = []
        for s in range(3):
            h = histories[(optimizer, s)]
            values = np.asarray(h[metric])
            reached = np.flatnonzero(values >= adam_final if classifier else values <= adam_final)
            if reached.size:
                per_epoch = np.diff(h["train_seconds"], prepend=0)
                tracing = max(0.0, per_epoch[0] - np.median(per_epoch[1:]))
                hits.append(h["train_seconds"][reached[0]] - tracing)
        assert int(targets[optimizer]["reached"]) == len(hits)
        if hits:
            assert float(targets[optimizer]["seconds_mean"]) == pytest.approx(np.mean(hits))

    markdown = open(output + ".md").read()
    assert "| Adam | 3 | 0.01 |" in markdown  # the fake runs' flags.json say lr 0.01
    assert f"![{problem}]({problem}.png)" in markdown
    assert os.path.getsize(output + ".png") > 10_000
    assert len(list(csv.DictReader(open(output + "_runs.csv")))) == 3 * len(optimizers)

    # Started again: every run is done, none is repeated.
    calls.clear()
    reproduce.reproduce(problem, [0, 1, 2], output, **kwargs)
    assert calls == []
    # Other flags for runs that exist: refused before anything runs.
    with pytest.raises(ValueError, match="--runs_dir: .*adam-s0.* hold runs with other flags"):
        reproduce.reproduce(problem, [0], output, **dict(kwargs, train_flags=["--epochs=5"]))
    assert calls == []


def test_mean_curves_against_numpy():
    rng = np.random.default_rng(1)
    runs = []
    for seed, epochs in enumerate((4, 6, 5)):
        history = _synthetic_history(rng, epochs, classifier=False)
        history = {k: np.asarray(v, dtype=float) for k, v in history.items()}
        runs.append(results.Run("tnt", seed, {}, history))
    x, mean, std = results.curve_by_epoch(runs, "loss")
    stack = np.stack([r.history["loss"][:4] for r in runs])
    np.testing.assert_array_equal(x, [1, 2, 3, 4])  # epochs every seed reached
    np.testing.assert_allclose(mean, stack.mean(0))
    np.testing.assert_allclose(std, stack.std(0, ddof=1))
    t, mean, std = results.curve_by_time(runs, "loss", points=7)
    # Against training time without each run's tracing (first epoch - median later epoch).
    seconds = []
    for r in runs:
        per_epoch = np.diff(r.history["train_seconds"], prepend=0)
        tracing = max(0.0, per_epoch[0] - np.median(per_epoch[1:]))
        seconds.append(r.history["train_seconds"] - tracing)
    assert t[0] == max(s[0] for s in seconds)
    assert t[-1] == min(s[-1] for s in seconds)
    interpolated = np.stack(
        [np.interp(t, s, r.history["loss"]) for s, r in zip(seconds, runs, strict=True)]
    )
    np.testing.assert_allclose(mean, interpolated.mean(0))
    np.testing.assert_allclose(std, interpolated.std(0, ddof=1))
    assert results.mean_std([2.0]) == (2.0, pytest.approx(float("nan"), nan_ok=True))


def _run_with(train_seconds_per_epoch, smoothed_loss):
    history = {
        "epoch": np.arange(1.0, len(smoothed_loss) + 1),
        "train_seconds": np.cumsum(train_seconds_per_epoch),
        "smoothed_loss": np.asarray(smoothed_loss, dtype=float),
        "val_loss": np.asarray(smoothed_loss, dtype=float) + 1.0,
        "wall_seconds": 2 * np.cumsum(train_seconds_per_epoch),
    }
    return results.Run("tnt", 0, {}, history)


def test_tracing_time_and_time_to_target_against_hand_computed_values():
    run = _run_with([3.0, 1.0, 1.2, 0.9, 1.1], [5.0, 4.0, 3.0, 2.5, 2.0])
    # First epoch 3.0 s against the median later epoch 1.05 s: 1.95 s of tracing.
    assert results.tracing_seconds(run) == pytest.approx(1.95)
    np.testing.assert_allclose(
        results.compute_seconds(run), np.cumsum([3.0, 1.0, 1.2, 0.9, 1.1]) - 1.95
    )
    # Loss 3.0 first reached at the end of epoch 3: 3.0 + 1.0 + 1.2 - 1.95 s.
    assert results.time_to_target(run, "smoothed_loss", 3.0) == pytest.approx((3.25, 3.0))
    assert results.time_to_target(run, "smoothed_loss", 1.9) is None
    assert results.time_to_target(run, "smoothed_loss", 4.5, "max") == pytest.approx((1.05, 1.0))
    # One epoch: nothing to compare with.
    single = _run_with([2.0], [1.0])
    assert np.isnan(results.tracing_seconds(single))
    np.testing.assert_allclose(results.compute_seconds(single), [2.0])
    # A curve against time starts at the latest first-epoch end without tracing.
    other = _run_with([2.0, 1.0, 1.0, 1.0, 1.0], [6.0, 5.0, 4.0, 3.0, 2.0])
    t, mean, _ = results.curve_by_time([run, other], "smoothed_loss", points=5)
    assert t[0] == pytest.approx(1.05) and t[-1] == pytest.approx(min(5.25, 5.0))
    np.testing.assert_allclose(
        mean,
        0.5
        * (
            np.interp(t, results.compute_seconds(run), run.history["smoothed_loss"])
            + np.interp(t, results.compute_seconds(other), other.history["smoothed_loss"])
        ),
    )


def test_target_rows_and_bad_targets():
    runs = {
        "tnt": [_run_with([2, 1, 1, 1], [4, 3, 2, 1]), _run_with([2, 1, 1, 1], [4, 3.5, 3, 2.5])],
        "adam": [
            _run_with([1, 1, 1, 1], [4, 3.5, 3.2, 3.0]),
            _run_with([1, 1, 1, 1], [5, 4, 3.4, 3.0]),
        ],
    }
    rows = results.table_rows(runs, "digits_autoencoder")
    targets = results.resolve_targets(["adam_final", "2"], rows, "smoothed_loss")
    assert [v for _, v in targets] == [3.0, 2.0]
    table = {
        (r["optimizer"], r["target_value"]): r
        for r in results.target_rows(runs, "digits_autoencoder", targets)
    }
    # TNT (1 s of tracing: epochs of 2, 1, 1, 1 s) reaches 3.0 at the end of epoch 2 (3 - 1 s)
    # and of epoch 3 (4 - 1 s).
    tnt3 = table[("tnt", 3.0)]
    assert tnt3["reached"] == 2
    assert tnt3["seconds_mean"] == pytest.approx(2.5) and tnt3["epochs_mean"] == pytest.approx(2.5)
    assert tnt3["seconds_std"] == pytest.approx(np.std([2.0, 3.0], ddof=1))
    assert table[("tnt", 2.0)]["reached"] == 1 and table[("adam", 2.0)]["reached"] == 0
    markdown = results.markdown_target_table(
        results.target_rows(runs, "digits_autoencoder", targets)
    )
    assert "not reached (0/2)" in markdown and "1/2 seeds" in markdown
    with pytest.raises(ValueError, match="--targets: 'kfac_final' names no optimizer"):
        results.resolve_targets(["kfac_final"], rows, "smoothed_loss")
    with pytest.raises(ValueError, match="--targets: 'fast' is neither a number"):
        results.resolve_targets(["fast"], rows, "smoothed_loss")
    with pytest.raises(ValueError, match="--targets: 'sgd_final' names no optimizer of this run"):
        reproduce.reproduce(
            "digits_autoencoder", [0], "unused", optimizers=["tnt"], targets=["sgd_final"]
        )


def test_reproduce_end_to_end_matches_train_py_summaries(tmp_path):
    output = str(tmp_path / "digits_classifier")
    rows = reproduce.reproduce(
        "digits_classifier",
        [0, 1],
        output,
        optimizers=["sgd"],
        train_flags=["--epochs=2", "--steps_per_epoch=2"],
        runs_dir=str(tmp_path / "runs"),
    )
    summaries = [
        json.load(open(tmp_path / "runs" / "digits_classifier" / f"sgd-s{s}" / "summary.json"))
        for s in (0, 1)
    ]
    (row,) = rows
    for key in ("final_val_accuracy", "best_val_accuracy", "epochs", "train_seconds"):
        values = [s[key] for s in summaries]
        np.testing.assert_allclose(row[f"{key}_mean"], np.mean(values), rtol=1e-6)
        np.testing.assert_allclose(row[f"{key}_std"], np.std(values, ddof=1), rtol=1e-6, atol=1e-12)
    assert row["epochs_mean"] == 2 and row["learning_rate"] == 0.1  # registry default
    assert os.path.exists(output + ".png") and os.path.exists(output + ".md")


def test_reproduce_command_line_errors_name_the_flag(parsed_flags, tmp_path, capsys):
    parsed_flags("--optimizer=adam", f"--runs_dir={tmp_path}")
    with pytest.raises(SystemExit) as exit_info:
        reproduce.main(["reproduce"])
    assert exit_info.value.code == 2
    assert "--optimizer: reproduce sets it per run" in capsys.readouterr().err
    parsed_flags("--optimizers=tnt,rmsprop", f"--runs_dir={tmp_path}")
    with pytest.raises(SystemExit):
        reproduce.main(["reproduce"])
    assert "--optimizers: rmsprop unknown" in capsys.readouterr().err
