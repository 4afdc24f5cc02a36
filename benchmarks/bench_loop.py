"""Closed-loop vs open-loop sensitivity on Silero VAD: decision flips on the test audio against
file size, for plans chosen at several byte budgets with each scoring mode (issue 13).

    python benchmarks/bench_loop.py [--export silero_vad] [--budgets 3,3.5,4,5,6] [--write]

Writes benchmarks/results/loop.json, benchmarks/results/loop.png and the "loop" section of
BENCHMARKS.md. Calibration: the reader's calibration utterances; flips: every 512-sample chunk
of every test clip, streaming with the state carried (models/real/silero.py).
"""

from __future__ import annotations

import argparse
import importlib
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import q4c
from q4c.metrics import decision_flips

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, RESULTS, publish  # noqa: E402

REAL = REPO / "models" / "real"
sys.path.insert(0, str(REAL))
KEY = "loop"


def measure(export: str, budgets: list[float]) -> list[dict]:
    fetch, silero, audio = (importlib.import_module(m) for m in ("fetch", "silero", "audio"))
    src = fetch.model_path(export)
    test = audio.load("test", 16000)
    ref_run = silero.session_runner(src)
    ref = np.concatenate([silero.probs(ref_run, x, export) for _, x in test])
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for scoring in ("closed-loop", "open-loop"):
            for avg in budgets:
                dst = Path(tmp) / f"{scoring}_{avg}.onnx"
                start = time.perf_counter()
                q4c.compile_file(src, dst, q4c.CompileOptions(avg_bits=avg, scoring=scoring),
                                 reader=f"{REAL / 'silero.py'}:calib_{export}", verify=False)
                run = silero.session_runner(dst)
                got = np.concatenate([silero.probs(run, x, export) for _, x in test])
                row = {"model": export, "scoring": scoring, "avg_bits": avg,
                       "size_ratio": dst.stat().st_size / src.stat().st_size, "flips": decision_flips(ref, got),
                       "seconds": round(time.perf_counter() - start, 1)}
                print(f"  {row}", file=sys.stderr)
                rows.append(row)
    return rows


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for scoring, marker in (("closed-loop", "o-"), ("open-loop", "s--")):
        pts = sorted((r["size_ratio"], 100 * r["flips"]) for r in rows if r["scoring"] == scoring)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker, label=f"plans scored {scoring}")
    ax.axhline(0.5, color="grey", lw=0.8, ls=":")
    ax.set_xlabel("file size / FP32")
    ax.set_ylabel("decision flips on test audio (%)")
    ax.set_title(f"{rows[0]['model']}: plans at --avg-bits " + ", ".join(str(b) for b in sorted({r['avg_bits'] for r in rows})))
    ax.set_yscale("log")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def render(rows: list[dict]) -> str:
    lines = [f"<!-- {KEY}:begin -->", "## Closed-loop vs open-loop sensitivity (Silero VAD)", "",
             "Produced by `python benchmarks/bench_loop.py --write`: the same budgets, candidates scored closed loop "
             "(each call gets the state the quantized model produced on the previous call) or open loop (FP32 state "
             "fed in); whole plans are measured closed loop in both (the uniform-4-bit guard). Flips: speech decisions "
             "at 0.5 vs FP32 over every chunk of the 64 test clips. Plot: `benchmarks/results/loop.png`.", "",
             "| model | scoring | --avg-bits | size ratio | flips % |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['scoring']} | {r['avg_bits']} | {r['size_ratio']:.3f} | {100 * r['flips']:.2f} |")
    lines.append(f"<!-- {KEY}:end -->")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--export", default="silero_vad")
    parser.add_argument("--budgets", default="3,3.5,4,5,6")
    parser.add_argument("--write", action="store_true")
    args = parser.parse_args()
    rows = measure(args.export, [float(b) for b in args.budgets.split(",")])
    section = render(rows)
    print(section)
    if args.write:
        RESULTS.mkdir(exist_ok=True)
        plot(rows, RESULTS / "loop.png")
        publish(KEY, rows, section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
