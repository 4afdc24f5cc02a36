"""Quality metrics shared by compile's verification, sensitivity objectives, the CLI and the
benchmarks: SQNR, decision flips and Bernoulli KL of probability outputs, KL of distributions.

Every function takes the FP32 (reference) value first and the quantized one second.
"""

from __future__ import annotations

import math

import numpy as np


def sqnr_db(reference: np.ndarray, actual: np.ndarray) -> float:
    """10 log10(|ref|^2 / |ref - actual|^2) in dB, rounded to 0.01; inf when identical, nan when
    either side holds a NaN or an infinity."""
    ref = np.asarray(reference, dtype=np.float64)
    act = np.asarray(actual, dtype=np.float64)
    if not (np.all(np.isfinite(ref)) and np.all(np.isfinite(act))):
        return float("nan")
    return sqnr_db_from_energy(float(np.sum(np.square(ref))), float(np.sum(np.square(ref - act))))


def sqnr_db_from_energy(power: float, noise: float) -> float:
    """SQNR from pooled energies (sums of squares of the reference and of the error, e.g. summed
    over samples): 10 log10(power / noise) rounded to 0.01; inf when noise is 0, -inf when it is
    infinite. The one formula every SQNR in q4c goes through."""
    if noise == 0:
        return float("inf")
    if math.isinf(noise):
        return float("-inf")
    return round(10 * np.log10(max(power, 1e-30) / noise), 2)  # np, as sqnr_db always computed it


def decision_flips(reference: np.ndarray, actual: np.ndarray, threshold: float = 0.5) -> float:
    """Fraction of elements whose decision `p >= threshold` differs between the two probability
    arrays (e.g. speech / non-speech per VAD chunk). 0.0 for empty arrays."""
    ref = np.asarray(reference, dtype=np.float64).ravel()
    act = np.asarray(actual, dtype=np.float64).ravel()
    if ref.shape != act.shape:
        raise ValueError(f"decision_flips: shapes differ, {ref.shape} vs {act.shape}")
    if ref.size == 0:
        return 0.0
    return float(np.mean((ref >= threshold) != (act >= threshold)))


def bernoulli_kl(reference: np.ndarray, actual: np.ndarray, eps: float = 1e-7) -> float:
    """Mean KL(Bernoulli(p_ref) || Bernoulli(p_act)) in nats over all elements; probabilities
    are clipped to [eps, 1 - eps] so that saturated outputs stay finite."""
    p = np.clip(np.asarray(reference, dtype=np.float64), eps, 1 - eps)
    q = np.clip(np.asarray(actual, dtype=np.float64), eps, 1 - eps)
    kl = p * np.log(p / q) + (1 - p) * np.log((1 - p) / (1 - q))
    return float(np.mean(kl)) if kl.size else 0.0


def log_softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    shifted = x - np.max(x, axis=axis, keepdims=True)
    return shifted - np.log(np.sum(np.exp(shifted), axis=axis, keepdims=True))


def kl_divergence(reference_logp: np.ndarray, actual_logp: np.ndarray, axis: int = -1) -> float:
    """Mean over all positions of KL(P_ref || P_act) in nats, both given as log-probabilities
    along `axis` (pass logits through `log_softmax` first)."""
    ref = np.asarray(reference_logp, dtype=np.float64)
    act = np.asarray(actual_logp, dtype=np.float64)
    p = np.exp(ref)
    kl = np.sum(p * (ref - act), axis=axis)
    return float(np.mean(kl)) if kl.size else 0.0


def speech_segments(probs: np.ndarray, *, threshold: float = 0.5, sr: int = 16000, window: int | None = None,
                    min_speech_ms: float = 250, min_silence_ms: float = 100, speech_pad_ms: float = 30,
                    neg_threshold: float | None = None, audio_length: int | None = None) -> list[tuple[int, int]]:
    """Speech segments [start, end) in samples from per-chunk speech probabilities, formed as
    silero-vad's `get_speech_timestamps` forms them with its defaults (no maximum segment length).

    Chunk i starts at sample i * window (window 512 at 16 kHz, 256 otherwise, unless given). A
    segment starts at the first chunk with p >= threshold; once in speech, chunks with
    p < neg_threshold (default max(threshold - 0.15, 0.01)) start a tentative end, which a chunk
    with p >= threshold cancels; the segment ends there when the silence reaches min_silence_ms.
    Segments not longer than min_speech_ms are dropped (one still open at the end runs to
    `audio_length`, default len(probs) * window). Each segment is then padded by speech_pad_ms on
    both sides, a gap shorter than two pads being split evenly between its neighbours.
    """
    p = np.asarray(probs, dtype=np.float64).reshape(-1)
    if window is None:
        window = 512 if sr == 16000 else 256
    length = p.size * window if audio_length is None else int(audio_length)
    if neg_threshold is None:
        neg_threshold = max(threshold - 0.15, 0.01)
    min_speech = sr * min_speech_ms / 1000
    min_silence = sr * min_silence_ms / 1000
    pad = sr * speech_pad_ms / 1000

    raw: list[list[int]] = []
    start: int | None = None
    silence_from: int | None = None
    for i, prob in enumerate(p):
        sample = window * i
        if prob >= threshold:
            silence_from = None
            if start is None:
                start = sample
            continue
        if start is None or prob >= neg_threshold:
            continue
        if silence_from is None:
            silence_from = sample
        if sample - silence_from >= min_silence:
            if silence_from - start > min_speech:
                raw.append([start, silence_from])
            start = silence_from = None
    if start is not None and length - start > min_speech:
        raw.append([start, length])

    for i, seg in enumerate(raw):
        if i == 0:
            seg[0] = int(max(0, seg[0] - pad))
        if i + 1 < len(raw):
            gap = raw[i + 1][0] - seg[1]
            if gap < 2 * pad:
                seg[1] += int(gap // 2)
                raw[i + 1][0] = int(max(0, raw[i + 1][0] - gap // 2))
            else:
                seg[1] = int(min(length, seg[1] + pad))
                raw[i + 1][0] = int(max(0, raw[i + 1][0] - pad))
        else:
            seg[1] = int(min(length, seg[1] + pad))
    return [(int(s), int(e)) for s, e in raw]


def boundary_shift_ms(ref_segments: list[tuple[int, int]], act_segments: list[tuple[int, int]], sr: int) -> float:
    """Mean absolute shift in ms of segment boundaries (starts and ends, in samples at `sr`).

    Reference and actual segments are matched one to one, largest overlap first (only
    overlapping segments match). A matched pair contributes |start shift| and |end shift|. An
    unmatched segment on either side (speech missed or invented) contributes two boundaries each
    shifted by that segment's own duration. The mean is over all these boundaries; 0.0 when both
    lists are empty.
    """
    overlaps = sorted(((min(re, ae) - max(rs, as_), i, j)
                       for i, (rs, re) in enumerate(ref_segments)
                       for j, (as_, ae) in enumerate(act_segments)
                       if min(re, ae) > max(rs, as_)), reverse=True)
    ref_free, act_free = set(range(len(ref_segments))), set(range(len(act_segments)))
    shifts: list[float] = []
    for _, i, j in overlaps:
        if i in ref_free and j in act_free:
            ref_free.discard(i)
            act_free.discard(j)
            (rs, re), (as_, ae) = ref_segments[i], act_segments[j]
            shifts += [abs(rs - as_), abs(re - ae)]
    for s, e in [ref_segments[i] for i in sorted(ref_free)] + [act_segments[j] for j in sorted(act_free)]:
        shifts += [e - s, e - s]
    return float(np.mean(shifts)) * 1000 / sr if shifts else 0.0
