"""Observers: streaming statistics of one tensor over the calibration data, and the clipping
range each method derives from them (min/max, percentile, entropy, MSE).

Histograms use a fixed number of bins over [-R, R), R a power of two; when a value falls
outside, R doubles and adjacent bins merge pairwise, which re-bins exactly (no interpolation). Memory per tensor is
constant whatever the amount of data, and the resolution is never coarser than 2 max|x| / bins.
"""

from __future__ import annotations

import enum
import math
from typing import ClassVar, Protocol

import numpy as np

from q4c.errors import ConfigError

#: bins of the two-sided histogram (the entropy search sees half of them, over |x|)
DEFAULT_BINS = 4096
DEFAULT_PERCENTILE = 99.99
#: quantization levels of uint8 activations
LEVELS = 255


class Method(enum.StrEnum):
    """The clipping-range methods (a StrEnum: equal to, and stored as, their names)."""

    MINMAX = "minmax"
    PERCENTILE = "percentile"
    ENTROPY = "entropy"
    MSE = "mse"


class Observer(Protocol):
    """Statistics of one tensor: `update(x)` per batch, `range()` the clipping range."""

    method: ClassVar[str]

    def update(self, x: np.ndarray) -> None: ...

    def range(self) -> tuple[float, float]: ...


class MinMaxObserver:
    """Exact min, max, mean and standard deviation; range = [min, max]."""

    method: ClassVar[Method] = Method.MINMAX

    def __init__(self) -> None:
        self.count = 0
        #: infinities and NaNs seen (an attention mask's -inf): left out of every statistic
        self.nonfinite = 0
        self.min = math.inf
        self.max = -math.inf
        self._sum = 0.0
        self._sumsq = 0.0

    def update(self, x: np.ndarray) -> None:
        self._finite(x)

    def _finite(self, x: np.ndarray) -> np.ndarray:
        """Update the exact statistics; return the finite values, flattened."""
        flat = np.asarray(x).reshape(-1)
        if flat.size == 0:
            return flat
        lo, hi = float(flat.min()), float(flat.max())
        if not (math.isfinite(lo) and math.isfinite(hi)):  # min/max propagate NaN and show infinities
            finite = np.isfinite(flat)
            self.nonfinite += int(flat.size - np.count_nonzero(finite))
            flat = flat[finite]
            if flat.size == 0:
                return flat
            lo, hi = float(flat.min()), float(flat.max())
        self.count += flat.size
        self.min = min(self.min, lo)
        self.max = max(self.max, hi)
        self._sum += float(np.sum(flat, dtype=np.float64))
        self._sumsq += float(np.dot(flat, flat))
        return flat

    @property
    def mean(self) -> float:
        return self._sum / self.count if self.count else 0.0

    @property
    def std(self) -> float:
        if not self.count:
            return 0.0
        return math.sqrt(max(self._sumsq / self.count - self.mean ** 2, 0.0))

    def range(self) -> tuple[float, float]:
        if not self.count:
            return 0.0, 0.0
        return self.min, self.max


class HistogramObserver(MinMaxObserver):
    """Min/max plus a streaming histogram; subclasses choose the range from it."""

    def __init__(self, bins: int = DEFAULT_BINS) -> None:
        super().__init__()
        if bins < 8 or bins % 4:
            raise ConfigError(f"histogram bins must be a multiple of 4 and >= 8, not {bins}")
        self.bins = bins
        self.counts = np.zeros(bins, np.int64)
        self.half_range = 0.0  # R: bins cover [-R, R)
        self._zeros = 0  # values seen while R was still 0 (all exactly zero)

    def update(self, x: np.ndarray) -> None:
        flat = self._finite(x)
        if flat.size == 0:
            return
        amax = max(-self.min, self.max)  # over everything seen: R already covers earlier batches
        if amax == 0.0 and self.half_range == 0.0:
            self._zeros += flat.size
            return
        if self.half_range == 0.0:
            # a power of two above max|x|: the largest value never sits on the top edge, and
            # every histogram shares one dyadic grid
            self.half_range = 2.0 ** (math.floor(math.log2(amax)) + 1)
            self.counts[self.bins // 2] += self._zeros
            self._zeros = 0
        while amax >= self.half_range:
            self._double()
        # bin = floor((x + R) / width), in float32: a value on a bin edge may land either side
        index = ((flat.astype(np.float32, copy=False) + np.float32(self.half_range))
                 * np.float32(self.bins / (2.0 * self.half_range))).astype(np.int64)
        np.clip(index, 0, self.bins - 1, out=index)
        self.counts += np.bincount(index, minlength=self.bins)

    def _double(self) -> None:
        """R -> 2R: bin i of [-R, R) lands in bin bins/4 + i // 2 of [-2R, 2R)."""
        merged = self.counts.reshape(-1, 2).sum(axis=1)
        quarter = self.bins // 4
        self.counts = np.concatenate([np.zeros(quarter, np.int64), merged, np.zeros(quarter, np.int64)])
        self.half_range *= 2.0

    def edges(self) -> np.ndarray:
        return np.linspace(-self.half_range, self.half_range, self.bins + 1)

    def centers(self) -> np.ndarray:
        e = self.edges()
        return (e[:-1] + e[1:]) / 2

    def _clamp(self, lo: float, hi: float) -> tuple[float, float]:
        """Inside the observed [min, max], and never an empty range."""
        lo, hi = max(lo, self.min), min(hi, self.max)
        if hi < lo:
            lo, hi = self.min, self.max
        return float(lo), float(hi)


class PercentileObserver(HistogramObserver):
    """Range = [p_low, p_high] quantiles: each tail beyond them holds (100 - p) % of the values."""

    method: ClassVar[Method] = Method.PERCENTILE

    def __init__(self, bins: int = DEFAULT_BINS, percentile: float = DEFAULT_PERCENTILE) -> None:
        super().__init__(bins)
        if not 50.0 < percentile <= 100.0:
            raise ConfigError(f"percentile must be in (50, 100], not {percentile}")
        self.percentile = percentile

    def range(self) -> tuple[float, float]:
        if not self.count or self.half_range == 0.0:
            return super().range()
        cdf = np.cumsum(self.counts) / self.counts.sum()
        tail = 1.0 - self.percentile / 100.0
        edges = self.edges()
        lo = edges[int(np.searchsorted(cdf, tail, side="right"))] if tail > 0 else self.min
        hi = edges[int(np.searchsorted(cdf, 1.0 - tail, side="left")) + 1] if tail > 0 else self.max
        return self._clamp(lo, hi)


class EntropyObserver(HistogramObserver):
    """TensorRT's KL-divergence calibration: the threshold T minimizing KL(P || Q), P the |x|
    histogram clipped at T (outliers added to its last bin), Q that histogram quantized to the
    levels [0, T] will have. Range = [-T, T] clamped to the observed [min, max], so with uint8's
    255 steps over that range, [0, T] gets 255 T / (min(max, T) + min(-min, T)) of them: 255 for
    a one-signed tensor, ~128 for a symmetric one (TensorRT's int8 case)."""

    method: ClassVar[Method] = Method.ENTROPY
    #: thresholds tried (evenly spaced bin counts of the |x| histogram)
    CANDIDATES = 256

    def range(self) -> tuple[float, float]:
        if not self.count or self.half_range == 0.0:
            return super().range()
        half = self.bins // 2
        abs_counts = (self.counts[half:] + self.counts[:half][::-1]).astype(np.float64)
        last = int(np.nonzero(abs_counts)[0][-1]) + 1
        smallest = (LEVELS + 1) // 2
        if last <= smallest:
            return self.min, self.max
        candidates = np.unique(np.linspace(smallest, last, self.CANDIDATES).astype(np.int64))
        levels = self.levels(candidates * self.half_range / half)
        kl = kl_divergences(abs_counts[:last], candidates, levels)
        threshold = int(candidates[int(np.argmin(kl))]) * self.half_range / half
        return self._clamp(-threshold, threshold)

    def levels(self, thresholds: np.ndarray) -> np.ndarray:
        """uint8 steps that fall on [0, T] for each threshold T."""
        t = np.asarray(thresholds, np.float64)
        width = np.minimum(max(self.max, 0.0), t) + np.minimum(max(-self.min, 0.0), t)
        return np.clip(np.rint(LEVELS * t / np.maximum(width, 1e-30)), 1, LEVELS).astype(np.int64)


def kl_divergences(hist: np.ndarray, candidates: np.ndarray, levels: int | np.ndarray) -> np.ndarray:
    """KL(P_i || Q_i) for each candidate bin count i, as TensorRT's calibrator defines them.

    P_i: the first i bins, the mass beyond added to bin i-1. Q_i: those i bins (without the
    outliers) merged into `levels` groups, each group's mass spread evenly over its non-empty
    bins. `levels` is one count or one per candidate. Computed per group rather than per bin:
    with cumulative sums of h and h log h, every candidate costs O(levels), not O(bins).
    """
    hist = np.asarray(hist, np.float64)
    cand = np.asarray(candidates, np.int64)
    rows = np.arange(cand.size)
    cum = np.concatenate([[0.0], np.cumsum(hist)])
    cum_nz = np.concatenate([[0.0], np.cumsum(hist > 0)])
    with np.errstate(divide="ignore", invalid="ignore"):
        hlogh = np.where(hist > 0, hist * np.log(np.where(hist > 0, hist, 1.0)), 0.0)
    cum_hlogh = np.concatenate([[0.0], np.cumsum(hlogh)])
    total = cum[-1]
    lv = np.broadcast_to(np.asarray(levels, np.int64), cand.shape)[:, None]
    # ceil(k i / L); groups past a candidate's own L are empty (start = end = i)
    bounds = np.minimum(-(-(np.arange(int(lv.max()) + 1)[None, :] * cand[:, None]) // lv), cand[:, None])
    mass = cum[bounds[:, 1:]] - cum[bounds[:, :-1]]
    support = np.maximum(cum_nz[bounds[:, 1:]] - cum_nz[bounds[:, :-1]], 1.0)
    log_q = np.log(np.where(mass > 0, mass / support, 1.0))  # q of each non-empty bin of a group
    cross = np.sum(mass * log_q, axis=1)  # sum over kept bins of h log q
    kept = cum[cand]  # = sum of Q_i before normalization
    last = cand - 1
    h_last = hist[last]
    p_last = h_last + (total - kept)
    log_q_last = np.where(h_last > 0, log_q[rows, (last * lv[:, 0]) // cand], np.log(1e-12) + np.log(np.maximum(kept, 1e-300)))
    cross += p_last * log_q_last - np.where(h_last > 0, h_last * log_q_last, 0.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        plogp = cum_hlogh[last] + np.where(p_last > 0, p_last * np.log(np.where(p_last > 0, p_last, 1.0)), 0.0)
        kl = (plogp - cross) / total + np.log(kept / total)
    return np.where(kept > 0, kl, np.inf)


class MseObserver(HistogramObserver):
    """Range = the shrink of [min(min, 0), max(max, 0)] minimizing the expected squared error of
    uint8 asymmetric quantization (clipping + rounding), estimated on the histogram."""

    method: ClassVar[Method] = Method.MSE
    SHRINKS = np.linspace(1.0, 0.05, 96)

    def range(self) -> tuple[float, float]:
        if not self.count or self.half_range == 0.0:
            return super().range()
        lo0, hi0 = min(self.min, 0.0), max(self.max, 0.0)
        centers = self.centers()
        used = self.counts > 0
        c, n = centers[used], self.counts[used].astype(np.float64)
        shrinks = self.SHRINKS[:, None]
        lo, hi = lo0 * shrinks, hi0 * shrinks
        scale = np.float32((hi - lo) / LEVELS).astype(np.float64)
        scale = np.where(scale > 0, scale, 1.0)
        zp = np.clip(np.rint(-lo / scale), 0, LEVELS)
        q = np.clip(np.rint(c[None, :] / scale) + zp, 0, LEVELS)
        err = np.sum(n[None, :] * np.square((q - zp) * scale - c[None, :]), axis=1)
        best = int(np.argmin(err))
        return self._clamp(float(lo[best, 0]), float(hi[best, 0]))


OBSERVERS: dict[str, type[MinMaxObserver]] = {
    cls.method: cls for cls in (MinMaxObserver, PercentileObserver, EntropyObserver, MseObserver)
}


def make_observer(method: str, *, bins: int = DEFAULT_BINS, percentile: float = DEFAULT_PERCENTILE) -> MinMaxObserver:
    if method not in OBSERVERS:
        raise ConfigError(f"observer must be one of {', '.join(OBSERVERS)}, not {method!r}")
    kind = Method(method)
    if kind is Method.MINMAX:
        return MinMaxObserver()
    if kind is Method.PERCENTILE:
        return PercentileObserver(bins, percentile)
    return OBSERVERS[kind](bins)  # type: ignore[call-arg]


def uint8_qparams(lo: float, hi: float) -> tuple[float, int]:
    """Scale and zero point of per-tensor asymmetric uint8 quantization covering [lo, hi] and 0
    (so that zero, padding and ReLU's floor, is exact)."""
    lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
    scale = float(np.float32((hi - lo) / LEVELS))
    if scale <= 0.0 or not math.isfinite(scale):
        return 1.0, 0
    zp = int(np.clip(np.rint(-lo / scale), 0, LEVELS))
    return scale, zp
