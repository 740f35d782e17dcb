"""Training states saved by keras_tnt 0.2.0 keep loading and training as they did.

tests/data/saved_state_{tnt,tnt_ef,shampoo,kfac}.keras were written by 0.2.0 (before the three
optimizers shared a base class) with tests/data/make_saved_states.py: a float64 FisherModel
after 6 steps. saved_state_next.npz holds what 0.2.0 computed for 3 more steps. Today's code must
load every slot and compute the same 3 steps: weights and optimizer variables to 1e-12. Since
0.4 a step's counters are kept whole (a vector of statistics counts, one skipped and one failed
counter, where 0.2 and 0.3 kept scalars per variable): the saved state and 0.2's numbers are
converted to today's layout, which keeps every other variable in place and every count.
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
_spec = importlib.util.spec_from_file_location(
    "make_saved_states_0_3", os.path.join(DATA, "make_saved_states_0_3.py")
)
make_saved_states_0_3 = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(make_saved_states_0_3)

CLASSES = {"tnt": keras_tnt.TNT, "tnt_ef": keras_tnt.TNT, "shampoo": keras_tnt.Shampoo}
CLASSES["kfac"] = keras_tnt.KFAC


@pytest.mark.parametrize("name", sorted(make_saved_states.OPTIMIZERS))
def test_state_saved_by_0_2_loads_and_trains_as_0_2_did(name):
    model = keras.models.load_model(os.path.join(DATA, f"saved_state_{name}.keras"))
    assert type(model.optimizer) is CLASSES[name]
    reference = np.load(os.path.join(DATA, "saved_state_next.npz"))
    _trains_as_it_did(model, make_saved_states.data(), reference, name)


@pytest.mark.parametrize("name", sorted(make_saved_states_0_3.OPTIMIZERS))
def test_state_saved_by_0_3_loads_and_trains_as_0_3_did(name):
    """0.3's slots 0.2 did not have: a row-sparse Embedding's direction and damped factors,
    and Adam grafting's second moments (created last)."""
    model = keras.models.load_model(os.path.join(DATA, f"saved_state_0_3_{name}.keras"))
    optimizer = model.optimizer
    assert type(optimizer) is keras_tnt.TNT
    assert optimizer._row_sparse[0] == (name == "tnt_row_sparse")
    assert len(optimizer._graft_moments) == (5 if name == "tnt_graft_adam" else 0)
    reference = np.load(os.path.join(DATA, "saved_state_0_3_next.npz"))
    _trains_as_it_did(model, make_saved_states_0_3.data(), reference, name)


def _trains_as_it_did(model, data, reference, name):
    """Three more steps of ``model`` on ``data`` give what the old version computed."""
    optimizer = model.optimizer
    assert optimizer.iterations.numpy() == 6 and optimizer.curvature_updates > 0
    x, y = data
    model.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)
    weights = model.get_weights()
    saved = sorted(k for k in reference.files if k.startswith(f"{name}/weight_"))
    assert len(weights) == len(saved)
    for i, w in enumerate(weights):
        np.testing.assert_allclose(w, reference[f"{name}/weight_{i}"], rtol=1e-12, atol=1e-14)
    slots = [k for k in reference.files if k.startswith(f"{name}/optimizer_")]
    old = {str(i): reference[f"{name}/optimizer_{i}"] for i in range(len(slots))}
    assert len(optimizer.variables) < len(old)  # fewer counters
    converted = optimizer._from_legacy(old)
    assert converted is not None and len(converted) == len(optimizer.variables)
    # Every count is kept: the integer variables hold the same total.
    integers = [v for v in old.values() if v.dtype.kind == "i"]
    assert sum(int(np.sum(v)) for v in integers) == sum(
        int(np.sum(np.array(v))) for v in optimizer.variables if "int" in str(v.dtype)
    )
    for i, v in enumerate(optimizer.variables):
        want = converted[str(i)]
        assert tuple(v.shape) == want.shape, v.path
        np.testing.assert_allclose(np.array(v), want, rtol=1e-12, atol=1e-14, err_msg=v.path)
