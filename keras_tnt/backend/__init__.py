"""What differs between Keras backends, in one module per backend (as Keras' own trainers).

The optimizer math (:mod:`keras_tnt.tnt`, :mod:`keras_tnt.kronecker`, ...) is ``keras.ops`` and
runs unchanged on every backend; it reaches the backend only through the functions below. Each
backend module provides the same names:

* ``FisherTrainer``: the mixin that gives :class:`keras_tnt.FisherModel` its training step (one
  forward pass; a second backward pass for the sampled-label gradients only when statistics are
  due) and the warm-start loop.
* ``num_replicas()``, ``fold_across_replicas(values, anchor, fold, condition)``: how a batch of
  curvature data reaches the statistics of every replica.
* ``outside_graph()``, ``value_now(variable)``: reading a variable's stored value while a step
  is being traced (to restore, or to check, state at build time); ``read_value(variable)``:
  its value as a tensor inside the step (what ``ops.stack`` takes).
* ``split_replicas()``, ``update_everywhere(...)``, ``update_from_owners(...)``: whether the
  update's units of work are split across replicas, and the two ways of running it (every
  replica computes every unit; each unit's owner computes it and shares it by an all-reduce).
* ``row_slices(gradient)``, ``scatter_rows(x, rows, values)``, ``stored_values(gradient)``: a
  gradient that touches few rows (TensorFlow's ``IndexedSlices``) as its distinct rows and
  their values, for TNT's row-sparse step; ``step_or_keep(finite, step, keep)``: a large
  tensor's step or its kept values, by a condition (TensorFlow) or a fused select (JAX).
* ``has_accelerator()``: whether a GPU or TPU is visible (Shampoo picks its root method).
* ``cholesky(x)``, ``extract_patches(layer, inputs)``: the few kernels ``keras.ops`` does not
  give as the math needs them.

Only the module of the active backend is imported: with ``KERAS_BACKEND=jax`` keras_tnt never
imports TensorFlow.
"""

from __future__ import annotations

import keras

NAME = keras.backend.backend()

if NAME == "tensorflow":
    from keras_tnt.backend.tensorflow import *  # noqa: F403
elif NAME == "jax":
    from keras_tnt.backend.jax import *  # noqa: F403
else:  # pragma: no cover - depends on the environment
    raise ImportError(
        f"keras_tnt runs on Keras' 'tensorflow' and 'jax' backends; KERAS_BACKEND is {NAME!r}. "
        "Set KERAS_BACKEND=tensorflow or KERAS_BACKEND=jax before importing keras."
    )
