"""Drawing targets from the model's own predictive distribution, per compiled loss.

The loss a model is compiled with is the negative log-likelihood of a distribution over targets;
the Fisher pass draws one target per example from that distribution at the model's outputs
(``docs/algorithm.md`` §1):

=====================================================  ===========================================
loss                                                   draw
=====================================================  ===========================================
sparse / categorical cross-entropy (logits or probs)   one class ~ Categorical(softmax(z))
binary cross-entropy, summed BCE (logits or probs)     each unit ~ Bernoulli(sigmoid(z))
half squared error (summed)                            ``z + N(0, 1)``
Keras mean squared error (mean over the last axis)     ``z + N(0, C/2)`` with ``C`` = last axis
=====================================================  ===========================================

Draws use stateless TensorFlow random ops with an explicit seed, so a step is reproducible and
every replica draws differently (its replica id is folded into the seed).
"""

from __future__ import annotations

import dataclasses

import keras
import tensorflow as tf

from keras_tnt import losses as tnt_losses

_CATEGORICAL = "categorical"
_SPARSE = "sparse_categorical"
_BERNOULLI = "bernoulli"
_GAUSSIAN = "gaussian"

# function -> (distribution, default from_logits, fixed Gaussian std or None)
_SUPPORTED = {
    keras.losses.sparse_categorical_crossentropy: (_SPARSE, False),
    keras.losses.categorical_crossentropy: (_CATEGORICAL, False),
    keras.losses.binary_crossentropy: (_BERNOULLI, False),
    keras.losses.mean_squared_error: (_GAUSSIAN, False),
    tnt_losses.summed_binary_crossentropy: (_BERNOULLI, True),
    tnt_losses.half_squared_error: (_GAUSSIAN, False),
}

SUPPORTED_LOSSES = (
    "SparseCategoricalCrossentropy / 'sparse_categorical_crossentropy', "
    "CategoricalCrossentropy / 'categorical_crossentropy', "
    "BinaryCrossentropy / 'binary_crossentropy' (each with from_logits=True or False, "
    "label_smoothing=0, axis=-1), MeanSquaredError / 'mse', "
    "keras_tnt.losses.SummedBinaryCrossentropy and keras_tnt.losses.HalfSquaredError"
)


@dataclasses.dataclass(frozen=True)
class TargetSampler:
    """How to draw targets for one compiled loss, and the loss to differentiate at them."""

    distribution: str
    from_logits: bool
    loss: keras.losses.Loss
    half_squared: bool = False

    def sample(self, y_pred, seed):
        """One target per example (per unit for Bernoulli/Gaussian), without gradient."""
        dtype = tf.float64 if y_pred.dtype == tf.float64 else tf.float32
        y_pred = tf.stop_gradient(tf.cast(y_pred, dtype))
        if self.distribution in (_SPARSE, _CATEGORICAL):
            classes = y_pred.shape[-1]
            flat = tf.reshape(y_pred, (-1, classes))
            logits = flat if self.from_logits else tf.math.log(tf.maximum(flat, 1e-30))
            draw = tf.random.stateless_categorical(logits, 1, seed=seed, dtype=tf.int32)
            labels = tf.reshape(draw, tf.shape(y_pred)[:-1])
            if self.distribution == _SPARSE:
                return labels
            return tf.one_hot(labels, classes, dtype=y_pred.dtype)
        if self.distribution == _BERNOULLI:
            p = tf.sigmoid(y_pred) if self.from_logits else y_pred
            u = tf.random.stateless_uniform(tf.shape(p), seed=seed, dtype=p.dtype)
            return tf.cast(u < p, p.dtype)
        # Gaussian: half squared error has σ = 1; Keras' MSE, (1/C) Σ (y - z)^2, is the NLL
        # (up to a constant) of N(z, σ^2 I) with 2 σ^2 = C.
        if self.half_squared:
            std = 1.0
        else:
            std = (y_pred.shape[-1] / 2.0) ** 0.5
        noise = tf.random.stateless_normal(tf.shape(y_pred), seed=seed, dtype=y_pred.dtype)
        return y_pred + std * noise


class _FunctionLoss(keras.losses.Loss):
    """A loss function given by name or as a function, reduced as ``compile`` reduces it."""

    def __init__(self, fn):
        super().__init__(name=getattr(fn, "__name__", "loss"))
        self.fn = fn

    def call(self, y_true, y_pred):
        return self.fn(y_true, y_pred)


def _unpack(loss):
    """(function, kwargs, Loss object) for a compiled loss given in any Keras form."""
    if isinstance(loss, str):
        loss = keras.losses.get(loss)
    if isinstance(loss, keras.losses.Loss):
        # Keras' built-in losses (and ours) wrap a function and its keyword arguments.
        return getattr(loss, "fn", None), dict(getattr(loss, "_fn_kwargs", {})), loss
    if callable(loss):
        return loss, {}, _FunctionLoss(loss)
    return None, {}, None


def resolve_sampler(loss) -> TargetSampler:
    """The :class:`TargetSampler` for a loss passed to ``compile``; ValueError if unsupported."""
    if loss is None:
        raise ValueError(
            "A FisherModel needs a loss in `compile()` to know which distribution to draw "
            f"targets from. Supported: {SUPPORTED_LOSSES}."
        )
    if isinstance(loss, (list, tuple, dict)):
        raise ValueError(
            "keras_tnt's Fisher training step supports single-output models with one loss; "
            f"received loss={loss!r}. Compile with one of: {SUPPORTED_LOSSES}."
        )
    fn, kwargs, loss_object = _unpack(loss)
    entry = _SUPPORTED.get(fn)
    if entry is None:
        raise ValueError(
            f"keras_tnt cannot draw Fisher targets for loss={loss!r}: it must be the negative "
            f"log-likelihood of a distribution it knows. Supported: {SUPPORTED_LOSSES}. For "
            "another loss, train with an optimizer that does not need sampled labels."
        )
    distribution, default_logits = entry
    if kwargs.get("label_smoothing", 0) not in (0, 0.0, None):
        raise ValueError(
            f"label_smoothing={kwargs['label_smoothing']} makes {fn.__name__} no longer a "
            "log-likelihood of the model's distribution; use label_smoothing=0 with keras_tnt."
        )
    if kwargs.get("axis", -1) not in (-1, None):
        raise ValueError(
            f"keras_tnt needs the class axis last (axis=-1); received {kwargs['axis']}."
        )
    if kwargs.get("ignore_class") is not None:
        raise ValueError(
            "keras_tnt does not support `ignore_class`; received "
            f"ignore_class={kwargs['ignore_class']}."
        )
    return TargetSampler(
        distribution=distribution,
        from_logits=bool(kwargs.get("from_logits", default_logits)),
        loss=loss_object,
        half_squared=fn is tnt_losses.half_squared_error,
    )
