"""KFAC's view of a model: which layers it factors, and why the others take the plain step."""

from __future__ import annotations

import dataclasses
import math

import keras

from keras_tnt._variables import first_override
from keras_tnt._variables import variable_path


@dataclasses.dataclass
class LayerBlock:
    """One Kronecker-factored layer: which optimizer variables it owns and its factor sizes."""

    layer: keras.layers.Layer
    kind: str  # "dense" or "conv2d"
    kernel_index: int
    bias_index: int | None
    input_size: int  # rows of the factor A (with the bias's ones column)
    output_size: int  # rows of the factor G
    diagonal: tuple[bool, bool] = (False, False)  # A, G kept as their diagonals
    override: str | None = None  # the kind a factor_overrides pattern set

    @property
    def indices(self) -> tuple[int, ...]:
        if self.bias_index is None:
            return (self.kernel_index,)
        return (self.kernel_index, self.bias_index)


def trainable_layers(model) -> list:
    """Every layer of ``model`` (nested ones included, parents first) with trainable weights."""
    return [
        layer
        for layer in model._flatten_layers(include_self=False, recursive=True)
        if layer.trainable_weights
    ]


def kernel_variable(layer):
    kernel = getattr(layer, "_kernel", None)
    return kernel if kernel is not None else getattr(layer, "kernel", None)


def why_not_factored(layer) -> str | None:
    """None if KFAC can factor ``layer``, else the reason it takes the plain momentum step."""
    if type(layer) not in (keras.layers.Dense, keras.layers.Conv2D):
        return "not a Dense or Conv2D layer"
    if getattr(layer, "lora_enabled", False):
        return "LoRA is enabled"
    if getattr(layer, "quantization_mode", None):
        return "the layer is quantized"
    if isinstance(layer, keras.layers.Conv2D) and getattr(layer, "groups", 1) != 1:
        return "grouped convolution"
    kernel = kernel_variable(layer)
    if kernel is None or not getattr(kernel, "trainable", False):
        return "its kernel is not trainable"
    bias = getattr(layer, "bias", None)
    if bias is not None and not bias.trainable:
        return "its bias is not trainable"
    return None


def find_blocks(layers, var_list, overrides, max_factor_dim):
    """``(blocks, reasons)``: the layers of ``var_list`` KFAC factors (with the kind of each
    factor) and, by layer id, why each other layer takes the plain momentum step. Allocates
    nothing."""
    index = {id(v): i for i, v in enumerate(var_list)}
    blocks, reasons = [], {}
    for layer in layers:
        reason = why_not_factored(layer)
        kernel = kernel_variable(layer)
        if reason is None and id(kernel) not in index:
            reason = "its kernel is not among the optimized variables"
        bias = getattr(layer, "bias", None)
        if reason is None and bias is not None and id(bias) not in index:
            reason = "its bias is not among the optimized variables"
        override = None
        if reason is None:
            paths = [variable_path(v) for v in (kernel, bias) if v is not None]
            override = first_override(overrides, paths)
            if override == "none":
                reason = "factor_overrides chose 'none'"
        if reason is not None:
            reasons[id(layer)] = reason
            continue
        shape = tuple(kernel.shape)
        rows, outputs = math.prod(shape[:-1]), shape[-1]
        if override is not None:
            diagonal = (override == "diagonal",) * 2
        else:
            diagonal = tuple(
                max_factor_dim is not None and d > max_factor_dim for d in (rows, outputs)
            )
        blocks.append(
            LayerBlock(
                layer=layer,
                kind="dense" if isinstance(layer, keras.layers.Dense) else "conv2d",
                kernel_index=index[id(kernel)],
                bias_index=None if bias is None else index[id(bias)],
                input_size=rows + (0 if bias is None else 1),
                output_size=outputs,
                diagonal=diagonal,
                override=override,
            )
        )
    return blocks, reasons


def unfactored_layers(layers, var_list, blocks, reasons) -> dict[str, str]:
    """``{layer name: why}`` for the variables no block owns, each reported under the innermost
    layer holding it (a container whose sublayers are all factored is not reported)."""
    index = {id(v): i for i, v in enumerate(var_list)}
    owned = {i for block in blocks for i in block.indices}
    unowned = {i for i in range(len(var_list)) if i not in owned}
    found = {}
    for layer in reversed(layers):  # sublayers come after their parents
        mine = {index[id(w)] for w in layer.trainable_weights if id(w) in index} & unowned
        if mine:
            reason = reasons.get(id(layer), "not a Dense or Conv2D layer")
            found[layer.name] = f"{type(layer).__name__}: {reason}"
            unowned -= mine
    return dict(reversed(list(found.items())))
