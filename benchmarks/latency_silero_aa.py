"""Each Silero export's `--require "flips<=0.5%"` output timed beside an FP32 A/A, in one
interleaved run (issue 13: "runs <= 1.0x FP32 latency").

bench_real's latency column is q4c over FP32 alone; two FP32 sessions of one file also differ
(where ONNX Runtime's buffers land), so this script times three sides together, each as
LATENCY_SESSIONS sessions over LATENCY_ROUNDS interleaved rounds of the longest test clip
streamed through the model (bench_real's protocol): FP32, a second set of FP32 sessions (the
A/A), and q4c. A q4c ratio inside the A/A's spread is no slower than FP32 as far as this
machine can tell.

    python benchmarks/latency_silero_aa.py [--models a,b] [--write]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "models" / "real"))
sys.path.insert(0, str(ROOT))

import audio  # noqa: E402
import fetch  # noqa: E402
import silero  # noqa: E402
from _common import run  # noqa: E402
from bench_real import LATENCY_ROUNDS, LATENCY_SESSIONS, REQUIRE_SAMPLES, q4c_require, timing_lock  # noqa: E402
from contenders import Calibration  # noqa: E402

from q4c.timing import interleaved  # noqa: E402

EXPORTS = ("silero_vad", "silero_vad_16k_op15", "silero_vad_half", "silero_vad_op18_ifless",
           "silero_vad_openvino_16k", "silero_vad_16k_sequence")
KEY = "silero_latency_aa"
REQUIREMENT = "flips<=0.5%"
SIDES = ("fp32", "fp32_again", "q4c")


def measure(export: str, tmp: Path) -> list[dict]:
    """The export compiled as bench_real's `--require` row compiles it, timed in three sides."""
    src, dst = fetch.model_path(export), tmp / f"{export}.onnx"
    reader = f"{ROOT / 'models' / 'real' / 'silero.py'}:calib_{export}"
    q4c_require(REQUIREMENT, REQUIRE_SAMPLES)(src, dst, Calibration(feeds=list, reader=reader))
    longest = max(audio.load("test", 16000), key=lambda t: len(t[1]))[1]
    paths = {"fp32": src, "fp32_again": src, "q4c": dst}
    runners = {f"{side}#{i}": silero.session_runner(paths[side]) for i in range(LATENCY_SESSIONS) for side in SIDES}
    with timing_lock():
        timing = interleaved({k: (lambda r=r: silero.probs(r, longest, export)) for k, r in runners.items()},
                             rounds=LATENCY_ROUNDS, warmup=1)
    pooled = timing.sides(SIDES, LATENCY_SESSIONS)
    row = {"model": export, "size_ratio": dst.stat().st_size / src.stat().st_size, "fp32_ms": 1e3 * pooled.median("fp32")}
    for side in ("q4c", "fp32_again"):
        low, high = pooled.ratio_interval(side, "fp32")
        row[side] = {"ratio": float(pooled.ratio(side, "fp32")), "ci": [float(low), float(high)]}
    return [row]


def section(rows: list[dict]) -> str:
    out = [f"<!-- {KEY}:begin -->", "## Silero `--require` outputs beside an FP32 A/A (latency)", "",
           " ".join(__doc__.split("\n\n")[1].split()), "",
           "| export | size / FP32 file | q4c / FP32 [95 %] | FP32 again / FP32 [95 %] | FP32 ms per clip |",
           "|---|---|---|---|---|"]
    for r in rows:
        q, a = r["q4c"], r["fp32_again"]
        out.append(f"| {r['model']} | {r['size_ratio']:.3f} | {q['ratio']:.3f} [{q['ci'][0]:.3f}, {q['ci'][1]:.3f}] | "
                   f"{a['ratio']:.3f} [{a['ci'][0]:.3f}, {a['ci'][1]:.3f}] | {r['fp32_ms']:.1f} |")
    out.append(f"<!-- {KEY}:end -->")
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=",".join(EXPORTS), help="comma-separated exports (default: all six)")
    parser.add_argument("--write", action="store_true",
                        help=f"write benchmarks/results/{KEY}.json and BENCHMARKS.md")
    args = parser.parse_args()
    run(KEY, args.models.split(","), measure, section, merge=False, write=args.write)


if __name__ == "__main__":
    main()
