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

import logging
import math
import numbers
import re
import warnings

import keras
import numpy as np
from keras import ops

from keras_tnt import backend
from keras_tnt import kronecker


def _check_number(name, value, low, high=None, low_open=False, high_open=True):
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"`{name}` must be a number; received {name}={value!r}.")
    value = float(value)
    bad_low = value <= low if low_open else value < low
    bad_high = high is not None and (value >= high if high_open else value > high)
    if bad_low or bad_high or value != value:
        lo = "(" if low_open else "["
        hi = ")" if high_open else "]"
        interval = f"{lo}{low}, {high if high is not None else 'inf'}{hi}"
        raise ValueError(f"`{name}` must be in {interval}; received {name}={value!r}.")
    return value


def _check_period(name, value):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"`{name}` must be an integer >= 1; received {name}={value!r}.")
    if value < 1:
        raise ValueError(f"`{name}` must be an integer >= 1; received {name}={value!r}.")
    return int(value)


# What a variable's preconditioner can be: every mode a full factor, every mode a diagonal one,
# or none (the plain momentum step, as for a scalar).
FACTOR_KINDS = ("full", "diagonal", "none")
DEFAULT_MAX_FACTOR_DIM = 4096
logger = logging.getLogger("keras_tnt")


def _check_max_factor_dim(value):
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"`max_factor_dim` must be an integer >= 1 or None; received {value!r}.")
    if value < 1:
        raise ValueError(f"`max_factor_dim` must be an integer >= 1 or None; received {value!r}.")
    return int(value)


def _check_overrides(overrides):
    if overrides is None:
        return {}
    if not isinstance(overrides, dict):
        raise TypeError(
            "`factor_overrides` must be a dict {pattern: kind} with kind one of "
            f"{', '.join(map(repr, FACTOR_KINDS))}; received {overrides!r}."
        )
    checked = {}
    for pattern, kind in overrides.items():
        if not isinstance(pattern, str):
            raise TypeError(f"`factor_overrides` keys must be strings; received {pattern!r}.")
        if kind not in FACTOR_KINDS:
            raise ValueError(
                f"`factor_overrides[{pattern!r}]` must be one of "
                f"{', '.join(map(repr, FACTOR_KINDS))}; received {kind!r}."
            )
        try:
            re.compile(pattern)
        except re.error as error:
            raise ValueError(
                f"`factor_overrides` key {pattern!r} is not a valid regular expression: {error}."
            ) from None
        checked[pattern] = kind
    return checked


def _check_memory_limit(value):
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not value > 0:
        raise ValueError(
            f"`memory_limit_bytes` must be a number of bytes > 0 or None; received {value!r}."
        )
    return int(value)


def _itemsize(dtype) -> int:
    return int(np.dtype(keras.backend.standardize_dtype(dtype)).itemsize)


def variable_path(var) -> str:
    """A variable's path (``dense/kernel``); a raw ``tf.Variable``'s name (``Variable:0``)."""
    return var.path if hasattr(var, "path") else str(var.name)


def slot_prefix(var) -> str:
    """The prefix of a variable's slot names: its path, with what a scope name cannot hold
    (``/``, ``:``) as ``_``."""
    return re.sub(r"[^A-Za-z0-9_.\-]", "_", variable_path(var))


def format_bytes(n: int) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


def statistics_dtype(variable_dtype) -> str:
    """Statistics and inverses are kept in float64 for float64 tensors, else in float32."""
    return "float64" if keras.backend.standardize_dtype(variable_dtype) == "float64" else "float32"


@keras.saving.register_keras_serializable(package="keras_tnt")
class TNT(keras.optimizers.Optimizer):
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
        split_preconditioner: with more than one replica (``tf.distribute``), whether each
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

    # What `update_curvature` takes: one sampled-label gradient per variable ("gradients"), or
    # per-layer inputs and pre-activation gradients ("layers", KFAC).
    curvature_inputs = "gradients"

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
        max_factor_dim: int | None = DEFAULT_MAX_FACTOR_DIM,
        factor_overrides: dict | None = None,
        memory_limit_bytes: int | None = None,
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
        if isinstance(learning_rate, numbers.Real) and not isinstance(learning_rate, bool):
            learning_rate = _check_number("learning_rate", learning_rate, 0.0, low_open=True)
        if weight_decay is not None:
            weight_decay = _check_number("weight_decay", weight_decay, 0.0)
        super().__init__(
            learning_rate=learning_rate,
            weight_decay=weight_decay,
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
        self.damping = _check_number("damping", damping, 0.0, low_open=True)
        self.momentum = _check_number("momentum", momentum, 0.0, 1.0)
        self.statistics_decay = _check_number("statistics_decay", statistics_decay, 0.0, 1.0)
        self.curvature_update_period = _check_period(
            "curvature_update_period", curvature_update_period
        )
        self.inverse_update_period = _check_period("inverse_update_period", inverse_update_period)
        if not isinstance(empirical_fisher, bool):
            raise TypeError(
                f"`empirical_fisher` must be True or False; received {empirical_fisher!r}."
            )
        self.empirical_fisher = empirical_fisher
        if split_preconditioner is not None and not isinstance(split_preconditioner, bool):
            raise TypeError(
                "`split_preconditioner` must be None, True or False; received "
                f"{split_preconditioner!r}."
            )
        self.split_preconditioner = split_preconditioner
        self.max_factor_dim = _check_max_factor_dim(max_factor_dim)
        self.factor_overrides = _check_overrides(factor_overrides)
        self.memory_limit_bytes = _check_memory_limit(memory_limit_bytes)
        # Set once something feeds statistics (update_curvature, a FisherModel, a restored
        # state); `apply` refuses to precondition with statistics nobody will ever fill. The
        # empirical Fisher feeds itself from the gradients given to `apply`.
        self._curvature_source = empirical_fisher
        # What an optimizer saved before it was built holds (iterations, learning rate).
        self._unbuilt_variable_count = len(self.variables)

    @property
    def needs_sampled_gradients(self) -> bool:
        """Whether statistics come from a sampled-label (Fisher) pass, i.e. need a FisherModel."""
        return not self.empirical_fisher

    # ------------------------------------------------------------------ state

    # ------------------------------------------------------------------ plan

    def _variable_plan(self, var) -> dict:
        """One variable's entry of :meth:`plan` (no allocation)."""
        path = variable_path(var)
        shape = tuple(int(d) for d in var.shape)
        modes = kronecker.tensor_modes(shape)
        override = next(
            (kind for pattern, kind in self.factor_overrides.items() if re.search(pattern, path)),
            None,
        )
        if override == "none":
            modes = ()
        if override == "full":
            factors = ["full"] * len(modes)
        elif override == "diagonal":
            factors = ["diagonal"] * len(modes)
        else:
            bound = self.max_factor_dim
            factors = ["diagonal" if bound and d > bound else "full" for d in modes]
        itemsize = _itemsize(statistics_dtype(var.dtype))
        factor_numbers = sum(d if f == "diagonal" else d * d for d, f in zip(modes, factors))
        state = math.prod(shape) * _itemsize(var.dtype)  # momentum
        state += 2 * factor_numbers * itemsize  # statistics and inverses
        state += 3 * _itemsize(backend.count_dtype())  # count, skipped, failed
        return {
            "variable": path,
            "shape": shape,
            "modes": modes,
            "factors": factors,
            "override": override,
            "state_bytes": int(state),
        }

    def plan(self, var_list=None) -> list[dict]:
        """The preconditioner of every variable, before anything is allocated.

        One dict per variable (build order): ``variable`` (its path), ``shape``, ``modes``
        (:func:`~keras_tnt.kronecker.tensor_modes`; empty for the plain momentum step),
        ``factors`` (``"full"`` or ``"diagonal"`` per mode), ``override`` (the kind a
        ``factor_overrides`` pattern set, or None) and ``state_bytes`` (its momentum,
        statistics, inverses and counters). ``var_list`` defaults to the variables the
        optimizer was built with. :meth:`describe_plan` prints it as a table.
        """
        if var_list is None:
            self._require_built("plan")
            var_list = self._trainable_variables
        return [self._variable_plan(v) for v in var_list]

    # The optimizer-wide counters of `_build_counters` (curvature updates, warm-start batches,
    # skipped curvature updates), in no variable's plan entry.
    _optimizer_counters = 3

    def _shared_state_bytes(self, var_list) -> int:
        """What :meth:`build` allocates besides the entries of :meth:`plan`: the optimizer-wide
        counters, and Keras' copy of every variable for ``use_ema`` (the moving average) and for
        ``gradient_accumulation_steps`` (the accumulator)."""
        copies = int(bool(self.use_ema)) + int(bool(self.gradient_accumulation_steps))
        variables = sum(math.prod(int(d) for d in v.shape) * _itemsize(v.dtype) for v in var_list)
        return self._optimizer_counters * _itemsize(backend.count_dtype()) + copies * variables

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
        entries = self.plan(var_list)
        width = max([len(e["variable"]) for e in entries] + [8])
        lines = [f"{'variable':<{width}}  {'shape':<20} {'factors':<36} state"]
        for e in entries:
            if not e["modes"]:
                factors = e.get("note") or "none (plain momentum)"
            else:
                factors = " x ".join(
                    f"{d}{'d' if f == 'diagonal' else ''}" for d, f in zip(e["modes"], e["factors"])
                )
                factors += " (d: diagonal)" if "diagonal" in e["factors"] else ""
                factors += f", {e['note']}" if e.get("note") else ""
            lines.append(
                f"{e['variable']:<{width}}  {str(e['shape']):<20} {factors:<36} "
                f"{format_bytes(e['state_bytes'])}"
            )
        shared = self._shared_state_bytes(var_list)
        what = ["optimizer-wide counters"]
        what += ["use_ema averages"] if self.use_ema else []
        what += ["gradient accumulators"] if self.gradient_accumulation_steps else []
        lines.append(f"{', '.join(what)}: {format_bytes(shared)}")
        total = sum(e["state_bytes"] for e in entries) + shared
        lines.append(f"total optimizer state: {format_bytes(total)} ({total} bytes)")
        return "\n".join(lines)

    def _check_plan(self, var_list) -> list[dict]:
        """The plan of ``var_list``; raises before any allocation if it breaks a setting."""
        entries = self.plan(var_list)
        unused = [
            p
            for p in self.factor_overrides
            if not any(re.search(p, e["variable"]) for e in entries)
        ]
        if unused:
            paths = ", ".join(e["variable"] for e in entries[:6])
            raise ValueError(
                f"`factor_overrides`: {', '.join(map(repr, unused))} matches no variable "
                f"(variable paths look like: {paths}{', ...' if len(entries) > 6 else ''})."
            )
        total = sum(e["state_bytes"] for e in entries) + self._shared_state_bytes(var_list)
        if self.memory_limit_bytes is not None and total > self.memory_limit_bytes:
            largest = sorted(entries, key=lambda e: -e["state_bytes"])[:3]
            raise ValueError(
                f"The optimizer state would take {format_bytes(total)} ({total} bytes), over "
                f"`memory_limit_bytes={self.memory_limit_bytes}`. Largest: "
                + "; ".join(
                    f"{e['variable']} {e['shape']}: {format_bytes(e['state_bytes'])}"
                    for e in largest
                )
                + ". Lower `max_factor_dim`, or set `factor_overrides` (e.g. 'diagonal' or "
                "'none' for those variables)."
            )
        bounded = sum(1 for e in entries if e["override"] is None and "diagonal" in e["factors"])
        summary = (
            f"{self.name}: {len(entries)} variables, "
            f"{sum(f == 'full' for e in entries for f in e['factors'])} full and "
            f"{sum(f == 'diagonal' for e in entries for f in e['factors'])} diagonal factors, "
            f"{sum(not e['modes'] and 'note' not in e for e in entries)} plain momentum; "
            f"optimizer state "
            f"{format_bytes(total)}"
        )
        if bounded:
            logger.warning(
                "%s (%d %s modes above max_factor_dim=%s, which got diagonal factors; see "
                "optimizer.describe_plan()).",
                summary,
                bounded,
                "variable has" if bounded == 1 else "variables have",
                self.max_factor_dim,
            )
        else:
            logger.info("%s.", summary)
        return entries

    # ------------------------------------------------------------------ state

    def build(self, var_list):
        if self.built:
            return
        entries = self._check_plan(var_list)
        super().build(var_list)
        self._modes = []
        self._diagonal = []
        self._momenta = []
        self._statistics = []
        self._inverses = []
        self._counts = []
        self._skipped = []
        self._failed = []
        # The order of creation is the order of saving: it must never depend on anything but
        # var_list (optimizer state is restored by index).
        for var, entry in zip(var_list, entries):
            modes = entry["modes"]
            diagonal = tuple(f == "diagonal" for f in entry["factors"])
            shapes = [(d,) if diag else (d, d) for d, diag in zip(modes, diagonal)]
            prefix = slot_prefix(var)
            sdtype = statistics_dtype(var.dtype)
            self._modes.append(modes)
            self._diagonal.append(diagonal)
            self._momenta.append(self.add_variable_from_reference(var, "momentum"))
            self._statistics.append(
                [
                    self.add_variable(shape, dtype=sdtype, name=f"{prefix}_statistics_{i}")
                    for i, shape in enumerate(shapes)
                ]
            )
            self._inverses.append(
                [
                    self.add_variable(shape, dtype=sdtype, name=f"{prefix}_inverse_{i}")
                    for i, shape in enumerate(shapes)
                ]
            )
            # Batches folded into this variable's statistics (the first one sets them).
            self._counts.append(self._add_counter(f"{prefix}_statistics_count"))
            self._skipped.append(self._add_counter(f"{prefix}_skipped"))
            self._failed.append(self._add_counter(f"{prefix}_failed"))
        self._build_counters()
        self._restore_pending()

    def _add_counter(self, name):
        """A scalar integer slot (int64; int32 on JAX without x64, as Keras' `iterations`)."""
        return self.add_variable((), dtype=backend.count_dtype(), name=name)

    def _build_counters(self):
        """The optimizer-wide counters."""
        self._curvature_updates = self._add_counter("curvature_updates")
        self._warm_start_batches = self._add_counter("warm_start_batches")
        self._skipped_curvature = self._add_counter("skipped_curvature_updates")
        backend.make_work_counter(self)  # not optimizer state

    def _restore_pending(self):
        """Restores a state loaded before the optimizer was built (the end of ``build``)."""
        pending = self.__dict__.pop("_pending_state", None)
        if pending is None:
            return
        with backend.outside_graph():
            try:
                self._restore(pending)
            except ValueError as error:
                # Keras builds inside the first traced step, where an error would leave a
                # half-built optimizer behind: `_restore` checks before it assigns anything, so
                # say it loudly and train from the fresh state, as Keras' own optimizers do.
                # (FisherModel builds its optimizer before loading, and raises.)
                warnings.warn(
                    f"{error} The loaded optimizer state was NOT restored: training starts "
                    "from a fresh optimizer state.",
                    stacklevel=2,
                )

    def load_own_variables(self, store):
        """Restores the state saved by ``save_own_variables`` (``.keras`` files, weights files).

        An optimizer that is not built yet (``model.load_weights`` on a freshly compiled model,
        KerasTuner's ``get_best_models``) keeps the saved values and restores them when it is
        built, so training continues from the saved state. A state saved for other variables is
        an error, never a partial restore.
        """
        keys = list(store.keys())
        if not self.built:
            if keys:
                # Not an attribute TensorFlow's checkpoint tracking should wrap or follow.
                object.__setattr__(self, "_pending_state", {k: np.array(store[k]) for k in keys})
            return
        if not keys:
            warnings.warn(
                f"Optimizer '{self.name}': the file holds no optimizer state (it was saved "
                "without one); the optimizer keeps its current state.",
                stacklevel=2,
            )
            return
        self._restore(store)

    def save_own_variables(self, store):
        pending = self.__dict__.get("_pending_state")
        if not self.built and pending is not None:
            # Loaded, not built yet: the loaded state is this optimizer's state.
            for key, value in pending.items():
                store[key] = value
            return
        super().save_own_variables(store)

    def _restore(self, store):
        if len(store.keys()) == self._unbuilt_variable_count < len(self.variables):
            # Saved before it was ever built (compiled, not trained): its step counter and
            # learning rate; the statistics start fresh, as they would have.
            for i in range(self._unbuilt_variable_count):
                self.variables[i].assign(store[str(i)])
            return
        if len(store.keys()) != len(self.variables):
            raise ValueError(
                f"Cannot restore optimizer '{self.name}': the saved state has "
                f"{len(store.keys())} variables but this optimizer has {len(self.variables)}. "
                "Build it on the same model (same trainable variables, same order) before "
                "loading; restoring only part of the Kronecker statistics would silently change "
                "the training run. To load only the model's weights, load them before "
                "`compile()`, or pass `skip_mismatch=True`."
            )
        for i, variable in enumerate(self.variables):
            value = store[str(i)]
            if tuple(variable.shape) != tuple(np.shape(value)):
                raise ValueError(
                    f"Cannot restore optimizer '{self.name}': saved variable {i} has shape "
                    f"{tuple(np.shape(value))}, but {variable.path} has shape "
                    f"{tuple(variable.shape)}. The state was saved for another model."
                )
        keras.optimizers.Optimizer.load_own_variables(self, store)

    @property
    def curvature_updates(self) -> int:
        """How many batches of sampled-label gradients have been folded into the statistics."""
        return int(self._curvature_updates.numpy())

    @property
    def warm_start_batches(self) -> int:
        return int(self._warm_start_batches.numpy())

    @property
    def skipped_updates(self) -> int:
        """Tensor updates skipped because their gradient was not finite."""
        return int(sum(int(v.numpy()) for v in self._skipped))

    @property
    def failed_inversions(self) -> int:
        """Factor inversions that failed (the previous inverse was kept)."""
        return int(sum(int(v.numpy()) for v in self._failed))

    @property
    def skipped_curvature_updates(self) -> int:
        return int(self._skipped_curvature.numpy())

    def statistics(self, variable) -> list:
        """The Kronecker statistics ``H_i`` of one trainable variable (one per mode)."""
        return [h for h in self._statistics[self._get_variable_index(variable)]]

    def inverses(self, variable) -> list:
        """The damped inverses ``A_i`` of one trainable variable (one per mode)."""
        return [a for a in self._inverses[self._get_variable_index(variable)]]

    def statistics_count(self, variable) -> int:
        """How many batches have been folded into the statistics of one trainable variable."""
        return int(self._counts[self._get_variable_index(variable)].numpy())

    # ------------------------------------------------------------- curvature

    def curvature_due(self):
        """Whether this step folds sampled-label gradients into the statistics (bool tensor).

        True when ``t % T1 == 0``, except at ``t = 0`` after a warm start (the warm-start
        statistics serve the first step). With gradient accumulation, only on the first
        micro-batch of an accumulation window.
        """
        self._require_built("curvature_due")
        t = self.iterations
        due = ops.equal(t % self.curvature_update_period, 0)
        warm_first = ops.logical_and(ops.equal(t, 0), self._warm_start_batches > 0)
        due = ops.logical_and(due, ops.logical_not(warm_first))
        if self.gradient_accumulation_steps:
            first_micro = ops.equal(self._iterations % self.gradient_accumulation_steps, 0)
            due = ops.logical_and(due, first_micro)
        return due

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

    # How `update_curvature`'s arguments are named in its errors: (values, one value, keys, key).
    _curvature_words = (
        "fisher_gradients",
        "gradient",
        "trainable_variables",
        "trainable variable",
    )

    def _align(self, values, keys):
        """``[(slot index, value)]`` for ``values`` given per key (default: build order).

        ``None`` values are dropped: they leave their slots untouched. Keys are looked up with
        :meth:`_curvature_index`; there are :meth:`_curvature_slots` of them.
        """
        what, item, keys_arg, noun = self._curvature_words
        values = list(values)
        total = self._curvature_slots()
        if keys is None:
            if len(values) != total:
                raise ValueError(
                    f"`{what}` must hold one {item} per {noun} the optimizer was built with "
                    f"({total}) when `{keys_arg}` is not given; received {len(values)}. For a "
                    f"subset, pass the matching `{keys_arg}`."
                )
            indices = list(range(total))
        else:
            keys = list(keys)
            if len(keys) != len(values):
                raise ValueError(
                    f"`{what}` and `{keys_arg}` must have the same length; received "
                    f"{len(values)} and {len(keys)}."
                )
            indices = [self._curvature_index(k) for k in keys]
            if len(set(indices)) != len(indices):
                raise ValueError(f"`{keys_arg}` names the same {noun} more than once.")
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
            grads = [g / self.loss_scale_factor for g in grads]

        slots = [(self._counts[i], self._statistics[i]) for i in indices if self._modes[i]]
        owners = self._owners()
        if owners is None:

            def fold(local_grads, gate):
                self._average_into(
                    slots,
                    lambda: self._contractions(indices, local_grads),
                    local_grads,
                    gate,
                    warm_start,
                )

            backend.fold_across_replicas(grads, self._curvature_updates, fold, condition)
            return

        # Split: the owner of each tensor computes its contractions; the others add zeros.
        def contract(k, gradient, gate):
            idx = indices[k]
            if not self._modes[idx]:  # plain momentum (a scalar, or factor_overrides "none")
                return []
            run = ops.convert_to_tensor(True) if gate is None else gate
            self._count_work(idx, contraction=run)
            return ops.cond(run, lambda: self._contractions([idx], [gradient])[0], lambda: zeros(k))

        def zeros(k):
            idx = indices[k]
            sdtype = statistics_dtype(self._trainable_variables[idx].dtype)
            return [ops.zeros(h.shape, sdtype) for h in self._statistics[idx]]

        def fold_shared(local_grads, gate, shared):
            contractions = [c for k, c in enumerate(shared) if self._modes[indices[k]]]
            self._average_into(slots, lambda: contractions, local_grads, gate, warm_start)

        backend.fold_across_replicas(
            grads,
            self._curvature_updates,
            fold_shared,
            condition,
            share=([owners[i] for i in indices], contract, zeros),
        )

    def _contractions(self, indices, grads):
        """The new per-mode contractions ``Ĝ^(i)`` of the variables with modes."""
        out = []
        for idx, g in zip(indices, grads):
            modes = self._modes[idx]
            if modes:
                sdtype = statistics_dtype(self._trainable_variables[idx].dtype)
                out.append(
                    kronecker.mode_contractions(ops.cast(g, sdtype), modes, self._diagonal[idx])
                )
        return out

    def _average_into(self, slots, compute, inputs, gate, warm_start):
        """Folds one batch into ``slots``, ``[(count variable, [statistic variables])]``.

        ``compute()`` gives the batch's values, ``[[value per statistic] per slot]``; it runs
        only when ``gate`` (a bool tensor, or None for always) holds and every tensor of
        ``inputs`` is finite (else the batch counts as skipped). Each slot's count is the number
        of batches its statistics hold. Warm start: the running mean over those batches.
        Otherwise the moving average with decay ``ρ``, except that a slot's first batch sets its
        statistics. The branches return values and every assignment happens after them, so the
        fold also runs in JAX's stateless mode under ``jit``.
        """
        finite = ops.all(ops.stack([ops.all(ops.isfinite(v)) for v in inputs]))
        run = finite if gate is None else ops.logical_and(gate, finite)
        skipped = ops.logical_not(finite)
        if gate is not None:
            skipped = ops.logical_and(gate, skipped)

        def fold():
            out = []
            for (count, stats), values in zip(slots, compute()):
                n = ops.convert_to_tensor(count)
                first = ops.equal(n, 0)
                new_stats = []
                for var, value in zip(stats, values):
                    sdtype = var.dtype
                    if warm_start:
                        j = ops.cast(n + 1, sdtype)
                        keep, new = (j - 1) / j, 1 / j
                    else:
                        rho = ops.convert_to_tensor(self.statistics_decay, dtype=sdtype)
                        keep = ops.where(first, ops.zeros_like(rho), rho)
                        new = ops.where(first, ops.ones_like(rho), 1 - rho)
                    new_stats.append(
                        keep * ops.convert_to_tensor(var) + new * ops.cast(value, sdtype)
                    )
                out.append(new_stats)
            return out

        def keep():
            return [[ops.convert_to_tensor(var) for var in stats] for _, stats in slots]

        new_values = ops.cond(run, fold, keep)
        for (count, stats), values in zip(slots, new_values):
            for var, value in zip(stats, values):
                self.assign(var, value)
            self.assign_add(count, ops.cast(run, backend.count_dtype()))
        self.assign_add(self._curvature_updates, ops.cast(run, backend.count_dtype()))
        if warm_start:
            self.assign_add(self._warm_start_batches, ops.cast(run, backend.count_dtype()))
        self.assign_add(self._skipped_curvature, ops.cast(skipped, backend.count_dtype()))

    # ------------------------------------------------------------------ step

    def apply(self, grads, trainable_variables=None):
        self._build_for_apply(trainable_variables)
        if self.empirical_fisher:
            # TNT-EF (the paper's D.4 ablation): statistics from the ordinary gradients.
            self.update_curvature(grads, trainable_variables, condition=self.curvature_due())
        if not self._has_statistics():
            raise ValueError(
                "TNT preconditions with Fisher statistics from gradients of labels sampled from "
                "the model's predictions, and nothing has provided them. Train with "
                "`keras_tnt.FisherModel` (or `keras_tnt.FisherModel.from_model(model)`) instead "
                "of a plain `keras.Model`, or, in a custom training loop, call "
                "`optimizer.update_curvature(fisher_gradients)` before `apply`."
            )
        return super().apply(grads, trainable_variables)

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
        # Applied per tensor inside `update_step` instead (skipped with a non-finite gradient).
        return

    def update_step(self, gradient, variable, learning_rate):
        idx = self._get_variable_index(variable)
        values = self._update_values(idx, gradient, variable, learning_rate)
        self._assign_update(idx, variable, values)

    def _update_values(self, idx, gradient, variable, learning_rate, refreshed=None):
        """``(new weights, new momentum, new inverses, failed inversions, skipped)`` of one step.

        ``refreshed``: this step's ``(inverses, failed)`` of the tensor, computed already (see
        :meth:`_grouped_update_step`), or None: refreshed here when due. Computes, assigns
        nothing (the assignments follow in :meth:`_assign_update`, which JAX's stateless mode
        needs, and which lets the replica that owns a tensor compute its update for all of
        them).

        A non-finite gradient skips the step: the momentum, weights and inverses keep their
        values. Selected without a branch (a traced ``cond`` per tensor costs about 0.1 s of
        TensorFlow tracing each): the gradient enters as zero, the momentum factor and the
        learning rate as 1 and 0, so the finite path computes bit for bit what it would alone.
        """
        dtype = variable.dtype
        gradient = ops.cast(gradient, dtype)
        learning_rate = ops.cast(learning_rate, dtype)
        finite = ops.all(ops.isfinite(gradient))
        gradient = ops.where(finite, gradient, ops.zeros((), dtype))
        momentum = ops.where(finite, ops.convert_to_tensor(self.momentum, dtype), 1)
        learning_rate = ops.where(finite, learning_rate, 0)
        current = [ops.convert_to_tensor(a) for a in self._inverses[idx]]
        zero = ops.zeros((), backend.count_dtype())
        if refreshed is None:
            refreshed = self._refreshed_inverses(idx, current)
        inverses, failed = refreshed
        inverses = [ops.where(finite, a, c) for a, c in zip(inverses, current)]
        failed = ops.where(finite, failed, zero)
        new_variable, new_m = self._step(idx, gradient, variable, learning_rate, momentum, inverses)
        skipped = ops.cast(ops.logical_not(finite), backend.count_dtype())
        return new_variable, new_m, inverses, failed, skipped

    def _refreshed_inverses(self, idx, current):
        """``(inverses, failed)`` of variable ``idx`` for this step: new ones when due."""
        zero = ops.zeros((), backend.count_dtype())
        if not self._modes[idx]:
            return current, zero
        return ops.cond(
            self._refresh_due(), lambda: self._new_inverses(idx), lambda: (current, zero)
        )

    def _zero_update_values(self, idx, variable):
        """Zeros of the structure of :meth:`_update_values` (what a non-owner contributes)."""
        zero = ops.zeros((), backend.count_dtype())
        return (
            ops.zeros(variable.shape, variable.dtype),
            ops.zeros(variable.shape, self._momenta[idx].dtype),
            [ops.zeros(a.shape, a.dtype) for a in self._inverses[idx]],
            zero,
            zero,
        )

    def _assign_update(self, idx, variable, values):
        new_variable, new_m, new_inverses, failed, skipped = values
        self.assign(self._momenta[idx], new_m)
        for a, value in zip(self._inverses[idx], new_inverses):
            self.assign(a, value)
        if self._modes[idx]:
            self.assign_add(self._failed[idx], failed)
        self.assign_add(self._skipped[idx], skipped)
        self.assign(variable, new_variable)

    # ------------------------------------------------------ split across replicas

    def _owners(self):
        """The replica owning each variable's preconditioner work, or None (no split).

        Split when the optimizer is asked to (``split_preconditioner``, default on), runs in a
        replica context of more than one replica and the backend supports it (tf.distribute).
        The plan depends only on the variables' shapes and the replica count.
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
            plan = (replicas, kronecker.plan_owners(self._unit_costs(), replicas))
            object.__setattr__(self, "_owner_plan", plan)
        return plan[1]

    def _unit_costs(self):
        """The cost of each unit of split work (here: each variable), in build order."""
        return [
            kronecker.preconditioner_cost(modes, diagonal)
            for modes, diagonal in zip(self._modes, self._diagonal)
        ]

    def _backend_update_step(self, grads, trainable_variables, learning_rate):
        owners = self._owners()
        if owners is None:
            if self._groups_refreshes and backend.single_program():
                return self._grouped_update_step(grads, trainable_variables, learning_rate)
            return super()._backend_update_step(grads, trainable_variables, learning_rate)
        indices = [self._get_variable_index(v) for v in trainable_variables]

        def compute(k, reduced):
            idx = indices[k]
            values = self._update_values(idx, reduced[k], trainable_variables[k], learning_rate)
            finite = ops.equal(values[-1], 0)  # not skipped
            refresh = ops.logical_and(finite, self._refresh_due())
            self._count_work(idx, refresh=refresh, preconditioning=finite)
            return values

        def zeros(k):
            return self._zero_update_values(indices[k], trainable_variables[k])

        def assign(values):
            for k, v in enumerate(values):
                self._assign_update(indices[k], trainable_variables[k], v)

        backend.update_from_owners(
            grads, [owners[i] for i in indices], compute, zeros, assign, self._curvature_updates
        )

    # Whether the update may refresh every tensor's inverses under one branch (KFAC: per layer).
    _groups_refreshes = True

    def _grouped_update_step(self, grads, trainable_variables, learning_rate):
        """Every tensor's update, with the inverse refreshes of all of them under one ``cond``.

        The same numbers as one :meth:`update_step` per tensor; a branch per tensor instead
        costs TensorFlow about 0.15 s of tracing each (24 s on a 38-tensor transformer).
        """
        indices = [self._get_variable_index(v) for v in trainable_variables]
        factored = [idx for idx in indices if self._modes[idx]]
        current = {idx: [ops.convert_to_tensor(a) for a in self._inverses[idx]] for idx in indices}
        refreshed = {idx: None for idx in indices}
        if factored:
            zero = ops.zeros((), backend.count_dtype())
            values = ops.cond(
                self._refresh_due(),
                lambda: [self._new_inverses(idx) for idx in factored],
                lambda: [(current[idx], zero) for idx in factored],
            )
            refreshed.update(zip(factored, values))
        for idx, grad, var in zip(indices, grads, trainable_variables):
            refresh = refreshed[idx] or (current[idx], ops.zeros((), backend.count_dtype()))
            values = self._update_values(idx, grad, var, learning_rate, refresh)
            self._assign_update(idx, var, values)

    def _count_work(self, idx, refresh=False, contraction=False, preconditioning=False):
        """Counts, on this replica, the work it does for variable ``idx`` (split runs only):
        factorisations (one per mode when ``refresh``), a contraction, a preconditioning."""
        modes = self._modes[idx]
        if not modes:
            return
        n = backend.count_dtype()
        counts = [
            ops.cast(refresh, n) * len(modes),
            ops.cast(contraction, n),
            ops.cast(preconditioning, n),
        ]
        backend.count_replica_work(self, counts)

    def replica_work(self):
        """What each local replica did in split runs: a list with one dict per replica.

        Keys ``factorizations`` (factor inversions or roots computed), ``contractions``
        (tensors whose mode contractions were computed) and ``preconditionings`` (tensors
        whose update was computed; for KFAC, layers), counted since the optimizer was built.
        When the work is not split every replica does all of it and nothing is counted: zeros
        under a strategy with ``split_preconditioner=False`` (or gradient accumulation), an
        empty list with one replica and on the JAX backend.
        """
        return backend.replica_work(self)

    def _step(self, idx, gradient, variable, learning_rate, momentum, inverses):
        """``(new weights, new momentum)``: the step of variable ``idx`` with these inverses."""
        dtype = variable.dtype
        new_m = momentum * ops.convert_to_tensor(self._momenta[idx]) + gradient
        weights = ops.convert_to_tensor(variable)
        if self.weight_decay is not None and self._use_weight_decay(self._trainable_variables[idx]):
            # Decoupled decay, as Keras applies it, but here so that a skipped update skips it.
            wd = ops.convert_to_tensor(self.weight_decay, dtype=dtype)
            weights = weights - weights * wd * learning_rate
        modes = self._modes[idx]
        if not modes:
            return weights - learning_rate * new_m, new_m
        sdtype = statistics_dtype(dtype)
        direction = kronecker.precondition(ops.cast(new_m, sdtype), inverses, modes)
        return weights - learning_rate * ops.cast(direction, dtype), new_m

    def _refresh_due(self):
        """Refresh every T1 steps while t < T2, then every T2 steps (bool tensor)."""
        t = self.iterations
        period = ops.where(
            t < self.inverse_update_period,
            self.curvature_update_period,
            self.inverse_update_period,
        )
        return ops.equal(t % ops.cast(period, t.dtype), 0)

    def _new_inverses(self, idx):
        """``(inverses, failed)``: the refreshed factors ``A_i`` of variable ``idx``.

        A factor whose inversion fails keeps its previous value and counts in ``failed``.
        """
        modes = self._modes[idx]
        stats = [ops.convert_to_tensor(h) for h in self._statistics[idx]]
        damping = ops.convert_to_tensor(self.damping, dtype=stats[0].dtype)
        failed = ops.zeros((), backend.count_dtype())
        out = []
        for u, a in zip(kronecker.normalize_factors(stats, modes), self._inverses[idx]):
            inverse, ok = kronecker.damped_inverse(u, damping)
            out.append(ops.where(ok, inverse, ops.convert_to_tensor(a)))
            failed = failed + ops.cast(ops.logical_not(ok), backend.count_dtype())
        return out, failed

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
                "empirical_fisher": self.empirical_fisher,
                "split_preconditioner": self.split_preconditioner,
                "max_factor_dim": self.max_factor_dim,
                "factor_overrides": dict(self.factor_overrides),
                "memory_limit_bytes": self.memory_limit_bytes,
            }
        )
        return config
