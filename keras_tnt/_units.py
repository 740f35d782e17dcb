"""The step of a unit of work (TNT and Shampoo: a tensor; KFAC: a layer) and who computes it.

One :meth:`UnitStepMixin._unit_values` serves every path: one program assigns every unit's
values; with several replicas either every replica computes every unit, or each unit's owner
computes it and an all-reduce shares it (``split_preconditioner``; docs/algorithm.md §6).
"""

from __future__ import annotations

from keras import ops

from keras_tnt import _replicas
from keras_tnt import backend
from keras_tnt._buffers import Row
from keras_tnt._buffers import assign_slots
from keras_tnt._buffers import read_slots


class UnitStepMixin:
    """The update of :class:`~keras_tnt._base.KroneckerOptimizer`, by units of work.

    A subclass defines its units and, per unit, its preconditioner slots, refresh and
    direction; and ``_momenta`` (one slot per variable). The step counts skipped updates and
    failed refreshes in ``_skipped_updates`` and ``_failed_inversions``.
    """

    def _units(self) -> list[tuple[int, ...]]:
        """The variable indices of each unit of work, in build order."""
        raise NotImplementedError

    def _unit_costs(self) -> list[int]:
        """Multiply-adds of each unit's preconditioner work (to balance it across replicas)."""
        raise NotImplementedError

    def _unit_preconditioners(self, u) -> list:
        """The slots the refresh of unit ``u`` writes (inverses, roots); empty: the plain
        momentum step."""
        raise NotImplementedError

    def _refresh_variables(self, u) -> list:
        """The variables the refresh of unit ``u`` reads (its statistics)."""
        raise NotImplementedError

    def _refresh_inputs(self, u, values) -> list:
        """``[(value, parameter)]``, one per preconditioner of unit ``u`` that its refresh
        factorises: the matrix (a vector: a diagonal factor) it transforms, computed from
        ``values`` (:meth:`_refresh_variables`, read), and a hashable parameter of the
        transform (Shampoo: the root's order; None where all are alike)."""
        raise NotImplementedError

    def _transform(self, values, parameter):
        """``(preconditioners, ok)`` of a batch ``values`` of equal-shape inputs, ``(n, d, d)``
        (``(n, d)``: diagonal factors), all with ``parameter``; ``ok`` of shape ``(n,)``."""
        raise NotImplementedError

    def _factorizations(self, u) -> int:
        """How many factors a refresh of unit ``u`` factorises (for :meth:`replica_work`)."""
        return len(self._unit_preconditioners(u))

    def _refresh_reads(self, units) -> dict:
        """``{unit: (statistics, current preconditioners)}``, read for a refresh of ``units``.

        Read before the refresh's condition and passed into it, so that the branches read no
        variable: TensorFlow's ``cond`` is then stateless, and a step that does not refresh
        does not wait for this step's statistics fold (which writes what a refresh reads) to
        precondition and update the weights. The same values either way.
        """
        values = read_slots(
            [self._refresh_variables(u) for u in units]
            + [self._unit_preconditioners(u) for u in units]
        )
        return {u: (values[k], values[len(units) + k]) for k, u in enumerate(units)}

    def _refresh(self, u, reads=None, finite=None):
        """``(preconditioners, failed)``: unit ``u``'s refreshed preconditioners (a factor whose
        refresh fails keeps its previous value and counts in ``failed``); ``reads`` as
        :meth:`_refresh_reads` gives them (None: read here). ``finite``: whether the unit's
        gradients are finite (a bool tensor; where not, every preconditioner keeps its value
        and nothing counts as failed), or None for finite."""
        return self._refresh_all([u], reads, None if finite is None else {u: finite})[u]

    def _refresh_all(self, units, reads=None, finite=None) -> dict:
        """``{unit: (preconditioners, failed)}``: :meth:`_refresh` of every unit of ``units``,
        with the inputs of equal shape, dtype and parameter transformed as one batch (one
        batched factorisation for all ``d x d`` factors of the step, whichever tensor or layer
        they belong to). A member's numbers do not depend on the batch it is in, so a unit
        refreshed alone (by its owner replica) gets them bit for bit. ``finite``: ``{unit:
        bool tensor}`` as in :meth:`_refresh`, or None."""
        if reads is None:
            reads = self._refresh_reads(units)
        inputs = {u: self._refresh_inputs(u, reads[u][0]) for u in units}
        groups = {}  # (shape, dtype, parameter) -> [(unit, input position, value)]
        for u in units:
            for j, (value, parameter) in enumerate(inputs[u]):
                key = (tuple(value.shape), str(value.dtype), parameter)
                groups.setdefault(key, []).append((u, j, value))
        results = {}
        count_dtype = backend.count_dtype()
        for (_, _, parameter), members in groups.items():
            values = [v for _, _, v in members]
            # (One member: its value expanded, not copied.)
            batch = ops.expand_dims(values[0], 0) if len(values) == 1 else ops.stack(values)
            new, ok = self._transform(batch, parameter)
            # Per member, as vectors: whether its value replaces its slot (the transform
            # succeeded and its unit's gradients are finite) and whether it counts as failed.
            failed = ops.logical_not(ok)
            if finite is not None:
                flags = ops.stack([finite[u] for u, _, _ in members])
                ok, failed = ops.logical_and(ok, flags), ops.logical_and(failed, flags)
            kept, failed = ops.unstack(ok), ops.unstack(ops.cast(failed, count_dtype))
            for (u, j, _), value, keep, fail in zip(members, ops.unstack(new), kept, failed):
                results[u, j] = (value, keep, fail)
        return {
            u: self._refreshed(
                u, inputs[u], [results[u, j] for j in range(len(inputs[u]))], reads[u][1]
            )
            for u in units
        }

    def _refreshed(self, u, inputs, results, current):
        """``(preconditioners, failed)`` of unit ``u`` from its refresh inputs, their
        transforms ``[(value, keep, failed)]`` and the ``current`` values of its preconditioner
        slots: a value replaces its slot where ``keep`` (its transform succeeded and the unit's
        gradients are finite), ``failed`` (0 or 1) counts a failed transform of a finite step.

        The selection happens here, in the refresh's branch, so a step that does not refresh
        passes every slot through untouched (no pass over the factors)."""
        preconditioners, failed = [], None
        for (value, keep, fail), slot in zip(results, current):
            preconditioners.append(ops.where(keep, value, slot))
            failed = fail if failed is None else failed + fail
        if failed is None:
            failed = ops.zeros((), backend.count_dtype())
        return preconditioners, failed

    def _finite(self, members, gradients) -> list:
        """Per member of a unit: whether its gradient, in its variable's dtype, is finite (an
        ``IndexedSlices``' values only: the rows it does not hold are zero)."""
        return [
            ops.all(
                ops.isfinite(ops.cast(backend.stored_values(g), self._trainable_variables[i].dtype))
            )
            for i, g in zip(members, gradients)
        ]

    @staticmethod
    def _all(flags):
        """The logical and of a list of bool tensors."""
        out = flags[0]
        for flag in flags[1:]:
            out = ops.logical_and(out, flag)
        return out

    def _refresh_due(self):
        """Whether this step refreshes the preconditioners (bool tensor)."""
        raise NotImplementedError

    def _directions(self, u, momenta: dict, preconditioners) -> dict:
        """``{variable index: direction}`` of unit ``u``'s members from the new ``momenta``
        (by variable index) and ``preconditioners``."""
        raise NotImplementedError

    def _unit_index(self):
        """``{variable index: unit}`` (plain Python state, rebuilt when the units change)."""
        units = self._units()
        cached = self.__dict__.get("_unit_of")
        if cached is None or cached[0] != len(units):
            cached = (len(units), {i: u for u, members in enumerate(units) for i in members})
            object.__setattr__(self, "_unit_of", cached)
        return cached[1]

    def update_step(self, gradient, variable, learning_rate):
        """One variable's step (Keras' per-variable hook; ``apply`` steps whole units)."""
        idx = self._get_variable_index(variable)
        u = self._unit_index()[idx]
        values = self._unit_values(u, (idx,), [gradient], learning_rate)
        self._assign_units([(u, (idx,), values)])

    def _backend_update_step(self, grads, trainable_variables, learning_rate):
        """Every unit with a gradient, computed by every replica or, split, by its owner only;
        units that batch together (:meth:`_batch_key`; split: with the same owner) computed as
        one batch. The same :meth:`_batch_values` either way."""
        position = {self._get_variable_index(v): k for k, v in enumerate(trainable_variables)}
        work = {}  # unit -> its members with a gradient in this apply
        for u, members in enumerate(self._units()):
            present = tuple(i for i in members if i in position)
            if present:
                work[u] = present
        owners = self._owners()
        items = self._batched(list(work), owners)

        def gradients(items, reduced):
            return [[[reduced[position[i]] for i in work[u]] for u in item] for item in items]

        def assign(values):
            self._assign_units(
                [
                    (u, work[u], value)
                    for item, item_values in zip(items, values)
                    for u, value in zip(item, item_values)
                ]
            )

        if owners is None:
            buffers = []  # the buffers the step refreshes whole (Python state of this trace)

            def compute_all(reduced):
                # Read once for every unit (a variable, unless a schedule gives a tensor).
                lr = backend.read_value(learning_rate)
                per_item = gradients(items, reduced)
                finites = {
                    u: self._finite(work[u], gs)
                    for item, grads in zip(items, per_item)
                    for u, gs in zip(item, grads)
                }
                refreshed, targets, new, failed = self._step_refresh(
                    list(work), {u: self._all(f) for u, f in finites.items()}
                )
                buffers[:] = targets
                values = [
                    self._batch_values(item, work, grads, lr, refreshed, finites)
                    for item, grads in zip(items, per_item)
                ]
                return values, new, failed

            def assign_all(values):
                values, new, failed = values
                self._assign_units(
                    [
                        (u, work[u], value)
                        for item, item_values in zip(items, values)
                        for u, value in zip(item, item_values)
                    ],
                    (buffers, new, failed),
                )

            backend.update_everywhere(grads, compute_all, assign_all, self._curvature_updates)
            return

        def step(reduced, share):
            return self._split_step(items, work, owners, gradients(items, reduced), share)

        backend.update_from_owners(grads, step, assign, self._curvature_updates)

    def _split_step(self, items, work, owners, gradients, share) -> list:
        """The values of every batch of ``items`` (as :meth:`_batch_values`), on one replica,
        with the work split by owner (``share`` as :func:`backend.update_from_owners` gives
        it), so that the all-reduces carry only what only an owner computes:

        * each batch's owner computes its step as unsplit; one all-reduce shares the new
          weights, the failure and skip counts and the slots only the step computes (a
          row-sparse tensor's direction, Adam grafting's second moments), and, on a step that
          refreshes, the new preconditioners (on other steps they keep their values: nothing
          to share);
        * every replica computes the new momenta itself (``β m + g``: the owner's numbers,
          from the same gradients).
        """
        n = backend.count_dtype()
        gradient_of = {
            i: g
            for item, grads in zip(items, gradients)
            for u, gs in zip(item, grads)
            for i, g in zip(work[u], gs)
        }

        def compute(k):
            item = items[k]
            # Read once for the batch, as compute_all reads it once for the step.
            lr = backend.read_value(self.learning_rate)
            values = self._batch_values(item, work, gradients[k], lr)
            for u, value in zip(item, values):
                if not self._unit_preconditioners(u):
                    continue
                ok = self._all(value[4])
                refresh = ops.logical_and(ok, self._refresh_due())
                count = self._factorizations(u)
                backend.count_replica_work(
                    self, [ops.cast(refresh, n) * count, ops.zeros((), n), ops.cast(ok, n)]
                )
            return [(self._owner_part(u, value), value[2]) for u, value in zip(item, values)]

        def zeros(k):
            return [
                (
                    self._owner_part_zeros(u, work[u]),
                    [ops.zeros(p.shape, p.dtype) for p in self._unit_preconditioners(u)],
                )
                for u in items[k]
            ]

        def kept():
            values = iter(
                read_slots([self._unit_preconditioners(u) for item in items for u in item])
            )
            return [[next(values) for _ in item] for item in items]

        shared = share(
            [owners[item[0]] for item in items],
            compute,
            zeros,
            when=self._refresh_due(),
            otherwise=kept,
        )
        out = []
        for item, parts in zip(items, shared):
            values = []
            for u, ((weights, momenta, failed, skipped, grafts), preconditioners) in zip(
                item, parts
            ):
                finites = [ops.equal(s, 0) for s in skipped]  # as the owner found them
                if not momenta:  # computed here: the owner's numbers
                    momenta = [
                        self._momentum(
                            i, ops.cast(gradient_of[i], self._trainable_variables[i].dtype), f
                        )
                        for i, f in zip(work[u], finites)
                    ]
                values.append((weights, momenta, preconditioners, failed, finites, grafts))
            out.append(values)
        return out

    def _local_momenta(self, u) -> bool:
        """Whether every replica can compute unit ``u``'s new momenta itself (``β m + g``, see
        :meth:`_momentum`); else its owner shares them (:meth:`_split_step`)."""
        return True

    def _owner_part(self, u, values):
        """What the owner of unit ``u`` shares of its :meth:`_unit_values` ``values`` (its
        members' finite flags as skip counts, 0 or 1, which the all-reduce can sum)."""
        weights, momenta, _, failed, finites, grafts = values
        n = backend.count_dtype()
        skipped = [ops.cast(ops.logical_not(f), n) for f in finites]
        return weights, [] if self._local_momenta(u) else momenta, failed, skipped, grafts

    def _owner_part_zeros(self, u, members):
        """Zeros of the structure of :meth:`_owner_part` (what a non-owner contributes)."""
        zero = ops.zeros((), backend.count_dtype())
        variables = [self._trainable_variables[i] for i in members]
        momenta = []
        if not self._local_momenta(u):
            momenta = [
                ops.zeros(v.shape, self._momenta[i].dtype) for i, v in zip(members, variables)
            ]
        return (
            [ops.zeros(v.shape, v.dtype) for v in variables],
            momenta,
            zero,
            [zero for _ in members],
            [ops.zeros(self._graft_moments[i].shape, self._graft_moments[i].dtype) for i in members]
            if self.grafting == "adam"
            else [],
        )

    def _momentum(self, i, gradient, finite):
        """Variable ``i``'s new momentum ``β m + g`` from its ``gradient`` (in the variable's
        dtype); the old one where the gradient is not ``finite``."""
        current = backend.read_value(self._momenta[i])  # one read for both uses
        beta = ops.convert_to_tensor(self.momentum, dtype=gradient.dtype)
        return ops.where(finite, beta * current + gradient, current)

    def _batch_key(self, u):
        """A hashable key: units with equal keys are computed as one batch
        (:meth:`_batch_values`); None: unit ``u`` is computed alone (the default)."""
        return None

    def _batched(self, units, owners=None) -> list[list[int]]:
        """``units`` in batches of equal :meth:`_batch_key` (and, split, equal owner), in the
        order of their first members. A unit computes the same numbers in every batch it can be
        in (per-matrix kernels), and the split and unsplit runs form the same batches wherever
        the owners allow."""
        out, groups = [], {}
        for u in units:
            key = self._batch_key(u)
            if key is None:
                out.append([u])
                continue
            key = (None if owners is None else owners[u], key)
            if key in groups:
                groups[key].append(u)
            else:
                groups[key] = [u]
                out.append(groups[key])
        return out

    def _batch_values(
        self, item, work, gradients, learning_rate, refreshed=None, finites=None
    ) -> list:
        """``[_unit_values of each unit of item]``: ``work[u]`` are unit ``u``'s members with a
        gradient, ``gradients`` theirs, per unit; ``refreshed`` as in :meth:`_unit_values`
        (``{unit: ...}``), or None: refreshed here when due, one condition for the batch;
        ``finites``: ``{unit: its members' finite flags}`` (:meth:`_finite`), or None."""
        if finites is None:
            finites = {u: self._finite(work[u], g) for u, g in zip(item, gradients)}
        if refreshed is None and len(item) > 1:
            refreshed = self._grouped_refresh(item, {u: self._all(finites[u]) for u in item})
        return [
            self._unit_values(
                u,
                work[u],
                g,
                learning_rate,
                None if refreshed is None else refreshed.get(u),
                finites[u],
            )
            for u, g in zip(item, gradients)
        ]

    def _grouped_refresh(self, units, finite=None) -> dict:
        """``{unit: (preconditioners, failed)}`` for every unit of ``units`` with
        preconditioners: refreshed when due, else as they are, under one ``cond`` (a branch per
        unit costs TensorFlow about 0.15 s of tracing each); ``finite`` as in
        :meth:`_refresh_all`."""
        factored = [u for u in units if self._unit_preconditioners(u)]
        if not factored:
            return {}
        zero = ops.zeros((), backend.count_dtype())
        reads = self._refresh_reads(factored)

        def refresh():
            refreshed = self._refresh_all(factored, reads, finite)
            return [refreshed[u] for u in factored]

        values = ops.cond(
            self._refresh_due(), refresh, lambda: [(reads[u][1], zero) for u in factored]
        )
        return dict(zip(factored, values))

    def _step_refresh(self, units, finite):
        """``(refreshed, buffers, values, failed)``: :meth:`_grouped_refresh` of ``units`` for
        the unsplit step, and the buffers it refreshed whole with their new values and the
        number of failed refreshes in them (the units' values then carry their rows for the
        directions only: :meth:`_assign_units`). Here: no buffers."""
        return self._grouped_refresh(units, finite), [], [], ops.zeros((), backend.count_dtype())

    def _unit_values(self, u, members, gradients, learning_rate, refreshed=None, finites=None):
        """``(weights, momenta, preconditioners, failed, finites, grafts)`` of unit ``u``'s
        step, the weights, momenta and finite flags (whether its gradient was finite: else its
        update is skipped) one per member of ``members`` (those with a gradient), ``grafts``
        the new graft second moments of the members (empty unless ``grafting="adam"``).
        Computes, assigns nothing (:meth:`_assign_units` does, which JAX's stateless mode
        needs, and which lets the replica that owns a unit compute it for all of them).

        ``refreshed``: this step's ``(preconditioners, failed)`` of the unit, computed already
        with the unit's finite flag (:meth:`_grouped_refresh`), or None: refreshed here when
        due. ``finites``: the members' :meth:`_finite` flags, or None: computed here.

        A member whose gradient is not finite keeps its momentum; then no member of the unit
        moves and its preconditioners keep their values (selected inside the refresh, not
        branched: the finite path computes bit for bit what it would alone).
        """
        count_dtype = backend.count_dtype()
        zero = ops.zeros((), count_dtype)
        variables = [self._trainable_variables[i] for i in members]
        if finites is None:
            finites = self._finite(members, gradients)
        momenta, cast = {}, []
        for i, var, gradient, finite in zip(members, variables, gradients, finites):
            gradient = ops.cast(gradient, var.dtype)
            momenta[i] = self._momentum(i, gradient, finite)
            cast.append(gradient)
        ok = self._all(finites)
        slots = self._unit_preconditioners(u)
        preconditioners, failed = [], zero
        if slots:
            if refreshed is None:
                reads = self._refresh_reads([u])
                current = reads[u][1]
                refreshed = ops.cond(
                    self._refresh_due(),
                    lambda: self._refresh(u, reads, ok),
                    lambda: (current, zero),
                )
            preconditioners, failed = refreshed
            preconditioners = list(preconditioners)
            directions = self._directions(u, momenta, preconditioners)
        else:
            directions = momenta
        grafts = []
        if self.grafting is not None:
            directions, grafts = self._grafted(members, cast, finites, momenta, directions)
        weights = []
        for i, var in zip(members, variables):
            dtype = var.dtype
            lr = ops.cast(learning_rate, dtype)
            old = backend.read_value(var)
            w = old
            if self.weight_decay is not None and self._use_weight_decay(var):
                # Decoupled decay, as Keras applies it, but here so that a skipped update skips it.
                wd = ops.convert_to_tensor(self.weight_decay, dtype=dtype)
                w = w - w * wd * lr
            weights.append(ops.where(ok, w - lr * ops.cast(directions[i], dtype), old))
        return weights, [momenta[i] for i in members], preconditioners, failed, finites, grafts

    def _grafted(self, members, gradients, finites, momenta, directions):
        r"""``({variable index: grafted direction}, [new graft second moment per member])``.

        Grafting (docs/algorithm.md §2, "Grafting"; Agarwal et al. 2020, as Distributed Shampoo
        grafts): each tensor's direction ``D`` keeps its own direction and takes the norm of
        the step of another optimizer at the same learning rate, ``D ‖S‖ / ‖D‖`` (Frobenius
        norms, per tensor; a zero ``D`` stays zero), where ``S`` is

        * ``"sgd"``: SGD with momentum's step, the momentum ``m`` itself;
        * ``"adam"``: Adam's step with ``β_1`` = ``momentum``, ``β_2`` = ``grafting_beta_2`` and
          ``ε`` = ``grafting_epsilon``, as Keras' Adam computes it:
          ``v ← β_2 v + (1-β_2) g²``,
          ``S = (1-β_1) m / (1-β_1^t) · sqrt(1-β_2^t) / (sqrt(v) + ε)`` with ``t`` the step
          (``iterations + 1``); ``(1-β_1) m`` is Adam's first moment, since ``m ← β_1 m + g``.

        A member with a non-finite gradient keeps its second moment.
        """
        out, grafts = {}, []
        for n, i in enumerate(members):
            direction = directions[i]
            sdtype = direction.dtype
            m = momenta[i]
            if self.grafting == "adam":
                dtype = m.dtype
                current = backend.read_value(self._graft_moments[i])
                beta_2 = ops.convert_to_tensor(self.grafting_beta_2, dtype=dtype)
                g = gradients[n]
                second = ops.where(finites[n], beta_2 * current + (1 - beta_2) * g * g, current)
                grafts.append(second)
                t = ops.cast(self.iterations + 1, sdtype)
                beta_1 = ops.convert_to_tensor(self.momentum, dtype=sdtype)
                b2 = ops.convert_to_tensor(self.grafting_beta_2, dtype=sdtype)
                scale = (1 - beta_1) * ops.sqrt(1 - ops.power(b2, t)) / (1 - ops.power(beta_1, t))
                eps = ops.convert_to_tensor(self.grafting_epsilon, dtype=sdtype)
                step = ops.cast(m, sdtype) / (ops.sqrt(ops.cast(second, sdtype)) + eps)
                graft_norm = scale * _norm(step)
            else:
                graft_norm = _norm(ops.cast(m, sdtype))
            norm = _norm(direction)
            positive = norm > 0
            ratio = ops.where(positive, graft_norm / ops.where(positive, norm, 1), 0)
            out[i] = direction * ops.cast(ratio, sdtype)
        return out, grafts

    def _assign_units(self, assigned, refreshed=None):
        """Assigns the steps of units, ``[(unit, members, values)]`` with ``values`` as
        :meth:`_unit_values` gives them, and adds their failed refreshes and skipped updates to
        the two counters, one addition each. ``refreshed``: ``(buffers, their new values,
        failures)`` of a refresh of whole buffers (:meth:`_step_refresh`), assigned as they are;
        the units' rows of those buffers are not assigned again, nor their failures counted."""
        failures, finites, pairs = [], [], []
        whole = set()
        if refreshed is not None:
            buffers, values, failed = refreshed
            for buffer, value in zip(buffers, values):
                self.assign(buffer, value)
                whole.add(id(buffer))
            if buffers:
                failures.append(failed)
        for u, members, values in assigned:
            weights, momenta, preconditioners, failed, flags, grafts = values
            for i, m in zip(members, momenta):
                self.assign(self._momenta[i], m)
            for i, v in zip(members, grafts):
                self.assign(self._graft_moments[i], v)
            slots = self._unit_preconditioners(u)
            in_whole = [isinstance(slot, Row) and id(slot.buffer) in whole for slot in slots]
            pairs.extend(
                (slot, value)
                for slot, value, skip in zip(slots, preconditioners, in_whole)
                if not skip
            )
            if slots and not any(in_whole):
                failures.append(failed)
            finites.extend(flags)
            for i, w in zip(members, weights):
                self.assign(self._trainable_variables[i], w)
        assign_slots(self, pairs)
        if failures:
            total = failures[0] if len(failures) == 1 else ops.sum(ops.stack(failures))
            self.assign_add(self._failed_inversions, total)
        if finites:
            flags = finites[0] if len(finites) == 1 else ops.stack(finites)
            skipped = ops.sum(ops.cast(ops.logical_not(flags), backend.count_dtype()))
            self.assign_add(self._skipped_updates, skipped)

    # ------------------------------------------------------ who computes what

    def _owners(self):
        """The replica owning each unit's preconditioner work, or None (no split).

        Split when the optimizer is asked to (``split_preconditioner``, default on), runs in a
        replica context of more than one replica and the backend supports it (tf.distribute).
        The plan depends only on the units' costs and the replica count.
        """
        if self.split_preconditioner is False:
            return None
        if self.gradient_accumulation_steps:
            # Keras runs the update inside a cond there; collectives must not be conditional.
            return None
        replicas = backend.split_replicas(self)
        if replicas is None:
            return None
        plan = self.__dict__.get("_owner_plan")
        if plan is None or plan[0] != replicas:
            plan = (replicas, _replicas.plan_owners(self._unit_costs(), replicas))
            object.__setattr__(self, "_owner_plan", plan)
        return plan[1]


def _norm(x):
    """The Frobenius norm of ``x``."""
    return ops.sqrt(ops.sum(ops.square(x)))
