"""One process of a JAX multi-process run (or the one-process reference), for
tests/test_multi_process.py. Float64; a warm start and 2 epochs of ``fit`` over 34 examples in
batches of 20 (the last one partial: 14, 7 per process); writes every weight and optimizer
variable, the steps and ``replica_work()`` to ``OUT.npz``::

    KERAS_DISTRIBUTION_JOB_ADDRESSES=127.0.0.1:PORT KERAS_DISTRIBUTION_NUM_PROCESSES=2 \\
        KERAS_DISTRIBUTION_PROCESS_ID=0 python -m tests.multi_process_worker OUT.npz tnt
    python -m tests.multi_process_worker OUT.npz tnt --one   # one process, no distribution
"""

from __future__ import annotations

import os
import sys

os.environ["KERAS_BACKEND"] = "jax"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import jax  # noqa: E402

jax.config.update("jax_enable_x64", True)

import keras  # noqa: E402
import numpy as np  # noqa: E402

import keras_tnt  # noqa: E402
from keras_tnt import multi_process  # noqa: E402


def build(name: str) -> keras_tnt.FisherModel:
    keras.utils.set_random_seed(1)
    inputs = keras.Input((6,))
    h = keras.layers.Dense(5, activation="tanh")(inputs)
    outputs = keras.layers.Dense(3)(h)
    model = keras_tnt.FisherModel(inputs, outputs, fisher_seed=3)
    optimizer = {
        "tnt": lambda: keras_tnt.TNT(0.01, 0.1, 0.9, 0.9, 1, 2, weight_decay=0.01),
        "kfac": lambda: keras_tnt.KFAC(0.01, 0.3, 0.9, 0.9, 1, 2),
    }[name]()
    model.compile(
        optimizer=optimizer,
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    return model


def main(argv):
    out, name = argv[0], argv[1]
    one = "--one" in argv
    keras.config.set_floatx("float64")
    if not one:
        multi_process.initialize(timeout=float(os.environ.get("CONNECT_TIMEOUT", "120")))
    import tensorflow as tf

    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(34, 6)), rng.integers(0, 3, size=34)
    data = tf.data.Dataset.from_tensor_slices((x, y)).batch(20)
    local = (lambda d: d) if one else multi_process.local_batches
    model = build(name)
    model.warm_start(local(data), verbose=0)
    model.fit(local(data), epochs=2, verbose=0, shuffle=False)
    arrays = {f"w{i}": w for i, w in enumerate(model.get_weights())}
    for i, v in enumerate(model.optimizer.variables):
        arrays[f"o{i}_{v.name}"] = np.asarray(keras.ops.convert_to_numpy(v.value))
    arrays["steps"] = np.asarray(int(model.optimizer.iterations.numpy()))
    work = model.optimizer.replica_work()
    arrays["work"] = np.asarray(
        [[w["factorizations"], w["contractions"], w["preconditionings"]] for w in work]
    )
    arrays["process"] = np.asarray(multi_process.process_count() and jax.process_index())
    np.savez(out, **arrays)


if __name__ == "__main__":
    main(sys.argv[1:])
