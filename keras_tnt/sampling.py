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
``fisher_seed``, the optimizer's step) and of the example's position in the global batch, so a
step is reproducible, gives the same draws with and without XLA, and a replica holding a slice
of the global batch draws for it what one device draws for the whole batch.
"""

from __future__ import annotations

import dataclasses

import keras
import numpy as np
from keras import ops

from keras_tnt import losses as tnt_losses
from keras_tnt._variables import statistics_dtype

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

    def sample(self, y_pred, seed, first_example=0):
        """One target per example (per unit for Bernoulli/Gaussian), without gradient.

        ``seed``: a 1-D integer tensor (any length) from which the draws are a pure function,
        with the example's position: ``y_pred`` holds the examples ``first_example, ...`` of
        a global batch (a replica's slice), and draws what one device would draw for them.
        """
        dtype = statistics_dtype(y_pred.dtype)
        y_pred = ops.stop_gradient(ops.cast(y_pred, dtype))
        first = 0
        if not (isinstance(first_example, int) and first_example == 0):
            per_example = _size(ops.shape(y_pred)[1:])
            first = ops.multiply(ops.cast(first_example, "int32"), per_example)
        if self.distribution in (_SPARSE, _CATEGORICAL):
            classes = y_pred.shape[-1]
            flat = ops.reshape(y_pred, (-1, classes))
            logits = flat if self.from_logits else ops.log(ops.maximum(flat, 1e-30))
            # Gumbel-max: argmax(logits + Gumbel noise) ~ Categorical(softmax(logits)).
            u = counter_uniform(ops.shape(flat), seed, dtype, first=first)
            draw = ops.cast(ops.argmax(logits - ops.log(-ops.log(u)), axis=-1), "int32")
            labels = ops.reshape(draw, ops.shape(y_pred)[:-1])
            if self.distribution == _SPARSE:
                return labels
            return ops.one_hot(labels, classes, dtype=y_pred.dtype)
        if self.distribution == _BERNOULLI:
            p = ops.sigmoid(y_pred) if self.from_logits else y_pred
            return ops.cast(counter_uniform(ops.shape(p), seed, dtype, first=first) < p, dtype)
        # Gaussian: half squared error has σ = 1; Keras' MSE, (1/C) Σ (y - z)^2, is the NLL
        # (up to a constant) of N(z, σ^2 I) with 2 σ^2 = C.
        std = 1.0 if self.half_squared else (y_pred.shape[-1] / 2.0) ** 0.5
        return y_pred + std * counter_normal(ops.shape(y_pred), seed, dtype, first=first)


# A counter-based generator (the "lowbias32" integer hash of the element index, keyed by the
# seed) instead of the backends' stateless random ops: TensorFlow's draw different numbers under
# XLA than without it (measured: `tf.random.stateless_uniform(alg="philox")` differs by up to
# 0.98 between jit_compile on and off on CPU, and `alg="threefry"` does not run without XLA),
# and JAX's differ from TensorFlow's. A training step must give the same update with jit on or
# off and on either backend. Written in keras.ops on uint32 words (wrapping multiplication).


def _u32(value):
    # A NumPy word: one uint32 constant (a Python integer converts through a cast).
    return ops.convert_to_tensor(np.uint32(value & 0xFFFFFFFF), "uint32")


def _mix(x):
    x = ops.bitwise_xor(x, ops.right_shift(x, _u32(16)))
    x = ops.multiply(x, _u32(0x7FEB352D))
    x = ops.bitwise_xor(x, ops.right_shift(x, _u32(15)))
    x = ops.multiply(x, _u32(0x846CA68B))
    return ops.bitwise_xor(x, ops.right_shift(x, _u32(16)))


def _mix_int(x: int) -> int:
    """:func:`_mix` of a Python integer word (the same bits, computed at trace time)."""
    x ^= x >> 16
    x = (x * 0x7FEB352D) & 0xFFFFFFFF
    x ^= x >> 15
    x = (x * 0x846CA68B) & 0xFFFFFFFF
    return x ^ (x >> 16)


def _seed_words(seed):
    """``[(low 32 bits, high 32 bits)]`` of each seed element (high is 0 for 32-bit seeds).

    ``seed``: a 1-D integer tensor, or a sequence of Python integers and scalar integer
    tensors. A Python integer's words are Python integers (constants the hash folds before the
    graph: the training step's seed leads with the model seed and the stream, both constants).
    """
    if isinstance(seed, (list, tuple)):
        words = []
        for value in seed:
            if isinstance(value, (int, np.integer)):
                value = int(value)
                if value < 0:  # two's complement in 64 bits, as a tensor's words would be
                    value &= 0xFFFFFFFFFFFFFFFF
                words.append((value & 0xFFFFFFFF, (value >> 32) & 0xFFFFFFFF))
            else:
                words.extend(_seed_words(ops.reshape(value, (1,))))
        return words
    seed = ops.reshape(ops.convert_to_tensor(seed), (-1,))
    wide = keras.backend.standardize_dtype(seed.dtype) in ("int64", "uint64")
    words = []
    for i in range(seed.shape[0]):
        low = ops.cast(seed[i], "uint32")
        high = ops.cast(ops.right_shift(seed[i], 32), "uint32") if wide else _u32(0)
        words.append((low, high))
    return words


def _random_words(size, seed, stream: int, first=0):
    key = (0x9E3779B9 * (stream + 1)) & 0xFFFFFFFF
    for low, high in _seed_words(seed):
        if isinstance(key, int) and isinstance(low, int) and isinstance(high, int):
            key = _mix_int((_mix_int(key ^ low) + high) & 0xFFFFFFFF)
            continue
        key = _mix(ops.bitwise_xor(_u32(key) if isinstance(key, int) else key, _word(low)))
        key = _mix(ops.add(key, _word(high)))
    key = _u32(key) if isinstance(key, int) else key
    index = ops.cast(ops.arange(size, dtype="int32"), "uint32")
    if not (isinstance(first, int) and first == 0):
        index = ops.add(index, ops.cast(first, "uint32"))
    return _mix(ops.bitwise_xor(_mix(ops.add(ops.multiply(index, _u32(0x9E3779B9)), key)), key))


def _word(value):
    return _u32(value) if isinstance(value, int) else value


def _size(shape):
    size = 1
    for d in shape:
        size = size * d
    return size


def counter_uniform(shape, seed, dtype="float32", stream: int = 0, first=0):
    """Uniform draws in the open interval (0, 1), a pure function of ``seed`` and position.

    Element ``i`` (row-major) gets the draw at position ``first + i``: the draws of a slice of
    a larger array are that slice of the larger array's draws.
    """
    dtype = keras.backend.standardize_dtype(dtype)
    size = _size(shape)
    high = _random_words(size, seed, 2 * stream, first)
    # u = (k + 1/2) 2^-b with k uniform on b bits: b = 52 (float64) and 23 (float32), one bit
    # below the mantissa so that k + 1/2 is exact. (With b = 53 / 24, k + 1/2 rounded to even
    # for the upper half of k, and the largest k gave u = 1.0 exactly: the test of the lowest
    # bits in tests/test_sampler_quality.py found it.)
    if dtype == "float64":
        low = _random_words(size, seed, 2 * stream + 1, first)
        bits = ops.cast(ops.right_shift(high, _u32(6)), "float64") * 67108864.0 + ops.cast(
            ops.right_shift(low, _u32(6)), "float64"
        )
        u = (bits + 0.5) * (2.0**-52)
    else:
        u = (ops.cast(ops.right_shift(high, _u32(9)), "float32") + 0.5) * (2.0**-23)
    return ops.reshape(ops.cast(u, dtype), shape)


def counter_normal(shape, seed, dtype="float32", first=0):
    """Standard normal draws (Box-Muller on two counter-based uniform streams)."""
    u1 = counter_uniform(shape, seed, dtype, stream=1, first=first)
    u2 = counter_uniform(shape, seed, dtype, stream=2, first=first)
    return ops.sqrt(-2.0 * ops.log(u1)) * ops.cos((2.0 * 3.141592653589793) * u2)


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
