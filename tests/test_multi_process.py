"""Keras' JAX backend on two processes (JAX's distributed runtime, Gloo over 127.0.0.1, free
ports, timeouts that kill the children): keras_tnt.multi_process and ``train.py
--strategy=multi_worker`` on JAX, against one process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from keras_tnt import multi_process
from tests.conftest import free_ports
from tests.conftest import wait_all

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _env(port=None, process=None, count=2, **extra):
    env = dict(os.environ, KERAS_BACKEND="jax", PYTHONPATH=ROOT, **extra)
    for name in ("JAX_ENABLE_X64", "XLA_FLAGS", "TF_CONFIG"):
        env.pop(name, None)
    if port is not None:
        env["KERAS_DISTRIBUTION_JOB_ADDRESSES"] = f"127.0.0.1:{port}"
        env["KERAS_DISTRIBUTION_NUM_PROCESSES"] = str(count)
        env["KERAS_DISTRIBUTION_PROCESS_ID"] = str(process)
    return env


def _start(args, env):
    return subprocess.Popen(
        [sys.executable, *map(str, args)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _two(args):
    port = free_ports(1)[0]
    return wait_all([_start(args, _env(port, i)) for i in range(2)])


def test_the_environment_is_checked_and_each_problem_named():
    good = {
        "KERAS_DISTRIBUTION_JOB_ADDRESSES": "10.0.0.1:1234",
        "KERAS_DISTRIBUTION_NUM_PROCESSES": "2",
        "KERAS_DISTRIBUTION_PROCESS_ID": "1",
    }
    assert multi_process.environment(good) == ("10.0.0.1:1234", 2, 1)
    listed = dict(good, KERAS_DISTRIBUTION_JOB_ADDRESSES="h0:1, h1:2")
    assert multi_process.environment(listed) == ("h0:1", 2, 1)  # the first is the coordinator
    cases = [
        (
            {},
            "KERAS_DISTRIBUTION_JOB_ADDRESSES, KERAS_DISTRIBUTION_NUM_PROCESSES, "
            "KERAS_DISTRIBUTION_PROCESS_ID not set",
        ),
        (dict(good, KERAS_DISTRIBUTION_PROCESS_ID=""), "KERAS_DISTRIBUTION_PROCESS_ID not set"),
        (dict(good, KERAS_DISTRIBUTION_NUM_PROCESSES="two"), "must be an integer; received 'two'"),
        (dict(good, KERAS_DISTRIBUTION_NUM_PROCESSES="0"), "NUM_PROCESSES must be >= 1"),
        (dict(good, KERAS_DISTRIBUTION_PROCESS_ID="2"), r"PROCESS_ID must be in \[0, 1\]"),
        (dict(good, KERAS_DISTRIBUTION_JOB_ADDRESSES="10.0.0.1"), "'10.0.0.1' is not host:port"),
        (dict(good, KERAS_DISTRIBUTION_JOB_ADDRESSES="h:99999"), "'h:99999' is not host:port"),
        (dict(good, KERAS_DISTRIBUTION_JOB_ADDRESSES="a:1,b:2,c:3"), "lists 3 addresses but"),
    ]
    for env, message in cases:
        with pytest.raises(ValueError, match=message):
            multi_process.environment(env)


@pytest.mark.parametrize("name", ["tnt", "kfac"])
def test_two_processes_are_identical_and_equal_one_process(tmp_path, name):
    """Float64, a warm start and 2 epochs with a partial last batch (14 = 7 + 7): the two
    processes end bit for bit alike (every weight and optimizer variable), equal to one process
    to 1e-10; the preconditioner work is split, each process's device doing a share."""
    worker = ["-m", "tests.multi_process_worker"]
    port = free_ports(1)[0]
    processes = [_start(worker + [tmp_path / f"p{i}.npz", name], _env(port, i)) for i in range(2)]
    processes.append(_start(worker + [tmp_path / "one.npz", name, "--one"], _env()))
    for code, output in wait_all(processes):
        assert code == 0, output[-3000:]
    first, second, one = (np.load(tmp_path / f) for f in ("p0.npz", "p1.npz", "one.npz"))
    keys = [k for k in one.files if k not in ("work", "process")]
    assert len(keys) > 20 and int(one["steps"]) == 4
    for key in keys:
        np.testing.assert_array_equal(first[key], second[key], err_msg=key)
        scale = max(np.max(np.abs(one[key])), 1e-30)
        assert np.max(np.abs(first[key] - one[key])) <= 1e-10 * scale, key
        assert first[key].dtype == one[key].dtype, key
    # Each process counts the work of its own device (the other row stays zero there).
    assert int(first["process"]) == 0 and int(second["process"]) == 1
    work = first["work"][0] + second["work"][1]
    assert np.all(first["work"][1] == 0) and np.all(second["work"][0] == 0)
    kinds = [0, 2] if name == "kfac" else [0, 1, 2]  # KFAC has no contractions to split
    assert np.all(first["work"][0][kinds] > 0) and np.all(second["work"][1][kinds] > 0), work


def _train_py(out, epochs, extra=()):
    return [
        "train.py",
        "--strategy=multi_worker",
        "--problem=digits_autoencoder",
        "--optimizer=tnt",
        f"--epochs={epochs}",
        "--steps_per_epoch=3",
        "--checkpoint_every_steps=2",
        "--validation_freq=5",
        "--verbose=0",
        f"--output_dir={out}",
        *extra,
    ]


def _final_state(path):
    import keras

    model = keras.models.load_model(path)
    return [np.asarray(w) for w in model.get_weights()] + [
        np.asarray(v) for v in model.optimizer.variables
    ]


def test_train_py_on_two_processes_killed_mid_epoch_resumes_and_ends_where_it_would(tmp_path):
    """`train.py --strategy=multi_worker` on JAX, two processes: process 1 is SIGKILLed once a
    checkpoint within an epoch is saved, process 0 with it; both started again say they resume
    from that checkpoint's step (mid-epoch), and end where an uninterrupted two-process run
    ends, bit for bit. The chief alone writes the run directory and prints the summary."""
    epochs = 10
    full = tmp_path / "full"
    results = _two(_train_py(full, epochs))
    for code, output in results:
        assert code == 0, output[-3000:]
    summary = json.loads((full / "summary.json").read_text())
    assert summary["processes"] == 2 and summary["steps"] == 3 * epochs
    assert np.isfinite(summary["final_val_loss"])
    assert '"final_loss"' in results[0][1] and '"final_loss"' not in results[1][1]
    rows = (full / "history.csv").read_text().splitlines()
    assert len(rows) == epochs + 1

    killed = tmp_path / "killed"
    port = free_ports(1)[0]
    processes = [_start(_train_py(killed, epochs), _env(port, i)) for i in range(2)]
    state_path = killed / "state.json"
    try:
        deadline = time.monotonic() + 300
        state = None
        while time.monotonic() < deadline and processes[1].poll() is None:
            if state_path.exists():
                state = json.loads(state_path.read_text())
                if state.get("step_in_epoch"):
                    break
            time.sleep(0.02)
        processes[1].send_signal(signal.SIGKILL)
        processes[1].wait(timeout=60)
        assert processes[1].returncode == -signal.SIGKILL
    finally:
        for p in processes:
            if p.poll() is None:
                p.kill()
            p.communicate()
    state = json.loads(state_path.read_text())  # the last complete checkpoint's state
    assert 0 < state["step_in_epoch"] < 3 and state["steps"] < 3 * epochs, state
    checkpoint = killed / state["checkpoint"]
    where = f"step {state['step_in_epoch']} of epoch {state['epochs_done'] + 1}"
    for code, output in _two(_train_py(killed, epochs)):
        assert code == 0, output[-3000:]
        assert f"Resuming from {checkpoint} after step {state['steps']} ({where})" in output
        assert "Warm start" not in output
    final = f"checkpoint-{epochs:05d}.keras"
    for a, b in zip(_final_state(killed / final), _final_state(full / final), strict=True):
        np.testing.assert_array_equal(a, b)
    assert json.loads((killed / "summary.json").read_text())["steps"] == 3 * epochs


def test_a_process_that_cannot_reach_the_coordinator_stops_with_a_message(tmp_path):
    """Process 1 of 2 whose coordinator (process 0) never starts: exit status 2 and a message
    naming the coordinator and the variables, within the timeout; no silent hang."""
    port = free_ports(1)[0]
    start = time.monotonic()
    [(code, output)] = wait_all(
        [_start(_train_py(tmp_path / "run", 1, ["--connect_timeout_s=5"]), _env(port, 1))],
        timeout=180,
    )
    assert code == 2, output[-3000:]
    assert f"could not join the coordinator at 127.0.0.1:{port} within 5 s" in output
    assert "KERAS_DISTRIBUTION_JOB_ADDRESSES" in output
    assert time.monotonic() - start < 120
    env = _env()  # no distribution variables at all
    [(code, output)] = wait_all([_start(_train_py(tmp_path / "run2", 1), env)], timeout=180)
    assert code == 2 and "KERAS_DISTRIBUTION_JOB_ADDRESSES" in output and "not set" in output
