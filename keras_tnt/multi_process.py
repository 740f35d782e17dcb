"""Training on Keras' JAX backend across several processes (hosts), with ``model.fit``.

JAX's distributed runtime joins the processes; ``keras.distribution.DataParallel`` spans every
device of every process; each process feeds its own consecutive slice of every global batch
(``jax.make_array_from_process_local_data`` assembles the global batch), so an example's
position in the global batch, which sets its target draw, and with it the run, do not depend on
the number of processes: the run on 1 or 8 processes is the same run, to reduction-order
round-off. TNT, Shampoo and KFAC split their preconditioner work across all devices (one
owner per tensor or layer, one all-reduce: docs/algorithm.md §6), as on one process::

    # on every process, with its own KERAS_DISTRIBUTION_PROCESS_ID
    keras_tnt.multi_process.initialize()          # reads the environment, see below
    model = build_and_compile()                    # under the DataParallel distribution
    model.fit(keras_tnt.multi_process.local_batches(global_batches), epochs=...)

The environment (Keras' own names, those of ``keras.distribution.initialize``):

* ``KERAS_DISTRIBUTION_JOB_ADDRESSES``: the coordinator's ``host:port`` (process 0 listens
  there), or every process's address, comma-separated, the coordinator first;
* ``KERAS_DISTRIBUTION_NUM_PROCESSES``: how many processes;
* ``KERAS_DISTRIBUTION_PROCESS_ID``: this process, ``0 ... NUM_PROCESSES - 1``; 0 is the chief.

On CPUs the collectives run over Gloo (TCP). Every process must see the same data (the
same global batches in the same order).
"""

from __future__ import annotations

import os
import sys
import threading

import keras

__all__ = ["environment", "initialize", "is_chief", "local_batches", "process_count"]

_ADDRESSES = "KERAS_DISTRIBUTION_JOB_ADDRESSES"
_COUNT = "KERAS_DISTRIBUTION_NUM_PROCESSES"
_ID = "KERAS_DISTRIBUTION_PROCESS_ID"
_EXAMPLE = f"{_ADDRESSES}=10.0.0.1:1234 {_COUNT}=2 {_ID}=0 (and {_ID}=1 on the other process)"


def environment(env=None) -> tuple[str, int, int]:
    """``(coordinator address, process count, process id)`` from the environment (``env``:
    a mapping instead of ``os.environ``), checked: a ValueError naming the variable that is
    missing or malformed."""
    env = os.environ if env is None else env
    missing = [name for name in (_ADDRESSES, _COUNT, _ID) if not env.get(name)]
    if missing:
        raise ValueError(
            f"{', '.join(missing)} not set: a multi-process run needs {_ADDRESSES}, {_COUNT} and "
            f"{_ID} on every process, e.g. {_EXAMPLE}."
        )
    values = {}
    for name in (_COUNT, _ID):
        try:
            values[name] = int(env[name])
        except ValueError:
            raise ValueError(f"{name} must be an integer; received {env[name]!r}.") from None
    count, process = values[_COUNT], values[_ID]
    if count < 1:
        raise ValueError(f"{_COUNT} must be >= 1; received {count}.")
    if not 0 <= process < count:
        raise ValueError(
            f"{_ID} must be in [0, {count - 1}] ({_COUNT}={count}); received {process}."
        )
    addresses = [a.strip() for a in env[_ADDRESSES].split(",")]
    if len(addresses) > 1 and len(addresses) != count:
        raise ValueError(
            f"{_ADDRESSES} lists {len(addresses)} addresses but {_COUNT}={count}: give the "
            "coordinator's host:port alone, or one address per process."
        )
    for address in addresses:
        host, _, port = address.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"{_ADDRESSES}: {address!r} is not host:port (e.g. 10.0.0.1:1234).")
    return addresses[0], count, process


def initialize(timeout: float = 300.0, env=None):
    """Joins this process to the others (JAX's distributed runtime) and sets a
    ``keras.distribution.DataParallel`` over every device of every process; returns it.

    Call it first, before anything touches JAX's devices. ``timeout``: seconds to wait for all
    processes to join the coordinator; past it, a RuntimeError says so (no silent hang).
    """
    if keras.backend.backend() != "jax":
        raise RuntimeError(
            "keras_tnt.multi_process runs on Keras' JAX backend (KERAS_BACKEND=jax); on "
            "TensorFlow use keras_tnt.multi_worker (MultiWorkerMirroredStrategy)."
        )
    import jax

    coordinator, count, process = environment(env)
    if count > 1:
        # JAX's CPU client needs a collectives implementation across processes; GPUs and TPUs
        # bring their own. Before the first use of a device.
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        message = (
            f"Process {process} of {count} could not join the coordinator at {coordinator} "
            f"within {timeout:g} s. Start every process with the same {_ADDRESSES} and {_COUNT} "
            f"and its own {_ID}, and check that process 0 runs and its port is reachable."
        )
        # JAX's client aborts the process when its own deadline passes (a C++ fatal error, not
        # an exception): a watchdog with a shorter deadline stops it first, with the message.
        watchdog = threading.Timer(timeout, _stop, args=(message,))
        watchdog.daemon = True
        watchdog.start()
        try:
            jax.distributed.initialize(
                coordinator_address=coordinator,
                num_processes=count,
                process_id=process,
                initialization_timeout=int(timeout) + 60,
            )
        except Exception as error:
            raise RuntimeError(f"{message} ({type(error).__name__}: {str(error)[:300]})") from None
        finally:
            watchdog.cancel()
    distribution = keras.distribution.DataParallel(devices=jax.devices(), auto_shard_dataset=False)
    keras.distribution.set_distribution(distribution)
    return distribution


def _stop(message: str):
    print(f"error: {message}", file=sys.stderr, flush=True)
    os._exit(2)


def process_count() -> int:
    if keras.backend.backend() != "jax":
        return 1
    import jax

    return jax.process_count()


def is_chief() -> bool:
    """Whether this process writes the run's files (process 0)."""
    if keras.backend.backend() != "jax":
        return True
    import jax

    return jax.process_index() == 0


def local_batches(dataset):
    """This process's consecutive slice of every global batch of ``dataset`` (a
    ``tf.data.Dataset`` of global batches, the same on every process): the rows the devices of
    this process hold in the global batch. A batch whose size is not a multiple of the device
    count stops the run with a message (DataParallel splits every batch evenly)."""
    import jax
    import tensorflow as tf

    processes, process = jax.process_count(), jax.process_index()
    if processes == 1:
        return dataset
    everywhere = jax.devices()  # the order of DataParallel's mesh
    devices = len(everywhere)
    mine = [i for i, d in enumerate(everywhere) if d.process_index == process]
    if mine != list(range(mine[0], mine[0] + len(mine))):
        raise ValueError(
            f"The devices of process {process} are not consecutive in jax.devices(): "
            f"{everywhere}; its slice of a batch would not be one block of rows."
        )

    def rows(batch):
        first = tf.nest.flatten(batch)[0]
        n = tf.shape(first)[0]
        check = tf.debugging.assert_equal(
            n % devices,
            0,
            message=(
                f"a batch's size is not a multiple of the {devices} devices of this "
                "multi-process run; choose a batch size (and a data set size, for the last "
                "batch) that is"
            ),
        )
        with tf.control_dependencies([check]):
            per_device = n // devices
            start = per_device * mine[0]
            size = per_device * len(mine)
        return tf.nest.map_structure(lambda x: x[start : start + size], batch)

    def local(*batch):
        out = rows(batch)
        return out if len(batch) > 1 else out[0]

    return dataset.map(local)
