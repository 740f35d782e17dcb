"""TNT through a real convolutional network against the NumPy transcription of
docs/algorithm.md §2 and §5.

A bias-free 3x3 Conv2D (stride 1) + BatchNormalization + tanh, a second one with stride 2, and a
Dense head, in float64: a warm start and three training steps of `FisherModel.fit` with TNT,
against tests.test_tnt_optimizer.RefTNT fed with gradients that a separate plain Keras model
(same weights, BatchNormalization in training mode) computes by autodiff at the true labels and
at the labels the Fisher pass drew (recorded). The conv kernels' modes are (9, in, out), BN's
gamma and beta one mode each.
"""

import keras
import numpy as np
import tensorflow as tf

import keras_tnt
from tests.conftest import RecordingTargets
from tests.test_tnt_optimizer import RefTNT

SETTINGS = dict(lr=0.05, damping=0.1, momentum=0.9, decay=0.8, T1=1, T2=2)


def _network(cls, **kwargs):
    keras.utils.set_random_seed(7)
    inputs = keras.Input((6, 6, 2))
    h = keras.layers.Conv2D(3, 3, padding="same", use_bias=False)(inputs)
    h = keras.layers.Activation("tanh")(keras.layers.BatchNormalization()(h))
    h = keras.layers.Conv2D(4, 3, strides=2, padding="same", use_bias=False)(h)
    h = keras.layers.Activation("tanh")(keras.layers.BatchNormalization()(h))
    outputs = keras.layers.Dense(3)(keras.layers.Flatten()(h))
    return cls(inputs, outputs, **kwargs)


class Recording(RecordingTargets, keras_tnt.FisherModel):
    pass


def _gradients(twin, weights, x, labels):
    for v, w in zip(twin.trainable_variables, weights, strict=True):
        v.assign(w)
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    with tf.GradientTape() as tape:
        loss = loss_fn(labels, twin(x, training=True))
    return [g.numpy() for g in tape.gradient(loss, twin.trainable_variables)]


def test_tnt_on_conv_batchnorm_dense_matches_numpy(float64):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(24, 6, 6, 2))
    y = rng.integers(0, 3, size=24)
    model = _network(Recording, fisher_seed=4)
    model.__dict__["_recorded"] = tf.Variable(tf.zeros((8,), tf.int32), trainable=False)
    model.compile(
        optimizer=keras_tnt.TNT(
            learning_rate=0.05,
            damping=0.1,
            momentum=0.9,
            statistics_decay=0.8,
            curvature_update_period=1,
            inverse_update_period=2,
        ),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    twin = _network(keras.Model)
    shapes = [tuple(v.shape) for v in model.trainable_variables]
    assert shapes[0] == (3, 3, 2, 3) and shapes[3] == (3, 3, 3, 4)
    optimizer = model.optimizer
    ref = RefTNT(shapes, *SETTINGS.values())
    weights = [np.array(v) for v in model.trainable_variables]

    model.warm_start(x[:8], batch_size=8, verbose=0)
    drawn = model.__dict__["_recorded"].numpy()
    ref.accumulate_curvature(_gradients(twin, weights, x[:8], drawn))
    for step in range(3):
        xb, yb = x[8 * step : 8 * step + 8], y[8 * step : 8 * step + 8]
        model.train_on_batch(xb, yb)
        gradient = _gradients(twin, weights, xb, yb)
        if ref.curvature_due():
            drawn = model.__dict__["_recorded"].numpy()
            ref.update_curvature(_gradients(twin, weights, xb, drawn))
        weights = ref.step(weights, gradient)
        for v, want in zip(model.trainable_variables, weights, strict=True):
            np.testing.assert_allclose(np.array(v), want, rtol=1e-10, atol=1e-12, err_msg=v.path)
    assert optimizer.curvature_updates == 1 + 2  # warm start; t = 1, 2 (t = 0 skipped)
    modes = [[int(a.shape[0]) for a in optimizer.inverses(v)] for v in model.trainable_variables]
    assert modes[0] == [9, 2, 3] and modes[1] == [3] and modes[3] == [9, 3, 4]
    for v, stats, inverses in zip(model.trainable_variables, ref.H, ref.A, strict=True):
        for actual, expected in zip(optimizer.statistics(v), stats, strict=True):
            np.testing.assert_allclose(np.array(actual), expected, rtol=1e-10, atol=1e-14)
        for actual, expected in zip(optimizer.inverses(v), inverses, strict=True):
            np.testing.assert_allclose(np.array(actual), expected, rtol=1e-9, atol=1e-12)


def test_xla_step_on_conv_batchnorm_dense_equals_the_graph_step(float64):
    """The same network and settings with jit_compile=True: weights, BatchNorm statistics and
    every optimizer variable equal the graph run's after a warm start and four steps (float64,
    to 1e-10 relative: XLA reorders sums)."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 6, 6, 2))
    y = rng.integers(0, 3, size=40)
    runs = []
    for jit in (False, True):
        model = _network(keras_tnt.FisherModel, fisher_seed=4)
        model.compile(
            optimizer=keras_tnt.TNT(
                learning_rate=0.05, damping=0.1, curvature_update_period=1, inverse_update_period=2
            ),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            jit_compile=jit,
        )
        # Keras drops jit_compile=True (with a warning only) where it cannot compile the model.
        assert model.jit_compile is jit
        model.warm_start(x[:8], batch_size=8, verbose=0)
        model.fit(x[8:], y[8:], batch_size=8, epochs=1, shuffle=False, verbose=0)
        runs.append([np.array(v) for v in model.weights + model.optimizer.variables])
    assert len(runs[0]) == len(runs[1])
    for a, b in zip(*runs, strict=True):
        scale = max(np.abs(a).max(), 1e-12)
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-10 * scale)
