r"""KFAC (Martens & Grosse, 2015; Grosse & Martens, 2016) as the TNT paper ran it as a baseline.

KFAC approximates the Fisher block of a whole layer, kernel and bias together, by ``A ⊗ G``:
``A`` from the layer's input activations (with a column of ones for the bias) and ``G`` from the
gradients of the sampled-label loss with respect to its pre-activation outputs
(algorithm.md §3). For a batch of ``N`` inputs ``a_n`` and pre-activation gradients ``s_n`` of the
batch-mean loss, summed over the ``P`` spatial positions of a convolution (im2col patches replace
``a``):

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
``diag(A)`` = the mean of ``a²`` per input (the bias's entry is 1) or ``diag(G)``, damped by the
same ``√λ``; ``(diag(A) + √λ)^{-1}`` then scales the rows of ``[M_W; m_b]`` and
``(diag(G) + √λ)^{-1}`` its columns. A 10,000-class output layer keeps a full ``A`` and a diagonal
``G``. ``factor_overrides`` picks per layer (the pattern is searched in the paths of the layer's
kernel and bias): ``"full"``, ``"diagonal"`` (both factors) or ``"none"`` (plain momentum).

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

import dataclasses
import math
import re
import warnings

import keras
from keras import ops

from keras_tnt import backend
from keras_tnt import kronecker
from keras_tnt._capture import capture_layers  # noqa: F401 (part of the KFAC API)
from keras_tnt.tnt import TNT
from keras_tnt.tnt import _itemsize
from keras_tnt.tnt import slot_prefix
from keras_tnt.tnt import statistics_dtype


@dataclasses.dataclass
class LayerBlock:
    """One Kronecker-factored layer: which optimizer variables it owns and its factor sizes."""

    layer: keras.layers.Layer
    kind: str  # "dense" or "conv2d"
    kernel_index: int
    bias_index: int | None
    input_size: int  # rows of the factor A (with the bias's ones column)
    output_size: int  # rows of the factor G
    diagonal: tuple[bool, bool] = (False, False)  # A, G kept as their diagonals
    override: str | None = None  # the kind a factor_overrides pattern set

    @property
    def indices(self) -> tuple[int, ...]:
        if self.bias_index is None:
            return (self.kernel_index,)
        return (self.kernel_index, self.bias_index)


def _kernel_variable(layer):
    kernel = getattr(layer, "_kernel", None)
    return kernel if kernel is not None else getattr(layer, "kernel", None)


def _path(variable) -> str:
    return variable.path if hasattr(variable, "path") else str(variable.name)


def _why_not_factored(layer) -> str | None:
    """None if KFAC can factor ``layer``, else the reason it takes the plain momentum step."""
    if type(layer) not in (keras.layers.Dense, keras.layers.Conv2D):
        return "not a Dense or Conv2D layer"
    if getattr(layer, "lora_enabled", False):
        return "LoRA is enabled"
    if getattr(layer, "quantization_mode", None):
        return "the layer is quantized"
    if isinstance(layer, keras.layers.Conv2D) and getattr(layer, "groups", 1) != 1:
        return "grouped convolution"
    kernel = _kernel_variable(layer)
    if kernel is None or not getattr(kernel, "trainable", False):
        return "its kernel is not trainable"
    bias = getattr(layer, "bias", None)
    if bias is not None and not bias.trainable:
        return "its bias is not trainable"
    return None


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
    """``(A, G)`` of one layer for one batch (algorithm.md §3).

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
class KFAC(TNT):
    """KFAC for Dense and Conv2D layers, with TNT's momentum, statistics and API.

    Args:
        learning_rate: ``α``. Default 3e-3, the paper's best KFAC value on the MNIST autoencoder.
        damping: ``λ`` > 0; ``√λ I`` is added to each of the two factors. Default 0.3 (MNIST
            autoencoder; the paper's CIFAR runs used 0.03).
        momentum, statistics_decay, curvature_update_period, inverse_update_period,
        weight_decay, memory_limit_bytes: as for :class:`~keras_tnt.TNT`.
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
    # TNT's three optimizer-wide counters and KFAC's one `failed_inversions` counter.
    _optimizer_counters = 4

    def __init__(
        self,
        learning_rate=3e-3,
        damping: float = 0.3,
        momentum: float = 0.9,
        statistics_decay: float = 0.9,
        curvature_update_period: int = 1,
        inverse_update_period: int = 20,
        weight_decay: float | None = None,
        name=None,
        **kwargs,
    ):
        kwargs.pop("empirical_fisher", None)
        super().__init__(
            learning_rate=learning_rate,
            damping=damping,
            momentum=momentum,
            statistics_decay=statistics_decay,
            curvature_update_period=curvature_update_period,
            inverse_update_period=inverse_update_period,
            weight_decay=weight_decay,
            name=name,
            **kwargs,
        )
        self._layers = None

    # ---------------------------------------------------------------- layers

    def register_layers(self, model) -> None:
        """Tells the optimizer which model it trains (FisherModel.compile calls this)."""
        if self.built:
            return
        self._layers = [
            layer
            for layer in model._flatten_layers(include_self=False, recursive=True)
            if layer.trainable_weights
        ]

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
        """``(blocks, reasons)``: the layers of ``var_list`` KFAC factors (with the kind of each
        factor) and, by layer id, why each other layer takes the plain momentum step. Allocates
        nothing."""
        if self._layers is None:
            raise ValueError(
                "KFAC factors each layer's Fisher block from its input activations and "
                "pre-activation gradients, so it needs the model's layers: train with "
                "`keras_tnt.FisherModel` (or `keras_tnt.FisherModel.from_model(model)`), whose "
                "compile() registers them, or call `optimizer.register_layers(model)` before "
                "building it."
            )
        index = {id(v): i for i, v in enumerate(var_list)}
        blocks, reasons = [], {}
        for layer in self._layers:
            reason = _why_not_factored(layer)
            kernel = _kernel_variable(layer)
            if reason is None and id(kernel) not in index:
                reason = "its kernel is not among the optimized variables"
            bias = getattr(layer, "bias", None)
            if reason is None and bias is not None and id(bias) not in index:
                reason = "its bias is not among the optimized variables"
            override = None
            if reason is None:
                paths = [_path(v) for v in (kernel, bias) if v is not None]
                override = next(
                    (
                        kind
                        for pattern, kind in self.factor_overrides.items()
                        if any(re.search(pattern, p) for p in paths)
                    ),
                    None,
                )
                if override == "none":
                    reason = "factor_overrides chose 'none'"
            if reason is not None:
                reasons[id(layer)] = reason
                continue
            shape = tuple(kernel.shape)
            rows, outputs = math.prod(shape[:-1]), shape[-1]
            if override is not None:
                diagonal = (override == "diagonal",) * 2
            else:
                bound = self.max_factor_dim
                diagonal = tuple(bound is not None and d > bound for d in (rows, outputs))
            blocks.append(
                LayerBlock(
                    layer=layer,
                    kind="dense" if isinstance(layer, keras.layers.Dense) else "conv2d",
                    kernel_index=index[id(kernel)],
                    bias_index=None if bias is None else index[id(bias)],
                    input_size=rows + (0 if bias is None else 1),
                    output_size=outputs,
                    diagonal=diagonal,
                    override=override,
                )
            )
        return blocks, reasons

    def plan(self, var_list=None) -> list[dict]:
        """The preconditioner of every variable, before anything is allocated.

        As :meth:`TNT.plan`, per variable in build order, with KFAC's layer view: a factored
        layer's kernel entry has ``modes`` ``(d_in + 1, d_out)`` (the sizes of ``A`` with the
        bias row, and ``G``; ``d_in`` without a bias), ``factors`` ``"full"`` or ``"diagonal"``
        for ``A`` and ``G``, ``layer`` and ``state_bytes`` with the layer's factors and
        inverses; its bias entry has no modes and a ``note`` naming the kernel whose factors it
        shares. Other variables: no modes, the plain momentum step. Needs the model's layers
        (:meth:`register_layers`) to plan before the build.
        """
        if var_list is None:
            self._require_built("plan")
            var_list, blocks = self._trainable_variables, self._blocks
        else:
            blocks, _ = self._find_blocks(var_list)
        counter = _itemsize(backend.count_dtype())
        entries = []
        for var in var_list:
            path = _path(var)
            override = next(
                (k for p, k in self.factor_overrides.items() if re.search(p, path)), None
            )
            shape = tuple(int(d) for d in var.shape)
            entries.append(
                {
                    "variable": path,
                    "shape": shape,
                    "modes": (),
                    "factors": [],
                    "override": override if override == "none" else None,
                    # momentum and the skipped-step counter
                    "state_bytes": math.prod(shape) * _itemsize(var.dtype) + counter,
                }
            )
        for block in blocks:
            kernel = entries[block.kernel_index]
            sizes = (block.input_size, block.output_size)
            numbers = sum(d if diag else d * d for d, diag in zip(sizes, block.diagonal))
            itemsize = _itemsize(statistics_dtype(var_list[block.kernel_index].dtype))
            kernel.update(
                modes=sizes,
                factors=["diagonal" if diag else "full" for diag in block.diagonal],
                override=block.override,
                layer=block.layer.name,
                note=f"A x G of layer {block.layer.name}",
            )
            # factors and inverses, and the layer's two counters (batches folded, step flag)
            kernel["state_bytes"] += 2 * numbers * itemsize + 2 * counter
            if block.bias_index is not None:
                entries[block.bias_index].update(
                    override=block.override,
                    layer=block.layer.name,
                    note=f"in the factors of {kernel['variable']}",
                )
        return entries

    def _check_plan(self, var_list) -> list[dict]:
        blocks, _ = self._find_blocks(var_list)
        factored = {_path(var_list[i]) for b in blocks for i in b.indices}
        for pattern, kind in self.factor_overrides.items():
            matched = [_path(v) for v in var_list if re.search(pattern, _path(v))]
            if kind != "none" and matched and not any(p in factored for p in matched):
                raise ValueError(
                    f"`factor_overrides[{pattern!r}] = {kind!r}`: KFAC factors Dense and "
                    f"Conv2D layers only, and the variables this pattern matches "
                    f"({', '.join(matched[:4])}{', ...' if len(matched) > 4 else ''}) belong to "
                    "none of them."
                )
        return super()._check_plan(var_list)

    def build(self, var_list):
        if self.built:
            return
        entries = self._check_plan(var_list)  # raises before any allocation
        del entries
        # TNT's per-variable state (momentum, counters) without its per-mode slots: KFAC keeps
        # per-layer factors instead.
        keras.optimizers.Optimizer.build(self, var_list)
        self._modes = [() for _ in var_list]
        self._diagonal = [() for _ in var_list]
        self._momenta = [self.add_variable_from_reference(v, "momentum") for v in var_list]
        self._statistics = [[] for _ in var_list]
        self._inverses = [[] for _ in var_list]
        self._skipped = []
        for var in var_list:
            prefix = slot_prefix(var)
            self._skipped.append(self._add_counter(f"{prefix}_skipped"))
        self._failed = [self._add_counter("failed_inversions")]
        self._build_counters()

        index = {id(v): i for i, v in enumerate(var_list)}
        self._blocks, reasons = self._find_blocks(var_list)
        self._block_of = {}
        for b, block in enumerate(self._blocks):
            for i in block.indices:
                self._block_of[i] = b
        # Report each variable no block owns under the innermost layer holding it (a container
        # whose sublayers are all factored is not reported).
        unowned = {i for i in range(len(var_list)) if i not in self._block_of}
        self._unfactored = {}
        for layer in reversed(self._layers):  # sublayers come after their parents
            mine = {index[id(w)] for w in layer.trainable_weights if id(w) in index} & unowned
            if mine:
                reason = reasons.get(id(layer), "not a Dense or Conv2D layer")
                self._unfactored[layer.name] = f"{type(layer).__name__}: {reason}"
                unowned -= mine
        self._unfactored = dict(reversed(list(self._unfactored.items())))
        self._factors = []
        self._factor_inverses = []
        self._block_counts = []
        self._block_flags = []
        for block in self._blocks:
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
            # Batches folded into the layer's factors (the first one sets them).
            self._block_counts.append(self._add_counter(f"{name}_factor_count"))
            # Set by a member whose gradient was not finite this step; read by the last member.
            self._block_flags.append(self._add_counter(f"{name}_flag"))
        self._restore_pending()
        if self._unfactored:
            listed = ", ".join(f"{k} ({v})" for k, v in self._unfactored.items())
            warnings.warn(
                f"KFAC: {len(self._unfactored)} layer(s) are not Kronecker-factored and take the "
                f"plain momentum step: {listed}.",
                stacklevel=2,
            )

    # ------------------------------------------------------------- curvature

    def curvature_due(self):
        """``t % T1 == 0``, also at ``t = 0`` after a warm start (algorithm.md §3)."""
        self._require_built("curvature_due")
        t = self.iterations
        due = ops.equal(t % self.curvature_update_period, 0)
        if self.gradient_accumulation_steps:
            first_micro = ops.equal(self._iterations % self.gradient_accumulation_steps, 0)
            due = ops.logical_and(due, first_micro)
        return due

    def update_curvature(self, layer_statistics, layers=None, condition=None) -> None:
        """Folds one batch into the factors.

        ``layer_statistics`` holds, for each layer of ``layers`` (any subset of the factored
        layers, :attr:`blocks`; default: all of them, in that order), the pair ``(inputs,
        preactivation_gradients)``: the layer's input and the gradient of the (scaled, as for
        ``apply``) batch-mean loss at sampled labels with respect to its pre-activation output.
        A ``None`` pair, or a layer left out, keeps its factors. A layer's first batch sets its
        factors; later ones take the moving average.
        """
        self._fold_layers(layer_statistics, layers, warm_start=False, condition=condition)

    def accumulate_curvature(self, layer_statistics, layers=None) -> None:
        """Warm start: the running mean of the factors of every batch so far."""
        self._fold_layers(layer_statistics, layers, warm_start=True)

    def _fold_layers(self, layer_statistics, layers, warm_start, condition=None):
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
            slots = [(self._block_counts[b], self._factors[b]) for b in blocks]
            values = [factors[2 * k : 2 * k + 2] for k in range(len(blocks))]
            self._average_into(slots, lambda: values, factors, gate, warm_start)

        backend.fold_across_replicas(local, self._curvature_updates, fold, condition=condition)

    _curvature_words = (
        "layer_statistics",
        "(inputs, preactivation_gradients) pair",
        "layers",
        "factored layer",
    )

    def _curvature_slots(self):
        return len(self._blocks)

    def _curvature_index(self, layer):
        return self._block_index(layer)

    def factor_count(self, layer) -> int:
        """How many batches have been folded into the factors of one factored layer."""
        return int(self._block_counts[self._block_index(layer)].numpy())

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

    def statistics(self, variable) -> list:
        raise NotImplementedError("KFAC keeps per-layer factors: use `factors(layer)`.")

    def inverses(self, variable) -> list:
        raise NotImplementedError("KFAC keeps per-layer factors: use `factor_inverses(layer)`.")

    def statistics_count(self, variable) -> int:
        raise NotImplementedError("KFAC keeps per-layer factors: use `factor_count(layer)`.")

    # ------------------------------------------------------------------ step

    def apply(self, grads, trainable_variables=None):
        self._build_for_apply(trainable_variables)
        if self.built:
            variables = (
                self._trainable_variables
                if trainable_variables is None
                else list(trainable_variables)
            )
            if len(variables) == len(grads):
                self._check_variables_are_known(variables)
                # A layer moves when the update of its last variable with a gradient runs: keep
                # the build order, and note which of each layer's variables take part.
                pairs = sorted(zip(grads, variables), key=lambda p: self._get_variable_index(p[1]))
                grads = [g for g, _ in pairs]
                trainable_variables = [v for _, v in pairs]
                present = [self._get_variable_index(v) for g, v in pairs if g is not None]
                members = {}
                for i in present:
                    if i in self._block_of:
                        members.setdefault(self._block_of[i], []).append(i)
                # Plain Python state of this trace, not optimizer state to track or save.
                object.__setattr__(self, "_moving", {b: tuple(m) for b, m in members.items()})
        return super().apply(grads, trainable_variables)

    # A layer's refresh runs in its last variable's update_step (see :meth:`update_step`).
    _groups_refreshes = False

    def _moving_members(self, b):
        """The variables of block ``b`` that have a gradient in the current ``apply``."""
        moving = self.__dict__.get("_moving")
        if moving is None:  # update_step called without `apply`: all of them
            return self._blocks[b].indices
        return moving.get(b, ())

    def update_step(self, gradient, variable, learning_rate):
        idx = self._get_variable_index(variable)
        if idx not in self._block_of:
            super().update_step(gradient, variable, learning_rate)  # plain momentum (no modes)
            return
        b = self._block_of[idx]
        dtype = variable.dtype
        gradient = ops.cast(gradient, dtype)
        finite = ops.all(ops.isfinite(gradient))
        m = self._momenta[idx]
        momentum = ops.convert_to_tensor(self.momentum, dtype=dtype)
        current = ops.convert_to_tensor(m)
        self.assign(m, ops.where(finite, momentum * current + gradient, current))
        not_finite = ops.cast(ops.logical_not(finite), backend.count_dtype())
        self.assign_add(self._skipped[idx], not_finite)
        flag = ops.maximum(ops.convert_to_tensor(self._block_flags[b]), not_finite)
        members = self._moving_members(b)
        if not (members and idx == max(members)):
            self.assign(self._block_flags[b], flag)
            return
        ok = ops.equal(flag, 0)
        learning_rate = ops.cast(learning_rate, dtype)
        # Branches return values; the assignments follow (JAX's stateless mode needs this).
        weights, inverses, failed = self._block_step_or_keep(ok, b, learning_rate, members)
        for i, value in zip(members, weights):
            self.assign(self._trainable_variables[i], value)
        for inverse_var, value in zip(self._factor_inverses[b], inverses):
            self.assign(inverse_var, value)
        self.assign_add(self._failed[0], failed)
        self.assign(self._block_flags[b], ops.zeros((), backend.count_dtype()))

    def _block_step_or_keep(self, ok, b, learning_rate, members, momenta=None):
        """:meth:`_block_step` when ``ok``, else the members' weights and the inverses as they
        are (and no failure): ``(weights, inverses, failed)`` as values."""

        def keep():
            return (
                [ops.convert_to_tensor(self._trainable_variables[i]) for i in members],
                [ops.convert_to_tensor(v) for v in self._factor_inverses[b]],
                ops.zeros((), backend.count_dtype()),
            )

        return ops.cond(ok, lambda: self._block_step(b, learning_rate, members, momenta), keep)

    def _refresh_due(self):
        """``(t <= T2 and t % T1 == 0) or t % T2 == 0`` (bool tensor)."""
        t = self.iterations
        early = ops.logical_and(
            t <= self.inverse_update_period, ops.equal(t % self.curvature_update_period, 0)
        )
        return ops.logical_or(early, ops.equal(t % self.inverse_update_period, 0))

    def _new_block_inverses(self, b):
        """``(inverses, failed)``: ``(A + √λ I)^-1, (G + √λ I)^-1`` of block ``b``."""
        damping = math.sqrt(self.damping)
        failed = ops.zeros((), backend.count_dtype())
        out = []
        for factor, inverse_var in zip(self._factors[b], self._factor_inverses[b]):
            value = ops.convert_to_tensor(factor)
            root = ops.convert_to_tensor(damping, dtype=value.dtype)  # not ops.cast: float32
            inverse, ok = kronecker.damped_inverse(value, root)
            out.append(ops.where(ok, inverse, ops.convert_to_tensor(inverse_var)))
            failed = failed + ops.cast(ops.logical_not(ok), backend.count_dtype())
        return out, failed

    def _block_step(self, b, learning_rate, members, momenta=None):
        """``(new weights of members, inverses, failed)``: the layer's step.

        The direction comes from all the layer's momenta (``momenta``: values by variable index
        that replace the slots'); only ``members`` move.
        """
        momenta = momenta or {}

        def momentum_of(i):
            return momenta[i] if i in momenta else ops.convert_to_tensor(self._momenta[i])

        block = self._blocks[b]
        current = [ops.convert_to_tensor(v) for v in self._factor_inverses[b]]
        failed = ops.zeros((), backend.count_dtype())
        (inverse_a, inverse_g), failed = ops.cond(
            self._refresh_due(),
            lambda: self._new_block_inverses(b),
            lambda: (current, failed),
        )
        kernel = self._trainable_variables[block.kernel_index]
        sdtype = statistics_dtype(kernel.dtype)
        m_kernel = momentum_of(block.kernel_index)
        rows = [ops.reshape(ops.cast(m_kernel, sdtype), (-1, block.output_size))]
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
        weights = []
        for i in members:
            var = self._trainable_variables[i]
            w = ops.convert_to_tensor(var)
            if self.weight_decay is not None and self._use_weight_decay(var):
                wd = ops.convert_to_tensor(self.weight_decay, dtype=var.dtype)
                w = w - w * wd * learning_rate
            weights.append(w - learning_rate * ops.cast(directions[i], var.dtype))
        return weights, [inverse_a, inverse_g], failed

    # ------------------------------------------------------ split across replicas

    def _units(self):
        """Units of split work: each factored layer's variables, then each other variable."""
        blocked = {i for block in self._blocks for i in block.indices}
        singles = [(i,) for i in range(len(self._trainable_variables)) if i not in blocked]
        return [block.indices for block in self._blocks] + singles

    def _unit_costs(self):
        # A layer: the refresh (din³ + dout³) and the direction A⁻¹ M G⁻¹ (din·dout·(din + dout));
        # a diagonal side costs d and din·dout instead. Its factors are sums over this replica's
        # own examples, not redundant work. Others: 0.
        costs = []
        for block in self._blocks:
            cost = 0
            for d, diag in zip((block.input_size, block.output_size), block.diagonal):
                other = block.input_size * block.output_size
                cost += d + other if diag else d**3 + other * d
            costs.append(cost)
        return costs + [0] * (len(self._units()) - len(self._blocks))

    def _backend_update_step(self, grads, trainable_variables, learning_rate):
        owners = self._owners()
        if owners is None:
            return super()._backend_update_step(grads, trainable_variables, learning_rate)
        position = {self._get_variable_index(v): k for k, v in enumerate(trainable_variables)}
        # This apply's units: the members that have a gradient, as update_step moves them.
        units, unit_owners = [], []
        for u, members in enumerate(self._units()):
            present = tuple(i for i in members if i in position)
            if present:
                units.append((u, present))
                unit_owners.append(owners[u])

        def compute(k, reduced):
            u, present = units[k]
            if u >= len(self._blocks):
                (i,) = present
                return self._update_values(
                    i, reduced[position[i]], self._trainable_variables[i], learning_rate
                )
            return self._block_values(
                u, present, [reduced[position[i]] for i in present], learning_rate
            )

        def zeros(k):
            u, present = units[k]
            if u >= len(self._blocks):
                (i,) = present
                return self._zero_update_values(i, self._trainable_variables[i])
            zero = ops.zeros((), backend.count_dtype())
            variables = [self._trainable_variables[i] for i in present]
            return (
                [ops.zeros(v.shape, v.dtype) for v in variables],
                [ops.zeros(v.shape, self._momenta[i].dtype) for i, v in zip(present, variables)],
                [ops.zeros(a.shape, a.dtype) for a in self._factor_inverses[u]],
                zero,
                [zero for _ in present],
            )

        def assign(values):
            for (u, present), value in zip(units, values):
                if u >= len(self._blocks):
                    self._assign_update(present[0], self._trainable_variables[present[0]], value)
                    continue
                weights, momenta, inverses, failed, skipped = value
                for i, w, m, nf in zip(present, weights, momenta, skipped):
                    self.assign(self._momenta[i], m)
                    self.assign_add(self._skipped[i], nf)
                    self.assign(self._trainable_variables[i], w)
                for inverse_var, inverse in zip(self._factor_inverses[u], inverses):
                    self.assign(inverse_var, inverse)
                self.assign_add(self._failed[0], failed)

        backend.update_from_owners(
            grads, unit_owners, compute, zeros, assign, self._curvature_updates
        )

    def _block_values(self, b, members, gradients, learning_rate):
        """What :meth:`update_step` computes for layer ``b`` over its ``members``, as values:
        ``(weights, momenta, inverses, failed, skipped per member)``."""
        momenta, skipped = {}, []
        flag = ops.convert_to_tensor(self._block_flags[b])
        for i, gradient in zip(members, gradients):
            dtype = self._trainable_variables[i].dtype
            gradient = ops.cast(gradient, dtype)
            finite = ops.all(ops.isfinite(gradient))
            current = ops.convert_to_tensor(self._momenta[i])
            momentum = ops.convert_to_tensor(self.momentum, dtype=dtype)
            momenta[i] = ops.where(finite, momentum * current + gradient, current)
            skipped.append(ops.cast(ops.logical_not(finite), backend.count_dtype()))
            flag = ops.maximum(flag, skipped[-1])
        ok = ops.equal(flag, 0)
        learning_rate = ops.cast(learning_rate, self._trainable_variables[max(members)].dtype)
        weights, inverses, failed = self._block_step_or_keep(ok, b, learning_rate, members, momenta)
        n = backend.count_dtype()
        refresh = ops.logical_and(ok, self._refresh_due())
        backend.count_replica_work(
            self, [ops.cast(refresh, n) * 2, ops.zeros((), n), ops.cast(ok, n)]
        )
        return weights, [momenta[i] for i in members], inverses, failed, skipped

    # ---------------------------------------------------------------- config

    def get_config(self):
        config = super().get_config()
        config.pop("empirical_fisher", None)
        return config
