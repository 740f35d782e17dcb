"""The factor plan: max_factor_dim's diagonal factors, per-variable overrides, the plan report and
the memory limit, against NumPy (dense np.kron where a Kronecker product is meant)."""

import logging

import keras
import numpy as np
import pytest

import keras_tnt
from keras_tnt import kronecker
from tests.conftest import BOTH_BACKENDS
from tests.conftest import tensor

pytestmark = BOTH_BACKENDS


def _variables(*shapes, seed=0):
    rng = np.random.default_rng(seed)
    return [
        keras.Variable(rng.standard_normal(s), dtype="float64", name=f"w{i}")
        for i, s in enumerate(shapes)
    ]


def _tnt_reference(w, m, statistics, diagonal, lr, eps):
    """One TNT step of a 2-mode tensor in NumPy: eq. (5), damping, the dense Kronecker product
    of the inverses (diagonal factors as diagonal matrices) applied to vec(m)."""
    (d1, d2) = w.shape
    h1, h2 = statistics
    trace = np.sum(h1) if diagonal[0] else np.trace(h1)
    c = np.sqrt(trace / (d1 * d2))
    u1, u2 = h1 / (c * d2), h2 / (c * d1)
    a1 = np.diag(1 / (u1 + eps)) if diagonal[0] else np.linalg.inv(u1 + eps * np.eye(d1))
    a2 = np.diag(1 / (u2 + eps)) if diagonal[1] else np.linalg.inv(u2 + eps * np.eye(d2))
    # Row-major vec: vec(A1 M A2) = (A1 ⊗ A2^T) vec(M); the inverses are symmetric.
    direction = (np.kron(a1, a2) @ m.reshape(-1)).reshape(w.shape)
    return w - lr * direction


@pytest.mark.parametrize("bound, diagonal", [(6, (False, True)), (4, (True, True))])
def test_modes_above_the_bound_get_diagonal_factors_and_the_step_matches_numpy(
    float64, bound, diagonal
):
    lr, eps = 0.5, 0.25
    (w,) = _variables((5, 7))
    w0 = np.array(w)
    rng = np.random.default_rng(1)
    fisher, grad = rng.standard_normal((5, 7)), rng.standard_normal((5, 7))
    opt = keras_tnt.TNT(learning_rate=lr, damping=eps, max_factor_dim=bound)
    opt.build([w])
    assert opt.plan()[0]["factors"] == ["diagonal" if f else "full" for f in diagonal]
    opt.update_curvature([tensor(fisher)])
    opt.apply([tensor(grad)], [w])

    full = [fisher @ fisher.T, fisher.T @ fisher]
    expected_statistics = [np.diag(h) if f else h for h, f in zip(full, diagonal, strict=True)]
    for got, want in zip(opt.statistics(w), expected_statistics, strict=True):
        np.testing.assert_allclose(np.array(got), want, rtol=1e-12)
    want = _tnt_reference(w0, grad, expected_statistics, diagonal, lr, eps)
    np.testing.assert_allclose(np.array(w), want, rtol=1e-10, atol=1e-12)


def test_a_diagonal_statistic_is_the_diagonal_of_the_full_one(float64):
    """Three modes, the middle one diagonal: its statistic equals the diagonal of the full
    contraction, the other two are unchanged, and the inverse is 1/(u + ε) of the normalised
    diagonal."""
    rng = np.random.default_rng(2)
    g = rng.standard_normal((3, 9, 4))
    full = kronecker.mode_contractions(tensor(g), (3, 9, 4))
    mixed = kronecker.mode_contractions(tensor(g), (3, 9, 4), (False, True, False))
    np.testing.assert_allclose(np.array(mixed[1]), np.diag(np.array(full[1])), rtol=1e-12)
    for i in (0, 2):
        np.testing.assert_allclose(np.array(mixed[i]), np.array(full[i]), rtol=1e-12)
    normalised_full = kronecker.normalize_factors(full, (3, 9, 4))
    normalised_mixed = kronecker.normalize_factors(mixed, (3, 9, 4))
    np.testing.assert_allclose(
        np.array(normalised_mixed[1]), np.diag(np.array(normalised_full[1])), rtol=1e-12
    )
    inverse, ok = kronecker.damped_inverse(normalised_mixed[1], 0.5)
    assert bool(ok)
    np.testing.assert_allclose(
        np.array(inverse), 1 / (np.diag(np.array(normalised_full[1])) + 0.5), rtol=1e-12
    )
    # A negative diagonal (not a statistic) or NaN is not ok: the previous inverse is kept.
    assert not bool(kronecker.damped_inverse(tensor([1.0, -2.0]), 0.5)[1])
    assert not bool(kronecker.damped_inverse(tensor([1.0, np.nan]), 0.5)[1])


def test_shampoo_diagonal_root_matches_numpy(float64):
    lr, eps = 0.5, 0.25
    (w,) = _variables((3, 8))
    w0 = np.array(w)
    grad = np.random.default_rng(3).standard_normal((3, 8))
    opt = keras_tnt.Shampoo(learning_rate=lr, damping=eps, max_factor_dim=5)
    opt.apply([tensor(grad)], [w])
    h1, h2 = grad @ grad.T, np.sum(grad**2, axis=0)
    values, vectors = np.linalg.eigh(h1 + eps * np.eye(3))
    p1 = (vectors * values**-0.25) @ vectors.T
    p2 = (h2 + eps) ** -0.25
    np.testing.assert_allclose(np.array(opt.inverses(w)[1]), p2, rtol=1e-12)
    np.testing.assert_allclose(np.array(w), w0 - lr * p1 @ grad * p2, rtol=1e-8)


def test_overrides_choose_per_variable(float64):
    lr = 0.5
    kernel, bias = _variables((4, 3), (3,))
    kernel.assign(np.array(kernel))
    b0 = np.array(bias)
    opt = keras_tnt.TNT(
        learning_rate=lr,
        damping=0.1,
        max_factor_dim=2,  # would make every mode diagonal ...
        factor_overrides={"w0": "full", "w1$": "none"},  # ... but the kernel is forced full
    )
    opt.build([kernel, bias])
    plan = {e["variable"]: e for e in opt.plan()}
    assert plan[kernel.path]["factors"] == ["full", "full"]
    assert plan[kernel.path]["override"] == "full"
    assert plan[bias.path]["modes"] == () and plan[bias.path]["factors"] == []
    assert [tuple(h.shape) for h in opt.statistics(kernel)] == [(4, 4), (3, 3)]
    assert opt.statistics(bias) == []
    rng = np.random.default_rng(4)
    g_k, g_b = rng.standard_normal((4, 3)), rng.standard_normal(3)
    opt.update_curvature([tensor(g_k), tensor(g_b)])
    opt.apply([tensor(g_k), tensor(g_b)], [kernel, bias])
    # "none": the plain momentum step; at t = 0 the momentum is the gradient.
    np.testing.assert_allclose(np.array(bias), b0 - lr * g_b, rtol=1e-14)
    assert "none (plain momentum)" in opt.describe_plan()


def test_plan_bytes_are_the_allocated_bytes_and_the_default_keeps_vgg_widths_full():
    kernel, wide, embedding, scalar = (
        keras.Variable(np.zeros(s, "float32"), name=n)
        for s, n in (((512, 4096), "k"), ((4096, 4097), "wide"), ((5000, 16), "e"), ((), "s"))
    )
    variables = [kernel, wide, embedding, scalar]
    opt = keras_tnt.TNT()
    entries = opt.plan(variables)  # before the build
    assert [e["factors"] for e in entries] == [
        ["full", "full"],
        ["full", "diagonal"],
        ["diagonal", "full"],
        [],
    ]
    opt.build(variables)
    for i, entry in enumerate(entries):
        slots = [opt._momenta[i], *opt._statistics[i], *opt._preconditioners[i]]
        slots += [*opt._damped[i]]
        allocated = sum(int(np.prod(v.shape)) * np.dtype(v.dtype).itemsize for v in slots)
        allocated += np.dtype(opt._counts.dtype).itemsize  # its element of the counts vector
        assert entry["state_bytes"] == allocated, entry["variable"]
    # The bound's diagonal factors: 4097 + 5000 numbers instead of 4097² + 5000².
    assert [tuple(h.shape) for h in opt.statistics(wide)] == [(4096, 4096), (4097,)]
    assert [tuple(h.shape) for h in opt.statistics(embedding)] == [(5000,), (16, 16)]
    # Only the embedding (a diagonal first factor) takes the row-sparse step and keeps its
    # damped factors.
    assert opt._row_sparse == [False, False, True, False]
    assert [tuple(b.shape) for b in opt._damped[2]] == [(5000,), (16, 16)]


def test_the_plan_is_logged_once_at_build(caplog):
    variables = [keras.Variable(np.zeros((20, 3), "float32"), name="table")]
    with caplog.at_level(logging.INFO, logger="keras_tnt"):
        keras_tnt.TNT(max_factor_dim=8).build(variables)
    records = [r for r in caplog.records if r.name == "keras_tnt"]
    assert len(records) == 1 and records[0].levelno == logging.WARNING
    assert "1 full and 1 diagonal factors" in records[0].getMessage()
    assert "max_factor_dim=8" in records[0].getMessage()


def _bytes(variables):
    return sum(int(np.prod(v.shape)) * np.dtype(v.dtype).itemsize for v in variables)


def _check_memory_limit_boundary(make, variables):
    """``make(memory_limit_bytes=...)`` (an optimizer, registered if it needs to be) refuses
    at one byte under its plan, allocating nothing, and builds at the plan exactly. Returns the
    built optimizer, the plan's bytes and the bytes the build allocated: every optimizer
    variable, less those that exist before the build (Keras' iterations and learning rate)."""
    need = make(memory_limit_bytes=None).plan_bytes(variables)
    opt = make(memory_limit_bytes=need - 1)
    before = list(opt.variables)
    assert sorted(v.name for v in before) == ["iteration", "learning_rate"]
    with pytest.raises(
        ValueError, match=rf"\({need} bytes\), over `memory_limit_bytes={need - 1}`"
    ):
        opt.build(variables)
    assert not opt.built and [id(v) for v in opt.variables] == [id(v) for v in before]
    opt = make(memory_limit_bytes=need)
    before = list(opt.variables)
    opt.build(variables)
    assert opt.built and {id(v) for v in before} <= {id(v) for v in opt.variables}
    assert opt.plan_bytes() == need and f"({need} bytes)" in opt.describe_plan()
    return opt, need, _bytes(opt.variables) - _bytes(before)


@pytest.mark.parametrize(
    "cls, settings",
    [
        (keras_tnt.TNT, {}),
        (keras_tnt.TNT, {"max_factor_dim": 40, "factor_overrides": {"bias": "none"}}),
        (keras_tnt.TNT, {"use_ema": True}),
        (keras_tnt.TNT, {"gradient_accumulation_steps": 2}),
        (keras_tnt.Shampoo, {"max_factor_dim": 40}),
    ],
    ids=["tnt", "tnt-diagonal-none", "tnt-ema", "tnt-accumulation", "shampoo"],
)
def test_memory_limit_is_exact_and_the_plan_is_every_allocated_byte(cls, settings):
    """A 2-D kernel, its bias, a float16 4-D kernel (float32 statistics), a table with a mode
    above max_factor_dim and a scalar: at ``memory_limit_bytes`` one byte under the plan the
    build refuses, at the plan it builds, and the plan is the sum of ``size * itemsize`` over
    every variable the build added to ``optimizer.variables``."""
    variables = [
        keras.Variable(np.zeros(shape, dtype), name=name)
        for shape, dtype, name in (
            ((300, 200), "float32", "kernel"),
            ((200,), "float32", "bias"),
            ((3, 2, 5, 4), "float16", "conv"),
            ((50, 6), "float32", "table"),
            ((), "float32", "scale"),
        )
    ]
    _, need, allocated = _check_memory_limit_boundary(lambda **kw: cls(**settings, **kw), variables)
    assert allocated == need


def test_kfac_memory_limit_is_exact():
    model = _kfac_model([12, 9, 7], name="limit")

    def make(**kw):
        opt = keras_tnt.KFAC(max_factor_dim=8, **kw)
        opt.register_layers(model)
        return opt

    with pytest.warns(UserWarning, match="not Kronecker-factored"):  # the BatchNormalization
        _, need, allocated = _check_memory_limit_boundary(make, model.trainable_variables)
    assert allocated == need


def test_kfac_plan_is_every_allocated_byte():
    model = _kfac_model([12, 9, 7], name="exact")

    def make(**kw):
        opt = keras_tnt.KFAC(max_factor_dim=8, use_ema=True, **kw)
        opt.register_layers(model)
        return opt

    with pytest.warns(UserWarning, match="not Kronecker-factored"):
        _, need, allocated = _check_memory_limit_boundary(make, model.trainable_variables)
    assert allocated == need


def test_bad_settings_name_the_argument():
    with pytest.raises(ValueError, match="`max_factor_dim` must be an integer >= 1 or None"):
        keras_tnt.TNT(max_factor_dim=0)
    with pytest.raises(TypeError, match="`max_factor_dim` must be an integer"):
        keras_tnt.TNT(max_factor_dim=True)
    with pytest.raises(ValueError, match=r"`factor_overrides\['bias'\]` must be one of"):
        keras_tnt.TNT(factor_overrides={"bias": "identity"})
    with pytest.raises(ValueError, match="not a valid regular expression"):
        keras_tnt.TNT(factor_overrides={"(": "none"})
    with pytest.raises(TypeError, match="`factor_overrides` must be a dict"):
        keras_tnt.TNT(factor_overrides=["bias"])
    with pytest.raises(ValueError, match="`memory_limit_bytes` must be a number of bytes > 0"):
        keras_tnt.TNT(memory_limit_bytes=-1)
    variables = [keras.Variable(np.zeros((2, 3), "float32"), name="kernel")]
    opt = keras_tnt.TNT(factor_overrides={"embedding": "diagonal"})
    with pytest.raises(ValueError, match="`factor_overrides`: 'embedding' matches no variable"):
        opt.build(variables)
    with pytest.raises(ValueError, match="`max_factor_dim` must be an integer >= 1 or None"):
        keras_tnt.KFAC(max_factor_dim=0)


def test_config_round_trip_keeps_the_plan_settings():
    opt = keras_tnt.TNT(
        max_factor_dim=100, factor_overrides={"bias": "none"}, memory_limit_bytes=10**9
    )
    config = opt.get_config()
    assert config["max_factor_dim"] == 100 and config["factor_overrides"] == {"bias": "none"}
    again = keras.optimizers.deserialize(keras.optimizers.serialize(opt))
    assert again.get_config() == config
    shampoo = keras_tnt.Shampoo(max_factor_dim=None)
    assert keras_tnt.Shampoo.from_config(shampoo.get_config()).max_factor_dim is None
    kfac = keras_tnt.KFAC(max_factor_dim=64, factor_overrides={"head": "diagonal"})
    kfac_config = kfac.get_config()
    assert "empirical_fisher" not in kfac_config
    again = keras_tnt.KFAC.from_config(kfac_config)
    assert again.max_factor_dim == 64 and again.factor_overrides == {"head": "diagonal"}


def _kfac_model(widths, name="kfac_plan"):
    inputs = keras.Input((widths[0],))
    x = inputs
    for i, width in enumerate(widths[1:]):
        x = keras.layers.Dense(width, name=f"{name}_dense{i}")(x)
    x = keras.layers.BatchNormalization(name=f"{name}_norm")(x)
    return keras_tnt.FisherModel(inputs, x, name=name)


def test_kfac_plan_bound_and_bytes_are_the_allocated_bytes():
    """KFAC's bound is on a layer's sides (kernel rows without the bias row, outputs): the
    default keeps VGG16's 4096x4096 classifier layer full and makes a 10,001-class output's G
    diagonal; the plan's bytes are what the build allocates."""
    model = _kfac_model([4096, 4096, 10_001], name="vggish")
    opt = keras_tnt.KFAC()
    opt.register_layers(model)
    entries = opt.plan(model.trainable_variables)
    assert [(e["modes"], e["factors"]) for e in entries[:3]] == [
        ((4097, 4096), ["full", "full"]),
        ((), []),
        ((4097, 10_001), ["full", "diagonal"]),
    ]
    assert entries[1]["note"] == f"in the factors of {entries[0]['variable']}"
    small = _kfac_model([12, 9, 7])
    opt = keras_tnt.KFAC(max_factor_dim=8)
    small.compile(optimizer=opt, loss="mse")
    entries = opt.plan(small.trainable_variables)
    expected = [["diagonal", "diagonal"], [], ["diagonal", "full"], [], [], []]
    assert [e["factors"] for e in entries] == expected
    with pytest.warns(UserWarning, match="not Kronecker-factored"):  # the BatchNormalization
        opt.build(small.trainable_variables)
    assert [tuple(f.shape) for f in opt.factors(small.layers[1])] == [(13,), (9,)]
    assert [tuple(f.shape) for f in opt.factors(small.layers[2])] == [(10,), (7, 7)]
    slots = [*opt._momenta, opt._block_counts]
    for b in range(len(opt.blocks)):
        slots += [*opt._factors[b], *opt._factor_inverses[b]]
    allocated = sum(int(np.prod(v.shape)) * np.dtype(v.dtype).itemsize for v in slots)
    assert sum(e["state_bytes"] for e in entries) == allocated
    assert "A x G of layer kfac_plan_dense0" in opt.describe_plan()


def test_kfac_overrides_and_memory_limit():
    model = _kfac_model([6, 5, 4], name="over")
    opt = keras_tnt.KFAC(factor_overrides={"over_dense0/": "none", "over_dense1/": "full"})
    opt.register_layers(model)
    entries = opt.plan(model.trainable_variables)
    assert [e["modes"] for e in entries[:4]] == [(), (), (6, 4), ()]
    assert entries[0]["override"] == "none" and entries[2]["override"] == "full"
    # 'full'/'diagonal' asked of variables of layers KFAC does not factor: an error.
    opt = keras_tnt.KFAC(factor_overrides={"over_norm": "diagonal"})
    opt.register_layers(model)
    with pytest.raises(ValueError, match=r"`factor_overrides\['over_norm'\] = 'diagonal'`"):
        opt.build(model.trainable_variables)
    opt = keras_tnt.KFAC(factor_overrides={"attention": "none"})
    opt.register_layers(model)
    with pytest.raises(ValueError, match="'attention' matches no variable"):
        opt.build(model.trainable_variables)
    opt = keras_tnt.KFAC(memory_limit_bytes=200)
    opt.register_layers(model)
    with pytest.raises(ValueError, match="over `memory_limit_bytes=200`"):
        opt.build(model.trainable_variables)
    assert not opt.built


def test_embedding_rows_absent_from_the_batch_keep_their_weights():
    """An Embedding whose vocabulary mode is diagonal (max_factor_dim below it): rows no token
    of the batch used have zero gradient, zero momentum and zero statistic; damping keeps their
    inverse finite (1/ε) and their weights do not move."""
    inputs = keras.Input((5,), dtype="int32")
    h = keras.layers.Embedding(40, 6, name="embedding")(inputs)
    outputs = keras.layers.Dense(3)(keras.layers.GlobalAveragePooling1D()(h))
    model = keras_tnt.FisherModel(inputs, outputs, fisher_seed=1)
    model.compile(
        optimizer=keras_tnt.TNT(learning_rate=0.1, damping=0.1, max_factor_dim=16),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    tokens = np.random.default_rng(5).integers(0, 20, size=(32, 5)).astype("int32")  # rows 0-19
    labels = np.random.default_rng(6).integers(0, 3, size=32)
    table = model.get_layer("embedding").embeddings
    before = np.array(table)
    model.fit(tokens, labels, batch_size=16, epochs=2, verbose=0)
    after = np.array(table)
    assert np.all(np.isfinite(after))
    np.testing.assert_array_equal(after[20:], before[20:])
    assert np.all(np.any(after[:20] != before[:20], axis=1))
    statistic = np.array(model.optimizer.statistics(table)[0])
    assert statistic.shape == (40,) and np.all(statistic[20:] == 0)
    assert np.all(np.isfinite(np.array(model.optimizer.inverses(table)[0])))
