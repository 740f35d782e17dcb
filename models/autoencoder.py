"""Deep autoencoders of Hinton & Salakhutdinov (2006), as trained in the TNT paper.

ReLU hidden layers, a linear code layer and a linear (logit) output layer. MNIST:
784-1000-500-250-30-250-500-1000-784 (2,837,314 parameters); FACES:
625-2000-1000-500-30-500-1000-2000-625.
"""

from __future__ import annotations

from collections.abc import Sequence

import keras

import keras_tnt

MNIST_WIDTHS = (784, 1000, 500, 250, 30, 250, 500, 1000, 784)
FACES_WIDTHS = (625, 2000, 1000, 500, 30, 500, 1000, 2000, 625)


def autoencoder(widths: Sequence[int], name: str = "autoencoder") -> keras_tnt.FisherModel:
    """Dense autoencoder: ReLU between layers, linear code (middle) and output layers."""
    widths = tuple(int(w) for w in widths)
    if len(widths) < 3 or len(widths) % 2 == 0:
        raise ValueError(f"`widths` must be an odd-length list of >= 3 sizes; received {widths}.")
    code = len(widths) // 2
    inputs = keras.Input((widths[0],), name="pixels")
    h = inputs
    for i, width in enumerate(widths[1:], start=1):
        linear = i in (code, len(widths) - 1)
        h = keras.layers.Dense(width, activation=None if linear else "relu", name=f"dense_{i}")(h)
    return keras_tnt.FisherModel(inputs, h, name=name)


def mnist_autoencoder() -> keras_tnt.FisherModel:
    return autoencoder(MNIST_WIDTHS, name="mnist_autoencoder")


def faces_autoencoder() -> keras_tnt.FisherModel:
    return autoencoder(FACES_WIDTHS, name="faces_autoencoder")
