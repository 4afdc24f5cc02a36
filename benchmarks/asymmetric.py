"""The asymmetric (zero point) quantizer the 4-bit quantizer study measures beside q4c's own
(benchmarks/bench_quantizers.py). Measured only: on Silero's weights it is no better than
symmetric rounding, so no compile path stores zero points and q4c.quant.qparams stays symmetric.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from q4c.quant.qparams import qrange

#: Shrink ratios tried for each end of an asymmetric range (every pair: 81 ranges per row).
RANGE_RATIOS = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.6, 0.5)


@dataclass
class AsymmetricWeight:
    """Codes `q` (the weight's shape, int8 in [qmin, qmax]), and per index of axis 0 a `scale` and
    an integer `zero_point`: the weight is (q - zero_point) * scale, as DequantizeLinear computes it."""

    q: np.ndarray
    scale: np.ndarray
    zero_point: np.ndarray

    def dequantize(self) -> np.ndarray:
        shape = (-1,) + (1,) * (self.q.ndim - 1)
        q = self.q.astype(np.float32) - self.zero_point.reshape(shape).astype(np.float32)
        return (q * self.scale.reshape(shape).astype(np.float32)).astype(np.float32)


def quantize_asymmetric(w: np.ndarray, bits: int, scale_dtype: type = np.float32) -> AsymmetricWeight:
    """Per index of axis 0 (an output channel): the range [lo, hi] (each end of [min(w, 0),
    max(w, 0)] shrunk by a ratio of RANGE_RATIOS) whose 2^bits levels give the least squared error,
    scored with the stored (rounded) scale and the integer zero point. All 2^bits levels cover the
    row's own range, so a skewed row (all weights on one side of 0) loses no level to the empty
    side, as symmetric scales do."""
    w = np.asarray(w, dtype=np.float32)
    groups = w.reshape(w.shape[0], -1)
    qmin, qmax = qrange(bits)
    tiny = np.float32(np.finfo(scale_dtype).smallest_normal)
    low = np.minimum(groups.min(axis=1), 0).astype(np.float32)
    high = np.maximum(groups.max(axis=1), 0).astype(np.float32)
    best_err = np.full(groups.shape[0], np.inf, np.float32)
    best_scale = np.ones(groups.shape[0], np.float32)
    best_zp = np.zeros(groups.shape[0], np.float32)
    for a in RANGE_RATIOS:
        for b in RANGE_RATIOS:
            lo, hi = low * np.float32(a), high * np.float32(b)
            scale = np.maximum((hi - lo) / np.float32(qmax - qmin), tiny).astype(scale_dtype).astype(np.float32)
            zp = np.clip(np.rint(qmin - lo / scale), qmin, qmax)
            q = np.clip(np.rint(groups / scale[:, None]) + zp[:, None], qmin, qmax)
            err = np.sum(np.square((q - zp[:, None]) * scale[:, None] - groups), axis=1)
            better = err < best_err
            best_err = np.where(better, err, best_err)
            best_scale = np.where(better, scale, best_scale)
            best_zp = np.where(better, zp, best_zp)
    q = np.clip(np.rint(groups / best_scale[:, None]) + best_zp[:, None], qmin, qmax).astype(np.int8)
    return AsymmetricWeight(q.reshape(w.shape), best_scale.astype(scale_dtype), best_zp.astype(np.int8))
