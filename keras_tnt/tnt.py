r"""Tensor Normal Training (Ren & Goldfarb, NeurIPS 2021) as a Keras 3 optimizer.

For every trainable tensor ``W`` with modes ``d_1..d_k`` (:func:`~keras_tnt.kronecker.tensor_modes`)
TNT keeps one statistic ``H_i`` per mode, estimated from gradients ``Ĝ`` of the batch-mean loss at
labels *sampled from the model's own predictions*, and preconditions the momentum by the inverse
of the resulting Kronecker-factored Fisher block:

.. math::

    m &\leftarrow \beta m + g \\
    H_i &\leftarrow \rho H_i + (1-\rho)\, \mathrm{mat}_i(Ĝ)\,\mathrm{mat}_i(Ĝ)^\top
        \quad\text{every } T_1 \text{ steps} \\
    c &= \bigl(\mathrm{tr}(H_1) / \textstyle\prod_j d_j\bigr)^{1/k},\quad
    U_i = H_i / \bigl(c^{k-1} \textstyle\prod_{j\ne i} d_j\bigr),\quad
    A_i = (U_i + \varepsilon I)^{-1}
        \quad\text{every } T_1 \text{ steps while } t < T_2 \text{, then every } T_2 \\
    W &\leftarrow W (1 - \alpha\lambda) - \alpha\, m \times_1 A_1 \times_2 \cdots \times_k A_k

Example::

    import keras, keras_tnt
    model = keras_tnt.FisherModel(inputs, outputs)
    model.compile(optimizer=keras_tnt.TNT(learning_rate=1e-4, damping=0.1),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(dataset, epochs=10, callbacks=[keras_tnt.WarmStart(dataset)])

The statistics come from :meth:`TNT.update_curvature`, which :class:`keras_tnt.FisherModel`'s
training step calls with the sampled-label gradients; a custom training loop calls it itself
(see :meth:`TNT.curvature_due`).

Algorithm note: a mode above ``max_factor_dim`` gets a diagonal factor, not blocks. Splitting
the mode into blocks of ``b`` (Distributed Shampoo's answer) keeps ``d·b`` numbers and refreshes
in ``d·b²``; the diagonal keeps ``d`` and refreshes in ``d``. ``benchmarks/blocking.py`` measured
both against the full factor on real TNT statistics of 4,096-wide modes (60 steps, ε = 0.1):
relative error of the preconditioned direction, blocks of 256 / blocks of 1,024 / diagonal:
a Zipf vocabulary with ids in frequency order 0.049 / 0.033 / 0.216; the same with shuffled ids
0.140 / 0.127 / 0.147; a 4,096-class head 0.031 / 0.028 / 0.032. Blocks only help where the ids
happen to group the tokens that co-occur (frequency order puts the frequent ones in the first
block), and never enter the loss visibly: 200 TNT steps with the mode full or diagonal ended
at held-out losses 1.9691 / 1.9695, 1.9707 / 1.9784 and 6.6207 / 6.6191, the diagonal 40-50x
faster (4-5 s against 169-275 s). Blocks of 4,096 on a 50,000-token vocabulary would keep 1.6 GB
of statistics and inverses, more than Adam's whole state for that model; the diagonal 0.4 MB.
"""

from __future__ import annotations

import math

import keras
from keras import ops

from keras_tnt import _checks
from keras_tnt import _plan
from keras_tnt import _replicas
from keras_tnt import backend
from keras_tnt import kronecker
from keras_tnt._base import KroneckerOptimizer
from keras_tnt._buffers import Row
from keras_tnt._buffers import read_slots
from keras_tnt._variables import slot_prefix
from keras_tnt._variables import statistics_dtype


@keras.saving.register_keras_serializable(package="keras_tnt")
class TNT(KroneckerOptimizer):
    """Tensor Normal Training.

    Args:
        learning_rate: ``α``: a float, a ``LearningRateSchedule`` or a callable. Default 1e-4,
            the paper's best value on the MNIST autoencoder.
        damping: ``ε`` > 0, added to every trace-normalised factor. Default 0.1 (MNIST
            autoencoder; the CIFAR runs used 0.01). It is tuned at the scale of the batch-mean
            gradient (statistics are about Fisher / batch size).
        momentum: ``β`` in [0, 1): ``m ← β m + g`` (no ``1-β`` factor).
        statistics_decay: ``ρ`` in [0, 1): moving-average decay of the statistics.
        curvature_update_period: ``T1`` >= 1: statistics are updated every ``T1`` steps.
            Default 1 (autoencoders); the CIFAR runs used 10.
        inverse_update_period: ``T2`` >= 1: the inverses are refreshed every ``T1`` steps while
            the step count is below ``T2``, then every ``T2`` steps. Default 20 (CIFAR: 100).
        weight_decay: decoupled weight decay ``λ`` >= 0 or None: ``W ← W (1 - α λ)`` before the
            preconditioned step; it enters neither the momentum nor the statistics. Use
            ``exclude_from_weight_decay`` as with any Keras optimizer.
        max_factor_dim: the largest mode that gets a full ``d x d`` factor (default 4096:
            every model of the paper, VGG16's 4096-wide classifier included, keeps full
            factors). A larger mode (an embedding's vocabulary, a 10,000-class output) gets a
            diagonal factor: the diagonal of the same contraction, normalised by eq. (5) with
            the other modes and damped by the same ``ε``, so ``d`` numbers instead of ``d²``.
            None: no bound.
        factor_overrides: ``{pattern: kind}``, for the variables whose path
            (``variable.path``, e.g. ``"transformer/embedding/embeddings"``) matches the
            regular expression ``pattern`` (``re.search``; the first matching pattern wins):
            ``"full"`` (every mode a full factor, whatever its size), ``"diagonal"`` (every mode
            diagonal) or ``"none"`` (no factors: the plain momentum step ``W ← W - α m``). A
            pattern that matches no variable is an error when the optimizer is built.
        memory_limit_bytes: if set, building the optimizer raises ``ValueError`` before
            allocating anything when its state (momentum, statistics, inverses, counters, and
            Keras' copies of the variables for ``use_ema`` and ``gradient_accumulation_steps``)
            would take more bytes. See :meth:`plan_bytes`.
        empirical_fisher: if True, the statistics come from the ordinary minibatch gradients
            given to ``apply`` (the empirical Fisher; "TNT-EF", the paper's ablation D.4) instead
            of sampled-label gradients. It then works on any model and any loss, with no Fisher
            training step.
        grafting: None (default), ``"sgd"`` or ``"adam"``: each tensor's step keeps TNT's
            direction and takes the length (Frobenius norm, per tensor) of the step SGD with
            momentum (``"sgd"``: ``α m``) or Adam (``"adam"``, ``β_1 = momentum``) would take
            at the same learning rate, as Distributed Shampoo grafts (docs/algorithm.md §2,
            "Grafting"). The learning rate is then on the grafted optimizer's scale. With
            ``"adam"`` every variable gets one more slot (Adam's second moment); a tensor
            that would take the row-sparse step takes the dense one.
        grafting_beta_2: Adam's ``β_2`` for ``grafting="adam"`` (default 0.999, Keras').
        grafting_epsilon: Adam's ``ε`` for ``grafting="adam"`` (default 1e-7, Keras').
        split_preconditioner: with more than one replica (``tf.distribute``; on JAX, the
            devices of a ``keras.distribution.DataParallel``), whether each
            trainable tensor's contractions, inverse refreshes and preconditioned direction are
            computed by one replica only (its owner, balanced by cost) and shared with the
            others by an all-reduce. The results are the same either way (float64: exactly).
            None (default) or True: split (except with ``gradient_accumulation_steps``, where
            Keras makes the update conditional); False: every replica computes everything.
            See :meth:`replica_work`.
        **kwargs: every base keyword of ``keras.optimizers.Optimizer`` (``clipnorm``,
            ``clipvalue``, ``global_clipnorm``, ``use_ema``, ``ema_momentum``,
            ``ema_overwrite_frequency``, ``loss_scale_factor``,
            ``gradient_accumulation_steps``, ``name``; unnamed instances are ``tnt``,
            ``tnt_1``, ... as in Keras).

    Gradient accumulation (``gradient_accumulation_steps=k``) averages the ordinary gradients of
    ``k`` micro-batches into one momentum step, as Keras does, but the statistics take the
    sampled-label gradients of the first micro-batch of each window only (the window's other
    micro-batches draw no Fisher pass). The update is therefore not the same as one step on the
    ``k`` times larger batch: the momentum sees the mean gradient of all ``k`` micro-batches, the
    Kronecker statistics a ``k`` times smaller sample. A Fisher pass on every micro-batch would
    cost ``k`` second backward passes per update for statistics that are already a moving
    average over many steps; the momentum, which sets the update, follows Keras' contract.

    Gradients are matched to statistics by variable, as Keras matches them to its slots: pass
    ``trainable_variables`` to :meth:`update_curvature` (a subset of the variables the optimizer
    was built with, in any order); a variable whose gradient is ``None``, or which is not in the
    list, keeps its statistics, its momentum and its weights for that step.

    Non-finite gradients never reach the weights: a tensor whose gradient holds NaN or inf keeps
    its weights and momentum for that step (counted in :attr:`skipped_updates`); a batch of
    sampled-label gradients with NaN/inf leaves the statistics unchanged
    (:attr:`skipped_curvature_updates`); a factor whose Cholesky factorisation fails keeps its
    previous inverse (:attr:`failed_inversions`).
    """

    # Whether a tensor with a diagonal first factor keeps its preconditioned momentum (the
    # row-sparse step); Shampoo's roots have no damped factor to carry it with.
    _carries_directions = True
    # Its old layouts: 0.2 and 0.3, 0.4's (a variable per statistic and per inverse), and 0.5's
    # (every factor in its size's buffer, the large ones too).
    _legacy_versions = ("0.3", "0.4", "0.5")
    # A factor of this many numbers or more keeps a buffer of its own (docs/algorithm.md §2,
    # "Factor buffers"): in a shared buffer its fold stacks it, one more pass over its numbers
    # than the operations sharing saves (the MNIST autoencoder's step: 4.8% slower with its
    # 500- to 1,000-wide factors shared, benchmarks.step_time).
    _own_buffer_size = 256 * 256
    # Tensors up to this many numbers step in batches of equal shape (docs/algorithm.md §2,
    # "Batched tensors"); 0: none. Off: on TensorFlow's CPU it cost more than it saved
    # (benchmarks.step_time, median of 3: digits autoencoder, two 48-wide biases batched, 1.52x
    # -> 1.69x Adam's mean step; digits transformer 1.52x -> 1.49x, within the drift).
    _batched_size = 0

    def __init__(
        self,
        learning_rate=1e-4,
        damping: float = 0.1,
        momentum: float = 0.9,
        statistics_decay: float = 0.9,
        curvature_update_period: int = 1,
        inverse_update_period: int = 20,
        weight_decay: float | None = None,
        empirical_fisher: bool = False,
        split_preconditioner: bool | None = None,
        max_factor_dim: int | None = _plan.DEFAULT_MAX_FACTOR_DIM,
        factor_overrides: dict | None = None,
        memory_limit_bytes: int | None = None,
        grafting: str | None = None,
        grafting_beta_2: float = 0.999,
        grafting_epsilon: float = 1e-7,
        clipnorm=None,
        clipvalue=None,
        global_clipnorm=None,
        use_ema=False,
        ema_momentum=0.99,
        ema_overwrite_frequency=None,
        loss_scale_factor=None,
        gradient_accumulation_steps=None,
        name=None,
        **kwargs,
    ):
        super().__init__(
            learning_rate=learning_rate,
            damping=damping,
            momentum=momentum,
            statistics_decay=statistics_decay,
            curvature_update_period=curvature_update_period,
            inverse_update_period=inverse_update_period,
            weight_decay=weight_decay,
            split_preconditioner=split_preconditioner,
            max_factor_dim=max_factor_dim,
            factor_overrides=factor_overrides,
            memory_limit_bytes=memory_limit_bytes,
            grafting=grafting,
            grafting_beta_2=grafting_beta_2,
            grafting_epsilon=grafting_epsilon,
            clipnorm=clipnorm,
            clipvalue=clipvalue,
            global_clipnorm=global_clipnorm,
            use_ema=use_ema,
            ema_momentum=ema_momentum,
            ema_overwrite_frequency=ema_overwrite_frequency,
            loss_scale_factor=loss_scale_factor,
            gradient_accumulation_steps=gradient_accumulation_steps,
            name=name,
            **kwargs,
        )
        self.empirical_fisher = _checks.flag("empirical_fisher", empirical_fisher)
        # The empirical Fisher feeds itself from the gradients given to `apply`.
        self._curvature_source = empirical_fisher

    @property
    def needs_sampled_gradients(self) -> bool:
        """Whether statistics come from a sampled-label (Fisher) pass, i.e. need a FisherModel."""
        return not self.empirical_fisher

    @property
    def _row_sparse_steps(self) -> bool:
        """Whether a tensor with a diagonal first factor takes the row-sparse step: not with
        grafting, whose step size needs the whole momentum, which that step does not keep."""
        return self._carries_directions and self.grafting is None

    # ------------------------------------------------------------------ plan

    def _plan_entries(self, var_list) -> list[dict]:
        """One entry per tensor: a factor per mode (:func:`~keras_tnt.kronecker.tensor_modes`),
        diagonal above ``max_factor_dim``, as ``factor_overrides`` say."""
        return [
            _plan.tensor_entry(
                v, self.max_factor_dim, self.factor_overrides, self._row_sparse_steps
            )
            for v in var_list
        ]

    # ------------------------------------------------------------------ slots

    def _create_slots(self, var_list, entries):
        self._modes = []
        self._diagonal = []
        self._momenta = []
        self._row_sparse = []
        self._damped = []
        keys = {}  # (factor shape, dtype, parameter[, (variable index, mode)]) -> buffer index
        members = []  # per buffer: [(variable index, mode)], its rows in order
        rows = []  # per variable: [(buffer, row)] per mode
        shared = {}  # 0.5's buffers: (factor shape, dtype, parameter) -> [(variable, mode)]
        for index, (var, entry) in enumerate(zip(var_list, entries)):
            modes = entry["modes"]
            diagonal = tuple(f == "diagonal" for f in entry["factors"])
            prefix = slot_prefix(var)
            sdtype = statistics_dtype(var.dtype)
            row_sparse = self._row_sparse_steps and _plan.row_sparse(var.shape, diagonal)
            self._modes.append(modes)
            self._diagonal.append(diagonal)
            self._row_sparse.append(row_sparse)
            # A row-sparse tensor keeps its preconditioned momentum (its direction) instead.
            self._momenta.append(
                self.add_variable_from_reference(var, "direction" if row_sparse else "momentum")
            )
            shapes = [(d,) if diag else (d, d) for d, diag in zip(modes, diagonal)]
            # Row-sparse: the damped factors U_i + εI whose inverses the direction holds.
            self._damped.append(
                [
                    self.add_variable(shape, dtype=sdtype, name=f"{prefix}_damped_{i}")
                    for i, shape in enumerate(shapes)
                ]
                if row_sparse
                else []
            )
            rows.append([])
            for i, shape in enumerate(shapes):
                key = (shape, str(sdtype), self._factor_parameter(modes))
                shared.setdefault(key, []).append((index, i))
                if math.prod(shape) >= self._own_buffer_size:
                    key += ((index, i),)
                b = keys.setdefault(key, len(keys))
                if b == len(members):
                    members.append([])
                rows[-1].append((b, len(members[b])))
                members[b].append((index, i))
        # One buffer of statistics H_i and one of preconditioners (TNT: the damped inverses A_i;
        # Shampoo: the roots P_i) per factor size, in the order the sizes first appear; a large
        # factor's its own, of one row, named after its tensor and mode.
        self._buffers = []  # [(statistics buffer, preconditioner buffer, members, parameter)]
        for (shape, sdtype, parameter, *own), b in keys.items():
            if own:
                index, i = own[0]
                label = f"{slot_prefix(var_list[index])}_{i}"
            else:
                label = "x".join(str(d) for d in shape)
                label += "" if parameter is None else f"_p{parameter}"
                label += "" if sdtype == "float32" else f"_{sdtype}"
            n = len(members[b])
            statistics = self.add_variable((n,) + shape, dtype=sdtype, name=f"statistics_{label}")
            inverses = self.add_variable((n,) + shape, dtype=sdtype, name=f"inverses_{label}")
            self._legacy_target(f"statistics:{b}", statistics)
            self._legacy_target(f"inverses:{b}", inverses)
            self._buffers.append((statistics, inverses, members[b], parameter))
        self._statistics = [[Row(self._buffers[b][0], r) for b, r in rs] for rs in rows]
        self._preconditioners = [[Row(self._buffers[b][1], r) for b, r in rs] for rs in rows]
        self._factor_rows = rows
        # The old layouts, per variable: its momentum, statistics, inverses and damped factors
        # (one variable each); 0.2 and 0.3 then three counters: its statistics count, skipped,
        # failed.
        old = ("0.3", "0.4")
        for index, rs in enumerate(rows):
            self._legacy("same", self._variable_index(self._momenta[index]), versions=old)
            for kind in ("statistics", "inverses"):
                for b, r in rs:
                    self._legacy("into", f"{kind}:{b}", r, versions=old)
            for damped in self._damped[index]:
                self._legacy("same", self._variable_index(damped), versions=old)
            self._legacy("into", "statistics_counts", index, versions=("0.3",))
            self._legacy("sum", "skipped", versions=("0.3",))
            self._legacy("sum", "failed", versions=("0.3",))
        # 0.5's: the momenta and damped factors in today's order, then a buffer of statistics
        # and one of preconditioners per factor size (the large factors' too), whose rows
        # now go to their own buffers.
        for index in range(len(rows)):
            for var in [self._momenta[index], *self._damped[index]]:
                self._legacy("same", self._variable_index(var), versions=("0.5",))
        for factors in shared.values():
            for kind in ("statistics", "inverses"):
                places = [(f"{kind}:{rows[v][i][0]}", rows[v][i][1]) for v, i in factors]
                self._legacy("rows", places, versions=("0.5",))
        # Batches folded into each variable's statistics (the first one sets them).
        start = len(self.variables)
        self._counts = self._add_counts(len(var_list), "statistics_counts")
        self._add_step_counters()
        self._kept_in_place(start, versions=("0.4", "0.5"))
        self._build_counters()

    def _factor_parameter(self, modes):
        """The parameter of a tensor's factor transforms (:meth:`_refresh_inputs`), which
        factors of one buffer share: none for TNT (Shampoo: the root's order)."""
        return None

    # ------------------------------------------------------------- read-outs

    def statistics(self, variable) -> list:
        """The Kronecker statistics ``H_i`` of one trainable variable (one per mode), as
        tensors: their current values (rows of the factor buffers, docs/algorithm.md §2)."""
        return [row.value() for row in self._statistics[self._get_variable_index(variable)]]

    def inverses(self, variable) -> list:
        """The preconditioners of one trainable variable, one per mode: TNT's damped inverses
        ``A_i`` (Shampoo: its roots ``P_i``), as tensors: their current values."""
        return [row.value() for row in self._preconditioners[self._get_variable_index(variable)]]

    def statistics_count(self, variable) -> int:
        """How many batches have been folded into the statistics of one trainable variable."""
        return int(self._counts.numpy()[self._get_variable_index(variable)])

    # ------------------------------------------------------------- curvature

    def update_curvature(self, fisher_gradients, trainable_variables=None, condition=None) -> None:
        """Folds one batch of sampled-label gradients into the statistics.

        ``fisher_gradients`` are the gradients of the (scaled, like for ``apply``) batch-mean
        loss at labels drawn from the model's predictions, one per variable of
        ``trainable_variables``: any subset of the variables the optimizer was built with, in
        any order (default: all of them, in the build order). A ``None`` gradient, or a variable
        left out, keeps its statistics. A variable's first batch sets its statistics; later ones
        take the moving average ``H ← ρ H + (1-ρ) Ĝ^(i)``. Under ``tf.distribute`` the gradients
        are summed across replicas first, so every replica holds the same statistics.
        ``condition`` (optional scalar bool tensor) gates the update inside the graph. An
        optimizer not built yet is built on ``trainable_variables``, as ``apply`` builds it (so
        a custom loop's first step may call this first, also inside ``strategy.run``).
        """
        self._fold(fisher_gradients, trainable_variables, warm_start=False, condition=condition)

    def accumulate_curvature(self, fisher_gradients, trainable_variables=None) -> None:
        """Warm start: folds a batch into the running arithmetic mean of all batches so far.

        Before any other update the ``j``-th call sets ``H ← ((j-1)/j) H + (1/j) Ĝ^(i)``.
        Gradients are matched to variables as in :meth:`update_curvature`. See
        :meth:`keras_tnt.FisherModel.warm_start`, which calls it over a dataset.
        """
        self._fold(fisher_gradients, trainable_variables, warm_start=True)

    def _fold(self, fisher_gradients, trainable_variables, warm_start, condition=None):
        # Built from the variables given, as `apply` builds (a custom loop's first step).
        self._build_for_apply(trainable_variables)
        self._require_built("update_curvature")
        present = self._align(fisher_gradients, trainable_variables)
        self._curvature_source = True
        if not present:
            return
        indices = [i for i, _ in present]
        grads = [g for _, g in present]
        if self.loss_scale_factor is not None:
            # (An IndexedSlices is made dense for the division.)
            grads = [ops.convert_to_tensor(g) / self.loss_scale_factor for g in grads]
        factored = [i for i in indices if self._modes[i]]  # not plain momentum
        slots = [(i, self._statistics[i]) for i in factored]
        position = {i: k for k, i in enumerate(indices)}
        owners = self._owners()
        items = self._batched(factored, owners)

        def contract(item, values):
            """``[contractions of each tensor of item]`` from all gradients ``values``."""
            if len(item) == 1:
                return [self._contractions(item[0], values[position[item[0]]])]
            return self._batch_contractions(item, [values[position[i]] for i in item])

        def in_order(contracted):
            out = {i: c for item, cs in zip(items, contracted) for i, c in zip(item, cs)}
            return [out[i] for i in factored]

        if owners is None:  # every replica contracts every tensor

            def fold(local_grads, gate):
                self._average_into(
                    self._counts,
                    slots,
                    lambda: in_order([contract(item, local_grads) for item in items]),
                    local_grads,
                    gate,
                    warm_start,
                )

            backend.fold_across_replicas(grads, self._curvature_updates, fold, condition)
            return

        # Split: the owner of each batch of tensors computes its contractions; the others add
        # zeros.
        def contract_owned(k, reduced, gate):
            run = ops.convert_to_tensor(True) if gate is None else gate
            n = backend.count_dtype()
            done = ops.cast(run, n) * len(items[k])
            backend.count_replica_work(self, [ops.zeros((), n), done, ops.zeros((), n)])
            return ops.cond(run, lambda: contract(items[k], reduced), lambda: zeros(k))

        def zeros(k):
            return [[ops.zeros(h.shape, h.dtype) for h in self._statistics[i]] for i in items[k]]

        def fold_shared(local_grads, gate, shared):
            contractions = in_order(shared)
            self._average_into(
                self._counts, slots, lambda: contractions, local_grads, gate, warm_start
            )

        backend.fold_across_replicas(
            grads,
            self._curvature_updates,
            fold_shared,
            condition,
            share=([owners[item[0]] for item in items], contract_owned, zeros),
        )

    def _contractions(self, idx, gradient):
        """The per-mode contractions ``Ĝ^(i)`` of one tensor's gradient (docs/algorithm.md §2);
        of the touched rows only when it arrives row-sparse and its first factor is diagonal."""
        sdtype = statistics_dtype(self._trainable_variables[idx].dtype)
        modes, diagonal = self._modes[idx], self._diagonal[idx]
        slices = backend.row_slices(gradient) if self._row_sparse[idx] else None
        if slices is not None:
            rows, values = slices
            return kronecker.row_contractions(rows, ops.cast(values, sdtype), modes, diagonal)
        return kronecker.mode_contractions(ops.cast(gradient, sdtype), modes, diagonal)

    def _batch_contractions(self, item, gradients):
        """:meth:`_contractions` of the equal-shape tensors of ``item``, as one batch."""
        first = item[0]
        sdtype = statistics_dtype(self._trainable_variables[first].dtype)
        g = ops.stack([ops.cast(backend.read_value(x), sdtype) for x in gradients])
        per_mode = kronecker.batch_mode_contractions(g, self._modes[first], self._diagonal[first])
        unstacked = [ops.unstack(c) for c in per_mode]
        return [[c[k] for c in unstacked] for k in range(len(item))]

    # ------------------------------------------------------------------ step

    def _before_apply(self, grads, trainable_variables):
        if self.empirical_fisher:
            # TNT-EF (the paper's D.4 ablation): statistics from the ordinary gradients.
            self.update_curvature(grads, trainable_variables, condition=self.curvature_due())

    def _units(self):
        return [(i,) for i in range(len(self._trainable_variables))]

    def _unit_costs(self):
        return [
            _replicas.preconditioner_cost(modes, diagonal)
            for modes, diagonal in zip(self._modes, self._diagonal)
        ]

    def _unit_preconditioners(self, u):
        return self._preconditioners[u] + self._damped[u]

    def _factorizations(self, u):
        return len(self._preconditioners[u])

    def _refresh_due(self):
        """Refresh every T1 steps while t < T2, then every T2 steps (bool tensor)."""
        t = self.iterations
        period = ops.where(
            t < self.inverse_update_period,
            self.curvature_update_period,
            self.inverse_update_period,
        )
        return ops.equal(t % ops.cast(period, t.dtype), 0)

    def _refresh_variables(self, u):
        return self._statistics[u]

    def _refresh_inputs(self, u, values):
        """Tensor ``u``'s trace-normalised statistics ``U_i`` (eq. (5); docs/algorithm.md §2)."""
        return [(f, None) for f in kronecker.normalize_factors(values, self._modes[u])]

    def _transform(self, values, parameter):
        """The damped inverses ``A_i = (U_i + εI)^-1`` of a batch of factors."""
        damping = ops.convert_to_tensor(self.damping, dtype=values.dtype)
        return kronecker.damped_inverses(values, damping, diagonal=len(values.shape) == 2)

    # Whether the refresh normalises the statistics by eq. (5) (Shampoo: it takes them raw).
    _normalizes = True

    def _normalized(self, used, statistics, present) -> dict:
        """``{buffer: its statistics normalised by eq. (5)}`` for the buffers ``used`` (read
        as ``statistics``): each row divided by its tensor's divisor
        (:func:`~keras_tnt.kronecker.normalization_divisors`, from the trace of the tensor's
        first statistic, computed as :func:`~keras_tnt.kronecker.normalize_factors` computes
        it), one division per buffer; 1-mode tensors and the tensors not in ``present``
        (rows this refresh keeps) divide by 1."""
        if not self._normalizes:
            return dict(statistics)
        diagonals, divisors = {}, {}
        for u in sorted(present):
            modes = self._modes[u]
            if len(modes) < 2:
                continue
            b, r = self._factor_rows[u][0]
            if b not in diagonals:
                h = statistics[b]
                diagonals[b] = ops.unstack(h if len(h.shape) == 2 else ops.diagonal(h, 0, 1, 2))
            trace = ops.sum(diagonals[b][r])
            for (b, r), divisor in zip(
                self._factor_rows[u], kronecker.normalization_divisors(trace, modes)
            ):
                divisors[b, r] = divisor
        out = {}
        for b in used:
            h = statistics[b]
            members = self._buffers[b][2]
            if not any((b, r) in divisors for r in range(len(members))):
                out[b] = h
                continue
            one = ops.ones((), h.dtype)
            scale = ops.stack([divisors.get((b, r), one) for r in range(len(members))])
            out[b] = h / ops.reshape(scale, (-1,) + (1,) * (len(h.shape) - 1))
        return out

    def _step_refresh(self, units, finite):
        """The refresh of whole buffers (docs/algorithm.md §2, "Factor buffers"): under one
        condition, each buffer of preconditioners that holds a row of ``units`` is computed
        from its buffer of statistics at once (one normalisation, one batched transform, one
        selection) and kept whole, rather than factor by factor; a row whose tensor is not in
        ``units`` or whose gradient is not finite (``finite``) keeps its value, a failed
        transform of a finite one keeps it and counts. The numbers of :meth:`_refresh_all`."""
        factored = [u for u in units if self._modes[u]]
        if not factored or backend.split_replicas(self) is not None:
            # With several replicas, the per-tensor refresh, as the split step computes it:
            # XLA compiles the whole-buffer refresh into other roundings (1e-16 in float64),
            # and the split and unsplit runs are bit for bit the same (docs/algorithm.md §6).
            return super()._step_refresh(units, finite)
        present = set(factored)
        used = [
            b
            for b, (_, _, members, _) in enumerate(self._buffers)
            if any(i in present for i, _ in members)
        ]
        statistics = {b: backend.read_value(self._buffers[b][0]) for b in used}
        current = {b: backend.read_value(self._buffers[b][1]) for b in used}
        sparse = [u for u in factored if self._row_sparse[u]]
        damped = [[backend.read_value(d) for d in self._damped[u]] for u in sparse]
        count_dtype = backend.count_dtype()
        zero = ops.zeros((), count_dtype)

        def refresh():
            normalized = self._normalized(used, statistics, present)
            no = ops.convert_to_tensor(False)
            new, keeps, total = [], {}, None
            for b in used:
                members, parameter = self._buffers[b][2:]
                values, ok = self._transform(normalized[b], parameter)
                flags = ops.stack([finite[i] if i in present else no for i, _ in members])
                keep = ops.logical_and(ok, flags)
                failed = ops.sum(ops.cast(ops.logical_and(ops.logical_not(ok), flags), count_dtype))
                total = failed if total is None else total + failed
                shape = (-1,) + (1,) * (len(values.shape) - 1)
                new.append(ops.where(ops.reshape(keep, shape), values, current[b]))
                keeps[b] = keep
            # A row-sparse tensor also keeps the damped factors U_i + εI of its new inverses.
            rows, out = {}, []
            for u, slots in zip(sparse, damped):
                out.append([])
                for (b, r), slot in zip(self._factor_rows[u], slots):
                    if b not in rows:
                        rows[b] = ops.unstack(normalized[b]), ops.unstack(keeps[b])
                    out[-1].append(self._damped_factor(rows[b][0][r], rows[b][1][r], slot))
            return new, out, total

        def keep():
            return [current[b] for b in used], damped, zero

        new, damped, failed = ops.cond(self._refresh_due(), refresh, keep)
        rows = {b: ops.unstack(value) for b, value in zip(used, new)}
        damped = dict(zip(sparse, damped))
        refreshed = {
            u: ([rows[b][r] for b, r in self._factor_rows[u]] + list(damped.get(u, [])), zero)
            for u in factored
        }
        return refreshed, [self._buffers[b][1] for b in used], new, failed

    def _batch_key(self, u):
        """Small tensors of equal shape, dtype, factors and weight-decay setting step as one
        batch (docs/algorithm.md §2, "Batched tensors"); a row-sparse or plain-momentum tensor,
        or one above ``_batched_size`` numbers (off by default: see there), alone."""
        var = self._trainable_variables[u]
        if self._row_sparse[u] or not self._modes[u] or math.prod(var.shape) > self._batched_size:
            return None
        if self.grafting is not None:
            return None
        decays = self.weight_decay is not None and self._use_weight_decay(var)
        return (tuple(var.shape), self._modes[u], self._diagonal[u], str(var.dtype), decays)

    def _batch_values(self, item, work, gradients, learning_rate, refreshed=None, finites=None):
        """The values of :meth:`_unit_values` for equal-shape tensors, computed as one batch:
        one stacked momentum, finiteness check, selection, direction and weight update for all,
        each tensor's own numbers (its skip, its factors)."""
        if len(item) == 1:
            return super()._batch_values(item, work, gradients, learning_rate, refreshed, finites)
        var = self._trainable_variables[item[0]]
        dtype = var.dtype
        sdtype = statistics_dtype(dtype)
        modes = self._modes[item[0]]

        def each(value):  # a per-tensor flag against a stacked value
            return ops.reshape(value, (-1,) + (1,) * (len(var.shape)))

        g = ops.stack([ops.cast(grads[0], dtype) for grads in gradients])
        if finites is None:
            finite = ops.all(ops.isfinite(g), axis=tuple(range(1, len(g.shape))))
        else:
            finite = ops.stack([finites[u][0] for u in item])
        if refreshed is None:
            refreshed = self._grouped_refresh(item, dict(zip(item, ops.unstack(finite))))
        current = ops.stack([backend.read_value(self._momenta[u]) for u in item])
        beta = ops.convert_to_tensor(self.momentum, dtype=dtype)
        momenta = ops.where(each(finite), beta * current + g, current)
        # Selected against `finite` inside the refresh (_refreshed).
        preconditioners = [
            ops.stack([backend.read_value(refreshed[u][0][j]) for u in item])
            for j in range(len(modes))
        ]
        failed = ops.stack([refreshed[u][1] for u in item])
        directions = kronecker.batch_precondition(ops.cast(momenta, sdtype), preconditioners, modes)
        lr = ops.cast(learning_rate, dtype)
        old = ops.stack([backend.read_value(self._trainable_variables[u]) for u in item])
        w = old
        if self.weight_decay is not None and self._use_weight_decay(var):
            w = w - w * ops.convert_to_tensor(self.weight_decay, dtype=dtype) * lr
        weights = ops.where(each(finite), w - lr * ops.cast(directions, dtype), old)
        flags = ops.unstack(finite) if finites is None else [finites[u][0] for u in item]
        weights, momenta, failed = (ops.unstack(x) for x in (weights, momenta, failed))
        preconditioners = [ops.unstack(p) for p in preconditioners]
        return [
            (
                [weights[n]],
                [momenta[n]],
                [p[n] for p in preconditioners],
                failed[n],
                [flags[n]],
                [],  # no graft: grafting steps every tensor alone (_batch_key)
            )
            for n in range(len(item))
        ]

    def _refreshed(self, u, inputs, results, current):
        """A row-sparse tensor also keeps the damped factors ``U_i + εI`` of its new inverses
        (the slots after the inverses in ``current``)."""
        preconditioners, failed = super()._refreshed(u, inputs, results, current)
        damped = current[len(self._preconditioners[u]) :]
        for (factor, _), (_, keep, _), slot in zip(inputs, results, damped):
            preconditioners.append(self._damped_factor(factor, keep, slot))
        return preconditioners, failed

    def _damped_factor(self, factor, keep, slot):
        """``U + εI`` of a normalised factor where ``keep`` (its refresh succeeded), else the
        ``slot``'s current value (a row-sparse tensor's damped factor)."""
        damping = ops.convert_to_tensor(self.damping, dtype=factor.dtype)
        if len(factor.shape) == 2:
            damping = damping * ops.eye(factor.shape[0], dtype=factor.dtype)
        return ops.where(keep, factor + damping, slot)

    def _local_momenta(self, u):
        # A row-sparse tensor's slot holds its direction, which only its owner computes.
        return not self._row_sparse[u]

    def _unit_values(self, u, members, gradients, learning_rate, refreshed=None, finites=None):
        if not self._row_sparse[u]:
            return super()._unit_values(u, members, gradients, learning_rate, refreshed, finites)
        return self._row_sparse_values(u, gradients[0], learning_rate, refreshed)

    def _finite(self, members, gradients):
        """A row-sparse tensor's flag is its step's own (:meth:`_row_sparse_gradient`: its rows
        summed, in the statistics dtype), so that its refresh and its step skip together."""
        flags = []
        for i, g in zip(members, gradients):
            if self._row_sparse[i]:
                flags.append(self._row_sparse_gradient(i, g)[2])
            else:
                flags.extend(super()._finite([i], [g]))
        return flags

    def _backend_update_step(self, grads, trainable_variables, learning_rate):
        # What _row_sparse_gradient keeps for this step only (never across traces).
        self.__dict__["_row_sparse_kept"] = {}
        try:
            super()._backend_update_step(grads, trainable_variables, learning_rate)
        finally:
            self.__dict__.pop("_row_sparse_kept", None)

    def _row_sparse_gradient(self, u, gradient):
        """``(slices, dense, finite)`` of a row-sparse tensor's gradient: ``(rows, values)`` of an
        ``IndexedSlices`` (its rows summed) and None, or None and the dense gradient, in the
        statistics dtype; ``finite``: whether those numbers are finite.

        Inside :meth:`_backend_update_step` kept for the rest of the step (:meth:`_finite` asks
        first, the step after it): the rows are summed once, for this very gradient object."""
        kept = self.__dict__.get("_row_sparse_kept")
        if kept is not None and u in kept and kept[u][0] is gradient:
            return kept[u][1]
        sdtype = statistics_dtype(self._trainable_variables[u].dtype)
        slices = backend.row_slices(gradient)
        if slices is None:
            dense = ops.cast(gradient, sdtype)
            out = None, dense, ops.all(ops.isfinite(dense))
        else:
            rows, values = slices
            values = ops.cast(values, sdtype)
            out = (rows, values), None, ops.all(ops.isfinite(values))
        if kept is not None:
            kept[u] = (gradient, out)
        return out

    def _row_sparse_values(self, u, gradient, learning_rate, refreshed):
        r"""The step of a tensor whose first factor is diagonal, in the values of
        :meth:`_unit_values` (docs/algorithm.md §2, "Row-sparse tensors").

        It keeps the preconditioned momentum ``P = m ×_1 A_1 ×_2 ... ×_k A_k`` (the direction)
        in place of ``m``. Between refreshes the ``A_i`` are fixed, so
        ``P ← β P + g ×_1 A_1 ... ×_k A_k``: a gradient that touches ``n`` rows (an Embedding's)
        costs ``n`` rows' products, and every other row moves by ``β P`` as the dense step moves
        it. A refresh carries ``P`` to the new inverses, ``P ×_i (B_i,old A_i,new)`` with
        ``B_i,old = A_i,old^{-1}`` the kept damped factors: the dense step's numbers, up to
        the round-off of ``B_old A_old = I`` (of the order of the inverse's own error, which the
        momentum's decay forgets). Weight decay is the dense step's (every row decays).

        Until every factor has been set once (the damped factors are zero before; a first
        refresh can fail, or be skipped with the step), ``P`` cannot hold ``m``: the slot keeps
        ``m`` itself and the step is the dense one, until the refresh that completes the
        factors carries ``m`` over (``B_old := I``).
        """
        var = self._trainable_variables[u]
        dtype = var.dtype
        sdtype = statistics_dtype(dtype)
        count_dtype = backend.count_dtype()
        zero = ops.zeros((), count_dtype)
        modes = self._modes[u]
        k = len(modes)
        # The numbers _finite's flag came from (a grouped refresh was given that flag).
        slices, dense, finite = self._row_sparse_gradient(u, gradient)
        if slices is not None:
            rows, values = slices
        due = self._refresh_due()
        if refreshed is None:
            reads = self._refresh_reads([u])
            current = reads[u][1]
            refreshed = ops.cond(
                due, lambda: self._refresh(u, reads, finite), lambda: (current, zero)
            )
        else:  # refreshed by the caller (_grouped_refresh), which read the statistics
            current = read_slots([self._unit_preconditioners(u)])[0]
        preconditioners, failed = refreshed
        preconditioners = list(preconditioners)
        inverses = preconditioners[:k]

        def complete(damped):  # every damped factor set (U + εI has a positive diagonal)
            firsts = [b[0] if len(b.shape) == 1 else b[0, 0] for b in damped]
            return ops.all(ops.stack([ops.not_equal(f, 0) for f in firsts]))

        started, starts = complete(current[k:]), complete(preconditioners[k:])
        previous = ops.cast(ops.convert_to_tensor(self._momenta[u]), sdtype)  # P, or m
        beta = ops.convert_to_tensor(self.momentum, dtype=sdtype)

        def plus_gradient(x, factors):
            """``β x + g ×_i factors_i`` (``+ g`` for None); the gradient's rows only when it
            arrives row-sparse."""
            if slices is None:
                g = dense if factors is None else kronecker.precondition(dense, factors, modes)
                return beta * x + g
            if factors is None:
                step = values
            else:
                step = kronecker.precondition_rows(values, rows, factors, modes)
            return backend.scatter_rows(beta * x, rows, step)

        def carried():
            # precondition() applies F^T per mode: F = B_old A_new applies A_new A_old^-1.
            # Before the factors were complete the slot holds m: B_old := I.
            factors = []
            for a, b in zip(inverses, current[k:]):
                if len(a.shape) == 1:
                    factors.append(ops.where(started, b, ops.ones_like(b)) * a)
                else:
                    eye = ops.eye(a.shape[0], dtype=a.dtype)
                    factors.append(ops.matmul(ops.where(started, b, eye), a))
            return kronecker.precondition(previous, factors, modes)

        def directions():  # (slot, direction): P both
            moved = ops.cond(ops.logical_and(due, finite), carried, lambda: previous)
            direction = plus_gradient(moved, inverses)
            return direction, direction

        def momenta():  # (slot, direction): m, and the dense step's direction
            momentum = plus_gradient(previous, None)
            return momentum, kronecker.precondition(momentum, inverses, modes)

        lr = ops.cast(learning_rate, dtype)
        old = ops.convert_to_tensor(var)
        slot_dtype = self._momenta[u].dtype

        def stepped():  # (slot, weights)
            slot, direction = ops.cond(starts, directions, momenta)
            w = old
            if self.weight_decay is not None and self._use_weight_decay(var):
                w = w - w * ops.convert_to_tensor(self.weight_decay, dtype=dtype) * lr
            return ops.cast(slot, slot_dtype), w - lr * ops.cast(direction, dtype)

        # A non-finite gradient keeps the slot and the weights (the table's size: no pass over
        # it on TensorFlow, backend.step_or_keep).
        momentum, weights = backend.step_or_keep(
            finite, stepped, lambda: (ops.cast(previous, slot_dtype), old)
        )
        return [weights], [momentum], preconditioners, failed, [finite], []  # no graft

    def _directions(self, u, momenta, preconditioners):
        """``m ×_1 A_1 ×_2 ... ×_k A_k`` of tensor ``u``."""
        sdtype = statistics_dtype(self._trainable_variables[u].dtype)
        m = ops.cast(momenta[u], sdtype)
        return {u: kronecker.precondition(m, preconditioners, self._modes[u])}

    # ---------------------------------------------------------------- config

    def get_config(self):
        config = super().get_config()
        config["empirical_fisher"] = self.empirical_fisher
        return config
