"""Writes tests/data/saved_state_0_3_*.keras and saved_state_0_3_next.npz: training states
saved by keras_tnt 0.3 for what 0.2 did not have (a row-sparse Embedding, whose damped factors
0.3 keeps; Adam grafting, whose second moments come last), and the weights three more steps
give, for test_saved_states.py.

Run with 0.3 (its files are committed), from the root of a 0.3 checkout:

    .venv/bin/python tests/data/make_saved_states_0_3.py
"""

import os
import sys

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import keras  # noqa: E402
import make_saved_states  # noqa: E402  (its writer: the same runs, saved the same way)
import numpy as np  # noqa: E402

import keras_tnt  # noqa: E402

VOCABULARY = 40
OPTIMIZERS = {
    # max_factor_dim=16: the 40-row embedding's first factor is diagonal (the row-sparse step)
    "tnt_row_sparse": lambda: keras_tnt.TNT(
        learning_rate=0.05, damping=0.3, inverse_update_period=3, max_factor_dim=16
    ),
    "tnt_graft_adam": lambda: keras_tnt.TNT(
        learning_rate=0.05,
        damping=0.3,
        inverse_update_period=3,
        grafting="adam",
        weight_decay=0.01,
        max_factor_dim=16,
    ),
}


def data():
    rng = np.random.default_rng(0)
    x = rng.integers(0, VOCABULARY, size=(24, 3))
    y = rng.integers(0, 3, size=24)
    return x, y


def model(name):
    keras.utils.set_random_seed(1)
    inputs = keras.Input((3,), dtype="int32")
    h = keras.layers.Embedding(VOCABULARY, 4, dtype="float64", name="embed")(inputs)
    h = keras.layers.GlobalAveragePooling1D(dtype="float64")(h)
    h = keras.layers.Dense(4, activation="tanh", dtype="float64", name="hidden")(h)
    outputs = keras.layers.Dense(3, dtype="float64", name="logits")(h)
    net = keras_tnt.FisherModel(inputs, outputs, fisher_seed=7, name=f"saved_{name}")
    net.compile(
        optimizer=OPTIMIZERS[name](),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    return net


def main():
    make_saved_states.write(
        OPTIMIZERS, model, data(), "saved_state_0_3_", "saved_state_0_3_next.npz"
    )


if __name__ == "__main__":
    main()
