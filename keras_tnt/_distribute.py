"""The TensorFlow-only glue between curvature statistics and ``tf.distribute``.

Keras all-reduces the ordinary gradients inside ``optimizer.apply``; gradients from an extra
backward pass (the sampled-label "Fisher" gradients) are not. Without care every replica would fold
its own local gradient into its own copy of the statistics and the replicas would drift apart.
:func:`fold_across_replicas` sums the gradients over replicas (Keras losses are already divided by
the number of replicas, as for ``apply``), then runs the fold once per device in cross-replica
context, under the condition, so every replica gets bit-identical statistics.

A ``tf.cond`` around an all-reduce fails under ``MirroredStrategy``: the all-reduce runs on every
step and the condition is applied after it, in cross-replica context.
"""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Sequence

import keras
import tensorflow as tf


def num_replicas() -> int:
    return tf.distribute.get_strategy().num_replicas_in_sync


def outside_graph():
    """A context that runs eagerly now, also inside a ``tf.function`` being traced.

    Keras builds an optimizer inside the traced training step; a state restored at build time
    must be assigned once, then, not on every step.
    """
    return tf.init_scope()


def value_now(variable):
    """The variable's current value as a NumPy value, also while a ``tf.function`` is traced."""
    with outside_graph():
        return keras.ops.convert_to_numpy(variable.value)


def fold_across_replicas(
    gradients: Sequence,
    anchor,
    fold: Callable,
    condition=None,
    on_skip: Callable | None = None,
) -> None:
    """Calls ``fold(gradients)`` with gradients summed over replicas, on every replica.

    ``anchor`` is a (mirrored) variable on whose devices the fold runs (a Keras or a
    ``tf.Variable``; the optimizer's own counter is used); ``fold`` receives the list
    of reduced gradients local to one device and may assign any optimizer variable (the update
    context writes the component on that device). ``condition`` (a scalar bool
    tensor, equal on every replica) gates the fold; ``on_skip`` runs when it is False.
    """
    ctx = tf.distribute.get_replica_context()
    if ctx is None or num_replicas() == 1:
        # One replica (or called in cross-replica context by the user): no reduction needed.
        _gated(fold, gradients, condition, on_skip)
        return
    reduced = ctx.all_reduce(tf.distribute.ReduceOp.SUM, list(gradients))
    # A Keras variable wraps the (mirrored) tf.Variable that `update` needs; a raw tf.Variable
    # has a `value` method instead.
    anchor = anchor.value if isinstance(anchor, keras.Variable) else anchor
    if condition is None:
        condition = tf.constant(True)

    def merge_fn(strategy, reduced, condition):
        flag = strategy.experimental_local_results(condition)[0]

        def run():
            # The gradients are mirrored: every device computes the same fold from the same
            # values. ``update`` runs ``fold`` once per device with that device's components.
            strategy.extended.update(
                anchor,
                lambda _, *g: fold(list(g)),
                args=tuple(reduced),
                group=False,
            )

        _gated(lambda _: run(), reduced, flag, on_skip)

    ctx.merge_call(merge_fn, args=(reduced, condition))


def _gated(fold, gradients, condition, on_skip):
    if condition is None:
        fold(gradients)
        return

    def skip():
        if on_skip is not None:
            on_skip()

    tf.cond(condition, lambda: _none(fold, gradients), lambda: _none(skip))


def _none(fn, *args):
    fn(*args)
    return tf.constant(0)
