"""Paired bootstrap 95 % intervals of the difference of a metric between two systems scored on the
same items (utterances, text windows, audio clips), and the verdict words the benchmarks may use.

A corpus metric is a ratio of sums over items: WER = sum(word errors) / sum(reference words), CER
likewise with characters, a decision-flip rate = sum(flips) / sum(chunks), perplexity =
exp(sum(NLL) / sum(tokens)). The paired bootstrap resamples *items* with replacement (the same
items for both systems: that is the pairing), recomputes both systems' metric on each resample and
takes the 2.5th and 97.5th percentiles of the difference B - A (Koehn 2004; Bisani & Ney 2004).

Verdicts (lower is better for every metric here):
- "better": the whole interval is below 0; "worse": the whole interval is above 0;
- "no worse": the interval's upper end is at most `margin` (a tolerance the caller states, in
  the metric's units; 0 by default, so "no worse" then needs the interval to sit at or below 0);
- otherwise "within noise": the data cannot tell the two apart at 95 %.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

RESAMPLES = 2000
SEED = 0


@dataclass(frozen=True)
class Interval:
    """B - A on all items (`estimate`) and its paired bootstrap 95 % interval."""

    estimate: float
    low: float
    high: float
    items: int

    def contains(self, value: float) -> bool:
        return self.low <= value <= self.high

    def verdict(self, margin: float = 0.0) -> str:
        """How B compares with A (lower is better); see the module docstring."""
        if self.high < 0:
            return "better"
        if self.low > 0:
            return "worse"
        if self.high <= margin:
            return "no worse"
        return "within noise"

    def describe(self, scale: float = 1.0, unit: str = "", digits: int = 2) -> str:
        e, lo, hi = (scale * v for v in (self.estimate, self.low, self.high))
        return f"{e:+.{digits}f}{unit} [{lo:+.{digits}f}, {hi:+.{digits}f}] 95 % CI over {self.items} items"


def _indices(items: int, resamples: int, seed: int) -> np.ndarray:
    if items < 2:
        raise ValueError(f"a bootstrap needs at least 2 items, not {items}")
    return np.random.default_rng(seed).integers(0, items, size=(resamples, items))


def _arrays(*columns: Sequence[float]) -> list[np.ndarray]:
    arrays = [np.asarray(c, dtype=np.float64) for c in columns]
    if len({a.shape for a in arrays}) != 1 or arrays[0].ndim != 1:
        raise ValueError(f"paired per-item columns must be 1-D and of one length, not {[a.shape for a in arrays]}")
    return arrays


def rate_difference(errors_a: Sequence[float], errors_b: Sequence[float], counts: Sequence[float], *,
                    resamples: int = RESAMPLES, seed: int = SEED) -> Interval:
    """Pooled rate sum(errors) / sum(counts) of B minus A (WER, CER, flip rate), paired over items.

    `counts` may differ per system only if the caller passes the same reference (WER/CER: the
    reference words are the same for both systems).
    """
    ea, eb, n = _arrays(errors_a, errors_b, counts)
    idx = _indices(len(n), resamples, seed)
    total = np.maximum(n[idx].sum(axis=1), 1e-300)
    diffs = (eb[idx].sum(axis=1) - ea[idx].sum(axis=1)) / total
    low, high = np.percentile(diffs, [2.5, 97.5])
    return Interval(float((eb.sum() - ea.sum()) / n.sum()), float(low), float(high), len(n))


def perplexity_difference(nll_a: Sequence[float], nll_b: Sequence[float], tokens: Sequence[float], *,
                          resamples: int = RESAMPLES, seed: int = SEED) -> Interval:
    """exp(sum NLL / sum tokens) of B minus A, paired over items (text windows)."""
    la, lb, n = _arrays(nll_a, nll_b, tokens)
    idx = _indices(len(n), resamples, seed)
    total = n[idx].sum(axis=1)
    diffs = np.exp(lb[idx].sum(axis=1) / total) - np.exp(la[idx].sum(axis=1) / total)
    low, high = np.percentile(diffs, [2.5, 97.5])
    return Interval(float(math.exp(lb.sum() / n.sum()) - math.exp(la.sum() / n.sum())), float(low), float(high), len(n))


def mean_difference(a: Sequence[float], b: Sequence[float], *, resamples: int = RESAMPLES,
                    seed: int = SEED) -> Interval:
    """Mean of B minus mean of A over paired items (e.g. per-clip KL, per-clip flip rate)."""
    xa, xb = _arrays(a, b)
    d = xb - xa
    idx = _indices(len(d), resamples, seed)
    low, high = np.percentile(d[idx].mean(axis=1), [2.5, 97.5])
    return Interval(float(d.mean()), float(low), float(high), len(d))


def task_difference(metric: str, items_a: Sequence[Sequence[float]], items_b: Sequence[Sequence[float]], *,
                    resamples: int = RESAMPLES, seed: int = SEED) -> Interval:
    """B - A of a task metric from the per-item lists models/eval_asr.py and eval_lm.py return
    (`items`): "wer" and "cer" from [word errors, words, char errors, chars] per utterance,
    "perplexity" from [NLL, tokens] per window."""
    a, b = np.asarray(items_a, dtype=np.float64), np.asarray(items_b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"the two systems were scored on different items: {a.shape} vs {b.shape}")
    if metric == "wer":
        return rate_difference(a[:, 0], b[:, 0], a[:, 1], resamples=resamples, seed=seed)
    if metric == "cer":
        return rate_difference(a[:, 2], b[:, 2], a[:, 3], resamples=resamples, seed=seed)
    if metric == "perplexity":
        return perplexity_difference(a[:, 0], b[:, 0], a[:, 1], resamples=resamples, seed=seed)
    raise ValueError(f"unknown task metric {metric!r}: wer, cer or perplexity")


__all__ = ["task_difference", "Interval", "rate_difference", "perplexity_difference", "mean_difference", "RESAMPLES"]
