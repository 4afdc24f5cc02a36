"""benchmarks/bench_compare.py verdict rules on hand-made rows: only peers that changed the model
count, and each meets the q4c row of the largest size not above its own."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_compare as bc  # noqa: E402


def test_changed_means_smaller_file_or_new_quantization_ops():
    assert not bc.quantized({"MatMul": 2}, {"MatMul": 2, "Add": 1}, 1.004)  # pre-processing only
    assert bc.quantized({"MatMul": 2}, {"com.microsoft::MatMulNBits": 2}, 0.99)
    assert bc.quantized({"MatMul": 2}, {"MatMul": 2}, 0.5)
    assert not bc.quantized({"DequantizeLinear": 1}, {"DequantizeLinear": 1}, 0.99)  # already in FP32


def _row(method, size, sqnr, changed=True, ok=True):
    return {"model": "m", "method": method, "ok": ok, "size_ratio": size, "changed": changed,
            "sqnr_items": [sqnr + 0.01 * i for i in range(16)], "kl_items": None}


def test_peer_meets_nearest_q4c_row_not_above_its_size_and_unchanged_rows_are_not_counted():
    rows = [_row("FP32", 1.0, 200, changed=False),
            _row("q4c default (avg 4 bits)", 0.15, 20), _row("q4c uniform INT8", 0.27, 40),
            _row("ORT int8", 0.28, 35),  # meets q4c INT8 (0.27): q4c more accurate
            _row("ORT int4", 0.16, 25),  # meets q4c default (0.15): q4c less accurate
            _row("ORT nothing", 1.004, 90, changed=False),  # quantized nothing: not counted
            {"model": "m", "method": "ORT broken", "ok": False, "error": "boom"}]
    text = "\n".join(bc._verdicts(rows))
    assert "more accurate at matched size than 1 of 2 peer rows" in text
    assert "less accurate: ORT int4 (0.160) vs q4c default (avg 4 bits) (0.150)" in text
    assert "ORT nothing (unchanged)" in text and "ORT broken (failed)" in text
    assert "less accurate: ORT int8" not in text and "within noise: ORT int8" not in text  # q4c INT8 wins it
