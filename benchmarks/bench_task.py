"""Task metrics of the trained models at several precisions: what quantization does to word
error rate (bilstm_am) and perplexity (lstm_lm), not just to output SQNR.

For each trained model: FP32; q4c uniform 4, 3 and 2 bits (`--bits N`; 3-bit codes are stored
in 4-bit containers, so uniform 3-bit has the bytes of uniform 4-bit), with nearest rounding and,
for 3 and 2 bits, with GPTQ rounding (`--scheme gptq`); q4c's sensitivity-guided
plans at the default budget (the bytes of uniform 4-bit) and at 3.5 and 3 average bits, with the
kl measure (the default) and hessian. Calibration: the model's committed calibration set
(models/data/<name>_calib: dev utterances, training text); metric: its test set. Default kernels
(`--kernels auto`), as a user compiles.

    python benchmarks/bench_task.py [--models bilstm_am,lstm_lm] [--write]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import q4c
from q4c.timing import timed

sys.path.insert(0, str(Path(__file__).resolve().parent))
import stats  # noqa: E402
from _common import DATA, MODELS, RESULTS, TASKS, publish, run, stamp, task_eval, with_stamp, write_section  # noqa: E402

CONFIGS: list[tuple[str, dict]] = [
    ("uniform 4-bit", {"bits": 4}),
    ("uniform 3-bit", {"bits": 3}),
    ("uniform 2-bit", {"bits": 2}),
    ("uniform 3-bit gptq", {"bits": 3, "scheme": "gptq"}),
    ("uniform 2-bit gptq", {"bits": 2, "scheme": "gptq"}),
    ("q4c default (kl, bytes of 4-bit)", {}),
    ("q4c kl @ 3.5 bits", {"avg_bits": 3.5}),
    ("q4c kl @ 3 bits", {"avg_bits": 3.0}),
    ("q4c hessian @ 3.5 bits", {"avg_bits": 3.5, "sensitivity": "hessian"}),
    ("q4c hessian @ 3 bits", {"avg_bits": 3.0, "sensitivity": "hessian"}),
]


def _row(name: str, label: str, path: Path, fp32_bytes: int, **extra: object) -> dict:
    result = task_eval(name, path) or {}
    row = {"model": name, "config": label, "bytes": path.stat().st_size, "size_ratio": path.stat().st_size / fp32_bytes,
           **extra}
    for key in ("wer", "cer", "perplexity"):
        if key in result:
            row[key] = result[key]
    for part in ("seen_voices", "held_out_voice"):
        if part in result:
            row[f"wer_{part}"] = result[part]["wer"]
    if "items" in result:  # per utterance / window: paired bootstrap intervals in the verdicts
        row["items"] = result["items"]
    print(f"  {label}: " + ", ".join(f"{k}={v}" for k, v in row.items() if k != "items"), file=sys.stderr)
    return row


def measure(name: str, tmp: Path) -> list[dict]:
    src = MODELS / f"{name}.onnx"
    calib = DATA / f"{name}_calib"
    fp32_bytes = src.stat().st_size
    rows = [_row(name, "FP32", src, fp32_bytes)]
    for label, options in CONFIGS:
        out = tmp / f"{name}_{len(rows)}.onnx"
        report, wall, _ = timed(lambda: q4c.compile_file(src, out, q4c.CompileOptions(**options), data=calib, verify=False))
        rows.append(_row(name, label, out, fp32_bytes, avg_weight_bits=report["avg_weight_bits"],
                         avg_stored_bits=report.get("avg_stored_bits"), compile_s=round(wall, 1)))
    return rows


def render(rows: list[dict]) -> str:
    lines = [
        "<!-- task:begin -->",
        "## Task metrics of the trained models",
        "",
        "Calibration on the "
        "model's committed calibration set (bilstm_am: 24 dev utterances; lstm_lm: 32 training-text windows), metric "
        "on its test set (bilstm_am: 160 utterances, greedy CTC, `models/eval_asr.py`; lstm_lm: 349 windows of 64 "
        "tokens, `models/eval_lm.py`). Default kernels. `avg bits`: code bits per quantized weight as planned "
        "(3-bit codes are stored in 4-bit containers: `stored` bits). Verdicts: paired bootstrap 95 % interval of the "
        "difference over test utterances / windows (2,000 resamples, benchmarks/stats.py); `better`/`worse` when it "
        "excludes 0, `no worse` only when its upper end is at or below 0, else `within noise`.",
        "",
        "| model | config | bytes | size ratio | avg bits (stored) | WER % | CER % | WER seen / held-out voice % | perplexity |",
        "|---|---|---|---|---|---|---|---|---|",
    ]

    def pct(r: dict, key: str) -> str:
        return f"{100 * r[key]:.2f}" if key in r else "-"

    for r in rows:
        bits = "-" if "avg_weight_bits" not in r else f"{r['avg_weight_bits']} ({r.get('avg_stored_bits')})"
        voices = (f"{pct(r, 'wer_seen_voices')} / {pct(r, 'wer_held_out_voice')}"
                  if "wer_seen_voices" in r else "-")
        ppl = f"{r['perplexity']:.2f}" if "perplexity" in r else "-"
        lines.append(f"| {r['model']} | {r['config']} | {r['bytes']} | {r['size_ratio']:.3f} | {bits} | "
                     f"{pct(r, 'wer')} | {pct(r, 'cer')} | {voices} | {ppl} |")
    lines += ["", *_verdicts(rows), "<!-- task:end -->"]
    return "\n".join(lines)


def _versus(key: str, a: dict, b: dict) -> str:
    """B against A on the task metric: the verdict of the paired bootstrap 95 % interval of B - A
    (benchmarks/stats.py: "no worse" only when the interval's upper end is at or below 0)."""
    if "items" not in a or "items" not in b:
        return "no interval: per-item scores missing"
    iv = stats.task_difference(key, a["items"], b["items"])
    scale, unit = (100.0, " points") if key == "wer" else (1.0, "")
    return f"{iv.verdict()}: {iv.describe(scale, unit)}"


def _verdicts(rows: list[dict]) -> list[str]:
    """The comparisons the issues ask for, stated from the rows above, each with the paired
    bootstrap 95 % interval of the difference over utterances / text windows."""
    out = []
    for model in dict.fromkeys(r["model"] for r in rows):
        by = {r["config"]: r for r in rows if r["model"] == model}
        key = TASKS[model][1]
        fmt = (lambda v: f"{100 * v:.2f} %") if key == "wer" else (lambda v: f"{v:.2f}")  # noqa: E731
        fp32, default = by["FP32"], by["q4c default (kl, bytes of 4-bit)"]
        u4, u3, g3 = by["uniform 4-bit"], by["uniform 3-bit"], by["uniform 3-bit gptq"]
        m35, m3 = by["q4c kl @ 3.5 bits"], by["q4c kl @ 3 bits"]
        out.append(f"- {model}: default {fmt(default[key])} vs FP32 {fmt(fp32[key])} at {default['size_ratio']:.3f} of "
                   f"its size ({_versus(key, fp32, default)}); kl @ 3.5 bits {fmt(m35[key])} vs uniform 4-bit "
                   f"{fmt(u4[key])} at {m35['bytes'] / u4['bytes']:.2f} of its bytes ({_versus(key, u4, m35)}); "
                   f"kl @ 3 bits {fmt(m3[key])} vs uniform 3-bit {fmt(u3[key])} at {m3['bytes'] / u3['bytes']:.2f} of its "
                   f"bytes ({_versus(key, u3, m3)}; uniform 3-bit with gptq rounding {fmt(g3[key])}, "
                   f"{_versus(key, g3, m3)})")
    return out


#: the rows models/README.md shows per trained model (its "Trained models" tables), in this order
README_ROWS = (("FP32", "FP32"), ("uniform 4-bit", "q4c `--bits 4`"), ("uniform 2-bit", "q4c `--bits 2`"),
               ("q4c default (kl, bytes of 4-bit)", "q4c default"))


def readme_block(model: str, rows: list[dict], command: str) -> str:
    """The stamped table of `model` in models/README.md (the `task-<model>` block): a few rows of
    this benchmark, so that file's q4c figures are regenerated with it instead of copied."""
    by = {r["config"]: r for r in rows if r["model"] == model}
    key = f"task-{model}"
    if TASKS[model][1] == "wer":
        lines = [f"| `{model}` on the test set | file | WER | CER | WER seen / held-out voice |",
                 "| --- | ---: | ---: | ---: | ---: |"]
        lines += [f"| {label} | {by[c]['bytes']:,} | {100 * by[c]['wer']:.2f} % | {100 * by[c]['cer']:.2f} % | "
                  f"{100 * by[c]['wer_seen_voices']:.2f} / {100 * by[c]['wer_held_out_voice']:.2f} % |"
                  for c, label in README_ROWS]
    else:
        lines = [f"| `{model}` on the test text | file | perplexity |", "| --- | ---: | ---: |"]
        lines += [f"| {label} | {by[c]['bytes']:,} | {by[c]['perplexity']:.2f} |" for c, label in README_ROWS]
    line, _ = stamp(key, [by[c] for c, _ in README_ROWS], command)
    return "\n".join([f"<!-- {key}:begin -->", *lines, "", line, f"<!-- {key}:end -->"])


def write_readme(rows: list[dict], command: str) -> None:
    for model in dict.fromkeys(r["model"] for r in rows):
        write_section(MODELS / "README.md", readme_block(model, rows, command), f"task-{model}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(TASKS))
    parser.add_argument("--merge", action="store_true", help="keep the other models' rows from benchmarks/results/task.json")
    parser.add_argument("--write", action="store_true",
                        help="update BENCHMARKS.md, benchmarks/results/task.json and the tables in models/README.md")
    parser.add_argument("--render-only", action="store_true", help="re-render from benchmarks/results/task.json")
    args = parser.parse_args()
    if args.render_only:
        rows = json.loads((RESULTS / "task.json").read_text())
        section = render(rows)
        print(section)
        if args.write:
            command = "python benchmarks/bench_task.py --write, then --render-only --write"
            publish("task", rows, section, command)
            write_readme(rows, command)
        return 0
    run("task", args.models.split(","), measure, render, merge=args.merge, write=args.write)
    if args.write:
        write_readme(json.loads((RESULTS / "task.json").read_text()), "python benchmarks/bench_task.py --write")
    return 0


if __name__ == "__main__":
    sys.exit(main())
