"""Writes tests/data/saved_state_0_4_*.keras and saved_state_0_4_next.npz: training states
saved by keras_tnt 0.4 (one variable per statistic and per inverse, before 0.5 kept them in one
buffer per factor size), and the weights three more steps give, for test_saved_states.py.

The model is make_saved_states_0_3's (a 40-row Embedding with a diagonal first factor, Dense
layers of width 4 and 3): TNT with the row-sparse step, TNT grafting Adam, and Shampoo (whose
4 x 4 roots come in two orders, p = 2 for the bias and p = 4 for the kernels).

Run with 0.4 (its files are committed), from the root of a 0.4 checkout:

    .venv/bin/python tests/data/make_saved_states_0_4.py
"""

import os
import sys

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import make_saved_states  # noqa: E402  (its writer: the same runs, saved the same way)
import make_saved_states_0_3  # noqa: E402  (its model and data)

import keras_tnt  # noqa: E402

OPTIMIZERS = dict(make_saved_states_0_3.OPTIMIZERS)
OPTIMIZERS["shampoo"] = lambda: keras_tnt.Shampoo(
    learning_rate=0.05, damping=0.03, inverse_update_period=3, max_factor_dim=16
)
data = make_saved_states_0_3.data


def model(name):
    make_saved_states_0_3.OPTIMIZERS[name] = OPTIMIZERS[name]
    return make_saved_states_0_3.model(name)


def main():
    make_saved_states.write(
        OPTIMIZERS, model, data(), "saved_state_0_4_", "saved_state_0_4_next.npz"
    )


if __name__ == "__main__":
    main()
