"""ResNet-32 for CIFAR (He et al., 2016, §4.2): 3 stages of 5 basic blocks, 16/32/64 channels.

As in the TNT paper's CIFAR-10 runs (the authors' ``ResNet32-BN-PaddingShortcutDownsampleOnly-
NoBias`` model): a 3x3 stem convolution, BatchNorm after every convolution (PyTorch's defaults:
momentum 0.1, i.e. Keras ``momentum=0.9``, epsilon 1e-5), bias-free 3x3 convs with padding 1,
option-A shortcuts (stride-2 subsampling, channels zero-padded on both sides, no parameters),
global average pooling and a linear classifier (logits).

Initialisation as ``torch.nn.init.kaiming_normal_`` (He et al., 2015): every conv kernel and the
classifier kernel ~ N(0, 2 / fan_in), untruncated (Keras' ``"he_normal"`` is truncated). The
classifier bias keeps ``nn.Linear``'s default, U(±1/sqrt(64)).

Parameters (num_classes=10): 464,154 trainable (convs 461,232 + BatchNorm scale/offset 2,272 +
classifier 650) and 2,272 BatchNorm moving statistics: 466,426 in all ("0.46M").
"""

from __future__ import annotations

import math

import keras
from keras import ops

import keras_tnt


def _he_normal():
    return keras.initializers.VarianceScaling(
        scale=2.0, mode="fan_in", distribution="untruncated_normal"
    )


def _conv(x, filters, strides, name):
    """3x3 bias-free conv with PyTorch's ``padding=1``.

    With stride 2, Keras' ``padding="same"`` would pad only the bottom/right, centring the
    kernels on odd pixels while the option-A shortcut keeps the even ones (``x[::2, ::2]``);
    an explicit symmetric zero-pad keeps both on the same pixels, as in the authors' model.
    """
    padding = "same"
    if strides != 1:
        x = keras.layers.ZeroPadding2D(1, name=f"{name}_pad")(x)
        padding = "valid"
    return keras.layers.Conv2D(
        filters,
        3,
        strides=strides,
        padding=padding,
        use_bias=False,
        kernel_initializer=_he_normal(),
        name=name,
    )(x)


def _bn(x, name):
    return keras.layers.BatchNormalization(momentum=0.9, epsilon=1e-5, name=name)(x)


@keras.saving.register_keras_serializable(package="models")
class ZeroPadShortcut(keras.layers.Layer):
    """Option-A shortcut: subsample by 2 and pad the channels with zeros on both sides.

    ``extra_channels // 2`` zero channels go before the input's and the rest after (the
    authors' ``F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, C // 2, C // 2))`` when channels double).
    """

    def __init__(self, extra_channels: int, **kwargs):
        super().__init__(**kwargs)
        if isinstance(extra_channels, bool) or not isinstance(extra_channels, int):
            raise TypeError(
                f"`extra_channels` must be an int; received extra_channels={extra_channels!r}."
            )
        if extra_channels < 0:
            raise ValueError(
                f"`extra_channels` must be >= 0; received extra_channels={extra_channels}."
            )
        self.extra_channels = extra_channels

    def call(self, x):
        x = x[:, ::2, ::2, :]
        half = self.extra_channels // 2
        return ops.pad(x, [[0, 0], [0, 0], [0, 0], [half, self.extra_channels - half]])

    def compute_output_shape(self, input_shape):
        batch, height, width, channels = input_shape

        def half(size):
            return None if size is None else math.ceil(size / 2)

        return (batch, half(height), half(width), channels + self.extra_channels)

    def get_config(self):
        return {**super().get_config(), "extra_channels": self.extra_channels}


def _block(x, filters, strides, name):
    shortcut = x
    h = _conv(x, filters, strides, f"{name}_conv1")
    h = keras.layers.ReLU(name=f"{name}_relu1")(_bn(h, f"{name}_bn1"))
    h = _bn(_conv(h, filters, 1, f"{name}_conv2"), f"{name}_bn2")
    if strides != 1 or x.shape[-1] != filters:
        if strides != 2:
            raise ValueError(
                "The option-A shortcut subsamples by 2: a block that changes the channel count "
                f"needs strides=2; received strides={strides}."
            )
        shortcut = ZeroPadShortcut(filters - x.shape[-1], name=f"{name}_shortcut")(x)
    h = keras.layers.Add(name=f"{name}_add")([h, shortcut])
    return keras.layers.ReLU(name=f"{name}_relu2")(h)


def resnet32(num_classes: int = 10, input_shape=(32, 32, 3)) -> keras_tnt.FisherModel:
    """ResNet-32 (n = 5 blocks per stage) returning ``num_classes`` logits."""
    inputs = keras.Input(input_shape, name="image")
    x = _conv(inputs, 16, 1, "stem_conv")
    x = keras.layers.ReLU(name="stem_relu")(_bn(x, "stem_bn"))
    for stage, filters in enumerate((16, 32, 64)):
        for block in range(5):
            strides = 2 if stage > 0 and block == 0 else 1
            x = _block(x, filters, strides, f"stage{stage + 1}_block{block + 1}")
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    bound = 1.0 / math.sqrt(x.shape[-1])
    outputs = keras.layers.Dense(
        num_classes,
        kernel_initializer=_he_normal(),
        bias_initializer=keras.initializers.RandomUniform(-bound, bound),
        name="logits",
    )(x)
    return keras_tnt.FisherModel(inputs, outputs, name="resnet32")
