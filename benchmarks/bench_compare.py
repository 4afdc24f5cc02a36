"""q4c against ONNX Runtime's own quantizers, side by side in one run, on every bundled model.

Rows per model: FP32; q4c default (sensitivity-guided, bytes of uniform 4-bit); q4c uniform
INT4; q4c at 3 average bits; ORT quantize_dynamic (INT8); ORT quantize_static (QDQ, INT4
weights, per channel, MinMax calibration); ORT MatMulNBitsQuantizer (INT4, block 32). For each:
success or the exact error, file size ratio vs FP32, output SQNR and KL vs FP32 on held-out
inputs, WER / perplexity where the model has a task (models/eval_asr.py, models/eval_lm.py),
ORT latency ratio vs FP32 (1 thread, interleaved, median) and peak memory (RSS high-water mark
of a fresh process that loads the model and runs it once).

ORT's quantization tools need `onnx-ir` and `sympy` (the `bench` extra):

    pip install -e ".[bench]"
    python benchmarks/bench_compare.py [--models a,b] [--iters 20] [--write]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx

import q4c
from q4c import ort as q4ort
from q4c.compiler import sqnr_db
from q4c.quant.sensitivity import divergence, output_kind

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import MODELS, TASKS, bench_data, bundled_models, run, task_eval  # noqa: E402

def _task_metric(name: str, model_path: Path) -> float | None:
    result = task_eval(name, model_path)
    return None if result is None else float(result[TASKS[name][1]])


# -- the contenders ---------------------------------------------------------------------------

def q4c_with(**options: object) -> Callable[[Path, Path, Path], None]:
    def build(src: Path, dst: Path, calib: Path) -> None:
        q4c.compile_file(src, dst, q4c.CompileOptions(**options), data=calib, verify=False)
    return build


def ort_dynamic(src: Path, dst: Path, calib: Path) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8)


def ort_static_int4(src: Path, dst: Path, calib: Path) -> None:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._it = iter([dict(np.load(p)) for p in sorted(calib.glob("*.npz"))])

        def get_next(self) -> dict | None:
            return next(self._it, None)

    # INT4 weights need opset 21: convert properly first (q4c.graph.convert_opset).
    converted = q4c.graph.convert_opset(onnx.load(src))
    tmp = dst.with_suffix(".opset21.onnx")
    onnx.save(converted, tmp)
    quantize_static(str(tmp), str(dst), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    weight_type=QuantType.QInt4, activation_type=QuantType.QUInt8)
    tmp.unlink()


def ort_matmul_nbits(src: Path, dst: Path, calib: Path) -> None:
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    quantizer = MatMulNBitsQuantizer(onnx.load(src), bits=4, block_size=32, is_symmetric=True)
    quantizer.process()
    quantizer.model.save_model_to_file(str(dst))


CONTENDERS: list[tuple[str, Callable[[Path, Path, Path], None]]] = [
    ("q4c default (avg 4 bits)", q4c_with()),
    ("q4c uniform INT4", q4c_with(bits=4)),
    ("q4c avg 3 bits", q4c_with(avg_bits=3.0)),
    ("ORT quantize_dynamic INT8", ort_dynamic),
    ("ORT quantize_static QDQ INT4", ort_static_int4),
    ("ORT MatMulNBitsQuantizer INT4/32", ort_matmul_nbits),
]


# -- measurements -----------------------------------------------------------------------------

_PEAK = """
import sys, numpy as np
from q4c import ort as q4ort
import onnx
def hwm():
    return int(next(l for l in open('/proc/self/status') if l.startswith('VmHWM')).split()[1])
base = hwm()
s = q4ort.make_session(onnx.load(sys.argv[1]), threads=1)
with np.load(sys.argv[2]) as z:
    s.run(None, {k: z[k] for k in z.files})
print(hwm())
"""


def peak_rss_kib(model: Path, feeds_path: Path) -> int | None:
    out = subprocess.run([sys.executable, "-c", _PEAK, str(model), str(feeds_path)], capture_output=True, text=True)
    return int(out.stdout.strip()) if out.returncode == 0 else None


def latency_ratio(fp32: Path, other: Path, feeds: dict, iters: int) -> tuple[float, float]:
    a, b = q4ort.make_session(onnx.load(fp32), threads=1), q4ort.make_session(onnx.load(other), threads=1)
    ta, tb = [], []
    for _ in range(3):
        a.run(None, feeds), b.run(None, feeds)
    for _ in range(iters):
        for session, times in ((a, ta), (b, tb)):
            start = time.perf_counter()
            session.run(None, feeds)
            times.append(time.perf_counter() - start)
    return statistics.median(tb) / statistics.median(ta), 1e3 * statistics.median(tb)


def accuracy(fp32: Path, other: Path, held_out: list[dict]) -> dict[str, float | None]:
    ref_s, out_s = q4ort.make_session(onnx.load(fp32)), q4ort.make_session(onnx.load(other))
    sq, kl = [], []
    for feeds in held_out:
        ref, out = q4ort.run(ref_s, feeds), q4ort.run(out_s, feeds)
        for name, r in ref.items():
            if np.issubdtype(r.dtype, np.floating):
                sq.append(sqnr_db(r, out[name]))
                if output_kind(r) != "real":
                    kl.append(divergence(r, out[name], output_kind(r)))
    return {"sqnr_db": float(np.mean(sq)), "kl": float(np.mean(kl)) if kl else None}


def measure(name: str, tmp: Path, iters: int) -> list[dict]:
    src = MODELS / f"{name}.onnx"
    feeds_path = MODELS / f"{name}.npz"
    with np.load(feeds_path) as npz:
        sample = {k: npz[k] for k in npz.files}
    calib, held_out, _ = bench_data(name, tmp)
    rows = [{"model": name, "method": "FP32", "ok": True, "size_ratio": 1.0, "sqnr_db": float("inf"), "kl": 0.0,
             "task": _task_metric(name, src), "latency_ratio": 1.0, "peak_rss_mib": _mib(peak_rss_kib(src, feeds_path))}]
    for label, build in CONTENDERS:
        dst = tmp / f"{name}_{len(rows)}.onnx"
        row: dict = {"model": name, "method": label}
        try:  # building, loading and running: any failure is the row's result
            build(src, dst, calib)
            ratio, ms = latency_ratio(src, dst, sample, iters)
            row.update(ok=True, size_ratio=dst.stat().st_size / src.stat().st_size, **accuracy(src, dst, held_out),
                       task=_task_metric(name, dst), latency_ratio=ratio, ms=ms,
                       peak_rss_mib=_mib(peak_rss_kib(dst, feeds_path)))
        except Exception as e:  # noqa: BLE001 - the exact failure is the result
            row.update(ok=False, error=f"{type(e).__name__}: {str(e).splitlines()[0][:300]}")
            rows.append(row)
            print(f"  {label}: FAILED {row['error']}", file=sys.stderr)
            continue
        rows.append(row)
        print(f"  {label}: {row}", file=sys.stderr)
    return rows


def _mib(kib: int | None) -> float | None:
    return None if kib is None else round(kib / 1024, 1)


def render(rows: list[dict], iters: int) -> str:
    lines = [
        "<!-- compare:begin -->",
        "## q4c vs ONNX Runtime's quantizers",
        "",
        f"Produced by `python benchmarks/bench_compare.py --write` ({time.strftime('%Y-%m-%d')}), all rows in one run. "
        "Calibration and held-out inputs as in the mixed-precision section (trained models: committed calibration "
        "sets, test sets; others: 16 + 16 variants of the sample input); accuracy = SQNR and KL of the "
        "outputs vs FP32 on the held-out inputs; task metric on the model's test set (bilstm_am: word error rate as a fraction, lstm_lm: perplexity). Latency: ONNX "
        f"Runtime CPU, 1 thread, FP32 and the row's model interleaved, median of {iters}. Peak RSS: fresh process that "
        "loads the model and runs it once.",
        "",
        "| model | method | size ratio | SQNR dB | KL | task | latency ratio | peak RSS MiB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if not r["ok"]:
            lines.append(f"| {r['model']} | {r['method']} | failed: `{r['error']}` | | | | | |")
            continue
        kl = "-" if r.get("kl") is None else f"{r['kl']:.4f}"
        task = "-" if r.get("task") is None else f"{r['task']:.3g}"
        lines.append(f"| {r['model']} | {r['method']} | {r['size_ratio']:.3f} | {r['sqnr_db']:.2f} | {kl} | {task} | "
                     f"{r['latency_ratio']:.2f} | {r['peak_rss_mib']} |")
    lines += ["", *_verdicts(rows), "<!-- compare:end -->"]
    return "\n".join(lines)


def _better(a: dict, b: dict) -> bool:
    """Is row a at least as accurate as row b? KL where the output is a distribution, else SQNR."""
    if a.get("kl") is not None and b.get("kl") is not None:
        return a["kl"] <= b["kl"]
    return a["sqnr_db"] >= b["sqnr_db"]


def _verdicts(rows: list[dict]) -> list[str]:
    """Per model: is q4c's default row at least as small as every ONNX Runtime row that ran, and
    more accurate? Rows that are not are named, with their size."""
    out = ["q4c default against every ONNX Runtime row that ran (accuracy: KL where the output is a "
           "distribution, else SQNR):", ""]
    for model in dict.fromkeys(r["model"] for r in rows):
        mine = next((r for r in rows if r["model"] == model and r["method"].startswith("q4c default") and r["ok"]), None)
        theirs = [r for r in rows if r["model"] == model and r["method"].startswith("ORT") and r["ok"]]
        if mine is None or not theirs:
            continue
        larger = [r for r in theirs if r["size_ratio"] < mine["size_ratio"]]
        better = [r for r in theirs if not _better(mine, r)]
        size = (f"smaller than all {len(theirs)} ORT rows" if not larger else
                "LARGER than " + ", ".join(f"{r['method']} ({r['size_ratio']:.3f})" for r in larger))
        acc = ("more accurate than all" if not better else "less accurate than " + ", ".join(
            f"{r['method']} (at {r['size_ratio']:.3f} of FP32)" for r in better))
        out.append(f"- {model}: q4c default at {mine['size_ratio']:.3f} of FP32 is {size}; {acc}")
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=None)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--merge", action="store_true",
                        help="keep the other models' rows from benchmarks/results/%s.json" % "compare")
    parser.add_argument("--write", action="store_true")
    args = parser.parse_args()
    names = args.models.split(",") if args.models else bundled_models()
    run("compare", names, lambda name, tmp: measure(name, tmp, args.iters), lambda rows: render(rows, args.iters), merge=args.merge, write=args.write)
    return 0


if __name__ == "__main__":
    sys.exit(main())
