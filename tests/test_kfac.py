"""keras_tnt.KFAC against dense Fisher blocks and a NumPy transcription of docs/algorithm.md §4."""

import math

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_tnt
from keras_tnt import backend
from keras_tnt import kfac
from tests.conftest import RecordingTargets
from tests.conftest import mirrored
from tests.conftest import replica_values


class ArgmaxTargets(keras_tnt.FisherModel):
    """Deterministic "draws", so that a NumPy reference sees the same sampled labels."""

    def sample_targets(self, y_pred, seed, first_example=0):
        return tf.argmax(y_pred, axis=-1)


def _ce(labels, logits):
    return keras.losses.SparseCategoricalCrossentropy(from_logits=True)(labels, logits)


def _build(model, **kwargs):
    model.compile(optimizer=keras_tnt.KFAC(**kwargs), loss=_ce_loss())
    model.optimizer.build(model.trainable_variables)
    return model


def _ce_loss():
    return keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def _block(model, layer):
    return next(b for b in model.optimizer.blocks if b.layer is layer)


def _exact_fisher_and_kfac(model, layer, x):
    """For ONE example: the dense Fisher block of ``layer``'s ``[kernel; bias]`` and KFAC's.

    Fisher: ``sum_c p_c vec(g_c) vec(g_c)^T`` over every class ``c`` (g_c = gradient of the loss
    at label c), in the row-major order of the ``(rows, out)`` matrix ``[kernel; bias]``.
    KFAC: ``A ⊗ sum_c p_c G(s_c)`` from the library's own capture and factor code.
    """
    block = _block(model, layer)
    classes = model.output_shape[-1]
    fisher = 0.0
    factor_g = 0.0
    with tf.GradientTape(persistent=True) as tape, kfac.capture_layers([layer]) as records:
        logits = model(x)
        losses = [_ce(np.array([c]), logits) for c in range(classes)]
    a, z = records[id(layer)][0]
    p = tf.nn.softmax(logits)[0].numpy()
    for c in range(classes):
        kernel_grad, bias_grad = tape.gradient(losses[c], [layer.kernel, layer.bias])
        out = kernel_grad.shape[-1]
        g = np.concatenate(
            [np.reshape(kernel_grad, (-1, out)), np.reshape(bias_grad, (1, out))], axis=0
        ).ravel()
        fisher = fisher + p[c] * np.outer(g, g)
        factor_a, g_c = kfac.layer_factors(block, a, tape.gradient(losses[c], z), "float64")
        factor_g = factor_g + p[c] * np.asarray(g_c)
    return fisher, np.kron(np.asarray(factor_a), factor_g)


def test_dense_block_equals_the_exact_fisher_for_one_example(float64):
    keras.utils.set_random_seed(0)
    inputs = keras.Input((5,))
    hidden = keras.layers.Dense(4, activation="tanh")
    outputs = keras.layers.Dense(3)(hidden(inputs))
    model = _build(keras_tnt.FisherModel(inputs, outputs))
    x = np.random.default_rng(1).normal(size=(1, 5))
    fisher, block = _exact_fisher_and_kfac(model, hidden, x)
    assert fisher.shape == (6 * 4, 6 * 4)
    assert np.max(np.abs(fisher)) > 1e-3
    np.testing.assert_allclose(block, fisher, rtol=1e-10, atol=1e-14)


def test_conv2d_block_equals_the_exact_fisher_for_one_example(float64):
    # One output position per example: KFAC's spatial independence assumption is then exact.
    keras.utils.set_random_seed(0)
    inputs = keras.Input((3, 3, 2))
    conv = keras.layers.Conv2D(4, 3, activation="tanh")
    h = keras.layers.Flatten()(conv(inputs))
    outputs = keras.layers.Dense(3)(h)
    model = _build(keras_tnt.FisherModel(inputs, outputs))
    x = np.random.default_rng(2).normal(size=(1, 3, 3, 2))
    fisher, block = _exact_fisher_and_kfac(model, conv, x)
    assert fisher.shape == (19 * 4, 19 * 4)
    np.testing.assert_allclose(block, fisher, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize(
    "conv_kwargs",
    [
        {"strides": 2, "padding": "same"},
        {"strides": 1, "padding": "valid", "dilation_rate": 2},
        {"strides": (1, 2), "padding": "same", "use_bias": False},
    ],
)
def test_conv2d_patches_match_the_kernel_layout_and_factor_scale(float64, conv_kwargs):
    """sum_p a_p s_p^T is the kernel gradient (patch order = reshaped Keras kernel), and
    A = (1/N) sum a a^T, G = (1/(N P)) sum (N s)(N s)^T."""
    keras.utils.set_random_seed(0)
    inputs = keras.Input((7, 6, 3))
    conv = keras.layers.Conv2D(4, 3, activation="relu", **conv_kwargs)
    outputs = keras.layers.Dense(2)(keras.layers.GlobalAveragePooling2D()(conv(inputs)))
    model = _build(keras_tnt.FisherModel(inputs, outputs))
    block = _block(model, conv)
    n = 3
    x = np.random.default_rng(3).normal(size=(n, 7, 6, 3))
    with tf.GradientTape(persistent=True) as tape, kfac.capture_layers([conv]) as records:
        loss = _ce(np.array([0, 1, 1]), model(x))
    a, z = records[id(conv)][0]
    s = tape.gradient(loss, z)
    weights = [conv.kernel] + ([conv.bias] if conv.use_bias else [])
    grads = tape.gradient(loss, weights)
    patches = np.reshape(backend.extract_patches(conv, a), (-1, 27))
    s_rows = np.reshape(s, (-1, 4))
    np.testing.assert_allclose(patches.T @ s_rows, np.reshape(grads[0], (27, 4)), atol=1e-13)
    if conv.use_bias:
        np.testing.assert_allclose(s_rows.sum(0), grads[1], atol=1e-13)
        patches = np.concatenate([patches, np.ones((len(patches), 1))], axis=1)
    positions = len(s_rows) // n
    factor_a, factor_g = kfac.layer_factors(block, a, s, "float64")
    np.testing.assert_allclose(factor_a, patches.T @ patches / n, rtol=1e-12)
    np.testing.assert_allclose(
        factor_g, (n * s_rows).T @ (n * s_rows) / (n * positions), rtol=1e-12
    )


# ------------------------------------------------------------------- NumPy reference


class RefKFAC:
    """docs/algorithm.md §4 for a Dense-tanh-Dense softmax classifier, labels = argmax (as
    above)."""

    def __init__(self, weights, lr, lam, beta, rho, T1, T2, wd, diagonal=((0, 0), (0, 0))):
        self.w = [np.array(w, np.float64) for w in weights]  # W1, b1, W2, b2
        # Per layer, per factor (A, G): kept diagonal, i.e. diag(diag(F)) as a dense matrix.
        self.diagonal = diagonal
        self.lr, self.lam, self.beta, self.rho = lr, lam, beta, rho
        self.T1, self.T2, self.wd = T1, T2, wd
        self.m = [np.zeros_like(w) for w in self.w]
        self.F = [[None, None], [None, None]]
        self.Finv = [[np.zeros((5, 5)), np.zeros((3, 3))], [np.zeros((4, 4)), np.zeros((2, 2))]]
        self.t = 0
        self.count = 0
        self.warm = 0

    def _passes(self, x, y):
        w1, b1, w2, b2 = self.w
        n = len(x)
        a1 = np.tanh(x @ w1 + b1)
        z2 = a1 @ w2 + b2
        p = np.exp(z2 - z2.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)

        def backward(labels):
            s2 = (p - np.eye(p.shape[1])[labels]) / n
            s1 = (s2 @ w2.T) * (1 - a1**2)
            return s1, s2

        s1, s2 = backward(y)
        grads = [x.T @ s1, s1.sum(0), a1.T @ s2, s2.sum(0)]
        f1, f2 = backward(np.argmax(z2, axis=1))
        factors = []
        for a, s in ((x, f1), (a1, f2)):
            ab = np.concatenate([a, np.ones((n, 1))], axis=1)
            factors.append([ab.T @ ab / n, n * s.T @ s])
        for li, flags in enumerate(self.diagonal):
            for k, flag in enumerate(flags):
                if flag:
                    factors[li][k] = np.diag(np.diag(factors[li][k]))
        return grads, factors

    def warm_start(self, x):
        _, factors = self._passes(x, np.zeros(len(x), int))  # true labels unused
        self.warm += 1
        j = self.warm
        for li in range(2):
            for k in range(2):
                old = 0.0 if self.F[li][k] is None else self.F[li][k]
                self.F[li][k] = (j - 1) / j * old + factors[li][k] / j
        self.count += 1

    def step(self, x, y):
        grads, factors = self._passes(x, y)
        t = self.t
        if t % self.T1 == 0:
            for li in range(2):
                for k in range(2):
                    new = factors[li][k]
                    old = self.F[li][k]
                    self.F[li][k] = (
                        new if self.count == 0 else self.rho * old + (1 - self.rho) * new
                    )
            self.count += 1
        if (t <= self.T2 and t % self.T1 == 0) or t % self.T2 == 0:
            root = math.sqrt(self.lam)
            for li in range(2):
                for k in range(2):
                    f = self.F[li][k]
                    self.Finv[li][k] = np.linalg.inv(f + root * np.eye(len(f)))
        self.m = [self.beta * m + g for m, g in zip(self.m, grads, strict=True)]
        for li in range(2):
            mw, mb = self.m[2 * li], self.m[2 * li + 1]
            d = self.Finv[li][0] @ np.concatenate([mw, mb[None]], axis=0) @ self.Finv[li][1]
            for j, dj in ((2 * li, d[:-1]), (2 * li + 1, d[-1])):
                self.w[j] = self.w[j] * (1 - self.lr * self.wd) - self.lr * dj
        self.t += 1


def _mlp(model_cls=ArgmaxTargets):
    keras.utils.set_random_seed(5)
    inputs = keras.Input((4,))
    h = keras.layers.Dense(3, activation="tanh")(inputs)
    outputs = keras.layers.Dense(2)(h)
    return model_cls(inputs, outputs, fisher_seed=3)


@pytest.mark.parametrize(
    "warm_start, bound, diagonal",
    [
        (False, None, ((0, 0), (0, 0))),
        (True, None, ((0, 0), (0, 0))),
        # The first layer's 4 input rows exceed 3: a diagonal A (its bias entry stays 1).
        (True, 3, ((1, 0), (0, 0))),
        # An override: every factor of the second layer diagonal.
        (False, "override", ((0, 0), (1, 1))),
    ],
)
def test_training_matches_numpy_reference(float64, warm_start, bound, diagonal):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(48, 4))
    y = rng.integers(0, 2, size=48)
    settings = {
        "learning_rate": 0.05,
        "damping": 0.3,
        "momentum": 0.9,
        "statistics_decay": 0.9,
        "curvature_update_period": 2,
        "inverse_update_period": 3,
        "weight_decay": 0.1,
    }
    model = _mlp()
    if bound == "override":
        settings["factor_overrides"] = {f"^{model.layers[2].name}/": "diagonal"}
    elif bound is not None:
        settings["max_factor_dim"] = bound
    model.compile(optimizer=keras_tnt.KFAC(**settings), loss=_ce_loss())
    ref = RefKFAC(
        [np.array(w) for w in model.trainable_variables],
        lr=0.05,
        lam=0.3,
        beta=0.9,
        rho=0.9,
        T1=2,
        T2=3,
        wd=0.1,
        diagonal=diagonal,
    )
    if warm_start:
        model.warm_start(x[:32], batch_size=16, verbose=0)
        ref.warm_start(x[:16])
        ref.warm_start(x[16:32])
    model.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0)
    for _ in range(2):
        for i in range(3):
            ref.step(x[16 * i : 16 * (i + 1)], y[16 * i : 16 * (i + 1)])
    opt = model.optimizer
    assert opt.curvature_updates == 3 + (2 if warm_start else 0)
    for actual, expected in zip(model.trainable_variables, ref.w, strict=True):
        np.testing.assert_allclose(np.array(actual), expected, rtol=1e-10, atol=1e-13)
    assert [b.diagonal for b in opt.blocks] == [tuple(map(bool, d)) for d in diagonal]
    for li, layer in enumerate(b.layer for b in opt.blocks):
        for k, (actual, expected) in enumerate(zip(opt.factors(layer), ref.F[li], strict=True)):
            if diagonal[li][k]:  # kept as its diagonal, a vector
                assert np.array(actual).shape == (len(expected),)
                expected = np.diag(expected)
            np.testing.assert_allclose(np.array(actual), expected, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("T1,T2", [(1, 20), (10, 100), (3, 7)])
def test_schedules(T1, T2):
    model = _build(_mlp(), curvature_update_period=T1, inverse_update_period=T2)
    opt = model.optimizer
    for t in range(0, 3 * T2 + 2):
        opt.iterations.assign(t)
        assert bool(opt.curvature_due()) == (t % T1 == 0), t
        expected = (t <= T2 and t % T1 == 0) or t % T2 == 0
        assert bool(opt._refresh_due()) == expected, t


# ----------------------------------------------------------------------- behaviour


def test_batchnorm_gets_plain_momentum_and_is_reported():
    keras.utils.set_random_seed(0)
    inputs = keras.Input((6,))
    h = keras.layers.Dense(5, name="hidden")(inputs)
    h = keras.layers.BatchNormalization(name="bn")(h)
    outputs = keras.layers.Dense(3, name="logits")(h)
    model = keras_tnt.FisherModel(inputs, outputs)
    model.compile(optimizer=keras_tnt.KFAC(learning_rate=0.1), loss=_ce_loss())
    x = np.random.default_rng(0).normal(size=(16, 6)).astype("float32")
    y = np.arange(16) % 3
    bn = model.get_layer("bn")
    gamma, beta = (np.array(v) for v in (bn.gamma, bn.beta))
    with tf.GradientTape() as tape:
        loss = _ce(y, model(x, training=True))
    g_gamma, g_beta = tape.gradient(loss, [bn.gamma, bn.beta])
    with pytest.warns(UserWarning, match=r"1 layer\(s\).*bn \(BatchNormalization"):
        model.train_on_batch(x, y)
    opt = model.optimizer
    assert [b.layer.name for b in opt.blocks] == ["hidden", "logits"]
    assert list(opt.unfactored_layers) == ["bn"]
    np.testing.assert_allclose(np.array(bn.gamma), gamma - 0.1 * np.array(g_gamma), atol=1e-6)
    np.testing.assert_allclose(np.array(bn.beta), beta - 0.1 * np.array(g_beta), atol=1e-6)


def test_plain_keras_model_gets_a_clear_error():
    keras.utils.set_random_seed(0)
    inputs = keras.Input((4,))
    model = keras.Model(inputs, keras.layers.Dense(2)(inputs))
    model.compile(optimizer=keras_tnt.KFAC(), loss=_ce_loss())
    with pytest.raises(ValueError, match="FisherModel"):
        model.fit(np.zeros((4, 4)), np.zeros(4), verbose=0)


def test_shared_layer_gets_a_clear_error():
    keras.utils.set_random_seed(0)
    inputs = keras.Input((4,))
    shared = keras.layers.Dense(4, activation="tanh")
    outputs = keras.layers.Dense(2)(shared(shared(inputs)))
    model = keras_tnt.FisherModel(inputs, outputs)
    model.compile(optimizer=keras_tnt.KFAC(), loss=_ce_loss())
    with pytest.raises(ValueError, match="ran 2 times"):
        model.fit(np.zeros((4, 4)), np.zeros(4), verbose=0)


@pytest.mark.parametrize(
    "kwargs,name",
    [
        ({"damping": -1.0}, "damping"),
        ({"damping": 0.0}, "damping"),
        ({"curvature_update_period": 0}, "curvature_update_period"),
        ({"statistics_decay": 1.0}, "statistics_decay"),
        ({"learning_rate": -1e-3}, "learning_rate"),
    ],
)
def test_bad_hyper_parameters_raise(kwargs, name):
    with pytest.raises(ValueError, match=f"`{name}`"):
        keras_tnt.KFAC(**kwargs)


@pytest.mark.parametrize("value", [True, False])
def test_empirical_fisher_is_refused_not_dropped(value):
    # KFAC's factors always come from the layers' sampled pre-activation gradients.
    with pytest.raises(TypeError, match="`empirical_fisher` is not one of its arguments"):
        keras_tnt.KFAC(empirical_fisher=value)
    assert "empirical_fisher" not in keras_tnt.KFAC().get_config()


def test_non_finite_gradient_never_reaches_the_layer():
    model = _build(_mlp(keras_tnt.FisherModel), learning_rate=0.1)
    opt = model.optimizer
    weights = model.trainable_variables
    before = [np.array(w) for w in weights]
    grads = [np.ones(w.shape, "float32") for w in weights]
    grads[1] = np.full(weights[1].shape, np.nan, "float32")  # first layer's bias
    opt.update_curvature(
        [
            (np.ones((2, 4), "float32"), np.ones((2, 3), "float32")),
            (np.ones((2, 3), "float32"), np.ones((2, 2), "float32")),
        ]
    )
    opt.apply(grads, weights)
    np.testing.assert_array_equal(np.array(weights[0]), before[0])
    np.testing.assert_array_equal(np.array(weights[1]), before[1])
    assert not np.allclose(np.array(weights[2]), before[2])
    assert opt.skipped_updates == 1
    assert all(np.all(np.isfinite(np.array(w))) for w in weights)
    # The flag is cleared: the next finite step moves the layer again.
    grads[1] = np.ones(weights[1].shape, "float32")
    opt.apply(grads, weights)
    assert not np.allclose(np.array(weights[0]), before[0])


def test_save_load_restores_factors_and_the_next_step(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(32, 4)).astype("float32")
    y = rng.integers(0, 2, size=32)
    model = _mlp()
    model.compile(optimizer=keras_tnt.KFAC(learning_rate=0.05), loss=_ce_loss())
    model.fit(x, y, batch_size=16, epochs=1, verbose=0)
    path = str(tmp_path / "kfac.keras")
    model.save(path)
    restored = keras.models.load_model(path, custom_objects={"ArgmaxTargets": ArgmaxTargets})
    assert isinstance(restored.optimizer, keras_tnt.KFAC)
    for a, b in zip(model.optimizer.variables, restored.optimizer.variables, strict=True):
        np.testing.assert_array_equal(np.array(a), np.array(b), err_msg=a.path)
    model.train_on_batch(x[:16], y[:16])
    restored.train_on_batch(x[:16], y[:16])
    for a, b in zip(model.weights, restored.weights, strict=True):
        np.testing.assert_array_equal(np.array(a), np.array(b))


def test_mirrored_replicas_identical_and_equal_to_one_device():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 4)).astype("float32")
    y = rng.integers(0, 2, size=64)
    results = []
    for strategy in (None, mirrored()):
        scope = strategy.scope() if strategy else tf.distribute.get_strategy().scope()
        with scope:
            model = _mlp()
            model.compile(
                optimizer=keras_tnt.KFAC(learning_rate=0.05, inverse_update_period=2),
                loss=_ce_loss(),
            )
        model.warm_start(x, batch_size=32, verbose=0)
        model.fit(x, y, batch_size=32, epochs=2, verbose=0, shuffle=False)
        if strategy:
            for v in model.weights + model.optimizer.variables:
                parts = replica_values(v)
                assert len(parts) == 2
                np.testing.assert_array_equal(parts[0], parts[1], err_msg=v.path)
        results.append([np.array(v) for v in model.weights + model.optimizer.variables])
    for a, b in zip(*results, strict=True):
        np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-6)


def test_jit_compile_matches_eager_graph(float64):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(32, 4))
    y = rng.integers(0, 2, size=32)
    results = []
    for jit in (False, True):
        model = _mlp()
        model.compile(
            optimizer=keras_tnt.KFAC(learning_rate=0.05), loss=_ce_loss(), jit_compile=jit
        )
        # Keras drops jit_compile=True (with a warning only) where it cannot compile the model.
        assert model.jit_compile is jit
        model.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0)
        results.append([np.array(w) for w in model.weights])
    for a, b in zip(*results, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12)


def test_mirrored_partial_last_batch_matches_one_device():
    """Replicas with unequal (or no) examples: the factors are still the global batch's."""
    rng = np.random.default_rng(1)
    for n in (39, 33):  # last batch of 7 (split 4 + 3) and of 1 (one replica empty)
        x = rng.normal(size=(n, 4)).astype("float32")
        factors = []
        for strategy in (None, mirrored()):
            scope = strategy.scope() if strategy else tf.distribute.get_strategy().scope()
            with scope:
                model = _mlp()
                model.compile(optimizer=keras_tnt.KFAC(learning_rate=1e-3), loss=_ce_loss())
            model.warm_start(x, batch_size=16, verbose=0)
            opt = model.optimizer
            assert opt.skipped_curvature_updates == 0
            factors.append([np.array(f) for b in opt.blocks for f in opt.factors(b.layer)])
        for a, b in zip(*factors, strict=True):
            np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-7)


def test_containers_are_not_reported_and_unused_layers_get_a_clear_error():
    keras.utils.set_random_seed(0)
    inner = keras.Sequential(
        [keras.Input((4,)), keras.layers.Dense(3, activation="tanh", name="inner_dense")],
        name="inner",
    )
    unused = keras.layers.Dense(2, name="unused")
    unused.build((None, 4))
    inputs = keras.Input((4,))
    outputs = keras.layers.Dense(2, name="logits")(inner(inputs))
    model = keras_tnt.FisherModel(inputs, outputs)
    model.compile(optimizer=keras_tnt.KFAC(), loss=_ce_loss())
    model.optimizer.build(model.trainable_variables)
    assert [b.layer.name for b in model.optimizer.blocks] == ["inner_dense", "logits"]
    assert model.optimizer.unfactored_layers == {}

    class WithUnused(keras.layers.Layer):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.used = keras.layers.Dense(2)
            self.unused = keras.layers.Dense(2)

        def build(self, shape):
            self.used.build(shape)
            self.unused.build(shape)

        def call(self, x):
            return self.used(x)

    outputs = WithUnused()(inputs)
    model = keras_tnt.FisherModel(inputs, outputs)
    model.compile(optimizer=keras_tnt.KFAC(), loss=_ce_loss())
    with pytest.raises(ValueError, match="never called it"):
        model.fit(np.zeros((4, 4)), np.zeros(4), verbose=0)


@pytest.mark.parametrize("optimizer", [keras_tnt.KFAC, keras_tnt.TNT])
def test_compiled_but_untrained_model_loads(tmp_path, optimizer):
    model = _mlp()
    model.compile(optimizer=optimizer(), loss=_ce_loss())
    path = str(tmp_path / "untrained.keras")
    model.save(path)
    restored = keras.models.load_model(path, custom_objects={"ArgmaxTargets": ArgmaxTargets})
    assert type(restored.optimizer) is optimizer
    restored.fit(np.zeros((8, 4), "float32"), np.zeros(8), verbose=0)
    assert int(restored.optimizer.iterations) == 1


def test_failed_inversion_keeps_the_previous_inverse_and_is_counted(float64):
    """A factor whose damped Cholesky fails (here: not finite) keeps its previous inverse; the
    layer's other factor is refreshed; the failure is counted; the weights stay finite."""
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(16, 4)), rng.integers(0, 2, size=16)
    model = _mlp(keras_tnt.FisherModel)
    model.compile(
        optimizer=keras_tnt.KFAC(learning_rate=0.05, inverse_update_period=1), loss=_ce_loss()
    )
    model.fit(x, y, batch_size=16, epochs=1, verbose=0)
    opt = model.optimizer
    layer = opt.blocks[0].layer
    previous = [np.array(a) for a in opt.factor_inverses(layer)]
    factor_g = np.array(opt.factors(layer)[1])
    opt.factors(layer)[0].assign(np.full(previous[0].shape, np.nan))
    opt.factors(layer)[1].assign(2.0 * factor_g)
    inverses, failed = opt._refresh(0)
    assert int(failed) == 1
    np.testing.assert_array_equal(np.array(inverses[0]), previous[0])
    expected_g = np.linalg.inv(2.0 * factor_g + math.sqrt(0.3) * np.eye(len(factor_g)))
    np.testing.assert_allclose(np.array(inverses[1]), expected_g, rtol=1e-9)
    # Through a training step: the NaN factor stays NaN in the moving average, the refresh
    # (due every step) fails, the previous inverse stays, and the weights move and stay finite.
    before_weights = [np.array(w) for w in model.trainable_variables]
    before = opt.failed_inversions
    model.fit(x, y, batch_size=16, epochs=1, verbose=0)
    assert opt.failed_inversions == before + 1
    np.testing.assert_array_equal(np.array(opt.factor_inverses(layer)[0]), previous[0])
    for w, w0 in zip(model.trainable_variables, before_weights, strict=True):
        assert np.all(np.isfinite(np.array(w))) and not np.array_equal(np.array(w), w0)


class RecordingKFAC(RecordingTargets, keras_tnt.FisherModel):
    pass


def _im2col_3x3(x):
    """(n, H, W, C) -> (n, positions, 9 C): valid 3x3 patches, row-major over (kh, kw, C)."""
    n, height, width, _ = x.shape
    patches = [
        x[:, i : i + 3, j : j + 3, :].reshape(n, -1)
        for i in range(height - 2)
        for j in range(width - 2)
    ]
    return np.stack(patches, axis=1)


class RefConvKFAC:
    """docs/algorithm.md §4 for Conv2D(2, 3x3, valid, bias) - tanh - Flatten - Dense(3), softmax
    cross-entropy, written out in NumPy (forward, backward, im2col, factors, step)."""

    def __init__(self, weights, lr, lam, beta, rho, T1, T2, wd):
        self.w = [np.array(w, np.float64) for w in weights]  # K, b, W2, b2
        self.lr, self.lam, self.beta, self.rho = lr, lam, beta, rho
        self.T1, self.T2, self.wd = T1, T2, wd
        self.m = [np.zeros_like(w) for w in self.w]
        self.F = [[None, None], [None, None]]
        self.Finv = [[None, None], [None, None]]
        self.t = self.count = self.warm = 0

    def _passes(self, x, true_labels, drawn_labels):
        kernel, b, w2, b2 = self.w
        n = len(x)
        patches = _im2col_3x3(x)  # (n, P, 9 C)
        positions = patches.shape[1]
        k2 = kernel.reshape(-1, kernel.shape[-1])
        a1 = np.tanh(patches @ k2 + b)  # (n, P, 2)
        flat = a1.reshape(n, -1)
        z2 = flat @ w2 + b2
        p = np.exp(z2 - z2.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)

        def backward(labels):
            s2 = (p - np.eye(p.shape[1])[labels]) / n
            s1 = (s2 @ w2.T).reshape(a1.shape) * (1 - a1**2)
            return s1, s2

        s1, s2 = backward(true_labels)
        grads = [
            np.einsum("npi,npo->io", patches, s1).reshape(kernel.shape),
            s1.sum((0, 1)),
            flat.T @ s2,
            s2.sum(0),
        ]
        if drawn_labels is None:
            return grads, None
        f1, f2 = backward(drawn_labels)
        pa = np.concatenate([patches.reshape(n * positions, -1), np.ones((n * positions, 1))], 1)
        s = n * f1.reshape(n * positions, -1)
        ab = np.concatenate([flat, np.ones((n, 1))], axis=1)
        factors = [[pa.T @ pa / n, s.T @ s / (n * positions)], [ab.T @ ab / n, n * f2.T @ f2]]
        return grads, factors

    def warm_start(self, x, drawn):
        _, factors = self._passes(x, drawn, drawn)
        self.warm += 1
        j = self.warm
        for li in range(2):
            for k in range(2):
                old = 0.0 if self.F[li][k] is None else self.F[li][k]
                self.F[li][k] = (j - 1) / j * old + factors[li][k] / j
        self.count += 1

    def step(self, x, y, drawn):
        t = self.t
        grads, factors = self._passes(x, y, drawn if t % self.T1 == 0 else None)
        if t % self.T1 == 0:
            for li in range(2):
                for k in range(2):
                    old = self.F[li][k]
                    new = factors[li][k]
                    self.F[li][k] = (
                        new if self.count == 0 else self.rho * old + (1 - self.rho) * new
                    )
            self.count += 1
        if (t <= self.T2 and t % self.T1 == 0) or t % self.T2 == 0:
            root = math.sqrt(self.lam)
            for li in range(2):
                for k in range(2):
                    f = self.F[li][k]
                    self.Finv[li][k] = np.linalg.inv(f + root * np.eye(len(f)))
        self.m = [self.beta * m + g for m, g in zip(self.m, grads, strict=True)]
        for li in range(2):
            mw, mb = self.m[2 * li], self.m[2 * li + 1]
            rows = mw.reshape(-1, mw.shape[-1])
            d = self.Finv[li][0] @ np.concatenate([rows, mb[None]], axis=0) @ self.Finv[li][1]
            for j, dj in ((2 * li, d[:-1].reshape(mw.shape)), (2 * li + 1, d[-1])):
                self.w[j] = self.w[j] * (1 - self.lr * self.wd) - self.lr * dj
        self.t += 1


def test_conv2d_training_with_sampled_labels_matches_numpy(float64):
    """KFAC on a Conv2D + Dense classifier with the real sampler (labels drawn from the model's
    softmax, recorded): a warm start and four steps equal the NumPy reference's weights and
    factors."""
    rng = np.random.default_rng(1)
    x = rng.normal(size=(40, 5, 5, 1))
    y = rng.integers(0, 3, size=40)
    keras.utils.set_random_seed(2)
    inputs = keras.Input((5, 5, 1))
    h = keras.layers.Activation("tanh")(keras.layers.Conv2D(2, 3)(inputs))
    outputs = keras.layers.Dense(3)(keras.layers.Flatten()(h))
    model = RecordingKFAC(inputs, outputs, fisher_seed=9)
    model.__dict__["_recorded"] = tf.Variable(tf.zeros((8,), tf.int32), trainable=False)
    settings = dict(lr=0.05, lam=0.3, beta=0.9, rho=0.8, T1=1, T2=2, wd=0.01)
    model.compile(
        optimizer=keras_tnt.KFAC(
            learning_rate=0.05,
            damping=0.3,
            momentum=0.9,
            statistics_decay=0.8,
            curvature_update_period=1,
            inverse_update_period=2,
            weight_decay=0.01,
        ),
        loss=_ce_loss(),
    )
    ref = RefConvKFAC([np.array(w) for w in model.trainable_variables], **settings)
    model.warm_start(x[:8], batch_size=8, verbose=0)
    ref.warm_start(x[:8], model.__dict__["_recorded"].numpy())
    draws = []
    for step in range(4):
        xb, yb = x[8 + 8 * step : 16 + 8 * step], y[8 + 8 * step : 16 + 8 * step]
        model.train_on_batch(xb, yb)
        drawn = model.__dict__["_recorded"].numpy()
        draws.append(drawn)
        ref.step(xb, yb, drawn)
        for v, want in zip(model.trainable_variables, ref.w, strict=True):
            np.testing.assert_allclose(np.array(v), want, rtol=1e-10, atol=1e-12, err_msg=v.path)
    # Real draws: not the argmax, and not all the true labels.
    assert any(not np.array_equal(d, y[8 + 8 * i : 16 + 8 * i]) for i, d in enumerate(draws))
    opt = model.optimizer
    for li, block in enumerate(opt.blocks):
        for actual, expected in zip(opt.factors(block.layer), ref.F[li], strict=True):
            np.testing.assert_allclose(np.array(actual), expected, rtol=1e-10, atol=1e-14)
