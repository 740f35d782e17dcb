"""Writes tests/data/saved_state_*.keras and saved_state_next.npz: training states saved by a
given version of keras_tnt, and the weights two more steps give, for test_saved_states.py.

Run with the version whose files should stay loadable, from the repository root:

    .venv/bin/python tests/data/make_saved_states.py

(The committed files were written by keras_tnt 0.2.0, before the optimizers shared a base.)
"""

import os
import sys

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import keras  # noqa: E402
import numpy as np  # noqa: E402

import keras_tnt  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
OPTIMIZERS = {
    "tnt": lambda: keras_tnt.TNT(learning_rate=0.05, damping=0.3, inverse_update_period=3),
    "tnt_ef": lambda: keras_tnt.TNT(
        learning_rate=0.05, damping=0.3, inverse_update_period=3, empirical_fisher=True
    ),
    "shampoo": lambda: keras_tnt.Shampoo(learning_rate=0.05, damping=0.03, inverse_update_period=3),
    "kfac": lambda: keras_tnt.KFAC(
        learning_rate=0.05, damping=0.3, inverse_update_period=3, weight_decay=0.1
    ),
}


def data():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(24, 5))
    y = rng.integers(0, 3, size=24)
    return x, y


def model(name):
    keras.utils.set_random_seed(1)
    inputs = keras.Input((5,), dtype="float64")
    h = keras.layers.Dense(4, activation="tanh", dtype="float64", name="hidden")(inputs)
    h = keras.layers.LayerNormalization(dtype="float64", name="norm")(h)
    outputs = keras.layers.Dense(3, dtype="float64", name="logits")(h)
    net = keras_tnt.FisherModel(inputs, outputs, fisher_seed=7, name=f"saved_{name}")
    net.compile(
        optimizer=OPTIMIZERS[name](),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    return net


def write(optimizers, build, data, prefix, next_name):
    """For each name of ``optimizers``: ``build(name)`` trained 6 steps on ``data``, saved as
    ``{prefix}{name}.keras``; its weights and optimizer variables after 3 more steps, all in
    ``next_name`` (an .npz)."""
    x, y = data
    nexts = {}
    for name in optimizers:
        net = build(name)
        net.fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0)  # 6 steps
        net.save(os.path.join(HERE, f"{prefix}{name}.keras"))
        net.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)  # 3 more
        for i, w in enumerate(net.get_weights()):
            nexts[f"{name}/weight_{i}"] = w
        for i, v in enumerate(net.optimizer.variables):
            nexts[f"{name}/optimizer_{i}"] = np.array(v)
    np.savez(os.path.join(HERE, next_name), **nexts)
    print(f"wrote {len(optimizers)} .keras files and {next_name} to {HERE}")


def main():
    write(OPTIMIZERS, model, data(), "saved_state_", "saved_state_next.npz")


if __name__ == "__main__":
    main()
