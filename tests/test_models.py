"""The paper's model zoo: sizes, activations, initialisation, save/load, one TNT step each."""

import math
import os

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_tnt
import models
from models.resnet import ZeroPadShortcut

# Exact parameter counts, by hand from the layer sizes (Dense: in*out + out; Conv2D:
# 3*3*in*out (+ out with bias); BatchNorm: 2*channels trainable + 2*channels moving statistics).
#
# MNIST autoencoder 784-1000-500-250-30-250-500-1000-784:
#   785,000 + 500,500 + 125,250 + 7,530 + 7,750 + 125,500 + 501,000 + 784,784 = 2,837,314
# FACES autoencoder 625-2000-1000-500-30-500-1000-2000-625:
#   1,252,000 + 2,001,000 + 500,500 + 15,030 + 15,500 + 501,000 + 2,002,000 + 1,250,625
#   = 7,537,655
# digits autoencoder 64-48-16-48-64: 3,120 + 784 + 816 + 3,136 = 7,856
# Figure-1 MLP 256-20-20-20-20-20-10: 5,140 + 4 * 420 + 210 = 7,030
# digits classifier 64-32-32-10: 2,080 + 1,056 + 330 = 3,466
# ResNet-32 (10 classes), bias-free convs:
#   stem 3*3*3*16 = 432; stage 1: 10 * 3*3*16*16 = 23,040;
#   stage 2: 3*3*16*32 + 9 * 3*3*32*32 = 4,608 + 82,944 = 87,552;
#   stage 3: 3*3*32*64 + 9 * 3*3*64*64 = 18,432 + 331,776 = 350,208; convs: 461,232
#   BatchNorm (31 layers): 2 * (16 + 10*16 + 10*32 + 10*64) = 2 * 1,136 = 2,272
#   logits 64*10 + 10 = 650  ->  trainable 464,154; + 2,272 moving statistics = 466,426
# VGG16-BN (100 classes), convs with bias:
#   1,792 + 36,928 + 73,856 + 147,584 + 295,168 + 2 * 590,080 + 1,180,160 + 5 * 2,359,808
#   = 14,714,688; BatchNorm 2 * (2*64 + 2*128 + 3*256 + 6*512) = 2 * 4,224 = 8,448;
#   dense 512*4096 + 4096 + 4096*4096 + 4096 + 4096*100 + 100 = 19,292,260
#   ->  trainable 34,015,396; + 8,448 moving statistics = 34,023,844
SPECS = {
    # name: (trainable, non-trainable, input shape, output shape)
    "mnist_autoencoder": (2_837_314, 0, (784,), (784,)),
    "faces_autoencoder": (7_537_655, 0, (625,), (625,)),
    "digits_autoencoder": (7_856, 0, (64,), (64,)),
    "figure1_mlp": (7_030, 0, (256,), (10,)),
    "digits_classifier": (3_466, 0, (64,), (10,)),
    "resnet32": (464_154, 2_272, (32, 32, 3), (10,)),
    "vgg16_bn": (34_015_396, 8_448, (32, 32, 3), (100,)),
}

AUTOENCODER_LAYERS = {
    # name: widths; the code layer is the middle one, dense_{len // 2}
    "mnist_autoencoder": (784, 1000, 500, 250, 30, 250, 500, 1000, 784),
    "faces_autoencoder": (625, 2000, 1000, 500, 30, 500, 1000, 2000, 625),
    "digits_autoencoder": (64, 48, 16, 48, 64),
}

MLP_LAYERS = {
    "figure1_mlp": (256, 20, 20, 20, 20, 20, 10),
    "digits_classifier": (64, 32, 32, 10),
}


def _count(variables):
    return sum(math.prod(v.shape) for v in variables)


@pytest.mark.parametrize("name", sorted(SPECS))
def test_parameter_count_and_shapes(name):
    trainable, non_trainable, input_shape, output_shape = SPECS[name]
    model = getattr(models, name)()
    assert isinstance(model, keras_tnt.FisherModel)
    assert _count(model.trainable_weights) == trainable
    assert _count(model.non_trainable_weights) == non_trainable
    assert model.count_params() == trainable + non_trainable
    assert tuple(model.input_shape[1:]) == input_shape
    assert tuple(model.output_shape[1:]) == output_shape


def test_paper_sizes():
    assert models.mnist_autoencoder().count_params() == 2_837_314
    # He et al. (2016), Table 6: ResNet-32 has "0.46M" parameters (the trainable ones).
    assert round(_count(models.resnet32().trainable_weights) / 1e6, 2) == 0.46


@pytest.mark.parametrize("name", sorted(AUTOENCODER_LAYERS))
def test_autoencoder_layers(name):
    widths = AUTOENCODER_LAYERS[name]
    model = getattr(models, name)()
    dense = [layer for layer in model.layers if isinstance(layer, keras.layers.Dense)]
    assert [layer.units for layer in dense] == list(widths[1:])
    code = len(widths) // 2
    for i, layer in enumerate(dense, start=1):
        expected = "linear" if i in (code, len(dense)) else "relu"
        assert layer.activation.__name__ == expected, layer.name
    assert dense[code - 1].units == widths[code]  # the code layer


@pytest.mark.parametrize("name", sorted(MLP_LAYERS))
def test_mlp_layers(name):
    widths = MLP_LAYERS[name]
    model = getattr(models, name)()
    dense = [layer for layer in model.layers if isinstance(layer, keras.layers.Dense)]
    assert [layer.units for layer in dense] == list(widths[1:])
    assert [layer.activation.__name__ for layer in dense] == ["tanh"] * (len(dense) - 1) + [
        "linear"
    ]


def test_classifier_heads_are_linear_logits():
    for model in (models.resnet32(), models.vgg16_bn()):
        assert model.get_layer("logits").activation.__name__ == "linear"
    vgg = models.vgg16_bn()
    assert [vgg.get_layer(n).units for n in ("fc1", "fc2", "logits")] == [4096, 4096, 100]
    assert vgg.get_layer("fc1").activation.__name__ == "relu"
    assert vgg.get_layer("fc2").activation.__name__ == "relu"
    assert not any(isinstance(layer, keras.layers.Dropout) for layer in vgg.layers)


def test_conv_layers_as_in_the_papers():
    resnet = models.resnet32()
    convs = [layer for layer in resnet.layers if isinstance(layer, keras.layers.Conv2D)]
    assert len(convs) == 31 and not any(layer.use_bias for layer in convs)
    assert sum(isinstance(layer, keras.layers.BatchNormalization) for layer in resnet.layers) == 31
    assert sum(isinstance(layer, ZeroPadShortcut) for layer in resnet.layers) == 2
    vgg = models.vgg16_bn()
    convs = [layer for layer in vgg.layers if isinstance(layer, keras.layers.Conv2D)]
    assert [layer.filters for layer in convs] == [64, 64, 128, 128] + [256] * 3 + [512] * 6
    assert all(layer.use_bias for layer in convs)
    pools = [layer for layer in vgg.layers if isinstance(layer, keras.layers.MaxPooling2D)]
    assert len(pools) == 5
    assert tuple(vgg.get_layer("flatten").output.shape[1:]) == (512,)


@pytest.mark.parametrize("name", ["mnist_autoencoder", "figure1_mlp"])
def test_dense_init_is_pytorch_default(name):
    """Kernel and bias ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)): bounded, std = bound / sqrt(3)."""
    model = getattr(models, name)()
    layer = model.get_layer("dense_1")
    kernel = np.asarray(layer.kernel)
    bias = np.asarray(layer.bias)
    bound = 1.0 / math.sqrt(kernel.shape[0])
    assert np.abs(kernel).max() <= bound
    assert np.abs(kernel).max() > 0.99 * bound  # fills the interval
    np.testing.assert_allclose(kernel.std(), bound / math.sqrt(3.0), rtol=0.02)
    assert abs(kernel.mean()) < 0.05 * bound
    assert np.abs(bias).max() <= bound
    assert bias.std() > 0.4 * bound  # random, not zeros


def test_init_follows_the_global_seed():
    keras.utils.set_random_seed(7)
    a = [np.asarray(w) for w in models.digits_autoencoder().weights]
    keras.utils.set_random_seed(7)
    b = [np.asarray(w) for w in models.digits_autoencoder().weights]
    keras.utils.set_random_seed(8)
    c = [np.asarray(w) for w in models.digits_autoencoder().weights]
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x, y)
    assert not np.array_equal(a[0], c[0])
    # Each layer draws its own seed: same-shaped layers are not copies of each other.
    mlp = models.figure1_mlp()
    assert not np.array_equal(mlp.get_layer("dense_2").kernel, mlp.get_layer("dense_3").kernel)


def test_resnet_init_is_he_normal():
    model = models.resnet32()
    kernel = np.asarray(model.get_layer("stage3_block2_conv1").kernel)  # fan_in 3*3*64 = 576
    np.testing.assert_allclose(kernel.std(), math.sqrt(2.0 / 576), rtol=0.02)
    # Untruncated, as torch.nn.init.kaiming_normal_ (Keras' "he_normal" stops at 2 std).
    assert np.abs(kernel).max() > 3 * math.sqrt(2.0 / 576)


def test_strided_conv_is_centred_on_the_shortcut_pixels():
    """Stride-2 conv kernels sit on the pixels x[::2, ::2] that the option-A shortcut keeps."""
    model = models.resnet32()
    pad = model.get_layer("stage2_block1_conv1_pad")
    conv = model.get_layer("stage2_block1_conv1")
    kernel = np.zeros(conv.kernel.shape, "float32")  # (3, 3, 16, 32)
    kernel[1, 1, np.arange(16), np.arange(16)] = 1.0  # identity at the kernel centre
    conv.kernel.assign(kernel)
    x = np.random.default_rng(0).normal(size=(2, 32, 32, 16)).astype("float32")
    y = np.asarray(conv(pad(x)))
    assert y.shape == (2, 16, 16, 32)
    np.testing.assert_allclose(y[..., :16], x[:, ::2, ::2, :], atol=1e-6)
    shortcut = np.asarray(model.get_layer("stage2_block1_shortcut")(x))
    np.testing.assert_array_equal(shortcut[..., 8:24], x[:, ::2, ::2, :])
    assert not shortcut[..., :8].any() and not shortcut[..., 24:].any()


def test_zero_pad_shortcut_is_registered():
    assert keras.saving.get_registered_name(ZeroPadShortcut) == "models>ZeroPadShortcut"
    layer = ZeroPadShortcut(16, name="s")
    clone = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(layer))
    assert isinstance(clone, ZeroPadShortcut) and clone.extra_channels == 16
    with pytest.raises(ValueError, match="extra_channels"):
        ZeroPadShortcut(-1)


@pytest.mark.parametrize("name", ["resnet32", "vgg16_bn"])
def test_save_load_round_trip(name, tmp_path):
    model = getattr(models, name)()
    x = np.random.default_rng(0).normal(size=(2, 32, 32, 3)).astype("float32")
    path = os.path.join(tmp_path, "m.keras")
    model.save(path)
    restored = keras.models.load_model(path)
    assert isinstance(restored, keras_tnt.FisherModel)
    assert restored.count_params() == model.count_params()
    np.testing.assert_array_equal(
        np.asarray(restored(x, training=False)), np.asarray(model(x, training=False))
    )


def _batch(name, batch_size, rng):
    _, _, input_shape, output_shape = SPECS[name]
    if name.endswith("autoencoder"):
        x = rng.uniform(size=(batch_size,) + input_shape).astype("float32")
        return x, x
    x = rng.normal(size=(batch_size,) + input_shape).astype("float32")
    return x, rng.integers(0, output_shape[0], size=batch_size)


def _loss(name):
    if name == "faces_autoencoder":
        return keras_tnt.losses.HalfSquaredError()
    if name.endswith("autoencoder"):
        return keras_tnt.losses.SummedBinaryCrossentropy(from_logits=True)
    return keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def _one_tnt_step(model, name, batch_size):
    x, y = _batch(name, batch_size, np.random.default_rng(0))
    # Eagerly: tracing the TNT step of a 31- or 13-conv network costs ~40 s on 2 CPU cores,
    # the step itself a few seconds. (The traced step is tested in test_fisher_model.py.)
    model.compile(optimizer=keras_tnt.TNT(), loss=_loss(name), run_eagerly=True)
    before = [np.array(w) for w in model.trainable_weights]
    logs = model.train_on_batch(x, y, return_dict=True)
    assert np.isfinite(logs["loss"])
    assert model.optimizer.curvature_updates == 1
    for w in model.weights:
        assert np.isfinite(np.asarray(w)).all(), w.path
    weights = model.trainable_weights
    unchanged = [
        w.path for w, b in zip(weights, before, strict=True) if np.array_equal(np.asarray(w), b)
    ]
    assert not unchanged


@pytest.mark.parametrize("name", sorted(set(SPECS) - {"vgg16_bn"}))
def test_one_tnt_step(name):
    _one_tnt_step(getattr(models, name)(), name, batch_size=4)


def test_one_tnt_step_vgg16_bn_narrow_classifier():
    """The full conv stack; a 64-wide classifier instead of 4096 (see the slow test below)."""
    model = models.vgg16_bn(classifier_width=64)
    assert _count(model.trainable_weights) == 14_714_688 + 8_448 + (
        512 * 64 + 64 + 64 * 64 + 64 + 64 * 100 + 100
    )
    _one_tnt_step(model, "vgg16_bn", batch_size=2)


@pytest.mark.slow
def test_one_tnt_step_vgg16_bn(request):
    """The paper's VGG16-BN: TNT's 4096x4096 factors make this step ~25 s on 2 CPU cores."""
    selection = request.config.getoption("markexpr") or ""
    if "slow" not in selection or "not slow" in selection:
        pytest.skip("the paper-size VGG16-BN step runs only when selected with -m slow")
    _one_tnt_step(models.vgg16_bn(), "vgg16_bn", batch_size=2)


def test_builders_reject_bad_sizes():
    with pytest.raises(ValueError, match="odd-length"):
        models.autoencoder((10, 5, 5, 10))
    with pytest.raises(ValueError, match="widths"):
        models.mlp((10,))
    with pytest.raises(ValueError, match="multiples of 32"):
        models.vgg16_bn(input_shape=(28, 28, 3))
    with pytest.raises(ValueError, match="classifier_width"):
        models.vgg16_bn(classifier_width=0)


def test_models_are_exported():
    for name in SPECS:
        assert name in models.__all__ and callable(getattr(models, name))
    assert tf.is_tensor(models.digits_classifier()(np.zeros((1, 64), "float32")))


@pytest.mark.slow
def test_resnet32_trains_the_same_with_and_without_xla(float64):
    """ResNet-32 (its full depth and widths, on 8x8 images) trains three TNT steps with
    jit_compile=True and False to the same weights, BatchNorm statistics and optimizer state
    (float64: to 1e-8 relative; XLA reorders the convolutions' sums). Slow (about 4 minutes on
    2 cores, mostly XLA compiling the step): `pytest -m slow -k resnet32_trains`. The default
    run checks XLA on a Conv2D + BatchNormalization network in test_conv_reference.py."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(16, 8, 8, 3))
    y = rng.integers(0, 10, size=16)
    runs = []
    for jit in (False, True):
        keras.utils.set_random_seed(0)
        model = models.resnet32(input_shape=(8, 8, 3))
        model.compile(
            optimizer=keras_tnt.TNT(learning_rate=1e-3, damping=0.3, inverse_update_period=2),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            jit_compile=jit,
        )
        start = [np.array(w) for w in model.trainable_weights]
        model.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)
        model.fit(x[:8], y[:8], batch_size=8, epochs=1, shuffle=False, verbose=0)
        moved = [
            np.abs(np.array(w) - w0).max()
            for w, w0 in zip(model.trainable_weights, start, strict=True)
        ]
        assert min(moved) > 1e-6  # every weight took real steps
        runs.append([np.array(v) for v in model.weights + model.optimizer.variables])
    for a, b in zip(*runs, strict=True):
        scale = max(np.abs(a).max(), 1e-12)
        np.testing.assert_allclose(a, b, rtol=1e-8, atol=1e-8 * scale)


def test_transformer_classifier_layers_plan_and_save(tmp_path):
    """The zoo's transformer: its tensors' TNT modes, a few TNT steps that learn, .keras."""
    model = models.transformer_classifier(17, 8, 3, width=8, heads=2, mlp_width=16)
    plan = {e["variable"]: e["modes"] for e in keras_tnt.TNT().plan(model.trainable_variables)}
    assert plan["token_embedding/embeddings"] == (17, 8)
    assert plan["position_embedding/embeddings"] == (8, 8)
    assert plan["block0_attention/query/kernel"] == (8, 2, 4)
    assert plan["block0_attention/attention_output/kernel"] == (2, 4, 8)
    assert plan["block1_mlp_norm/gamma"] == (8,)
    assert model.count_params() == sum(math.prod(v.shape) for v in model.trainable_variables)
    rng = np.random.default_rng(0)
    x = rng.integers(0, 17, size=(96, 8)).astype("int32")
    y = (x[:, 0] % 3).astype("int32")  # the class is in the first token
    model.compile(
        optimizer=keras_tnt.TNT(learning_rate=3e-3, damping=0.1),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    model.warm_start(x, batch_size=32, verbose=0)
    history = model.fit(x, y, batch_size=32, epochs=8, verbose=0)
    assert history.history["loss"][-1] < 0.8 * history.history["loss"][0]
    path = os.path.join(tmp_path, "transformer.keras")
    model.save(path)
    restored = keras.models.load_model(path)
    np.testing.assert_allclose(restored.predict(x, verbose=0), model.predict(x, verbose=0))
    with pytest.raises(ValueError, match="`width` \\(10\\) must be a multiple of `heads` \\(4\\)"):
        models.transformer_classifier(17, 8, 3, width=10, heads=4)
    with pytest.raises(ValueError, match="`vocabulary` must be an integer >= 1"):
        models.transformer_classifier(0, 8, 3)
