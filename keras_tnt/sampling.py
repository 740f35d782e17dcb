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

Draws are a pure function of an explicit seed (the training step passes the model's
``fisher_seed``, the optimizer's step and the replica id), so a step is reproducible, gives the
same draws with and without XLA, and every replica draws differently.
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
        """One target per example (per unit for Bernoulli/Gaussian), without gradient.

        ``seed``: a 1-D integer tensor (any length) from which the draws are a pure function.
        """
        dtype = tf.float64 if y_pred.dtype == tf.float64 else tf.float32
        y_pred = tf.stop_gradient(tf.cast(y_pred, dtype))
        if self.distribution in (_SPARSE, _CATEGORICAL):
            classes = y_pred.shape[-1]
            flat = tf.reshape(y_pred, (-1, classes))
            logits = flat if self.from_logits else tf.math.log(tf.maximum(flat, 1e-30))
            # Gumbel-max: argmax(logits + Gumbel noise) ~ Categorical(softmax(logits)).
            u = counter_uniform(tf.shape(flat), seed, dtype)
            draw = tf.argmax(logits - tf.math.log(-tf.math.log(u)), axis=-1, output_type=tf.int32)
            labels = tf.reshape(draw, tf.shape(y_pred)[:-1])
            if self.distribution == _SPARSE:
                return labels
            return tf.one_hot(labels, classes, dtype=y_pred.dtype)
        if self.distribution == _BERNOULLI:
            p = tf.sigmoid(y_pred) if self.from_logits else y_pred
            return tf.cast(counter_uniform(tf.shape(p), seed, dtype) < p, dtype)
        # Gaussian: half squared error has σ = 1; Keras' MSE, (1/C) Σ (y - z)^2, is the NLL
        # (up to a constant) of N(z, σ^2 I) with 2 σ^2 = C.
        std = 1.0 if self.half_squared else (y_pred.shape[-1] / 2.0) ** 0.5
        return y_pred + std * counter_normal(tf.shape(y_pred), seed, dtype)


# A counter-based generator (the "lowbias32" integer hash of the element index, keyed by the
# seed) instead of tf.random's stateless ops: those draw different numbers under XLA than
# without it, and a training step must give the same update with jit_compile on or off.


def _mix(x):
    x = tf.bitwise.bitwise_xor(x, tf.bitwise.right_shift(x, 16))
    x = x * tf.constant(0x7FEB352D, tf.uint32)
    x = tf.bitwise.bitwise_xor(x, tf.bitwise.right_shift(x, 15))
    x = x * tf.constant(0x846CA68B, tf.uint32)
    return tf.bitwise.bitwise_xor(x, tf.bitwise.right_shift(x, 16))


def _random_words(size, seed, stream: int):
    key = tf.constant(0x9E3779B9 * (stream + 1) & 0xFFFFFFFF, tf.uint32)
    seed = tf.reshape(tf.convert_to_tensor(seed), (-1,))
    for i in range(seed.shape[0]):
        key = _mix(key ^ tf.cast(seed[i], tf.uint32))
        key = _mix(key + tf.cast(tf.bitwise.right_shift(tf.cast(seed[i], tf.int64), 32), tf.uint32))
    index = tf.cast(tf.range(size), tf.uint32)
    return _mix(_mix(index * tf.constant(0x9E3779B9, tf.uint32) + key) ^ key)


def counter_uniform(shape, seed, dtype=tf.float32, stream: int = 0):
    """Uniform draws in the open interval (0, 1), a pure function of ``seed`` and position."""
    size = tf.reduce_prod(shape)
    high = _random_words(size, seed, 2 * stream)
    if dtype == tf.float64:
        low = _random_words(size, seed, 2 * stream + 1)
        bits = tf.cast(tf.bitwise.right_shift(high, 5), tf.float64) * 67108864.0 + tf.cast(
            tf.bitwise.right_shift(low, 6), tf.float64
        )
        u = (bits + 0.5) * (2.0**-53)
    else:
        u = (tf.cast(tf.bitwise.right_shift(high, 8), tf.float32) + 0.5) * (2.0**-24)
    return tf.reshape(tf.cast(u, dtype), shape)


def counter_normal(shape, seed, dtype=tf.float32):
    """Standard normal draws (Box-Muller on two counter-based uniform streams)."""
    u1 = counter_uniform(shape, seed, dtype, stream=1)
    u2 = counter_uniform(shape, seed, dtype, stream=2)
    return tf.sqrt(-2.0 * tf.math.log(u1)) * tf.cos((2.0 * 3.141592653589793) * u2)


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
