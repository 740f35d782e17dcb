"""TNT's preconditioner work split across replicas (``split_preconditioner``).

Under MirroredStrategy on the two logical CPU devices of conftest: each trainable tensor's
contractions, inverse refreshes and preconditioned direction are computed by its owner replica
only and shared by an all-reduce; the trajectory is the unsplit one, bit for bit in float64.
"""

from __future__ import annotations

import itertools

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_tnt
from keras_tnt import _replicas
from keras_tnt import kronecker
from tests.conftest import mirrored
from tests.conftest import replica_values


def _run(
    optimizer_cls,
    split,
    epochs=2,
    replicas=2,
    examples=320,
    reduction=None,
    nan_at=None,
    **kwargs,
):
    """A float64 64-64-64-64-64 digits autoencoder (4 equal layers), under MirroredStrategy,
    on the first ``examples`` digits in batches of 80: a warm start and ``epochs`` of fit.
    ``nan_at``: an index of the inputs set to NaN (that batch's gradients are not finite)."""
    from sklearn.datasets import load_digits

    x = (load_digits().data / 16.0)[:examples]
    if nan_at is not None:
        x = x.copy()
        x[nan_at] = np.nan
    strategy = mirrored() if replicas == 2 else tf.distribute.get_strategy()
    with strategy.scope():
        inputs = keras.Input((64,), dtype="float64")
        h = inputs
        for i in range(3):
            h = keras.layers.Dense(64, activation="tanh", dtype="float64", name=f"layer{i}")(h)
        outputs = keras.layers.Dense(64, dtype="float64", name="layer3")(h)
        model = keras_tnt.FisherModel(inputs, outputs, fisher_seed=3)
        rng = np.random.default_rng(0)
        model.set_weights([rng.uniform(-0.4, 0.4, w.shape) for w in model.get_weights()])
        optimizer = optimizer_cls(
            learning_rate=1e-3, inverse_update_period=4, split_preconditioner=split, **kwargs
        )
        model.compile(
            optimizer=optimizer,
            loss=keras_tnt.losses.SummedBinaryCrossentropy(
                from_logits=True, reduction=reduction or "sum_over_batch_size"
            ),
        )
    if not epochs:
        model.warm_start((x, x), batch_size=80, verbose=0)
        return model
    model.fit(
        x,
        x,
        batch_size=80,
        epochs=epochs,
        shuffle=False,
        verbose=0,
        callbacks=[keras_tnt.WarmStart((x, x), batch_size=80, verbose=0)],
    )
    return model


def _state(model):
    return [np.array(v) for v in model.optimizer.variables + model.weights]


_WORK = ("factorizations", "contractions", "preconditionings")


def _unsplit_work(optimizer):
    """The work one replica does unsplit over the run (see test_replica_work_is_split_in_half_
    and_adds_up and test_kfac_splits_its_layers_in_half for the accounting)."""
    steps = int(optimizer.iterations.numpy())
    t1, t2 = optimizer.curvature_update_period, optimizer.inverse_update_period
    assert t2 % t1 == 0  # then TNT's and KFAC's refresh schedules are the same
    refreshes = sum(1 for t in range(steps) if t % (t1 if t < t2 else t2) == 0)
    if isinstance(optimizer, keras_tnt.KFAC):  # per layer: two factors, no contractions
        layers = len(optimizer.blocks)
        return {
            "factorizations": 2 * layers * refreshes,
            "contractions": 0,
            "preconditionings": layers * steps,
        }
    # Per tensor with modes (not the ones on plain momentum); every statistics update, warm
    # start included, contracts each.
    modes = [m for m in optimizer._modes if m]
    return {
        "factorizations": sum(len(m) for m in modes) * refreshes,
        "contractions": len(modes) * optimizer.curvature_updates,
        "preconditionings": len(modes) * steps,
    }


@pytest.mark.parametrize(
    "optimizer_cls,kwargs",
    [
        (keras_tnt.TNT, {"damping": 0.1, "weight_decay": 1e-3}),
        # Diagonal factors (64 > 32), one kernel forced full, one bias on plain momentum.
        (
            keras_tnt.TNT,
            {
                "damping": 0.1,
                "max_factor_dim": 32,
                "factor_overrides": {"^layer0/kernel$": "full", "^layer2/bias$": "none"},
            },
        ),
        (keras_tnt.TNT, {"damping": 0.1, "weight_decay": 1e-3, "grafting": "adam"}),
        # Every 64 x 64 factor in a buffer of its own (_own_buffer_size lowered to 64 x 64).
        (keras_tnt.TNT, {"damping": 0.1, "own_buffer_size": 64 * 64}),
        (keras_tnt.Shampoo, {"damping": 1e-3}),
        (keras_tnt.KFAC, {"damping": 0.3, "weight_decay": 1e-3}),
        (keras_tnt.KFAC, {"damping": 0.3, "grafting": "sgd"}),
        # Diagonal A and G (65 and 64 > 32), one layer forced full, one on plain momentum.
        (
            keras_tnt.KFAC,
            {
                "damping": 0.3,
                "max_factor_dim": 32,
                "factor_overrides": {"^layer0/": "full", "^layer2/": "none"},
            },
        ),
    ],
)
def test_split_is_the_unsplit_run_bit_for_bit(optimizer_cls, kwargs, monkeypatch):
    # One epoch (4 steps, a refresh at t = 0 and t = 4) for the baselines; two for TNT.
    epochs = 2 if optimizer_cls is keras_tnt.TNT else 1
    kwargs = dict(kwargs)
    own = kwargs.pop("own_buffer_size", None)
    if own is not None:
        monkeypatch.setattr(keras_tnt.TNT, "_own_buffer_size", own)
    split = _run(optimizer_cls, True, epochs=epochs, **kwargs)
    unsplit = _run(optimizer_cls, False, epochs=epochs, **kwargs)
    if own is not None:  # one-row buffers, written row by row by the split refresh
        shapes = [tuple(b[0].shape) for b in split.optimizer._buffers]
        assert (1, 64, 64) in shapes and not any(s[0] > 1 and s[1] == 64 for s in shapes)
    assert split.optimizer.curvature_updates >= 4 * epochs
    variables = split.optimizer.variables + split.weights
    for a, b, v in zip(_state(split), _state(unsplit), variables, strict=True):
        np.testing.assert_array_equal(a, b, err_msg=v.path)
    # The replicas hold bit-identical copies of everything.
    for v in split.optimizer.variables + split.weights:
        first, second = replica_values(v)
        np.testing.assert_array_equal(first, second, err_msg=v.path)
    assert unsplit.optimizer.replica_work() == [{k: 0 for k in _WORK}] * 2
    # The split run did split (else both runs are unsplit, and trivially equal): each replica
    # did its share of every kind of work, from the first step (FisherModel builds the
    # optimizer before tracing) and the warm start on; together, what one replica does unsplit.
    work = split.optimizer.replica_work()
    expected = _unsplit_work(split.optimizer)
    assert {k: work[0][k] + work[1][k] for k in _WORK} == expected, work
    assert all(w[k] > 0 for w in work for k in _WORK if expected[k]), work
    if "max_factor_dim" in kwargs and optimizer_cls is keras_tnt.KFAC:
        blocks = split.optimizer.blocks
        assert [(b.layer.name, b.diagonal) for b in blocks] == [
            ("layer0", (False, False)),
            ("layer1", (True, True)),
            ("layer3", (True, True)),
        ]
    elif "max_factor_dim" in kwargs:
        kinds = [(e["variable"], e["factors"]) for e in split.optimizer.plan()]
        assert kinds[0] == ("layer0/kernel", ["full", "full"])
        assert kinds[1] == ("layer0/bias", ["diagonal"])
        assert ("layer2/bias", []) in kinds


@pytest.mark.parametrize("optimizer_cls", [keras_tnt.TNT, keras_tnt.KFAC])
def test_split_skips_a_batch_with_non_finite_gradients_as_unsplit(optimizer_cls):
    """A batch whose gradients hold NaN moves nothing (each replica infers that from the
    owners' skip flags and keeps its momenta); split and unsplit end bit for bit alike, finite."""
    damping = {"damping": 0.3} if optimizer_cls is keras_tnt.KFAC else {"damping": 0.1}
    runs = [
        _run(optimizer_cls, split, epochs=1, nan_at=(100, 5), **damping) for split in (True, False)
    ]
    split, unsplit = runs
    assert split.optimizer.skipped_updates == unsplit.optimizer.skipped_updates > 0
    assert sum(w[k] for w in split.optimizer.replica_work() for k in _WORK) > 0  # it did split
    variables = split.optimizer.variables + split.weights
    for a, b, v in zip(_state(split), _state(unsplit), variables, strict=True):
        assert np.all(np.isfinite(a)), v.path
        np.testing.assert_array_equal(a, b, err_msg=v.path)


def test_two_replicas_with_sampled_targets_are_the_one_device_run():
    """Each replica draws, for its slice of the global batch, what one device draws for the
    whole batch; the statistics and updates come from the sums over replicas. So the run on two
    replicas (split) is the one-device run, to float64 reduction-order round-off.

    300 examples: the last batch (of fit and of the warm start) has 60, split 30 + 30. An odd
    one is not the one-device run with this loss: Keras' ``sum_over_batch_size`` divides each
    replica's sum by its own slice (31 or 30) and the number of replicas, not by 61.
    """
    two = _run(keras_tnt.TNT, None, examples=300, damping=0.1)
    one = _run(keras_tnt.TNT, None, replicas=1, examples=300, damping=0.1)
    assert one.optimizer.replica_work() == []
    assert all(w["preconditionings"] > 0 for w in two.optimizer.replica_work())  # split
    assert int(two.optimizer.iterations.numpy()) == 8  # 2 epochs of 4 batches, the last of 60
    variables = one.optimizer.variables + one.weights
    for a, b, v in zip(_state(two), _state(one), variables, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-13, err_msg=v.path)


def test_two_replicas_draw_on_an_odd_last_batch_what_one_device_draws():
    """301 examples: the last batch has 61, split 31 + 30, so replica 1's slice starts at 31 in
    it (not at 30, its own size). With a loss summed over the batch (each replica's sum is its
    share exactly) the warm start's statistics are the one-device ones."""
    run = dict(epochs=0, examples=301, reduction="sum", damping=0.1)  # a warm start only
    two = _run(keras_tnt.TNT, None, **run)
    one = _run(keras_tnt.TNT, None, replicas=1, **run)
    assert two.optimizer.warm_start_batches == 4
    variables = one.optimizer.variables + one.weights
    for a, b, v in zip(_state(two), _state(one), variables, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-13, err_msg=v.path)


def test_replica_work_is_split_in_half_and_adds_up():
    model = _run(keras_tnt.TNT, None, damping=0.1)
    optimizer = model.optimizer
    work = optimizer.replica_work()
    assert len(work) == 2
    # Four equal 64x64 layers: each replica owns two kernels and two biases, so the same work.
    owners = optimizer._owner_plan[1]
    assert owners == [0, 0, 1, 1, 0, 0, 1, 1]
    assert work[0] == work[1]
    # Together they did exactly what one replica does unsplit: every step preconditions all 8
    # tensors; every statistics update contracts all 8; every refresh inverts all 12 factors.
    steps = int(optimizer.iterations.numpy())
    modes = sum(len(kronecker.tensor_modes(v.shape)) for v in model.trainable_variables)
    refreshes = sum(
        1 for t in range(steps) if t % (optimizer.curvature_update_period if t < 4 else 4) == 0
    )
    total = {k: work[0][k] + work[1][k] for k in _WORK}
    assert total["preconditionings"] == 8 * steps
    assert total["contractions"] == 8 * optimizer.curvature_updates
    assert total["factorizations"] == modes * refreshes


def test_kfac_splits_its_layers_in_half():
    """KFAC's units are layers (kernel and bias together): the owner refreshes both factors and
    computes A⁻¹ M G⁻¹; its factor sums are each replica's own examples (not split)."""
    model = _run(keras_tnt.KFAC, None, damping=0.3)
    optimizer = model.optimizer
    assert optimizer._owner_plan[1] == [0, 1, 0, 1]  # four equal layers
    work = optimizer.replica_work()
    assert work[0] == work[1]
    steps = int(optimizer.iterations.numpy())
    refreshes = sum(1 for t in range(steps) if t <= 4 or t % 4 == 0)  # T1 = 1, T2 = 4
    assert work[0]["preconditionings"] + work[1]["preconditionings"] == 4 * steps
    assert work[0]["factorizations"] + work[1]["factorizations"] == 2 * 4 * refreshes
    assert work[0]["contractions"] == work[1]["contractions"] == 0


def test_plan_balances_by_cost_within_grahams_bound():
    rng = np.random.default_rng(0)
    for _ in range(30):
        costs = [int(c) for c in rng.integers(1, 1000, size=rng.integers(1, 8))]
        replicas = int(rng.integers(1, 4))
        owners = _replicas.plan_owners(costs, replicas)
        assert all(0 <= o < replicas for o in owners)
        load = max(
            sum(c for c, o in zip(costs, owners, strict=True) if o == r) for r in range(replicas)
        )
        best = min(
            max(sum(c for c, o in zip(costs, plan, strict=True) if o == r) for r in range(replicas))
            for plan in itertools.product(range(replicas), repeat=len(costs))
        )
        assert load <= 4 / 3 * best
        assert owners == _replicas.plan_owners(costs, replicas)  # deterministic


def test_cost_model_counts_refresh_contraction_and_preconditioning():
    # A 30x20 kernel: 30^3 + 20^3 for the inverses, 2 * 600 * (30 + 20) for the products.
    assert _replicas.preconditioner_cost((30, 20)) == 27000 + 8000 + 2 * 600 * 50
    assert _replicas.preconditioner_cost(()) == 0


def test_split_argument_is_checked():
    with pytest.raises(TypeError, match="split_preconditioner"):
        keras_tnt.TNT(split_preconditioner="yes")
    with pytest.raises(TypeError, match="None, True or False; received 1"):
        keras_tnt.KFAC(split_preconditioner=1)
    assert keras_tnt.KFAC(split_preconditioner=False).split_preconditioner is False
    config = keras_tnt.TNT(split_preconditioner=False).get_config()
    assert keras_tnt.TNT.from_config(config).split_preconditioner is False
