"""Keras' custom-loop pattern under ``tf.distribute.MirroredStrategy``, Keras' SGD as the control.

``strategy.run(lambda: optimizer.apply_gradients(zip(grads, variables)))``: the optimizer is
built, and steps, in replica context, on a raw ``tf.Variable`` or a ``keras.Variable`` (what
Keras' own distributed optimizer tests do). Each replica passes its own gradients (and its own
curvature data); Keras sums the gradients over replicas, keras_tnt sums the curvature data, so
two replicas must equal one device fed the sums, with every optimizer, the preconditioner work
split across the replicas or not, with weight decay, EMA and gradient accumulation. The TNT-EF
trajectory is also checked against the NumPy transcription of the algorithm.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_tnt
from tests.conftest import mirrored
from tests.conftest import replica_values
from tests.test_tnt_optimizer import RefTNT

STEPS = 5
REPLICAS = 2
KERNEL, BIAS = (4, 3), (3,)
BATCH = 6  # examples per replica (KFAC's layer inputs)
LR = 0.0625  # exact in float32 (Keras keeps the learning rate in a float32 variable)


def _data(seed=0):
    """Per step and replica: gradients, sampled-label gradients, KFAC layer inputs and
    pre-activation gradients (float64)."""
    rng = np.random.default_rng(seed)
    grads = [rng.standard_normal((STEPS, REPLICAS) + s) / 4 for s in (KERNEL, BIAS)]
    fisher = [rng.standard_normal((STEPS, REPLICAS) + s) / 4 for s in (KERNEL, BIAS)]
    inputs = rng.standard_normal((STEPS, REPLICAS, BATCH, KERNEL[0]))
    # The gradient of the global batch-mean loss: each replica holds its own examples' rows.
    preact = rng.standard_normal((STEPS, REPLICAS, BATCH, KERNEL[1])) / (REPLICAS * BATCH)
    return grads, fisher, inputs, preact


def _one_device(values, kind):
    """What one device is fed: the sum over replicas, or (layer data) all examples."""
    if kind == "sum":
        return values.sum(axis=1, keepdims=True)
    return values.reshape(values.shape[0], 1, -1, values.shape[-1])


OPTIMIZERS = {
    "sgd_control": lambda **kw: keras.optimizers.SGD(LR, momentum=0.5, **kw),
    # TNT fed sampled-label gradients by `update_curvature` before `apply`.
    "tnt": lambda **kw: keras_tnt.TNT(LR, damping=0.3, inverse_update_period=2, **kw),
    "tnt_ef": lambda **kw: keras_tnt.TNT(
        LR, damping=0.3, inverse_update_period=2, empirical_fisher=True, **kw
    ),
    "shampoo": lambda **kw: keras_tnt.Shampoo(LR, damping=0.3, inverse_update_period=2, **kw),
    # KFAC fed each replica's layer inputs and pre-activation gradients.
    "kfac": lambda **kw: keras_tnt.KFAC(LR, damping=0.3, inverse_update_period=2, **kw),
}


def _run(name, strategy, variable_kind="keras", eager=False, steps=STEPS, **kwargs):
    """STEPS custom-loop steps (in a ``tf.function``, or eagerly as Keras' own distributed
    optimizer tests run them); returns (variables, optimizer)."""
    grads, fisher, inputs, preact = _data()
    replicas = strategy.num_replicas_in_sync
    if replicas == 1:
        grads = [_one_device(g, "sum") for g in grads]
        fisher = [_one_device(f, "sum") for f in fisher]
        inputs, preact = _one_device(inputs, "rows"), _one_device(preact, "rows")
    rng = np.random.default_rng(1)
    init = [rng.standard_normal(KERNEL) / 2, rng.standard_normal(BIAS) / 2]
    with strategy.scope():
        layer = None
        if name == "kfac":
            layer = keras.layers.Dense(KERNEL[1], dtype="float64")
            model = keras.Sequential([keras.Input((KERNEL[0],), dtype="float64"), layer])
            model.set_weights(init)
            variables = [layer.kernel, layer.bias]
        elif variable_kind == "raw":
            variables = [tf.Variable(v, dtype=tf.float64) for v in init]
        else:
            variables = [keras.Variable(v, dtype="float64") for v in init]
        optimizer = OPTIMIZERS[name](**kwargs)
        if layer is not None:
            # KFAC's `update_curvature` takes layers: build it first (on the model's variables).
            optimizer.register_layers(model)
            optimizer.build(variables)
    # Otherwise not built here: `update_curvature` or `apply_gradients` builds it inside the
    # replica function.
    assert optimizer.built == (layer is not None)

    def replica_step(t):
        r = tf.distribute.get_replica_context().replica_id_in_sync_group

        def local(values):
            return tf.constant(values)[t, r]

        if name == "tnt":
            optimizer.update_curvature([local(f) for f in fisher], variables)
        elif name == "kfac":
            optimizer.update_curvature([(local(inputs), local(preact))], [layer])
        optimizer.apply_gradients(zip([local(g) for g in grads], variables, strict=True))

    def step(t):
        strategy.run(replica_step, args=(t,))

    if not eager:
        step = tf.function(step)

    for t in range(steps):
        step(tf.constant(t))
    return variables, optimizer


def _values(variables, optimizer):
    return [np.array(v.numpy()) for v in list(variables) + list(optimizer.variables)]


def _paths(variables, optimizer):
    return [getattr(v, "path", v.name) for v in list(variables) + list(optimizer.variables)]


def _check(name, two, one, split, eager=False):
    """Two replicas: identical copies, equal to one device; split work shared when split."""
    (variables, optimizer), (one_vars, one_opt) = two, one
    for v in list(variables) + list(optimizer.variables):
        first, second = replica_values(v)
        np.testing.assert_array_equal(first, second, err_msg=getattr(v, "path", v.name))
    for a, b, path in zip(
        _values(variables, optimizer),
        _values(one_vars, one_opt),
        _paths(variables, optimizer),
        strict=True,
    ):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-13, err_msg=path)
    init = [np.array(v) for v in _run_init()]
    for v, v0 in zip(variables, init, strict=True):
        assert not np.allclose(np.array(v.numpy()), v0)  # it trained
    if name == "sgd_control":
        return
    work = optimizer.replica_work()
    assert len(work) == REPLICAS
    if split:
        # The step that built the optimizer runs unsplit; every later one is shared out: two
        # tensors, one per replica; KFAC's one layer, all on replica 0 (none on replica 1).
        units = 1 if name == "kfac" else 2
        for r, share in enumerate(work):
            owns = r < units
            assert (share["preconditionings"] > 0) == owns, work
            assert (share["factorizations"] > 0) == owns, work
        # (Eagerly, every step splits: no trace creates the variables.)
        split_steps = STEPS if eager or name == "kfac" else STEPS - 1
        total = sum(share["preconditionings"] for share in work)
        assert total == units * split_steps, work
    else:
        assert all(v == 0 for share in work for v in share.values()), work


def _run_init():
    rng = np.random.default_rng(1)
    return [rng.standard_normal(KERNEL) / 2, rng.standard_normal(BIAS) / 2]


# Every optimizer split and unsplit, on raw tf.Variables and on keras.Variables (KFAC: a layer's).
CASES = [("sgd_control", "raw", None), ("sgd_control", "keras", None)]
CASES += [(name, "raw", True) for name in ("tnt", "tnt_ef", "shampoo")]
CASES += [(name, "keras", False) for name in ("tnt", "tnt_ef", "shampoo")]
CASES += [("kfac", "keras", True), ("kfac", "keras", False)]


@pytest.mark.parametrize("name,variable_kind,split", CASES)
def test_apply_in_replica_context_equals_one_device(name, variable_kind, split):
    kwargs = {} if name == "sgd_control" else {"split_preconditioner": split}
    two = _run(name, mirrored(), variable_kind, **kwargs)
    one = _run(name, tf.distribute.get_strategy(), variable_kind, **kwargs)
    _check(name, two, one, split)


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_eager_apply_in_replica_context_equals_one_device(name):
    split = None if name == "sgd_control" else True
    kwargs = {} if split is None else {"split_preconditioner": split}
    two = _run(name, mirrored(), "raw", eager=True, **kwargs)
    one = _run(name, tf.distribute.get_strategy(), "raw", eager=True, **kwargs)
    _check(name, two, one, split, eager=True)


FEATURES = {
    "weight_decay": {"weight_decay": 0.5},
    "ema": {"use_ema": True, "ema_momentum": 0.5},
    "accumulation": {"gradient_accumulation_steps": 2},
}


@pytest.mark.parametrize("feature", FEATURES)
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_weight_decay_ema_and_accumulation_in_replica_context(name, feature):
    kwargs = FEATURES[feature]
    # Keras' own update under accumulation is a `cond` around its all-reduce, which only runs
    # eagerly in replica context (as Keras' tests run it); so does keras_tnt's.
    # Four steps: two whole windows. (Within a window Keras' accumulators hold each replica's
    # own gradients, not their sum: one device's differ until the window's update.)
    eager = feature == "accumulation"
    steps = 4 if eager else STEPS
    two = _run(name, mirrored(), "raw", eager=eager, steps=steps, **kwargs)
    one = _run(name, tf.distribute.get_strategy(), "raw", eager=eager, steps=steps, **kwargs)
    # Keras makes the update conditional under accumulation: nothing is split there.
    _check(name, two, one, split=feature != "accumulation")
    if feature == "ema":
        ema = [v for v in two[1].variables if "average" in v.name]
        assert len(ema) == 2
    if feature == "accumulation":
        assert int(two[1].iterations.numpy()) == steps // 2


@pytest.mark.parametrize("split", [True, False])
def test_tnt_ef_trajectory_in_replica_context_is_the_numpy_reference(split):
    """Five steps of TNT-EF with weight decay, two replicas, each passing its own gradients:
    the NumPy transcription of the algorithm fed the summed gradients (float64, 1e-12)."""
    variables, optimizer = _run(
        "tnt_ef", mirrored(), "raw", split_preconditioner=split, weight_decay=0.5
    )
    grads = [g.sum(axis=1) for g in _data()[0]]
    ref = RefTNT(
        [KERNEL, BIAS], lr=LR, damping=0.3, momentum=0.9, decay=0.9, T1=1, T2=2,
        weight_decay=0.5,
    )  # fmt: skip
    weights = _run_init()
    for t in range(STEPS):
        ref.update_curvature([g[t] for g in grads])
        weights = ref.step(weights, [g[t] for g in grads])
    for v, w in zip(variables, weights, strict=True):
        for copy in replica_values(v):
            np.testing.assert_allclose(copy, w, rtol=1e-12, atol=1e-14)
    assert optimizer.curvature_updates == STEPS
