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

import keras  # noqa: E402
import numpy as np  # noqa: E402

import keras_tnt  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
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
    x, y = data()
    nexts = {}
    for name in OPTIMIZERS:
        net = model(name)
        net.fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0)  # 6 steps
        net.save(os.path.join(HERE, f"saved_state_0_3_{name}.keras"))
        net.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)  # 3 more
        for i, w in enumerate(net.get_weights()):
            nexts[f"{name}/weight_{i}"] = w
        for i, v in enumerate(net.optimizer.variables):
            nexts[f"{name}/optimizer_{i}"] = np.array(v)
    np.savez(os.path.join(HERE, "saved_state_0_3_next.npz"), **nexts)
    print(f"wrote {len(OPTIMIZERS)} .keras files and saved_state_0_3_next.npz to {HERE}")


if __name__ == "__main__":
    main()
