"""Batched factor work and TNT's row-sparse step, against the unbatched and dense computations
and a NumPy reference (docs/algorithm.md §2).

* The factorisations of equal-size factors run as one batch: every member's numbers are the
  ones it gets alone, bit for bit.
* Small tensors of equal shape step as one batch (momentum, contractions, mode products,
  weights): every tensor's trajectory is the one it has alone, to round-off.
* A tensor whose first factor is diagonal (an Embedding above ``max_factor_dim``) keeps its
  preconditioned momentum; a gradient that touches few rows (TensorFlow's ``IndexedSlices``)
  costs those rows only. The dense TNT step (momentum kept, every row preconditioned) is the
  reference, to round-off, untouched rows and weight decay included.
"""

import keras
import numpy as np
import pytest

import keras_tnt
from keras_tnt import backend
from keras_tnt import kronecker
from tests.conftest import BOTH_BACKENDS
from tests.conftest import tensor


def _spd(rng, n, d, scale=1.0):
    x = rng.standard_normal((n, d, 2 * d))
    return scale * x @ np.swapaxes(x, -1, -2) / (2 * d)


# ------------------------------------------------------------------ batched factorisations


@BOTH_BACKENDS
def test_a_batch_of_damped_inverses_is_each_inverse_bit_for_bit(float64):
    rng = np.random.default_rng(0)
    factors = _spd(rng, 4, 5)
    factors[2, 0, 0] = np.nan  # one member fails; the others do not notice
    inverses, ok = kronecker.damped_inverses(tensor(factors), 0.1)
    assert list(np.array(ok)) == [True, True, False, True]
    for n in (0, 1, 3):
        alone, alone_ok = kronecker.damped_inverse(tensor(factors[n]), 0.1)
        assert bool(alone_ok)
        np.testing.assert_array_equal(np.array(inverses[n]), np.array(alone))
        np.testing.assert_allclose(
            np.array(alone), np.linalg.inv(factors[n] + 0.1 * np.eye(5)), rtol=1e-10
        )
    diagonal = np.abs(rng.standard_normal((3, 6)))
    diagonal[1, 2] = -0.5  # below -ε: not positive
    inverses, ok = kronecker.damped_inverses(tensor(diagonal), 0.1, diagonal=True)
    assert list(np.array(ok)) == [True, False, True]
    np.testing.assert_array_equal(np.array(inverses[0]), 1 / (diagonal[0] + 0.1))


@BOTH_BACKENDS
def test_a_batch_of_eigh_roots_is_each_root_bit_for_bit(float64):
    rng = np.random.default_rng(1)
    matrices = _spd(rng, 3, 4)
    roots, ok = kronecker.inverse_pth_roots_eigh(tensor(matrices), 4, 1e-3)
    assert np.all(np.array(ok))
    for n in range(3):
        alone, _ = kronecker.inverse_pth_root_eigh(tensor(matrices[n]), 4, 1e-3)
        np.testing.assert_array_equal(np.array(roots[n]), np.array(alone))
        values, vectors = np.linalg.eigh(matrices[n] + 1e-3 * np.eye(4))
        want = vectors @ np.diag(values**-0.25) @ vectors.T
        np.testing.assert_allclose(np.array(alone), want, rtol=1e-9)


def _built(cls, shapes, **kwargs):
    rng = np.random.default_rng(2)
    variables = [keras.Variable(rng.standard_normal(s), name=f"v{i}") for i, s in enumerate(shapes)]
    opt = cls(**kwargs)
    opt.build(variables)
    for _ in range(3):
        opt.update_curvature([tensor(rng.standard_normal(s)) for s in shapes], variables)
    return opt, variables


@BOTH_BACKENDS
@pytest.mark.parametrize(
    "cls, kwargs",
    [
        (keras_tnt.TNT, {"max_factor_dim": 6}),
        (keras_tnt.Shampoo, {"max_factor_dim": 6}),
        (keras_tnt.Shampoo, {"root_method": "newton"}),
    ],
)
def test_refreshing_all_tensors_at_once_is_refreshing_each_alone(float64, cls, kwargs):
    # Equal factor sizes across tensors (5 and 4 recur), a diagonal mode (7 > 6), a vector.
    shapes = [(5, 4), (4, 5), (5, 4), (7, 4), (5,)]
    opt, _ = _built(cls, shapes, **kwargs)
    units = list(range(len(shapes)))
    together = opt._refresh_all(units)
    for u in units:
        alone, failed = opt._refresh(u)
        assert int(failed) == int(together[u][1]) == 0
        assert len(alone) == len(together[u][0])
        for a, b in zip(alone, together[u][0], strict=True):
            np.testing.assert_array_equal(np.array(a), np.array(b))


def test_kfac_refreshes_its_layers_at_once_as_each_alone(float64):
    inputs = keras.Input((6,))
    h = keras.layers.Dense(6, activation="tanh")(inputs)
    h = keras.layers.Dense(5, activation="tanh")(h)
    model = keras_tnt.FisherModel(inputs, keras.layers.Dense(6)(h), fisher_seed=0)
    model.compile(optimizer=keras_tnt.KFAC(learning_rate=0.01, damping=0.1), loss="mse")
    rng = np.random.default_rng(3)
    model.fit(rng.standard_normal((8, 6)), rng.standard_normal((8, 6)), batch_size=4, verbose=0)
    opt = model.optimizer
    units = [u for u in range(len(opt._units())) if opt._unit_preconditioners(u)]
    together = opt._refresh_all(units)
    for u in units:
        alone, _ = opt._refresh(u)
        for a, b in zip(alone, together[u][0], strict=True):
            np.testing.assert_array_equal(np.array(a), np.array(b))


# ------------------------------------------------------------------ batched tensors


@BOTH_BACKENDS
@pytest.mark.parametrize(
    "shape, diagonal",
    [((6,), (False,)), ((6,), (True,)), ((5, 4), (False, True)), ((3, 2, 4), (False, True, False))],
)
def test_batched_contractions_and_products_are_each_tensors(float64, shape, diagonal):
    rng = np.random.default_rng(11)
    g = rng.standard_normal((3,) + shape)
    got = kronecker.batch_mode_contractions(tensor(g), shape, diagonal)
    factors = []
    for d, diag in zip(shape, diagonal, strict=True):
        factors.append(np.abs(rng.standard_normal((3, d))) if diag else _spd(rng, 3, d))
    directions = np.array(
        kronecker.batch_precondition(tensor(g), [tensor(f) for f in factors], shape)
    )
    for n in range(3):
        want = kronecker.mode_contractions(tensor(g[n]), shape, diagonal)
        for a, b in zip(got, want, strict=True):
            np.testing.assert_allclose(np.array(a[n]), np.array(b), rtol=1e-13, atol=1e-15)
        want = kronecker.precondition(tensor(g[n]), [tensor(f[n]) for f in factors], shape)
        np.testing.assert_allclose(directions[n], np.array(want), rtol=1e-13, atol=1e-15)


class BatchedTNT(keras_tnt.TNT):
    """TNT with tensors of up to 65,536 numbers stepped in batches of equal shape (off by
    default)."""

    _batched_size = 1 << 16


@BOTH_BACKENDS
def test_equal_shape_tensors_step_as_one_batch_with_their_own_numbers(float64):
    """Four (5, 4) kernels and three (4,) biases, one scalar: two batches and two tensors alone.
    Every tensor follows the unbatched run, including one whose gradient is NaN at one step
    (only it is skipped) and weight decay with one exclusion."""
    shapes = [(5, 4), (4,), (5, 4), (4,), (5, 4), (4,), (5, 4), (), (7, 4)]
    rng = np.random.default_rng(12)
    start = [rng.standard_normal(s) for s in shapes]
    runs = []
    for cls in (BatchedTNT, keras_tnt.TNT):
        variables = [keras.Variable(w, name=f"w{i}") for i, w in enumerate(start)]
        opt = cls(learning_rate=0.1, damping=0.2, weight_decay=0.01, inverse_update_period=3)
        opt.exclude_from_weight_decay(var_names=["w2"])
        opt.build(variables)
        draws = np.random.default_rng(13)
        for t in range(7):
            fisher = [tensor(draws.standard_normal(s)) for s in shapes]
            grads = [draws.standard_normal(s) for s in shapes]
            if t == 4:
                grads[4][1, 2] = np.nan
            opt.update_curvature(fisher, variables)
            opt.apply([tensor(g) for g in grads], variables)
        runs.append((variables, opt))
    (batched, opt), (alone, reference) = runs
    assert opt._batched(list(range(len(shapes)))) == [[0, 4, 6], [1, 3, 5], [2], [7], [8]]
    for a, b in zip(batched, alone, strict=True):
        np.testing.assert_allclose(np.array(a), np.array(b), rtol=1e-12, atol=1e-14)
    for a, b in zip(opt.variables, reference.variables, strict=True):
        np.testing.assert_allclose(np.array(a), np.array(b), rtol=1e-12, atol=1e-14)
    assert opt.skipped_updates == reference.skipped_updates == 1


# ------------------------------------------------------------------ row-sparse kernels


@BOTH_BACKENDS
@pytest.mark.parametrize(
    "shape, diagonal", [((9, 4), (True, False)), ((9, 3, 4), (True, False, True))]
)
def test_row_contractions_and_products_are_the_dense_ones(float64, shape, diagonal):
    rng = np.random.default_rng(4)
    rows = np.array([7, 2, 5])
    values = rng.standard_normal((3,) + shape[1:])
    dense = np.zeros(shape)
    dense[rows] = values
    got = kronecker.row_contractions(tensor(rows, "int32"), tensor(values), shape, diagonal)
    want = kronecker.mode_contractions(tensor(dense), shape, diagonal)
    for a, b in zip(got, want, strict=True):
        np.testing.assert_allclose(np.array(a), np.array(b), rtol=1e-13, atol=1e-15)
    factors = [np.abs(rng.standard_normal(shape[0]))]
    for d, diag in zip(shape[1:], diagonal[1:], strict=True):
        factors.append(np.abs(rng.standard_normal(d)) if diag else _spd(rng, 1, d)[0])
    factors = [tensor(f) for f in factors]
    got = kronecker.precondition_rows(tensor(values), tensor(rows, "int32"), factors, shape)
    want = np.array(kronecker.precondition(tensor(dense), factors, shape))
    np.testing.assert_allclose(np.array(got), want[rows], rtol=1e-13, atol=1e-15)
    with pytest.raises(ValueError, match="diagonal first mode"):
        kronecker.row_contractions(
            tensor(rows, "int32"), tensor(values), shape, (False,) * len(shape)
        )


# ------------------------------------------------------------------ the row-sparse step


class DenseTNT(keras_tnt.TNT):
    """TNT without the row-sparse step: the momentum kept and every row preconditioned."""

    _carries_directions = False


def _reference(w0, grads, fishers, lr, eps, wd, beta=0.9, rho=0.9, t1=1, t2=3, skip=(), fail=()):
    """The dense TNT step of a (rows, width) tensor with a diagonal row factor, in NumPy: the
    weights after every step. A step in ``skip`` has a non-finite gradient: nothing moves and
    its refresh is dropped (the statistics still fold); at a step in ``fail`` the full factor's
    factorisation fails and it keeps its inverse."""
    w, m = w0.copy(), np.zeros_like(w0)
    rows, width = w.shape
    h1 = h2 = None
    a1, a2 = np.zeros(rows), np.zeros((width, width))  # the inverses' slots start at zero
    out = []
    for t, (g, f) in enumerate(zip(grads, fishers, strict=True)):
        s1, s2 = np.sum(f * f, axis=1), f.T @ f
        h1, h2 = (s1, s2) if h1 is None else (rho * h1 + (1 - rho) * s1, rho * h2 + (1 - rho) * s2)
        if t in skip:
            out.append(w.copy())
            continue
        m = beta * m + g
        if t % (t1 if t < t2 else t2) == 0:
            c = np.sqrt(np.sum(h1) / (rows * width))
            a1 = 1 / (h1 / (c * width) + eps)
            if t not in fail:
                a2 = np.linalg.inv(h2 / (c * rows) + eps * np.eye(width))
        w = w * (1 - lr * wd) - lr * a1[:, None] * (m @ a2)
        out.append(w.copy())
    return out


def _slices(rng, rows, width, touched):
    import tensorflow as tf

    # Repeated indices add up, as an Embedding's gradient of repeated tokens does.
    indices = rng.choice(touched, size=6)
    values = rng.standard_normal((6, width))
    dense = np.zeros((rows, width))
    np.add.at(dense, indices, values)
    shape = tf.constant([rows, width], tf.int64)
    return tf.IndexedSlices(tf.constant(values), tf.constant(indices), shape), dense


@pytest.mark.parametrize("sparse", [True, False])
def test_row_sparse_step_is_the_dense_tnt_step(float64, sparse):
    import tensorflow as tf

    rows, width, lr, eps, wd = 12, 4, 0.3, 0.2, 0.05
    rng = np.random.default_rng(5)
    w0 = rng.standard_normal((rows, width))
    table = keras.Variable(w0, name="table")
    opt = keras_tnt.TNT(
        learning_rate=lr, damping=eps, weight_decay=wd, max_factor_dim=8, inverse_update_period=3
    )
    opt.build([table])
    assert opt._row_sparse == [True] and opt.plan()[0]["note"] == "row-sparse step"
    seen = []

    @tf.function
    def step(g, f):
        seen.append((isinstance(g, tf.IndexedSlices), isinstance(f, tf.IndexedSlices)))
        opt.update_curvature([f], [table])
        opt.apply([g], [table])

    grads, fishers = [], []
    for t in range(8):
        touched = [0, 3, 4, 9] if t % 2 else [1, 3, 10]  # rows 2, 5-8 and 11: never touched
        g, g_dense = _slices(rng, rows, width, touched)
        f, f_dense = _slices(rng, rows, width, touched)
        if not sparse:
            g, f = tf.constant(g_dense), tf.constant(f_dense)
        step(g, f)
        grads.append(g_dense)
        fishers.append(f_dense)
        want = _reference(w0, grads, fishers, lr, eps, wd)[-1]
        np.testing.assert_allclose(np.array(table), want, rtol=1e-10, atol=1e-12)
    assert seen and all(s == (sparse, sparse) for s in seen)
    # Never-touched rows still moved: by weight decay (nothing else reaches them).
    untouched = [2, 5, 6, 7, 8, 11]
    np.testing.assert_allclose(np.array(table)[untouched], w0[untouched] * (1 - lr * wd) ** 8)


@BOTH_BACKENDS
def test_row_sparse_step_with_dense_gradients_on_every_backend(float64):
    rows, width, lr, eps = 10, 3, 0.2, 0.1
    rng = np.random.default_rng(6)
    w0 = rng.standard_normal((rows, width))
    table = keras.Variable(w0, name="table")
    opt = keras_tnt.TNT(learning_rate=lr, damping=eps, max_factor_dim=8, inverse_update_period=3)
    opt.build([table])
    grads, fishers = [], []
    for _ in range(7):
        g, f = rng.standard_normal((2, rows, width))
        opt.update_curvature([tensor(f)], [table])
        opt.apply([tensor(g)], [table])
        grads.append(g)
        fishers.append(f)
    want = _reference(w0, grads, fishers, lr, eps, 0.0)[-1]
    np.testing.assert_allclose(np.array(table), want, rtol=1e-10, atol=1e-12)


def test_a_row_sparse_tensor_keeps_its_momentum_until_its_factors_are_set(float64):
    """The first step's gradient is NaN (its refresh dropped) and T1 = 3: no inverse exists
    until step 3, so the slot holds the plain momentum meanwhile and step 3 carries it into the
    direction; the dense NumPy step throughout."""
    import tensorflow as tf

    rows, width, lr, eps, wd = 9, 3, 0.2, 0.1, 0.02
    rng = np.random.default_rng(14)
    w0 = rng.standard_normal((rows, width))
    table = keras.Variable(w0, name="table")
    opt = keras_tnt.TNT(
        learning_rate=lr,
        damping=eps,
        weight_decay=wd,
        max_factor_dim=8,
        curvature_update_period=3,
        inverse_update_period=6,
    )
    opt.build([table])
    grads, fishers = [], []
    for t in range(8):
        g, g_dense = _slices(rng, rows, width, [0, 2, 5, 7])
        f, f_dense = _slices(rng, rows, width, [0, 2, 5, 7])
        if t == 0:
            g = tf.IndexedSlices(g.values * np.nan, g.indices, g.dense_shape)
        opt.update_curvature([f], [table])
        opt.apply([g], [table])
        grads.append(g_dense)
        fishers.append(f_dense)
        want = _reference(w0, grads, fishers, lr, eps, wd, t1=3, t2=6, skip={0})[-1]
        np.testing.assert_allclose(np.array(table), want, rtol=1e-10, atol=1e-12, err_msg=t)
    assert int(opt.skipped_updates) == 1


class FailingTNT(keras_tnt.TNT):
    """TNT whose full factors' factorisations fail while ``fail_full`` is set."""

    fail_full = False

    def _transform(self, values, parameter):
        inverses, ok = super()._transform(values, parameter)
        if self.fail_full and len(values.shape) == 3:
            ok = keras.ops.zeros_like(ok)
        return inverses, ok


def test_a_failed_factor_keeps_its_inverse_in_the_row_sparse_step(float64):
    """The full factor fails at the first refresh (the slot keeps the momentum: the factors are
    not complete) and again at step 2 (the direction is carried with that factor unchanged)."""
    rows, width, lr, eps = 9, 3, 0.2, 0.1
    rng = np.random.default_rng(15)
    w0 = rng.standard_normal((rows, width))
    table = keras.Variable(w0, name="table")
    opt = FailingTNT(learning_rate=lr, damping=eps, max_factor_dim=8, inverse_update_period=3)
    opt.build([table])
    grads, fishers = [], []
    for t in range(7):
        g, f = rng.standard_normal((2, rows, width))
        opt.fail_full = t in (0, 2)
        opt.update_curvature([tensor(f)], [table])
        opt.apply([tensor(g)], [table])
        grads.append(g)
        fishers.append(f)
        want = _reference(w0, grads, fishers, lr, eps, 0.0, fail={0, 2})[-1]
        np.testing.assert_allclose(np.array(table), want, rtol=1e-10, atol=1e-12, err_msg=t)
    assert int(opt.failed_inversions) == 2


def test_the_per_variable_hook_steps_a_row_sparse_tensor_in_two_traces(float64):
    """Keras' per-variable ``update_step`` (not ``apply``) on a row-sparse tensor, traced twice
    with the same gradient object: each trace computes its own rows (nothing of the first
    trace's graph is reused in the second), and both steps move the table as the dense step."""
    import tensorflow as tf

    rows, width, lr = 12, 4, 0.1
    w0 = np.ones((rows, width))
    table = keras.Variable(w0, name="table")
    opt = keras_tnt.TNT(learning_rate=lr, max_factor_dim=8, momentum=0.0)
    opt.build([table])
    assert opt._row_sparse == [True]
    f = np.random.default_rng(3).standard_normal((rows, width))
    opt.update_curvature([tensor(f)], [table])
    g = tf.constant(np.full((rows, width), 0.5))
    tf.function(lambda: opt.update_step(g, table, lr))()
    after_one = np.array(table)
    tf.function(lambda: opt.update_step(g, table, lr))()
    # momentum 0: each step moves by the same preconditioned gradient
    np.testing.assert_allclose(np.array(table) - after_one, after_one - w0, rtol=1e-12)
    assert not np.allclose(after_one, w0)


def test_a_two_mode_tensor_without_factors_takes_the_momentum_step(float64):
    (table,) = [keras.Variable(np.ones((20, 3)), name="table")]
    opt = keras_tnt.TNT(learning_rate=0.5, max_factor_dim=8, factor_overrides={"table": "none"})
    opt.build([table])
    assert opt._row_sparse == [False] and opt.plan()[0]["modes"] == ()
    opt.update_curvature([tensor(np.ones((20, 3)))], [table])  # nothing to fold
    opt.apply([tensor(np.full((20, 3), 2.0))], [table])
    np.testing.assert_allclose(np.array(table), 1 - 0.5 * 2.0)


@pytest.mark.parametrize("bad", ["nan", "summed_overflow"])
def test_a_non_finite_row_sparse_gradient_moves_nothing(float64, bad):
    """The bad step is a refresh step (t < T2 refreshes every T1 = 1 steps) after new
    statistics: its inverses and damped factors are discarded too, where a finite step changes
    them. ``summed_overflow``: every value is finite, but a row given twice sums to inf (as the
    dense gradient would): the step and its refresh are skipped together."""
    import tensorflow as tf

    rng = np.random.default_rng(7)
    table = keras.Variable(rng.standard_normal((10, 3)), name="table")
    opt = keras_tnt.TNT(learning_rate=0.1, max_factor_dim=8)
    opt.build([table])
    g, _ = _slices(rng, 10, 3, [1, 2])
    opt.update_curvature([g], [table])
    opt.apply([g], [table])
    opt.update_curvature([_slices(rng, 10, 3, [3, 5, 6])[0]], [table])
    kept = [v for v in opt.variables if v is not opt.iterations and "skipped" not in v.path]
    before = [np.array(v) for v in kept]
    weights = np.array(table)
    if bad == "nan":
        bad = tf.IndexedSlices(tf.constant([[1.0, np.nan, 0.0]]), tf.constant([4]), (10, 3))
    else:
        values = tf.constant(np.array([[1e308, 0.0, 0.0], [1e308, 0.0, 0.0]]))
        bad = tf.IndexedSlices(values, tf.constant([4, 4]), (10, 3))
    opt.apply([bad], [table])
    np.testing.assert_array_equal(np.array(table), weights)
    assert int(opt.skipped_updates) == 1
    for v, value in zip(kept, before, strict=True):
        np.testing.assert_array_equal(np.array(v), value, err_msg=v.path)
    assert int(opt.failed_inversions) == 0
    inverses = [np.array(a) for a in opt.inverses(table)]
    opt.apply([g], [table])  # finite: this step's refresh moves the inverses
    moved = [
        not np.array_equal(np.array(a), b)
        for a, b in zip(opt.inverses(table), inverses, strict=True)
    ]
    assert moved and all(moved)


def _embedding_model(cls, seed=3):
    keras.utils.set_random_seed(seed)
    tokens = keras.Input((5,), dtype="int32")
    h = keras.layers.Embedding(30, 4, name="embedding")(tokens)
    h = keras.layers.GlobalAveragePooling1D()(h)
    model = keras_tnt.FisherModel(tokens, keras.layers.Dense(3)(h), fisher_seed=1)
    model.compile(
        optimizer=cls(learning_rate=0.05, damping=0.1, max_factor_dim=16, weight_decay=0.01),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    return model


def test_fit_with_an_embedding_is_the_dense_step(float64, monkeypatch):
    """Through FisherModel's training step: the Embedding's ordinary and sampled-label gradients
    arrive as IndexedSlices and take the row-sparse step; DenseTNT densifies them."""
    import tensorflow as tf

    kinds = []
    row_slices = backend.row_slices

    def recording(x):
        kinds.append(isinstance(x, tf.IndexedSlices))
        return row_slices(x)

    monkeypatch.setattr(backend, "row_slices", recording)
    rng = np.random.default_rng(8)
    tokens = rng.integers(0, 20, size=(48, 5)).astype("int32")
    labels = rng.integers(0, 3, size=48)
    trained = []
    for cls in (keras_tnt.TNT, DenseTNT):
        model = _embedding_model(cls)
        model.fit(tokens, labels, batch_size=12, epochs=2, verbose=0, shuffle=False)
        trained.append(model.get_weights())
    assert kinds and all(kinds)  # the fold and the step saw the slices (traced once each)
    for a, b in zip(*trained, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)


def test_a_dense_state_does_not_load_into_a_row_sparse_optimizer(float64, tmp_path):
    rng = np.random.default_rng(9)
    tokens = rng.integers(0, 20, size=(24, 5)).astype("int32")
    labels = rng.integers(0, 3, size=24)
    model = _embedding_model(DenseTNT)
    model.fit(tokens, labels, batch_size=12, verbose=0)
    path = str(tmp_path / "dense.weights.h5")
    model.save_weights(path)
    model = _embedding_model(keras_tnt.TNT)
    model.fit(tokens[:12], labels[:12], batch_size=12, verbose=0)
    with pytest.raises(ValueError, match="row-sparse"):
        model.load_weights(path)


def test_row_sparse_state_round_trips_through_a_keras_file(float64, tmp_path):
    rng = np.random.default_rng(10)
    tokens = rng.integers(0, 20, size=(48, 5)).astype("int32")
    labels = rng.integers(0, 3, size=48)
    model = _embedding_model(keras_tnt.TNT)
    model.fit(tokens[:24], labels[:24], batch_size=12, verbose=0, shuffle=False)
    path = str(tmp_path / "model.keras")
    model.save(path)
    model.fit(tokens[24:], labels[24:], batch_size=12, verbose=0, shuffle=False)
    loaded = keras.saving.load_model(path)
    loaded.fit(tokens[24:], labels[24:], batch_size=12, verbose=0, shuffle=False)
    for a, b in zip(model.get_weights(), loaded.get_weights(), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14)
