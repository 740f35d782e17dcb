"""ResNet-32 for CIFAR (He et al., 2016): 3 stages of 5 basic blocks, 16/32/64 channels.

As in the TNT paper's CIFAR-10 runs: BatchNorm after every convolution, bias-free 3x3 convs,
option-A shortcuts (stride-2 subsampling and zero-padded channels, no parameters), He-normal
initialisation, global average pooling and a 10-way linear classifier (logits).
"""

from __future__ import annotations

import keras
from keras import ops

import keras_tnt


def _conv(filters, strides, name):
    return keras.layers.Conv2D(
        filters,
        3,
        strides=strides,
        padding="same",
        use_bias=False,
        kernel_initializer="he_normal",
        name=name,
    )


def _bn(name):
    return keras.layers.BatchNormalization(momentum=0.9, epsilon=1e-5, name=name)


class ZeroPadShortcut(keras.layers.Layer):
    """Option-A shortcut: subsample by 2 and pad the channels with zeros on both sides."""

    def __init__(self, extra_channels: int, **kwargs):
        super().__init__(**kwargs)
        self.extra_channels = extra_channels

    def call(self, x):
        x = x[:, ::2, ::2, :]
        half = self.extra_channels // 2
        return ops.pad(x, [[0, 0], [0, 0], [0, 0], [half, self.extra_channels - half]])

    def get_config(self):
        return {**super().get_config(), "extra_channels": self.extra_channels}


def _block(x, filters, strides, name):
    shortcut = x
    h = _conv(filters, strides, f"{name}_conv1")(x)
    h = keras.layers.ReLU()(_bn(f"{name}_bn1")(h))
    h = _bn(f"{name}_bn2")(_conv(filters, 1, f"{name}_conv2")(h))
    if strides != 1 or x.shape[-1] != filters:
        shortcut = ZeroPadShortcut(filters - x.shape[-1], name=f"{name}_shortcut")(x)
    return keras.layers.ReLU()(keras.layers.Add()([h, shortcut]))


def resnet32(num_classes: int = 10, input_shape=(32, 32, 3)) -> keras_tnt.FisherModel:
    inputs = keras.Input(input_shape, name="image")
    x = keras.layers.ReLU()(_bn("stem_bn")(_conv(16, 1, "stem_conv")(inputs)))
    for stage, filters in enumerate((16, 32, 64)):
        for block in range(5):
            strides = 2 if stage > 0 and block == 0 else 1
            x = _block(x, filters, strides, f"stage{stage + 1}_block{block + 1}")
    x = keras.layers.GlobalAveragePooling2D()(x)
    outputs = keras.layers.Dense(num_classes, kernel_initializer="he_normal", name="logits")(x)
    return keras_tnt.FisherModel(inputs, outputs, name="resnet32")
