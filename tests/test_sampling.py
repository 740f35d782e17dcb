"""The Fisher pass draws targets from the right distribution, so that E[Ĝ Ĝ^T] is the Fisher.

On a one-layer model ``z = x W + b`` (optionally followed by softmax/sigmoid) the gradient of the
loss with respect to the weights is ``g = A r`` with ``r = dloss/dz`` and ``A`` the constant
Jacobian ``[x ⊗ I; I]`` (kernel flattened row-major, then bias), so the Fisher of the weights is
``A F_z A^T``, with ``F_z`` the Fisher of the output distribution in the pre-activation ``z``,
times the square of the factor by which the loss differs from the negative log-likelihood:

* softmax cross-entropy: ``diag(p) - p p^T``
* Keras binary cross-entropy (mean over ``C`` units): ``diag(p (1 - p)) / C^2``
* summed binary cross-entropy: ``diag(p (1 - p))``
* Keras mean squared error = NLL of ``N(z, C/2 I)``: ``(2 / C) I``
* half squared error = NLL of ``N(z, I)``: ``I``

The Monte Carlo side runs the real code (``FisherModel._seed`` -> ``_fisher_gradients`` ->
``TargetSampler.sample``) once per seed. Every statistical tolerance is ``Z`` standard errors of
the estimate at the number of draws used; the seeds are fixed, so the tests are deterministic.
"""

import itertools

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_tnt
from keras_tnt.sampling import SUPPORTED_LOSSES
from keras_tnt.sampling import resolve_sampler
from tests.conftest import mirrored

Z = 5.0  # standard errors allowed for every Monte Carlo estimate
DRAWS = 40_000  # sampled-label gradients per Fisher test (one per seed)
FREQUENCY_DRAWS = 200_000  # targets per distribution-frequency test
IN, OUT = 3, 5
X = np.array([[1.0, -0.5, 2.0]])
# Distinct rows for the batch test; row weights for sample_weight.
X_BATCH = np.array([[1.0, -0.5, 2.0], [-1.5, 0.5, 0.25], [0.3, 1.2, -0.8]])
WEIGHTS = np.array([1.0, 0.5, 2.0])


def _kernel_and_bias():
    rng = np.random.default_rng(0)
    return 0.6 * rng.standard_normal((IN, OUT)), 0.5 * rng.standard_normal(OUT)


def _softmax(z):
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def _sigmoid(z):
    return 1.0 / (1.0 + np.exp(-z))


# id -> (loss factory, output activation, Fisher kind). The factory runs under float64.
CASES = {
    "sparse_logits": (
        lambda: keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        None,
        "categorical",
    ),
    "sparse_probs": (
        lambda: keras.losses.SparseCategoricalCrossentropy(from_logits=False),
        "softmax",
        "categorical",
    ),
    "sparse_string": (lambda: "sparse_categorical_crossentropy", "softmax", "categorical"),
    "categorical_logits": (
        lambda: keras.losses.CategoricalCrossentropy(from_logits=True),
        None,
        "categorical",
    ),
    "categorical_probs": (
        lambda: keras.losses.CategoricalCrossentropy(from_logits=False),
        "softmax",
        "categorical",
    ),
    "bce_logits": (
        lambda: keras.losses.BinaryCrossentropy(from_logits=True),
        None,
        "bernoulli_mean",
    ),
    "bce_probs": (
        lambda: keras.losses.BinaryCrossentropy(from_logits=False),
        "sigmoid",
        "bernoulli_mean",
    ),
    "bce_string": (lambda: "binary_crossentropy", "sigmoid", "bernoulli_mean"),
    "summed_bce_logits": (
        lambda: keras_tnt.losses.SummedBinaryCrossentropy(from_logits=True),
        None,
        "bernoulli_sum",
    ),
    "summed_bce_probs": (
        lambda: keras_tnt.losses.SummedBinaryCrossentropy(from_logits=False),
        "sigmoid",
        "bernoulli_sum",
    ),
    "mse_object": (lambda: keras.losses.MeanSquaredError(), None, "gaussian_mse"),
    "mse_string": (lambda: "mse", None, "gaussian_mse"),
    "half_squared_error": (lambda: keras_tnt.losses.HalfSquaredError(), None, "gaussian_half"),
}


def _output_fisher(kind, z):
    """Fisher of the per-example loss in the pre-activation ``z`` (one example)."""
    c = z.shape[-1]
    if kind == "categorical":
        p = _softmax(z)
        return np.diag(p) - np.outer(p, p)
    if kind == "bernoulli_mean":
        p = _sigmoid(z)
        return np.diag(p * (1 - p)) / c**2
    if kind == "bernoulli_sum":
        p = _sigmoid(z)
        return np.diag(p * (1 - p))
    if kind == "gaussian_mse":
        return (2.0 / c) * np.eye(c)
    if kind == "gaussian_half":
        return np.eye(c)
    raise AssertionError(kind)


def _jacobian(x):
    """d(flattened kernel, bias)/dz for one example: ``[x ⊗ I; I]``, shape (IN*OUT + OUT, OUT)."""
    return np.vstack([np.kron(x[:, None], np.eye(OUT)), np.eye(OUT)])


def _weight_fisher(kind, xs, weights):
    """E[Ĝ Ĝ^T] of the batch-mean loss: (1/B^2) Σ_i w_i^2 A_i F_z(x_i) A_i^T."""
    kernel, bias = _kernel_and_bias()
    total = 0.0
    for x, w in zip(xs, weights, strict=True):
        a = _jacobian(x)
        total = total + w**2 * a @ _output_fisher(kind, x @ kernel + bias) @ a.T
    return total / len(xs) ** 2


def _model(loss, activation, fisher_seed=11):
    inputs = keras.Input((IN,), dtype="float64")
    outputs = keras.layers.Dense(OUT, activation=activation, name="dense")(inputs)
    model = keras_tnt.FisherModel(inputs, outputs, fisher_seed=fisher_seed)
    model.get_layer("dense").set_weights(list(_kernel_and_bias()))
    model.compile(optimizer=keras_tnt.TNT(), loss=loss)
    return model


def _sampled_gradients(model, x, n, sample_weight=None):
    """``n`` sampled-label gradients (flattened kernel then bias), one per step counter."""
    x = tf.constant(x, tf.float64)
    if sample_weight is not None:
        sample_weight = tf.constant(sample_weight, tf.float64)

    @tf.function
    def run():
        def one(counter):
            with tf.GradientTape() as tape:
                y_pred = model(x)
            grads = model._fisher_gradients(
                tape, y_pred, sample_weight, model._seed(counter, stream=0)
            )
            return tf.concat([tf.reshape(g, [-1]) for g in grads], axis=0)

        # Vectorised over the counters (pfor); checked against plain eager calls below.
        return tf.vectorized_map(one, tf.range(n, dtype=tf.int64))

    grads = run().numpy()
    for counter in (0, n - 1):
        with tf.GradientTape() as tape:
            y_pred = model(x)
        seed = model._seed(tf.constant(counter, tf.int64), stream=0)
        eager = model._fisher_gradients(tape, y_pred, sample_weight, seed)
        eager = np.concatenate([g.numpy().ravel() for g in eager])
        np.testing.assert_allclose(grads[counter], eager, rtol=1e-10, atol=1e-13)
    return grads


def _check_moments(grads, fisher):
    """Sample mean -> 0 and sample second moment -> ``fisher``, each entry within Z std errors."""
    n = grads.shape[0]
    # Mean: the std of component k is sqrt(F_kk).
    mean = grads.mean(axis=0)
    mean_se = np.sqrt(np.diag(fisher) / n)
    np.testing.assert_array_less(np.abs(mean), Z * mean_se + 1e-12)

    second = grads.T @ grads / n
    squares = grads**2
    product_var = squares.T @ squares / n - second**2  # Var(g_i g_j), estimated from the draws
    second_se = np.sqrt(np.maximum(product_var, 0.0) / n)
    excess = np.abs(second - fisher) - (Z * second_se + 1e-12)
    worst = np.unravel_index(np.argmax(excess), excess.shape)
    assert excess.max() <= 0, (
        f"E[g g^T] entry {worst}: sampled {second[worst]:.6g}, analytic {fisher[worst]:.6g}, "
        f"standard error {second_se[worst]:.3g}"
    )
    return second


def _all_targets(sampler):
    """Every outcome of one example's target, in the sampler's format, with its probability."""
    kernel, bias = _kernel_and_bias()
    z = X[0] @ kernel + bias
    if sampler.distribution in ("sparse_categorical", "categorical"):
        probs = _softmax(z)
        if sampler.distribution == "sparse_categorical":
            targets = np.arange(OUT).reshape(OUT, 1)
        else:
            targets = np.eye(OUT)
        return targets, probs
    p = _sigmoid(z)
    targets = np.array(list(itertools.product([0.0, 1.0], repeat=OUT)))
    probs = np.prod(np.where(targets == 1.0, p, 1 - p), axis=1)
    return targets, probs


# Probability-output cases cover Keras' shortcut from softmax/sigmoid outputs to their cached
# logits, which the Fisher pass must not take (the loss would not depend on the watched output).


def _cases(names):
    return [name for name in names]


@pytest.mark.parametrize("case", _cases(sorted(CASES)))
def test_sampled_gradient_second_moment_is_the_fisher(float64, case):
    factory, activation, kind = CASES[case]
    model = _model(factory(), activation)
    fisher = _weight_fisher(kind, X, [1.0])

    if not kind.startswith("gaussian"):
        # The analytic reference equals the exact expectation over every outcome, with the
        # gradients of the very loss the model was compiled with.
        targets, probs = _all_targets(model._sampler)
        xs = tf.constant(np.repeat(X, len(probs), axis=0))
        with tf.GradientTape() as tape:
            per_example = model._sampler.loss.call(tf.constant(targets), model(xs))
        jac = tape.jacobian(per_example, model.trainable_variables)
        g = np.concatenate([j.numpy().reshape(len(probs), -1) for j in jac], axis=1)
        np.testing.assert_allclose(probs @ g, 0.0, atol=1e-9)
        np.testing.assert_allclose((g.T * probs) @ g, fisher, rtol=1e-5, atol=1e-10)

    grads = _sampled_gradients(model, X, DRAWS)
    assert grads.shape == (DRAWS, (IN + 1) * OUT)
    _check_moments(grads, fisher)


@pytest.mark.parametrize(
    "case",
    _cases(["sparse_logits", "categorical_probs", "bce_logits", "summed_bce_probs", "mse_string"]),
)
def test_batch_mean_with_weights_draws_each_row_independently(float64, case):
    # E[Ĝ Ĝ^T] = (1/B^2) Σ_i w_i^2 F_i holds only if the rows' draws are independent and the
    # sampled loss is the same weighted batch mean as the training loss.
    factory, activation, kind = CASES[case]
    model = _model(factory(), activation)
    grads = _sampled_gradients(model, X_BATCH, DRAWS // 2, sample_weight=WEIGHTS)
    _check_moments(grads, _weight_fisher(kind, X_BATCH, WEIGHTS))


def _sampler_and_output(loss, activation):
    """The sampler for ``loss`` and the model output at X (logits or probabilities), float64."""
    kernel, bias = _kernel_and_bias()
    z = X[0] @ kernel + bias
    output = {None: z, "softmax": _softmax(z), "sigmoid": _sigmoid(z)}[activation]
    return resolve_sampler(loss), z, output


def _seed(a, b=0):
    return tf.constant([a, b], tf.int64)


def _assert_within(estimate, expected, se, what):
    """|estimate - expected| <= Z standard errors, elementwise."""
    np.testing.assert_array_less(np.abs(estimate - expected), Z * se, err_msg=what)


# float32 (Keras' default) and float64 outputs take different paths through the random bits.
DTYPES = (np.float32, np.float64)


def test_categorical_class_frequencies_are_the_softmax_probabilities():
    cases = ("sparse_logits", "sparse_probs", "categorical_logits", "categorical_probs")
    for case, dtype in itertools.product(cases, DTYPES):
        what = f"{case}, {dtype.__name__}"
        factory, activation, _ = CASES[case]
        sampler, z, output = _sampler_and_output(factory(), activation)
        y_pred = tf.constant(np.tile(output, (FREQUENCY_DRAWS, 1)), dtype)
        draws = sampler.sample(y_pred, _seed(3)).numpy()
        if sampler.distribution == "sparse_categorical":
            assert draws.shape == (FREQUENCY_DRAWS,), what
            assert np.issubdtype(draws.dtype, np.integer), what
            labels = draws
        else:
            assert draws.shape == (FREQUENCY_DRAWS, OUT), what
            assert draws.dtype == dtype, what
            assert set(np.unique(draws)) == {0.0, 1.0}, what
            np.testing.assert_array_equal(draws.sum(axis=1), 1.0, err_msg=what)
            labels = draws.argmax(axis=1)
        assert labels.min() >= 0 and labels.max() < OUT, what
        p = _softmax(z)
        frequencies = np.bincount(labels, minlength=OUT) / FREQUENCY_DRAWS
        _assert_within(frequencies, p, np.sqrt(p * (1 - p) / FREQUENCY_DRAWS), what)


def test_sparse_draws_keep_the_leading_axes_of_sequence_outputs():
    sampler = resolve_sampler(keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    logits = np.array([[[0.0, 3.0, -2.0], [1.0, -1.0, 0.5]]])  # (batch 1, 2 steps, 3 classes)
    n = FREQUENCY_DRAWS // 2
    draws = sampler.sample(tf.constant(np.tile(logits, (n, 1, 1))), _seed(4)).numpy()
    assert draws.shape == (n, 2)
    for step in range(2):
        p = _softmax(logits[0, step])
        frequencies = np.bincount(draws[:, step], minlength=3) / n
        _assert_within(frequencies, p, np.sqrt(p * (1 - p) / n), f"step {step}")


def test_bernoulli_frequencies_are_the_sigmoid_probabilities():
    cases = ("bce_logits", "bce_probs", "summed_bce_logits", "summed_bce_probs")
    for case, dtype in itertools.product(cases, DTYPES):
        what = f"{case}, {dtype.__name__}"
        factory, activation, _ = CASES[case]
        sampler, z, output = _sampler_and_output(factory(), activation)
        y_pred = tf.constant(np.tile(output, (FREQUENCY_DRAWS, 1)), dtype)
        draws = sampler.sample(y_pred, _seed(5)).numpy()
        assert draws.shape == (FREQUENCY_DRAWS, OUT), what
        assert draws.dtype == dtype, what
        assert set(np.unique(draws)) == {0.0, 1.0}, what
        p = _sigmoid(z)
        _assert_within(draws.mean(axis=0), p, np.sqrt(p * (1 - p) / FREQUENCY_DRAWS), what)
        # Units are drawn independently: every correlation is ~N(0, 1/n).
        corr = np.corrcoef(draws, rowvar=False)[np.triu_indices(OUT, 1)]
        _assert_within(corr, 0.0, 1 / np.sqrt(FREQUENCY_DRAWS), f"correlations, {what}")


def test_gaussian_draws_have_mean_z_and_the_loss_variance():
    n = FREQUENCY_DRAWS // 4
    configurations = [
        (keras_tnt.losses.HalfSquaredError(), (OUT,), 1.0),
        (keras.losses.MeanSquaredError(), (OUT,), OUT / 2),
        ("mse", (2,), 1.0),
        ("mean_squared_error", (8,), 4.0),
        # Keras' MSE averages over the last axis only: C is the last axis, not all outputs.
        (keras.losses.MeanSquaredError(), (3, 6), 3.0),
    ]
    for (loss, shape, variance), dtype in itertools.product(configurations, DTYPES):
        what = f"{loss!r} on outputs of shape {shape}, {dtype.__name__}"
        sampler = resolve_sampler(loss)
        z = np.linspace(-2.0, 3.0, int(np.prod(shape))).reshape(shape).astype(dtype)
        draws = sampler.sample(tf.constant(np.broadcast_to(z, (n, *shape))), _seed(6)).numpy()
        assert draws.shape == (n, *shape), what
        assert draws.dtype == dtype, what
        noise = (draws.astype(np.float64) - z).reshape(n, -1)
        _assert_within(noise.mean(axis=0), 0.0, np.sqrt(variance / n), f"mean, {what}")
        _assert_within(noise.var(axis=0), variance, variance * np.sqrt(2 / n), f"var, {what}")
        # Normal, not just the right variance: P(|x| < σ) and P(|x| < 2σ).
        for k, probability in ((1, 0.682689492137), (2, 0.954499736104)):
            inside = (np.abs(noise) < k * np.sqrt(variance)).mean(axis=0)
            se = np.sqrt(probability * (1 - probability) / n)
            _assert_within(inside, probability, se, f"P(|x| < {k}σ), {what}")
        # Independent units: every off-diagonal covariance is ~N(0, σ^4/n).
        cov = np.cov(noise, rowvar=False)[np.triu_indices(noise.shape[1], 1)]
        _assert_within(cov, 0.0, variance / np.sqrt(n), f"covariance, {what}")


# ------------------------------------------------------------------ supported / unsupported


def _tiny_model(outputs=1, activation=None):
    inputs = keras.Input((IN,))
    heads = [keras.layers.Dense(OUT, activation=activation)(inputs) for _ in range(outputs)]
    return keras_tnt.FisherModel(inputs, heads if outputs > 1 else heads[0], fisher_seed=1)


def test_unsupported_losses_raise_naming_the_supported_ones():
    for loss in [
        keras.losses.Huber(),
        "mae",
        "huber",
        keras.losses.KLDivergence(),
        keras.losses.BinaryFocalCrossentropy(),
        lambda y_true, y_pred: keras.ops.mean(keras.ops.abs(y_true - y_pred), axis=-1),
        None,
    ]:
        model = _tiny_model()
        with pytest.raises(ValueError, match="Supported") as info:
            model.compile(optimizer=keras_tnt.TNT(), loss=loss)
        message = str(info.value)
        assert SUPPORTED_LOSSES in message, loss
        for name in (
            "SparseCategoricalCrossentropy",
            "CategoricalCrossentropy",
            "BinaryCrossentropy",
            "MeanSquaredError",
            "SummedBinaryCrossentropy",
            "HalfSquaredError",
        ):
            assert name in message, (loss, name)


def test_supported_losses_with_unsupported_options_raise():
    for loss, match in [
        (keras.losses.BinaryCrossentropy(label_smoothing=0.1), "label_smoothing"),
        (keras.losses.CategoricalCrossentropy(label_smoothing=0.1), "label_smoothing"),
        (keras.losses.CategoricalCrossentropy(axis=0), "axis"),
        (keras.losses.SparseCategoricalCrossentropy(ignore_class=0), "ignore_class"),
        (["mse"], "single-output"),
        ({"out": "mse"}, "single-output"),
    ]:
        model = _tiny_model()
        with pytest.raises(ValueError, match=match):
            model.compile(optimizer=keras_tnt.TNT(), loss=loss)


def test_multi_output_model_raises():
    model = _tiny_model(outputs=2)
    with pytest.raises(ValueError, match="single-output"):
        model.compile(optimizer=keras_tnt.TNT(), loss="mse")


def test_unsupported_loss_is_fine_with_a_first_order_optimizer():
    model = _tiny_model()
    model.compile(optimizer="adam", loss=keras.losses.Huber())
    assert model._sampler is None


def test_supported_losses_compile():
    for loss, distribution, from_logits in [
        (keras.losses.SparseCategoricalCrossentropy(from_logits=True), "sparse_categorical", True),
        ("sparse_categorical_crossentropy", "sparse_categorical", False),
        (keras.losses.CategoricalCrossentropy(), "categorical", False),
        ("categorical_crossentropy", "categorical", False),
        (keras.losses.BinaryCrossentropy(from_logits=True), "bernoulli", True),
        ("binary_crossentropy", "bernoulli", False),
        (keras_tnt.losses.SummedBinaryCrossentropy(), "bernoulli", True),
        (keras_tnt.losses.SummedBinaryCrossentropy(from_logits=False), "bernoulli", False),
        ("mse", "gaussian", False),
        (keras.losses.MeanSquaredError(), "gaussian", False),
        (keras.losses.mean_squared_error, "gaussian", False),
        (keras_tnt.losses.HalfSquaredError(), "gaussian", False),
    ]:
        model = _tiny_model()
        model.compile(optimizer=keras_tnt.TNT(), loss=loss)
        sampler = model._sampler
        assert sampler.distribution == distribution, loss
        assert sampler.from_logits == from_logits, loss
        assert sampler.half_squared == isinstance(loss, keras_tnt.losses.HalfSquaredError), loss


# ------------------------------------------------------------------ seeds and replicas


def test_same_seed_same_draw_and_different_seeds_differ():
    for case in ("sparse_logits", "categorical_probs", "bce_logits", "mse_object"):
        factory, activation, _ = CASES[case]
        sampler, _, output = _sampler_and_output(factory(), activation)
        y_pred = tf.constant(np.tile(output, (64, 1)))
        first = sampler.sample(y_pred, _seed(9, 1)).numpy()
        np.testing.assert_array_equal(sampler.sample(y_pred, _seed(9, 1)).numpy(), first, case)
        # Rows of one draw differ too (not one draw broadcast over the batch).
        assert len({row.tobytes() for row in np.atleast_2d(first.T).T}) > 1, case
        for other in (_seed(9, 2), _seed(10, 1)):
            assert not np.array_equal(sampler.sample(y_pred, other).numpy(), first), case


def test_fisher_seed_step_counter_and_stream_set_the_draw(float64):
    model = _model(keras.losses.SparseCategoricalCrossentropy(from_logits=True), None)

    def words(seed):
        return tuple(int(w) for w in seed)

    assert words(model._seed(tf.constant(4), stream=0)) == words(model._seed(tf.constant(4), 0))
    seeds = {words(model._seed(tf.constant(t), stream=s)) for t in range(3) for s in (0, 1)}
    assert len(seeds) == 6
    # Same fisher_seed and counter: the same gradient; another counter or fisher_seed: another.
    x = tf.constant(np.tile(X, (32, 1)))

    def fisher(m, counter):
        with tf.GradientTape() as tape:
            y_pred = m(x)
        grads = m._fisher_gradients(tape, y_pred, None, m._seed(tf.constant(counter), 0))
        return np.concatenate([g.numpy().ravel() for g in grads])

    again = _model(keras.losses.SparseCategoricalCrossentropy(from_logits=True), None)
    other = _model(
        keras.losses.SparseCategoricalCrossentropy(from_logits=True), None, fisher_seed=12
    )
    np.testing.assert_array_equal(fisher(model, 1), fisher(again, 1))
    assert not np.allclose(fisher(model, 1), fisher(model, 2))
    assert not np.allclose(fisher(model, 1), fisher(other, 1))


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_python_seed_words_hash_as_the_tensor_seed_does(dtype):
    """The training step passes its seed as ``(model seed, stream, counter tensor)``: the
    Python words are hashed before the graph. The draws are those of the same seed as one
    tensor, bit for bit (wide and negative words too), traced or eager."""
    from keras_tnt.sampling import counter_normal
    from keras_tnt.sampling import counter_uniform

    for words in ([7, 0, 5], [2**31 - 2, 1, 2**40 + 3], [3, 2, -1], [0, 0, 0]):
        as_tensor = tf.constant(words, tf.int64)
        mixed = (words[0], words[1], tf.constant(words[2], tf.int64))
        python = tuple(words)
        for first in (0, tf.constant(37)):
            want = counter_uniform((13, 5), as_tensor, dtype, first=first).numpy()
            for seed in (mixed, python):
                got = counter_uniform((13, 5), seed, dtype, first=first).numpy()
                np.testing.assert_array_equal(got, want, str((words, seed)))
            traced = tf.function(lambda c: counter_uniform((13, 5), (*words[:2], c), dtype))
            np.testing.assert_array_equal(
                traced(tf.constant(words[2], tf.int64)).numpy(),
                counter_uniform((13, 5), as_tensor, dtype).numpy(),
            )
        np.testing.assert_array_equal(
            counter_normal((4, 3), mixed, dtype).numpy(),
            counter_normal((4, 3), as_tensor, dtype).numpy(),
        )
        # And a tensor counter in the middle (folding stops at the first tensor).
        middle = (words[0], tf.constant(words[1], tf.int64), words[2])
        np.testing.assert_array_equal(
            counter_uniform((6,), middle, dtype).numpy(),
            counter_uniform((6,), as_tensor, dtype).numpy(),
        )


def test_a_slice_draws_what_the_whole_batch_draws_there():
    """``first_example`` shifts the positions: the draws of rows k.. of a batch are rows k.. of
    the whole batch's draws, for every distribution."""
    rng = np.random.default_rng(0)
    for case in ("sparse_logits", "categorical_probs", "bce_logits", "mse_object"):
        factory, activation, _ = CASES[case]
        sampler, _, output = _sampler_and_output(factory(), activation)
        z = rng.normal(size=(50, len(output)))
        if activation == "softmax":
            z = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
        elif activation == "sigmoid":
            z = 1 / (1 + np.exp(-z))
        y_pred = tf.constant(z)
        whole = sampler.sample(y_pred, _seed(3, 1)).numpy()
        for k in (1, 17, 49):
            part = sampler.sample(y_pred[k:], _seed(3, 1), first_example=tf.constant(k)).numpy()
            np.testing.assert_array_equal(part, whole[k:], case)
        # Not the same numbers at another position.
        shifted = sampler.sample(y_pred[1:], _seed(3, 1)).numpy()
        assert not np.array_equal(shifted, whole[1:]), case


@pytest.mark.parametrize("n", [128, 127])
def test_replicas_draw_for_their_slice_what_one_device_draws(n):
    """Under MirroredStrategy each replica holds a consecutive slice of the global batch (a
    partial one too: 64 + 63) and draws for it what one device draws for the whole batch."""
    strategy = mirrored()
    with strategy.scope():
        model = _tiny_model()
        model.compile(
            optimizer=keras_tnt.TNT(),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        )
    x = np.random.default_rng(1).normal(size=(n, 3)).astype("float32")
    seed = model._seed(tf.constant(7, tf.int64), stream=0)
    one_device = model._sampler.sample(model(x), seed).numpy()
    dataset = strategy.experimental_distribute_dataset(
        tf.data.Dataset.from_tensor_slices(x).batch(n)
    )

    @tf.function
    def run(batch):
        def replica_fn(xb):
            y_pred = model(xb)
            first = model._first_example(y_pred)
            return first, model.sample_targets(y_pred, seed, first_example=first)

        return strategy.run(replica_fn, args=(batch,))

    firsts, labels = (strategy.experimental_local_results(t) for t in run(next(iter(dataset))))
    assert [int(f) for f in firsts] == [0, len(labels[0])]
    assert len(labels[0]) + len(labels[1]) == n and len(labels[1]) > 0
    np.testing.assert_array_equal(np.concatenate([t.numpy() for t in labels]), one_device)
