r"""Shampoo (Gupta, Koren & Singer, 2018) as the TNT paper ran it as a baseline.

Shampoo is :class:`~keras_tnt.TNT` with the empirical Fisher (statistics from the ordinary
minibatch gradient ``g``) and a different preconditioner: for a tensor with ``k`` modes

.. math::

    P_i = (H_i + \varepsilon I)^{-1/(2k)},\qquad
    W \leftarrow W (1 - \alpha\lambda) - \alpha\, m \times_1 P_1 \times_2 \cdots \times_k P_k

with no trace normalisation (docs/algorithm.md §3). The momentum, the moving average and warm start
of the statistics and the refresh schedule are TNT's. The roots (``p = 2k``; 1-D tensors:
``p = 2``) come from an eigendecomposition on a CPU
(:func:`keras_tnt.kronecker.inverse_pth_root_eigh`) and from the coupled Newton iteration of the
authors' release (:func:`keras_tnt.kronecker.inverse_pth_root`) on accelerators; ``root_method``
chooses.

Example::

    import keras, keras_tnt
    model.compile(optimizer=keras_tnt.Shampoo(learning_rate=3e-4, damping=3e-4), loss=...)
    model.fit(dataset, epochs=10)  # any keras.Model: no Fisher training step is needed
"""

from __future__ import annotations

import keras
from keras import ops

from keras_tnt import _checks
from keras_tnt import backend
from keras_tnt import kronecker
from keras_tnt.tnt import TNT

ROOT_METHODS = ("auto", "eigh", "newton")


@keras.saving.register_keras_serializable(package="keras_tnt")
class Shampoo(TNT):
    """Shampoo with TNT's momentum, statistics and refresh schedule.

    Args:
        learning_rate: ``α``. Default 3e-4, the paper's best Shampoo value on the MNIST
            autoencoder.
        damping: ``ε`` > 0 added to every statistic before the root. Default 3e-4 (MNIST
            autoencoder).
        momentum, statistics_decay, curvature_update_period, inverse_update_period,
        weight_decay, grafting, grafting_beta_2, grafting_epsilon: as for
            :class:`~keras_tnt.TNT` (``grafting="adam"`` is how Distributed Shampoo is
            usually run: Shampoo's direction, Adam's per-tensor step length).
        refresh_at_inverse_period_only: if True, the roots are refreshed only when
            ``t % T2 == 0`` (what the authors' release does for Shampoo on the autoencoders);
            otherwise TNT's schedule (every ``T1`` steps while ``t < T2``, then every ``T2``).
        root_method: how the roots are computed: ``"eigh"`` (eigendecomposition),
            ``"newton"`` (the coupled Newton iteration of the authors' release, stopped at
            ``max|M - I| <= 1e-6``), or ``"auto"`` (default): ``"newton"`` when a GPU or TPU is
            visible, else ``"eigh"`` (8x faster on a CPU at the same accuracy; see
            benchmarks/shampoo_roots.py). Both give the root to float round-off; the two runs
            differ by it.
        **kwargs: every base keyword of ``keras.optimizers.Optimizer``.

    The statistics always come from the gradients given to ``apply``; a warm start
    (``accumulate_curvature`` / ``keras_tnt.WarmStart`` on a ``FisherModel``) still works. A root
    whose iteration does not give a finite result keeps the previous root and is counted in
    :attr:`failed_inversions`. :meth:`inverses` returns the roots ``P_i``.
    """

    _carries_directions = False  # no damped factor of a root to carry a direction with
    _normalizes = False  # the roots of the statistics themselves

    def __init__(
        self,
        learning_rate=3e-4,
        damping: float = 3e-4,
        momentum: float = 0.9,
        statistics_decay: float = 0.9,
        curvature_update_period: int = 1,
        inverse_update_period: int = 20,
        weight_decay: float | None = None,
        refresh_at_inverse_period_only: bool = False,
        root_method: str = "auto",
        name=None,
        **kwargs,
    ):
        if "empirical_fisher" in kwargs:
            raise TypeError(
                "Shampoo always takes its statistics from the gradients given to `apply`; "
                "`empirical_fisher` is not one of its arguments."
            )
        _checks.flag("refresh_at_inverse_period_only", refresh_at_inverse_period_only)
        _checks.one_of("root_method", root_method, ROOT_METHODS)
        super().__init__(
            learning_rate=learning_rate,
            damping=damping,
            momentum=momentum,
            statistics_decay=statistics_decay,
            curvature_update_period=curvature_update_period,
            inverse_update_period=inverse_update_period,
            weight_decay=weight_decay,
            empirical_fisher=True,
            name=name,
            **kwargs,
        )
        self.refresh_at_inverse_period_only = refresh_at_inverse_period_only
        self.root_method = root_method

    @property
    def resolved_root_method(self) -> str:
        """``"eigh"`` or ``"newton"``: what ``root_method`` means on this machine."""
        if self.root_method != "auto":
            return self.root_method
        return "newton" if backend.has_accelerator() else "eigh"

    def _refresh_due(self):
        if self.refresh_at_inverse_period_only:
            t = self.iterations
            return ops.equal(t % ops.cast(self.inverse_update_period, t.dtype), 0)
        return super()._refresh_due()

    def _factor_parameter(self, modes):
        """The order ``p = 2k`` of a tensor's roots (its factors' buffers are per order)."""
        return 2 * len(modes)

    def _refresh_inputs(self, u, values):
        """Tensor ``u``'s statistics ``H_i``, each with the order ``p = 2k`` of its root."""
        p = self._factor_parameter(self._modes[u])
        return [(h, p) for h in values]

    def _transform(self, values, p):
        """The roots ``P_i = (H_i + εI)^(-1/p)`` of a batch of statistics."""
        damping = ops.convert_to_tensor(self.damping, dtype=values.dtype)
        if len(values.shape) == 2:  # diagonal factors
            return kronecker.diagonal_inverse_pth_root(values, p, damping)
        if self.resolved_root_method == "eigh":
            return kronecker.inverse_pth_roots_eigh(values, p, damping)
        # The Newton iteration stops per matrix: one loop each.
        roots = [kronecker.inverse_pth_root(h, p, damping) for h in ops.unstack(values)]
        return ops.stack([r for r, _ in roots]), ops.stack([ok for _, ok in roots])

    def get_config(self):
        config = super().get_config()
        config.pop("empirical_fisher", None)
        config["refresh_at_inverse_period_only"] = self.refresh_at_inverse_period_only
        config["root_method"] = self.root_method
        return config
