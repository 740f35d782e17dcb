"""keras_tnt.TNT used directly, against a NumPy implementation of docs/algorithm.md §2."""

import math
from functools import reduce

import keras
import numpy as np
import pytest

import keras_tnt
from tests.conftest import BOTH_BACKENDS
from tests.conftest import compiled_step
from tests.conftest import tensor

pytestmark = BOTH_BACKENDS

RTOL = 1e-12


# ------------------------------------------------------------------------- NumPy reference


def _modes(shape):
    """docs/algorithm.md §5: scalar -> (), 1-3 dims unchanged, 4+ dims: leading axes merged."""
    shape = tuple(shape)
    if len(shape) <= 3:
        return shape
    return (math.prod(shape[:-2]),) + shape[-2:]


def _contractions(g, modes):
    x = np.asarray(g, np.float64).reshape(modes)
    out = []
    for i, d in enumerate(modes):
        u = np.moveaxis(x, i, 0).reshape(d, -1)
        out.append(u @ u.T)
    return out


def _normalize(stats, modes):
    k = len(modes)
    if k <= 1:
        return list(stats)
    size = math.prod(modes)
    c = (np.trace(stats[0]) / size) ** (1.0 / k)
    return [h / (c ** (k - 1) * (size // d)) for h, d in zip(stats, modes, strict=True)]


class RefTNT:
    """Step-by-step NumPy transcription of docs/algorithm.md §2 (one entry per trainable tensor)."""

    def __init__(
        self,
        shapes,
        lr,
        damping,
        momentum,
        decay,
        T1,
        T2,
        weight_decay=None,
        decayed=None,
    ):
        self.modes = [_modes(s) for s in shapes]
        self.lr, self.eps, self.beta, self.rho = lr, damping, momentum, decay
        self.T1, self.T2 = T1, T2
        self.wd = weight_decay or 0.0
        self.decayed = decayed if decayed is not None else [True] * len(shapes)
        self.m = [np.zeros(s) for s in shapes]
        self.H = [[np.zeros((d, d)) for d in m] for m in self.modes]
        self.A = [[np.zeros((d, d)) for d in m] for m in self.modes]
        self.t = 0
        self.count = 0
        self.warm = 0

    def curvature_due(self):
        return self.t % self.T1 == 0 and not (self.t == 0 and self.warm > 0)

    def refresh_due(self):
        period = self.T1 if self.t < self.T2 else self.T2
        return self.t % period == 0

    def accumulate_curvature(self, ghats):
        self.warm += 1
        j = self.warm
        for idx, g in enumerate(ghats):
            for i, c in enumerate(_contractions(g, self.modes[idx])):
                self.H[idx][i] = (j - 1) / j * self.H[idx][i] + c / j
        self.count += 1

    def update_curvature(self, ghats):
        first = self.count == 0
        for idx, g in enumerate(ghats):
            for i, c in enumerate(_contractions(g, self.modes[idx])):
                h = self.H[idx][i]
                self.H[idx][i] = c if first else self.rho * h + (1 - self.rho) * c
        self.count += 1

    def adjust(self, idx, g, direction):
        """The direction as the step takes it (a subclass grafts it)."""
        return direction

    def step(self, weights, grads):
        refresh = self.refresh_due()
        new = []
        for idx, (w, g) in enumerate(zip(weights, grads, strict=True)):
            modes = self.modes[idx]
            self.m[idx] = self.beta * self.m[idx] + g
            if modes:
                if refresh:
                    us = _normalize(self.H[idx], modes)
                    self.A[idx] = [np.linalg.inv(u + self.eps * np.eye(u.shape[0])) for u in us]
                direction = (reduce(np.kron, self.A[idx]) @ self.m[idx].ravel()).reshape(w.shape)
            else:
                direction = self.m[idx]
            direction = self.adjust(idx, g, direction)
            if self.decayed[idx]:
                w = w * (1 - self.lr * self.wd)
            new.append(w - self.lr * direction)
        self.t += 1
        return new


# ------------------------------------------------------------------------------- helpers


def _close(actual, expected, rtol=RTOL):
    actual = np.asarray(actual.numpy() if hasattr(actual, "numpy") else actual)
    expected = np.asarray(expected)
    assert actual.shape == expected.shape
    assert np.all(np.isfinite(actual))
    scale = max(float(np.max(np.abs(expected))), 1e-300)
    err = float(np.max(np.abs(actual - expected))) / scale
    assert err <= rtol, f"relative error {err:.3e} > {rtol:.1e}"


def _vars(values, names=None):
    names = names or [f"w{i}" for i in range(len(values))]
    return [
        keras.Variable(np.array(v), dtype="float64", name=n)
        for v, n in zip(values, names, strict=True)
    ]


def _t(x):
    return tensor(x, "float64")


def _rand(rng, *shapes, scale=1.0):
    return [scale * rng.standard_normal(s) for s in shapes]


HYPER = dict(
    learning_rate=0.0625,
    damping=0.25,
    momentum=0.5,
    statistics_decay=0.75,
)


def _ref(shapes, **kw):
    return RefTNT(
        shapes,
        lr=kw.get("learning_rate", 1e-4),
        damping=kw.get("damping", 0.1),
        momentum=kw.get("momentum", 0.9),
        decay=kw.get("statistics_decay", 0.9),
        T1=kw.get("curvature_update_period", 1),
        T2=kw.get("inverse_update_period", 20),
        weight_decay=kw.get("weight_decay"),
    )


def _run_pair(shapes, steps, seed=0, warm=0, always_fold=False, **kw):
    """Runs TNT and RefTNT side by side; yields (t, opt, variables, ref, ref_weights, due).

    Sampled gradients are folded when ``curvature_due()`` (as FisherModel does), or at every
    step with ``always_fold``.
    """
    rng = np.random.default_rng(seed)
    init = _rand(rng, *shapes)
    variables = _vars(init)
    opt = keras_tnt.TNT(**kw)
    opt.build(variables)
    ref = _ref(shapes, **kw)
    weights = [w.copy() for w in init]
    for _ in range(warm):
        ghats = _rand(rng, *shapes)
        opt.accumulate_curvature([_t(g) for g in ghats])
        ref.accumulate_curvature(ghats)
    for t in range(steps):
        due = bool(opt.curvature_due())
        assert due == ref.curvature_due(), f"curvature_due differs at t={t}"
        if due or always_fold:
            ghats = _rand(rng, *shapes)
            opt.update_curvature([_t(g) for g in ghats])
            ref.update_curvature(ghats)
        grads = _rand(rng, *shapes)
        opt.apply([_t(g) for g in grads], variables)
        weights = ref.step(weights, grads)
        yield t, opt, variables, ref, weights, due


# ---------------------------------------------------------------- 1. exact steps by hand


def test_first_two_steps_match_hand_computation(float64):
    rng = np.random.default_rng(42)
    lr, eps, beta, rho, wd = 0.0625, 0.25, 0.5, 0.75, 0.5
    w0, b0 = rng.standard_normal((4, 3)), rng.standard_normal(3)
    kernel, bias = _vars([w0, b0], ["kernel", "bias"])
    opt = keras_tnt.TNT(
        learning_rate=lr,
        damping=eps,
        momentum=beta,
        statistics_decay=rho,
        curvature_update_period=1,
        inverse_update_period=20,
        weight_decay=wd,
    )
    opt.build([kernel, bias])
    assert keras.backend.standardize_dtype(opt.learning_rate.dtype) == "float64"

    # ---- step t = 0: the first statistics are the contractions themselves.
    gh_w, gh_b = rng.standard_normal((4, 3)), rng.standard_normal(3)
    g_w, g_b = rng.standard_normal((4, 3)), rng.standard_normal(3)
    assert bool(opt.curvature_due())
    opt.update_curvature([_t(gh_w), _t(gh_b)])
    opt.apply([_t(g_w), _t(g_b)], [kernel, bias])

    h1, h2, hb = gh_w @ gh_w.T, gh_w.T @ gh_w, np.outer(gh_b, gh_b)
    c = math.sqrt(np.trace(h1) / 12)  # k = 2
    a1 = np.linalg.inv(h1 / (c * 3) + eps * np.eye(4))
    a2 = np.linalg.inv(h2 / (c * 4) + eps * np.eye(3))
    ab = np.linalg.inv(hb + eps * np.eye(3))  # 1-D: not normalised
    m_w, m_b = g_w, g_b  # m = β·0 + g
    w1 = w0 * (1 - lr * wd) - lr * (a1 @ m_w @ a2)
    b1 = b0 * (1 - lr * wd) - lr * (ab @ m_b)

    _close(kernel, w1)
    _close(bias, b1)
    for got, want in zip(opt.statistics(kernel), [h1, h2], strict=True):
        _close(got, want)
    _close(opt.statistics(bias)[0], hb)
    for got, want in zip(opt.inverses(kernel), [a1, a2], strict=True):
        _close(got, want)
    _close(opt.inverses(bias)[0], ab)
    _close(opt._momenta[0], m_w)
    assert int(opt.iterations) == 1
    assert opt.curvature_updates == 1

    # ---- step t = 1 (T1 = 1, T2 = 20): statistics averaged, inverses refreshed again.
    gh_w2, gh_b2 = rng.standard_normal((4, 3)), rng.standard_normal(3)
    g_w2, g_b2 = rng.standard_normal((4, 3)), rng.standard_normal(3)
    assert bool(opt.curvature_due())
    opt.update_curvature([_t(gh_w2), _t(gh_b2)])
    opt.apply([_t(g_w2), _t(g_b2)], [kernel, bias])

    h1 = rho * h1 + (1 - rho) * gh_w2 @ gh_w2.T
    h2 = rho * h2 + (1 - rho) * gh_w2.T @ gh_w2
    hb = rho * hb + (1 - rho) * np.outer(gh_b2, gh_b2)
    c = math.sqrt(np.trace(h1) / 12)
    a1 = np.linalg.inv(h1 / (c * 3) + eps * np.eye(4))
    a2 = np.linalg.inv(h2 / (c * 4) + eps * np.eye(3))
    ab = np.linalg.inv(hb + eps * np.eye(3))
    m_w, m_b = beta * m_w + g_w2, beta * m_b + g_b2
    w2 = w1 * (1 - lr * wd) - lr * (a1 @ m_w @ a2)
    b2 = b1 * (1 - lr * wd) - lr * (ab @ m_b)
    _close(kernel, w2)
    _close(bias, b2)
    for got, want in zip(opt.inverses(kernel), [a1, a2], strict=True):
        _close(got, want)
    assert int(opt.iterations) == 2
    assert opt.curvature_updates == 2


def test_scalar_variable_takes_plain_momentum_step(float64):
    (scale,) = _vars([np.float64(2.0)], ["scale"])
    opt = keras_tnt.TNT(learning_rate=0.0625, momentum=0.5)
    opt.build([scale])
    assert opt.statistics(scale) == [] and opt.inverses(scale) == []
    opt.update_curvature([_t(3.0)])  # nothing to fold for a scalar; still allowed
    opt.apply([_t(1.5)], [scale])
    opt.update_curvature([_t(3.0)])
    opt.apply([_t(-0.25)], [scale])
    m = 0.5 * 1.5 - 0.25
    expected = 2.0 - 0.0625 * 1.5 - 0.0625 * m
    assert float(np.asarray(scale)) == pytest.approx(expected, rel=1e-15)


@pytest.mark.parametrize(
    "T1, T2, warm, refresh_steps, curvature_steps",
    [
        (2, 4, 0, [0, 2, 4, 8], [0, 2, 4, 6, 8]),
        (2, 4, 2, [0, 2, 4, 8], [2, 4, 6, 8]),  # warm start: no statistics update at t = 0
        (1, 3, 0, [0, 1, 2, 3, 6, 9], list(range(10))),
        (2, 5, 0, [0, 2, 4, 5], [0, 2, 4, 6, 8]),  # t = T2 uses period T2 (t < T2 is strict)
        (3, 2, 0, [0, 2, 4, 6, 8], [0, 3, 6, 9]),  # T2 < T1: every T2 from t = 2 on
    ],
)
def test_refresh_and_curvature_schedule(float64, T1, T2, warm, refresh_steps, curvature_steps):
    """Statistics are folded at EVERY step here, so an inverse changes iff it was refreshed."""
    kw = dict(HYPER, curvature_update_period=T1, inverse_update_period=T2, weight_decay=0.25)
    shapes = [(4, 3), (3,)]
    # The schedule of docs/algorithm.md §2, written out by hand for 10 steps.
    assert [t for t in range(10) if t % (T1 if t < T2 else T2) == 0] == refresh_steps
    assert [t for t in range(10) if t % T1 == 0 and not (t == 0 and warm)] == curvature_steps

    refreshed, due_steps = [], []
    before = None
    pairs = _run_pair(shapes, 10, seed=T1 * 10 + T2 + warm, warm=warm, always_fold=True, **kw)
    for t, opt, variables, ref, weights, due in pairs:
        if due:
            due_steps.append(t)
        inverses = [np.array(a) for v in variables for a in opt.inverses(v)]
        if before is None or all(
            not np.array_equal(a, b) for a, b in zip(inverses, before, strict=True)
        ):
            refreshed.append(t)
        else:  # a refresh renews every factor of every tensor, or none
            assert all(np.array_equal(a, b) for a, b in zip(inverses, before, strict=True)), t
        before = inverses
        for v, w in zip(variables, weights, strict=True):
            _close(v, w)
        for idx, v in enumerate(variables):
            for got, want in zip(opt.statistics(v), ref.H[idx], strict=True):
                _close(got, want)
            for got, want in zip(opt.inverses(v), ref.A[idx], strict=True):
                _close(got, want)
    assert refreshed == refresh_steps
    assert due_steps == curvature_steps
    assert opt.warm_start_batches == warm
    assert opt.curvature_updates == warm + 10


def test_large_factors_in_buffers_of_their_own_match_the_reference(float64, monkeypatch):
    """A factor of ``_own_buffer_size`` numbers or more keeps a buffer of one row (lowered to 16
    here: the 4 x 4 factors), the smaller ones share their size's: every step is the NumPy
    reference's, and the shared layout's bit for bit on TensorFlow (the fold is elementwise
    per row, the factorisations per matrix)."""
    kw = dict(HYPER, curvature_update_period=2, inverse_update_period=4, weight_decay=0.25)
    shapes = [(4, 3), (3,), (4, 4), (3, 3)]

    def run():
        out = []
        for _, opt, variables, ref, weights, _ in _run_pair(shapes, 8, seed=11, warm=1, **kw):
            for v, w in zip(variables, weights, strict=True):
                _close(v, w)
            for idx, v in enumerate(variables):
                for got, want in zip(opt.inverses(v), ref.A[idx], strict=True):
                    _close(got, want)
            out.append([np.array(v) for v in variables])
        return opt, out

    shared_opt, shared = run()
    assert sorted(tuple(s.shape) for s, _, _, _ in shared_opt._buffers) == [(3, 4, 4), (4, 3, 3)]
    monkeypatch.setattr(keras_tnt.TNT, "_own_buffer_size", 16)
    own_opt, own = run()
    shapes_own = sorted(tuple(s.shape) for s, _, _, _ in own_opt._buffers)
    assert shapes_own == [(1, 4, 4)] * 3 + [(4, 3, 3)]
    names = [s.name for s, _, _, _ in own_opt._buffers]
    assert len(set(names)) == len(names)
    exact = keras.backend.backend() == "tensorflow"
    for step_shared, step_own in zip(shared, own, strict=True):
        for a, b in zip(step_shared, step_own, strict=True):
            np.testing.assert_allclose(b, a, rtol=0 if exact else 1e-12, atol=0)
    for v in own_opt._trainable_variables:
        shared_v = shared_opt._trainable_variables[own_opt._get_variable_index(v)]
        for a, b in zip(shared_opt.statistics(shared_v), own_opt.statistics(v), strict=True):
            np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=0 if exact else 1e-12)


def test_schedule_in_graph_mode_matches_eager(float64):
    """The same steps compiled as FisherModel runs them (a tf.function; on JAX the stateless
    step under jax.jit) give the same numbers."""
    shapes = [(4, 3), (3,)]
    kw = dict(HYPER, curvature_update_period=2, inverse_update_period=4, weight_decay=0.25)
    rng = np.random.default_rng(13)
    init = _rand(rng, *shapes)
    variables = _vars(init)
    opt = keras_tnt.TNT(**kw)
    opt.build(variables)
    ref = _ref(shapes, **kw)
    weights = [w.copy() for w in init]

    def step(ghats, grads):
        opt.update_curvature(ghats, condition=opt.curvature_due())
        opt.apply(grads, variables)

    train_step = compiled_step(opt, variables, step)

    for _ in range(9):
        ghats, grads = _rand(rng, *shapes), _rand(rng, *shapes)
        if ref.curvature_due():
            ref.update_curvature(ghats)
        weights = ref.step(weights, grads)
        train_step([_t(g) for g in ghats], [_t(g) for g in grads])
        for v, w in zip(variables, weights, strict=True):
            _close(v, w)
    assert opt.curvature_updates == 5  # t = 0, 2, 4, 6, 8
    assert int(opt.iterations) == 9


@pytest.mark.parametrize(
    "rtol",
    [1e-6, 1e-11],
)
def test_conv_kernel_preconditioned_with_merged_spatial_mode(float64, rtol):
    """A (kh, kw, in, out) kernel uses 3 factors (kh*kw, in, out); Conv1D (k, in, out) too."""
    shapes = [(2, 2, 3, 2), (3, 2, 2), (2,)]
    kw = dict(HYPER, weight_decay=0.25)
    for _, opt, variables, _, weights, _ in _run_pair(shapes, 3, seed=5, **kw):
        assert [tuple(a.shape) for a in opt.inverses(variables[0])] == [(4, 4), (3, 3), (2, 2)]
        for v, w in zip(variables, weights, strict=True):
            _close(v, w, rtol=rtol)


# ----------------------------------------------------------------------- 2. statistics


def test_update_curvature_sets_then_averages(float64):
    rng = np.random.default_rng(1)
    kernel, bias = _vars(_rand(rng, (5, 3), (3,)))
    opt = keras_tnt.TNT(statistics_decay=0.75)
    opt.build([kernel, bias])
    for h in opt.statistics(kernel) + opt.statistics(bias):
        np.testing.assert_array_equal(np.asarray(h), 0.0)

    g1 = _rand(rng, (5, 3), (3,))
    opt.update_curvature([_t(g) for g in g1])
    c1 = [_contractions(g1[0], (5, 3)), _contractions(g1[1], (3,))]
    for v, cs in zip([kernel, bias], c1, strict=True):
        for got, want in zip(opt.statistics(v), cs, strict=True):
            _close(got, want)  # the first update sets H = contraction (no (1-ρ) factor)

    g2 = _rand(rng, (5, 3), (3,))
    opt.update_curvature([_t(g) for g in g2])
    c2 = [_contractions(g2[0], (5, 3)), _contractions(g2[1], (3,))]
    for v, a, b in zip([kernel, bias], c1, c2, strict=True):
        for got, x, y in zip(opt.statistics(v), a, b, strict=True):
            _close(got, 0.75 * x + 0.25 * y)
    assert opt.curvature_updates == 2
    assert opt.warm_start_batches == 0
    assert int(opt.iterations) == 0  # statistics never advance the step count


def test_accumulate_curvature_is_running_mean_then_moving_average(float64):
    rng = np.random.default_rng(2)
    (kernel,) = _vars(_rand(rng, (4, 2, 3)))
    opt = keras_tnt.TNT(statistics_decay=0.75)
    opt.build([kernel])
    batches = _rand(rng, (4, 2, 3), (4, 2, 3), (4, 2, 3))
    for j, g in enumerate(batches, start=1):
        opt.accumulate_curvature([_t(g)])
        mean = [
            np.mean([_contractions(b, (4, 2, 3))[i] for b in batches[:j]], axis=0) for i in range(3)
        ]
        for got, want in zip(opt.statistics(kernel), mean, strict=True):
            _close(got, want)
    assert opt.warm_start_batches == 3
    assert opt.curvature_updates == 3
    assert not bool(opt.curvature_due())  # warm-start statistics serve t = 0
    # A later regular update averages into the warm-start statistics (not "first ever").
    g = rng.standard_normal((4, 2, 3))
    opt.update_curvature([_t(g)])
    for got, want, c in zip(opt.statistics(kernel), mean, _contractions(g, (4, 2, 3)), strict=True):
        _close(got, 0.75 * want + 0.25 * c)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("warm", [False, True])
def test_nonfinite_fisher_gradient_leaves_statistics(float64, bad, warm):
    rng = np.random.default_rng(3)
    kernel, bias = _vars(_rand(rng, (4, 3), (3,)))
    opt = keras_tnt.TNT()
    opt.build([kernel, bias])
    opt.update_curvature([_t(g) for g in _rand(rng, (4, 3), (3,))])
    before = [np.array(h) for v in (kernel, bias) for h in opt.statistics(v)]
    g_w, g_b = _rand(rng, (4, 3), (3,))
    g_b[1] = bad  # only the bias gradient is bad: the whole batch is dropped
    fold = opt.accumulate_curvature if warm else opt.update_curvature
    fold([_t(g_w), _t(g_b)])
    after = [np.array(h) for v in (kernel, bias) for h in opt.statistics(v)]
    for a, b in zip(after, before, strict=True):
        np.testing.assert_array_equal(a, b)
    assert opt.skipped_curvature_updates == 1
    assert opt.curvature_updates == 1
    assert opt.warm_start_batches == 0
    # A good batch afterwards is folded normally.
    opt.update_curvature([_t(g) for g in _rand(rng, (4, 3), (3,))])
    assert opt.curvature_updates == 2
    assert opt.skipped_curvature_updates == 1


# ------------------------------------------------------------------ 3. non-finite gradients


def test_nonfinite_gradient_skips_only_that_tensor(float64):
    shapes = [(4, 3), (3,)]
    rng = np.random.default_rng(4)
    init = _rand(rng, *shapes)
    kernel, bias = _vars(init)
    kw = dict(HYPER)
    opt = keras_tnt.TNT(**kw)
    opt.build([kernel, bias])
    ref = _ref(shapes, **kw)
    weights = [w.copy() for w in init]
    ghats, grads = _rand(rng, *shapes), _rand(rng, *shapes)
    opt.update_curvature([_t(g) for g in ghats])
    ref.update_curvature(ghats)
    opt.apply([_t(g) for g in grads], [kernel, bias])
    weights = ref.step(weights, grads)

    kernel_before = np.array(kernel)
    momentum_before = np.array(opt._momenta[0])
    inverses_before = [np.array(a) for a in opt.inverses(kernel)]
    bad = rng.standard_normal((4, 3))
    bad[2, 1] = np.nan
    g_b = rng.standard_normal(3)
    ghats = _rand(rng, *shapes)  # new statistics: the refresh due now (T1 = 1) changes them
    opt.update_curvature([_t(g) for g in ghats])
    ref.update_curvature(ghats)
    opt.apply([_t(bad), _t(g_b)], [kernel, bias])
    # The bias is updated as usual, the kernel keeps weights and momentum.
    _, ref_bias = ref.step(weights, [np.zeros((4, 3)), g_b])
    np.testing.assert_array_equal(np.asarray(kernel), kernel_before)
    np.testing.assert_array_equal(np.asarray(opt._momenta[0]), momentum_before)
    # The refresh due at this step (the reference's inverses moved) skips the kernel's too.
    for a, new, before in zip(opt.inverses(kernel), ref.A[0], inverses_before, strict=True):
        assert np.abs(new - before).max() > 1e-3
        np.testing.assert_array_equal(np.asarray(a), before)
    _close(bias, ref_bias)
    assert opt.skipped_updates == 1
    assert int(opt.iterations) == 2
    for v in [kernel, bias] + list(opt.variables):
        x = np.asarray(v)
        if x.dtype.kind == "f":
            assert np.all(np.isfinite(x)), v.path
    # Training continues with finite values.
    opt.update_curvature([_t(g) for g in ghats])
    opt.apply([_t(g) for g in _rand(rng, *shapes)], [kernel, bias])
    assert np.all(np.isfinite(np.asarray(kernel))) and opt.skipped_updates == 1
    assert not np.array_equal(np.asarray(kernel), kernel_before)


def test_nonfinite_gradient_keeps_weights_with_weight_decay(float64):
    rng = np.random.default_rng(5)
    kernel, bias = _vars(_rand(rng, (4, 3), (3,)))
    opt = keras_tnt.TNT(**HYPER, weight_decay=0.5)
    opt.build([kernel, bias])
    opt.update_curvature([_t(g) for g in _rand(rng, (4, 3), (3,))])
    before = np.array(kernel)
    bad = np.full((4, 3), np.inf)
    opt.apply([_t(bad), _t(rng.standard_normal(3))], [kernel, bias])
    assert opt.skipped_updates == 1
    np.testing.assert_array_equal(np.asarray(kernel), before)


def test_failed_inversion_keeps_previous_inverse():
    """Finite float32 sampled gradients whose contractions overflow to inf."""
    rng = np.random.default_rng(6)
    kernel = keras.Variable(rng.standard_normal((4, 3)).astype("float32"), name="kernel")
    opt = keras_tnt.TNT(learning_rate=0.0625)
    opt.build([kernel])
    opt.update_curvature([tensor(rng.standard_normal((4, 3)), "float32")])
    opt.apply([tensor(rng.standard_normal((4, 3)), "float32")], [kernel])
    inverses = [np.array(a) for a in opt.inverses(kernel)]
    huge = tensor(np.full((4, 3), 1e30), "float32")  # finite; 1e60 overflows float32
    opt.update_curvature([huge])
    assert not np.all(np.isfinite(np.asarray(opt.statistics(kernel)[0])))
    opt.apply([tensor(rng.standard_normal((4, 3)), "float32")], [kernel])
    assert opt.failed_inversions >= 1
    for a, b in zip(opt.inverses(kernel), inverses, strict=True):
        np.testing.assert_array_equal(np.asarray(a), b)
    assert np.all(np.isfinite(np.asarray(kernel)))


# ------------------------------------------------------------------- 4. base keywords


def _clip(kind, grads, value):
    if kind == "clipnorm":
        return [g * value / max(np.linalg.norm(g), value) for g in grads]
    if kind == "clipvalue":
        return [np.clip(g, -value, value) for g in grads]
    norm = math.sqrt(sum(np.sum(g * g) for g in grads))
    return [g * value / max(norm, value) for g in grads]


@pytest.mark.parametrize("kind", ["clipnorm", "clipvalue", "global_clipnorm"])
def test_clipping_equals_feeding_clipped_gradients(float64, kind):
    shapes = [(4, 3), (3,)]
    rng = np.random.default_rng(7)
    init = _rand(rng, *shapes)
    a_vars, b_vars = _vars(init), _vars(init)
    value = 0.5
    clipped = keras_tnt.TNT(**HYPER, **{kind: value})
    plain = keras_tnt.TNT(**HYPER)
    clipped.build(a_vars)
    plain.build(b_vars)
    for _ in range(2):
        ghats = [_t(g) for g in _rand(rng, *shapes)]
        grads = _rand(rng, *shapes, scale=2.0)
        pre = _clip(kind, grads, value)
        assert not all(
            np.allclose(p, g) for p, g in zip(pre, grads, strict=True)
        )  # clipping is active
        clipped.update_curvature(ghats)
        plain.update_curvature(ghats)
        clipped.apply([_t(g) for g in grads], a_vars)
        plain.apply([_t(g) for g in pre], b_vars)
        for a, b in zip(a_vars, b_vars, strict=True):
            _close(a, np.asarray(b))
    # Clipping applies to g only: the statistics are those of the unclipped Ĝ.
    for a, b in zip(a_vars, b_vars, strict=True):
        for x, y in zip(clipped.statistics(a), plain.statistics(b), strict=True):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_weight_decay_respects_exclusions(float64):
    shapes = [(4, 3), (3,)]
    rng = np.random.default_rng(8)
    init = _rand(rng, *shapes)
    kernel, bias = _vars(init, ["kernel", "bias"])
    kw = dict(HYPER, weight_decay=0.5)
    opt = keras_tnt.TNT(**kw)
    opt.exclude_from_weight_decay(var_names=["bias"])
    opt.build([kernel, bias])
    ref = _ref(shapes, **kw)
    ref.decayed = [True, False]
    ref_all = _ref(shapes, **kw)  # what decaying the bias too would give
    weights = [w.copy() for w in init]
    weights_all = [w.copy() for w in init]
    for _ in range(2):
        ghats, grads = _rand(rng, *shapes), _rand(rng, *shapes)
        opt.update_curvature([_t(g) for g in ghats])
        ref.update_curvature(ghats)
        ref_all.update_curvature(ghats)
        opt.apply([_t(g) for g in grads], [kernel, bias])
        weights = ref.step(weights, grads)
        weights_all = ref_all.step(weights_all, grads)
        _close(kernel, weights[0])
        _close(bias, weights[1])
    # The exclusion is visible: a decayed bias would be far outside the tolerance.
    assert np.max(np.abs(weights_all[1] - weights[1])) > 1e-3 * np.max(np.abs(weights[1]))


def test_weight_decay_enters_neither_momentum_nor_statistics(float64):
    rng = np.random.default_rng(9)
    init = _rand(rng, (4, 3))
    (a,), (b,) = _vars(init), _vars(init)
    with_wd = keras_tnt.TNT(**HYPER, weight_decay=0.5)
    no_wd = keras_tnt.TNT(**HYPER)
    with_wd.build([a])
    no_wd.build([b])
    ghat, g = _t(rng.standard_normal((4, 3))), _t(rng.standard_normal((4, 3)))
    for opt, v in ((with_wd, a), (no_wd, b)):
        opt.update_curvature([ghat])
        opt.apply([g], [v])
    np.testing.assert_array_equal(np.asarray(with_wd._momenta[0]), np.asarray(no_wd._momenta[0]))
    # W_wd - W_plain = -lr * wd * W_0 exactly (decay then the same preconditioned step).
    _close(np.asarray(a) - np.asarray(b), -0.0625 * 0.5 * init[0])


def test_ema_follows_keras_formula(float64):
    shapes = [(4, 3), (3,)]
    rng = np.random.default_rng(10)
    init = _rand(rng, *shapes)
    ema_vars, plain_vars = _vars(init), _vars(init)
    ema = keras_tnt.TNT(**HYPER, use_ema=True, ema_momentum=0.75)
    plain = keras_tnt.TNT(**HYPER)
    ema.build(ema_vars)
    plain.build(plain_vars)
    averages = None
    for _ in range(3):
        ghats, grads = _rand(rng, *shapes), _rand(rng, *shapes)
        for opt, vs in ((ema, ema_vars), (plain, plain_vars)):
            opt.update_curvature([_t(g) for g in ghats])
            opt.apply([_t(g) for g in grads], vs)
        current = [np.array(v) for v in plain_vars]
        # Keras: the first step copies the weights, later ones average with ema_momentum.
        if averages is None:
            averages = current
        else:
            averages = [0.75 * a + 0.25 * w for a, w in zip(averages, current, strict=True)]
        for v, p in zip(ema_vars, plain_vars, strict=True):
            # EMA does not change training
            np.testing.assert_array_equal(np.asarray(v), np.asarray(p))
        for got, want in zip(ema._model_variables_moving_average, averages, strict=True):
            _close(got, want)
    ema.finalize_variable_values(ema_vars)
    for v, want in zip(ema_vars, averages, strict=True):
        _close(v, want)


def test_gradient_accumulation_averages_micro_batches(float64):
    shapes = [(4, 3), (3,)]
    rng = np.random.default_rng(11)
    init = _rand(rng, *shapes)
    acc_vars, one_vars = _vars(init), _vars(init)
    acc = keras_tnt.TNT(**HYPER, gradient_accumulation_steps=2)
    one = keras_tnt.TNT(**HYPER)
    acc.build(acc_vars)
    one.build(one_vars)
    for window in range(3):
        ghats = [_t(g) for g in _rand(rng, *shapes)]
        g1, g2 = _rand(rng, *shapes), _rand(rng, *shapes)
        assert bool(acc.curvature_due())  # first micro-batch of the window
        acc.update_curvature(ghats)
        before = [np.array(v) for v in acc_vars]
        acc.apply([_t(g) for g in g1], acc_vars)
        for v, b in zip(acc_vars, before, strict=True):
            np.testing.assert_array_equal(np.asarray(v), b)  # no update on the first micro-step
        assert int(acc.iterations) == window
        assert not bool(acc.curvature_due())  # second micro-batch: no new statistics
        acc.apply([_t(g) for g in g2], acc_vars)
        assert int(acc.iterations) == window + 1

        assert bool(one.curvature_due())
        one.update_curvature(ghats)
        one.apply([_t((a + b) / 2) for a, b in zip(g1, g2, strict=True)], one_vars)
        for a, b in zip(acc_vars, one_vars, strict=True):
            _close(a, np.asarray(b))
        for a, b in zip(acc._momenta, one._momenta, strict=True):
            _close(a, np.asarray(b))


def test_loss_scale_factor_divides_gradients_and_fisher_gradients(float64):
    shapes = [(4, 3), (3,)]
    rng = np.random.default_rng(12)
    init = _rand(rng, *shapes)
    s_vars, u_vars = _vars(init), _vars(init)
    scaled = keras_tnt.TNT(**HYPER, loss_scale_factor=4.0)
    unscaled = keras_tnt.TNT(**HYPER)
    scaled.build(s_vars)
    unscaled.build(u_vars)
    for _ in range(2):
        ghats, grads = _rand(rng, *shapes), _rand(rng, *shapes)
        scaled.update_curvature([_t(4.0 * g) for g in ghats])
        unscaled.update_curvature([_t(g) for g in ghats])
        scaled.apply([_t(4.0 * g) for g in grads], s_vars)
        unscaled.apply([_t(g) for g in grads], u_vars)
        for a, b in zip(s_vars, u_vars, strict=True):
            _close(a, np.asarray(b))
        for a, b in zip(s_vars, u_vars, strict=True):
            for x, y in zip(scaled.statistics(a), unscaled.statistics(b), strict=True):
                _close(x, np.asarray(y))
    assert float(scaled.scale_loss(_t(1.5))) == 6.0


# ---------------------------------------------------------------- 5. hyper-parameters


@pytest.mark.parametrize(
    "kwargs, error, name",
    [
        ({"damping": -0.1}, ValueError, "damping"),
        ({"damping": 0.0}, ValueError, "damping"),
        ({"damping": float("nan")}, ValueError, "damping"),
        ({"damping": "0.1"}, TypeError, "damping"),
        ({"learning_rate": -1e-3}, ValueError, "learning_rate"),
        ({"learning_rate": 0.0}, ValueError, "learning_rate"),
        ({"momentum": 1.0}, ValueError, "momentum"),
        ({"momentum": -0.1}, ValueError, "momentum"),
        ({"momentum": True}, TypeError, "momentum"),
        ({"statistics_decay": 1.0}, ValueError, "statistics_decay"),
        ({"statistics_decay": -0.5}, ValueError, "statistics_decay"),
        ({"curvature_update_period": 0}, ValueError, "curvature_update_period"),
        ({"curvature_update_period": -3}, ValueError, "curvature_update_period"),
        ({"inverse_update_period": 0}, ValueError, "inverse_update_period"),
        ({"inverse_update_period": 1.5}, TypeError, "inverse_update_period"),
        ({"curvature_update_period": 2.0}, TypeError, "curvature_update_period"),
        ({"weight_decay": -1}, ValueError, "weight_decay"),
    ],
)
def test_bad_hyperparameters_name_the_argument(kwargs, error, name):
    with pytest.raises(error, match=name):
        keras_tnt.TNT(**kwargs)


def test_boundary_hyperparameters_are_accepted():
    opt = keras_tnt.TNT(
        momentum=0.0,
        statistics_decay=0.0,
        curvature_update_period=1,
        inverse_update_period=1,
        weight_decay=0.0,
    )
    assert opt.momentum == 0.0 and opt.statistics_decay == 0.0
    assert opt.inverse_update_period == 1


def test_defaults():
    opt = keras_tnt.TNT()
    assert float(np.asarray(opt.learning_rate)) == pytest.approx(1e-4, rel=1e-7)
    assert opt.damping == 0.1
    assert opt.momentum == 0.9
    assert opt.statistics_decay == 0.9
    assert opt.curvature_update_period == 1
    assert opt.inverse_update_period == 20
    assert opt.weight_decay is None
    assert opt.name == "tnt"


# ------------------------------------------------------------------------ 6. config


def test_config_round_trip():
    opt = keras_tnt.TNT(
        learning_rate=3e-4,
        damping=0.01,
        momentum=0.8,
        statistics_decay=0.95,
        curvature_update_period=10,
        inverse_update_period=100,
        weight_decay=10.0,
        clipnorm=1.0,
        use_ema=True,
        ema_momentum=0.9,
        loss_scale_factor=8.0,
        gradient_accumulation_steps=3,
        name="my_tnt",
    )
    config = opt.get_config()
    assert config["damping"] == 0.01
    assert config["curvature_update_period"] == 10
    assert config["inverse_update_period"] == 100
    assert config["weight_decay"] == 10.0
    restored = keras_tnt.TNT.from_config(config)
    assert restored.get_config() == config
    assert restored.damping == 0.01 and restored.momentum == 0.8
    assert restored.statistics_decay == 0.95 and restored.gradient_accumulation_steps == 3


def test_serialize_deserialize_returns_tnt():
    opt = keras_tnt.TNT(learning_rate=0.0625, damping=0.25, inverse_update_period=7)
    restored = keras.optimizers.deserialize(keras.optimizers.serialize(opt))
    assert isinstance(restored, keras_tnt.TNT)
    assert restored.get_config() == opt.get_config()
    assert restored.inverse_update_period == 7


def test_learning_rate_schedule_round_trip():
    schedule = keras.optimizers.schedules.ExponentialDecay(0.1, decay_steps=10, decay_rate=0.5)
    opt = keras_tnt.TNT(learning_rate=schedule)
    restored = keras.optimizers.deserialize(keras.optimizers.serialize(opt))
    assert isinstance(restored, keras_tnt.TNT)
    assert restored.get_config() == opt.get_config()


# ------------------------------------------------------------------------ 7. misuse


def test_apply_before_any_curvature_raises():
    kernel = keras.Variable(np.ones((3, 2), "float32"), name="kernel")
    opt = keras_tnt.TNT()
    with pytest.raises(ValueError, match="FisherModel"):
        opt.apply([keras.ops.ones((3, 2))], [kernel])
    opt.build([kernel])
    with pytest.raises(ValueError, match="update_curvature"):
        opt.apply([keras.ops.ones((3, 2))], [kernel])
    np.testing.assert_array_equal(np.asarray(kernel), 1.0)
    # A warm start alone is a curvature source.
    opt.accumulate_curvature([keras.ops.ones((3, 2))])
    opt.apply([keras.ops.ones((3, 2))], [kernel])
    assert int(opt.iterations) == 1


def test_curvature_before_build_raises():
    opt = keras_tnt.TNT()
    with pytest.raises(ValueError, match="build"):
        opt.update_curvature([keras.ops.ones((3, 2))])
    with pytest.raises(ValueError, match="build"):
        opt.accumulate_curvature([keras.ops.ones((3, 2))])
    with pytest.raises(ValueError, match="build"):
        opt.curvature_due()


def test_wrong_number_of_gradients_raises():
    kernel = keras.Variable(np.ones((3, 2), "float32"), name="kernel")
    bias = keras.Variable(np.ones((2,), "float32"), name="bias")
    opt = keras_tnt.TNT()
    opt.build([kernel, bias])
    with pytest.raises(ValueError, match="one gradient per trainable variable"):
        opt.update_curvature([keras.ops.ones((3, 2))])
    with pytest.raises(
        ValueError, match=r"with \(2\) when `trainable_variables` is not given; received 3"
    ):
        opt.update_curvature([keras.ops.ones((3, 2)), keras.ops.ones((2,)), keras.ops.ones((2,))])
    assert opt.curvature_updates == 0
    opt.update_curvature([keras.ops.ones((3, 2)), keras.ops.ones((2,))])
    with pytest.raises(ValueError, match="Received a list of 1 gradients, but the optimizer is"):
        opt.apply([keras.ops.ones((3, 2))])


def test_nan_statistics_fail_the_refresh_and_keep_the_inverses():
    """With ρ = 0 a finite gradient whose contraction overflows (inf on the diagonal) followed by
    any batch gives NaN statistics (0 · inf); the refresh then fails for every factor, counted,
    and the inverses keep their values, whichever factor holds the NaN (the first factor's
    trace, which normalises all of them, included: not zero factors and inverses I/ε)."""
    w = keras.Variable(np.ones((2, 3), "float32"))
    opt = keras_tnt.TNT(learning_rate=0.1, statistics_decay=0.0, damping=1e-3)
    opt.build([w])
    opt.update_curvature([np.full((2, 3), 1e20, "float32")], [w])
    opt.update_curvature([np.ones((2, 3), "float32")], [w])
    assert all(np.isnan(np.array(h)).any() for h in opt.statistics(w))
    before = [np.array(a) for a in opt.inverses(w)]
    opt.apply([np.ones((2, 3), "float32")], [w])
    assert opt.failed_inversions == 2
    for a, b in zip(opt.inverses(w), before, strict=True):
        np.testing.assert_array_equal(np.array(a), b)
