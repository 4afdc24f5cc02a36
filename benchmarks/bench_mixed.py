"""Sensitivity-guided mixed precision vs uniform INT4 at equal weight bytes, on held-out inputs.

For every bundled model: calibration inputs drive the sensitivity analysis and the error is
measured on other, held-out inputs (benchmarks/_common.py `bench_data`: the trained models'
committed calibration sets and their test sets; 16 + 16 variants of the sample input for the
others). Configurations:
uniform INT4 (`--bits 4`), and the budgeted plan at the same bytes (`--avg-bits 4`) and at 3.5
and 3 average bits, with each measure (kl, hessian, mse). Error: mean KL divergence of the
output distribution where the output is (log-)probabilities, else output SQNR.

    python benchmarks/bench_mixed.py [--models a,b] [--write]
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
from q4c.quant.sensitivity import divergence, output_kind
from q4c.timing import timed

sys.path.insert(0, str(Path(__file__).resolve().parent))
import stats  # noqa: E402
from _common import MODELS, bench_data, bundled_models, run  # noqa: E402

MEASURES = ("kl", "hessian", "mse")
BUDGETS = (4.0, 3.5, 3.0)


def error(fp32: onnx.ModelProto, quant: Path, held_out: list[dict[str, np.ndarray]]) -> dict[str, float]:
    ref_s, q_s = q4ort.make_session(fp32), q4ort.make_session(onnx.load(quant))
    kl, sqnr = [], []  # per held-out input: the mean over its outputs (paired items for the verdicts)
    for feeds in held_out:
        ref, out = q4ort.run(ref_s, feeds), q4ort.run(q_s, feeds)
        kl_one, sqnr_one = [], []
        for name, r in ref.items():
            if not np.issubdtype(r.dtype, np.floating):
                continue
            kind = output_kind(r)
            if kind != "real":
                kl_one.append(divergence(r, out[name], kind))
            sqnr_one.append(sqnr_db(r, out[name]))
        if kl_one:
            kl.append(float(np.mean(kl_one)))
        sqnr.append(float(np.mean(sqnr_one)))
    return {"kl": float(np.mean(kl)) if kl else None, "sqnr_db": float(np.mean(sqnr)),
            "kl_items": kl or None, "sqnr_items": sqnr}


def measure(name: str, tmp: Path) -> list[dict]:
    src = MODELS / f"{name}.onnx"
    calib_dir, held_out, data = bench_data(name, tmp)
    fp32 = onnx.load(src)
    rows = []
    configs = [("uniform int4", q4c.CompileOptions(bits=4, kernels="low-bit"))]
    for avg in BUDGETS:
        for m in MEASURES:
            configs.append((f"{m} @ {avg}", q4c.CompileOptions(avg_bits=avg, sensitivity=m, kernels="low-bit")))
    for label, options in configs:
        out = tmp / f"{name}_{label.replace(' ', '_').replace('@', 'at')}.onnx"
        report, seconds, _ = timed(lambda: q4c.compile_file(src, out, options, data=calib_dir, verify=False))
        rows.append({"model": name, "config": label, "data": data, "bytes": report["output"]["bytes"],
                     "avg_weight_bits": report["avg_weight_bits"], "compile_s": round(seconds, 2),
                     "sensitivity_s": report.get("sensitivity", {}).get("seconds"),
                     **error(fp32, out, held_out)})
        print(f"  {label}: {rows[-1]}", file=sys.stderr)
    return rows


def render(rows: list[dict]) -> str:
    lines = [
        "<!-- mixed:begin -->",
        "## Mixed precision vs uniform INT4 at equal bytes (held-out inputs)",
        "",
        "Sensitivity measured on "
        "calibration inputs, error on different (held-out) inputs: bilstm_am and lstm_lm calibrate on their committed "
        "calibration sets (dev utterances, training text) and are measured on their test sets; the random-weight models "
        "on 16 variants of the sample input and 16 other variants. ONNX "
        "Runtime CPU, MatMulNBits kept (`--kernels low-bit`). `kl @ 4.0` = sensitivity-guided plan with the bytes of "
        "uniform 4-bit; `@ 3.5`, `@ 3.0` = smaller budgets. KL: mean output KL divergence (log-prob outputs); "
        "lower is better. SQNR: higher is better.",
        "",
        "| model | config | bytes | avg bits | held-out KL | held-out SQNR dB | sensitivity s |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        kl = f"{r['kl']:.4f}" if r["kl"] is not None else "-"
        sens = f"{r['sensitivity_s']:.1f}" if r["sensitivity_s"] is not None else "-"
        lines.append(f"| {r['model']} | {r['config']} | {r['bytes']} | {r['avg_weight_bits']} | {kl} | "
                     f"{r['sqnr_db']:.2f} | {sens} |")
    lines += ["", _verdicts(rows), "<!-- mixed:end -->"]
    return "\n".join(lines)


def _versus(base: dict, row: dict) -> str:
    """The row against uniform INT4 by held-out KL (SQNR where the output is not a distribution):
    the paired bootstrap 95 % interval over the held-out inputs (benchmarks/stats.py)."""
    key = "kl_items" if base.get("kl_items") else "sqnr_items"
    if not base.get(key) or not row.get(key):
        return "no interval: per-input scores missing"
    if key == "kl_items":
        iv = stats.mean_difference(base[key], row[key])
        return f"{iv.verdict()} (KL {iv.describe(digits=4)})"
    iv = stats.mean_difference([-x for x in base[key]], [-x for x in row[key]])  # lower is better
    return f"{iv.verdict()} (SQNR {-iv.estimate:+.2f} dB [{-iv.high:+.2f}, {-iv.low:+.2f}] 95 % CI over {iv.items} inputs)"


def _verdicts(rows: list[dict]) -> str:
    """Per model and measure: the equal-bytes mixed plan against uniform INT4, with an interval
    ("no worse" only when the interval's upper end is at or below 0; identical plans are)."""
    out = ["Equal bytes (`@ 4.0`) vs uniform INT4, by held-out KL (SQNR where the output is not a distribution), "
           "paired bootstrap 95 % interval of the plan's mean minus uniform's over the held-out inputs:", ""]
    for model in dict.fromkeys(r["model"] for r in rows):
        base = next(r for r in rows if r["model"] == model and r["config"] == "uniform int4")
        verdicts = [f"{m} {_versus(base, next(r for r in rows if r['model'] == model and r['config'] == f'{m} @ 4.0'))}"
                    for m in MEASURES]
        out.append(f"- {model}: " + "; ".join(verdicts))
    return "\n".join(out)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=None)
    parser.add_argument("--merge", action="store_true",
                        help="keep the other models' rows from benchmarks/results/%s.json" % "mixed")
    parser.add_argument("--write", action="store_true")
    args = parser.parse_args()
    names = args.models.split(",") if args.models else bundled_models()
    run("mixed", names, measure, render, merge=args.merge, write=args.write)
    return 0


if __name__ == "__main__":
    sys.exit(main())
