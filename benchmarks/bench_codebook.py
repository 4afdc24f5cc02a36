"""Codebook candidates (mulaw, kmeans, nf4) in sensitivity-guided plans vs uniform-only plans at
equal bytes, on the trained models, and ONNX Runtime's NF4 kernel (MatMulBnb4) vs MatMulNBits.

For bilstm_am and lstm_lm: kl-guided plans at 3 and 2 average bits (the byte budget of that many
bits per weight plus the default scale overhead, `--avg-bits`), once with every scheme (the
default: symmetric, symmetric-absmax, gptq, mulaw, kmeans, nf4) and once with the uniform schemes
only (`--schemes symmetric,symmetric-absmax,gptq`); for reference uniform 2-bit with gptq,
mulaw and nf4 rounding. Calibration: 16 samples of the model's committed calibration set; held-out
KL: 16 test samples vs FP32 (benchmarks/_common.py bench_data); task metric on the full test set
(models/eval_asr.py WER, models/eval_lm.py perplexity) with paired bootstrap intervals
(benchmarks/stats.py). All compiles use `--kernels fp32-at-load` (codebooks are folded to FP32 at
load anyway; the same bytes as MatMulNBits' blocks, without the kernel timing).

The real models (the six Silero VAD exports, DeepFilterNet3: `--models silero_vad,...,dfn3`)
get the same four kl-guided plans judged by their task on the test audio: benchmarks/codebook_real.py.

    python benchmarks/bench_codebook.py [--models bilstm_am,lstm_lm,silero_vad,dfn3] [--merge] [--write]
"""

from __future__ import annotations

import argparse
import collections
import sys
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

import q4c
from q4c import ort as q4ort
from q4c.timing import interleaved, timed

sys.path.insert(0, str(Path(__file__).resolve().parent))
import stats  # noqa: E402
from _common import MODELS, RESULTS, TASKS, bench_data, publish, stamp, stamped_rows, task_eval, with_stamp  # noqa: E402
from bench_mixed import error  # noqa: E402
from codebook_real import is_real, real_rows, render_real  # noqa: E402

UNIFORM_ONLY = ("symmetric", "symmetric-absmax", "gptq")
CONFIGS: list[tuple[str, dict]] = [
    ("uniform 2-bit gptq", {"bits": 2, "scheme": "gptq"}),
    ("uniform 2-bit mulaw", {"bits": 2, "scheme": "mulaw"}),
    ("uniform 2-bit nf4", {"bits": 2, "scheme": "nf4"}),
    ("kl @ 3 bits, uniform schemes only", {"avg_bits": 3.0, "schemes": UNIFORM_ONLY}),
    ("kl @ 3 bits, with codebooks", {"avg_bits": 3.0}),
    ("kl @ 2 bits, uniform schemes only", {"avg_bits": 2.0, "schemes": UNIFORM_ONLY}),
    ("kl @ 2 bits, with codebooks", {"avg_bits": 2.0}),
]
#: (K, N) of the MatMulBnb4 / MatMulNBits timing at M = 1
KERNEL_SHAPES = ((512, 512), (1024, 1024), (2048, 2048))


def measure(name: str, tmp: Path) -> list[dict]:
    src = MODELS / f"{name}.onnx"
    calib, held_out, data = bench_data(name, tmp)
    fp32 = onnx.load(src)
    rows = [_row(name, "FP32", src, src, fp32, held_out, data)]
    for label, options in CONFIGS:
        out = tmp / f"{name}_{len(rows)}.onnx"
        opts = q4c.CompileOptions(kernels="fp32-at-load", **options)
        report, wall, _ = timed(lambda out=out, opts=opts: q4c.compile_file(src, out, opts, data=calib, verify=False))
        schemes = collections.Counter(f"{t['bits']}:{t['scheme']}" for t in report["tensors"] if t["bits"] != 32)
        defaults = report.get("plan", {}).get("defaults", {})
        rows.append(_row(name, label, src, out, fp32, held_out, data, avg_weight_bits=report["avg_weight_bits"],
                         budget_bytes=defaults.get("budget_bytes"), used_bytes=defaults.get("used_bytes"),
                         weight_bytes=sum(report["weight_bytes"].values()),
                         picks=", ".join(f"{k} x{v}" for k, v in sorted(schemes.items())), compile_s=round(wall, 1)))
    return rows


def _row(name: str, label: str, src: Path, path: Path, fp32: onnx.ModelProto, held_out: list, data: str,
         **extra: object) -> dict:
    row = {"model": name, "config": label, "data": data, "bytes": path.stat().st_size,
           "size_ratio": round(path.stat().st_size / src.stat().st_size, 4), **extra}
    if path != src:
        row.update(error(fp32, path, held_out))
    result = task_eval(name, path) or {}
    for key in ("wer", "perplexity"):
        if key in result:
            row[key] = result[key]
    if "items" in result:
        row["items"] = result["items"]
    print(f"  {label}: " + ", ".join(f"{k}={v}" for k, v in row.items() if k not in ("items", "data")), file=sys.stderr)
    return row


def kernel_rows() -> list[dict]:
    """MatMulBnb4 (NF4) vs MatMulNBits (4-bit, block 64, accuracy level 4) vs FP32 MatMul, one row
    of activations (M = 1), 1 thread, 20 calls per timed round, interleaved medians (q4c.timing)."""
    rng = np.random.default_rng(0)
    rows = []
    for k, n in KERNEL_SHAPES:
        block = 64
        bnb = _kernel_model(helper.make_node("MatMulBnb4", ["a", "B", "absmax"], ["y"], domain="com.microsoft", K=k,
                                             N=n, block_size=block, quant_type=1),
                            {"B": rng.integers(0, 256, (n * k + 1) // 2, dtype=np.uint8),
                             "absmax": rng.random((n * k + block - 1) // block).astype(np.float32)}, k, n)
        nbits = _kernel_model(helper.make_node("MatMulNBits", ["a", "B", "scales"], ["y"], domain="com.microsoft", K=k,
                                               N=n, bits=4, block_size=block, accuracy_level=4),
                              {"B": rng.integers(0, 256, (n, k // block, block // 2), dtype=np.uint8),
                               "scales": rng.random(n * (k // block)).astype(np.float32)}, k, n)
        fp = _kernel_model(helper.make_node("MatMul", ["a", "W"], ["y"]),
                           {"W": rng.standard_normal((k, n)).astype(np.float32)}, k, n)
        sessions = {key: q4ort.make_session(m, threads=1) for key, m in (("bnb4", bnb), ("nbits", nbits), ("fp32", fp))}
        feeds = {"a": rng.standard_normal((1, k)).astype(np.float32)}
        timing = interleaved({key: (lambda s=s, feeds=feeds: [s.run(None, feeds) for _ in range(20)])
                              for key, s in sessions.items()},
                             rounds=9)
        rows.append({"kind": "kernel", "config": f"K={k} N={n}", "bnb4_ms": round(timing.median("bnb4") / 20 * 1e3, 4),
                     "nbits_ms": round(timing.median("nbits") / 20 * 1e3, 4),
                     "fp32_ms": round(timing.median("fp32") / 20 * 1e3, 4),
                     "bnb4_over_nbits": round(timing.ratio("bnb4", "nbits"), 2),
                     "bnb4_over_fp32": round(timing.ratio("bnb4", "fp32"), 2)})
        print(f"  kernel {rows[-1]}", file=sys.stderr)
    return rows


def _kernel_model(node: onnx.NodeProto, inits: dict[str, np.ndarray], k: int, n: int) -> onnx.ModelProto:
    graph = helper.make_graph([node], "k", [helper.make_tensor_value_info("a", TensorProto.FLOAT, [1, k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, n])],
                              initializer=[numpy_helper.from_array(v, name) for name, v in inits.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)],
                             ir_version=10)


def render(rows: list[dict]) -> str:
    lines = [
        "<!-- codebooks:begin -->",
        "## Codebooks (mulaw, kmeans, nf4) vs uniform levels at equal bytes",
        "",
        f"Produced by `python benchmarks/bench_codebook.py --write` ({time.strftime('%Y-%m-%d')}). kl-guided plans at "
        "3 and 2 average bits (`--avg-bits`: that many bits per weight plus the default scale overhead, the same "
        "budget for both rows of a pair), with codebook candidates (the default) and with uniform schemes only "
        "(`--schemes symmetric,symmetric-absmax,gptq`); uniform 2-bit rows for reference. Codebooks store packed "
        "1-4 bit indices into float16 centroid tables (per group of output channels; nf4: NormalFloat levels x a "
        "float16 scale per 64 weights), decoded by a Gather chain ONNX Runtime folds at load; their indices are "
        "assigned GPTQ-style where the layer has calibration inputs; the decoder's ~1.2 KB of nodes is counted in "
        "their cost. Calibration: 16 samples of the committed calibration set; held-out KL: 16 test samples vs FP32; "
        "WER / perplexity on the full test set. `--kernels fp32-at-load`. `picks`: bits:scheme x tensors. `weight "
        "bytes`: every initializer in the file (float biases and small tensors too, and in this form a tied "
        "embedding / output table's codes twice, which the plan's budget counts once); codebooks are not offered "
        "for tied tables.",
        "",
        "| model | config | bytes | weight bytes | avg bits | picks | held-out KL | WER % | perplexity | compile s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r.get("kind") == "kernel" or is_real(r.get("model", "")):
            continue
        kl = f"{r['kl']:.4f}" if r.get("kl") is not None else "-"
        wer = f"{100 * r['wer']:.2f}" if "wer" in r else "-"
        ppl = f"{r['perplexity']:.2f}" if "perplexity" in r else "-"
        lines.append(f"| {r['model']} | {r['config']} | {r['bytes']} | {r.get('weight_bytes', '-')} | "
                     f"{r.get('avg_weight_bits', '-')} | {r.get('picks', '-')} | {kl} | {wer} | {ppl} | "
                     f"{r.get('compile_s', '-')} |")
    lines += ["", *_verdicts(rows), *_where_not(rows), *render_real(rows)]
    kernels = [r for r in rows if r.get("kind") == "kernel"]
    if kernels:
        lines += ["", "ONNX Runtime's NF4 kernel, `com.microsoft::MatMulBnb4` (quant_type 1, block 64), vs "
                  "`MatMulNBits` (4 bits, block 64, accuracy level 4) and FP32 MatMul at M = 1 (one activation row, "
                  "1 thread, per call, interleaved process-CPU medians, q4c.timing):", "",
                  "| K x N | MatMulBnb4 ms | MatMulNBits ms | FP32 MatMul ms | Bnb4 / NBits | Bnb4 / FP32 |",
                  "|---|---|---|---|---|---|"]
        for r in kernels:
            lines.append(f"| {r['config']} | {r['bnb4_ms']} | {r['nbits_ms']} | {r['fp32_ms']} | "
                         f"{r['bnb4_over_nbits']} | {r['bnb4_over_fp32']} |")
        lines += ["", "MatMulBnb4 is several times slower than FP32 MatMul on CPU at M = 1 (as if it dequantized the "
                  "whole weight on every call) and far slower than MatMulNBits, so q4c never emits it: nf4 weights "
                  "take the Gather form, folded to FP32 at load."]
    lines.append("<!-- codebooks:end -->")
    return "\n".join(lines)


def _verdicts(rows: list[dict]) -> list[str]:
    out = []
    for model in dict.fromkeys(r["model"] for r in rows if r.get("model") in TASKS):
        by = {r["config"]: r for r in rows if r.get("model") == model}
        key = TASKS[model][1]
        for bits in (3, 2):
            a, b = by.get(f"kl @ {bits} bits, uniform schemes only"), by.get(f"kl @ {bits} bits, with codebooks")
            if a is None or b is None:
                continue
            fmt = (lambda v: f"{100 * v:.2f} %") if key == "wer" else (lambda v: f"{v:.2f}")  # noqa: E731
            verdict = "no interval: per-item scores missing"
            if "items" in a and "items" in b:
                iv = stats.task_difference(key, a["items"], b["items"])
                scale, unit = (100.0, " points") if key == "wer" else (1.0, "")
                verdict = f"{iv.verdict()}: {iv.describe(scale, unit)}"
            kl = "lower" if b["kl"] < a["kl"] else "higher"
            out.append(f"- {model} @ {bits} bits: with codebooks {fmt(b[key])} vs uniform only {fmt(a[key])} "
                       f"({verdict}); held-out KL {b['kl']:.4f} vs {a['kl']:.4f} ({kl}); weight bytes "
                       f"{b['weight_bytes']} vs {a['weight_bytes']} (budget {b['budget_bytes']}); picks: {b['picks']}")
    return out


def _where_not(rows: list[dict]) -> list[str]:
    """Where codebooks did not win, stated from the rows: schemes no plan picked, and uniform
    codebook rows against uniform 2-bit gptq (fewer bytes there: no scales, so not equal bytes)."""
    plans = [r for r in rows if r.get("config", "").endswith("with codebooks")]
    picked = {p.split(":")[1].split(" ")[0] for r in plans for p in r.get("picks", "").split(", ") if ":" in p}
    never = [s for s in ("mulaw", "kmeans", "nf4") if s not in picked]
    out = []
    if never:
        out.append(f"- Not picked by any plan here: {', '.join(never)} (offered for every tensor, never the "
                   f"knapsack's choice at these budgets: its measured kl damage was not the least for its bytes).")
    for model in dict.fromkeys(r["model"] for r in rows if r.get("model") in TASKS):
        by = {r["config"]: r for r in rows if r.get("model") == model}
        base = by.get("uniform 2-bit gptq")
        worse = [f"{c.split()[-1]} KL {by[c]['kl']:.3f}" for c in ("uniform 2-bit mulaw", "uniform 2-bit nf4")
                 if c in by and base is not None and by[c]["kl"] > base["kl"]]
        if worse:
            out.append(f"- {model}: a codebook for every tensor at 2 bits loses to uniform 2-bit gptq "
                       f"(KL {base['kl']:.3f}): {', '.join(worse)}; codebooks help as per-tensor candidates, not as a "
                       f"blanket scheme.")
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(TASKS))
    parser.add_argument("--no-kernels", action="store_true", help="skip the MatMulBnb4 timing")
    parser.add_argument("--from-results", action="store_true",
                        help="re-render from benchmarks/results/codebooks.json instead of measuring")
    parser.add_argument("--merge", action="store_true",
                        help="keep the saved rows (benchmarks/results/codebooks.json) of the models not rerun, and the "
                             "kernel rows with --no-kernels")
    parser.add_argument("--write", action="store_true")
    args = parser.parse_args()
    import json
    import tempfile

    rows: list[dict] = []
    if args.from_results:
        rows = json.loads((RESULTS / "codebooks.json").read_text())
    else:
        with tempfile.TemporaryDirectory() as tmp:
            for name in args.models.split(","):
                print(f"bench: {name}", file=sys.stderr)
                rows.extend(real_rows(name, Path(tmp)) if is_real(name) else measure(name, Path(tmp)))
        if not args.no_kernels:
            rows.extend(kernel_rows())
        if args.merge and (RESULTS / "codebooks.json").exists():
            names = args.models.split(",")
            saved = json.loads((RESULTS / "codebooks.json").read_text())
            kept = [r for r in saved if (r.get("kind") == "kernel" and args.no_kernels)
                    or (r.get("kind") != "kernel" and r.get("model") not in names)]
            rows = [r for r in rows if r.get("kind") != "kernel"] + kept + [r for r in rows if r.get("kind") == "kernel"]
    rows = stamped_rows(rows)
    section = render(rows)
    print(with_stamp(section, stamp("codebooks", rows)[0]))
    if args.write:
        publish("codebooks", rows, section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
