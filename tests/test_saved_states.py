"""Training states saved by keras_tnt 0.2.0 keep loading and training as they did.

tests/data/saved_state_{tnt,tnt_ef,shampoo,kfac}.keras were written by 0.2.0 (before the three
optimizers shared a base class) with tests/data/make_saved_states.py: a float64 FisherModel
after 6 steps. saved_state_next.npz holds what 0.2.0 computed for 3 more steps. Today's code must
load every slot in place and compute the same 3 steps: weights and optimizer variables to 1e-12.
"""

import importlib.util
import os

import keras
import numpy as np
import pytest

import keras_tnt

DATA = os.path.join(os.path.dirname(__file__), "data")
_spec = importlib.util.spec_from_file_location(
    "make_saved_states", os.path.join(DATA, "make_saved_states.py")
)
make_saved_states = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(make_saved_states)

CLASSES = {"tnt": keras_tnt.TNT, "tnt_ef": keras_tnt.TNT, "shampoo": keras_tnt.Shampoo}
CLASSES["kfac"] = keras_tnt.KFAC


@pytest.mark.parametrize("name", sorted(make_saved_states.OPTIMIZERS))
def test_state_saved_by_0_2_loads_and_trains_as_0_2_did(name):
    reference = np.load(os.path.join(DATA, "saved_state_next.npz"))
    model = keras.models.load_model(os.path.join(DATA, f"saved_state_{name}.keras"))
    optimizer = model.optimizer
    assert type(optimizer) is CLASSES[name]
    assert optimizer.iterations.numpy() == 6 and optimizer.curvature_updates > 0
    x, y = make_saved_states.data()
    model.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)
    weights = model.get_weights()
    saved = sorted(k for k in reference.files if k.startswith(f"{name}/weight_"))
    assert len(weights) == len(saved)
    for i, w in enumerate(weights):
        np.testing.assert_allclose(w, reference[f"{name}/weight_{i}"], rtol=1e-12, atol=1e-14)
    slots = sorted(k for k in reference.files if k.startswith(f"{name}/optimizer_"))
    assert len(optimizer.variables) == len(slots)
    for i, v in enumerate(optimizer.variables):
        want = reference[f"{name}/optimizer_{i}"]
        assert tuple(v.shape) == want.shape, v.path
        np.testing.assert_allclose(np.array(v), want, rtol=1e-12, atol=1e-14, err_msg=v.path)
