"""The paper's summed losses: a sum over output units, then the mean over the batch.

The autoencoders of Ren & Goldfarb (2021), like those of Hinton & Salakhutdinov and of the KFAC
and Shampoo papers, minimise the per-example loss summed over all output pixels (Keras' built-in
``BinaryCrossentropy`` and ``MeanSquaredError`` average over them instead, which rescales the
gradient, the statistics and therefore every tuned learning rate and damping).
"""

from __future__ import annotations

import keras
from keras import ops


@keras.saving.register_keras_serializable(package="keras_tnt")
def summed_binary_crossentropy(y_true, y_pred, from_logits=True):
    """Binary cross-entropy summed over the last axis (one value per example)."""
    y_pred = ops.convert_to_tensor(y_pred)
    y_true = ops.cast(y_true, y_pred.dtype)
    elementwise = ops.binary_crossentropy(y_true, y_pred, from_logits=from_logits)
    return ops.sum(elementwise, axis=-1)


@keras.saving.register_keras_serializable(package="keras_tnt")
def half_squared_error(y_true, y_pred):
    """``0.5 * ||y_pred - y_true||^2`` over the last axis: the Gaussian NLL with σ = 1."""
    y_pred = ops.convert_to_tensor(y_pred)
    y_true = ops.cast(y_true, y_pred.dtype)
    return 0.5 * ops.sum(ops.square(y_pred - y_true), axis=-1)


@keras.saving.register_keras_serializable(package="keras_tnt")
class SummedBinaryCrossentropy(keras.losses.Loss):
    """BCE summed over output units, averaged over the batch (the MNIST autoencoder's loss).

    Args:
        from_logits: whether ``y_pred`` are logits (default, as in the paper) or probabilities.
    """

    def __init__(
        self,
        from_logits: bool = True,
        reduction="sum_over_batch_size",
        name="summed_binary_crossentropy",
        dtype=None,
    ):
        super().__init__(name=name, reduction=reduction, dtype=dtype)
        self.from_logits = bool(from_logits)
        # Same introspection attributes as Keras' built-in losses (see keras_tnt.sampling).
        self.fn = summed_binary_crossentropy
        self._fn_kwargs = {"from_logits": self.from_logits}

    def call(self, y_true, y_pred):
        return summed_binary_crossentropy(y_true, y_pred, from_logits=self.from_logits)

    def get_config(self):
        config = super().get_config()
        config["from_logits"] = self.from_logits
        return config


@keras.saving.register_keras_serializable(package="keras_tnt")
class HalfSquaredError(keras.losses.Loss):
    """Half squared error summed over output units, averaged over the batch (FACES)."""

    def __init__(self, reduction="sum_over_batch_size", name="half_squared_error", dtype=None):
        super().__init__(name=name, reduction=reduction, dtype=dtype)
        self.fn = half_squared_error
        self._fn_kwargs = {}

    def call(self, y_true, y_pred):
        return half_squared_error(y_true, y_pred)
