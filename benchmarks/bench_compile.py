"""Compile every bundled model with `q4c compile` defaults and measure, side by side in one run:
file size ratio, output SQNR against FP32 on the model's sample input, and ONNX Runtime
latency (1 thread, FP32 and q4c interleaved, median of N calls) as a ratio of FP32.

    python benchmarks/bench_compile.py [--iters 30] [--models bilstm_am,lstm_lm] [--write]

With --write, the table replaces the `compile` section of BENCHMARKS.md and the raw figures go
to benchmarks/results/compile.json.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import onnx

import q4c
from q4c import ort as q4ort
from q4c.compiler import sqnr_db
from q4c.timing import interleaved

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import MODELS, bundled_models, run, write_section  # noqa: E402,F401 (re-exported)

#: recurrent models: at 4 bits their weights are folded to FP32 at load (issue 8 lowers them).
RECURRENT = {"LSTM", "GRU"}


def measure(name: str, iters: int, out_dir: Path) -> dict:
    src = MODELS / f"{name}.onnx"
    dst = out_dir / f"{name}.q4.onnx"
    report = q4c.compile_file(src, dst, data=MODELS / f"{name}.npz")
    with np.load(MODELS / f"{name}.npz") as npz:
        feeds = {k: npz[k] for k in npz.files}
    fp32 = q4ort.make_session(onnx.load(src), threads=1)
    quant = q4ort.make_session(onnx.load(dst), threads=1)
    ref, out = q4ort.run(fp32, feeds), q4ort.run(quant, feeds)
    sqnr = {k: sqnr_db(v, out[k]) for k, v in ref.items() if np.issubdtype(v.dtype, np.floating)}
    # interleaved, so machine noise hits both alike; process-CPU time (q4c.timing says why)
    timing = interleaved({"fp32": lambda: fp32.run(None, feeds), "q4c": lambda: quant.run(None, feeds)},
                         rounds=iters, warmup=3)
    ops = set(q4c.graph.op_histogram(onnx.load(src)))
    return {
        "model": name,
        "recurrent": bool(ops & RECURRENT),
        "fp32_bytes": report["input"]["bytes"],
        "q4c_bytes": report["output"]["bytes"],
        "size_ratio": report["output"]["bytes"] / report["input"]["bytes"],
        "avg_weight_bits": report["avg_weight_bits"],
        "output_sqnr_db": sqnr,
        "fp32_ms": 1e3 * timing.median("fp32"),
        "q4c_ms": 1e3 * timing.median("q4c"),
        "latency_ratio": timing.ratio("q4c", "fp32"),
        "session_config": report["session_config"],
        "interp_vs_ort_max_abs": report["verification"]["interp_vs_ort_max_abs"],
    }


def render(rows: list[dict], iters: int) -> str:
    lines = [
        "<!-- compile:begin -->",
        "## `q4c compile` defaults on the bundled models",
        "",
        "Each model compiled with defaults (4-bit weights, auto block size, target ort-cpu), run on its committed sample input "
        f"(`models/<name>.npz`). Latency: ONNX Runtime {_ort_version()}, CPU provider, 1 intra-op thread, FP32 and "
        f"q4c sessions interleaved, median of {iters} calls each (process-CPU time, q4c.timing), on a 2-core machine "
        "shared with other jobs. SQNR: q4c output vs FP32 output.",
        "",
        "| model | FP32 | q4c | size ratio | avg bits | output SQNR (dB) | FP32 ms | q4c ms | latency ratio | session config |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        sqnr = ", ".join(f"{k} {v:.1f}" for k, v in r["output_sqnr_db"].items())
        config = ", ".join(f"{k}={v}" for k, v in r["session_config"].items()) or "none"
        lines.append(
            f"| {r['model']}{' (recurrent)' if r['recurrent'] else ''} | {r['fp32_bytes'] / 2**20:.2f} MiB | "
            f"{r['q4c_bytes'] / 2**20:.2f} MiB | {r['size_ratio']:.3f} | {r['avg_weight_bits']} | {sqnr} | "
            f"{r['fp32_ms']:.2f} | {r['q4c_ms']:.2f} | {r['latency_ratio']:.2f} | {config} |"
        )
    lines += [
        "",
        "`session.disable_quant_qdq=1` marks models that keep some weights in DequantizeLinear form (Conv, "
        "LSTM/GRU below hidden 384, or MatMul where `--kernels auto` measured FP32-at-load faster): those "
        "weights are folded to FP32 at load (small file, FP32 speed). LSTM/GRU layers from hidden 384 run as "
        "MatMulNBits + Scan (see the `recurrent` section).",
        "<!-- compile:end -->",
    ]
    return "\n".join(lines)


def _ort_version() -> str:
    import onnxruntime

    return onnxruntime.__version__


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iters", type=int, default=30)
    parser.add_argument("--models", default=None, help="comma-separated names (default: every bundled model)")
    parser.add_argument("--merge", action="store_true",
                        help="keep the other models' rows from benchmarks/results/%s.json" % "compile")
    parser.add_argument("--write", action="store_true", help="update BENCHMARKS.md and benchmarks/results/compile.json")
    args = parser.parse_args()
    names = args.models.split(",") if args.models else bundled_models()
    run("compile", names, lambda name, tmp: [measure(name, args.iters, tmp)], lambda rows: render(rows, args.iters), merge=args.merge, write=args.write)
    return 0


if __name__ == "__main__":
    sys.exit(main())
