"""keras_tnt.kronecker against dense NumPy references (float64, docs/algorithm.md §2 and §5)."""

import math
from functools import reduce

import numpy as np
import pytest

from keras_tnt import kronecker
from tests.conftest import BOTH_BACKENDS
from tests.conftest import compiled
from tests.conftest import tensor

pytestmark = BOTH_BACKENDS

RTOL = 1e-10


def _t(x):
    return tensor(x, "float64")


def _np(x):
    return np.asarray(x.numpy() if hasattr(x, "numpy") else x)


def _close(actual, expected, rtol=RTOL):
    """Relative agreement measured against the size of the expected array."""
    actual = _np(actual)
    expected = np.asarray(expected)
    assert actual.shape == expected.shape
    assert np.all(np.isfinite(actual))
    scale = max(np.max(np.abs(expected)), 1e-300)
    err = np.max(np.abs(actual - expected)) / scale if expected.size else 0.0
    assert err <= rtol, f"relative error {err:.3e} > {rtol:.1e}"


def _unfold_gram(g, i):
    """mat_i(G) mat_i(G)^T by moving axis i to the front (independent of the code's path)."""
    x = np.moveaxis(g, i, 0).reshape(g.shape[i], -1)
    return x @ x.T


def _random_spd(rng, d, low=0.5, high=3.0):
    q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    return (q * rng.uniform(low, high, d)) @ q.T


def _kron(factors):
    return reduce(np.kron, factors)


# ------------------------------------------------------------------------------ tensor_modes


@pytest.mark.parametrize(
    "shape, modes",
    [
        ((784, 1000), (784, 1000)),  # Dense kernel (in, out): 2 modes
        ((3, 3, 16, 32), (9, 16, 32)),  # Conv2D (kh, kw, in, out) -> (kh*kw, in, out)
        ((5, 8, 12), (5, 8, 12)),  # Conv1D (k, in, out) unchanged
        ((10,), (10,)),  # bias: one full factor
        ((), ()),  # scalar: no factor
        ((2, 3, 4, 5, 6), (24, 5, 6)),  # Conv3D: every leading spatial axis merged
        ((1, 1, 7, 3), (1, 7, 3)),  # 1x1 conv
    ],
)
def test_tensor_modes(shape, modes):
    got = kronecker.tensor_modes(shape)
    assert got == modes
    assert all(isinstance(d, int) for d in got)
    assert math.prod(got) == math.prod(shape)


@pytest.mark.backends("tensorflow")
def test_tensor_modes_accepts_tensor_shapes():
    import tensorflow as tf

    assert kronecker.tensor_modes(tf.TensorShape([3, 3, 4, 8])) == (9, 4, 8)
    assert kronecker.tensor_modes(np.zeros((2, 5)).shape) == (2, 5)


@pytest.mark.parametrize("shape", [(0,), (3, 0), (4, -1), (0, 3, 3, 2), (2, 2, 0, 4, 5)])
def test_tensor_modes_rejects_non_positive_dims(shape):
    with pytest.raises(ValueError, match="> 0"):
        kronecker.tensor_modes(shape)


# ------------------------------------------------------------------------ mode_contractions


@pytest.mark.parametrize(
    "shape",
    [
        (7,),
        (600,),  # one big mode (k = 1 is an outer product, no block path)
        (4, 3),
        (600, 7),  # big first mode: block-triangular path on the non-transposed side
        (7, 513),  # big, odd last mode: block path on the transposed side, uneven halves
        (3, 520, 5),  # big middle mode: transpose + block path
        (2, 3, 4),
        (2, 3, 4, 5),
        (3, 2, 512, 2),  # exactly the threshold, in an interior mode of a 4-mode tensor
    ],
)
def test_mode_contractions_match_unfoldings(shape):
    rng = np.random.default_rng(sum(shape))
    g = rng.standard_normal(shape)
    got = kronecker.mode_contractions(_t(g), shape)
    assert len(got) == len(shape)
    frob2 = np.sum(g * g)
    for i, c in enumerate(got):
        c = _np(c)
        expected = _unfold_gram(g, i)
        assert c.shape == (shape[i], shape[i])
        _close(c, expected)
        np.testing.assert_allclose(c, c.T, rtol=0, atol=1e-12 * np.max(np.abs(c)))
        np.testing.assert_allclose(np.trace(c), frob2, rtol=1e-12)


def test_mode_contractions_view_tensor_in_merged_modes():
    """A Conv2D kernel (kh, kw, in, out) is contracted as the 3-mode tensor (kh*kw, in, out)."""
    rng = np.random.default_rng(0)
    g = rng.standard_normal((3, 3, 4, 5))
    modes = kronecker.tensor_modes(g.shape)
    got = kronecker.mode_contractions(_t(g), modes)
    merged = g.reshape(modes)
    for i, c in enumerate(got):
        _close(c, _unfold_gram(merged, i))
    # The merged spatial mode differs from either single spatial mode's contraction.
    assert _np(got[0]).shape == (9, 9)


def test_mode_contractions_scalar_is_empty():
    assert kronecker.mode_contractions(_t(2.0), ()) == []


# ------------------------------------------------------------------------------ precondition


@pytest.mark.parametrize(
    "modes",
    [(6,), (4, 3), (5, 1), (2, 3, 4), (3, 4, 2, 3)],
)
def test_precondition_equals_explicit_kronecker_product(modes):
    rng = np.random.default_rng(len(modes) * 10 + modes[0])
    m = rng.standard_normal(modes)
    factors = [_random_spd(rng, d) for d in modes]
    got = kronecker.precondition(_t(m), [_t(a) for a in factors], modes)
    # Proposition 1: (A_1 ⊗ ... ⊗ A_k) vec(M) with the C-order (row-major) vec that matches
    # mat_1 / the mode products: the last mode varies fastest.
    expected = (_kron(factors) @ m.ravel()).reshape(modes)
    _close(got, expected)
    # Same as the sequence of mode products M x_1 A_1 ... x_k A_k written with tensordot.
    x = m
    for i, a in enumerate(factors):
        x = np.moveaxis(np.tensordot(a, x, axes=([1], [i])), 0, i)
    _close(got, x)


def test_precondition_keeps_shape_of_unmerged_conv_kernel():
    """A 4-D kernel preconditioned as (kh*kw, in, out) equals kron over (kh*kw, in, out)."""
    rng = np.random.default_rng(3)
    shape = (3, 2, 4, 5)
    modes = kronecker.tensor_modes(shape)
    assert modes == (6, 4, 5)
    m = rng.standard_normal(shape)
    factors = [_random_spd(rng, d) for d in modes]
    got = kronecker.precondition(_t(m), [_t(a) for a in factors], modes)
    assert tuple(got.shape) == shape
    expected = (_kron(factors) @ m.ravel()).reshape(shape)
    _close(got, expected)
    # Merging is only a view: with a spatial factor that is itself a Kronecker product
    # B_h ⊗ B_w, the merged (6, 4, 5) product equals the unmerged (3, 2, 4, 5) one.
    b_h, b_w = _random_spd(rng, 3), _random_spd(rng, 2)
    merged = [_t(np.kron(b_h, b_w)), _t(factors[1]), _t(factors[2])]
    unmerged = [_t(b_h), _t(b_w), _t(factors[1]), _t(factors[2])]
    _close(
        kronecker.precondition(_t(m), merged, modes),
        kronecker.precondition(_t(m), unmerged, shape),
    )


def test_precondition_does_not_depend_on_mode_order():
    """Keras (in, out) and PyTorch (out, in) layouts give the same (transposed) direction."""
    rng = np.random.default_rng(4)
    m = rng.standard_normal((5, 3))
    a_in, a_out = _random_spd(rng, 5), _random_spd(rng, 3)
    keras_layout = kronecker.precondition(_t(m), [_t(a_in), _t(a_out)], (5, 3))
    torch_layout = kronecker.precondition(_t(m.T), [_t(a_out), _t(a_in)], (3, 5))
    _close(keras_layout, _np(torch_layout).T)
    _close(keras_layout, a_in @ m @ a_out)  # 2 modes: A_1 M A_2 (A_2 symmetric)


def test_precondition_scalar_is_identity():
    m = _t(1.5)
    assert float(kronecker.precondition(m, [], ())) == 1.5


# -------------------------------------------------------------------------- normalize_factors


def _expected_normalized(stats, modes):
    k = len(modes)
    size = math.prod(modes)
    c = (np.trace(stats[0]) / size) ** (1.0 / k)
    return [h / (c ** (k - 1) * (size // d)) for h, d in zip(stats, modes, strict=True)], c


@pytest.mark.parametrize(
    "modes",
    [
        (4, 3),
        (600, 7),
        (3, 4, 2, 5),
        (2, 3, 4),
        (9, 4, 5),
    ],
)
def test_normalize_factors_equalises_mean_eigenvalue(modes):
    rng = np.random.default_rng(sum(modes))
    g = rng.standard_normal(modes) * 0.3
    stats = [_unfold_gram(g, i) for i in range(len(modes))]
    got = [_np(u) for u in kronecker.normalize_factors([_t(h) for h in stats], modes)]
    expected, c = _expected_normalized(stats, modes)
    k = len(modes)
    size = math.prod(modes)
    assert np.isclose(c, (np.sum(g * g) / size) ** (1.0 / k), rtol=1e-12)
    for u, e, d in zip(got, expected, modes, strict=True):
        _close(u, e)
        # eq. (5): every factor has mean eigenvalue c.
        np.testing.assert_allclose(np.trace(u) / d, c, rtol=RTOL)
    # tr(U_1 ⊗ ... ⊗ U_k) = prod tr(U_i) = c^k prod d_i = tr(H_1): the trace is preserved.
    np.testing.assert_allclose(np.prod([np.trace(u) for u in got]), np.trace(stats[0]), rtol=RTOL)
    if size <= 200:
        np.testing.assert_allclose(np.trace(_kron(got)), np.trace(stats[0]), rtol=RTOL)


@pytest.mark.parametrize(
    "modes",
    [
        (3, 4),
        (3, 4, 2, 2),
        (3, 4, 2),
    ],
)
def test_normalize_factors_uses_trace_of_first_statistic(modes):
    """Statistics with unequal traces (e.g. after float drift): the formula uses tr(H_1)."""
    rng = np.random.default_rng(11)
    stats = []
    for d in modes:
        x = rng.standard_normal((d, 2 * d))
        stats.append(x @ x.T)
    got = kronecker.normalize_factors([_t(h) for h in stats], modes)
    expected, _ = _expected_normalized(stats, modes)
    for u, e in zip(got, expected, strict=True):
        _close(u, e)


def test_normalize_factors_single_mode_returns_statistic_unchanged():
    rng = np.random.default_rng(12)
    x = rng.standard_normal((5, 5))
    h = x @ x.T * 7.0
    (u,) = kronecker.normalize_factors([_t(h)], (5,))
    np.testing.assert_array_equal(_np(u), h)


@pytest.mark.parametrize("modes", [(4, 3), (2, 3, 4)])
def test_normalize_factors_zero_statistics_give_zeros(modes):
    stats = [_t(np.zeros((d, d))) for d in modes]
    got = kronecker.normalize_factors(stats, modes)
    for u, d in zip(got, modes, strict=True):
        u = _np(u)
        assert u.shape == (d, d)
        assert np.all(np.isfinite(u))
        np.testing.assert_array_equal(u, 0.0)


# ---------------------------------------------------------------------------- damped_inverse


@pytest.mark.parametrize("d", [1, 2, 5, 40, 130])
def test_damped_inverse_matches_numpy(d):
    rng = np.random.default_rng(d)
    x = rng.standard_normal((d, d + 3))
    u = x @ x.T / d
    eps = 0.25  # exact in float32 (see test_damped_inverse_python_float_damping_is_float64)
    inverse, ok = kronecker.damped_inverse(_t(u), eps)
    assert bool(ok)
    expected = np.linalg.inv(u + eps * np.eye(d))
    _close(inverse, expected)
    inv = _np(inverse)
    np.testing.assert_allclose(inv, inv.T, rtol=0, atol=1e-12 * np.max(np.abs(inv)))


@pytest.mark.parametrize("d", [6, 50])
def test_damped_inverse_ill_conditioned_and_singular(d):
    rng = np.random.default_rng(100 + d)
    q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    # Eigenvalues from 1e2 down to 0 (rank-deficient); the damping makes it invertible with a
    # condition number of about 1e6.
    eig = np.concatenate([np.logspace(2, -8, d - 2), [0.0, 0.0]])
    u = (q * eig) @ q.T
    u = (u + u.T) / 2
    eps = 2.0**-13  # ~1.2e-4, exact in float32
    inverse, ok = kronecker.damped_inverse(_t(u), eps)
    assert bool(ok)
    damped = u + eps * np.eye(d)
    # Forward error is bounded by cond * machine epsilon ~ 1e-10 here.
    _close(inverse, np.linalg.inv(damped), rtol=1e-8)
    np.testing.assert_allclose(_np(inverse) @ damped, np.eye(d), rtol=0, atol=1e-9)


def test_damped_inverse_accepts_float64_tensor_damping():
    """What TNT passes: a float64 tensor, used at full precision (0.1 is not float32-exact)."""
    rng = np.random.default_rng(7)
    x = rng.standard_normal((6, 9))
    u = x @ x.T / 6
    inverse, ok = kronecker.damped_inverse(_t(u), _t(0.1))
    assert bool(ok)
    _close(inverse, np.linalg.inv(u + 0.1 * np.eye(6)))


def test_damped_inverse_python_float_damping_is_float64():
    rng = np.random.default_rng(7)
    x = rng.standard_normal((6, 9))
    u = x @ x.T / 6
    inverse, ok = kronecker.damped_inverse(_t(u), 0.1)
    assert bool(ok)
    _close(inverse, np.linalg.inv(u + 0.1 * np.eye(6)))


@pytest.mark.parametrize(
    "u, eps",
    [
        (np.array([[1.0, 2.0], [2.0, 1.0]]), 1e-3),  # indefinite: eigenvalues 3 and -1
        (np.array([[np.nan, 0.0], [0.0, 1.0]]), 0.1),  # NaN statistics
        (np.array([[np.inf, 0.0], [0.0, 1.0]]), 0.1),  # overflowed statistics
    ],
    ids=["indefinite", "nan", "inf"],
)
def test_damped_inverse_reports_failure(u, eps):
    _, ok = kronecker.damped_inverse(_t(u), eps)
    assert not bool(ok)


@pytest.mark.parametrize("jit_compile", [False, True], ids=["graph", "xla"])
def test_damped_inverse_reports_failure_in_graph(jit_compile):
    """In a compiled step, and under XLA (whose Cholesky gives NaN for an indefinite matrix,
    as TensorFlow's CPU and GPU kernels do), the failure is reported, not raised."""
    invert = compiled(lambda u: kronecker.damped_inverse(u, 1e-3), jit_compile=jit_compile)

    _, ok = invert(_t([[1.0, 2.0], [2.0, 1.0]]))
    assert not bool(ok)
    inverse, ok = invert(_t([[2.0, 1.0], [1.0, 2.0]]))
    assert bool(ok)
    _close(inverse, np.linalg.inv(np.array([[2.0, 1.0], [1.0, 2.0]]) + 1e-3 * np.eye(2)))
