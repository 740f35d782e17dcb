"""The JAX backend: a stateless training step with one forward pass (``jax.vjp``).

Keras' JAX trainer runs ``train_step(state, data)`` as a pure function under ``jax.jit``; the
optimizer updates run in a ``keras.StatelessScope`` (as in ``optimizer.stateless_apply``). The
optimizer math is written for that: its ``ops.cond`` branches return values and the assignments
happen outside them.

One forward pass per step: ``jax.vjp`` of the model function gives its outputs and a pullback;
the pullback is applied to the cotangent of the compiled loss (the ordinary gradient) and, inside
a ``lax.cond`` that only runs when statistics are due, to the cotangent of the loss at targets
sampled from the outputs (the sampled-label gradient). On other steps there is no second
backward pass.

Under ``keras.distribution.DataParallel`` the step is one SPMD program over the global batch:
the gradients are already those of the whole batch, so nothing is reduced here. The
preconditioner work is split across the devices under ``jax.shard_map`` (below).
"""

from __future__ import annotations

import contextlib
import itertools
import weakref
from collections.abc import Callable
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import keras
import numpy as np
from keras.src.backend.common.stateless_scope import get_stateless_scope

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
    return 1


def count_dtype() -> str:
    """The integer type of the optimizers' counters: int64 (int32 on JAX without x64)."""
    return "int64" if jax.config.jax_enable_x64 else "int32"


def outside_graph():
    """Nothing to escape: Keras builds the optimizer outside ``jax.jit`` on JAX."""
    return contextlib.nullcontext()


def read_value(x):
    """The current value of a variable as an array; anything else converted."""
    return keras.ops.convert_to_tensor(x)


def value_now(variable):
    """The variable's stored value as a NumPy value, also inside a traced stateless step."""
    value = getattr(variable, "_value", None)
    return np.zeros((0,)) if value is None else np.asarray(value)


def cholesky(x):
    """Lower Cholesky factor; NaN (never an exception) where the factorisation fails.

    (``keras.ops.cholesky`` raises eagerly when the result holds NaN.)
    """
    return jnp.linalg.cholesky(x)


def row_slices(x):
    """None: JAX's gradients are dense arrays (the row-sparse step is TensorFlow's)."""
    del x
    return None


def scatter_rows(x, rows, values):
    return x.at[rows].add(values)


def step_or_keep(finite, step, keep):
    """``step()`` where the scalar bool ``finite`` holds, else ``keep()``, selected element by
    element: XLA fuses the select into the step's own loops, where a conditional would stop
    that fusion (and copy what it passes through)."""
    return jax.tree_util.tree_map(lambda a, b: jnp.where(finite, a, b), step(), keep())


def stored_values(x):
    return x


def has_accelerator() -> bool:
    """Whether JAX's default backend is not the CPU."""
    return jax.default_backend() != "cpu"


def extract_patches(layer, inputs):
    """im2col: ``(N, H', W', kh*kw*C)`` patches in the order of the reshaped Keras kernel."""
    if layer.data_format == "channels_first":
        inputs = jnp.transpose(inputs, (0, 2, 3, 1))
    return keras.ops.image.extract_patches(
        inputs,
        size=tuple(layer.kernel_size),
        strides=tuple(layer.strides),
        dilation_rate=tuple(layer.dilation_rate),
        padding=layer.padding,
        data_format="channels_last",
    )


def fold_across_replicas(
    values: Sequence, anchor, fold: Callable, condition=None, share=None
) -> None:
    """Calls ``fold(values, condition)``: one program holds the whole batch (see above). With
    ``share=(owners, compute, zeros)`` (TensorFlow's contract), the owners' pieces of work are
    computed on their devices only and ``fold(values, condition, shared)`` is called."""
    del anchor
    values = list(values)
    if _data_parallel() is None or get_stateless_scope() is None:
        if share is not None:
            raise NotImplementedError("split_replicas() is None here: nothing is split.")
        fold(values, condition)
        return
    if share is None:
        _on_devices(lambda v, c: fold(v, c), (values, condition))
        return
    owners, compute, zeros = share

    def shared_fold(values, condition):
        fold(values, condition, _from_owners(owners, compute, zeros, (values, condition)))

    _on_devices(shared_fold, (values, condition))


# ---------------------------------------------- the split across devices (keras.distribution)
#
# Under ``keras.distribution.DataParallel`` the step is one global program that XLA partitions
# (GSPMD): it has no replica id to branch on, so every device would redo all of the
# preconditioner work. The split runs the owners' work under ``jax.shard_map`` over the data
# axis instead: on device ``lax.axis_index``, ``lax.cond`` computes the units that device owns
# and zeros for the others, and one ``psum`` gives every device the owners' numbers (a sum with
# zeros is exact: bit for bit). Everything else of the step stays in the global program.

# The mesh axis while the owners' work is traced (for count_replica_work).
_SPLIT_AXIS: list = []
# optimizer -> {device index: [factorizations, contractions, preconditionings]}: not optimizer
# state (never saved), filled by host callbacks from the devices.
_WORK = weakref.WeakKeyDictionary()
_WORK_KEYS = ("factorizations", "contractions", "preconditionings")


def _data_parallel():
    """``(jax Mesh, data axis name, devices on it)`` of the active ``DataParallel``
    distribution, or None (no distribution, another kind, or one device)."""
    distribution = keras.distribution.distribution()
    if not isinstance(distribution, keras.distribution.DataParallel):
        return None
    mesh = distribution.device_mesh
    axis = distribution.batch_dim_name
    size = mesh.shape[list(mesh.axis_names).index(axis)]
    if size < 2:
        return None
    return mesh.backend_mesh, axis, size


def split_replicas(optimizer=None):
    """The number of devices of the active ``keras.distribution.DataParallel`` (None: no
    distribution, or one device): the step's preconditioner work is split across them."""
    del optimizer
    found = _data_parallel()
    if found is None or get_stateless_scope() is None:  # not in a (traced) training step
        return None
    return found[2]


def _like(value, zero):
    return jnp.asarray(keras.ops.convert_to_tensor(value)).astype(zero.dtype).reshape(zero.shape)


def _on_devices(fn, args):
    """``fn(*args)`` under ``jax.shard_map`` over the data axis, every device running it on its
    replicated copy of the inputs; returns its (replicated) result and carries the variable
    updates it made out to the enclosing ``StatelessScope``.

    What ``fn`` reads goes in as inputs, not as closed-over values of the global program (whose
    shardings belong to another mesh context): ``args`` and the values of the enclosing scope
    (every slot, weight and counter of the step), which a scope inside the body maps to the
    per-device copies. The split and the unsplit step both run here, so both programs give XLA
    their inputs alike (with the gradients straight from the backward pass, XLA may lay out a
    contraction's operands differently, and its last bits with them).
    """
    mesh, axis, _ = _data_parallel()
    outer = get_stateless_scope()
    keys = list(outer.state_mapping)
    values = [outer.state_mapping[k] for k in keys]
    leaves, tree = jax.tree.flatten(list(args))
    updated = []

    def body(leaves, values):
        inner = keras.StatelessScope()
        inner.state_mapping = dict(zip(keys, values))
        _SPLIT_AXIS.append(axis)
        try:
            with inner:
                result = fn(*jax.tree.unflatten(tree, leaves))
        finally:
            _SPLIT_AXIS.pop()
        updated[:] = list(inner.state_mapping)
        return result, [inner.state_mapping[k] for k in updated]

    replicated = jax.sharding.PartitionSpec()
    result, new_values = jax.shard_map(
        body,
        mesh=mesh,
        in_specs=(replicated, replicated),
        out_specs=replicated,
        check_vma=False,
    )(leaves, values)
    for key, value in zip(updated, new_values):
        outer.state_mapping[key] = value
    return result


def _from_owners(owners, compute, zeros, args):
    """``[compute(k, *args) on device owners[k]]`` on every device, inside :func:`_on_devices`:
    each device runs the units it owns (``lax.cond`` on its ``axis_index``) and one ``psum``
    shares them."""
    return _bucketed_psum(_owners_local(owners, compute, zeros, args), _SPLIT_AXIS[-1])


def _owners_local(owners, compute, zeros, args):
    """``[compute(k, *args) if this device is owners[k] else zeros(k)]`` (see
    :func:`_from_owners`)."""
    axis = _SPLIT_AXIS[-1]
    me = jax.lax.axis_index(axis)
    local, counted, seen = [], [], []
    none = jnp.zeros(len(_WORK_KEYS), jnp.int32)
    for k, owner in enumerate(owners):
        empty = zeros(k)

        def mine(k=k, empty=empty):
            # count_replica_work inside the branch lands here (trace time): the branch returns
            # its counts, and one host callback per step reports them all.
            _PENDING.append([])
            try:
                value = jax.tree.map(_like, compute(k, *args), empty)
                pending = _PENDING[-1]
            finally:
                _PENDING.pop()
            total = none
            for optimizer, counts in pending:
                if optimizer not in seen:
                    seen.append(optimizer)
                total = total + jnp.stack([jnp.asarray(c, jnp.int32) for c in counts])
            return value, total

        value, counts = jax.lax.cond(me == owner, mine, lambda empty=empty: (empty, none))
        local.append(value)
        counted.append(counts)
    if seen:
        _report_work(seen[0], me, sum(counted[1:], counted[0]))
    return local


# Leaves up to this many numbers are summed across devices in one flat buffer per dtype: each
# all-reduce has a fixed cost (across processes a Gloo or network round trip, ~0.5 ms on
# loopback), and a step has one leaf per weight, momentum, factor and counter. Larger leaves
# go alone (concatenating them would only copy).
_BUCKET = 1 << 18


def _bucketed_psum(tree, axis):
    """``jax.lax.psum(tree, axis)``, the small leaves concatenated into one buffer per dtype.
    The same numbers: every element is summed over the same devices (here one owner's value
    and zeros), whichever buffer it travels in."""
    leaves, treedef = jax.tree.flatten(tree)
    small = {}  # dtype -> [leaf index]
    big = []
    for i, leaf in enumerate(leaves):
        if leaf.size <= _BUCKET:
            small.setdefault(jnp.dtype(leaf.dtype), []).append(i)
        else:
            big.append(i)
    out = list(leaves)
    buffers = [jnp.concatenate([jnp.ravel(leaves[i]) for i in idx]) for idx in small.values()]
    summed = jax.lax.psum((buffers, [leaves[i] for i in big]), axis)
    for idx, flat in zip(small.values(), summed[0]):
        offset = 0
        for i in idx:
            size = leaves[i].size
            out[i] = jnp.reshape(flat[offset : offset + size], leaves[i].shape)
            offset += size
    for i, value in zip(big, summed[1]):
        out[i] = value
    return jax.tree.unflatten(treedef, out)


def update_everywhere(grads, compute, assign, anchor) -> None:
    """``assign(compute(grads))``: under keras.distribution the step is one global program;
    under ``DataParallel`` on several devices, inside :func:`_on_devices` like the split."""
    del anchor
    grads = list(grads)
    if _data_parallel() is None or get_stateless_scope() is None:
        assign(compute(grads))
        return
    assign(_on_devices(compute, (grads,)))


def update_from_owners(grads, step, assign, anchor) -> None:
    """The optimizer step with the units' work split by owner device (see above):
    ``step(grads, share)`` runs on every device, inside :func:`_on_devices`, where
    ``share(owners, compute, zeros, when=None, otherwise=None)`` gives every device
    ``[compute(k) of device owners[k]]`` (:func:`_from_owners`). With ``when`` (a bool scalar,
    equal on every device), each ``compute(k)`` is a list of pairs ``(always, sometimes)``:
    the ``sometimes`` parts are shared only when ``when`` holds (else every device takes
    ``otherwise()[k]``, a list of its ``sometimes`` parts, and no all-reduce runs for them).
    ``assign(values)`` writes ``step``'s values in the global program."""
    del anchor

    def share(owners, compute, zeros, when=None, otherwise=None):
        if when is None:
            return _from_owners(owners, compute, zeros, ())
        local = _owners_local(owners, compute, zeros, ())
        axis = _SPLIT_AXIS[-1]
        always = _bucketed_psum([[a for a, _ in piece] for piece in local], axis)
        sometimes = jax.lax.cond(
            jnp.asarray(when),
            lambda: _bucketed_psum([[b for _, b in piece] for piece in local], axis),
            otherwise,
        )
        return [list(zip(a, b)) for a, b in zip(always, sometimes)]

    assign(_on_devices(lambda grads: step(grads, share), (list(grads),)))


def make_work_counter(optimizer) -> None:
    return None


_PENDING: list = []  # per owner branch being traced: [(optimizer, counts)]


def count_replica_work(optimizer, counts) -> None:
    """Adds ``counts`` to this device's work (inside the owners' work only). Within
    :func:`_from_owners` the counts travel out with the branch and one host callback reports a
    step's (a callback per unit cost ~6 ms a step across two processes); elsewhere a callback."""
    if not _SPLIT_AXIS:
        return
    if _PENDING:
        _PENDING[-1].append((optimizer, counts))
        return
    _report_work(
        optimizer, jax.lax.axis_index(_SPLIT_AXIS[-1]), jnp.stack([jnp.asarray(c) for c in counts])
    )


def _report_work(optimizer, device, counts) -> None:
    """A host callback adding ``counts`` to ``device``'s row of the optimizer's work table."""
    ref = weakref.ref(optimizer)

    def add(device, values):
        owner = ref()
        if owner is not None:
            table = _WORK.setdefault(owner, {})
            row = table.setdefault(int(device), np.zeros(3, np.int64))
            row += np.asarray(values, np.int64)

    jax.debug.callback(add, device, counts)


def replica_work(optimizer) -> list:
    """Per device of the active DataParallel distribution (or of the split runs so far)."""
    table = _WORK.get(optimizer, {})
    found = _data_parallel()
    devices = max([found[2] if found else 0] + [d + 1 for d in table])
    if devices < 2:
        return []
    zero = np.zeros(3, np.int64)
    return [dict(zip(_WORK_KEYS, (int(c) for c in table.get(d, zero)))) for d in range(devices)]


def _unpack(data):
    return keras.utils.unpack_x_y_sample_weight(data)


class FisherTrainer:
    """The JAX training step of :class:`keras_tnt.FisherModel` (stateless, one forward pass)."""

    def _build_scope(self):
        return contextlib.nullcontext()

    def _seed(self, counter, stream: int):
        # int64 needs `jax_enable_x64`; every word fits 32 bits otherwise, and the generator
        # hashes a 32-bit word exactly as it hashes the same int64 value.
        # Python integers lead: the generator folds their words before the trace
        # (keras_tnt.sampling._seed_words), so a step hashes the counter's words only.
        dtype = jnp.int64 if jax.config.jax_enable_x64 else jnp.int32
        return (int(self.fisher_seed), int(stream), jnp.asarray(counter).astype(dtype))

    def _forward(self, trainable, non_trainable, x, layers=None):
        """One forward pass: ``(y_pred, losses, pullback, non-trainable values, inputs)``.

        ``pullback(cotangent)`` gives ``(gradients of the trainable values, gradients of the
        pre-activations of ``layers``)`` (the latter None without layers); ``inputs`` are the
        layers' inputs (KFAC) or None.
        """
        kwargs = {"training": True} if self._call_has_training_arg else {}

        def forward(trainable, offsets):
            with capture_layers(layers or [], offsets) as records:
                y_pred, new_non_trainable, losses = self.stateless_call(
                    trainable, non_trainable, x, return_losses=True, **kwargs
                )
            pairs = self._layer_records(layers, records) if layers else []
            aux = (new_non_trainable, [a for a, _ in pairs], [z for _, z in pairs])
            return (y_pred, list(losses)), aux

        offsets = None
        if layers:
            shapes = jax.eval_shape(lambda t: forward(t, None)[1][2], trainable)
            offsets = {id(layer): jnp.zeros(z.shape, z.dtype) for layer, z in zip(layers, shapes)}
        (y_pred, losses), vjp, (non_trainable, inputs, _) = jax.vjp(
            forward, trainable, offsets, has_aux=True
        )

        def pullback(cotangent):
            grads, offset_grads = vjp(cotangent)
            if not layers:
                return list(grads), None
            return list(grads), [offset_grads[id(layer)] for layer in layers]

        return y_pred, losses, pullback, non_trainable, (inputs if layers else None)

    def _loss_gradients(self, state, pullback, y_pred, losses, x, y, sample_weight):
        """Gradients of the scaled compiled loss (with the forward pass's own losses).

        Returns ``(grads, unscaled loss, non-trainable values, metrics values)``.
        """
        trainable, non_trainable, optimizer_values, metrics_values = state

        def total_loss(y_pred, losses):
            if losses:
                self._losses_override.clear()
                self._losses_override = losses
            loss, (_, new_non_trainable, new_metrics) = self.stateless_compute_loss(
                trainable,
                non_trainable,
                metrics_values,
                x=x,
                y=y,
                y_pred=y_pred,
                sample_weight=sample_weight,
                training=True,
            )
            if losses:
                self._losses_override.clear()
            with self._optimizer_scope(optimizer_values):
                scaled = self.optimizer.scale_loss(loss)
            return scaled, (loss, new_non_trainable, new_metrics)

        scaled, loss_pullback, (loss, non_trainable, metrics_values) = jax.vjp(
            total_loss, y_pred, losses, has_aux=True
        )
        grads, _ = pullback(loss_pullback(jnp.ones_like(scaled)))
        return grads, loss, non_trainable, metrics_values

    def _optimizer_scope(self, optimizer_values):
        return keras.StatelessScope(
            state_mapping=list(zip(self.optimizer.variables, optimizer_values))
        )

    def _fisher_pullback(self, pullback, y_pred, losses, sample_weight, seed, state, layers=None):
        """Sampled-label gradients from the pullback of the forward pass: per trainable
        variable, or (``layers``) per layer with respect to its pre-activations."""
        _, non_trainable, optimizer_values, _ = state
        mapping = list(zip(self.non_trainable_variables, non_trainable))
        mapping += list(zip(self.optimizer.variables, optimizer_values))
        with keras.StatelessScope(state_mapping=mapping):
            targets = jax.lax.stop_gradient(self.sample_targets(y_pred, seed))
            output_gradient = jax.grad(lambda out: self._sampled_loss(targets, out, sample_weight))(
                y_pred
            )
            grads, offset_grads = pullback((output_gradient, [jnp.zeros_like(v) for v in losses]))
            return list(self._unscale(offset_grads if layers else grads))

    def train_step(self, state, data):
        optimizer = self.curvature_optimizer
        if optimizer is None:
            return super().train_step(state, data)
        trainable, non_trainable, optimizer_values, metrics_values = state
        x, y, sample_weight = _unpack(data)
        keys, layers = self._curvature_keys(optimizer)
        y_pred, losses, pullback, non_trainable, inputs = self._forward(
            trainable, non_trainable, x, layers
        )
        forward_state = (trainable, non_trainable, optimizer_values, metrics_values)
        grads, loss, non_trainable, metrics_values = self._loss_gradients(
            forward_state, pullback, y_pred, losses, x, y, sample_weight
        )
        with self._optimizer_scope(optimizer_values):
            due = optimizer.curvature_due()
            seed = self._seed(optimizer.draw_counter, stream=0)

        def fisher():
            return self._fisher_pullback(
                pullback, y_pred, losses, sample_weight, seed, forward_state, layers
            )

        zeros = [jnp.zeros(s.shape, s.dtype) for s in jax.eval_shape(fisher)]
        fisher_grads = jax.lax.cond(due, fisher, lambda: zeros)
        if layers:  # KFAC: (inputs, pre-activation gradients) per layer
            fisher_grads = list(zip(inputs, fisher_grads))

        mapping = list(zip(self.trainable_variables, trainable))
        mapping += list(zip(self.optimizer.variables, optimizer_values))
        with keras.StatelessScope(state_mapping=mapping) as scope:
            optimizer.update_curvature(fisher_grads, keys, condition=due)
            self.optimizer.apply(grads)
        trainable = [scope.get_current_value(v) for v in self.trainable_variables]
        optimizer_values = [scope.get_current_value(v) for v in self.optimizer.variables]
        logs, metrics_values = self._update_metrics_variables(
            metrics_values, loss, x, y, y_pred, sample_weight
        )
        return logs, (trainable, non_trainable, optimizer_values, metrics_values)

    # ------------------------------------------------------------ warm start

    def _make_warm_start_function(self):
        # Compiled as `fit` compiles its step: not under `run_eagerly`, nor without
        # `jit_compile` (both may change after `compile`, as for `fit`).
        key = (bool(self.run_eagerly), bool(self.jit_compile))
        cached = getattr(self, "_warm_start_function", None)
        if cached is not None and cached[0] == key:
            return cached[1]
        optimizer = self.statistics_optimizer
        sampled = getattr(optimizer, "needs_sampled_gradients", True)

        def step(state, data):
            trainable, non_trainable, optimizer_values, metrics_values = state
            x, y, sample_weight = _unpack(data)
            keys, layers = self._curvature_keys(optimizer)
            y_pred, losses, pullback, non_trainable, inputs = self._forward(
                trainable, non_trainable, x, layers
            )
            state = (trainable, non_trainable, optimizer_values, metrics_values)
            if sampled:
                with self._optimizer_scope(optimizer_values):
                    seed = self._seed(optimizer.warm_start_counter, stream=1)
                grads = self._fisher_pullback(
                    pullback, y_pred, losses, sample_weight, seed, state, layers
                )
                if layers:  # KFAC: (inputs, pre-activation gradients) per layer
                    grads = list(zip(inputs, grads))
            else:  # empirical Fisher: the ordinary loss at the true targets
                require_targets(optimizer, y)
                grads, *_ = self._loss_gradients(
                    state, pullback, y_pred, losses, x, y, sample_weight
                )
            mapping = list(zip(self.trainable_variables, trainable))
            mapping += list(zip(self.optimizer.variables, optimizer_values))
            with keras.StatelessScope(state_mapping=mapping) as scope:
                optimizer.accumulate_curvature(grads, keys)
            optimizer_values = [scope.get_current_value(v) for v in self.optimizer.variables]
            return optimizer_values, non_trainable

        jitted = jax.jit(step) if not self.run_eagerly and self.jit_compile else step

        def run(data):
            if keras.distribution.distribution() is not None:
                # As `fit` feeds its steps: one global array per input, sharded over the
                # batch axis (with several processes, assembled from each process's slice).
                from keras.src.backend.jax.trainer import _distribute_data

                data = _distribute_data(data)
            state = tuple(
                [v.value for v in variables]
                for variables in (
                    self.trainable_variables,
                    self.non_trainable_variables,
                    self.optimizer.variables,
                    self.metrics_variables,
                )
            )
            optimizer_values, non_trainable = jitted(state, data)
            for variable, value in zip(self.optimizer.variables, optimizer_values):
                variable.assign(value)
            for variable, value in zip(self.non_trainable_variables, non_trainable):
                variable.assign(value)

        self._warm_start_function = (key, run)
        return run

    def _warm_start_batches(self, x, batch_size, steps):
        """``(iterable of batches, number of batches or None, run one batch)``."""
        from keras.src.trainers.data_adapters import get_data_adapter

        if getattr(self, "_jax_state", None) is not None:
            self.jax_state_sync()  # called during `fit` (WarmStart): the variables are current
        y = sample_weight = None
        if isinstance(x, tuple) and 1 < len(x) <= 3:  # (x, y) or (x, y, sample_weight) arrays
            x, y, sample_weight = (tuple(x) + (None,))[:3]
        adapter = get_data_adapter(x, y, sample_weight, batch_size=batch_size or 32, shuffle=False)
        batches = adapter.get_jax_iterator()
        total = adapter.num_batches
        if steps is not None:
            batches = itertools.islice(batches, steps)
            total = steps if total is None else min(total, steps)
        return batches, total, self._make_warm_start_function()
