"""6-bit codes in two planes: ONNX has INT4 and UINT2 but no 6-bit type.

A code q in [-32, 31] is 4 * hi + lo with hi = floor(q / 4) in [-8, 7] (INT4) and lo = q mod 4 in
[0, 3] (UINT2, opset 25), so the weight q * s is DequantizeLinear(hi, s) * 4 + DequantizeLinear(lo, s):
the same scale tensor, the same axis and block size, 6 bits a weight on disk. The decode is
constant subgraph work that ONNX Runtime folds at session load, so planes are offered for the
weights it only dequantizes (Conv, LSTM/GRU/RNN), never for weights a low-bit kernel reads.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np

from q4c.config import PLANE_BITS

#: Code width stored as planes, and the weight roles that may take it
[BITS] = PLANE_BITS
ROLES = frozenset({"conv", "lstm_w", "lstm_r", "gru_w", "gru_r", "rnn_w", "rnn_r"})
#: What the high plane is worth in units of the low one
HIGH = 4


def split(q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(hi as ONNX INT4, lo as ONNX UINT2) with q == HIGH * hi + lo, for integer codes in [-32, 31]."""
    q = np.asarray(q, dtype=np.int16)
    if q.size and (q.min() < -32 or q.max() > 31):
        raise ValueError(f"6-bit codes lie in [-32, 31], not [{q.min()}, {q.max()}]")
    hi = np.floor_divide(q, HIGH)
    return hi.astype(ml_dtypes.int4), (q - HIGH * hi).astype(ml_dtypes.uint2)
