"""The asymmetric (zero point) quantizer the 4-bit quantizer study measures beside q4c's symmetric
one (benchmarks/asymmetric.py, used by benchmarks/bench_quantizers.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from q4c.quant.qparams import quantize

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from asymmetric import quantize_asymmetric  # noqa: E402


def test_asymmetric_round_trip_beats_symmetric_on_a_skewed_weight():
    # One group: 0, 1, ..., 15 (all positive). Asymmetric: scale 1, zero point -8 -> exact.
    # Symmetric spends half its 16 levels on negatives it never uses: error > 0.
    w = np.arange(16, dtype=np.float32).reshape(1, 16)
    asym = quantize_asymmetric(w, 4)
    np.testing.assert_array_equal(asym.scale, [1.0])
    np.testing.assert_array_equal(asym.zero_point, [-8])
    np.testing.assert_array_equal(asym.q, np.arange(16).reshape(1, 16) - 8)
    np.testing.assert_array_equal(asym.dequantize(), w)
    sym = quantize(w, 4, granularity="channel", axis=0)
    assert np.sum((sym.dequantize() - w) ** 2) > 1.0
