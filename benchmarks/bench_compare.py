"""q4c against the best peers it has here, side by side in one run, on every bundled model.

Rows per model: FP32; q4c fused FP32 (q4c's rewrites, no quantization: the speed baseline for
fusion); q4c default (sensitivity-guided, bytes of uniform 4-bit), q4c uniform INT4, q4c at 3
average bits, q4c uniform INT8; then every contender of benchmarks/contenders.py at its best
documented settings (ONNX Runtime's quantizers after `quant_pre_process`, per channel; every
MatMulNBitsQuantizer algorithm; NNCF `compress_weights`). For each: success or the exact error,
file size ratio vs FP32, whether it changed the model, output SQNR and KL vs FP32 on held-out
inputs, WER / perplexity where the model has a task (models/eval_asr.py, models/eval_lm.py) with
a paired bootstrap 95 % interval of the difference from FP32 (benchmarks/stats.py), ONNX Runtime
latency vs FP32 and vs fused FP32 (1 thread, interleaved, median process-CPU time: q4c.timing)
and peak memory (RSS high-water mark of a fresh process that loads the model and runs it once).

Verdicts (below the table) count only contenders that changed the model (file under 0.98 of FP32
or a quantization op in its graph) and compare accuracy at matched size: each contender against
the q4c row of the largest size not above the contender's (the contender has the nearest
larger-or-equal size), by the task metric's paired bootstrap interval where the model has a task,
else by the per-input KL (distributions) or SQNR, also with a paired bootstrap interval over the
held-out inputs. "more/less accurate" only when the interval excludes 0; otherwise "within noise".

ORT's quantization tools need `onnx-ir` and `sympy` (the `bench` extra); NNCF rows need `nncf`:

    pip install -e ".[bench]" nncf
    python benchmarks/bench_compare.py [--models a,b] [--iters 20] [--merge] [--write]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx

from q4c import graph as g
from q4c import ort as q4ort
from q4c.metrics import sqnr_db
from q4c.quant.sensitivity import divergence, output_kind
from q4c.timing import CLOCK, interleaved

sys.path.insert(0, str(Path(__file__).resolve().parent))
import stats  # noqa: E402
from _common import MODELS, RESULTS, TASKS, bench_data, bundled_models, publish, run, task_eval  # noqa: E402
from contenders import ALL_CONTENDERS, FUSED_FP32, SETTINGS_ALL, Build, Calibration, q4c_with  # noqa: E402

Q4C_ROWS: list[tuple[str, Build]] = [
    FUSED_FP32,
    ("q4c default (avg 4 bits)", q4c_with()),
    ("q4c uniform INT4", q4c_with(bits=4)),
    ("q4c avg 3 bits", q4c_with(avg_bits=3.0)),
    ("q4c uniform INT8", q4c_with(bits=8)),
]
CONTENDERS: list[tuple[str, Build]] = [*Q4C_ROWS, *ALL_CONTENDERS]

#: op types whose presence means a row quantized something (any domain prefix is stripped)
QUANT_OPS = frozenset({"DequantizeLinear", "QuantizeLinear", "DynamicQuantizeLinear", "MatMulInteger", "MatMulNBits",
                       "GatherBlockQuantized", "DynamicQuantizeLSTM", "DynamicQuantizeMatMul", "QLinearMatMul",
                       "QLinearConv", "QLinearAdd", "QLinearMul", "ConvInteger", "MatMulIntegerToFloat", "QGemm"})
CHANGED_SIZE = 0.98


def _task(name: str, model_path: Path) -> dict:
    result = task_eval(name, model_path)
    if result is None:
        return {"task": None}
    return {"task": float(result[TASKS[name][1]]), "task_items": result.get("items"),
            **({"cer": float(result["cer"])} if "cer" in result else {})}


# -- measurements -----------------------------------------------------------------------------

_PEAK = """
import sys, numpy as np
from q4c import ort as q4ort
import onnx
def hwm():
    return int(next(l for l in open('/proc/self/status') if l.startswith('VmHWM')).split()[1])
s = q4ort.make_session(onnx.load(sys.argv[1]), threads=1)
with np.load(sys.argv[2]) as z:
    s.run(None, {k: z[k] for k in z.files})
print(hwm())
"""


def peak_rss_kib(model: Path, feeds_path: Path) -> int | None:
    out = subprocess.run([sys.executable, "-c", _PEAK, str(model), str(feeds_path)], capture_output=True, text=True)
    return int(out.stdout.strip()) if out.returncode == 0 else None


def latency(paths: dict[str, Path], feeds: dict, iters: int) -> dict[str, float]:
    """Median process-CPU ms of each model, all interleaved (q4c.timing)."""
    sessions = {k: q4ort.make_session(onnx.load(p), threads=1) for k, p in paths.items()}
    timing = interleaved({k: (lambda s=s: s.run(None, feeds)) for k, s in sessions.items()}, rounds=iters, warmup=3)
    return timing.medians_ms()


def accuracy(fp32: Path, other: Path, held_out: list[dict]) -> dict:
    """Mean SQNR and KL over the held-out inputs, and the per-input values (for intervals)."""
    ref_s, out_s = q4ort.make_session(onnx.load(fp32)), q4ort.make_session(onnx.load(other))
    sq, kl = [], []
    for feeds in held_out:
        ref, out = q4ort.run(ref_s, feeds), q4ort.run(out_s, feeds)
        s_item, k_item = [], []
        for name, r in ref.items():
            if np.issubdtype(r.dtype, np.floating):
                s_item.append(min(sqnr_db(r, out[name]), 200.0))  # identical outputs: inf, capped to average
                if output_kind(r) != "real":
                    k_item.append(divergence(r, out[name], output_kind(r)))
        sq.append(float(np.mean(s_item)))
        if k_item:
            kl.append(float(np.mean(k_item)))
    return {"sqnr_db": float(np.mean(sq)), "kl": float(np.mean(kl)) if kl else None, "sqnr_items": sq,
            "kl_items": kl or None}


def quantized(fp32_ops: dict[str, int], row_ops: dict[str, int], size_ratio: float) -> bool:
    """Did the row change the model: smaller file, or quantization ops FP32 does not have."""
    def q(ops: dict[str, int]) -> set[str]:
        return {op.split("::")[-1] for op in ops} & QUANT_OPS
    return size_ratio < CHANGED_SIZE or bool(q(row_ops) - q(fp32_ops))


def measure(name: str, tmp: Path, iters: int) -> list[dict]:
    src = MODELS / f"{name}.onnx"
    feeds_path = MODELS / f"{name}.npz"
    with np.load(feeds_path) as npz:
        sample = {k: npz[k] for k in npz.files}
    calib, held_out, _ = bench_data(name, tmp)
    calib_feeds = [dict(np.load(p)) for p in sorted(calib.glob("*.npz"))]
    calibration = Calibration(feeds=lambda: [dict(f) for f in calib_feeds], data=calib)
    fp32_ops = g.op_histogram(onnx.load(src))
    fp32_acc = accuracy(src, src, held_out)
    rows = [{"model": name, "method": "FP32", "ok": True, "changed": False, "size_ratio": 1.0, "sqnr_db": float("inf"),
             "kl": 0.0, **{k: v for k, v in fp32_acc.items() if k.endswith("_items")}, **_task(name, src),
             "latency_ratio": 1.0, "vs_fused": None, "peak_rss_mib": _mib(peak_rss_kib(src, feeds_path))}]
    fused_path = tmp / f"{name}_fused.onnx"
    for label, build in CONTENDERS:
        dst = fused_path if label == FUSED_FP32[0] else tmp / f"{name}_{len(rows)}.onnx"
        row: dict = {"model": name, "method": label}
        try:  # building, loading and running: any failure is the row's result
            start = time.perf_counter()
            build(src, dst, calibration)
            build_s = round(time.perf_counter() - start, 1)
            paths = {"fp32": src, "row": dst, **({"fused": fused_path} if fused_path.exists() and dst != fused_path else {})}
            ms = latency(paths, sample, iters)
            size = dst.stat().st_size / src.stat().st_size
            ops = g.op_histogram(onnx.load(dst))
            row.update(ok=True, size_ratio=size, changed=quantized(fp32_ops, ops, size), **accuracy(src, dst, held_out),
                       **_task(name, dst), latency_ratio=ms["row"] / ms["fp32"], ms=ms["row"],
                       vs_fused=ms["row"] / ms["fused"] if "fused" in ms else None, build_s=build_s,
                       peak_rss_mib=_mib(peak_rss_kib(dst, feeds_path)))
        except Exception as e:  # noqa: BLE001 - the exact failure is the result
            row.update(ok=False, error=f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:300]}")
            rows.append(row)
            print(f"  {label}: FAILED {row['error']}", file=sys.stderr)
            continue
        rows.append(row)
        print(f"  {label}: " + ", ".join(f"{k}={v}" for k, v in row.items() if not k.endswith("_items")), file=sys.stderr)
    return rows


def _mib(kib: int | None) -> float | None:
    return None if kib is None else round(kib / 1024, 1)


# -- rendering --------------------------------------------------------------------------------

def _is_q4c(row: dict) -> bool:
    return row["method"].startswith("q4c") and row["method"] != FUSED_FP32[0]


def _task_interval(model: str, ref: dict, row: dict) -> stats.Interval | None:
    if model not in TASKS or not ref.get("task_items") or not row.get("task_items"):
        return None
    return stats.task_difference(TASKS[model][1], ref["task_items"], row["task_items"])


def _task_cell(model: str, fp32: dict, row: dict) -> str:
    if row.get("task") is None:
        return "-"
    metric = TASKS[model][1]
    scale, unit = (100.0, " %") if metric == "wer" else (1.0, "")
    iv = _task_interval(model, fp32, row) if row is not fp32 else None
    shown = f"{scale * row['task']:.2f}{unit}"
    return shown if iv is None else f"{shown} ({scale * iv.estimate:+.2f} [{scale * iv.low:+.2f}, {scale * iv.high:+.2f}])"


def render(rows: list[dict], iters: int) -> str:
    lines = [
        "<!-- compare:begin -->",
        "## q4c vs the best peers: ONNX Runtime's quantizers and NNCF",
        "",
        f"Produced by `python benchmarks/bench_compare.py --write` ({time.strftime('%Y-%m-%d')}), all rows in one run. "
        "Calibration and held-out inputs as in the mixed-precision section (trained models: committed calibration "
        "sets, test sets; others: 16 + 16 variants of the sample input); accuracy = SQNR and KL of the outputs vs "
        "FP32 on the held-out inputs (mean over inputs); task metric on the model's test set (bilstm_am: WER, "
        "lstm_lm: perplexity) with, in brackets, the difference from FP32 and its paired bootstrap 95 % interval "
        f"over utterances / text windows. Latency: ONNX Runtime CPU, 1 thread, FP32, q4c fused FP32 and the row's "
        f"model interleaved, median of {iters} ({CLOCK}); `vs fused` divides by q4c's rewrites without quantization, "
        "so fusion is not credited to low-bit weights. Peak RSS: fresh process that loads the model and runs it "
        "once. `changed`: the row's file is under 0.98 of FP32 or its graph has quantization ops FP32 lacks; rows "
        "that did not change the model take no part in the verdicts.",
        "",
        SETTINGS_ALL,
        "",
        "| model | method | size ratio | changed | SQNR dB | KL | task (vs FP32 [95 % CI]) | latency ratio | vs fused "
        "| peak RSS MiB |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    fp32_of = {r["model"]: r for r in rows if r["method"] == "FP32"}
    for r in rows:
        if not r["ok"]:
            lines.append(f"| {r['model']} | {r['method']} | failed: `{r['error']}` | | | | | | | |")
            continue
        kl = "-" if r.get("kl") is None else f"{max(r['kl'], 0.0):.4f}"
        vs_fused = "-" if r.get("vs_fused") is None else f"{r['vs_fused']:.2f}"
        changed = "earlier run" if "changed" not in r else "yes" if r["changed"] else "no"
        lines.append(f"| {r['model']} | {r['method']} | {r['size_ratio']:.3f} | {changed} | {r['sqnr_db']:.2f} | {kl} | "
                     f"{_task_cell(r['model'], fp32_of.get(r['model'], r), r)} | {r['latency_ratio']:.2f} | "
                     f"{vs_fused} | {r['peak_rss_mib']} |")
    lines += ["", *_verdicts(rows), "<!-- compare:end -->"]
    return "\n".join(lines)


def _compare(model: str, mine: dict, theirs: dict) -> tuple[str, str]:
    """(verdict, evidence) of `mine` against `theirs` on accuracy: task interval, else KL, else SQNR."""
    iv = _task_interval(model, theirs, mine)
    if iv is not None:
        metric = TASKS[model][1]
        scale, unit = (100.0, " points") if metric == "wer" else (1.0, "")
        words = {"better": "more accurate", "worse": "less accurate"}
        return (words.get(iv.verdict(), "within noise"),
                f"{metric} mine - theirs {iv.describe(scale, unit)}")
    if mine.get("kl_items") and theirs.get("kl_items"):
        iv = stats.mean_difference(theirs["kl_items"], mine["kl_items"])  # mine - theirs: below 0, mine is better
        verdict = {"better": "more accurate", "worse": "less accurate"}.get(iv.verdict(), "within noise")
        what, digits = "KL mine - theirs", 4
    else:
        iv = stats.mean_difference(theirs["sqnr_items"], mine["sqnr_items"])  # mine - theirs: above 0, mine is better
        verdict = {"worse": "more accurate", "better": "less accurate"}.get(iv.verdict(), "within noise")
        what, digits = "SQNR dB mine - theirs", 2
    return verdict, f"{what} {iv.describe(1.0, digits=digits)}"


def _verdicts(rows: list[dict]) -> list[str]:
    """Per model and contender that changed the model: q4c at the nearest size not above it."""
    out = ["Verdicts: each peer row that changed the model, against the q4c row (default, uniform INT4, avg 3 "
           "bits, uniform INT8) of the largest size not above the peer's (the peer is at the nearest larger-or-equal "
           "size); accuracy by the task metric's paired bootstrap interval where the model has one, else by the "
           "per-input KL (distributions) or SQNR interval over the held-out inputs; `within noise` when the interval "
           "contains 0. Peers that failed or did not change the model are listed, not counted.", ""]
    for model in dict.fromkeys(r["model"] for r in rows):
        if any(r["ok"] and "sqnr_items" not in r for r in rows if r["model"] == model):
            out.append(f"- {model}: rows from an earlier run under the old settings (not rerun): no verdict")
            continue
        # by size; sizes equal to 0.01 of FP32 count as equal, and then the default row comes last, so it
        # is the one a peer meets (uniform INT4 is often a few bytes larger than the default's plan)
        ours = sorted((r for r in rows if r["model"] == model and _is_q4c(r) and r["ok"]),
                      key=lambda r: (round(r["size_ratio"], 2), r["method"].startswith("q4c default"), r["size_ratio"]))
        peers = [r for r in rows if r["model"] == model and not r["method"].startswith(("q4c", "FP32"))]
        counted = [r for r in peers if r["ok"] and r.get("changed")]
        broken = [f"{r['method']} ({r['error'][:80]})" for r in rows
                  if r["model"] == model and _is_q4c(r) and not r["ok"]]
        if not ours or not counted:
            out.append(f"- **{model}**: no verdict: " + ("no q4c row ran" if not ours else
                       "no peer row changed the model (" + ", ".join(
                           f"{r['method']} {'failed' if not r['ok'] else 'unchanged'}" for r in peers) + ")"))
            continue
        tally: dict[str, list[str]] = {"more accurate": [], "within noise": [], "less accurate": [], "no q4c row": []}
        for peer in counted:
            match = [r for r in ours if r["size_ratio"] <= peer["size_ratio"]]
            if not match:
                tally["no q4c row"].append(f"{peer['method']} ({peer['size_ratio']:.3f})")
                continue
            mine = match[-1]
            verdict, evidence = _compare(model, mine, peer)
            tally[verdict].append(f"{peer['method']} ({peer['size_ratio']:.3f}) vs {mine['method']} "
                                  f"({mine['size_ratio']:.3f}): {evidence}")
        skipped = [f"{r['method']} ({'failed' if not r['ok'] else 'unchanged'})" for r in peers if r not in counted]
        out.append(f"- **{model}**: q4c more accurate at matched size than {len(tally['more accurate'])} of "
                   f"{len(counted)} peer rows that changed the model, within noise of {len(tally['within noise'])}, "
                   f"less accurate than {len(tally['less accurate'])}"
                   + (f"; {len(tally['no q4c row'])} peer rows smaller than every q4c row" if tally["no q4c row"] else ""))
        for verdict in ("less accurate", "within noise", "no q4c row"):
            for item in tally[verdict]:
                out.append(f"  - {verdict}: {item}")
        if skipped:
            out.append(f"  - not counted: {', '.join(skipped)}")
        if broken:
            out.append(f"  - q4c rows that FAILED (their peers met the next q4c row down): {', '.join(broken)}")
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=None)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--merge", action="store_true",
                        help="keep the other models' rows from benchmarks/results/%s.json" % "compare")
    parser.add_argument("--write", action="store_true")
    parser.add_argument("--render-only", metavar="COMMAND", default=None,
                        help="re-render benchmarks/results/compare.json without measuring; COMMAND is what the stamp "
                             "names as the command that measured the rows (e.g. one run per model with --merge)")
    args = parser.parse_args()
    if args.render_only is not None:
        rows = json.loads((RESULTS / "compare.json").read_text())
        section = render(rows, args.iters)
        print(section)
        if args.write:
            publish("compare", rows, section, command=args.render_only)
        return 0
    names = args.models.split(",") if args.models else bundled_models()
    run("compare", names, lambda name, tmp: measure(name, tmp, args.iters), lambda rows: render(rows, args.iters),
        merge=args.merge, write=args.write)
    return 0


if __name__ == "__main__":
    sys.exit(main())
