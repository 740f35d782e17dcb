"""Dense classifiers of the paper, and the PyTorch-default ``nn.Linear`` initialisation.

* :func:`figure1_mlp`: the Figure-1 network (Martens & Grosse, 2015, §13), 16x16 MNIST,
  256-20-20-20-20-20-10, tanh on the five hidden layers, linear logits: 7,030 parameters.
* :func:`digits_classifier`: 64-32-32-10 tanh MLP on scikit-learn's 8x8 digits (offline default).

The authors' release is PyTorch, and its dense layers keep PyTorch's default initialisation:
kernel and bias both ``~ U(-1/sqrt(fan_in), 1/sqrt(fan_in))`` (:func:`linear` reproduces it).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import keras

import keras_tnt

FIGURE1_WIDTHS = (256, 20, 20, 20, 20, 20, 10)
DIGITS_CLASSIFIER_WIDTHS = (64, 32, 32, 10)


def linear(
    units: int, fan_in: int, activation: str | None = None, name: str | None = None
) -> keras.layers.Dense:
    """A Dense layer initialised as PyTorch's ``nn.Linear``: kernel, bias ~ U(±1/sqrt(fan_in)).

    ``VarianceScaling(1/3, "fan_in", "uniform")`` has the bound ``sqrt(3 * (1/3) / fan_in)``.
    The bias initialiser cannot see the fan-in, so it gets the bound explicitly. No fixed seed:
    each initialiser draws its own from the global RNG that ``keras.utils.set_random_seed`` sets.
    """
    if fan_in < 1:
        raise ValueError(f"`fan_in` must be an integer >= 1; received fan_in={fan_in!r}.")
    bound = 1.0 / math.sqrt(fan_in)
    return keras.layers.Dense(
        units,
        activation=activation,
        kernel_initializer=keras.initializers.VarianceScaling(
            scale=1.0 / 3.0, mode="fan_in", distribution="uniform"
        ),
        bias_initializer=keras.initializers.RandomUniform(-bound, bound),
        name=name,
    )


def mlp(
    widths: Sequence[int], activation: str = "tanh", name: str = "mlp"
) -> keras_tnt.FisherModel:
    """``widths[0]`` inputs, ``activation`` on the hidden layers, ``widths[-1]`` linear logits."""
    widths = tuple(int(w) for w in widths)
    if len(widths) < 2 or min(widths) < 1:
        raise ValueError(f"`widths` must list >= 2 sizes, each >= 1; received {widths}.")
    inputs = keras.Input((widths[0],), name="pixels")
    h = inputs
    last = len(widths) - 1
    for i, width in enumerate(widths[1:], start=1):
        act = None if i == last else activation
        h = linear(width, widths[i - 1], activation=act, name=f"dense_{i}")(h)
    return keras_tnt.FisherModel(inputs, h, name=name)


def figure1_mlp() -> keras_tnt.FisherModel:
    """256-20-20-20-20-20-10 tanh MLP on 16x16 MNIST (the paper's Figure 1)."""
    return mlp(FIGURE1_WIDTHS, activation="tanh", name="figure1_mlp")


def digits_classifier() -> keras_tnt.FisherModel:
    """64-32-32-10 tanh MLP on scikit-learn's 8x8 digits."""
    return mlp(DIGITS_CLASSIFIER_WIDTHS, activation="tanh", name="digits_classifier")
