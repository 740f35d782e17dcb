"""Training under ``tf.distribute`` without ``model.fit``: several workers, checkpoints, resume.

Keras 3's ``model.fit`` does not run under ``MultiWorkerMirroredStrategy``
(keras-team/keras#20585). :class:`DistributedTrainer` is the loop to use there (and under
``MirroredStrategy`` or one device, where it gives what ``fit`` gives): it runs the model's
own ``train_step`` (a :class:`keras_tnt.FisherModel`'s Fisher step included) through
``strategy.run`` over a dataset from ``distribute_datasets_from_function``, checkpoints the
model with its optimizer state, and resumes from the last checkpoint after a crash::

    strategy = keras_tnt.multi_worker.strategy_from_tf_config()
    with strategy.scope():
        model = build_and_compile()
    trainer = keras_tnt.multi_worker.DistributedTrainer(model, strategy, "ckpt/")
    trainer.fit(lambda epoch: global_batches(epoch), epochs=10)

``dataset_fn(epoch)`` returns that epoch's dataset of GLOBAL batches, the same on every worker
(seed its shuffle by the epoch). Every worker builds it and keeps its replicas' consecutive
slices of each global batch, so an example's position in the global batch, which sets its
target draw, does not depend on the number of workers or replicas: the run on 1, 2 or 8
replicas is the same run, to reduction-order round-off. Each worker reads the whole data set;
for data too large for that, shard files instead and accept that the draws differ.

Only the chief (task ``chief``, or ``worker`` 0 in a cluster without one) writes the
checkpoint directory; the other workers write their copy to a temporary directory and delete it
(every worker must take part in a save, which reads distributed variables). Resuming needs the
chief's directory readable by every worker (one machine, or shared storage).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile

import keras
import tensorflow as tf

__all__ = ["DistributedTrainer", "is_chief", "parse_tf_config", "strategy_from_tf_config"]


# ----------------------------------------------------------------------- cluster


def parse_tf_config(value: str | None = None) -> dict:
    """``TF_CONFIG`` (the environment variable, or ``value``) checked: a clear ValueError if it
    is missing or malformed, else the parsed dict."""
    raw = os.environ.get("TF_CONFIG") if value is None else value
    example = (
        'TF_CONFIG=\'{"cluster": {"worker": ["host1:12345", "host2:12345"]}, '
        '"task": {"type": "worker", "index": 0}}\''
    )
    if not raw:
        raise ValueError(
            f"TF_CONFIG is not set; multi-worker training needs it on every worker, e.g. {example}"
        )
    try:
        config = json.loads(raw)
    except json.JSONDecodeError as error:
        raise ValueError(
            f"TF_CONFIG is not valid JSON ({error}): {raw!r}; e.g. {example}"
        ) from None
    if not isinstance(config, dict) or not isinstance(config.get("cluster"), dict):
        raise ValueError(f"TF_CONFIG needs a 'cluster' object; received {raw!r}; e.g. {example}")
    cluster, task = config["cluster"], config.get("task")
    if not isinstance(task, dict) or "type" not in task or "index" not in task:
        raise ValueError(
            f"TF_CONFIG needs a 'task' object with 'type' and 'index'; received {raw!r}"
        )
    for job, addresses in cluster.items():
        if job not in ("chief", "worker", "evaluator"):
            raise ValueError(
                f"TF_CONFIG cluster job {job!r} is not supported by MultiWorkerMirroredStrategy "
                "(use 'chief' and 'worker')."
            )
        if not isinstance(addresses, list) or not addresses:
            raise ValueError(f"TF_CONFIG cluster[{job!r}] must be a non-empty list of host:port.")
        for address in addresses:
            host, _, port = str(address).rpartition(":")
            if not host or not port.isdigit():
                raise ValueError(
                    f"TF_CONFIG cluster[{job!r}] holds {address!r}; addresses are 'host:port'."
                )
    job, index = task["type"], task["index"]
    if job not in cluster:
        raise ValueError(
            f"TF_CONFIG task type {job!r} is not a job of the cluster {sorted(cluster)}."
        )
    if not isinstance(index, int) or not 0 <= index < len(cluster[job]):
        raise ValueError(
            f"TF_CONFIG task index {index!r} is out of range for job {job!r} "
            f"({len(cluster[job])} addresses)."
        )
    return config


def is_chief(config: dict | None = None) -> bool:
    """Whether this process is the chief (writes checkpoints and logs): task ``chief``, or
    ``worker`` 0 in a cluster without one. True without ``TF_CONFIG`` (one process)."""
    if config is None:
        if not os.environ.get("TF_CONFIG"):
            return True
        config = parse_tf_config()
    job, index = config["task"]["type"], config["task"]["index"]
    if "chief" in config["cluster"]:
        return job == "chief"
    return job == "worker" and index == 0


_WATCHDOG = """
import os, select, signal, sys
pid, timeout, what = int(sys.argv[1]), float(sys.argv[2]), sys.argv[3]
ready, _, _ = select.select([sys.stdin], [], [], timeout)
if not ready:
    sys.stderr.write(
        f"\\nkeras_tnt.multi_worker: {what} did not finish within {timeout:g} s; are all workers "
        "of TF_CONFIG started, and can they reach each other? Stopping this worker.\\n"
    )
    sys.stderr.flush()
    os.kill(pid, signal.SIGTERM)
    ready, _, _ = select.select([sys.stdin], [], [], 5)
    if not ready:  # TensorFlow may handle SIGTERM itself
        os.kill(pid, signal.SIGKILL)
"""


class _Watchdog:
    """Stops this process with a message if ``done()`` is not called within ``timeout`` seconds:
    a worker that cannot reach the others must not hang silently. A separate process, since
    TensorFlow waits for the cluster holding Python's lock (no thread or signal handler of this
    process would run)."""

    def __init__(self, timeout: float, what: str):
        self._process = subprocess.Popen(
            [sys.executable, "-c", _WATCHDOG, str(os.getpid()), str(timeout), what],
            stdin=subprocess.PIPE,
        )

    def done(self):
        self._process.stdin.close()
        self._process.wait()


def strategy_from_tf_config(timeout: float = 300.0, value: str | None = None):
    """``MultiWorkerMirroredStrategy`` for the checked ``TF_CONFIG``; the process exits with a
    message if the workers do not all connect within ``timeout`` seconds."""
    config = parse_tf_config(value)
    if value is not None:
        os.environ["TF_CONFIG"] = value
    job, index = config["task"]["type"], config["task"]["index"]
    host, _, port = config["cluster"][job][index].rpartition(":")
    if host in ("localhost", "127.0.0.1") and not _port_free(int(port)):
        raise ValueError(
            f"TF_CONFIG gives this task ({job} {index}) the address {host}:{port}, which is in "
            "use by another process."
        )
    watchdog = _Watchdog(timeout, "connecting to the other workers")
    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    # The first collective waits for every worker: do it now, under the watchdog.
    strategy.reduce("SUM", strategy.run(lambda: tf.constant(1.0)), axis=None)
    watchdog.done()
    return strategy


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        # As gRPC binds: a port in TIME_WAIT after a killed run is free, a listener is not.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


# ----------------------------------------------------------------------- data


def _replica_slices(dataset, replicas: int, first_replica: int, local_replicas: int):
    """Each global batch -> the consecutive slices of this worker's replicas, in order.

    Replica ``r`` of ``R`` takes rows ``[r n // R, (r + 1) n // R)`` of a batch of ``n``. A
    last batch smaller than ``R`` cannot give every replica an example and is dropped.
    """

    def rows(n, r):
        return (r * n) // replicas, ((r + 1) * n) // replicas

    def slices(*batch):
        n = tf.shape(tf.nest.flatten(batch)[0], out_type=tf.int64)[0]

        def one(j):
            start, stop = rows(n, first_replica + j)
            part = tf.nest.map_structure(lambda t: t[start:stop], batch)
            return part if len(batch) > 1 else part[0]

        return tf.data.Dataset.range(local_replicas).map(one)

    dataset = dataset.filter(
        lambda *batch: tf.shape(tf.nest.flatten(batch)[0], out_type=tf.int64)[0] >= replicas
    )
    return dataset.flat_map(slices)


# ----------------------------------------------------------------------- the loop


class DistributedTrainer:
    """Runs ``model.train_step`` under a ``tf.distribute`` strategy, with checkpoints.

    Args:
        model: a compiled Keras model (a :class:`keras_tnt.FisherModel` for TNT, Shampoo's warm
            start or KFAC), built under ``strategy.scope()``.
        strategy: the strategy (default: the current one).
        checkpoint_dir: where the chief keeps ``checkpoint.keras`` and ``trainer_state.json``
            (None: no checkpoints, no resume). :meth:`fit` resumes from there.
        checkpoint_every_steps: also checkpoint every this many steps inside an epoch (None:
            at the end of each epoch only). A kill loses at most that many steps.

    After construction, ``restored_from`` is the path of the checkpoint it resumed from (None
    for a fresh start) and ``state`` says where: ``steps``, ``epoch`` (epochs done) and
    ``step_in_epoch``. A ``trainer_state.json`` that names a missing checkpoint is an error.
    """

    def __init__(self, model, strategy=None, checkpoint_dir=None, checkpoint_every_steps=None):
        if not isinstance(model, keras.Model):
            raise TypeError(f"`model` must be a compiled keras.Model; received {model!r}.")
        if checkpoint_every_steps is not None and (
            isinstance(checkpoint_every_steps, bool)
            or not isinstance(checkpoint_every_steps, int)
            or checkpoint_every_steps < 1
        ):
            raise ValueError(
                "`checkpoint_every_steps` must be None or an integer >= 1; received "
                f"{checkpoint_every_steps!r}."
            )
        self.model = model
        self.strategy = strategy or tf.distribute.get_strategy()
        self.checkpoint_dir = checkpoint_dir
        self.checkpoint_every_steps = checkpoint_every_steps
        self.chief = is_chief()
        self.state = {"epoch": 0, "step_in_epoch": 0, "steps": 0, "warm_started": False}
        # The checkpoint this trainer resumed from (None: a fresh start).
        self.restored_from = None
        self._step_function = None
        self._test_function = None
        self._restore()

    # -------------------------------------------------------------- checkpoints

    @property
    def _state_path(self):
        return os.path.join(self.checkpoint_dir, "trainer_state.json")

    def _restore(self):
        if not self.checkpoint_dir or not os.path.exists(self._state_path):
            return
        with open(self._state_path) as f:
            state = json.load(f)
        path = os.path.join(self.checkpoint_dir, state.get("checkpoint") or "")
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"{self._state_path} names the checkpoint {path}, which is missing, so the run "
                "cannot be resumed: restore that file, or remove the checkpoint directory (or "
                "use another) to start afresh."
            )
        with self.strategy.scope():
            self.model = keras.models.load_model(path)
        self.state = state
        self.restored_from = path

    def _write_dir(self):
        if self.chief:
            os.makedirs(self.checkpoint_dir, exist_ok=True)
            return self.checkpoint_dir
        return tempfile.mkdtemp(prefix="keras_tnt_worker_")

    def save(self):
        """Checkpoint now (every worker calls it; only the chief's copy stays)."""
        if not self.checkpoint_dir:
            return
        directory = self._write_dir()
        name = f"checkpoint-{self.state['steps']:08d}.keras"
        self.model.save(os.path.join(directory, "checkpoint.tmp.keras"))
        os.replace(os.path.join(directory, "checkpoint.tmp.keras"), os.path.join(directory, name))
        previous = self.state.get("checkpoint")
        self.state["checkpoint"] = name
        tmp = os.path.join(directory, "trainer_state.tmp.json")
        with open(tmp, "w") as f:
            json.dump(self.state, f, indent=1)
        os.replace(tmp, os.path.join(directory, "trainer_state.json"))
        if self.chief:
            if previous and previous != name and os.path.exists(os.path.join(directory, previous)):
                os.remove(os.path.join(directory, previous))
        else:
            shutil.rmtree(directory, ignore_errors=True)

    # -------------------------------------------------------------- data

    def _distribute(self, dataset):
        strategy = self.strategy
        replicas = strategy.num_replicas_in_sync

        def per_worker(context):
            local = context.num_replicas_in_sync // context.num_input_pipelines
            first = context.input_pipeline_id * local
            return _replica_slices(dataset, replicas, first, local)

        options = tf.distribute.InputOptions(experimental_fetch_to_device=True)
        return strategy.distribute_datasets_from_function(per_worker, options)

    # -------------------------------------------------------------- steps

    def _make_step(self):
        if self._step_function is not None:
            return self._step_function
        model, strategy = self.model, self.strategy

        @tf.function(reduce_retracing=True, autograph=False)
        def step(batch):
            logs = strategy.run(model.train_step, args=(batch,))
            return {k: strategy.reduce("MEAN", v, axis=None) for k, v in logs.items()}

        self._step_function = step
        return step

    def evaluate(self, dataset) -> dict:
        """The compiled loss and metrics over ``dataset`` (global batches), on every worker."""
        model, strategy = self.model, self.strategy
        if self._test_function is None:

            @tf.function(reduce_retracing=True, autograph=False)
            def test(batch):
                logs = strategy.run(model.test_step, args=(batch,))
                return {k: strategy.reduce("MEAN", v, axis=None) for k, v in logs.items()}

            self._test_function = test
        for metric in model.metrics:
            metric.reset_state()
        logs = {}
        for batch in self._distribute(dataset):
            logs = self._test_function(batch)
        result = {k: float(v) for k, v in logs.items()}
        for metric in model.metrics:
            metric.reset_state()
        return result

    def warm_start(self, dataset, steps=None):
        """Folds batches of ``dataset`` (global batches) into the statistics (warm start)."""
        if self.state.get("warm_started"):
            return
        model = self.model
        if getattr(model, "statistics_optimizer", None) is None:
            raise ValueError(
                "A warm start needs a keras_tnt.FisherModel compiled with TNT, Shampoo or KFAC."
            )
        with self.strategy.scope():
            model.build_optimizer()
        if steps is not None:
            dataset = dataset.take(steps)
        run = model._make_warm_start_function()
        for batch in self._distribute(dataset):
            run(batch)
        self.state["warm_started"] = True

    def fit(
        self,
        dataset_fn,
        epochs,
        steps_per_epoch=None,
        callbacks=None,
        verbose=1,
        warm_start_fn=None,
        warm_start_steps=None,
    ):
        """Trains from the saved state (or the start) to ``epochs`` epochs.

        ``dataset_fn(epoch)``: that epoch's dataset of global batches, the same on every worker.
        ``warm_start_fn()``: a dataset of global batches for the warm start before the first
        step (TNT, Shampoo, KFAC), or None. ``callbacks``: Keras callbacks, run on every worker
        with the same logs (writers among them should write on the chief only). Returns the
        history: ``{metric: [value per epoch trained in this call]}``.
        """
        model = self.model
        if warm_start_fn is not None and self.state["steps"] == 0:
            self.warm_start(warm_start_fn(), warm_start_steps)
            self.save()
        callbacks = keras.callbacks.CallbackList(callbacks or [], model=model)
        history = {}
        step = self._make_step()
        callbacks.on_train_begin()
        for epoch in range(self.state["epoch"], epochs):
            skip = self.state["step_in_epoch"]
            dataset = dataset_fn(epoch).skip(skip)
            if steps_per_epoch:
                dataset = dataset.take(max(steps_per_epoch - skip, 0))
            callbacks.on_epoch_begin(epoch)
            bar = keras.utils.Progbar(steps_per_epoch) if verbose and self.chief else None
            if bar is not None:
                print(f"Epoch {epoch + 1}/{epochs}")
            for metric in model.metrics:
                metric.reset_state()
            logs = {}
            batch_index = skip
            for batch in self._distribute(dataset):
                callbacks.on_train_batch_begin(batch_index)
                logs = {k: float(v) for k, v in step(batch).items()}
                batch_index += 1
                self.state["steps"] += 1
                self.state["step_in_epoch"] = batch_index
                callbacks.on_train_batch_end(batch_index - 1, logs)
                if bar is not None:
                    bar.update(batch_index, list(logs.items()))
                every = self.checkpoint_every_steps
                if every and self.state["steps"] % every == 0:
                    self.save()
            self.state["epoch"] = epoch + 1
            self.state["step_in_epoch"] = 0
            callbacks.on_epoch_end(epoch, logs)
            for key, value in logs.items():
                history.setdefault(key, []).append(value)
            self.save()
            if model.stop_training:
                break
        callbacks.on_train_end()
        return history
