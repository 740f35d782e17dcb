"""Deep autoencoders of Hinton & Salakhutdinov (2006), as trained in the TNT paper.

ReLU hidden layers, a linear code layer and a linear (logit) output layer. MNIST:
784-1000-500-250-30-250-500-1000-784 (2,837,314 parameters); FACES:
625-2000-1000-500-30-500-1000-2000-625 (7,537,655 parameters). :func:`digits_autoencoder` is a
scaled-down copy for scikit-learn's 8x8 digits, 64-48-16-48-64 (7,856 parameters).

Initialisation as in the authors' PyTorch release, which keeps ``nn.Linear``'s default: kernel
and bias ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (see :func:`models.mlp.linear`).
"""

from __future__ import annotations

from collections.abc import Sequence

import keras

import keras_tnt
from models.mlp import linear

MNIST_WIDTHS = (784, 1000, 500, 250, 30, 250, 500, 1000, 784)
FACES_WIDTHS = (625, 2000, 1000, 500, 30, 500, 1000, 2000, 625)
DIGITS_WIDTHS = (64, 48, 16, 48, 64)


def autoencoder(widths: Sequence[int], name: str = "autoencoder") -> keras_tnt.FisherModel:
    """Dense autoencoder: ReLU between layers, linear code (middle) and output layers."""
    widths = tuple(int(w) for w in widths)
    if len(widths) < 3 or len(widths) % 2 == 0 or min(widths) < 1:
        raise ValueError(
            f"`widths` must be an odd-length list of >= 3 sizes, each >= 1; received {widths}."
        )
    code = len(widths) // 2
    inputs = keras.Input((widths[0],), name="pixels")
    h = inputs
    for i, width in enumerate(widths[1:], start=1):
        is_linear = i in (code, len(widths) - 1)
        activation = None if is_linear else "relu"
        h = linear(width, widths[i - 1], activation=activation, name=f"dense_{i}")(h)
    return keras_tnt.FisherModel(inputs, h, name=name)


def mnist_autoencoder() -> keras_tnt.FisherModel:
    return autoencoder(MNIST_WIDTHS, name="mnist_autoencoder")


def faces_autoencoder() -> keras_tnt.FisherModel:
    return autoencoder(FACES_WIDTHS, name="faces_autoencoder")


def digits_autoencoder() -> keras_tnt.FisherModel:
    return autoencoder(DIGITS_WIDTHS, name="digits_autoencoder")
