"""Recording what chosen layers see during a forward pass (KFAC's inputs and pre-activations)."""

from __future__ import annotations

import contextlib


@contextlib.contextmanager
def capture_layers(layers, offsets=None):
    """Records the input and the pre-activation output of each layer while it runs.

    Yields a dict ``id(layer) -> [(inputs, preactivations), ...]``, one entry per call. The
    layers' own ``call`` runs unchanged (same weights, dtype policy and activation); only the
    activation function is wrapped, to see the tensor it is applied to.

    ``offsets`` (optional, ``id(layer) -> tensor``) are added to the pre-activations before the
    activation: zeros whose gradient is the pre-activation gradient, for backends (JAX) that
    differentiate functions, not tensors recorded on a tape.
    """
    records = {id(layer): [] for layer in layers}
    installed = []
    try:
        for layer in layers:

            def call(inputs, *args, __layer=layer, **kwargs):
                activation = __layer.activation
                seen = []

                def record(z):
                    seen.append(z)
                    if offsets is not None:
                        z = z + offsets[id(__layer)]
                    return activation(z)

                object.__setattr__(__layer, "activation", record)
                try:
                    outputs = type(__layer).call(__layer, inputs, *args, **kwargs)
                finally:
                    object.__setattr__(__layer, "activation", activation)
                records[id(__layer)].append((inputs, seen[0]))
                return outputs

            object.__setattr__(layer, "call", call)
            installed.append(layer)
        yield records
    finally:
        for layer in installed:
            layer.__dict__.pop("call", None)
