"""Observers: exact streaming statistics, exact re-binning when the histogram range grows, and
each method's range checked against an independent computation."""

from __future__ import annotations

import math

import numpy as np
import pytest

from q4c.calib.observers import (
    EntropyObserver,
    HistogramObserver,
    MinMaxObserver,
    MseObserver,
    PercentileObserver,
    kl_divergences,
    make_observer,
    uint8_qparams,
)
from q4c.errors import ConfigError


def _stream(observer, x, chunks=10):
    for part in np.array_split(x, chunks):
        observer.update(part)
    return observer


def _uint8_mse(x: np.ndarray, lo: float, hi: float) -> float:
    """Fake-quantize x with the range's uint8 parameters, as QuantizeLinear/DequantizeLinear do."""
    scale, zp = uint8_qparams(lo, hi)
    q = np.clip(np.rint(x / np.float32(scale)) + zp, 0, 255)
    return float(np.mean(np.square((q - zp) * np.float32(scale) - x)))


def test_minmax_mean_std_are_exact_over_chunks(rng):
    x = (rng.standard_normal(50_000) * 3 + 1).astype(np.float32)
    obs = _stream(MinMaxObserver(), x)
    assert obs.range() == (float(x.min()), float(x.max()))
    assert obs.count == x.size
    assert obs.mean == pytest.approx(float(np.mean(x, dtype=np.float64)), rel=1e-6)
    assert obs.std == pytest.approx(float(np.std(x, dtype=np.float64)), rel=1e-5)


def test_non_finite_values_are_counted_and_left_out():
    obs = HistogramObserver(bins=16)
    obs.update(np.array([1.0, -np.inf, np.nan, -2.0, np.inf], np.float32))  # an attention mask's -inf
    assert obs.range() == (-2.0, 1.0) and obs.nonfinite == 3 and obs.count == 2
    assert obs.counts.sum() == 2


def test_histogram_growth_rebins_exactly():
    bins = 64
    grown = HistogramObserver(bins=bins)
    first = np.array([0.5, -0.25, 0.0, 0.3], np.float32)  # R = 1
    assert (grown.update(first), grown.half_range) == (None, 1.0)
    wide = np.array([3.9, -3.1, 1.7, -0.6], np.float32)  # R doubles twice, to 4
    grown.update(wide)
    assert grown.half_range == 4.0
    # the same data binned directly on [-4, 4) by numpy: identical counts
    direct, _ = np.histogram(np.concatenate([first, wide]), bins=np.linspace(-4.0, 4.0, bins + 1))
    np.testing.assert_array_equal(grown.counts, direct)


def test_histogram_memory_is_bounded(rng):
    obs = HistogramObserver(bins=256)
    for i in range(50):
        obs.update(rng.standard_normal(1000).astype(np.float32) * (i + 1))
    assert obs.counts.shape == (256,) and obs.counts.sum() == 50_000


def test_percentile_matches_numpy_within_a_bin(rng):
    x = rng.standard_t(3, 200_000).astype(np.float32)
    obs = _stream(PercentileObserver(percentile=99.9), x)
    lo, hi = obs.range()
    width = 2 * obs.half_range / obs.bins  # the answer is a bin edge next to the true quantile
    assert abs(lo - np.percentile(x, 0.1)) <= 2 * width
    assert abs(hi - np.percentile(x, 99.9)) <= 2 * width
    assert abs(hi - np.percentile(x, 99.9)) < 0.01 * hi


def _kl_reference(hist: np.ndarray, i: int, levels: int) -> float:
    """TensorRT's definition written out bin by bin."""
    p = hist[:i].astype(float).copy()
    p[-1] += hist[i:].sum()
    kept = hist[:i].astype(float)
    q = np.zeros(i)
    for group in range(levels):
        start, end = math.ceil(group * i / levels), math.ceil((group + 1) * i / levels)
        nonzero = kept[start:end] > 0
        if nonzero.any():
            q[start:end][nonzero] = kept[start:end].sum() / nonzero.sum()
    p, q = p / p.sum(), q / q.sum()
    m = p > 0
    return float(np.sum(p[m] * np.log(p[m] / np.maximum(q[m], 1e-12))))


def test_kl_divergences_match_the_bin_by_bin_definition(rng):
    hist = np.histogram(np.abs(rng.standard_t(3, 20_000)), bins=1024)[0].astype(float)
    hist[rng.integers(0, 1024, 200)] = 0  # empty bins inside the range, and possibly the last
    candidates = np.unique(np.linspace(128, 1024, 40).astype(int))
    fast = kl_divergences(hist, candidates, 128)
    slow = np.array([_kl_reference(hist, int(i), 128) for i in candidates])
    np.testing.assert_allclose(fast, slow, rtol=1e-9, atol=1e-12)
    levels = rng.integers(128, 256, candidates.size)  # one level count per candidate
    fast = kl_divergences(hist, candidates, levels)
    slow = np.array([_kl_reference(hist, int(i), int(n)) for i, n in zip(candidates, levels)])
    np.testing.assert_allclose(fast, slow, rtol=1e-9, atol=1e-12)


def test_entropy_picks_the_threshold_of_least_kl(rng):
    heavy = rng.standard_t(2, 100_000).astype(np.float32)
    obs = _stream(EntropyObserver(bins=1024), heavy)
    lo, hi = obs.range()
    half = obs.bins // 2
    abs_hist = (obs.counts[half:] + obs.counts[:half][::-1]).astype(float)
    last = int(np.nonzero(abs_hist)[0][-1]) + 1
    candidates = np.unique(np.linspace(128, last, EntropyObserver.CANDIDATES).astype(int))
    levels = obs.levels(candidates * obs.half_range / half)
    assert levels[0] == 128 and levels[-1] > 128  # symmetric until T passes -min, then more of uint8 on [0, T]
    best = candidates[int(np.argmin([_kl_reference(abs_hist, int(i), int(n)) for i, n in zip(candidates, levels)]))]
    threshold = best * obs.half_range / half
    assert (lo, hi) == pytest.approx((-threshold, threshold))
    assert hi < 0.5 * heavy.max()  # heavy tails are clipped


def test_entropy_on_one_signed_and_uniform_data(rng):
    relu = np.maximum(rng.standard_t(2, 100_000), 0).astype(np.float32)
    lo, hi = _stream(EntropyObserver(), relu).range()
    assert lo == 0.0 and 0 < hi < relu.max()  # all 255 levels on [0, T]
    uniform = rng.uniform(-1, 1, 100_000).astype(np.float32)
    lo, hi = _stream(EntropyObserver(), uniform).range()
    assert lo < -0.95 and hi > 0.95  # nothing to clip


def test_mse_range_is_the_least_squared_error_on_the_raw_data(rng):
    x = rng.standard_t(3, 100_000).astype(np.float32)
    lo, hi = _stream(MseObserver(), x).range()
    lo0, hi0 = float(x.min()), float(x.max())
    raw = [_uint8_mse(x, lo0 * s, hi0 * s) for s in MseObserver.SHRINKS]  # brute force on the data itself
    assert _uint8_mse(x, lo, hi) <= 1.02 * min(raw)
    assert _uint8_mse(x, lo, hi) <= _uint8_mse(x, lo0, hi0)
    u = rng.uniform(0, 6, 100_000).astype(np.float32)  # no outliers: nothing worth clipping
    lo, hi = _stream(MseObserver(), u).range()
    assert lo == pytest.approx(float(u.min()), abs=1e-3) and hi > 5.9


def test_constant_zero_tensor_has_an_empty_range_and_valid_qparams():
    for method in ("minmax", "percentile", "entropy", "mse"):
        obs = make_observer(method)
        obs.update(np.zeros(10, np.float32))
        assert obs.range() == (0.0, 0.0)
    assert uint8_qparams(0.0, 0.0) == (1.0, 0)


def test_uint8_qparams_keep_zero_exact():
    scale, zp = uint8_qparams(-1.0, 3.0)
    assert scale == pytest.approx(4 / 255) and zp == 64
    assert np.rint(0.0 / scale) + zp == zp  # zero quantizes to the zero point, which dequantizes to 0
    assert uint8_qparams(0.5, 2.0) == (pytest.approx(2 / 255), 0)  # range extended down to 0


def test_unknown_observer_and_bad_settings():
    with pytest.raises(ConfigError, match="observer must be one of minmax, percentile, entropy, mse"):
        make_observer("kl")
    with pytest.raises(ConfigError, match="percentile"):
        PercentileObserver(percentile=20)
    with pytest.raises(ConfigError, match="multiple of 4"):
        HistogramObserver(bins=30)
