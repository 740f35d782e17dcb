"""Two worker processes under MultiWorkerMirroredStrategy on 127.0.0.1 (free ports, a timeout
that kills them), against one process: keras_tnt.multi_worker.DistributedTrainer."""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from keras_tnt import multi_worker
from tests.conftest import free_ports
from tests.conftest import wait_all

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _start(args, tf_config=None, **extra_env):
    env = dict(os.environ, PYTHONPATH=ROOT, KERAS_BACKEND="tensorflow", **extra_env)
    env.pop("TF_CONFIG", None)
    if tf_config is not None:
        env["TF_CONFIG"] = json.dumps(tf_config)
    return subprocess.Popen(
        [sys.executable, "-m", "tests.multi_worker_worker", *map(str, args)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _two_workers(tmp_path, name, optimizers, epochs, **extra_env):
    ports = free_ports(2)
    cluster = {"worker": [f"127.0.0.1:{p}" for p in ports]}
    processes = [
        _start(
            [tmp_path / f"{name}_{i}", tmp_path / f"{name}_ckpt", optimizers, epochs],
            {"cluster": cluster, "task": {"type": "worker", "index": i}},
            **extra_env,
        )
        for i in range(2)
    ]
    return wait_all(processes, timeout=480)


def _worker_temporary_dirs(scratch):
    """What DistributedTrainer's non-chief saves left in their temporary directory."""
    return [p.name for p in scratch.iterdir() if p.name.startswith("keras_tnt_worker_")]


ONE_PROCESS = ("tnt", "shampoo", "kfac")


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """The references: TNT, Shampoo and KFAC, 2 epochs each, in this process (no TF_CONFIG:
    the default strategy, one replica, so nothing split)."""
    from tests import multi_worker_worker

    assert not os.environ.get("TF_CONFIG")
    tmp_path = tmp_path_factory.mktemp("one")
    multi_worker_worker.main(
        str(tmp_path / "one"), str(tmp_path / "one_ckpt"), ",".join(ONE_PROCESS), 2
    )
    return {name: np.load(tmp_path / f"one_{name}.npz") for name in ONE_PROCESS}


def _arrays(npz):
    return [npz[f"arr_{i}"] for i in range(len([k for k in npz.files if k.startswith("arr_")]))]


@pytest.fixture(scope="module")
def two_workers(tmp_path_factory):
    """TNT, Shampoo and KFAC (split) and TNT unsplit, 2 epochs each, on two workers (one
    launch; their temporary directories in ``scratch``)."""
    tmp_path = tmp_path_factory.mktemp("two")
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    optimizers = ",".join(ONE_PROCESS + ("tnt_unsplit",))
    for code, output in _two_workers(tmp_path, "two", optimizers, epochs=2, TMPDIR=str(scratch)):
        assert code == 0, output[-3000:]
    return tmp_path


# Tensors preconditioned per step: 4 kernels and 4 biases (TNT, Shampoo); 4 layers (KFAC).
UNITS = {"tnt": 8, "shampoo": 8, "kfac": 4}


@pytest.mark.parametrize("name", ONE_PROCESS)
def test_two_workers_are_identical_and_equal_one_process(two_workers, one_process, name):
    """Both workers hold the same weights and optimizer variables, equal to the one-process run
    on the same global batches (float64, to reduction-order round-off), partial last batch
    included; the preconditioner work was split between them."""
    one = one_process[name]
    first, second = (np.load(two_workers / f"two_{i}_{name}.npz") for i in range(2))
    assert int(first["steps"]) == int(one["steps"]) == 10  # 5 batches (4 + a partial one) x 2
    for a, b in zip(_arrays(first), _arrays(second), strict=True):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(_arrays(first), _arrays(one), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)
    # Only the chief kept a checkpoint directory: the last checkpoint and its state there, and
    # nothing left of worker 1's copies in its temporary directory.
    assert sorted(os.listdir(two_workers / "two_ckpt" / name)) == [
        "checkpoint-00000010.keras",
        "trainer_state.json",
    ]
    assert not _worker_temporary_dirs(two_workers / "scratch")
    # Together the workers preconditioned every unit once per step, each a part of them.
    work = [ast.literal_eval(str(w["work"]))[0] for w in (first, second)]
    assert work[0]["preconditionings"] + work[1]["preconditionings"] == UNITS[name] * 10
    assert all(w["preconditionings"] > 0 and w["factorizations"] > 0 for w in work)


def test_split_equals_unsplit_on_two_workers_bit_for_bit(two_workers):
    """TNT with the preconditioner work split between the two workers (each preconditions a
    part of the tensors, the other's come through the all-reduce as exact zeros plus the
    owner's value) ends bit-identical, every weight and slot, to TNT unsplit (each worker does
    all of it), on both workers."""
    for i in range(2):
        split = np.load(two_workers / f"two_{i}_tnt.npz")
        unsplit = np.load(two_workers / f"two_{i}_tnt_unsplit.npz")
        assert int(split["steps"]) == int(unsplit["steps"]) == 10
        for a, b in zip(_arrays(split), _arrays(unsplit), strict=True):
            np.testing.assert_array_equal(a, b)
        # One really was split (this worker preconditioned a part of the tensors), the other
        # not (replica_work() counts split work only: none when every replica does all of it).
        assert 0 < ast.literal_eval(str(split["work"]))[0]["preconditionings"] < UNITS["tnt"] * 10
        assert not any(w["preconditionings"] for w in ast.literal_eval(str(unsplit["work"])))


def test_tf_config_errors_name_the_problem():
    with pytest.raises(ValueError, match="TF_CONFIG is not set"):
        multi_worker.parse_tf_config("")
    with pytest.raises(ValueError, match="not valid JSON"):
        multi_worker.parse_tf_config("{cluster")
    with pytest.raises(ValueError, match="'task' object"):
        multi_worker.parse_tf_config('{"cluster": {"worker": ["127.0.0.1:1"]}}')
    with pytest.raises(ValueError, match="out of range"):
        multi_worker.parse_tf_config(
            '{"cluster": {"worker": ["127.0.0.1:1"]}, "task": {"type": "worker", "index": 1}}'
        )
    with pytest.raises(ValueError, match="host:port"):
        multi_worker.parse_tf_config(
            '{"cluster": {"worker": ["nohost"]}, "task": {"type": "worker", "index": 0}}'
        )
    config = multi_worker.parse_tf_config(
        '{"cluster": {"worker": ["a:1", "b:2"]}, "task": {"type": "worker", "index": 1}}'
    )
    assert not multi_worker.is_chief(config)
    config["task"]["index"] = 0
    assert multi_worker.is_chief(config)


def test_a_killed_worker_and_a_restart_end_where_an_uninterrupted_run_ends(tmp_path, one_process):
    """Worker 1 SIGKILLs itself after step 5 (checkpoints every 2 steps); worker 0, blocked in
    the next collective, is killed too; both started again resume from step 4 (statistics,
    step counter, target draws, data order: each says so, with the step counter of the
    optimizer it loaded) and end equal to the uninterrupted run, and to each other."""
    ports = free_ports(2)
    cluster = {"worker": [f"127.0.0.1:{p}" for p in ports]}

    def start(kill_at=None):
        return [
            _start(
                [tmp_path / f"run_{i}", tmp_path / "ckpt", "tnt", 2]
                + ([kill_at] if kill_at is not None else []),
                {"cluster": cluster, "task": {"type": "worker", "index": i}},
            )
            for i in range(2)
        ]

    chief, worker = start(kill_at=5)
    try:
        worker.communicate(timeout=300)
        assert worker.returncode == -9  # SIGKILL
    finally:
        for p in (chief, worker):
            if p.poll() is None:
                p.kill()
            p.communicate()
    state = json.loads((tmp_path / "ckpt" / "tnt" / "trainer_state.json").read_text())
    assert state["steps"] == 4 and state["epoch"] == 0 and state["step_in_epoch"] == 4
    checkpoint = tmp_path / "ckpt" / "tnt" / "checkpoint-00000004.keras"
    for code, output in wait_all(start()):
        assert code == 0, output[-3000:]
        # A fresh start (e.g. a checkpoint not found) would end equal too: the restart must
        # say it continued from step 4, mid-epoch 1, from the chief's checkpoint.
        assert f"tnt: resuming from {checkpoint} after step 4 (step 4 of epoch 1)" in output
        assert "fresh start" not in output
    one = one_process["tnt"]
    chief, worker = (np.load(tmp_path / f"run_{i}_tnt.npz") for i in range(2))
    assert int(chief["steps"]) == int(worker["steps"]) == 10
    for a, b in zip(_arrays(chief), _arrays(worker), strict=True):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(_arrays(chief), _arrays(one), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)


def test_a_trainer_state_naming_a_missing_checkpoint_is_an_error(tmp_path):
    """Not a fresh start over the old run, nor Keras' bare "file not found": the error names
    the state file and the missing checkpoint, and what to do."""
    from tests import multi_worker_worker

    state = {"epoch": 1, "step_in_epoch": 0, "steps": 5, "checkpoint": "checkpoint-00000005.keras"}
    (tmp_path / "trainer_state.json").write_text(json.dumps(state))
    missing = tmp_path / "checkpoint-00000005.keras"
    message = re.escape(f"trainer_state.json names the checkpoint {missing}, which is missing")
    with pytest.raises(FileNotFoundError, match=message):
        multi_worker.DistributedTrainer(multi_worker_worker.build("tnt"), None, str(tmp_path))


def test_a_worker_that_cannot_reach_the_others_exits_with_a_message(tmp_path):
    """Worker 0 of a two-worker cluster whose worker 1 never starts: no silent hang."""
    ports = free_ports(2)
    cluster = {"worker": [f"127.0.0.1:{p}" for p in ports]}
    alone = _start(
        [tmp_path / "alone", tmp_path / "ckpt", "tnt", 1],
        {"cluster": cluster, "task": {"type": "worker", "index": 0}},
        CONNECT_TIMEOUT="8",
    )
    [(code, output)] = wait_all([alone], timeout=120)
    assert code in (-15, -9), output[-3000:]  # stopped by the watchdog
    assert "connecting to the other workers did not finish within 8 s" in output


def _train_py_workers(out, scratch, epochs):
    ports = free_ports(2)
    cluster = {"worker": [f"127.0.0.1:{p}" for p in ports]}
    processes = []
    for i in range(2):
        env = dict(os.environ, PYTHONPATH=ROOT, KERAS_BACKEND="tensorflow", TMPDIR=str(scratch))
        env["TF_CONFIG"] = json.dumps({"cluster": cluster, "task": {"type": "worker", "index": i}})
        processes.append(
            subprocess.Popen(
                [
                    sys.executable,
                    "train.py",
                    "--strategy=multi_worker",
                    "--problem=digits_classifier",
                    "--optimizer=kfac",
                    f"--epochs={epochs}",
                    "--steps_per_epoch=3",
                    "--checkpoint_every_steps=2",
                    "--verbose=0",
                    f"--output_dir={out}",
                ],
                cwd=ROOT,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    (code0, out0), (code1, out1) = wait_all(processes)
    assert code0 == 0 and code1 == 0, (out0[-3000:], out1[-3000:])
    return out0, out1


def test_train_py_on_two_workers_chief_writes_the_run_and_both_resume(tmp_path):
    """`train.py --strategy=multi_worker` on two workers (KFAC, a classifier with accuracy):
    the chief writes the run directory and the summary; worker 1 writes nothing that stays.
    Both started again with --epochs=3 resume from the chief's checkpoint after step 6."""
    out = tmp_path / "run"
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    out0, out1 = _train_py_workers(out, scratch, epochs=2)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["workers"] == 2 and summary["steps"] == 6 and summary["epochs"] == 2
    assert np.isfinite(summary["final_loss"]) and 0 <= summary["final_val_accuracy"] <= 1
    rows = (out / "history.csv").read_text().splitlines()
    assert set(rows[0].split(",")) >= {"loss", "accuracy", "val_loss", "val_accuracy"}
    assert len(rows) == 3
    assert {p.name for p in out.iterdir()} >= {"flags.json", "trainer_state.json", "tensorboard"}
    assert '"final_loss"' in out0 and '"final_loss"' not in out1  # the summary: chief only
    assert not _worker_temporary_dirs(scratch)

    assert "Warm start over one pass of training batches" in out0 and "Resuming" not in out0
    for output in (out0, out1):  # train.py's start-up filter, and TensorFlow's log lines after it
        assert "absl::InitializeLog()" not in output and "--- Logging error ---" not in output

    for output in _train_py_workers(out, scratch, epochs=3):
        # Both continue from the chief's checkpoint of step 6, with that step counter; a fresh
        # start would warm-start again (and, being seeded, end where this ends).
        checkpoint = out / "checkpoint-00000006.keras"
        assert f"Resuming from {checkpoint} after step 6 (end of epoch 2)" in output
        assert "Warm start" not in output
    assert not _worker_temporary_dirs(scratch)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 9 and summary["epochs"] == 3
    assert len((out / "history.csv").read_text().splitlines()) == 4  # one row added
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["steps"] == 9 and state["epoch"] == 3
