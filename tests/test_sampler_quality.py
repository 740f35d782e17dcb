"""The counter-based generator of keras_tnt.sampling as a random number generator.

Each test draws from fixed seeds (so it is deterministic) and applies a classical test at the
significance level ALPHA: uniformity (chi-square over bins), independence between consecutive
training steps, replicas (slices of a global batch), streams, seeds and neighbouring element
positions (pairwise chi-square on a 2-D grid and serial correlation), and a Kolmogorov-Smirnov
test of the Box-Muller normals. A generator with a defect these tests look for (a biased bit, a
step or position that leaks into the next draw, streams that coincide) fails them by orders of
magnitude: the checks at the bottom feed them such defects (NumPy arrays with the defect, and
keras_tnt.sampling itself with its word generator made defective: one bit set 53% of the time,
streams that ignore their stream, seed or position) and see the same checks reject them.

On both backends: the hashing runs in keras.ops on uint32 words, which each backend computes.
"""

from __future__ import annotations

import numpy as np
import pytest
from keras import ops
from scipy import stats

from keras_tnt import sampling
from tests.conftest import BOTH_BACKENDS
from tests.conftest import compiled

pytestmark = BOTH_BACKENDS

ALPHA = 1e-3
N = 100_000
BINS = 100
GRID = 16  # 256 cells of a pairwise test, about 390 expected draws each


def _uniform(seed, n=N, dtype="float32", stream=0, first=0):
    return np.asarray(
        sampling.counter_uniform((n,), np.array(seed, "int64"), dtype, stream=stream, first=first)
    ).astype("float64")


def _uniformity_p(u):
    counts = np.histogram(u, bins=BINS, range=(0.0, 1.0))[0]
    return stats.chisquare(counts).pvalue


def _pairs_p(u, v):
    """Chi-square p-value of independence and uniformity of the pairs (u_i, v_i)."""
    counts = np.histogram2d(u, v, bins=GRID, range=[[0, 1], [0, 1]])[0].ravel()
    return stats.chisquare(counts).pvalue


def _correlation_ok(u, v):
    # |r| of independent samples is about N(0, 1/n): 4.4 standard deviations is ALPHA / 100.
    r = np.corrcoef(u, v)[0, 1]
    return abs(r) < 4.4 / np.sqrt(len(u))


def _low_and_high_bits_p(u, bits):
    """u = (k + 1/2) 2^-bits with k an integer of ``bits`` bits: the chi-square p-values of
    k's lowest and highest 8 bits (asserting that u is on that grid)."""
    k = u * 2.0**bits - 0.5
    np.testing.assert_array_equal(k, np.round(k))
    k = k.astype(np.int64)
    assert 0 <= k.min() and k.max() < 2**bits
    low = stats.chisquare(np.bincount(k % 256, minlength=256)).pvalue
    high = stats.chisquare(np.bincount(k >> (bits - 8), minlength=256)).pvalue
    return low, high


RELATED = {  # draws that must be independent of those of seed [7, 0, 3], stream 0, position 0
    "the next training step": {"seed": [7, 0, 4]},
    "the warm-start stream": {"seed": [7, 1, 3]},
    "another fisher_seed": {"seed": [8, 0, 3]},
    "another internal stream (Box-Muller's first)": {"stream": 1},
    "the next replica's slice": {"first": N},
    "the neighbouring element position": {"first": 1},
}


def _related_draws(what):
    base = {"seed": [7, 0, 3], "stream": 0, "first": 0}
    return _uniform(**base), _uniform(**{**base, **RELATED[what]})


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_uniform_draws_are_uniform_in_the_open_interval(dtype):
    u = _uniform([7, 0, 3], dtype=dtype)
    assert 0.0 < u.min() and u.max() < 1.0
    assert _uniformity_p(u) > ALPHA
    # The finest scale too: the last 1/BINS of the interval, split again into BINS bins.
    fine = u[u < 1.0 / BINS] * BINS
    assert _uniformity_p(fine) > ALPHA
    assert stats.kstest(u, "uniform").pvalue > ALPHA


@pytest.mark.parametrize("dtype, bits", [("float32", 23), ("float64", 52)])
def test_draws_are_exact_grid_points_with_uniform_low_bits(dtype, bits):
    """u = (k + 1/2) 2^-bits exactly, k uniform on all its bits (the lowest ones included), so
    u is never 0 or 1."""
    u = _uniform([1, 2, 3], n=100_000, dtype=dtype)
    low, high = _low_and_high_bits_p(u, bits)
    assert low > ALPHA and high > ALPHA
    k = (u * 2.0**bits - 0.5).astype(np.int64)
    assert len(np.unique(k)) > 0.99 * len(k)


@pytest.mark.parametrize("what", sorted(RELATED))
def test_draws_are_independent_of_related_draws(what):
    u, v = _related_draws(what)
    assert _uniformity_p(v) > ALPHA, what
    assert _pairs_p(u, v) > ALPHA, what
    assert _correlation_ok(u, v), what


def test_serial_correlation_within_a_draw_is_absent():
    u = _uniform([3, 0, 11])
    for lag in (1, 2, 7, 64):
        assert _correlation_ok(u[:-lag], u[lag:]), lag
        assert _pairs_p(u[:-lag], u[lag:]) > ALPHA, lag


def test_steps_are_independent_over_many_steps():
    """The first draw of each of 1,000 consecutive steps: uniform, no step-to-step pattern."""
    # Compiled once for every step's seed (as the training step draws), not 1,000 eager calls.
    draw = compiled(lambda seed: sampling.counter_uniform((1,), seed, "float32"), jit_compile=True)
    u = np.array(
        [np.asarray(draw(ops.convert_to_tensor([5, 0, t], "int64")))[0] for t in range(1000)],
        "float64",
    )
    assert stats.kstest(u, "uniform").pvalue > ALPHA
    assert _correlation_ok(u[:-1], u[1:])


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_box_muller_normals_pass_kolmogorov_smirnov(dtype):
    z = np.asarray(sampling.counter_normal((N,), np.array([7, 0, 3], "int64"), dtype))
    assert stats.kstest(z, "norm").pvalue > ALPHA
    assert abs(z.mean()) < 4.4 / np.sqrt(N)
    assert abs(z.var() - 1.0) < 4.4 * np.sqrt(2.0 / N)
    assert _correlation_ok(z[:-1], z[1:])
    # Tails: P(|z| > 3) = 0.0027; the count is binomial.
    tail = np.sum(np.abs(z) > 3)
    assert stats.binomtest(int(tail), N, 2 * stats.norm.sf(3)).pvalue > ALPHA


def test_the_tests_reject_defective_generators():
    """The same tests on generators with a known defect fail: they can detect what they
    claim to detect at these sample sizes."""
    rng = np.random.default_rng(0)
    good = rng.random(N)
    assert _uniformity_p(good) > ALPHA
    assert _uniformity_p(good**1.05) < ALPHA  # slightly biased
    repeated = good + 0.02 * rng.random(N)
    assert _pairs_p(good, np.mod(repeated, 1.0)) < ALPHA  # a step leaking into the next
    assert not _correlation_ok(good, np.mod(repeated, 1.0))
    leaky = good.copy()  # every other position close to its neighbour
    leaky[1::2] = np.mod(leaky[0::2] + 0.2 * rng.random(N // 2), 1.0)
    assert _pairs_p(leaky[:-1], leaky[1:]) < ALPHA
    assert stats.kstest(rng.standard_t(30, N), "norm").pvalue < ALPHA  # heavier tails


# ------------------------------------------------------------------------------------------
# keras_tnt.sampling with a defective word generator: the checks above must reject it.


def _bias_one_bit(bit):
    """``_random_words`` whose ``bit`` is set with probability 17/32: ORed with a bit that is
    the AND of four bits of an unrelated word (set with probability 1/16)."""
    words = sampling._random_words

    def biased(size, seed, stream, first=0):
        w = words(size, seed, stream, first)
        other = words(size, seed, stream + 1000, first)
        rare = other
        for shift in (1, 2, 3):
            rare = ops.bitwise_and(rare, ops.right_shift(other, sampling._u32(shift)))
        rare = ops.bitwise_and(rare, sampling._u32(1))
        return ops.bitwise_or(w, ops.left_shift(rare, sampling._u32(bit)))

    return biased


@pytest.mark.parametrize(
    "dtype, bits, bit",
    [("float32", 23, 9), ("float32", 23, 31), ("float64", 52, 9), ("float64", 52, 31)],
    ids=["float32-lowest", "float32-top", "float64-low", "float64-top"],
)
def test_a_biased_bit_is_rejected(monkeypatch, dtype, bits, bit):
    """Bit 9 of a word is the lowest bit of a float32 draw and bit 3 of a float64 one (both in
    k's low byte), bit 31 the top bit of either: the check of
    test_draws_are_exact_grid_points_with_uniform_low_bits rejects the bias, by orders of
    magnitude."""
    monkeypatch.setattr(sampling, "_random_words", _bias_one_bit(bit))
    u = _uniform([1, 2, 3], n=100_000, dtype=dtype)
    low, high = _low_and_high_bits_p(u, bits)
    assert min(low, high) < ALPHA * 1e-3, (low, high)
    if bit == 31:
        assert high < ALPHA * 1e-3 and _uniformity_p(u) < ALPHA * 1e-3


COINCIDING = {  # the defect: the word generator ignores ... -> the related draw that coincides
    "its stream": ("stream", "another internal stream (Box-Muller's first)"),
    "the warm-start word of the seed": ("seed", "the warm-start stream"),
    "the replica's first position": ("first", "the next replica's slice"),
}


@pytest.mark.parametrize("ignored", sorted(COINCIDING))
def test_coinciding_streams_are_rejected(monkeypatch, ignored):
    """Streams that coincide (the word generator ignores its stream, a word of the seed or the
    replica's offset): the check of test_draws_are_independent_of_related_draws rejects them."""
    argument, what = COINCIDING[ignored]
    words = sampling._random_words

    def coinciding(size, seed, stream, first=0):
        if argument == "stream":
            stream = 0
        elif argument == "seed":
            seed = ops.convert_to_tensor(seed)
            seed = ops.stack([seed[0], ops.zeros_like(seed[1]), seed[2]])
        else:
            first = 0
        return words(size, seed, stream, first)

    monkeypatch.setattr(sampling, "_random_words", coinciding)
    u, v = _related_draws(what)
    assert _uniformity_p(v) > ALPHA  # each stream alone still looks uniform ...
    assert _pairs_p(u, v) < ALPHA * 1e-3 and not _correlation_ok(u, v)  # ... together not
    if argument == "stream":  # Box-Muller's two uniforms coincide: not normal
        z = np.asarray(sampling.counter_normal((N,), np.array([7, 0, 3], "int64"), "float32"))
        assert stats.kstest(z, "norm").pvalue < ALPHA * 1e-3
