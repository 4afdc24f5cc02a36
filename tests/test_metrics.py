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


# --- VAD segments (silero-vad's get_speech_timestamps defaults), worked out by hand ---------------

from q4c.metrics import boundary_shift_ms, speech_segments


def test_speech_segments_hysteresis_and_open_segment_run_to_the_end():
    # 16 kHz, 512-sample chunks: min speech 4000 samples, min silence 1600, pad 480, neg 0.35
    p = [0.1, 0.1] + [0.9] * 10 + [0.4, 0.2, 0.2, 0.9] + [0.1] * 4
    # start at chunk 2 (1024); 0.4 is neither speech nor silence; the silence at 13-14 (1024
    # samples) is cancelled by chunk 15; the one from chunk 16 lasts 1536 < 1600 samples, so the
    # segment is still open at the end and runs to 20 * 512 = 10240; padded start 1024 - 480.
    assert speech_segments(np.array(p)) == [(544, 10240)]
    # with the audio 100 samples shorter than the padded chunks, the open segment ends there
    assert speech_segments(np.array(p), audio_length=10140) == [(544, 10140)]


def test_speech_segments_close_drop_short_and_pad():
    p = [0.9] * 10 + [0.1] * 5 + [0.8] * 3 + [0.1] * 5 + [0.95] * 9 + [0.1] * 8  # 40 chunks
    # [0, 5120) closes at chunk 14 (silence 2048 >= 1600); chunks 15-17 (1536 samples) are too
    # short; chunks 23-31 give [11776, 16384) (4608 > 4000). Pads: 480 each side, start clipped at 0.
    assert speech_segments(np.array(p)) == [(0, 5600), (11296, 16864)]
    # the same chunks at 8 kHz (256-sample chunks, every figure halved)
    assert speech_segments(np.array(p), sr=8000) == [(0, 2800), (5648, 8432)]
    # a threshold above every probability finds nothing
    assert speech_segments(np.array(p), threshold=0.99) == []


def test_speech_segments_gap_shorter_than_two_pads_is_split():
    p = [0.9] * 10 + [0.1] * 5 + [0.9] * 15
    # [0, 5120) and [7680, 15360); pad 1600 samples: the 2560-sample gap < 3200 is split 1280/1280
    assert speech_segments(np.array(p), speech_pad_ms=100) == [(0, 6400), (6400, 15360)]


def test_boundary_shift_of_matched_and_unmatched_segments():
    ref = [(0, 1000), (5000, 8000)]
    act = [(160, 1000), (5000, 7680)]  # shifts 160, 0, 0, 320 samples -> mean 120 = 7.5 ms at 16 kHz
    assert boundary_shift_ms(ref, act, 16000) == pytest.approx(7.5)
    # an invented 800-sample segment counts as two boundaries shifted by 800 samples each
    assert boundary_shift_ms(ref, act + [(10000, 10800)], 16000) == pytest.approx((480 + 1600) / 6 / 16)
    # a missed one, the same (symmetric)
    assert boundary_shift_ms(ref + [(10000, 10800)], act, 16000) == pytest.approx((480 + 1600) / 6 / 16)
    # one reference segment split in two: the larger overlap matches, the other is unmatched
    assert boundary_shift_ms([(0, 1000)], [(0, 600), (700, 1000)], 8000) == pytest.approx((0 + 400 + 300 + 300) / 4 / 8)
    assert boundary_shift_ms([], [], 16000) == 0.0


def test_sqnr_from_pooled_energies():
    from q4c.metrics import sqnr_db_from_energy

    assert sqnr_db_from_energy(100.0, 1.0) == 20.0
    assert sqnr_db_from_energy(2.0, 2.0) == 0.0
    assert sqnr_db_from_energy(5.0, 0.0) == math.inf
    assert sqnr_db_from_energy(5.0, math.inf) == -math.inf
    assert sqnr_db_from_energy(0.0, 1e-10) == -200.0  # power floored at 1e-30
