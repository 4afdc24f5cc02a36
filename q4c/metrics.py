"""Quality metrics shared by compile's verification, sensitivity objectives, the CLI and the
benchmarks: SQNR, decision flips and Bernoulli KL of probability outputs, KL of distributions.

Every function takes the FP32 (reference) value first and the quantized one second.
"""

from __future__ import annotations

import numpy as np


def sqnr_db(reference: np.ndarray, actual: np.ndarray) -> float:
    """10 log10(|ref|^2 / |ref - actual|^2) in dB, rounded to 0.01; inf when identical, nan when
    either side holds a NaN or an infinity."""
    ref = np.asarray(reference, dtype=np.float64)
    act = np.asarray(actual, dtype=np.float64)
    if not (np.all(np.isfinite(ref)) and np.all(np.isfinite(act))):
        return float("nan")
    noise = float(np.sum(np.square(ref - act)))
    power = float(np.sum(np.square(ref)))
    if noise == 0:
        return float("inf")
    return round(10 * np.log10(max(power, 1e-30) / noise), 2)


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
