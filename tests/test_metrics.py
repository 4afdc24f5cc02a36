"""q4c.metrics against hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest

from q4c.metrics import bernoulli_kl, decision_flips, kl_divergence, log_softmax, sqnr_db


def test_sqnr_of_a_known_noise_power():
    ref = np.array([3.0, 4.0])  # power 25
    act = np.array([3.0, 4.5])  # noise 0.25 -> 100x -> 20 dB
    assert sqnr_db(ref, act) == pytest.approx(20.0)


def test_sqnr_identical_is_inf_and_nan_is_nan():
    x = np.ones(4)
    assert sqnr_db(x, x) == math.inf
    assert math.isnan(sqnr_db(x, np.array([1.0, np.nan, 1.0, 1.0])))


def test_decision_flips_counts_threshold_crossings():
    ref = np.array([0.1, 0.6, 0.5, 0.9])
    act = np.array([0.2, 0.4, 0.49, 0.95])  # flips at positions 1 and 2
    assert decision_flips(ref, act) == pytest.approx(0.5)
    with pytest.raises(ValueError):
        decision_flips(ref, act[:3])


def test_bernoulli_kl_matches_the_formula():
    p, q = 0.8, 0.6
    want = p * math.log(p / q) + (1 - p) * math.log((1 - p) / (1 - q))
    assert bernoulli_kl(np.array([p]), np.array([q])) == pytest.approx(want)
    assert bernoulli_kl(np.array([0.3]), np.array([0.3])) == 0.0


def test_kl_divergence_of_two_distributions():
    p = np.array([0.5, 0.5])
    q = np.array([0.25, 0.75])
    want = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    assert kl_divergence(np.log(p), np.log(q)) == pytest.approx(want)
    logits = np.array([[1.0, 2.0, 3.0]])
    assert np.exp(log_softmax(logits)).sum() == pytest.approx(1.0)
