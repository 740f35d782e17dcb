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
from keras_tnt._buffers import Row

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

_spec = importlib.util.spec_from_file_location(
    "make_saved_states_0_4", os.path.join(DATA, "make_saved_states_0_4.py")
)
make_saved_states_0_4 = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(make_saved_states_0_4)
_spec = importlib.util.spec_from_file_location(
    "make_saved_states_0_5", os.path.join(DATA, "make_saved_states_0_5.py")
)
make_saved_states_0_5 = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(make_saved_states_0_5)

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


@pytest.mark.parametrize("own", [None, 16])
@pytest.mark.parametrize("name", sorted(make_saved_states_0_4.OPTIMIZERS))
def test_state_saved_by_0_4_loads_and_trains_as_0_4_did(name, own, monkeypatch):
    """0.4 kept a variable per statistic and per inverse; 0.5 keeps them as rows of one
    buffer per factor size (and, for Shampoo, root order): every matrix lands in its row;
    with ``_own_buffer_size`` lowered to 16, the 4 x 4 ones in buffers of their own."""
    if own is not None:
        monkeypatch.setattr(keras_tnt.TNT, "_own_buffer_size", own)
    model = keras.models.load_model(os.path.join(DATA, f"saved_state_0_4_{name}.keras"))
    optimizer = model.optimizer
    assert type(optimizer) is (keras_tnt.Shampoo if name == "shampoo" else keras_tnt.TNT)
    # The 4 x 4 factors of the embedding, both kernels and the hidden bias in one buffer
    # (Shampoo: the bias's root, of order p = 2, in its own).
    buffers = {s.name: tuple(s.shape) for s, _, _, _ in optimizer._buffers}
    if own is not None:
        assert [s for s in buffers.values() if s[1:] == (4, 4)] == [(1, 4, 4)] * 5
    elif name == "shampoo":
        assert buffers["statistics_4x4_p4_float64"] == (4, 4, 4)
        assert buffers["statistics_4x4_p2_float64"] == (1, 4, 4)
    else:
        assert buffers["statistics_4x4_float64"] == (5, 4, 4)
    reference = np.load(os.path.join(DATA, "saved_state_0_4_next.npz"))
    # Lowered, the buffers are about 0.4's variables (fewer where the 3 x 3 factors share).
    fewer = True if own is None else "either"
    _trains_as_it_did(model, make_saved_states_0_4.data(), reference, name, fewer=fewer)


@pytest.mark.parametrize("own", [None, 16])
@pytest.mark.parametrize("name", sorted(make_saved_states_0_5.OPTIMIZERS))
def test_state_saved_by_0_5_loads_and_trains_as_0_5_did(name, own, monkeypatch):
    """0.5 kept every factor as a row of its size's buffer; 0.6 gives a factor of
    ``_own_buffer_size`` numbers or more a buffer of its own. A 0.5 state whose factors are all
    smaller (these, at the default 65,536) is today's layout and loads as it is; with the size
    lowered to 16, the 4 x 4 and 40-wide factors' rows move out of the saved buffers into
    buffers of their own (the embedding's 40-wide diagonal, alone in 0.5's buffer too, now under
    its tensor's name), the 3 x 3 ones stay shared, and the run goes on as 0.5's did."""
    if own is not None:
        monkeypatch.setattr(keras_tnt.TNT, "_own_buffer_size", own)
    model = keras.models.load_model(os.path.join(DATA, f"saved_state_0_5_{name}.keras"))
    optimizer = model.optimizer
    shapes = [tuple(s.shape) for s, _, _, _ in optimizer._buffers]
    fours = [s for s in shapes if s[1:] == (4, 4)]
    names = [s.name for s, _, _, _ in optimizer._buffers]
    if own is None:
        assert len(fours) == (2 if name == "shampoo" else 1)
        assert sum(s[0] for s in fours) == 5
        assert any(n.startswith("statistics_40_") for n in names)  # 0.5's name
    else:  # one buffer per 4 x 4 factor, and the embedding's diagonal its own, by name
        assert fours == [(1, 4, 4)] * 5 and shapes.count((1, 40)) == 1
        assert not any(n.startswith("statistics_40_") for n in names)
        assert len(set(names)) == len(names)
        assert shapes.count((1, 3, 3)) == 2 if name == "shampoo" else (2, 3, 3) in shapes
    reference = np.load(os.path.join(DATA, "saved_state_0_5_next.npz"))
    _trains_as_it_did(
        model, make_saved_states_0_5.data(), reference, name, fewer=None if own is None else False
    )


def _trains_as_it_did(model, data, reference, name, fewer=True):
    """Three more steps of ``model`` on ``data`` give what the old version computed; the old
    layout had more variables (``fewer``: its counters) or fewer (0.5's shared buffers; or
    ``"either"``), or, with ``fewer=None``, today's."""
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
    if fewer is None:
        assert len(optimizer.variables) == len(old)
        converted = old
    else:
        if fewer != "either":
            assert (len(optimizer.variables) < len(old)) == fewer
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


def _dense_model(name):
    inputs = keras.Input((3,))
    h = keras.layers.Dense(4, name=f"{name}_a")(inputs)
    outputs = keras.layers.Dense(2, name=f"{name}_b")(h)
    return keras_tnt.FisherModel(inputs, outputs, name=name)


def _restored(optimizer, old):
    optimizer.load_own_variables({str(i): v for i, v in enumerate(old)})
    return optimizer


def test_a_tnt_state_of_the_per_variable_layout_converts():
    """A state laid out as 0.2 and 0.3 laid it out (per variable: momentum, statistics,
    inverses, then its statistics count, skipped and failed counters; then the three
    optimizer-wide counters), written by hand: every value lands where it belongs."""
    model = _dense_model("legacy_tnt")
    model.compile(optimizer=keras_tnt.TNT(learning_rate=0.01), loss="mse")
    opt = model.optimizer
    opt.build(model.trainable_variables)
    rng = np.random.default_rng(0)
    old, want = [np.int64(5), np.float32(0.01)], []
    for i in range(len(model.trainable_variables)):
        # Since 0.5 the statistics and inverses are rows of one buffer per factor size.
        slots = [opt._momenta[i], *opt._statistics[i], *opt._preconditioners[i]]
        for slot in slots:
            value = rng.normal(size=tuple(slot.shape)).astype(slot.dtype)
            old.append(value)
            want.append((slot, value))
        old += [np.int64(10 + i), np.int64(i), np.int64(2 * i)]  # count, skipped, failed
    old += [np.int64(13), np.int64(0), np.int64(4)]
    _restored(opt, old)
    for slot, value in want:
        got = slot.value() if isinstance(slot, Row) else slot
        np.testing.assert_array_equal(np.array(got), value, err_msg=slot.path)
    assert int(opt.iterations.numpy()) == 5
    counts = [opt.statistics_count(v) for v in model.trainable_variables]
    assert counts == [10, 11, 12, 13]
    assert opt.skipped_updates == 0 + 1 + 2 + 3 and opt.failed_inversions == 0 + 2 + 4 + 6
    assert opt.curvature_updates == 13 and opt.skipped_curvature_updates == 4


def test_a_kfac_state_without_factored_layers_converts():
    """KFAC with every layer left plain (no factors, an empty vector of layer counts): a state
    of the old layout (momenta, a skipped counter per variable, the failures, the three
    optimizer-wide counters) still converts."""
    model = _dense_model("legacy_kfac")
    opt = keras_tnt.KFAC(learning_rate=0.01, factor_overrides={".*": "none"})
    model.compile(optimizer=opt, loss="mse")
    with pytest.warns(UserWarning, match="not Kronecker-factored"):
        opt.build(model.trainable_variables)
    assert tuple(opt._block_counts.shape) == (0,)
    rng = np.random.default_rng(1)
    momenta = [rng.normal(size=tuple(v.shape)).astype("float32") for v in opt._momenta]
    old = [np.int64(7), np.float32(0.01), *momenta]
    old += [np.int64(k) for k in (1, 0, 2, 0)]  # skipped, per variable
    old += [np.int64(3), np.int64(7), np.int64(0), np.int64(1)]  # failed, then the three
    _restored(opt, old)
    for slot, value in zip(opt._momenta, momenta, strict=True):
        np.testing.assert_array_equal(np.array(slot), value)
    assert int(opt.iterations.numpy()) == 7 and opt.skipped_updates == 3
    assert opt.failed_inversions == 3 and opt.curvature_updates == 7
    assert opt.skipped_curvature_updates == 1
