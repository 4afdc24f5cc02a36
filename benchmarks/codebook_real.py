"""bench_codebook's real-model rows: the Silero VAD exports and DeepFilterNet3 (fetched by
models/real/fetch.py, driven by models/real/silero.py and dfn3.py, calibrated on the calibration
split of models/real/audio.py, judged on its test split).

For each, kl-guided plans at 3 and 2 average bits with and without codebook candidates (the same
byte budget for both rows of a pair), the task metric on the test audio:
- Silero: speech/non-speech decision flips at 0.5 vs FP32, streaming (state carried), every
  512-sample chunk of the 64 test clips at 16 kHz; the paired bootstrap 95 % interval of the
  difference (with codebooks - uniform only) over clips (benchmarks/stats.rate_difference).
- DeepFilterNet3, graph by graph (each of enc / erb_dec / df_dec compiled on its own reader with
  the row's options, all three replaced): SQNR of the enhanced audio vs the FP32 model's enhanced
  audio, pooled over the test clips, and the paired bootstrap interval of the per-clip SQNR
  difference (stats.mean_difference).
"""

from __future__ import annotations

import collections
import sys
from pathlib import Path

import numpy as np

import q4c
from q4c.metrics import sqnr_db
from q4c.timing import timed

HERE = Path(__file__).resolve().parent
REAL = HERE.parent / "models" / "real"
sys.path.insert(0, str(REAL))
sys.path.insert(0, str(HERE))
import stats  # noqa: E402

UNIFORM_ONLY = ("symmetric", "symmetric-absmax", "gptq")
REAL_CONFIGS: list[tuple[str, dict]] = [
    ("kl @ 3 bits, uniform schemes only", {"avg_bits": 3.0, "schemes": UNIFORM_ONLY}),
    ("kl @ 3 bits, with codebooks", {"avg_bits": 3.0}),
    ("kl @ 2 bits, uniform schemes only", {"avg_bits": 2.0, "schemes": UNIFORM_ONLY}),
    ("kl @ 2 bits, with codebooks", {"avg_bits": 2.0}),
]
DFN_GRAPHS = ("enc", "erb_dec", "df_dec")
SILERO_NAMES = ("silero_vad", "silero_vad_16k_op15", "silero_vad_half", "silero_vad_op18_ifless",
                "silero_vad_openvino_16k", "silero_vad_16k_sequence")


def _compile(src: Path, dst: Path, options: dict, reader: str) -> tuple[dict, float]:
    opts = q4c.CompileOptions(kernels="fp32-at-load", **options)
    report, wall, _ = timed(lambda: q4c.compile_file(src, dst, opts, reader=reader, verify=False))
    return report, wall


def _picks(report: dict) -> str:
    schemes = collections.Counter(f"{t['bits']}:{t['scheme']}" for t in report["tensors"] if t["bits"] != 32)
    return ", ".join(f"{k} x{v}" for k, v in sorted(schemes.items()))


def _plan_fields(report: dict, wall: float) -> dict:
    defaults = report.get("plan", {}).get("defaults", {})
    guard = report.get("sensitivity", {}).get("measured", {}).get("guard", {})
    return {"avg_weight_bits": report["avg_weight_bits"], "budget_bytes": defaults.get("budget_bytes"),
            "used_bytes": defaults.get("used_bytes"), "weight_bytes": sum(report["weight_bytes"].values()),
            "picks": _picks(report), "guard": guard.get("chosen"), "compile_s": round(wall, 1)}


def silero_rows(export: str, tmp: Path) -> list[dict]:
    import audio
    import fetch
    import silero

    src = fetch.model_path(export)
    reader = f"{REAL / 'silero.py'}:calib_{export}"
    test = audio.load("test", 16000)
    ref = [silero.probs(silero.session_runner(src), x, export) for _, x in test]
    rows = []
    for label, options in REAL_CONFIGS:
        dst = tmp / f"{export}_{len(rows)}.onnx"
        report, wall = _compile(src, dst, options, reader)
        run = silero.session_runner(dst)
        got = [silero.probs(run, x, export) for _, x in test]
        clip_flips = [int(np.sum((r >= 0.5) != (p >= 0.5))) for r, p in zip(ref, got, strict=True)]
        chunks = [int(r.size) for r in ref]
        rows.append({"model": export, "config": label, "bytes": dst.stat().st_size,
                     "size_ratio": round(dst.stat().st_size / src.stat().st_size, 4), **_plan_fields(report, wall),
                     "flips": sum(clip_flips) / sum(chunks), "clip_flips": clip_flips, "clip_chunks": chunks})
        print(f"  {export} {label}: flips {100 * rows[-1]['flips']:.2f} %, {rows[-1]['picks']}", file=sys.stderr)
    return rows


def dfn3_rows(tmp: Path) -> list[dict]:
    import audio
    import dfn3
    import fetch

    src = {g: fetch.model_path(f"dfn3_{g}") for g in DFN_GRAPHS}
    fp32_bytes = sum(p.stat().st_size for p in src.values())
    test = audio.load("test", 48000)
    ref = [dfn3.enhance(dfn3.graph_runners(src), x) for _, x in test]
    rows = []
    for label, options in REAL_CONFIGS:
        dst, fields = {}, []
        for g in DFN_GRAPHS:
            dst[g] = tmp / f"dfn3_{g}_{len(rows)}.onnx"
            report, wall = _compile(src[g], dst[g], options, f"{REAL / 'dfn3.py'}:calib_{g}")
            fields.append(_plan_fields(report, wall))
        runs = dfn3.graph_runners(dst)
        out = [dfn3.enhance(runs, x) for _, x in test]
        size = sum(p.stat().st_size for p in dst.values())
        rows.append({"model": "dfn3", "config": label, "bytes": size, "size_ratio": round(size / fp32_bytes, 4),
                     "avg_weight_bits": "/".join(str(f["avg_weight_bits"]) for f in fields),
                     "budget_bytes": sum(f["budget_bytes"] or 0 for f in fields),
                     "used_bytes": sum(f["used_bytes"] or 0 for f in fields),
                     "weight_bytes": sum(f["weight_bytes"] for f in fields),
                     "picks": "; ".join(f"{g}: {f['picks']}" for g, f in zip(DFN_GRAPHS, fields, strict=True)),
                     "guard": "/".join(str(f["guard"]) for f in fields),
                     "compile_s": round(sum(f["compile_s"] for f in fields), 1),
                     "sqnr_db": sqnr_db(np.concatenate(ref), np.concatenate(out)),
                     "clip_sqnr_db": [sqnr_db(r, o) for r, o in zip(ref, out, strict=True)]})
        print(f"  dfn3 {label}: SQNR {rows[-1]['sqnr_db']:.2f} dB, {rows[-1]['picks']}", file=sys.stderr)
    return rows


def render_real(rows: list[dict]) -> list[str]:
    real = [r for r in rows if r.get("model") in (*SILERO_NAMES, "dfn3")]
    if not real:
        return []
    lines = ["", "Real models (models/real: calibration split of the generated audio, task metric on the test split, "
             "never used for calibration). Silero: decision flips at 0.5 vs FP32, streaming, all 12,945 chunks of "
             "the 64 test clips at 16 kHz; DeepFilterNet3 graph by graph (each graph compiled with the row's "
             "options on its own reader): SQNR of the enhanced audio vs FP32's, pooled over the 64 test clips. "
             "`guard`: the whole plan the guard kept on the unseen calibration units (mixed / mixed without "
             "codebook candidates / uniform 4-bit). Both rows of a pair have the same byte budget and their plans "
             "fit it, but on silero_vad and silero_vad_16k_op15 the files of the codebook "
             "rows are 15-40 % larger than the plan says (`bytes`; weight bytes 164,012 vs 106,608 planned at 3 "
             "bits on 16k_op15): their LSTM weights live in both branches of an `If`, and quantize-weights writes a "
             "codebook weight's indices and tables into each branch (`idx2` and `idx2_1`: twice the planned bytes) "
             "where a uniform weight is stored once; an emission bug this benchmark found, not yet fixed. On those "
             "two exports the codebook rows therefore hold more bytes than the uniform ones.", "",
             "| model | config | bytes | size ratio | picks | guard | flips % | enhanced SQNR dB | compile s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in real:
        flips = f"{100 * r['flips']:.2f}" if "flips" in r else "-"
        sq = f"{r['sqnr_db']:.2f}" if "sqnr_db" in r else "-"
        lines.append(f"| {r['model']} | {r['config']} | {r['bytes']} | {r['size_ratio']} | {r['picks']} | "
                     f"{r.get('guard')} | {flips} | {sq} | {r['compile_s']} |")
    lines += ["", "With vs without codebook candidates at equal bytes on the real models (paired bootstrap 95 % "
              "intervals over test clips; with codebooks - uniform only):", ""]
    lines += _real_verdicts(real)
    return lines


def _real_verdicts(rows: list[dict]) -> list[str]:
    out = []
    for model in dict.fromkeys(r["model"] for r in rows):
        by = {r["config"]: r for r in rows if r["model"] == model}
        for bits in (3, 2):
            a, b = by.get(f"kl @ {bits} bits, uniform schemes only"), by.get(f"kl @ {bits} bits, with codebooks")
            if a is None or b is None:
                continue
            if model == "dfn3":
                iv = stats.mean_difference(a["clip_sqnr_db"], b["clip_sqnr_db"])
                # higher SQNR is better: the verdict words are for lower-is-better, so negate
                neg = stats.Interval(-iv.estimate, -iv.high, -iv.low, iv.items)
                word = {"better": "codebooks better", "worse": "codebooks worse"}.get(neg.verdict(), neg.verdict())
                out.append(f"- dfn3 @ {bits} bits: enhanced SQNR {b['sqnr_db']:.2f} vs {a['sqnr_db']:.2f} dB; per-clip "
                           f"difference {iv.describe(1.0, ' dB')} ({word}); bytes {b['bytes']} vs {a['bytes']}")
            else:
                iv = stats.rate_difference(a["clip_flips"], b["clip_flips"], a["clip_chunks"])
                word = {"better": "codebooks better", "worse": "codebooks worse"}.get(iv.verdict(), iv.verdict())
                out.append(f"- {model} @ {bits} bits: flips {100 * b['flips']:.2f} % vs {100 * a['flips']:.2f} %; "
                           f"difference {iv.describe(100.0, ' points')} ({word}); bytes {b['bytes']} vs {a['bytes']}; "
                           f"picks with codebooks: {b['picks']}")
    return out


def real_rows(name: str, tmp: Path) -> list[dict]:
    return dfn3_rows(tmp) if name == "dfn3" else silero_rows(name, tmp)


def is_real(name: str) -> bool:
    return name == "dfn3" or name in SILERO_NAMES

