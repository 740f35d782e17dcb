"""Writes tests/data/saved_state_0_5_*.keras and saved_state_0_5_next.npz: training states
saved by keras_tnt 0.5 (every factor a row of its size's buffer, before 0.6 gave a large factor
a buffer of its own), and the weights three more steps give, for test_saved_states.py.

The model and optimizers are make_saved_states_0_4's (a 40-row Embedding with a diagonal first
factor, Dense layers of width 4 and 3; TNT with the row-sparse step, TNT grafting Adam,
Shampoo). Their factors are small: the test lowers the size above which a factor keeps a
buffer of its own, so that the 4 x 4 and 40-wide factors leave the buffers 0.5 saved.

Run with 0.5 (its files are committed), from the root of a 0.5 checkout:

    .venv/bin/python tests/data/make_saved_states_0_5.py
"""

import os
import sys

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import make_saved_states  # noqa: E402  (its writer: the same runs, saved the same way)
import make_saved_states_0_4  # noqa: E402  (its model, optimizers and data)

OPTIMIZERS = make_saved_states_0_4.OPTIMIZERS
data = make_saved_states_0_4.data
model = make_saved_states_0_4.model


def main():
    make_saved_states.write(
        OPTIMIZERS, model, data(), "saved_state_0_5_", "saved_state_0_5_next.npz"
    )


if __name__ == "__main__":
    main()
