"""The default compile of rnnt_encoder at 20 and 200 frames (batch 2), timed with the default-row
protocol of bench_latency (DEFAULT_SESSIONS sessions per side, interleaved rounds, paired
bootstrap interval, FP32 A/A spread). bench_latency's encoder part times its "q4c default" row
with one session per side, which cannot resolve a few per cent.

    python benchmarks/latency_encoder_default.py
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_latency as bl  # noqa: E402


def main() -> int:
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        src = bl.MODELS / "rnnt_encoder.onnx"
        for frames in bl.ENCODER_FRAMES:
            calib = tmp / f"calib{frames}"
            calib.mkdir()
            for i, feeds in enumerate(bl._encoder_inputs(frames, range(1, 9))):
                np.savez(calib / f"{i:03d}.npz", **feeds)
            dst = tmp / f"default{frames}.onnx"
            info = bl._compile(src, dst, calib, workers=1)
            r = bl.default_ratio(src, dst, bl._encoder_inputs(frames, range(1))[0])
            print(f"rnnt_encoder {frames} frames: default {r['latency_ratio']:.3f}x FP32 "
                  f"[{r['ratio_low']:.3f}, {r['ratio_high']:.3f}], FP32 A/A {r['fp32_session_spread']:.3f}, "
                  f"FP32 {r['fp32_ms']:.2f} ms, forms {info['forms']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
