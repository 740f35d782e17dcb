"""keras_tnt.Shampoo and kronecker.inverse_pth_root against NumPy (docs/algorithm.md §3)."""

import keras
import numpy as np
import pytest

import keras_tnt
from keras_tnt import backend
from keras_tnt import kronecker
from tests.conftest import BOTH_BACKENDS
from tests.conftest import compiled
from tests.conftest import compiled_step
from tests.conftest import tensor

pytestmark = BOTH_BACKENDS

# ------------------------------------------------------------------------- NumPy reference


def _spd(rng, n, cond):
    """A random symmetric positive-definite matrix with eigenvalues from 1 down to 1/cond."""
    q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    lam = np.logspace(0.0, -np.log10(cond), n) if n > 1 else np.ones(1)
    h = (q * lam) @ q.T
    return 0.5 * (h + h.T)


def _root(h, p, eps):
    """``(h + eps I)^(-1/p)`` through an eigendecomposition."""
    w, v = np.linalg.eigh(np.asarray(h, np.float64))
    return (v * (np.maximum(w, 0.0) + eps) ** (-1.0 / p)) @ v.T


def _rel(actual, expected):
    actual = np.asarray(actual, np.float64)
    assert np.all(np.isfinite(actual))
    return float(np.max(np.abs(actual - expected)) / np.max(np.abs(expected)))


def _modes(shape):
    """docs/algorithm.md §5: 1-3 dims unchanged, 4+ dims: the leading (spatial) axes merged."""
    shape = tuple(shape)
    return shape if len(shape) <= 3 else (int(np.prod(shape[:-2])),) + shape[-2:]


class RefShampoo:
    """docs/algorithm.md §3: TNT's schedule with statistics from g and P_i = (H_i + εI)^(-1/(2k)),
    for tensors of any number of modes, with TNT's warm start and decoupled weight decay."""

    def __init__(self, shapes, lr, eps, beta, rho, T1, T2, period_only, weight_decay=0.0):
        self.shapes = [tuple(s) for s in shapes]
        self.modes = [_modes(s) for s in self.shapes]
        self.lr, self.eps, self.beta, self.rho = lr, eps, beta, rho
        self.T1, self.T2, self.period_only = T1, T2, period_only
        self.wd = weight_decay
        self.m = [np.zeros(s) for s in self.shapes]
        self.H = [[np.zeros((d, d)) for d in m] for m in self.modes]
        self.P = [[np.zeros((d, d)) for d in m] for m in self.modes]
        self.t = 0
        self.count = 0
        self.warm = 0

    def refresh_due(self):
        if self.period_only:
            return self.t % self.T2 == 0
        return self.t % (self.T1 if self.t < self.T2 else self.T2) == 0

    def _contractions(self, idx, g):
        x = np.reshape(g, self.modes[idx])
        for i, d in enumerate(self.modes[idx]):
            u = np.moveaxis(x, i, 0).reshape(d, -1)
            yield i, u @ u.T

    def accumulate(self, grads):
        """Warm start: the running mean of the batches' contractions."""
        self.warm += 1
        j = self.warm
        for idx, g in enumerate(grads):
            for i, c in self._contractions(idx, g):
                self.H[idx][i] = (j - 1) / j * self.H[idx][i] + c / j
        self.count += 1

    def adjust(self, idx, g, direction):
        """The direction as the step takes it (a subclass grafts it)."""
        return direction

    def step(self, weights, grads):
        if self.t % self.T1 == 0 and not (self.t == 0 and self.warm > 0):
            for idx, g in enumerate(grads):
                for i, c in self._contractions(idx, g):
                    h = self.H[idx][i]
                    self.H[idx][i] = c if self.count == 0 else self.rho * h + (1 - self.rho) * c
            self.count += 1
        refresh = self.refresh_due()
        new = []
        for idx, (w, g) in enumerate(zip(weights, grads, strict=True)):
            k = len(self.modes[idx])
            self.m[idx] = self.beta * self.m[idx] + g
            if refresh:
                self.P[idx] = [_root(h, 2 * k, self.eps) for h in self.H[idx]]
            kron = self.P[idx][0]
            for p in self.P[idx][1:]:
                kron = np.kron(kron, p)
            direction = (kron @ self.m[idx].ravel()).reshape(w.shape)
            direction = self.adjust(idx, g, direction)
            new.append(w * (1 - self.lr * self.wd) - self.lr * direction)
        self.t += 1
        return new


def _t(x):
    return tensor(x, "float64")


# ------------------------------------------------------------------------- inverse p-th root


@pytest.mark.parametrize("dtype, rtol", [("float64", 1e-8), ("float32", 2e-3)])
@pytest.mark.parametrize("n", [1, 5, 40, 200])
def test_inverse_pth_root_matches_eigendecomposition(dtype, rtol, n):
    rng = np.random.default_rng(n)
    # float64 is asked for a tight tolerance on M: the roots then meet 1e-8 (the default 1e-6
    # gives about 1e-7 at worst). float32 is compared with the float64 reference.
    tolerance = 1e-12 if dtype == "float64" else 1e-6
    for cond in (1e0, 1e3, 1e6):
        h = _spd(rng, n, cond)
        eps = 1e-4
        for p in (2, 4, 6):
            root, ok, iterations, error = kronecker.inverse_pth_root(
                tensor(h, dtype), p, eps, tolerance=tolerance, return_info=True
            )
            assert root.dtype == dtype
            assert bool(ok)
            assert 0 < int(iterations) <= 100
            err = _rel(root, _root(h, p, eps))
            assert err <= rtol, f"n={n} cond={cond:g} p={p}: rel err {err:.2e}"


def test_inverse_pth_root_default_tolerance_converges():
    rng = np.random.default_rng(7)
    h = _spd(rng, 40, 1e6)
    root, ok, iterations, error = kronecker.inverse_pth_root(tensor(h), 4, 1e-4, return_info=True)
    assert bool(ok) and float(error) <= 1e-6 and int(iterations) < 30
    assert _rel(root, _root(h, 4, 1e-4)) <= 1e-6


@pytest.mark.parametrize("jit_compile", [False, True])
def test_inverse_pth_root_in_graph_and_xla(jit_compile):
    rng = np.random.default_rng(3)
    h = _spd(rng, 30, 1e3)

    root_of = compiled(
        lambda x, damping: kronecker.inverse_pth_root(x, 4, damping, return_info=True),
        jit_compile=jit_compile,
    )

    for dtype, rtol in (("float64", 1e-6), ("float32", 1e-3)):
        root, ok, iterations, error = root_of(tensor(h, dtype), tensor(1e-3, dtype))
        assert bool(ok) and float(error) <= 1e-6 and int(iterations) < 100
        assert _rel(root, _root(h, 4, 1e-3)) <= rtol


def test_inverse_pth_root_nan_is_not_ok():
    h = np.eye(4)
    h[1, 2] = np.nan
    for dtype in ("float32", "float64"):
        root, ok = kronecker.inverse_pth_root(tensor(h, dtype), 2, 1e-3)
        assert not bool(ok)
        _, ok = kronecker.inverse_pth_root(tensor(np.full((3, 3), np.inf), dtype), 4, 1e-3)
        assert not bool(ok)
    # A zero matrix without damping has no root: never a "successful" inf.
    _, ok = kronecker.inverse_pth_root(tensor(np.zeros((3, 3))), 2, 0.0)
    assert not bool(ok)


@pytest.mark.parametrize("dtype, rtol", [("float64", 1e-9), ("float32", 2e-3)])
def test_inverse_pth_root_eigh_matches_the_reference_and_newton(dtype, rtol):
    rng = np.random.default_rng(11)
    for n in (1, 5, 40):
        for cond in (1e0, 1e3, 1e6):
            h = _spd(rng, n, cond)
            for p in (2, 4, 6):
                root, ok = kronecker.inverse_pth_root_eigh(tensor(h, dtype), p, 1e-4)
                assert root.dtype == dtype and bool(ok)
                err = _rel(root, _root(h, p, 1e-4))
                assert err <= rtol, f"n={n} cond={cond:g} p={p}: rel err {err:.2e}"
                if dtype == "float64":  # the two methods agree to Newton's tolerance
                    newton, _ = kronecker.inverse_pth_root(tensor(h, dtype), p, 1e-4)
                    assert _rel(root, newton) <= 1e-6


def test_inverse_pth_root_eigh_bad_input_is_not_ok_and_never_raises():
    h = np.eye(4)
    h[1, 2] = np.nan
    for dtype in ("float32", "float64"):
        _, ok = kronecker.inverse_pth_root_eigh(tensor(h, dtype), 2, 1e-3)
        assert not bool(ok)
        _, ok = kronecker.inverse_pth_root_eigh(tensor(np.full((3, 3), np.inf), dtype), 4, 1e-3)
        assert not bool(ok)
    _, ok = kronecker.inverse_pth_root_eigh(tensor(np.zeros((3, 3))), 2, 0.0)
    assert not bool(ok)
    with pytest.raises(ValueError, match="`p` must be an integer >= 1"):
        kronecker.inverse_pth_root_eigh(tensor(np.eye(2)), 0, 1e-3)


def test_inverse_pth_root_first_iterate_by_hand():
    # X_1 = z^(1/p) (3 I - z A) / 2 for p = 2, with z = 3 / (2 ||A||_F).
    h = np.diag([1.0, 1e-2, 1e-4])
    root, ok, iterations, _ = kronecker.inverse_pth_root(
        tensor(h), 2, 0.0, max_iterations=1, return_info=True
    )
    assert bool(ok) and int(iterations) == 1
    z = 1.5 / np.linalg.norm(h)
    np.testing.assert_allclose(np.array(root), np.sqrt(z) * (3 * np.eye(3) - z * h) / 2, rtol=1e-14)


# ------------------------------------------------------------------------------- optimizer


@pytest.mark.parametrize("root_method", ["eigh", "newton", "auto"])
def test_one_step_matches_numpy(float64, root_method):
    rng = np.random.default_rng(0)
    lr, eps = 0.0625, 0.25
    w0, b0 = rng.standard_normal((4, 3)), rng.standard_normal(3)
    g_w, g_b = rng.standard_normal((4, 3)), rng.standard_normal(3)
    kernel = keras.Variable(w0, dtype="float64", name="kernel")
    bias = keras.Variable(b0, dtype="float64", name="bias")
    opt = keras_tnt.Shampoo(learning_rate=lr, damping=eps, root_method=root_method)
    assert opt.resolved_root_method == (
        root_method if root_method != "auto" else "newton" if backend.has_accelerator() else "eigh"
    )
    opt.apply([_t(g_w), _t(g_b)], [kernel, bias])

    h1, h2, hb = g_w @ g_w.T, g_w.T @ g_w, np.outer(g_b, g_b)
    p1, p2, pb = _root(h1, 4, eps), _root(h2, 4, eps), _root(hb, 2, eps)
    np.testing.assert_allclose(np.array(opt.statistics(kernel)[0]), h1, rtol=1e-12)
    np.testing.assert_allclose(np.array(opt.statistics(kernel)[1]), h2, rtol=1e-12)
    np.testing.assert_allclose(np.array(opt.statistics(bias)[0]), hb, rtol=1e-12)
    assert _rel(opt.inverses(kernel)[0], p1) <= 1e-6
    assert _rel(opt.inverses(kernel)[1], p2) <= 1e-6
    assert _rel(opt.inverses(bias)[0], pb) <= 1e-6
    # m = g at t = 0; D = P_1 M P_2 for the kernel, P M for the bias; no trace normalisation.
    assert _rel(kernel, w0 - lr * p1 @ g_w @ p2) <= 1e-6
    assert _rel(bias, b0 - lr * pb @ g_b) <= 1e-6
    assert opt.curvature_updates == 1 and opt.failed_inversions == 0
    assert not opt.needs_sampled_gradients


@pytest.mark.parametrize(
    "period_only, refresh_steps", [(True, [0, 3, 6]), (False, [0, 1, 2, 3, 6])]
)
def test_refresh_schedule_matches_numpy(float64, period_only, refresh_steps):
    shapes = [(4, 3), (3,)]
    kw = dict(
        learning_rate=0.0625,
        damping=0.25,
        momentum=0.5,
        statistics_decay=0.75,
        curvature_update_period=1,
        inverse_update_period=3,
    )
    rng = np.random.default_rng(1)
    init = [rng.standard_normal(s) for s in shapes]
    variables = [keras.Variable(w, dtype="float64") for w in init]
    opt = keras_tnt.Shampoo(refresh_at_inverse_period_only=period_only, **kw)
    ref = RefShampoo(shapes, 0.0625, 0.25, 0.5, 0.75, 1, 3, period_only)
    weights = [w.copy() for w in init]
    refreshed = []
    opt.build(variables)
    apply = compiled_step(opt, variables, lambda g: opt.apply(g, variables))
    for t in range(8):
        before = [np.array(p) for p in opt.inverses(variables[0])]
        grads = [rng.standard_normal(s) for s in shapes]
        apply([_t(g) for g in grads])
        weights = ref.step(weights, grads)
        after = [np.array(p) for p in opt.inverses(variables[0])]
        if any(not np.array_equal(a, b) for a, b in zip(before, after, strict=True)):
            refreshed.append(t)
        for var, want in zip(variables, weights, strict=True):
            assert _rel(var, want) <= 1e-6, f"t={t}"
    assert refreshed == refresh_steps
    assert opt.curvature_updates == 8


def test_three_and_four_mode_tensors_with_warm_start_period_and_decay_match_numpy(float64):
    """A 3-mode tensor, a 4-D conv-like kernel (leading axes merged: modes (6, 4, 5)) and a
    vector, with a warm start over two batches, T1 = 2, T2 = 4 and weight decay."""
    shapes = [(3, 4, 5), (2, 3, 4, 5), (5,)]
    settings = dict(lr=0.05, eps=0.1, beta=0.9, rho=0.8, T1=2, T2=4)
    rng = np.random.default_rng(3)
    init = [rng.standard_normal(s) for s in shapes]
    variables = [keras.Variable(w, dtype="float64") for w in init]
    opt = keras_tnt.Shampoo(
        learning_rate=0.05,
        damping=0.1,
        momentum=0.9,
        statistics_decay=0.8,
        curvature_update_period=2,
        inverse_update_period=4,
        weight_decay=0.01,
    )
    opt.build(variables)
    modes = [tuple(int(p.shape[0]) for p in opt.inverses(v)) for v in variables]
    assert modes == [(3, 4, 5), (6, 4, 5), (5,)]
    ref = RefShampoo(shapes, period_only=False, weight_decay=0.01, **settings)
    for _ in range(2):
        grads = [rng.standard_normal(s) for s in shapes]
        opt.accumulate_curvature([_t(g) for g in grads])
        ref.accumulate(grads)
    weights = [w.copy() for w in init]
    apply = compiled_step(opt, variables, lambda g: opt.apply(g, variables))
    for t in range(7):
        grads = [rng.standard_normal(s) for s in shapes]
        apply([_t(g) for g in grads])
        weights = ref.step(weights, grads)
        for var, want in zip(variables, weights, strict=True):
            assert _rel(var, want) <= 1e-6, f"t={t}"
    for var, stats in zip(variables, ref.H, strict=True):
        for actual, expected in zip(opt.statistics(var), stats, strict=True):
            np.testing.assert_allclose(np.array(actual), expected, rtol=1e-12)
    assert opt.curvature_updates == 2 + 3  # warm start, then t = 2, 4, 6


def test_failed_root_keeps_previous_and_is_counted(float64):
    kernel = keras.Variable(np.ones((2, 2)), dtype="float64")
    opt = keras_tnt.Shampoo(learning_rate=0.0625, damping=0.25)
    opt.build([kernel])
    opt.apply([_t(np.eye(2))], [kernel])
    previous = [np.array(p) for p in opt.inverses(kernel)]
    # A finite gradient but an infinite statistic: the roots are not finite, the old ones stay.
    statistics = opt._statistics[0][0]  # row 0 of the buffer of 2 x 2 statistics
    value = np.array(statistics.buffer)
    value[statistics.index] = np.inf
    statistics.buffer.assign(value)
    roots, failed = opt._refresh(0)
    assert int(failed) == 1
    np.testing.assert_array_equal(np.array(roots[0]), previous[0])
    assert np.all(np.isfinite(np.array(kernel)))


def test_defaults_and_config_round_trip():
    opt = keras_tnt.Shampoo()
    assert opt.name == "shampoo"
    assert float(opt.learning_rate) == pytest.approx(3e-4)
    assert opt.damping == pytest.approx(3e-4)
    assert opt.empirical_fisher and not opt.refresh_at_inverse_period_only
    opt = keras_tnt.Shampoo(
        learning_rate=0.01,
        damping=1e-3,
        inverse_update_period=7,
        refresh_at_inverse_period_only=True,
    )
    config = opt.get_config()
    assert "empirical_fisher" not in config
    assert config["refresh_at_inverse_period_only"] is True
    assert config["root_method"] == "auto"
    config_newton = keras_tnt.Shampoo(root_method="newton").get_config()
    assert keras_tnt.Shampoo.from_config(config_newton).root_method == "newton"
    with pytest.raises(ValueError, match="`root_method` must be one of 'auto', 'eigh', 'newton'"):
        keras_tnt.Shampoo(root_method="svd")
    restored = keras_tnt.Shampoo.from_config(config)
    assert restored.get_config() == config
    again = keras.optimizers.deserialize(keras.optimizers.serialize(opt))
    assert type(again) is keras_tnt.Shampoo
    assert again.refresh_at_inverse_period_only and again.inverse_update_period == 7
    with pytest.raises(TypeError, match="`empirical_fisher` is not one of its arguments"):
        keras_tnt.Shampoo(empirical_fisher=False)
    with pytest.raises(TypeError, match="`refresh_at_inverse_period_only` must be True or False"):
        keras_tnt.Shampoo(refresh_at_inverse_period_only=1)


def test_trains_a_plain_keras_model():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((128, 6)).astype("float32")
    y = (x @ rng.standard_normal((6, 2)) + 0.1).astype("float32")
    inputs = keras.Input((6,))
    hidden = keras.layers.Dense(8, activation="tanh")(inputs)
    model = keras.Model(inputs, keras.layers.Dense(2)(hidden))
    model.compile(
        optimizer=keras_tnt.Shampoo(learning_rate=0.02, damping=1e-3), loss="mse", jit_compile=True
    )
    history = model.fit(x, y, batch_size=32, epochs=5, verbose=0)
    losses = history.history["loss"]
    assert np.all(np.isfinite(losses))
    assert losses[-1] < 0.5 * losses[0], losses
    assert model.optimizer.failed_inversions == 0


def _coupled_newton(a, p, tol, max_iterations):
    """NumPy transcription of the iteration in docs/algorithm.md §3, with its 1.2x growth guard."""
    eye = np.eye(len(a))
    z = (1 + p) / (2 * np.linalg.norm(a))
    m, x = z * a, z ** (1 / p) * eye
    err = np.max(np.abs(m - eye))
    i = 0
    while i < max_iterations and err > tol:
        t = ((p + 1) * eye - m) / p
        new_m = np.linalg.matrix_power(t, p) @ m
        new_err = np.max(np.abs(new_m - eye))
        i += 1
        if not new_err <= 1.2 * err:
            return x, i
        m, x, err = new_m, x @ t, new_err
    return x, i


@pytest.mark.parametrize("negative", [-0.4, -0.9, -3.0])
def test_inverse_pth_root_keeps_the_previous_iterate_when_the_error_grows(float64, negative):
    # An indefinite matrix (which statistics never are, but round-off can approach) makes the
    # error grow; the iteration must stop there and return the iterate before the growth.
    rng = np.random.default_rng(7)
    q, _ = np.linalg.qr(rng.standard_normal((6, 6)))
    h = (q * np.array([2.0, 1.5, 1.0, 0.5, 0.25, negative])) @ q.T
    h = 0.5 * (h + h.T)
    expected, iterations = _coupled_newton(h, 4, 1e-6, 100)
    root, ok, i, error = kronecker.inverse_pth_root(h, 4, 0.0, return_info=True)
    assert int(i) == iterations < 100
    assert float(error) > 1e-6  # stopped by the growth guard, not by convergence
    np.testing.assert_allclose(np.array(root), expected, rtol=1e-10, atol=1e-12)
    assert bool(ok)
