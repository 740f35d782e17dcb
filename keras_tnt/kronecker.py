r"""Kronecker-factored curvature math shared by every optimizer of keras_tnt.

A trainable tensor ``W`` is viewed as a ``k``-mode tensor of sizes ``d_1..d_k`` (see
:func:`tensor_modes`). Its curvature block is approximated by ``U_1 ⊗ ... ⊗ U_k`` with one
``d_i x d_i`` factor per mode. This module holds the pieces every optimizer needs, written with
``keras.ops`` so that they run on any Keras backend:

* :func:`mode_contractions`: ``G^(i) = mat_i(G) mat_i(G)^T`` for every mode ``i``.
* :func:`normalize_factors`: eq. (5) of Ren & Goldfarb (2021), which gives every factor the same
  mean eigenvalue ``c`` while keeping the trace of the Kronecker product.
* :func:`damped_inverse`: ``(U + εI)^{-1}`` through a Cholesky factorisation, with a flag that
  says whether it succeeded.
* :func:`precondition`: ``M x_1 A_1 x_2 ... x_k A_k``, which equals
  ``(A_1 ⊗ ... ⊗ A_k) vec(M)`` (Proposition 1 of the paper) for symmetric ``A_i``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import keras
from keras import ops


def _cholesky(x):
    """Lower Cholesky factor; NaN (never an exception) where the factorisation fails."""
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        # keras.ops.cholesky wraps this in check_numerics, which raises on failure.
        return tf.linalg.cholesky(x)
    return ops.cholesky(x)  # pragma: no cover - other backends


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


def mode_contractions(g, modes: Sequence[int]) -> list:
    """``[mat_i(G) mat_i(G)^T for i in modes]``: each a symmetric ``d_i x d_i`` matrix.

    ``g`` may have any shape with ``prod(shape) == prod(modes)``; it is viewed in ``modes``.
    Cost: ``d_i * prod(modes)`` multiply-adds per mode.
    """
    modes = tuple(modes)
    k = len(modes)
    if k == 0:
        return []
    if k == 1:
        v = ops.reshape(g, (modes[0], 1))
        return [ops.matmul(v, ops.transpose(v))]
    g = ops.reshape(g, modes)
    size = math.prod(modes)
    out = []
    for i, d in enumerate(modes):
        if i == 0:
            out.append(_gram(ops.reshape(g, (d, size // d)), transpose=False))
        elif i == k - 1:
            out.append(_gram(ops.reshape(g, (size // d, d)), transpose=True))
        else:
            perm = (i,) + tuple(j for j in range(k) if j != i)
            x = ops.reshape(ops.transpose(g, perm), (d, size // d))
            out.append(_gram(x, transpose=False))
    return out


def normalize_factors(statistics: Sequence, modes: Sequence[int]) -> list:
    r"""Eq. (5): ``U_i = H_i / (c^{k-1} prod_{j!=i} d_j)`` with ``c = (tr(H_1)/prod d)^{1/k}``.

    For ``k = 1`` the factor is returned unchanged. When ``tr(H_1) = 0`` (no statistics yet)
    every factor is returned as zeros rather than 0/0.
    """
    k = len(modes)
    if k <= 1:
        return list(statistics)
    size = math.prod(modes)
    h0 = statistics[0]
    dtype = h0.dtype
    trace = ops.trace(h0)
    # convert_to_tensor, not cast: ops.cast(1/3, "float64") goes through float32.
    c = ops.power(trace / ops.cast(size, dtype), ops.convert_to_tensor(1.0 / k, dtype=dtype))
    out = []
    for h, d in zip(statistics, modes):
        denom = ops.power(c, ops.cast(k - 1, dtype)) * ops.cast(size // d, dtype)
        safe = ops.where(denom > 0, denom, ops.ones_like(denom))
        out.append(ops.where(denom > 0, h / safe, ops.zeros_like(h)))
    return out


def damped_inverse(u, damping):
    """``(u + damping I)^{-1}`` for symmetric PSD ``u`` via Cholesky, and whether it is finite.

    Returns ``(inverse, ok)``. When the factorisation fails (the damped matrix is not positive
    definite in floating point, or ``u`` holds NaN/inf) ``ok`` is False and ``inverse`` must not
    be used; callers keep their previous inverse.
    """
    d = u.shape[-1]
    eye = ops.eye(d, dtype=u.dtype)
    if isinstance(damping, (int, float)):
        damping = ops.convert_to_tensor(damping, dtype=u.dtype)
    damped = u + ops.cast(damping, u.dtype) * eye
    lower = _cholesky(damped)
    # Two triangular solves, L X = I then L^T A = X (cheaper here than L^{-T} L^{-1} by matmul),
    # then the symmetric part: the mode products rely on A = A^T.
    lower_inv = ops.solve_triangular(lower, eye, lower=True)
    inverse = ops.solve_triangular(ops.transpose(lower), lower_inv, lower=False)
    inverse = 0.5 * (inverse + ops.transpose(inverse))
    # Both: an infinite statistic gives a finite L^{-1} (1/inf = 0) from an infinite L.
    ok = ops.logical_and(ops.all(ops.isfinite(lower)), ops.all(ops.isfinite(lower_inv)))
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
        x = ops.matmul(ops.transpose(ops.reshape(x, (d, size // d))), a)
    return ops.reshape(x, shape)
