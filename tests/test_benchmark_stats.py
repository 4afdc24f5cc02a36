"""benchmarks/stats.py: paired bootstrap intervals on hand-built cases."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import stats  # noqa: E402


def test_identical_systems_give_a_narrow_interval_around_zero(rng):
    errors = rng.integers(0, 5, size=200)
    words = rng.integers(5, 15, size=200)
    iv = stats.rate_difference(errors, errors, words)
    assert iv.estimate == 0 and iv.low == 0 and iv.high == 0  # every resample differs by exactly 0
    assert iv.contains(0) and iv.verdict() == "no worse"


def test_a_known_shift_excludes_zero(rng):
    words = np.full(200, 10)
    a = rng.integers(0, 4, size=200)
    b = a + 1  # one more error in every 10-word utterance: WER +10 points exactly
    iv = stats.rate_difference(a, b, words)
    assert iv.estimate == pytest.approx(0.1)
    assert iv.low == pytest.approx(0.1) and iv.high == pytest.approx(0.1)
    assert iv.verdict() == "worse"
    assert stats.rate_difference(b, a, words).verdict() == "better"


def test_noisy_small_difference_is_within_noise_not_no_worse(rng):
    words = np.full(100, 10)
    a = rng.integers(0, 6, size=100)
    b = a.copy()
    b[0] += 1  # one word in 1,000: the data cannot tell them apart
    b[1] -= 1 if b[1] > 0 else 0
    b[2] += 1
    iv = stats.rate_difference(a, b, words)
    assert iv.low <= 0 <= iv.high and iv.high > 0
    assert iv.verdict() == "within noise"
    assert iv.verdict(margin=0.01) == "no worse"  # a stated 1-point tolerance covers it
    assert iv.high - iv.low < 0.01  # and the interval is narrow


def test_perplexity_difference_by_hand():
    tokens = [10, 10, 10]
    nll_a = [20.0, 20.0, 20.0]  # ppl e^2
    nll_b = [30.0, 30.0, 30.0]  # ppl e^3
    iv = stats.perplexity_difference(nll_a, nll_b, tokens, resamples=200)
    assert iv.estimate == pytest.approx(math.e**3 - math.e**2)
    assert iv.low == pytest.approx(iv.estimate) and iv.verdict() == "worse"


def test_mean_difference_of_a_shift(rng):
    a = rng.standard_normal(300)
    iv = stats.mean_difference(a, a + 0.5 + 0.01 * rng.standard_normal(300))
    assert 0.49 < iv.low < iv.estimate < iv.high < 0.51


def test_mismatched_lengths_are_refused():
    with pytest.raises(ValueError):
        stats.rate_difference([1, 2], [1, 2, 3], [5, 5])


def test_task_difference_reads_the_eval_items_by_hand():
    # [word errors, words, char errors, chars]: B makes 1 more word error in 20 words, 2 fewer char errors in 100
    a = [[2, 10, 5, 50], [3, 10, 5, 50]]
    b = [[3, 10, 4, 50], [3, 10, 4, 50]]
    assert stats.task_difference("wer", a, b, resamples=50).estimate == pytest.approx(1 / 20)
    assert stats.task_difference("cer", a, b, resamples=50).estimate == pytest.approx(-2 / 100)
    ppl = stats.task_difference("perplexity", [[10.0, 5], [10.0, 5]], [[10.0, 5], [10.0, 5]], resamples=50)
    assert ppl.estimate == 0 and ppl.verdict() == "no worse"
