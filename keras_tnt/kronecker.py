r"""Kronecker-factored curvature math shared by every optimizer of keras_tnt.

A trainable tensor ``W`` is viewed as a ``k``-mode tensor of sizes ``d_1..d_k`` (see
:func:`tensor_modes`). Its curvature block is approximated by ``U_1 ⊗ ... ⊗ U_k`` with one
``d_i x d_i`` factor per mode. This module holds the pieces every optimizer needs, written with
``keras.ops`` so that they run on any Keras backend:

* :func:`mode_contractions`: ``G^(i) = mat_i(G) mat_i(G)^T`` for every mode ``i``.
* :func:`normalize_factors`: eq. (5) of Ren & Goldfarb (2021), which gives every factor the same
  mean eigenvalue ``c`` while keeping the trace of the Kronecker product
  (:func:`normalization_divisors`: its divisors, for a buffer of factors).
* :func:`damped_inverse`: ``(U + εI)^{-1}`` through a Cholesky factorisation, with a flag that
  says whether it succeeded.
* :func:`precondition`: ``M x_1 A_1 x_2 ... x_k A_k``, which equals
  ``(A_1 ⊗ ... ⊗ A_k) vec(M)`` (Proposition 1 of the paper) for symmetric ``A_i``.
* :func:`damped_inverses`, :func:`inverse_pth_roots_eigh`, :func:`batch_mode_contractions`,
  :func:`batch_precondition`: the same for a batch of equal-size factors or tensors at once.
* :func:`row_contractions`, :func:`precondition_rows`: the same for a tensor that is zero
  outside a few rows of a diagonal first mode (an Embedding's gradient).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from keras import ops

from keras_tnt import backend


def tensor_modes(shape: Sequence[int]) -> tuple[int, ...]:
    """The mode sizes under which a tensor of ``shape`` gets Kronecker factors.

    * scalar: ``()`` (no factor; the optimizer takes a plain momentum step)
    * 1-D (bias, BatchNorm scale/offset): ``(d,)``, one full factor
    * 2-D (Dense kernel ``(in, out)``) and 3-D (Conv1D kernel ``(k, in, out)``): unchanged
    * 4-D and more (Conv2D ``(kh, kw, in, out)``, Conv3D): every leading spatial axis merged into
      one mode, giving ``(kh*kw, in, out)``, the setting of the paper's CIFAR runs.
    """
    shape = tuple(int(d) for d in shape)
    if any(d <= 0 for d in shape):
        raise ValueError(f"Every dimension of a preconditioned tensor must be > 0; got {shape}.")
    if len(shape) <= 3:
        return shape
    return (math.prod(shape[:-2]),) + shape[-2:]


def _gram(x, transpose: bool):
    """``x @ x^T`` (or ``x^T @ x`` when ``transpose``).

    Only half of the result is independent, but on TensorFlow's CPU kernels a block-triangular
    product (3 of 4 blocks) measured slower than one full product for the paper's shapes.
    """
    if transpose:
        return ops.matmul(ops.transpose(x), x)
    return ops.matmul(x, ops.transpose(x))


def _diagonal_flags(modes, diagonal):
    if diagonal is None:
        return (False,) * len(modes)
    diagonal = tuple(bool(f) for f in diagonal)
    if len(diagonal) != len(modes):
        raise ValueError(f"`diagonal` needs one flag per mode {tuple(modes)}; got {diagonal}.")
    return diagonal


def mode_contractions(g, modes: Sequence[int], diagonal: Sequence[bool] | None = None) -> list:
    """``[mat_i(G) mat_i(G)^T for i in modes]``: each a symmetric ``d_i x d_i`` matrix.

    ``g`` may have any shape with ``prod(shape) == prod(modes)``; it is viewed in ``modes``.
    Cost: ``d_i * prod(modes)`` multiply-adds per mode. A mode flagged in ``diagonal`` gets the
    diagonal of that contraction only, a vector of ``d_i`` sums of squares (``prod(modes)``
    multiply-adds).
    """
    modes = tuple(modes)
    diagonal = _diagonal_flags(modes, diagonal)
    k = len(modes)
    if k == 0:
        return []
    if k == 1:
        v = ops.reshape(g, (modes[0], 1))
        if diagonal[0]:
            return [ops.square(v[:, 0])]
        return [ops.matmul(v, ops.transpose(v))]
    g = ops.reshape(g, modes)
    size = math.prod(modes)
    out = []
    for i, d in enumerate(modes):
        if diagonal[i]:
            axes = tuple(j for j in range(k) if j != i)
            out.append(ops.sum(ops.square(g), axis=axes))
        elif i == 0:
            out.append(_gram(ops.reshape(g, (d, size // d)), transpose=False))
        elif i == k - 1:
            out.append(_gram(ops.reshape(g, (size // d, d)), transpose=True))
        else:
            perm = (i,) + tuple(j for j in range(k) if j != i)
            x = ops.reshape(ops.transpose(g, perm), (d, size // d))
            out.append(_gram(x, transpose=False))
    return out


def batch_mode_contractions(g, modes: Sequence[int], diagonal: Sequence[bool] | None = None):
    """:func:`mode_contractions` of a batch ``g`` of ``n`` equal-shape tensors at once: one
    batched product per mode for all ``n`` (``[(n, d_i, d_i) or (n, d_i) per mode]``)."""
    modes = tuple(modes)
    diagonal = _diagonal_flags(modes, diagonal)
    k = len(modes)
    n = g.shape[0]
    size = math.prod(modes)
    g = ops.reshape(g, (n,) + modes)
    out = []
    for i, d in enumerate(modes):
        if diagonal[i]:
            out.append(ops.sum(ops.square(g), axis=tuple(j + 1 for j in range(k) if j != i)))
            continue
        if i == k - 1:
            x = ops.reshape(g, (n, size // d, d))
            out.append(ops.matmul(ops.swapaxes(x, 1, 2), x))
            continue
        if i == 0:
            x = ops.reshape(g, (n, d, size // d))
        else:
            perm = (0, i + 1) + tuple(j + 1 for j in range(k) if j != i)
            x = ops.reshape(ops.transpose(g, perm), (n, d, size // d))
        out.append(ops.matmul(x, ops.swapaxes(x, 1, 2)))
    return out


def batch_precondition(m, factors: Sequence, modes: Sequence[int]):
    """:func:`precondition` of a batch ``m`` of ``n`` equal-shape tensors, each with its own
    factors (``factors[i]``: ``(n, d_i, d_i)``, or ``(n, d_i)`` for diagonal ones)."""
    modes = tuple(modes)
    if not modes:
        return m
    shape = m.shape
    n = shape[0]
    size = math.prod(modes)
    x = m
    for d, a in zip(modes, factors):
        x = ops.swapaxes(ops.reshape(x, (n, d, size // d)), 1, 2)
        x = x * a[:, None, :] if len(a.shape) == 2 else ops.matmul(x, a)
    return ops.reshape(x, shape)


def row_contractions(rows, values, modes: Sequence[int], diagonal: Sequence[bool]) -> list:
    """:func:`mode_contractions` of a tensor that is zero outside the rows ``rows`` (distinct
    indices of its first axis) and ``values`` there (``(n,) + modes[1:]``), whose first mode
    has a diagonal factor: ``n`` rows' work instead of ``modes[0]`` (an Embedding's gradient
    touches the batch's tokens only). Equal to the dense contractions up to round-off (the
    untouched rows add exact zeros).
    """
    modes = tuple(modes)
    diagonal = _diagonal_flags(modes, diagonal)
    if len(modes) < 2 or not diagonal[0]:
        raise ValueError(
            f"Row contractions need a diagonal first mode and at least two modes; got modes "
            f"{modes} with diagonal flags {diagonal}."
        )
    k = len(modes)
    out = []
    for i, d in enumerate(modes):
        if i == 0:
            sums = ops.sum(ops.square(values), axis=tuple(range(1, k)))
            out.append(backend.scatter_rows(ops.zeros((d,), values.dtype), rows, sums))
        elif diagonal[i]:
            out.append(ops.sum(ops.square(values), axis=tuple(j for j in range(k) if j != i)))
        elif i == k - 1:
            out.append(_gram(ops.reshape(values, (-1, d)), transpose=True))
        else:
            out.append(_gram(ops.reshape(ops.moveaxis(values, i, 0), (d, -1)), transpose=False))
    return out


def precondition_rows(values, rows, factors: Sequence, modes: Sequence[int]):
    """The rows ``rows`` of :func:`precondition` of a tensor that is zero outside them (values
    ``(n,) + modes[1:]``), for a diagonal first factor (which keeps rows apart): the product
    over ``n`` rows, not ``modes[0]``."""
    modes = tuple(modes)
    k = len(modes)
    first = ops.take(factors[0], rows, axis=0)
    x = values * ops.reshape(first, (-1,) + (1,) * (k - 1))
    for a in factors[1:]:
        # Contract axis 1 and append the result as the last axis, as `precondition` does.
        if len(a.shape) == 1:
            x = ops.moveaxis(x * ops.reshape(a, (1, -1) + (1,) * (k - 2)), 1, -1)
        else:
            x = ops.tensordot(x, a, axes=[[1], [0]])
    return x


def _trace(h):
    """The trace of a factor: a full ``d x d`` matrix, or a diagonal one kept as a vector.

    The sum of the diagonal (``keras.ops.trace`` on TensorFlow masks the whole matrix with a
    traced identity: about 25 graph operations against 2)."""
    return ops.sum(h if len(h.shape) == 1 else ops.diagonal(h))


def normalize_factors(statistics: Sequence, modes: Sequence[int]) -> list:
    r"""Eq. (5): ``U_i = H_i / (c^{k-1} prod_{j!=i} d_j)`` with ``c = (tr(H_1)/prod d)^{1/k}``.

    For ``k = 1`` the factor is returned unchanged. When ``tr(H_1) = 0`` (no statistics yet)
    every factor is returned as zeros rather than 0/0; a NaN trace gives NaN factors (their
    refresh fails and keeps the previous inverses). A diagonal factor (a vector) has the
    trace of its sum and is scaled the same way, so that the normalisation, and with it the
    meaning of the damping, is the one of the full factor whose diagonal it keeps.
    """
    k = len(modes)
    if k <= 1:
        return list(statistics)
    divisors = normalization_divisors(_trace(statistics[0]), modes)
    return [h / divisor for h, divisor in zip(statistics, divisors)]


def normalization_divisors(trace, modes: Sequence[int]) -> list:
    """The divisors ``c^{k-1} prod_{j!=i} d_j`` of eq. (5), one per mode, from ``trace``, the
    trace of ``H_1`` (a scalar tensor), for ``k >= 2`` modes: :func:`normalize_factors` divides
    each statistic by its divisor (a zero trace gives infinite divisors, so zero factors)."""
    k = len(modes)
    size = math.prod(modes)
    dtype = trace.dtype
    # convert_to_tensor, not cast: ops.cast(1/3, "float64") goes through float32.
    # Constants, not casts of Python integers (a cast is an operation per tensor); c^1 is c.
    c = ops.power(
        trace / ops.convert_to_tensor(float(size), dtype=dtype),
        ops.convert_to_tensor(1.0 / k, dtype=dtype),
    )
    power = c if k == 2 else ops.power(c, ops.convert_to_tensor(float(k - 1), dtype=dtype))
    # A zero trace (no statistics) gives zeros: h / inf, h being zero there (as every
    # denominator c^{k-1} prod_{j!=i} d_j is positive exactly when c^{k-1} is).
    power = ops.where(power > 0, power, ops.convert_to_tensor(float("inf"), dtype=dtype))
    return [power * ops.convert_to_tensor(float(size // d), dtype=dtype) for d in modes]


def damped_inverse(u, damping):
    """``(u + damping I)^{-1}`` for symmetric PSD ``u`` via Cholesky, and whether it is finite.

    Returns ``(inverse, ok)``. When the factorisation fails (the damped matrix is not positive
    definite in floating point, or ``u`` holds NaN/inf) ``ok`` is False and ``inverse`` must not
    be used; callers keep their previous inverse. A vector ``u`` is a diagonal factor. One
    matrix is a batch of one of :func:`damped_inverses` (the same kernels, so the same numbers).
    """
    inverses, ok = damped_inverses(ops.expand_dims(u, 0), damping, diagonal=len(u.shape) == 1)
    return inverses[0], ok[0]


def damped_inverses(factors, damping, diagonal: bool = False):
    """:func:`damped_inverse` of every matrix of a batch ``(n, d, d)`` at once (``diagonal``:
    of every diagonal factor of a batch ``(n, d)``); ``ok`` has shape ``(n,)``.

    One batched Cholesky factorisation and two batched triangular solves for all ``n``, as
    Distributed Shampoo batches its equal-size blocks: ``n`` small factors cost about one
    operation's overhead, not ``n``. Each matrix is factorised on its own (the batch only
    shares the call), so a member's result does not depend on the others.
    """
    factors = ops.convert_to_tensor(factors)
    dtype = factors.dtype
    if isinstance(damping, (int, float)):
        damping = ops.convert_to_tensor(damping, dtype=dtype)
    damping = ops.cast(damping, dtype)
    if diagonal:
        damped = factors + damping
        inverse = 1 / damped
        ok = ops.logical_and(ops.all(ops.isfinite(inverse), axis=-1), ops.all(damped > 0, axis=-1))
        return inverse, ok
    n, d = factors.shape[0], factors.shape[-1]
    eye = ops.eye(d, dtype=dtype)
    damped = factors + damping * eye
    lower = backend.cholesky(damped)  # NaN, not an exception, on failure
    # Two triangular solves, L X = I then L^T A = X (cheaper here than L^{-T} L^{-1} by matmul),
    # then the symmetric part: the mode products rely on A = A^T.
    lower_inv = ops.solve_triangular(lower, ops.broadcast_to(eye, (n, d, d)), lower=True)
    inverse = ops.solve_triangular(ops.swapaxes(lower, -1, -2), lower_inv, lower=False)
    inverse = 0.5 * (inverse + ops.swapaxes(inverse, -1, -2))
    # Both: an infinite statistic gives a finite L^{-1} (1/inf = 0) from an infinite L.
    ok = ops.logical_and(
        ops.all(ops.isfinite(lower), axis=(-2, -1)),
        ops.all(ops.isfinite(lower_inv), axis=(-2, -1)),
    )
    return inverse, ok


def precondition(m, factors: Sequence, modes: Sequence[int]):
    """``M x_1 A_1 x_2 ... x_k A_k`` for symmetric ``A_i``, returned in the shape of ``m``.

    Each mode product contracts the leading axis and appends the result as the trailing axis,
    so after ``k`` products the axes are back in order and no transpose is ever materialised.
    Cost: ``(d_1 + ... + d_k) * prod(d)`` multiply-adds.
    """
    modes = tuple(modes)
    if not modes:
        return m
    shape = m.shape
    x = m
    size = math.prod(modes)
    for d, a in zip(modes, factors):
        x = ops.transpose(ops.reshape(x, (d, size // d)))
        # A diagonal factor (a vector) scales its mode: the product with diag(a).
        x = x * a if len(a.shape) == 1 else ops.matmul(x, a)
    return ops.reshape(x, shape)


def _matrix_power(x, p: int):
    """``x^p`` for a Python integer ``p >= 1`` by repeated squaring (unrolled in the graph)."""
    result = None
    base = x
    while p:
        if p & 1:
            result = base if result is None else ops.matmul(result, base)
        p >>= 1
        if p:
            base = ops.matmul(base, base)
    return result


def inverse_pth_root(
    matrix,
    p: int,
    damping,
    max_iterations: int = 100,
    tolerance: float = 1e-6,
    return_info: bool = False,
):
    r"""``(matrix + damping I)^{-1/p}`` for symmetric PSD ``matrix`` by a coupled Newton iteration.

    The iteration of Guo & Higham (2006), as in Shampoo's implementations: with
    ``A = matrix + damping I`` and ``z = (1 + p) / (2 ||A||_F)``, start from ``X_0 = z^{1/p} I``,
    ``M_0 = z A`` and repeat

    .. math::

        T = ((p + 1) I - M_j) / p,\qquad X_{j+1} = X_j T,\qquad M_{j+1} = T^p M_j

    (``M_j = X_j^p A`` throughout, so ``M_j → I`` and ``X_j → A^{-1/p}``) until
    ``max|M_j - I| <= tolerance``, at most ``max_iterations`` times. If an iterate's error grows
    by more than 1.2x over the previous one, the iteration stops and keeps the previous iterate.
    Written as one ``ops.while_loop`` in the matrix's dtype, so it runs eagerly, in a
    ``tf.function`` and under XLA.

    Returns ``(root, ok)``; ``ok`` is False when ``root`` is not finite or ``A`` holds NaN/inf
    (or ``damping = 0`` with a zero matrix): callers then keep their previous root. With
    ``return_info=True`` it returns ``(root, ok, iterations, error)`` where ``error`` is
    ``max|M - I|`` of the returned iterate.
    """
    if isinstance(p, bool) or not isinstance(p, int) or p < 1:
        raise ValueError(f"`p` must be an integer >= 1; received p={p!r}.")
    matrix = ops.convert_to_tensor(matrix)
    dtype = matrix.dtype
    d = matrix.shape[-1]
    eye = ops.eye(d, dtype=dtype)
    if isinstance(damping, (int, float)):
        damping = ops.convert_to_tensor(damping, dtype=dtype)
    a = matrix + ops.cast(damping, dtype) * eye
    # convert_to_tensor, not cast: ops.cast(1/3, "float64") goes through float32.
    inv_p = ops.convert_to_tensor(1.0 / p, dtype=dtype)
    tol = ops.convert_to_tensor(tolerance, dtype=dtype)
    growth = ops.convert_to_tensor(1.2, dtype=dtype)
    # ||A||_F scaled by max|A| so that it cannot overflow for large finite statistics.
    scale = ops.max(ops.abs(a))
    safe_scale = ops.where(scale > 0, scale, ops.ones_like(scale))
    norm = safe_scale * ops.sqrt(ops.sum(ops.square(a / safe_scale)))
    z = ops.convert_to_tensor((1.0 + p) / 2.0, dtype=dtype) / norm
    m0 = z * a
    x0 = ops.power(z, inv_p) * eye
    err0 = ops.max(ops.abs(m0 - eye))

    def cond(i, m, x, x_prev, err, err_prev, run):
        return ops.logical_and(ops.logical_and(i < max_iterations, err > tol), run)

    def body(i, m, x, x_prev, err, err_prev, run):
        t = ops.convert_to_tensor(p + 1.0, dtype=dtype) * eye - m
        t = t * inv_p
        new_m = ops.matmul(_matrix_power(t, p), m)
        new_x = ops.matmul(x, t)
        new_err = ops.max(ops.abs(new_m - eye))
        # NaN compares False, so a non-finite iterate also stops the loop on the previous one.
        new_run = new_err <= growth * err
        return i + 1, new_m, new_x, x, new_err, err, new_run

    state = (
        ops.convert_to_tensor(0, dtype="int32"),
        m0,
        x0,
        x0,
        err0,
        err0,
        ops.convert_to_tensor(True),
    )
    i, _, x, x_prev, err, err_prev, run = ops.while_loop(cond, body, state)
    root = ops.where(run, x, x_prev)
    error = ops.where(run, err, err_prev)
    # The exact root is symmetric; the mode products of `precondition` rely on it.
    root = 0.5 * (root + ops.transpose(root))
    # An infinite A gives z = 0 and a finite (zero) "root": not ok either.
    ok = ops.logical_and(ops.all(ops.isfinite(root)), ops.all(ops.isfinite(a)))
    ok = ops.logical_and(ok, ops.logical_and(ops.isfinite(z), z > 0))
    if return_info:
        return root, ok, i, error
    return root, ok


def inverse_pth_root_eigh(matrix, p: int, damping):
    r"""``(matrix + damping I)^{-1/p}`` for symmetric PSD ``matrix`` from its eigendecomposition.

    ``A = V diag(λ) V^T``, root ``V diag(max(λ, damping)^{-1/p}) V^T``: the clamp only removes
    round-off, since ``matrix + damping I`` has no eigenvalue below ``damping``. Returns
    ``(root, ok)`` as :func:`inverse_pth_root` does (``ok`` False for NaN/inf input, whose
    decomposition is not attempted, or a non-finite root, e.g. ``damping = 0`` and a singular
    matrix).

    Why it is Shampoo's default on a CPU (benchmarks/shampoo_roots.py, the MNIST autoencoder's
    24 statistics after 20 steps, ε = 3e-4, float32, 2 cores): all roots in 0.84 s against
    7.0 s for the coupled Newton iteration (8-19 iterations of 3-4 products each), with the same
    accuracy against float64 roots (largest relative Frobenius error 1.2e-3 against 8.6e-4).
    A 1000 x 1000 eigendecomposition costs about 18 products there; on accelerators products are
    far cheaper than eigendecompositions and Newton is the better choice.
    """
    root, ok = inverse_pth_roots_eigh(ops.expand_dims(ops.convert_to_tensor(matrix), 0), p, damping)
    return root[0], ok[0]


def inverse_pth_roots_eigh(matrices, p: int, damping):
    """:func:`inverse_pth_root_eigh` of every matrix of a batch ``(n, d, d)`` at once (one
    batched eigendecomposition); ``ok`` has shape ``(n,)``."""
    if isinstance(p, bool) or not isinstance(p, int) or p < 1:
        raise ValueError(f"`p` must be an integer >= 1; received p={p!r}.")
    matrices = ops.convert_to_tensor(matrices)
    dtype = matrices.dtype
    eye = ops.eye(matrices.shape[-1], dtype=dtype)
    if isinstance(damping, (int, float)):
        damping = ops.convert_to_tensor(damping, dtype=dtype)
    damping = ops.cast(damping, dtype)
    a = matrices + damping * eye
    finite = ops.all(ops.isfinite(a), axis=(-2, -1))
    # TensorFlow's decomposition raises on NaN; such a statistic keeps its previous root.
    values, vectors = ops.eigh(ops.where(finite[:, None, None], a, eye))
    values = ops.maximum(values, damping)
    scale = ops.power(values, ops.convert_to_tensor(-1.0 / p, dtype=dtype))
    # One product per matrix: a batched product's rounding can depend on the batch's size, and
    # a root must not depend on which other roots were refreshed with it.
    scaled = ops.unstack(vectors * scale[:, None, :])
    root = ops.stack(
        [ops.matmul(a, ops.transpose(v)) for a, v in zip(scaled, ops.unstack(vectors))]
    )
    root = 0.5 * (root + ops.swapaxes(root, -1, -2))
    ok = ops.logical_and(finite, ops.all(ops.isfinite(root), axis=(-2, -1)))
    return root, ok


def diagonal_inverse_pth_root(h, p: int, damping):
    """``(h + damping)^{-1/p}`` elementwise for a diagonal statistic ``h`` (a vector), and
    whether it is finite (Shampoo's root of a diagonal factor). A batch ``(n, d)`` of them
    gives ``ok`` of shape ``(n,)``."""
    h = ops.convert_to_tensor(h)
    damped = h + ops.cast(damping, h.dtype)
    root = ops.power(damped, ops.convert_to_tensor(-1.0 / p, dtype=h.dtype))
    ok = ops.logical_and(ops.all(ops.isfinite(root), axis=-1), ops.all(damped > 0, axis=-1))
    return root, ok
