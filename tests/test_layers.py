"""TNT on the Keras layers people use beyond the paper's: each layer's tensors get the modes
docs/guide/training.md's table lists (written out here, not asked of the code), and one step
equals a dense NumPy computation on a tiny instance: the statistics of the sampled-label
(Fisher) gradient given to ``update_curvature``, np.kron of the inverses of every mode's factor
applied to vec(m) of the (different) gradient given to ``apply``."""

import math

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_tnt


def _reference_step(w, g, fisher, modes, lr, eps):
    """One TNT step (t = 0: m = g, inverses refreshed) of one tensor of the given ``modes``, in
    NumPy: statistics from ``fisher``, direction applied to ``g``."""
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
        stats = [h / (c ** (k - 1) * (size // d)) for h, d in zip(stats, modes, strict=True)]
    dense = np.ones((1, 1))
    for h, d in zip(stats, modes, strict=True):
        dense = np.kron(dense, np.linalg.inv(h + eps * np.eye(d)))
    return w - lr * (dense @ g.reshape(-1)).reshape(w.shape)


def _inputs(shape, rng, integers=None):
    if integers:
        return rng.integers(0, integers, size=shape).astype("int32")
    return rng.standard_normal(shape)


# The table of modes in docs/guide/training.md ("Large modes, per-variable choices and
# memory"), one instance per row: Keras layer -> (builder of the output from the input
# (float64), input shape and vocabulary (None: float inputs), {variable path after "layer/":
# modes}).
LAYERS = {
    "dense": (
        lambda x: keras.layers.Dense(3, name="layer")(x),
        ((4, 5), None),
        {"kernel": (5, 3), "bias": (3,)},
    ),
    "dense_on_3d_inputs": (
        lambda x: keras.layers.Dense(3, name="layer")(x),
        ((2, 4, 5), None),
        {"kernel": (5, 3), "bias": (3,)},
    ),
    "embedding": (
        lambda x: keras.layers.Embedding(7, 3, name="layer")(x),
        ((4, 5), 7),
        {"embeddings": (7, 3)},
    ),
    "multi_head_attention": (  # H = 2 heads of K = 3 on width D = 4
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
    "batch_normalization": (
        lambda x: keras.layers.BatchNormalization(name="layer")(x),
        ((3, 5), None),
        {"gamma": (5,), "beta": (5,)},
    ),
    "conv1d": (  # kernel (k, in, out) = (2, 4, 3)
        lambda x: keras.layers.Conv1D(3, 2, name="layer")(x),
        ((2, 5, 4), None),
        {"kernel": (2, 4, 3), "bias": (3,)},
    ),
    "conv2d": (  # kernel (kh, kw, in, out) = (2, 3, 2, 4): modes (kh kw, in, out)
        lambda x: keras.layers.Conv2D(4, (2, 3), name="layer")(x),
        ((2, 4, 4, 2), None),
        {"kernel": (6, 2, 4), "bias": (4,)},
    ),
    "depthwise_conv2d": (  # kernel (kh, kw, in, mult) = (2, 2, 3, 2)
        lambda x: keras.layers.DepthwiseConv2D(2, depth_multiplier=2, name="layer")(x),
        ((2, 4, 4, 3), None),
        {"kernel": (4, 3, 2), "bias": (6,)},
    ),
    "separable_conv2d": (  # depthwise (2, 2, 3, 1), pointwise (1, 1, 3, 4)
        lambda x: keras.layers.SeparableConv2D(4, 2, name="layer")(x),
        ((2, 4, 4, 3), None),
        {"depthwise_kernel": (4, 3, 1), "pointwise_kernel": (1, 3, 4), "bias": (4,)},
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
    # The ordinary gradient (at the data's targets) and the Fisher pass's (at other targets, as
    # sampled labels are): different tensors, so a step that took its statistics from the
    # gradient given to `apply` instead of the sampled-label one would not match.
    target, sampled = (rng.standard_normal(model.output_shape[1:]) for _ in range(2))

    def gradients(y):
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(tf.square(model(x) - y))
        # The embedding's is a tf.IndexedSlices: the optimizer gets it as Keras would.
        return tape.gradient(loss, model.trainable_variables)

    grads, fisher_grads = gradients(target), gradients(sampled)
    lr, eps = 0.25, 0.5
    opt = keras_tnt.TNT(learning_rate=lr, damping=eps)
    opt.build(model.trainable_variables)
    paths = [v.path.split("layer/", 1)[-1] for v in model.trainable_variables]
    assert sorted(paths) == sorted(expected_modes)
    assert {e["variable"].split("layer/", 1)[-1]: e["modes"] for e in opt.plan()} == expected_modes
    before = [np.array(v) for v in model.trainable_variables]
    opt.update_curvature(fisher_grads)
    opt.apply(grads, model.trainable_variables)
    for v, path, w0, g, f in zip(
        model.trainable_variables, paths, before, grads, fisher_grads, strict=True
    ):
        g, f = (np.array(tf.convert_to_tensor(t)) for t in (g, f))
        assert np.abs(g - f).max() > 0.1 * np.abs(g).max(), path  # really two gradients
        want = _reference_step(w0, g, f, expected_modes[path], lr, eps)
        np.testing.assert_allclose(np.array(v), want, rtol=1e-9, atol=1e-12, err_msg=v.path)
