"""VGG16 with BatchNorm for CIFAR-100, as in the TNT paper (the authors'
``vgg16-NoAdaptiveAvgPoolNoDropout-BN`` model).

Configuration D of Simonyan & Zisserman (2015): thirteen 3x3 convolutions (padding 1) WITH bias,
each followed by BatchNorm and ReLU, in five groups 64-64 / 128-128 / 256x3 / 512x3 / 512x3, each
group closed by a 2x2 max-pool; on 32x32 images the five pools leave 1x1x512. Then, unlike
torchvision's ImageNet VGG, no adaptive average pool and no dropout: Flatten (512) -> Dense 4096
ReLU -> Dense 4096 ReLU -> Dense ``num_classes`` (logits).

Initialisation: convolution kernels ~ N(0, 2 / (3 * 3 * out_channels)), i.e. He-normal with
``mode="fan_out"`` and untruncated, biases zero (torchvision's VGG, and the authors' ``normal``
option after github.com/chengyangfu/pytorch-vgg-cifar10); BatchNorm scale 1, offset 0, PyTorch's
momentum 0.1 (Keras ``momentum=0.9``) and epsilon 1e-5; the dense layers keep PyTorch's default
``nn.Linear`` initialisation, U(±1/sqrt(fan_in)) for kernel and bias (:func:`models.mlp.linear`).

Parameters (num_classes=100): 34,015,396 trainable (convs 14,714,688 + BatchNorm 8,448 + dense
19,292,260) and 8,448 BatchNorm moving statistics.
"""

from __future__ import annotations

import keras

import keras_tnt
from models.mlp import linear

# Output channels of each 3x3 conv; "M" is a 2x2 max-pool.
VGG16_CONFIG = (
    64, 64, "M",
    128, 128, "M",
    256, 256, 256, "M",
    512, 512, 512, "M",
    512, 512, 512, "M",
)  # fmt: skip
CLASSIFIER_WIDTH = 4096


def vgg16_bn(
    num_classes: int = 100, input_shape=(32, 32, 3), classifier_width: int = CLASSIFIER_WIDTH
) -> keras_tnt.FisherModel:
    """VGG16-BN for 32x32 images, returning ``num_classes`` logits.

    ``classifier_width`` is the paper's 4096; a smaller value keeps the same network shape at a
    fraction of the cost (TNT's 4096x4096 factors dominate a step on a CPU), for smoke tests.
    """
    if isinstance(classifier_width, bool) or not isinstance(classifier_width, int):
        raise TypeError(
            f"`classifier_width` must be an int; received classifier_width={classifier_width!r}."
        )
    if classifier_width < 1 or num_classes < 1:
        raise ValueError(
            "`classifier_width` and `num_classes` must be >= 1; received "
            f"classifier_width={classifier_width}, num_classes={num_classes}."
        )
    height, width = input_shape[0], input_shape[1]
    if height is None or width is None or height % 32 or width % 32:
        raise ValueError(
            "vgg16_bn max-pools five times by 2, so the image height and width must be "
            f"multiples of 32; received input_shape={tuple(input_shape)}."
        )
    inputs = keras.Input(input_shape, name="image")
    x = inputs
    group, index = 1, 1
    for item in VGG16_CONFIG:
        if item == "M":
            x = keras.layers.MaxPooling2D(2, name=f"block{group}_pool")(x)
            group, index = group + 1, 1
            continue
        name = f"block{group}_conv{index}"
        x = keras.layers.Conv2D(
            item,
            3,
            padding="same",
            kernel_initializer=keras.initializers.VarianceScaling(
                scale=2.0, mode="fan_out", distribution="untruncated_normal"
            ),
            bias_initializer="zeros",
            name=name,
        )(x)
        x = keras.layers.BatchNormalization(momentum=0.9, epsilon=1e-5, name=f"{name}_bn")(x)
        x = keras.layers.ReLU(name=f"{name}_relu")(x)
        index += 1
    x = keras.layers.Flatten(name="flatten")(x)
    features = x.shape[-1]
    x = linear(classifier_width, features, activation="relu", name="fc1")(x)
    x = linear(classifier_width, classifier_width, activation="relu", name="fc2")(x)
    outputs = linear(num_classes, classifier_width, name="logits")(x)
    return keras_tnt.FisherModel(inputs, outputs, name="vgg16_bn")
