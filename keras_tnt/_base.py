"""What TNT, Shampoo and KFAC share: :class:`KroneckerOptimizer`.

Each optimizer keeps, per *unit* of work (TNT and Shampoo: one tensor; KFAC: one layer's kernel
and bias, or one tensor it does not factor), statistics folded from curvature inputs, and
preconditioners refreshed from them on a schedule; every step moves the unit's momenta
``m ← β m + g`` along a direction computed from its momenta and preconditioners. This base holds
everything but the statistic, the refresh rule, the direction and the unit's cost: the arguments
and config, the counters, saving and restoring (also before the build), matching inputs to
variables, the moving averages, the apply guard, the step of a unit with its non-finite check and
decoupled weight decay, and who computes which unit when there are several replicas
(``docs/algorithm.md`` §2 and §6).
"""

from __future__ import annotations

import collections
import math
import numbers

import keras
import numpy as np
from keras import ops

from keras_tnt import _checks
from keras_tnt import _plan
from keras_tnt import backend
from keras_tnt._buffers import Row
from keras_tnt._saved_state import SavedStateMixin
from keras_tnt._units import UnitStepMixin
from keras_tnt._variables import itemsize

# How `update_curvature`'s arguments are named in its errors.
CurvatureWords = collections.namedtuple("CurvatureWords", ["values", "value", "keys", "key"])


class KroneckerOptimizer(UnitStepMixin, SavedStateMixin, keras.optimizers.Optimizer):
    """The shared machinery of the Kronecker-factored optimizers (not used directly).

    A subclass creates its slots in :meth:`_create_slots` (calling :meth:`_add_step_counters`
    and :meth:`_build_counters` at their place in the saved order, and describing the layout of
    keras-tnt 0.2 and 0.3 as it goes) and defines its plan (:meth:`_plan_entries`), its
    statistics fold (:meth:`_fold`) and its units (:class:`~keras_tnt._units.UnitStepMixin`:
    :meth:`_units`, :meth:`_unit_costs`, :meth:`_unit_preconditioners`, :meth:`_refresh`,
    :meth:`_refresh_due`, :meth:`_directions`). Saving and restoring:
    :class:`~keras_tnt._saved_state.SavedStateMixin`.
    """

    # What `update_curvature` takes: one sampled-label gradient per variable ("gradients"), or
    # per-layer inputs and pre-activation gradients ("layers", KFAC).
    curvature_inputs = "gradients"
    _curvature_words = CurvatureWords(
        "fisher_gradients", "gradient", "trainable_variables", "trainable variable"
    )
    # The optimizer-wide counters (`_add_step_counters` and `_build_counters`), in no
    # variable's plan entry.
    _optimizer_counters = 5
    # The old layouts a saved state may have (SavedStateMixin): "0.3" (0.2 and 0.3).
    _legacy_versions = ("0.3",)
    # Whether a warm start's statistics serve the first step (no fold at t = 0 after one).
    _warm_start_serves_first_step = True

    def __init__(
        self,
        learning_rate,
        damping,
        momentum=0.9,
        statistics_decay=0.9,
        curvature_update_period=1,
        inverse_update_period=20,
        weight_decay=None,
        split_preconditioner=None,
        max_factor_dim=_plan.DEFAULT_MAX_FACTOR_DIM,
        factor_overrides=None,
        memory_limit_bytes=None,
        grafting=None,
        grafting_beta_2=0.999,
        grafting_epsilon=1e-7,
        **kwargs,
    ):
        if isinstance(learning_rate, numbers.Real) and not isinstance(learning_rate, bool):
            learning_rate = _checks.number("learning_rate", learning_rate, 0.0, low_open=True)
        if weight_decay is not None:
            weight_decay = _checks.number("weight_decay", weight_decay, 0.0)
        super().__init__(learning_rate=learning_rate, weight_decay=weight_decay, **kwargs)
        self.damping = _checks.number("damping", damping, 0.0, low_open=True)
        self.momentum = _checks.number("momentum", momentum, 0.0, 1.0)
        self.statistics_decay = _checks.number("statistics_decay", statistics_decay, 0.0, 1.0)
        self.curvature_update_period = _checks.period(
            "curvature_update_period", curvature_update_period
        )
        self.inverse_update_period = _checks.period("inverse_update_period", inverse_update_period)
        self.split_preconditioner = _checks.flag(
            "split_preconditioner", split_preconditioner, allow_none=True
        )
        self.max_factor_dim = _checks.max_factor_dim(max_factor_dim)
        self.factor_overrides = _checks.factor_overrides(factor_overrides)
        self.memory_limit_bytes = _checks.memory_limit(memory_limit_bytes)
        self.grafting = _checks.grafting(grafting)
        self.grafting_beta_2 = _checks.number("grafting_beta_2", grafting_beta_2, 0.0, 1.0)
        self.grafting_epsilon = _checks.number(
            "grafting_epsilon", grafting_epsilon, 0.0, low_open=True
        )
        # Set once something feeds statistics (update_curvature, a FisherModel, a restored
        # state); `apply` refuses to precondition with statistics nobody will ever fill.
        self._curvature_source = False
        # What an optimizer saved before it was built holds (iterations, learning rate).
        self._unbuilt_variable_count = len(self.variables)

    @property
    def needs_sampled_gradients(self) -> bool:
        """Whether statistics come from a sampled-label (Fisher) pass, i.e. need a FisherModel."""
        return True

    @property
    def draw_counter(self):
        """The counter the training step's target draws are seeded with: the micro-batch count
        (Keras' ``iterations`` counts whole accumulation windows), so a resumed run draws what
        an uninterrupted one would."""
        return self._iterations

    @property
    def warm_start_counter(self):
        """The counter the warm start's target draws are seeded with (batches folded so far)."""
        return self._warm_start_batches

    def mark_curvature_source(self) -> None:
        """Declares that something will feed the statistics (``FisherModel.compile`` calls it):
        ``apply`` then preconditions even before the first :meth:`update_curvature`."""
        self._curvature_source = True

    # ------------------------------------------------------------------ plan

    def _plan_entries(self, var_list) -> list[dict]:
        raise NotImplementedError

    def plan(self, var_list=None) -> list[dict]:
        """The preconditioner of every variable, before anything is allocated.

        One dict per variable (build order): ``variable`` (its path), ``shape``, ``modes``
        (the factor sizes; empty for the plain momentum step), ``factors`` (``"full"`` or
        ``"diagonal"`` per mode), ``override`` (the kind a ``factor_overrides`` pattern set, or
        None) and ``state_bytes`` (its momentum, statistics, inverses and counters).
        ``var_list`` defaults to the variables the optimizer was built with.
        :meth:`describe_plan` prints it as a table.
        """
        if var_list is None:
            self._require_built("plan")
            var_list = self._trainable_variables
        entries = self._plan_entries(var_list)
        if self.grafting == "adam":  # the graft's second moment, one per variable
            for entry, var in zip(entries, var_list):
                entry["state_bytes"] += math.prod(var.shape) * itemsize(var.dtype)
        return entries

    def _shared_state_bytes(self, var_list) -> int:
        return _plan.shared_bytes(
            var_list, self._optimizer_counters, self.use_ema, self.gradient_accumulation_steps
        )

    def plan_bytes(self, var_list=None) -> int:
        """The bytes of optimizer state :meth:`build` allocates for ``var_list`` (default: the
        variables the optimizer was built with), before anything is allocated: the
        ``state_bytes`` of :meth:`plan`, the optimizer-wide counters and, when set, Keras'
        ``use_ema`` and ``gradient_accumulation_steps`` copies of the variables. What
        ``memory_limit_bytes`` bounds and :meth:`describe_plan` totals. Keras' ``iterations``
        and learning rate, which exist before the build, are not counted."""
        if var_list is None:
            self._require_built("plan_bytes")
            var_list = self._trainable_variables
        entries = self.plan(var_list)
        return sum(e["state_bytes"] for e in entries) + self._shared_state_bytes(var_list)

    def describe_plan(self, var_list=None) -> str:
        """:meth:`plan` as a table, with the total optimizer-state memory (:meth:`plan_bytes`)."""
        if var_list is None:
            self._require_built("describe_plan")
            var_list = self._trainable_variables
        return _plan.describe(
            self.plan(var_list),
            self._shared_state_bytes(var_list),
            self.use_ema,
            self.gradient_accumulation_steps,
        )

    def _check_plan(self, var_list) -> list[dict]:
        """The plan of ``var_list``; raises before any allocation if it breaks a setting."""
        entries = self.plan(var_list)
        _plan.check(
            self.name,
            entries,
            self._shared_state_bytes(var_list),
            self.factor_overrides,
            self.memory_limit_bytes,
            self.max_factor_dim,
        )
        return entries

    # ------------------------------------------------------------------ state

    def build(self, var_list):
        if self.built:
            return
        entries = self._check_plan(var_list)  # raises before any allocation
        super().build(var_list)
        # The layout of keras-tnt 0.2 and 0.3, whose states `_restore` converts: per saved
        # variable, where its value goes (see SavedStateMixin._from_legacy).
        self._start_legacy_layout(self._legacy_versions)
        # The order of creation is the order of saving: it must never depend on anything but
        # var_list (optimizer state is restored by index).
        self._create_slots(var_list, entries)
        # Last, so that every layout without grafting is the one it always was.
        start = len(self.variables)
        self._graft_moments = (
            [self.add_variable_from_reference(v, "graft_second_moment") for v in var_list]
            if self.grafting == "adam"
            else []
        )
        self._kept_in_place(start)
        self._restore_pending()

    def _create_slots(self, var_list, entries) -> None:
        raise NotImplementedError

    def _add_counter(self, name):
        """A scalar integer slot (int64; int32 on JAX without x64, as Keras' `iterations`)."""
        return self.add_variable((), dtype=backend.count_dtype(), name=name)

    def _add_counts(self, n, name):
        """A vector of ``n`` integer counters (one slot; a step adds to all of them at once)."""
        counts = self.add_variable((n,), dtype=backend.count_dtype(), name=name)
        self._legacy_target(name, counts)
        return counts

    def _add_step_counters(self):
        """What the steps count: tensor updates skipped (a non-finite gradient) and failed
        refreshes, one counter each for the whole optimizer (keras-tnt 0.2 and 0.3 kept one
        per variable: a step then issued one addition per variable)."""
        self._skipped_updates = self._add_counter("skipped_updates")
        self._failed_inversions = self._add_counter("failed_inversions")
        self._legacy_target("skipped", self._skipped_updates)
        self._legacy_target("failed", self._failed_inversions)

    def _build_counters(self):
        """The optimizer-wide counters."""
        start = len(self.variables)
        self._curvature_updates = self._add_counter("curvature_updates")
        self._warm_start_batches = self._add_counter("warm_start_batches")
        self._skipped_curvature = self._add_counter("skipped_curvature_updates")
        self._kept_in_place(start)
        backend.make_work_counter(self)  # not optimizer state

    # ------------------------------------------------------------- read-outs

    @property
    def curvature_updates(self) -> int:
        """How many batches of curvature inputs have been folded into the statistics."""
        return int(self._curvature_updates.numpy())

    @property
    def warm_start_batches(self) -> int:
        return int(self._warm_start_batches.numpy())

    @property
    def skipped_updates(self) -> int:
        """Tensor updates skipped because their gradient was not finite."""
        return int(self._skipped_updates.numpy())

    @property
    def failed_inversions(self) -> int:
        """Refreshes of a factor's inverse (Shampoo: root) that failed (the previous one was
        kept)."""
        return int(self._failed_inversions.numpy())

    @property
    def skipped_curvature_updates(self) -> int:
        return int(self._skipped_curvature.numpy())

    def replica_work(self):
        """What each local replica did in split runs: a list with one dict per replica.

        Keys ``factorizations`` (factor inversions or roots computed), ``contractions``
        (tensors whose mode contractions were computed) and ``preconditionings`` (units whose
        update was computed: tensors, for KFAC layers), counted since the optimizer was built.
        When the work is not split every replica does all of it and nothing is counted: zeros
        under a strategy with ``split_preconditioner=False`` (or gradient accumulation), an
        empty list with one replica. On JAX a replica is a device of the active
        ``keras.distribution.DataParallel``.
        """
        return backend.replica_work(self)

    # ------------------------------------------------------------- curvature

    def curvature_due(self):
        """Whether this step folds curvature inputs into the statistics (bool tensor).

        True when ``t % T1 == 0`` (TNT and Shampoo: except at ``t = 0`` after a warm start,
        whose statistics serve the first step). With gradient accumulation, only on the first
        micro-batch of an accumulation window.
        """
        self._require_built("curvature_due")
        t = self.iterations
        due = ops.equal(t % self.curvature_update_period, 0)
        if self._warm_start_serves_first_step:
            warm_first = ops.logical_and(ops.equal(t, 0), self._warm_start_batches > 0)
            due = ops.logical_and(due, ops.logical_not(warm_first))
        if self.gradient_accumulation_steps:
            first_micro = ops.equal(self._iterations % self.gradient_accumulation_steps, 0)
            due = ops.logical_and(due, first_micro)
        return due

    def _fold(self, values, keys, warm_start, condition=None) -> None:
        raise NotImplementedError

    def _align(self, values, keys):
        """``[(slot index, value)]`` for ``values`` given per key (default: build order).

        ``None`` values are dropped: they leave their slots untouched. Keys are looked up with
        :meth:`_curvature_index`; there are :meth:`_curvature_slots` of them.
        """
        words = self._curvature_words
        values = list(values)
        total = self._curvature_slots()
        if keys is None:
            if len(values) != total:
                raise ValueError(
                    f"`{words.values}` must hold one {words.value} per {words.key} the optimizer "
                    f"was built with ({total}) when `{words.keys}` is not given; received "
                    f"{len(values)}. For a subset, pass the matching `{words.keys}`."
                )
            indices = list(range(total))
        else:
            keys = list(keys)
            if len(keys) != len(values):
                raise ValueError(
                    f"`{words.values}` and `{words.keys}` must have the same length; received "
                    f"{len(values)} and {len(keys)}."
                )
            indices = [self._curvature_index(k) for k in keys]
            if len(set(indices)) != len(indices):
                raise ValueError(f"`{words.keys}` names the same {words.key} more than once.")
        return [(i, v) for i, v in zip(indices, values) if v is not None]

    def _curvature_slots(self):
        return len(self._trainable_variables)

    def _curvature_index(self, variable):
        try:
            return self._get_variable_index(variable)
        except KeyError:
            raise ValueError(
                f"Unknown variable {getattr(variable, 'path', variable.name)!r}: this optimizer "
                "was built with other variables (`trainable_variables` must be among them)."
            ) from None

    def _require_built(self, what):
        if not self.built:
            raise ValueError(
                f"`{what}` needs the optimizer's slots: call "
                "`optimizer.build(model.trainable_variables)` first (FisherModel does this "
                "for you)."
            )

    def _average_into(self, counts, slots, compute, inputs, gate, warm_start):
        """Folds one batch into ``slots``, ``[(position, [statistic slots])]``, a slot being a
        variable or a :class:`~keras_tnt._buffers.Row` of a buffer.

        ``counts``: the vector of per-slot counts (each slot's at its ``position``), the number
        of batches its statistics hold. ``compute()`` gives the batch's values, ``[[value per
        statistic] per slot]``; it runs only when ``gate`` (a bool tensor, or None for always)
        holds and every tensor of ``inputs`` is finite (else the batch counts as skipped). Warm
        start: the running mean over those batches. Otherwise the moving average with decay
        ``ρ``, except that a slot's first batch sets its statistics. A buffer's rows are
        averaged as one: its new values stacked, its weights gathered per row, one operation
        each for the whole buffer (a row nobody folds into keeps its value: weights 1 and 0);
        a buffer of one row as a variable (its value expanded, not stacked; scalar weights).
        The branches return values and every assignment happens after them, so the fold also
        runs in JAX's stateless mode under ``jit``.
        """
        finite = ops.all(
            ops.stack([ops.all(ops.isfinite(backend.stored_values(v))) for v in inputs])
        )
        run = finite if gate is None else ops.logical_and(gate, finite)
        skipped = ops.logical_not(finite)
        if gate is not None:
            skipped = ops.logical_and(gate, skipped)
        positions = [p for p, _ in slots]
        count_dtype = backend.count_dtype()
        # What is assigned: whole variables, and buffers, each with the (slot, statistic) of
        # its rows (Python state of this trace).
        targets, places, rows = [], {}, {}
        for s, (_, stats) in enumerate(slots):
            for j, var in enumerate(stats):
                if isinstance(var, Row) and var.buffer.shape[0] > 1:
                    key = id(var.buffer)
                    if key not in rows:
                        rows[key] = {}
                        targets.append(var.buffer)
                    rows[key][var.index] = (s, j)
                else:  # a variable, or a buffer of one row: folded as a variable
                    var = var.buffer if isinstance(var, Row) else var
                    places[id(var)] = (s, j)
                    targets.append(var)

        def fold():
            # Every slot's averaging weights at once, per statistics dtype: one vector
            # operation instead of one per slot (the slots' counts differ only where a
            # variable had no gradient).
            weights, counted = {}, []  # dtype -> (keep, new) per slot; [counts]

            def weights_of(sdtype):
                if sdtype not in weights:
                    if not counted:
                        n = backend.read_value(counts)
                        if positions != list(range(counts.shape[0])):
                            n = ops.take(n, np.asarray(positions, "int32"))
                        counted.append(n)
                    n = counted[0]
                    first = ops.equal(n, 0)
                    if warm_start:
                        j = ops.cast(n + 1, sdtype)
                        keep, new = (j - 1) / j, 1 / j
                    else:
                        rho = ops.convert_to_tensor(self.statistics_decay, dtype=sdtype)
                        keep = ops.where(first, ops.zeros_like(rho), rho)
                        new = ops.where(first, ops.ones_like(rho), 1 - rho)
                    weights[sdtype] = [keep, new, None]
                return weights[sdtype]

            def scalars(sdtype):  # each slot's (keep, new) weights as scalars
                keep, new, unstacked = weights_of(sdtype)
                if unstacked is None:
                    unstacked = weights[sdtype][2] = (ops.unstack(keep), ops.unstack(new))
                return unstacked

            values = compute()
            out = []
            for var in targets:
                keep, new, _ = weights_of(var.dtype)
                current = ops.convert_to_tensor(var)
                if id(var) in places:
                    s, j = places[id(var)]
                    value = ops.cast(values[s][j], var.dtype)
                    if len(value.shape) < len(var.shape):  # a buffer's one row
                        value = ops.expand_dims(value, 0)
                    k, w = scalars(var.dtype)
                    out.append(k[s] * current + w[s] * value)
                    continue
                given = rows[id(var)]
                n, shape = var.shape[0], tuple(var.shape[1:])
                index = [given[r][0] if r in given else len(slots) for r in range(n)]
                stacked = [
                    values[given[r][0]][given[r][1]] if r in given else ops.zeros(shape, var.dtype)
                    for r in range(n)
                ]
                if len(given) < n:  # rows nobody folds into: 1 x statistic + 0 x 0
                    keep = ops.concatenate([keep, ops.ones((1,), keep.dtype)])
                    new = ops.concatenate([new, ops.zeros((1,), new.dtype)])
                where = np.asarray(index, "int32").reshape((n,) + (1,) * len(shape))
                value = ops.cast(ops.stack(stacked), var.dtype)
                out.append(ops.take(keep, where) * current + ops.take(new, where) * value)
            return out

        def keep():
            return [ops.convert_to_tensor(var) for var in targets]

        new_values = ops.cond(run, fold, keep)
        runs = ops.cast(run, count_dtype)
        for var, value in zip(targets, new_values):
            self.assign(var, value)
        # One addition for every slot's count: 1 where a slot took this batch.
        mask = np.zeros(counts.shape, dtype=keras.backend.standardize_dtype(counts.dtype))
        mask[positions] = 1
        self.assign_add(counts, runs * ops.convert_to_tensor(mask))
        self.assign_add(self._curvature_updates, runs)
        if warm_start:
            self.assign_add(self._warm_start_batches, runs)
        self.assign_add(self._skipped_curvature, ops.cast(skipped, count_dtype))

    # ------------------------------------------------------------------ apply

    def apply(self, grads, trainable_variables=None):
        self._build_for_apply(trainable_variables)
        self._before_apply(grads, trainable_variables)
        if not self._has_statistics():
            raise ValueError(
                f"{type(self).__name__} preconditions with Fisher statistics from gradients of "
                "labels sampled from the model's predictions, and nothing has provided them. "
                "Train with `keras_tnt.FisherModel` (or `keras_tnt.FisherModel.from_model("
                "model)`) instead of a plain `keras.Model`, or, in a custom training loop, call "
                f"`optimizer.update_curvature({self._curvature_words.values})` before `apply`."
            )
        return super().apply(grads, trainable_variables)

    def _before_apply(self, grads, trainable_variables) -> None:
        """What runs before the statistics are looked at (TNT-EF folds ``grads`` here)."""

    def _build_for_apply(self, trainable_variables):
        """Builds as the base ``apply`` would, before the statistics are looked at: a checkpoint
        restored before the build (``tf.train.Checkpoint.restore``) fills the slots as they are
        created."""
        if not self.built and trainable_variables is not None:
            with keras.name_scope(self.name, caller=self):
                self.build(list(trainable_variables))

    def _has_statistics(self) -> bool:
        """Whether something feeds the statistics, or a restored state already holds some."""
        if not self._curvature_source and self.built:
            # Restored through tf.train.Checkpoint, set_weights or a weights file.
            count = backend.value_now(self._curvature_updates)
            # Empty while the variable is still being created inside the traced step.
            self._curvature_source = bool(np.size(count) == 1 and int(count) > 0)
        return self._curvature_source

    def _apply_weight_decay(self, variables):
        # Applied per unit in `_unit_values` instead (skipped with a non-finite gradient).
        return

    # ---------------------------------------------------------------- config

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "damping": self.damping,
                "momentum": self.momentum,
                "statistics_decay": self.statistics_decay,
                "curvature_update_period": self.curvature_update_period,
                "inverse_update_period": self.inverse_update_period,
                "split_preconditioner": self.split_preconditioner,
                "max_factor_dim": self.max_factor_dim,
                "factor_overrides": dict(self.factor_overrides),
                "memory_limit_bytes": self.memory_limit_bytes,
                "grafting": self.grafting,
                "grafting_beta_2": self.grafting_beta_2,
                "grafting_epsilon": self.grafting_epsilon,
            }
        )
        return config
