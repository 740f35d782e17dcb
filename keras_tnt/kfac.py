r"""KFAC (Martens & Grosse, 2015; Grosse & Martens, 2016) as the TNT paper ran it as a baseline.

KFAC approximates the Fisher block of a whole layer, kernel and bias together, by ``A ⊗ G``:
``A`` from the layer's input activations (with a column of ones for the bias) and ``G`` from the
gradients of the sampled-label loss with respect to its pre-activation outputs
(docs/algorithm.md §4). For a batch of ``N`` inputs ``a_n`` and pre-activation gradients ``s_n``
of the batch-mean loss, summed over the ``P`` spatial positions of a convolution (im2col patches
replace ``a``):

.. math::

    A = \frac1N \sum_{n,p} a a^\top,\qquad
    G = \frac{1}{N P} \sum_{n,p} (N s)(N s)^\top,\qquad
    [D_W \mid D_b] = (G + \sqrt\lambda I)^{-1} [m_W \mid m_b] (A + \sqrt\lambda I)^{-1}

(in Keras' ``(in, out)`` kernel layout the two factors act from the other sides). The momentum
``m ← β m + g``, decoupled weight decay, the moving average of the factors and warm start are
TNT's. The factors are updated whenever ``t % T1 == 0`` (also at ``t = 0``) and inverted when
``(t <= T2 and t % T1 == 0) or t % T2 == 0``.

``Dense`` and ``Conv2D`` layers are factored; every other trainable tensor (BatchNorm's scale
and offset, embeddings, ...) takes the plain momentum step ``W ← W - α m``, and the optimizer
says which layers those are when it is built.

Wide layers (``max_factor_dim``, as for TNT): a side of a layer wider than the bound (its kernel's
input rows ``d_in`` without the bias's ones row, or its ``d_out`` outputs) gets a diagonal factor,
``diag(A)`` = ``(1/N) Σ_{n,p} a²`` per input (a Dense layer on 2-D inputs: the mean of ``a²``,
the bias's entry 1; summed over the ``P`` positions otherwise, the bias's entry ``P``) or
``diag(G)``, damped by the same ``√λ``; ``(diag(A) + √λ)^{-1}`` then scales the rows of
``[M_W; m_b]`` and ``(diag(G) + √λ)^{-1}`` its columns. A 10,000-class output layer keeps a full
``A`` and a diagonal ``G``. ``factor_overrides`` picks per layer (the pattern is searched in the
paths of the layer's kernel and bias): ``"full"``, ``"diagonal"`` (both factors) or ``"none"``
(plain momentum).

Example::

    import keras, keras_tnt
    model = keras_tnt.FisherModel(inputs, outputs)
    model.compile(optimizer=keras_tnt.KFAC(learning_rate=3e-3, damping=0.3), loss=...)
    model.fit(dataset, epochs=10)

The activations and pre-activation gradients come from :class:`keras_tnt.FisherModel`'s training
step, which records them while the layers run (:func:`capture_layers`). A custom training loop
gathers them itself and calls :meth:`KFAC.update_curvature`.
"""

from __future__ import annotations

import math
import re
import warnings

import keras
from keras import ops

from keras_tnt import _layers
from keras_tnt import _plan
from keras_tnt import _replicas
from keras_tnt import backend
from keras_tnt import kronecker
from keras_tnt._base import CurvatureWords
from keras_tnt._base import KroneckerOptimizer
from keras_tnt._capture import capture_layers  # noqa: F401 (part of the KFAC API)
from keras_tnt._layers import LayerBlock
from keras_tnt._variables import first_override
from keras_tnt._variables import itemsize
from keras_tnt._variables import statistics_dtype
from keras_tnt._variables import variable_path


def _layer_sums(block: LayerBlock, inputs, preactivation_gradients, dtype, replicas: int):
    """``(n A, n G, n)`` of one replica's ``n`` examples (unnormalised factor sums).

    ``preactivation_gradients`` follow Keras' convention under ``tf.distribute``: the gradient of
    this replica's loss, the mean over its ``n`` examples divided by ``replicas``; so ``n *
    replicas * s`` is each example's own loss gradient. Summed over replicas and divided by the
    total count, the sums give ``A`` and ``G`` of the global batch, however the batch was split
    (a replica without examples contributes zeros).
    """
    a = ops.cast(inputs, dtype)
    s = ops.cast(preactivation_gradients, dtype)
    if block.kind == "conv2d":
        a = backend.extract_patches(block.layer, a)
        if block.layer.data_format == "channels_first":
            s = ops.transpose(s, (0, 2, 3, 1))
    one = ops.ones((), dtype=dtype)
    count = ops.cast(ops.shape(a)[0], dtype)
    local = ops.maximum(count, one)
    a = ops.reshape(a, (-1, ops.shape(a)[-1]))
    s = ops.reshape(s, (-1, block.output_size))
    if block.bias_index is not None:
        a = ops.concatenate([a, ops.ones((ops.shape(a)[0], 1), dtype=dtype)], axis=1)
    positions = ops.maximum(ops.cast(ops.shape(s)[0], dtype), one) / local
    per_example = local * replicas
    diagonal_a, diagonal_g = block.diagonal
    sum_a = ops.sum(a * a, axis=0) if diagonal_a else ops.matmul(ops.transpose(a), a)
    sum_g = ops.sum(s * s, axis=0) if diagonal_g else ops.matmul(ops.transpose(s), s)
    return sum_a, sum_g * (per_example**2 / positions), count


def layer_factors(block: LayerBlock, inputs, preactivation_gradients, dtype):
    """``(A, G)`` of one layer for one batch (docs/algorithm.md §4).

    ``inputs`` is the layer's input and ``preactivation_gradients`` the gradient of the
    batch-mean loss with respect to the layer's pre-activation output:
    ``A = (1/N) Σ a aᵀ`` (a ones column for the bias; im2col patches, summed over the ``P``
    positions, for a convolution) and ``G = (1/(N P)) Σ (N s)(N s)ᵀ``; a factor the block keeps
    diagonal (:attr:`LayerBlock.diagonal`) is returned as its diagonal, a vector.
    """
    sum_a, sum_g, count = _layer_sums(block, inputs, preactivation_gradients, dtype, 1)
    count = ops.maximum(count, ops.ones((), dtype=count.dtype))
    return sum_a / count, sum_g / count


# --------------------------------------------------------------- optimizer


@keras.saving.register_keras_serializable(package="keras_tnt")
class KFAC(KroneckerOptimizer):
    """KFAC for Dense and Conv2D layers, with TNT's momentum, statistics and API.

    Args:
        learning_rate: ``α``. Default 3e-3, the paper's best KFAC value on the MNIST autoencoder.
        damping: ``λ`` > 0; ``√λ I`` is added to each of the two factors. Default 0.3 (MNIST
            autoencoder; the paper's CIFAR runs used 0.03).
        momentum, statistics_decay, curvature_update_period, inverse_update_period,
        weight_decay, memory_limit_bytes, grafting, grafting_beta_2, grafting_epsilon: as for
            :class:`~keras_tnt.TNT` (grafting: per variable, kernel and bias apart).
        max_factor_dim: the widest layer side (kernel input rows without the bias row, or
            outputs) that gets a full factor; a wider side gets a diagonal one (see the module
            notes). Default 4096: every layer of the paper's models, VGG16's 4096-wide
            classifier included, keeps full factors. None: no bound.
        factor_overrides: ``{pattern: kind}`` per layer: the first pattern found
            (``re.search``) in the path of a factored layer's kernel or bias sets its kind,
            ``"full"``, ``"diagonal"`` (both factors) or ``"none"`` (the plain momentum step
            for its variables). A pattern that matches no variable, or that asks ``"full"`` or
            ``"diagonal"`` of variables of layers KFAC does not factor only, is an error.
        split_preconditioner: as for :class:`~keras_tnt.TNT`. Split, a layer
            (kernel and bias) is one unit: its owner replica refreshes both factors' inverses
            and computes the direction ``A⁻¹ M G⁻¹``. The factors themselves are sums over each
            replica's own examples, so they are never redundant work.
        **kwargs: every base keyword of ``keras.optimizers.Optimizer``.

    KFAC needs the model's layers: compile a :class:`keras_tnt.FisherModel` with it (it calls
    :meth:`register_layers`). A layer whose kernel or bias gradient is not finite keeps its
    weights for that step (the finite gradients of the layer still enter the momentum). A
    variable whose gradient is ``None`` (or which is not passed to ``apply``) keeps its momentum
    and its weights; the layer's other variable still takes its part of the layer's direction.
    """

    curvature_inputs = "layers"
    _curvature_words = CurvatureWords(
        "layer_statistics", "(inputs, preactivation_gradients) pair", "layers", "factored layer"
    )
    # The optimizer-wide counters (skipped updates, failed inversions and the three of the
    # base); each layer's count is in the plan entry of its kernel.
    _optimizer_counters = 5
    # The factors are folded at every t % T1 == 0, t = 0 after a warm start included.
    _warm_start_serves_first_step = False

    def __init__(
        self,
        learning_rate=3e-3,
        damping: float = 0.3,
        momentum: float = 0.9,
        statistics_decay: float = 0.9,
        curvature_update_period: int = 1,
        inverse_update_period: int = 20,
        weight_decay: float | None = None,
        split_preconditioner: bool | None = None,
        max_factor_dim: int | None = _plan.DEFAULT_MAX_FACTOR_DIM,
        factor_overrides: dict | None = None,
        memory_limit_bytes: int | None = None,
        name=None,
        **kwargs,
    ):
        if "empirical_fisher" in kwargs:
            raise TypeError(
                "KFAC takes its factors from the layers' inputs and the pre-activation "
                "gradients of sampled labels; `empirical_fisher` is not one of its arguments."
            )
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
            name=name,
            **kwargs,
        )
        self._layers = None

    # ---------------------------------------------------------------- layers

    def register_layers(self, model) -> None:
        """Tells the optimizer which model it trains (FisherModel.compile calls this)."""
        if self.built:
            return
        self._layers = _layers.trainable_layers(model)

    @property
    def blocks(self) -> list[LayerBlock]:
        """The Kronecker-factored layers, in the order of :meth:`update_curvature`'s input."""
        self._require_built("blocks")
        return list(self._blocks)

    @property
    def unfactored_layers(self) -> dict[str, str]:
        """Layers with trainable weights that take the plain momentum step, and why."""
        self._require_built("unfactored_layers")
        return dict(self._unfactored)

    def _find_blocks(self, var_list):
        if self._layers is None:
            raise ValueError(
                "KFAC factors each layer's Fisher block from its input activations and "
                "pre-activation gradients, so it needs the model's layers: train with "
                "`keras_tnt.FisherModel` (or `keras_tnt.FisherModel.from_model(model)`), whose "
                "compile() registers them, or call `optimizer.register_layers(model)` before "
                "building it."
            )
        return _layers.find_blocks(
            self._layers, var_list, self.factor_overrides, self.max_factor_dim
        )

    # ------------------------------------------------------------------ plan

    def _plan_entries(self, var_list) -> list[dict]:
        """Per variable in build order, with KFAC's layer view: a factored layer's kernel entry
        has ``modes`` ``(d_in + 1, d_out)`` (the sizes of ``A`` with the bias row, and ``G``;
        ``d_in`` without a bias), ``factors`` ``"full"`` or ``"diagonal"`` for ``A`` and ``G``,
        ``layer`` and ``state_bytes`` with the layer's factors and inverses; its bias entry has
        no modes and a ``note`` naming the kernel whose factors it shares. Other variables: no
        modes, the plain momentum step. Needs the model's layers (:meth:`register_layers`)."""
        blocks, _ = self._find_blocks(var_list)
        counter = itemsize(backend.count_dtype())
        entries = []
        for var in var_list:
            path = variable_path(var)
            override = first_override(self.factor_overrides, [path])
            shape = tuple(int(d) for d in var.shape)
            entries.append(
                {
                    "variable": path,
                    "shape": shape,
                    "modes": (),
                    "factors": [],
                    "override": override if override == "none" else None,
                    # momentum
                    "state_bytes": math.prod(shape) * itemsize(var.dtype),
                }
            )
        for block in blocks:
            kernel = entries[block.kernel_index]
            sizes = (block.input_size, block.output_size)
            numbers = sum(d if diag else d * d for d, diag in zip(sizes, block.diagonal))
            size = itemsize(statistics_dtype(var_list[block.kernel_index].dtype))
            kernel.update(
                modes=sizes,
                factors=["diagonal" if diag else "full" for diag in block.diagonal],
                override=block.override,
                layer=block.layer.name,
                note=f"A x G of layer {block.layer.name}",
            )
            # factors and inverses, and the layer's count of batches folded
            kernel["state_bytes"] += 2 * numbers * size + counter
            if block.bias_index is not None:
                entries[block.bias_index].update(
                    override=block.override,
                    layer=block.layer.name,
                    note=f"in the factors of {kernel['variable']}",
                )
        return entries

    def _check_plan(self, var_list) -> list[dict]:
        blocks, _ = self._find_blocks(var_list)
        factored = {variable_path(var_list[i]) for b in blocks for i in b.indices}
        for pattern, kind in self.factor_overrides.items():
            matched = [variable_path(v) for v in var_list if re.search(pattern, variable_path(v))]
            if kind != "none" and matched and not any(p in factored for p in matched):
                raise ValueError(
                    f"`factor_overrides[{pattern!r}] = {kind!r}`: KFAC factors Dense and "
                    f"Conv2D layers only, and the variables this pattern matches "
                    f"({', '.join(matched[:4])}{', ...' if len(matched) > 4 else ''}) belong to "
                    "none of them."
                )
        return super()._check_plan(var_list)

    # ------------------------------------------------------------------ slots

    def build(self, var_list):
        if self.built:
            return
        super().build(var_list)
        if self._unfactored:
            listed = ", ".join(f"{k} ({v})" for k, v in self._unfactored.items())
            warnings.warn(
                f"KFAC: {len(self._unfactored)} layer(s) are not Kronecker-factored and take the "
                f"plain momentum step: {listed}.",
                stacklevel=2,
            )

    def _create_slots(self, var_list, entries):
        del entries
        start = len(self.variables)
        self._momenta = [self.add_variable_from_reference(v, "momentum") for v in var_list]
        self._kept_in_place(start)
        # 0.2 and 0.3 kept a skipped counter per variable here.
        for _ in var_list:
            self._legacy("sum", "skipped")
        self._legacy("sum", "failed")
        self._add_step_counters()
        self._build_counters()
        self._blocks, reasons = self._find_blocks(var_list)
        self._unfactored = _layers.unfactored_layers(self._layers, var_list, self._blocks, reasons)
        self._factors = []
        self._factor_inverses = []
        for b, block in enumerate(self._blocks):
            start = len(self.variables)
            sdtype = statistics_dtype(var_list[block.kernel_index].dtype)
            name = block.layer.name
            shapes = [
                (d,) if diag else (d, d)
                for d, diag in zip((block.input_size, block.output_size), block.diagonal)
            ]
            self._factors.append(
                [
                    self.add_variable(shape, dtype=sdtype, name=f"{name}_factor_{f}")
                    for shape, f in zip(shapes, "AG")
                ]
            )
            self._factor_inverses.append(
                [
                    self.add_variable(shape, dtype=sdtype, name=f"{name}_inverse_{f}")
                    for shape, f in zip(shapes, "AG")
                ]
            )
            # 0.2 and 0.3 kept the layer's count here, and a flag between the updates of its
            # kernel and bias (always 0 since a layer moves as one unit).
            self._kept_in_place(start)
            self._legacy("into", "factor_counts", b)
            self._legacy("zero")
        # Batches folded into each layer's factors (the first one sets them).
        self._block_counts = self._add_counts(len(self._blocks), "factor_counts")

    # ------------------------------------------------------------- read-outs

    def factor_count(self, layer) -> int:
        """How many batches have been folded into the factors of one factored layer."""
        return int(self._block_counts.numpy()[self._block_index(layer)])

    def factors(self, layer) -> list:
        """The factors ``[A, G]`` of a factored layer."""
        return list(self._factors[self._block_index(layer)])

    def factor_inverses(self, layer) -> list:
        """The damped inverses ``[(A + √λ I)^-1, (G + √λ I)^-1]`` of a factored layer."""
        return list(self._factor_inverses[self._block_index(layer)])

    def _block_index(self, layer):
        self._require_built("factors")
        for b, block in enumerate(self._blocks):
            if block.layer is layer:
                return b
        raise ValueError(f"Layer {layer.name!r} is not Kronecker-factored by this optimizer.")

    # ------------------------------------------------------------- curvature

    def update_curvature(self, layer_statistics, layers=None, condition=None) -> None:
        """Folds one batch into the factors.

        ``layer_statistics`` holds, for each layer of ``layers`` (any subset of the factored
        layers, :attr:`blocks`; default: all of them, in that order), the pair ``(inputs,
        preactivation_gradients)``: the layer's input and the gradient of the (scaled, as for
        ``apply``) batch-mean loss at sampled labels with respect to its pre-activation output.
        A ``None`` pair, or a layer left out, keeps its factors. A layer's first batch sets its
        factors; later ones take the moving average.
        """
        self._fold(layer_statistics, layers, warm_start=False, condition=condition)

    def accumulate_curvature(self, layer_statistics, layers=None) -> None:
        """Warm start: the running mean of the factors of every batch so far."""
        self._fold(layer_statistics, layers, warm_start=True)

    def _fold(self, layer_statistics, layers, warm_start, condition=None):
        self._require_built("update_curvature")
        present = self._align(layer_statistics, layers)
        self._curvature_source = True
        if not present:
            return
        blocks = [b for b, _ in present]
        replicas = backend.num_replicas()

        def contributions():
            # Unnormalised sums and this replica's example count, all-reduced together (one
            # batch of collectives, in the same order on every replica), then divided.
            out = []
            for b, (a, s) in present:
                block = self._blocks[b]
                sdtype = statistics_dtype(self._trainable_variables[block.kernel_index].dtype)
                if self.loss_scale_factor is not None:
                    s = s / self.loss_scale_factor
                sum_a, sum_g, count = _layer_sums(block, a, s, sdtype, replicas)
                out += [sum_a, sum_g]
            return out + [ops.cast(count, out[0].dtype)]

        if condition is not None:  # nothing computed (or all-reduced zeros) when not due
            shapes = [tuple(f.shape) for b in blocks for f in self._factors[b]]
            dtypes = [f.dtype for b in blocks for f in self._factors[b]]
            local = ops.cond(
                condition,
                contributions,
                lambda: (
                    [ops.zeros(s, dtype=d) for s, d in zip(shapes, dtypes)]
                    + [ops.zeros((), dtype=dtypes[0])]
                ),
            )
        else:
            local = contributions()

        def fold(sums, gate):
            total = ops.maximum(sums[-1], ops.ones((), dtype=sums[-1].dtype))
            factors = [f / ops.cast(total, f.dtype) for f in sums[:-1]]
            slots = [(b, self._factors[b]) for b in blocks]
            values = [factors[2 * k : 2 * k + 2] for k in range(len(blocks))]
            self._average_into(self._block_counts, slots, lambda: values, factors, gate, warm_start)

        backend.fold_across_replicas(local, self._curvature_updates, fold, condition=condition)

    def _curvature_slots(self):
        return len(self._blocks)

    def _curvature_index(self, layer):
        return self._block_index(layer)

    # ------------------------------------------------------------------ step

    def _units(self):
        """Each factored layer's variables, then each other variable (plain momentum)."""
        blocked = {i for block in self._blocks for i in block.indices}
        singles = [(i,) for i in range(len(self._trainable_variables)) if i not in blocked]
        return [block.indices for block in self._blocks] + singles

    def _unit_costs(self):
        costs = [
            _replicas.layer_cost(b.input_size, b.output_size, b.diagonal) for b in self._blocks
        ]
        return costs + [0] * (len(self._units()) - len(self._blocks))

    def _unit_preconditioners(self, u):
        return self._factor_inverses[u] if u < len(self._blocks) else []

    def _refresh_due(self):
        """``(t <= T2 and t % T1 == 0) or t % T2 == 0`` (bool tensor)."""
        t = self.iterations
        early = ops.logical_and(
            t <= self.inverse_update_period, ops.equal(t % self.curvature_update_period, 0)
        )
        return ops.logical_or(early, ops.equal(t % self.inverse_update_period, 0))

    def _refresh_variables(self, u):
        return self._factors[u]

    def _refresh_inputs(self, u, values):
        """Layer ``u``'s factors ``A`` and ``G``."""
        return [(f, None) for f in values]

    def _transform(self, values, parameter):
        """``(F + √λ I)^-1`` of a batch of factors."""
        # convert_to_tensor, not ops.cast: a float32 detour.
        root = ops.convert_to_tensor(math.sqrt(self.damping), dtype=values.dtype)
        return kronecker.damped_inverses(values, root, diagonal=len(values.shape) == 2)

    def _directions(self, u, momenta, preconditioners):
        """``A⁻¹ [M_W; m_b] G⁻¹`` of layer ``u``, from the members' new momenta and the slots
        of the others (a variable without a gradient still shapes the layer's direction)."""
        block = self._blocks[u]
        inverse_a, inverse_g = preconditioners

        def momentum_of(i):
            return momenta[i] if i in momenta else ops.convert_to_tensor(self._momenta[i])

        kernel = self._trainable_variables[block.kernel_index]
        sdtype = statistics_dtype(kernel.dtype)
        rows = [
            ops.reshape(ops.cast(momentum_of(block.kernel_index), sdtype), (-1, block.output_size))
        ]
        if block.bias_index is not None:
            m_bias = momentum_of(block.bias_index)
            rows.append(ops.reshape(ops.cast(m_bias, sdtype), (1, block.output_size)))
        stacked = ops.concatenate(rows, axis=0) if len(rows) > 1 else rows[0]
        # A diagonal factor (a vector) scales the rows (A) or the columns (G).
        if block.diagonal[0]:
            direction = inverse_a[:, None] * stacked
        else:
            direction = ops.matmul(inverse_a, stacked)
        if block.diagonal[1]:
            direction = direction * inverse_g[None, :]
        else:
            direction = ops.matmul(direction, inverse_g)
        kernel_rows = block.input_size - (0 if block.bias_index is None else 1)
        directions = {block.kernel_index: ops.reshape(direction[:kernel_rows], kernel.shape)}
        if block.bias_index is not None:
            directions[block.bias_index] = direction[kernel_rows]
        return directions
