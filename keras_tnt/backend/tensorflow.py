"""The TensorFlow backend: ``tf.GradientTape`` training step and ``tf.distribute`` glue.

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

import contextlib
import weakref
from collections.abc import Callable
from collections.abc import Sequence

import keras
import tensorflow as tf

from keras_tnt._capture import capture_layers
from keras_tnt._checks import require_targets

__all__ = [
    "FisherTrainer",
    "cholesky",
    "count_dtype",
    "count_replica_work",
    "extract_patches",
    "fold_across_replicas",
    "has_accelerator",
    "make_work_counter",
    "num_replicas",
    "outside_graph",
    "read_value",
    "replica_work",
    "row_slices",
    "scatter_rows",
    "step_or_keep",
    "stored_values",
    "update_everywhere",
    "split_replicas",
    "update_from_owners",
    "value_now",
]


def num_replicas() -> int:
    return tf.distribute.get_strategy().num_replicas_in_sync


def count_dtype() -> str:
    """The integer type of the optimizers' counters: int64 (int32 on JAX without x64)."""
    return "int64"


def outside_graph():
    """A context that runs eagerly now, also inside a ``tf.function`` being traced.

    Keras builds an optimizer inside the traced training step; a state restored at build time
    must be assigned once, then, not on every step.
    """
    return tf.init_scope()


def read_value(x):
    """The current value of a variable (Keras or ``tf``) as a tensor (``ops.convert_to_tensor``
    hands a variable back as it is, which ``ops.stack`` cannot take); anything else converted."""
    if isinstance(x, keras.Variable):
        x = x.value
    return tf.convert_to_tensor(x)


def value_now(variable):
    """The variable's current value as a NumPy value, also while a ``tf.function`` is traced."""
    with outside_graph():
        return keras.ops.convert_to_numpy(variable.value)


def cholesky(x):
    """Lower Cholesky factor; NaN (never an exception) where the factorisation fails.

    (``keras.ops.cholesky`` wraps this in ``check_numerics``, which raises on failure.)
    """
    return tf.linalg.cholesky(x)


def row_slices(x):
    """``(rows, values)`` of a gradient that arrives as ``tf.IndexedSlices`` (an Embedding's,
    a gather's): its rows with the values of a repeated index summed (as the dense gradient
    sums them), each row once; None for a dense tensor.

    As many rows as the slices have (XLA needs a shape that does not depend on the values):
    the distinct rows first, then row 0 with zero values, which adds nothing wherever the
    rows are scattered or contracted.
    """
    if not isinstance(x, tf.IndexedSlices):
        return None
    n = tf.shape(x.indices)[0]
    order = tf.argsort(x.indices, stable=True)
    rows = tf.gather(x.indices, order)
    first = tf.ones_like(rows[:1], tf.bool)  # none for no slices
    starts = tf.concat([first, rows[1:] != rows[:-1]], axis=0)
    segment = tf.cumsum(tf.cast(starts, tf.int32)) - 1
    values = tf.math.unsorted_segment_sum(tf.gather(x.values, order), segment, n)
    distinct = tf.tensor_scatter_nd_update(tf.zeros_like(rows), segment[:, None], rows)
    return distinct, values


def scatter_rows(x, rows, values):
    """``x`` with ``values`` added to its rows ``rows`` (distinct)."""
    return tf.tensor_scatter_nd_add(x, rows[:, None], values)


def step_or_keep(finite, step, keep):
    """``step()`` if the scalar bool ``finite`` holds, else ``keep()`` (equal structures of
    tensors). Only the branch taken runs: a select would pass over every element of both,
    which for an embedding table costs more than the step's own work."""
    return tf.cond(finite, step, keep)


def stored_values(x):
    """The numbers a gradient holds: an ``IndexedSlices``' values (never densified), else
    ``x`` (to check them for NaN/inf)."""
    return x.values if isinstance(x, tf.IndexedSlices) else x


def has_accelerator() -> bool:
    """Whether TensorFlow sees a GPU or TPU."""
    return bool(tf.config.list_logical_devices("GPU") or tf.config.list_logical_devices("TPU"))


def extract_patches(layer, inputs):
    """im2col: ``(N, H', W', kh*kw*C)`` patches in the order of the reshaped Keras kernel."""
    if layer.data_format == "channels_first":
        inputs = tf.transpose(inputs, (0, 2, 3, 1))
    kh, kw = layer.kernel_size
    sh, sw = layer.strides
    dh, dw = layer.dilation_rate
    return tf.image.extract_patches(
        inputs,
        sizes=(1, kh, kw, 1),
        strides=(1, sh, sw, 1),
        rates=(1, dh, dw, 1),
        padding=layer.padding.upper(),
    )


def fold_across_replicas(
    values: Sequence, anchor, fold: Callable, condition=None, share=None
) -> None:
    """Calls ``fold(values, condition)`` with values summed over replicas, on every replica.

    ``anchor`` is a (mirrored) variable on whose devices the fold runs (a Keras or a
    ``tf.Variable``; the optimizer's own counter is used); ``fold`` receives the list of reduced
    values local to one device and the gate (a scalar bool tensor, equal on every replica, or
    None), and assigns optimizer variables (the update context writes the component on that
    device). The fold applies the gate itself, with branches that return values.

    ``share=(owners, compute, zeros)`` splits work across replicas: after the reduction, the
    replica ``owners[k]`` computes the ``k``-th piece of work, ``compute(k, reduced values,
    condition)``, and every other replica ``zeros(k)`` (the same structure); these are summed
    over replicas (a sum with zeros is exact, so every replica gets the owner's numbers bit for
    bit) and the fold is called as ``fold(values, gate, shared)``.
    """
    ctx = tf.distribute.get_replica_context()
    if ctx is None or num_replicas() == 1:
        # One replica (or called in cross-replica context by the user): no reduction needed.
        fold(list(values), condition)
        return
    reduced = ctx.all_reduce(tf.distribute.ReduceOp.SUM, list(values))
    shared = None
    if share is not None:
        owners, compute, zeros = share
        shared = _from_owners(ctx, owners, lambda k: compute(k, reduced, condition), zeros)
    if condition is None:
        condition = tf.constant(True)
    flat_shared = tf.nest.flatten(shared)

    def merge_fn(strategy, reduced, flat_shared, condition):
        gate = strategy.experimental_local_results(condition)[0]

        def local_fold(_, *local):
            # The values are mirrored: every device computes the same fold from the same values.
            local_values = list(local[: len(reduced)])
            if shared is None:
                fold(local_values, gate)
            else:
                packed = tf.nest.pack_sequence_as(shared, list(local[len(reduced) :]))
                fold(local_values, gate, packed)

        # ``update`` runs the fold once per device with that device's components.
        strategy.extended.update(
            _tf_variable(anchor),
            local_fold,
            args=tuple(reduced) + tuple(flat_shared),
            group=False,
        )

    ctx.merge_call(merge_fn, args=(reduced, flat_shared, condition))


def _tf_variable(variable):
    # A Keras variable wraps the (mirrored) tf.Variable that `update` needs; a raw tf.Variable
    # has a `value` method instead.
    return variable.value if isinstance(variable, keras.Variable) else variable


# ------------------------------------------------------- split work across replicas


def split_replicas(optimizer=None):
    """The number of replicas to split work across, or None (one replica, no replica context).

    Needs the replica's id as a constant (MirroredStrategy, MultiWorkerMirroredStrategy), so
    that each replica's program holds only the work it owns. Not in the trace that created
    ``optimizer``'s variables (``strategy.run(lambda: optimizer.apply(...))`` on an unbuilt
    optimizer): TensorFlow runs that trace once, to initialise them, and the owner branches
    with their all-reduce do not run there. That first step runs unsplit (the same numbers);
    the next trace splits.
    """
    ctx = tf.distribute.get_replica_context()
    if ctx is None or num_replicas() == 1:
        return None
    if tf.get_static_value(ctx.replica_id_in_sync_group) is None:
        return None  # e.g. TPUStrategy: every replica runs one program
    built_in = _BUILT_IN_GRAPH.get(optimizer) if optimizer is not None else None
    if built_in is not None and built_in() is tf.compat.v1.get_default_graph():
        return None
    return num_replicas()


def _from_owners(ctx, owners, compute, zeros):
    """``[compute(k) on replica owners[k]]`` on every replica: one sum all-reduce."""
    replica = int(tf.get_static_value(ctx.replica_id_in_sync_group))
    local = [compute(k) if owner == replica else zeros(k) for k, owner in enumerate(owners)]
    # Tensors, not variables: run eagerly, a branch may hand back a slot variable itself.
    flat = [tf.convert_to_tensor(v) for v in tf.nest.flatten(local)]
    return tf.nest.pack_sequence_as(local, _sum(ctx, flat))


def _sum(ctx, values):
    """Sum all-reduce of tensors of several dtypes (some reductions pack one dtype at a time)."""
    out = list(values)
    for dtype in {v.dtype for v in values}:
        indices = [i for i, v in enumerate(values) if v.dtype == dtype]
        reduced = ctx.all_reduce(tf.distribute.ReduceOp.SUM, [values[i] for i in indices])
        for i, r in zip(indices, reduced):
            out[i] = r
    return out


def update_from_owners(grads, step, assign, anchor) -> None:
    """The optimizer step with the units' work split by owner replica.

    In replica context: the gradients are summed over replicas (as Keras' ``apply`` does) and
    ``step(reduced gradients, share)`` runs on every replica, where ``share(owners, compute,
    zeros, when=None, otherwise=None)`` gives every replica ``[compute(k) of replica
    owners[k]]``: the owner computes piece ``k``, every other replica ``zeros(k)`` (the same
    structure), and one all-reduce sums them (bit for bit the owner's numbers). With ``when``
    (the JAX backend shares part of each piece only when it holds) everything is summed on
    every step: collectives do not run under a condition here, and the owner's numbers are
    then what ``otherwise`` would give. ``assign(values)`` writes ``step``'s values on every
    device.
    """
    ctx = tf.distribute.get_replica_context()
    reduced = ctx.all_reduce(tf.distribute.ReduceOp.SUM, list(grads))

    def share(owners, compute, zeros, when=None, otherwise=None):
        del when, otherwise
        return _from_owners(ctx, owners, compute, zeros)

    _merge_assign(ctx, step(reduced, share), assign, anchor)


def _assign_on_devices(strategy, structure, flat, assign, anchor) -> None:
    """``assign`` once per device of ``anchor`` (cross-replica context), with that device's
    components of ``flat``, packed as ``structure``."""
    strategy.extended.update(
        _tf_variable(anchor),
        lambda _, *v: assign(tf.nest.pack_sequence_as(structure, list(v))),
        args=tuple(flat),
        group=False,
    )


def _merge_assign(ctx, values, assign, anchor) -> None:
    """From replica context: ``assign(values)`` on every device (see ``_assign_on_devices``)."""
    # Tensors, not variables: a unit may hand back a slot variable itself.
    flat = [tf.convert_to_tensor(v) for v in tf.nest.flatten(values)]
    ctx.merge_call(
        lambda strategy, flat: _assign_on_devices(strategy, values, flat, assign, anchor),
        args=(flat,),
    )


def update_everywhere(grads, compute, assign, anchor) -> None:
    """The optimizer step with every replica computing every unit (no split).

    Without a strategy: ``assign(compute(grads))``. In a replica context: the gradients are
    summed over replicas (as Keras' ``apply`` does), each replica computes ``compute(reduced)``
    (the same numbers on every replica) and ``assign`` writes them on its devices.
    """
    if not tf.distribute.has_strategy():
        assign(compute(list(grads)))
        return
    ctx = tf.distribute.get_replica_context()
    if ctx is None:  # cross-replica context: the values are the same on every device
        values = compute(list(grads))
        flat = [tf.convert_to_tensor(v) for v in tf.nest.flatten(values)]
        _assign_on_devices(tf.distribute.get_strategy(), values, flat, assign, anchor)
        return
    reduced = ctx.all_reduce(tf.distribute.ReduceOp.SUM, list(grads))
    _merge_assign(ctx, compute(reduced), assign, anchor)


# What this module keeps per optimizer, outside its attributes (not optimizer state: never saved
# or tracked): the graph that built it, and its per-replica work counter.
_BUILT_IN_GRAPH = weakref.WeakKeyDictionary()
_WORK_COUNTERS = weakref.WeakKeyDictionary()


def make_work_counter(optimizer) -> None:
    """Per-replica work counters (not optimizer state: never saved), under a strategy only."""
    if not tf.executing_eagerly():
        # Built inside a traced step: remember which (see `split_replicas`).
        graph = weakref.ref(tf.compat.v1.get_default_graph())
        _BUILT_IN_GRAPH[optimizer] = graph
    strategy = tf.distribute.get_strategy()
    if strategy.num_replicas_in_sync == 1:
        return
    # In a replica context (``strategy.run(lambda: optimizer.apply(...))`` builds the optimizer
    # there) the strategy's variable creator is already active, and ``strategy.scope()`` is not
    # allowed.
    scope = (
        strategy.scope() if tf.distribute.in_cross_replica_context() else contextlib.nullcontext()
    )
    with outside_graph(), scope:
        counter = tf.Variable(
            tf.zeros((3,), tf.int64),
            trainable=False,
            synchronization=tf.VariableSynchronization.ON_READ,
            aggregation=tf.VariableAggregation.NONE,
            name="replica_work",
        )
    # Not an attribute Keras or tf.train.Checkpoint should track.
    _WORK_COUNTERS[optimizer] = counter


def count_replica_work(optimizer, counts) -> None:
    counter = _WORK_COUNTERS.get(optimizer)
    if counter is not None:
        counter.assign_add(tf.cast(tf.stack(counts), tf.int64))


def replica_work(optimizer) -> list:
    counter = _WORK_COUNTERS.get(optimizer)
    if counter is None:
        return []
    strategy = counter.distribute_strategy
    keys = ("factorizations", "contractions", "preconditionings")
    return [
        dict(zip(keys, (int(c) for c in local.numpy())))
        for local in strategy.experimental_local_results(counter)
    ]


def _unpack(data):
    return keras.utils.unpack_x_y_sample_weight(data)


class FisherTrainer:
    """The TensorFlow training step of :class:`keras_tnt.FisherModel` (a ``tf.GradientTape``).

    Each step makes ONE forward pass on a persistent tape. The ordinary gradient goes to
    ``optimizer.apply``; when statistics are due, a second backward pass from the same forward
    pass (``tape.gradient(y_pred, ..., output_gradients=dL_sampled/dy_pred)``, inside a
    ``tf.cond``) gives the sampled-label gradients for ``optimizer.update_curvature``.
    """

    def _build_scope(self):
        """Where optimizer variables are created (mirrored under a strategy)."""
        return self.distribute_strategy.scope()

    def make_train_function(self, force=False):
        # Without a strategy, Keras builds the optimizer inside the first traced step: each
        # variable is then created under a traced initialisation branch and the step is traced
        # twice. A second-order optimizer has several variables per weight (TNT on a 38-tensor
        # transformer: 380), so build it here, eagerly, once the model is built.
        optimizer = self.optimizer
        if (
            optimizer is not None
            and not optimizer.built
            and tf.executing_eagerly()
            and self.built
            and all(layer.built for layer in self._flatten_layers())
        ):
            with self._build_scope():
                optimizer.build(self.trainable_variables)
        return super().make_train_function(force)

    def _seed(self, counter, stream: int):
        # Python integers lead: the generator folds their words before the graph
        # (keras_tnt.sampling._seed_words), so a step hashes the counter's words only.
        return (int(self.fisher_seed), int(stream), tf.cast(counter, tf.int64))

    @staticmethod
    def _first_example(y_pred):
        """The position of this replica's first example in the global batch (0: one replica).

        tf.distribute splits a global batch into consecutive slices in replica order; the
        slices' sizes are summed over replicas, each in its own position (they differ on a
        partial last batch). Outside any ``cond``: it is a collective. (An all-reduce, not an
        ``all_gather``, which always runs collective ops, also under ``ReductionToOneDevice``.)
        """
        ctx = tf.distribute.get_replica_context()
        if ctx is None or num_replicas() == 1:
            return 0
        replica = tf.cast(ctx.replica_id_in_sync_group, tf.int64)
        size = tf.shape(y_pred, out_type=tf.int64)[0]
        mine = tf.one_hot(replica, num_replicas(), dtype=tf.int64) * size
        sizes = ctx.all_reduce(tf.distribute.ReduceOp.SUM, mine)
        return tf.reduce_sum(sizes[:replica])

    def _fisher_gradients(self, tape, y_pred, sample_weight, seed, sources=None, first=0):
        """Gradients of the compiled loss at sampled targets, from the forward pass on ``tape``.

        With respect to the trainable variables, or to ``sources`` (tensors computed on the
        tape, e.g. pre-activations for KFAC). ``first``: see :meth:`_first_example`.
        """
        targets = tf.stop_gradient(self.sample_targets(y_pred, seed, first_example=first))
        with tf.GradientTape() as output_tape:
            # A fresh tensor: Keras' probability losses otherwise reach past a softmax/sigmoid
            # output to its cached logits, and the loss would not depend on the watched tensor.
            outputs = tf.identity(y_pred)
            output_tape.watch(outputs)
            loss = self._sampled_loss(targets, outputs, sample_weight)
        output_gradient = output_tape.gradient(loss, outputs)
        grads = tape.gradient(
            y_pred,
            self.trainable_variables if sources is None else list(sources),
            output_gradients=output_gradient,
            unconnected_gradients=tf.UnconnectedGradients.ZERO,
        )
        return self._unscale(grads)

    def _curvature_input(self, tape, y_pred, sample_weight, seed, layers, records, first=0):
        """What ``optimizer.update_curvature`` takes: per-variable or per-layer Fisher data.

        ``layers`` are the recorded layers (KFAC), or None for per-variable gradients.
        """
        if layers is None:
            return self._fisher_gradients(tape, y_pred, sample_weight, seed, first=first)
        pairs = self._layer_records(layers, records)
        grads = self._fisher_gradients(
            tape, y_pred, sample_weight, seed, sources=[z for _, z in pairs], first=first
        )
        return [(a, s) for (a, _), s in zip(pairs, grads)]

    def _curvature_zeros(self, layers, records):
        """A zero ``_curvature_input`` of the same structure (replicas must all-reduce)."""
        if layers is None:
            return [tf.zeros_like(w) for w in self.trainable_variables]
        return [(a, tf.zeros_like(z)) for a, z in self._layer_records(layers, records)]

    def train_step(self, data):
        optimizer = self.curvature_optimizer
        if optimizer is None:
            return super().train_step(data)
        x, y, sample_weight = _unpack(data)
        if not optimizer.built:
            optimizer.build(self.trainable_variables)
        weights = self.trainable_variables
        keys, layers = self._curvature_keys(optimizer)
        with tf.GradientTape(persistent=True) as tape, capture_layers(layers or []) as records:
            y_pred = self._call_for_training(x)
            loss = self._compute_loss(
                x=x, y=y, y_pred=y_pred, sample_weight=sample_weight, training=True
            )
            self._loss_tracker.update_state(
                loss * num_replicas(),
                sample_weight=tf.shape(tf.nest.flatten(x)[0])[0],
            )
            scaled_loss = self.optimizer.scale_loss(loss)
        grads = tape.gradient(scaled_loss, weights)

        due = optimizer.curvature_due()
        seed = self._seed(optimizer.draw_counter, stream=0)
        if keys and num_replicas() == 1:

            def fold():
                fisher = self._curvature_input(tape, y_pred, sample_weight, seed, layers, records)
                optimizer.update_curvature(fisher, keys)
                return tf.constant(0)

            # TensorFlow runs the fold's assignments inside the branch; the fold itself is
            # written with value-returning branches (what JAX needs) and works either way.
            tf.cond(due, fold, lambda: tf.constant(0))
        elif keys:
            # Every replica must reach the collectives (the slice position, the all-reduce
            # inside update_curvature) on every step.
            first = self._first_example(y_pred)
            fisher = tf.cond(
                due,
                lambda: self._curvature_input(
                    tape, y_pred, sample_weight, seed, layers, records, first
                ),
                lambda: self._curvature_zeros(layers, records),
            )
            optimizer.update_curvature(fisher, keys, condition=due)
        self.optimizer.apply(grads, weights)
        return self.compute_metrics(x, y, y_pred, sample_weight=sample_weight)

    # ------------------------------------------------------------ warm start

    def _make_warm_start_function(self):
        # Compiled as `fit` compiles its step: eagerly under `run_eagerly`, with XLA under
        # `jit_compile` (both may change after `compile`, as for `fit`).
        key = (bool(self.run_eagerly), bool(self.jit_compile))
        cached = getattr(self, "_warm_start_function", None)
        if cached is not None and cached[0] == key:
            return cached[1]
        optimizer = self.statistics_optimizer
        strategy = self.distribute_strategy
        sampled = getattr(optimizer, "needs_sampled_gradients", True)

        def replica_step(data):
            x_batch, y_batch, sample_weight = _unpack(data)
            keys, layers = self._curvature_keys(optimizer)
            with (
                tf.GradientTape(persistent=bool(layers)) as tape,
                capture_layers(layers or []) as records,
            ):
                y_pred = self._call_for_training(x_batch)
                if not sampled:  # empirical Fisher: the ordinary loss at the true targets
                    require_targets(optimizer, y_batch)
                    loss = self._compute_loss(
                        x=x_batch, y=y_batch, y_pred=y_pred, sample_weight=sample_weight
                    )
                    loss = self.optimizer.scale_loss(loss)
            if sampled:
                seed = self._seed(optimizer.warm_start_counter, stream=1)
                first = self._first_example(y_pred)
                grads = self._curvature_input(
                    tape, y_pred, sample_weight, seed, layers, records, first
                )
            else:
                # None for a variable the loss does not reach: it keeps its statistics, as in
                # `apply` (the sampled pass gives such a variable its exact Fisher, zero).
                grads = tape.gradient(loss, keys)
            optimizer.accumulate_curvature(grads, keys)

        def step(data):
            strategy.run(replica_step, args=(data,))

        if not self.run_eagerly:
            step = tf.function(
                step, reduce_retracing=True, autograph=False, jit_compile=self.jit_compile
            )
        self._warm_start_function = (key, step)
        return step

    def _warm_start_batches(self, x, batch_size, steps):
        """``(iterable of batches, number of batches or None, run one batch)``."""
        if isinstance(x, tf.data.Dataset):
            dataset = x
        else:
            # Whatever `fit` takes: arrays (or an (x, y[, sample_weight]) tuple of them), a
            # keras.utils.PyDataset, a generator; batched by `batch_size` where it applies.
            from keras.src.trainers.data_adapters import get_data_adapter

            y = sample_weight = None
            if isinstance(x, tuple) and 1 < len(x) <= 3:
                x, y, sample_weight = (tuple(x) + (None,))[:3]
            adapter = get_data_adapter(
                x, y, sample_weight, batch_size=batch_size or 32, shuffle=False
            )
            dataset = adapter.get_tf_dataset()
        if steps is not None:
            dataset = dataset.take(steps)
        total = steps
        cardinality = int(dataset.cardinality())
        if cardinality >= 0:
            total = cardinality
        if self.distribute_strategy.num_replicas_in_sync > 1:
            dataset = self.distribute_strategy.experimental_distribute_dataset(dataset)
        return dataset, total, self._make_warm_start_function()
