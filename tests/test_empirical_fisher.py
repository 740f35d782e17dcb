"""TNT with the empirical Fisher (TNT-EF, the paper's ablation D.4): statistics from g."""

import keras
import numpy as np
import tensorflow as tf

import keras_tnt


def _gram(g, axis):
    g = np.asarray(g)
    if g.ndim == 1:
        return np.outer(g, g)
    return g @ g.T if axis == 0 else g.T @ g


def _data(seed=0, n=16):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, 4)), rng.normal(size=(n, 3))


def _model(model_cls=keras.Model):
    keras.utils.set_random_seed(5)
    inputs = keras.Input((4,))
    return model_cls(inputs, keras.layers.Dense(3)(inputs))


def _gradients(model, loss, x, y):
    with tf.GradientTape() as tape:
        value = loss(y, model(x))
    return [np.array(g) for g in tape.gradient(value, model.trainable_variables)]


def test_one_step_on_a_plain_model_matches_numpy(float64):
    x, y = _data()
    model = _model()
    loss = keras.losses.Huber()  # no sampling distribution needed
    kernel0, bias0 = [np.array(w) for w in model.get_weights()]
    g_kernel, g_bias = _gradients(model, loss, x, y)
    lr, eps = 0.0625, 0.25
    model.compile(
        optimizer=keras_tnt.TNT(learning_rate=lr, damping=eps, empirical_fisher=True), loss=loss
    )
    model.train_on_batch(x, y)
    optimizer = model.optimizer
    kernel_var, bias_var = model.trainable_variables
    h_in, h_out = [np.array(h) for h in optimizer.statistics(kernel_var)]
    np.testing.assert_allclose(h_in, _gram(g_kernel, 0), rtol=1e-12)
    np.testing.assert_allclose(h_out, _gram(g_kernel, 1), rtol=1e-12)
    np.testing.assert_allclose(
        np.array(optimizer.statistics(bias_var)[0]), _gram(g_bias, 0), rtol=1e-12
    )
    # eq. (5) and the damped inverses, then D = A_in g A_out (m = g at t = 0).
    c = np.sqrt(np.trace(h_in) / 12)
    a_in = np.linalg.inv(h_in / (c * 3) + eps * np.eye(4))
    a_out = np.linalg.inv(h_out / (c * 4) + eps * np.eye(3))
    a_bias = np.linalg.inv(_gram(g_bias, 0) + eps * np.eye(3))
    kernel, bias = model.get_weights()
    np.testing.assert_allclose(kernel, kernel0 - lr * a_in @ g_kernel @ a_out, rtol=1e-10)
    np.testing.assert_allclose(bias, bias0 - lr * a_bias @ g_bias, rtol=1e-10)
    assert optimizer.curvature_updates == 1


def test_fisher_model_uses_keras_step_and_true_label_warm_start(float64):
    x, y = _data(n=32)
    model = _model(keras_tnt.FisherModel)
    loss = keras.losses.MeanAbsoluteError()  # unsupported for sampled labels; fine for EF
    model.compile(optimizer=keras_tnt.TNT(empirical_fisher=True), loss=loss)
    assert model.curvature_optimizer is None  # no Fisher training step
    batches = [(x[:16], y[:16]), (x[16:], y[16:])]
    grams = [_gram(_gradients(model, loss, bx, by)[0], 0) for bx, by in batches]
    model.warm_start(tf.data.Dataset.from_tensor_slices((x, y)).batch(16), verbose=0)
    kernel = model.trainable_variables[0]
    np.testing.assert_allclose(
        np.array(model.optimizer.statistics(kernel)[0]), np.mean(grams, axis=0), rtol=1e-12
    )
    history = model.fit(x, y, batch_size=16, epochs=3, verbose=0)
    assert np.isfinite(history.history["loss"]).all()
    # Warm start: step 0 keeps the warm statistics; steps 1..5 each fold one batch.
    assert model.optimizer.curvature_updates == 2 + 5


def test_empirical_fisher_round_trips_in_config():
    optimizer = keras_tnt.TNT(empirical_fisher=True)
    restored = keras_tnt.TNT.from_config(optimizer.get_config())
    assert restored.empirical_fisher and not restored.needs_sampled_gradients
