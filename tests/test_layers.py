"""TNT on the Keras layers people use beyond the paper's: each layer's tensors get the modes the
README lists, and one step equals a dense NumPy computation (np.kron of the inverses of every
mode's factor applied to vec(m)) on a tiny instance."""

import math

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_tnt
from keras_tnt import kronecker


def _reference_step(w, g, fisher, lr, eps):
    """One TNT step (t = 0: m = g, inverses refreshed) of one tensor, in NumPy."""
    modes = kronecker.tensor_modes(w.shape)
    if not modes:
        return w - lr * g
    k, size = len(modes), math.prod(modes)
    f = fisher.reshape(modes)
    stats = [
        np.tensordot(f, f, axes=([j for j in range(k) if j != i], [j for j in range(k) if j != i]))
        for i in range(k)
    ]
    if k > 1:
        c = (np.trace(stats[0]) / size) ** (1 / k)
        stats = [h / (c ** (k - 1) * (size // d)) for h, d in zip(stats, modes)]
    dense = np.ones((1, 1))
    for h, d in zip(stats, modes):
        dense = np.kron(dense, np.linalg.inv(h + eps * np.eye(d)))
    return w - lr * (dense @ g.reshape(-1)).reshape(w.shape)


def _inputs(shape, rng, integers=None):
    if integers:
        return rng.integers(0, integers, size=shape).astype("int32")
    return rng.standard_normal(shape)


LAYERS = {
    # name: (builder of (inputs, outputs) on float64, input shape, modes per variable path end)
    "embedding": (
        lambda x: keras.layers.Embedding(7, 3, name="layer")(x),
        ((4, 5), 7),
        {"embeddings": (7, 3)},
    ),
    "multi_head_attention": (
        lambda x: keras.layers.MultiHeadAttention(2, 3, name="layer")(x, x),
        ((2, 4, 4), None),
        {
            "query/kernel": (4, 2, 3),
            "query/bias": (2, 3),
            "key/kernel": (4, 2, 3),
            "key/bias": (2, 3),
            "value/kernel": (4, 2, 3),
            "value/bias": (2, 3),
            "attention_output/kernel": (2, 3, 4),
            "attention_output/bias": (4,),
        },
    ),
    "layer_normalization": (
        lambda x: keras.layers.LayerNormalization(name="layer")(x),
        ((3, 5), None),
        {"gamma": (5,), "beta": (5,)},
    ),
    "conv1d": (
        lambda x: keras.layers.Conv1D(3, 2, name="layer")(x),
        ((2, 5, 4), None),
        {"kernel": (2, 4, 3), "bias": (3,)},
    ),
    "depthwise_conv2d": (
        lambda x: keras.layers.DepthwiseConv2D(2, depth_multiplier=2, name="layer")(x),
        ((2, 4, 4, 3), None),
        {"kernel": (4, 3, 2), "bias": (6,)},
    ),
    "separable_conv2d": (
        lambda x: keras.layers.SeparableConv2D(4, 2, name="layer")(x),
        ((2, 4, 4, 3), None),
        {"depthwise_kernel": (4, 3, 1), "pointwise_kernel": (1, 3, 4), "bias": (4,)},
    ),
    "dense_on_3d_inputs": (
        lambda x: keras.layers.Dense(3, name="layer")(x),
        ((2, 4, 5), None),
        {"kernel": (5, 3), "bias": (3,)},
    ),
}


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_layer_modes_and_one_step_match_numpy(float64, name):
    build, (shape, vocabulary), expected_modes = LAYERS[name]
    rng = np.random.default_rng(0)
    inputs = keras.Input(shape[1:], dtype="int32" if vocabulary else "float64")
    model = keras.Model(inputs, build(inputs))
    for v in model.trainable_variables:  # non-trivial LayerNorm gamma/beta, biases
        v.assign(rng.uniform(-1, 1, v.shape))
    x = _inputs(shape, rng, vocabulary)
    target = rng.standard_normal(model.output_shape[1:])

    def gradients():
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(tf.square(model(x) - target))
        return tape.gradient(loss, model.trainable_variables)

    grads = gradients()
    lr, eps = 0.25, 0.5
    opt = keras_tnt.TNT(learning_rate=lr, damping=eps)
    opt.build(model.trainable_variables)
    plan = {e["variable"].split("layer/", 1)[-1]: e["modes"] for e in opt.plan()}
    assert plan == expected_modes
    before = [np.array(v) for v in model.trainable_variables]
    opt.update_curvature(grads)  # the statistics from these gradients (as TNT-EF would)
    opt.apply(grads, model.trainable_variables)
    for v, w0, g in zip(model.trainable_variables, before, grads):
        g = np.array(tf.convert_to_tensor(g))  # the embedding's is a tf.IndexedSlices
        want = _reference_step(w0, g, g, lr, eps)
        np.testing.assert_allclose(np.array(v), want, rtol=1e-9, atol=1e-12, err_msg=v.path)
