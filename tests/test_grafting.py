"""Learning-rate grafting (``grafting="sgd"`` / ``"adam"``; docs/algorithm.md §2, "Grafting")
against NumPy references: TNT's and Shampoo's directions with SGD-m's or Adam's per-tensor step
length, KFAC's by the identity it must satisfy, and the split and saved runs bit for bit."""

from __future__ import annotations

import os

import keras
import numpy as np
import pytest

import keras_tnt
from tests.conftest import BOTH_BACKENDS
from tests.test_shampoo import RefShampoo
from tests.test_tnt_optimizer import RefTNT

SHAPES = [(4, 3), (3,), (2, 3, 2), ()]


class Graft:
    """The graft of docs/algorithm.md §2: per tensor, ``D ‖S‖ / ‖D‖`` with ``S`` SGD-m's step
    (``m``) or Keras Adam's (``β_1`` = the momentum)."""

    def __init__(self, kind, shapes, beta, beta_2=0.999, eps=1e-7):
        self.kind, self.beta, self.beta_2, self.eps = kind, beta, beta_2, eps
        self.v = [np.zeros(s) for s in shapes]

    def __call__(self, idx, t, g, m, direction, finite=True):
        """The grafted direction of tensor ``idx`` at step ``t`` (0-based)."""
        if finite:
            self.v[idx] = self.beta_2 * self.v[idx] + (1 - self.beta_2) * g * g
        if self.kind == "sgd":
            step = m
        else:
            n = t + 1
            first = (1 - self.beta) * m / (1 - self.beta**n)
            step = first * np.sqrt(1 - self.beta_2**n) / (np.sqrt(self.v[idx]) + self.eps)
        norm = np.linalg.norm(direction)
        return direction * (np.linalg.norm(step) / norm if norm > 0 else 0.0)


class RefGraftedTNT(RefTNT):
    def __init__(self, kind, shapes, **kw):
        super().__init__(shapes, **kw)
        self.graft = Graft(kind, shapes, self.beta)

    def adjust(self, idx, g, direction):
        return self.graft(idx, self.t, g, self.m[idx], direction)


class RefGraftedShampoo(RefShampoo):
    def __init__(self, kind, *args, **kw):
        super().__init__(*args, **kw)
        self.graft = Graft(kind, self.shapes, self.beta)

    def adjust(self, idx, g, direction):
        return self.graft(idx, self.t, g, self.m[idx], direction)


def _variables(values):
    return [
        keras.Variable(np.array(v), dtype="float64", name=f"w{i}") for i, v in enumerate(values)
    ]


def _close(actual, expected, rtol):
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    assert actual.shape == expected.shape and np.all(np.isfinite(actual))
    scale = max(float(np.max(np.abs(expected))), 1e-300)
    err = float(np.max(np.abs(actual - expected))) / scale
    assert err <= rtol, f"relative error {err:.3e} > {rtol:.1e}"


@BOTH_BACKENDS
@pytest.mark.parametrize("kind", ["sgd", "adam"])
def test_tnt_grafting_matches_numpy(float64, kind):
    """Six steps (T1 = 1, T2 = 3: refreshes at 0, 1, 2, 3), four tensors (a matrix, a bias, a
    3-mode tensor, a scalar on the plain momentum step), weight decay: every weight and every
    Adam second moment to 1e-12."""
    hyper = dict(learning_rate=0.05, damping=0.25, momentum=0.5, statistics_decay=0.75)
    rng = np.random.default_rng(1)
    init = [rng.standard_normal(s) for s in SHAPES]
    variables = _variables(init)
    opt = keras_tnt.TNT(
        **hyper, inverse_update_period=3, weight_decay=0.5, grafting=kind, grafting_epsilon=1e-3
    )
    opt.build(variables)
    ref = RefGraftedTNT(
        kind,
        SHAPES,
        lr=0.05,
        damping=0.25,
        momentum=0.5,
        decay=0.75,
        T1=1,
        T2=3,
        weight_decay=0.5,
    )
    ref.graft.eps = 1e-3
    weights = [w.copy() for w in init]
    for _ in range(6):
        ghats = [rng.standard_normal(s) for s in SHAPES]
        opt.update_curvature([keras.ops.convert_to_tensor(g) for g in ghats])
        ref.update_curvature(ghats)
        # Gradients of very different scales per tensor: the graft must rescale each alone.
        grads = [10.0**i * rng.standard_normal(s) for i, s in enumerate(SHAPES)]
        opt.apply([keras.ops.convert_to_tensor(g) for g in grads], variables)
        weights = ref.step(weights, grads)
        for var, expected in zip(variables, weights, strict=True):
            _close(var, expected, 1e-12)
    if kind == "adam":
        for slot, expected in zip(opt._graft_moments, ref.graft.v, strict=True):
            _close(slot, expected, 1e-12)
    else:
        assert opt._graft_moments == []


@BOTH_BACKENDS
@pytest.mark.parametrize("kind", ["sgd", "adam"])
def test_shampoo_grafting_matches_numpy(float64, kind):
    shapes = [(4, 3), (3,), (2, 3, 2)]
    rng = np.random.default_rng(2)
    init = [rng.standard_normal(s) for s in shapes]
    variables = _variables(init)
    opt = keras_tnt.Shampoo(
        learning_rate=0.05,
        damping=0.25,
        momentum=0.5,
        statistics_decay=0.75,
        inverse_update_period=3,
        root_method="eigh",
        grafting=kind,
    )
    ref = RefGraftedShampoo(kind, shapes, 0.05, 0.25, 0.5, 0.75, 1, 3, period_only=False)
    weights = [w.copy() for w in init]
    for _ in range(5):
        grads = [10.0**i * rng.standard_normal(s) for i, s in enumerate(shapes)]
        opt.apply([keras.ops.convert_to_tensor(g) for g in grads], variables)
        weights = ref.step(weights, grads)
        for var, expected in zip(variables, weights, strict=True):
            _close(var, expected, 1e-9)  # roots by two eigendecompositions


def _kfac_model(grafting):
    keras.utils.set_random_seed(0)
    inputs = keras.Input((6,), dtype="float64")
    h = keras.layers.Dense(5, activation="tanh", dtype="float64")(inputs)
    outputs = keras.layers.Dense(3, dtype="float64")(h)
    model = keras_tnt.FisherModel(inputs, outputs, fisher_seed=1)
    model.compile(
        optimizer=keras_tnt.KFAC(learning_rate=0.1, damping=0.3, grafting=grafting),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    return model


@BOTH_BACKENDS
@pytest.mark.parametrize("kind", ["sgd", "adam"])
def test_kfac_grafting_keeps_the_direction_and_takes_the_graft_length(float64, kind):
    """One step from the same weights and draws: per variable, the grafted update is the
    plain KFAC update rescaled (same direction), to SGD's length ``α‖g‖`` or Adam's first step
    ``α ‖g / (|g| + ε)‖`` (at t = 1 Adam's bias-corrected step is ``g / (|g| + ε')``, with
    ``ε' = ε / sqrt(1 - β_2)``)."""
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((16, 6)), rng.integers(0, 3, 16)
    plain, grafted = _kfac_model(None), _kfac_model(kind)
    before = [np.array(w) for w in plain.trainable_weights]
    for model in (plain, grafted):
        model.train_on_batch(x, y)
    grads = [np.array(m) for m in plain.optimizer._momenta]  # m = g at the first step
    for w0, p, q, g in zip(
        before, plain.trainable_weights, grafted.trainable_weights, grads, strict=True
    ):
        dp, dq = w0 - np.array(p), w0 - np.array(q)
        if kind == "sgd":
            length = 0.1 * np.linalg.norm(g)
        else:
            eps = 1e-7 / np.sqrt(1 - 0.999)
            length = 0.1 * np.linalg.norm(g / (np.abs(g) + eps))
        _close(dq, dp * length / np.linalg.norm(dp), 1e-10)


@BOTH_BACKENDS
def test_grafting_adds_one_slot_per_variable_and_plan_bytes_count_it():
    variables = [
        keras.Variable(np.zeros(s, "float32"), name=n) for s, n in (((8, 5), "k"), ((5,), "b"))
    ]
    plain, grafted = keras_tnt.TNT(), keras_tnt.TNT(grafting="adam")
    difference = grafted.plan_bytes(variables) - plain.plan_bytes(variables)
    assert difference == (40 + 5) * 4
    plain.build(variables)
    grafted.build(variables)
    assert len(grafted.variables) == len(plain.variables) + 2

    # The slots come last: every layout without grafting is the one it was.
    def names(opt, variables):
        return [v.path.split("/", 1)[1] for v in variables]

    assert names(grafted, grafted.variables[: len(plain.variables)]) == names(
        plain, plain.variables
    )
    assert all("graft_second_moment" in v.path for v in grafted.variables[-2:])
    assert keras_tnt.TNT(grafting="sgd").plan_bytes(variables) == plain.plan_bytes(variables)


def test_grafting_turns_the_row_sparse_step_off_and_takes_slices_as_dense():
    """An embedding (diagonal first factor) takes the dense step under grafting: its
    IndexedSlices gradient moves it as the same gradient given dense does."""
    embedding = keras.Variable(np.linspace(-1, 1, 5000 * 4).reshape(5000, 4), name="e")
    runs = []
    for dense in (False, True):
        var = keras.Variable(np.array(embedding), name="e")
        opt = keras_tnt.TNT(learning_rate=0.1, grafting="adam")
        opt.build([var])
        assert opt._row_sparse == [False] and "momentum" in opt._momenta[0].path
        rng = np.random.default_rng(0)
        for _ in range(3):
            rows = np.array([3, 17, 3, 4000])
            values = rng.standard_normal((4, 4)).astype("float32")
            full = np.zeros((5000, 4), "float32")
            np.add.at(full, rows, values)
            opt.update_curvature([keras.ops.convert_to_tensor(full)])
            if dense or keras.backend.backend() != "tensorflow":
                gradient = keras.ops.convert_to_tensor(full)
            else:
                import tensorflow as tf

                gradient = tf.IndexedSlices(values, rows, dense_shape=(5000, 4))
            opt.apply([gradient], [var])
        runs.append(np.array(var))
    np.testing.assert_allclose(runs[0], runs[1], rtol=1e-6, atol=1e-7)
    assert not np.array_equal(runs[0], np.array(embedding))


@pytest.mark.parametrize(
    "value, error",
    [("Adam", ValueError), ("rmsprop", ValueError), (1, ValueError), (True, ValueError)],
)
def test_bad_grafting_names_the_argument(value, error):
    with pytest.raises(error, match="`grafting` must be None .* received grafting="):
        keras_tnt.TNT(grafting=value)


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"grafting_beta_2": 1.0}, "grafting_beta_2"),
        ({"grafting_epsilon": 0.0}, "grafting_epsilon"),
    ],
)
def test_bad_grafting_settings_name_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=f"`{name}` must be in"):
        keras_tnt.Shampoo(grafting="adam", **kwargs)


@BOTH_BACKENDS
@pytest.mark.parametrize("cls", [keras_tnt.TNT, keras_tnt.Shampoo, keras_tnt.KFAC])
def test_grafting_config_round_trip(cls):
    opt = cls(grafting="adam", grafting_beta_2=0.99, grafting_epsilon=1e-6)
    config = opt.get_config()
    assert (config["grafting"], config["grafting_beta_2"], config["grafting_epsilon"]) == (
        "adam",
        0.99,
        1e-6,
    )
    again = keras.optimizers.deserialize(keras.optimizers.serialize(opt))
    assert type(again) is cls and again.grafting == "adam" and again.grafting_epsilon == 1e-6
    assert cls().get_config()["grafting"] is None


@BOTH_BACKENDS
def test_saved_grafted_run_continues_bit_for_bit(tmp_path, float64):
    from sklearn.datasets import load_digits

    x = load_digits().data[:64] / 16.0
    y = load_digits().target[:64]

    def model():
        keras.utils.set_random_seed(0)
        inputs = keras.Input((64,), dtype="float64")
        outputs = keras.layers.Dense(10, dtype="float64")(
            keras.layers.Dense(16, activation="tanh", dtype="float64")(inputs)
        )
        m = keras_tnt.FisherModel(inputs, outputs, fisher_seed=2)
        m.compile(
            optimizer=keras_tnt.TNT(learning_rate=1e-2, grafting="adam"),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        )
        return m

    straight = model()
    straight.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0)
    first = model()
    first.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0)
    path = os.path.join(tmp_path, "m.keras")
    first.save(path)
    resumed = keras.models.load_model(path)
    assert resumed.optimizer.grafting == "adam"
    resumed.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0)
    for a, b in zip(straight.get_weights(), resumed.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(straight.optimizer.variables, resumed.optimizer.variables, strict=True):
        np.testing.assert_array_equal(np.array(a), np.array(b))
    assert np.any(np.array(resumed.optimizer._graft_moments[0]) > 0)
