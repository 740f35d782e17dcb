"""A small transformer encoder classifier: TNT on embeddings, attention and LayerNorm.

:func:`transformer_classifier`: token embedding + learned positional embedding, ``blocks``
pre-LayerNorm encoder blocks (MultiHeadAttention, then a GELU MLP, each with a residual), a final
LayerNorm, mean pooling over positions and a Dense head. Every tensor kind TNT meets in today's
models is there: an embedding table, 3-mode attention kernels, 2-mode attention biases,
LayerNorm vectors, Dense kernels on 3-D inputs. :func:`digits_transformer` is the registry's
problem of that kind: scikit-learn's digits read as 64 intensity tokens (``models.data``'s
``digits_tokens``).
"""

from __future__ import annotations

import keras

import keras_tnt


@keras.saving.register_keras_serializable(package="models")
class PositionEmbedding(keras.layers.Layer):
    """Adds a learned ``(length, width)`` table to its ``(batch, length, width)`` input."""

    def __init__(self, length: int, width: int, **kwargs):
        super().__init__(**kwargs)
        self.length, self.width = int(length), int(width)

    def build(self, input_shape):
        if tuple(input_shape[-2:]) != (self.length, self.width):
            raise ValueError(
                f"PositionEmbedding({self.length}, {self.width}) needs inputs of shape "
                f"(batch, {self.length}, {self.width}); received {tuple(input_shape)}."
            )
        self.embeddings = self.add_weight(
            shape=(self.length, self.width),
            initializer=keras.initializers.RandomNormal(stddev=0.02),
            name="embeddings",
        )

    def call(self, x):
        return x + keras.ops.cast(self.embeddings, x.dtype)

    def get_config(self):
        return {**super().get_config(), "length": self.length, "width": self.width}


def transformer_classifier(
    vocabulary: int,
    length: int,
    classes: int,
    width: int = 32,
    heads: int = 2,
    blocks: int = 2,
    mlp_width: int = 64,
    name: str = "transformer_classifier",
) -> keras_tnt.FisherModel:
    """Integer tokens ``(batch, length)`` in ``[0, vocabulary)`` → ``classes`` logits."""
    for argument, value in (
        ("vocabulary", vocabulary),
        ("length", length),
        ("classes", classes),
        ("width", width),
        ("heads", heads),
        ("blocks", blocks),
        ("mlp_width", mlp_width),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"`{argument}` must be an integer >= 1; received {value!r}.")
    if width % heads:
        raise ValueError(f"`width` ({width}) must be a multiple of `heads` ({heads}).")
    tokens = keras.Input((length,), dtype="int32", name="tokens")
    x = keras.layers.Embedding(vocabulary, width, name="token_embedding")(tokens)
    x = PositionEmbedding(length, width, name="position_embedding")(x)
    for b in range(blocks):
        h = keras.layers.LayerNormalization(epsilon=1e-5, name=f"block{b}_attention_norm")(x)
        h = keras.layers.MultiHeadAttention(heads, width // heads, name=f"block{b}_attention")(h, h)
        x = keras.layers.Add(name=f"block{b}_attention_residual")([x, h])
        h = keras.layers.LayerNormalization(epsilon=1e-5, name=f"block{b}_mlp_norm")(x)
        h = keras.layers.Dense(mlp_width, activation="gelu", name=f"block{b}_mlp_in")(h)
        h = keras.layers.Dense(width, name=f"block{b}_mlp_out")(h)
        x = keras.layers.Add(name=f"block{b}_mlp_residual")([x, h])
    x = keras.layers.LayerNormalization(epsilon=1e-5, name="final_norm")(x)
    x = keras.layers.GlobalAveragePooling1D(name="pool")(x)
    logits = keras.layers.Dense(classes, name="head")(x)
    return keras_tnt.FisherModel(tokens, logits, name=name)


def digits_transformer() -> keras_tnt.FisherModel:
    """The ``digits_transformer`` problem's model: 64 tokens of 17 intensities → 10 digits.

    Width 32, 2 heads, 2 blocks, MLP width 64: 20,074 parameters.
    """
    return transformer_classifier(
        vocabulary=17,
        length=64,
        classes=10,
        width=32,
        heads=2,
        blocks=2,
        mlp_width=64,
        name="digits_transformer",
    )
