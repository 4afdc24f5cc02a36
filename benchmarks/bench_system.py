"""The trained RNN-T (models/rnnt_sys) compiled as one system vs graph by graph: test WER / CER at
4, 3.5 and 3 average bits, with paired bootstrap intervals (issue 14).

    python benchmarks/bench_system.py [--bits 4,3.5,3] [--seeds 0] [--write]

Rows, each decoded on the 160 test utterances by models/eval_rnnt.py (ONNX Runtime, greedy
transducer decode, the compiled session configs applied):
- FP32, and uniform 4-bit (`q4c compile --system ... --bits 4`: every graph at 4 bits,
  calibrated on the feeds the driver passes it);
- system @ B: `q4c compile --system models/rnnt_sys/system.toml --avg-bits B --objective aligned=kl`
  (one budget over the three graphs, each tensor scored by the KL of the joiner's distribution
  along the FP32 decode, models/rnnt_sys/driver.py; whole plans judged on held-out driver samples);
  `--seeds 0,1,2` repeats it with the driver samples split differently (CompileOptions.seed);
- graph by graph @ B: each graph compiled on its own by `q4c compile --avg-bits B` with its own
  default objective on its own outputs, calibrated on the same recorded driver calls.
Intervals: paired bootstrap 95 % over utterances (benchmarks/stats.py) of WER / CER minus FP32's,
and of the system plan minus the graph-by-graph plan at the same budget.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import MODELS, RESULTS, publish, stamp, stamped_rows, with_stamp  # noqa: E402
from stats import task_difference  # noqa: E402

SPEC = MODELS / "rnnt_sys" / "system.toml"
GRAPHS = ("encoder", "predictor", "joiner")
OBJECTIVE = (("aligned", "kl"),)
CALIB_CALLS = 32


def _eval_module():
    spec = importlib.util.spec_from_file_location("eval_rnnt", MODELS / "eval_rnnt.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _row(config: str, directory: Path, evaluate, **extra) -> dict:
    paths = {g: directory / f"{g}.onnx" for g in GRAPHS}
    r = evaluate(paths)
    print(f"  {config}: WER {100 * r['wer']:.2f} CER {100 * r['cer']:.2f}", file=sys.stderr)
    return {"config": config, "bytes": sum(p.stat().st_size for p in paths.values()), "wer": r["wer"],
            "cer": r["cer"], "items": r["items"], **extra}


def _recorded_calls() -> dict[str, list[dict[str, np.ndarray]]]:
    """Per graph, CALIB_CALLS of the calls the driver makes on its samples with the FP32 graphs."""
    from q4c import graph as g
    from q4c.system import CallLog, SystemRunner, load_spec, session_graph_runner

    spec = load_spec(SPEC)
    runner = SystemRunner(spec, session_graph_runner({n: g.load(p) for n, p in spec.graphs.items()}))
    logs = []
    for i, sample in enumerate(spec.load_samples()):
        logs.append(CallLog())
        runner.run(sample, i, log=logs[-1])
    out = {}
    for name in GRAPHS:
        calls = [feeds for log in logs for feeds, _ in log.calls.get(name, [])]
        picks = sorted(set(np.linspace(0, len(calls) - 1, min(CALIB_CALLS, len(calls))).round().astype(int)))
        out[name] = [calls[i] for i in picks]
    return out


def _graph_by_graph(avg_bits: float, calls: dict, outdir: Path) -> None:
    from q4c import graph as g
    from q4c.compiler import compile_model
    from q4c.config import CompileOptions

    outdir.mkdir(parents=True, exist_ok=True)
    for name in GRAPHS:
        model, _ = compile_model(g.load(MODELS / "rnnt_sys" / f"{name}.onnx"), CompileOptions(avg_bits=avg_bits),
                                 samples=calls[name], verify=False)
        g.save(model, outdir / f"{name}.onnx")


def measure(budgets: list[float], seeds: list[int], tmp: Path) -> list[dict]:
    from q4c.config import CompileOptions
    from q4c.system_compile import compile_system

    evaluate = _eval_module().evaluate
    rows = [_row("FP32", MODELS / "rnnt_sys", evaluate, avg_bits=32)]
    compile_system(SPEC, tmp / "u4", CompileOptions(bits=4), verify=False)
    rows.append(_row("uniform 4-bit", tmp / "u4", evaluate, avg_bits=4))
    calls = _recorded_calls()
    for b in budgets:
        for seed in seeds:
            out = tmp / f"sys_{b}_{seed}"
            report = compile_system(SPEC, out, CompileOptions(avg_bits=b, objectives=OBJECTIVE, seed=seed), verify=False)
            rows.append(_row("system", out, evaluate, avg_bits=b, seed=seed,
                             kept=report["sensitivity"]["measured"].get("kept")))
        out = tmp / f"gbg_{b}"
        _graph_by_graph(b, calls, out)
        rows.append(_row("graph by graph", out, evaluate, avg_bits=b))
    return rows


def render(rows: list[dict]) -> str:
    fp32 = next(r for r in rows if r["config"] == "FP32")
    lines = ["<!-- system:begin -->", "## RNN-T as one system vs graph by graph (WER vs average bits)", "",
             "`models/rnnt_sys` (encoder, predictor, joiner and a greedy decode driver), test set of 160 utterances "
             f"({len(fp32['items'])} here). Intervals: paired bootstrap 95 % over utterances of the difference "
             "(benchmarks/stats.py); vs FP32, and system minus graph by graph at the same budget. System plans: "
             "`--objective aligned=kl` (the joiner's distribution along the FP32 decode), whole plans judged on "
             "held-out driver samples; seed = how the driver samples were split into scoring and held-out.", "",
             "| plan | avg bits | seed | bytes | x of FP32 | WER % | CER % | WER - FP32 | CER - FP32 | WER: system - graph by graph | kept |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        vs = {m: task_difference(m, fp32["items"], r["items"]) for m in ("wer", "cer")} if r is not fp32 else None
        pair = ""
        if r["config"] == "system":
            gbg = next((x for x in rows if x["config"] == "graph by graph" and x["avg_bits"] == r["avg_bits"]), None)
            if gbg is not None:
                pair = task_difference("wer", gbg["items"], r["items"]).describe(100, " pt", 2).split(" 95 %")[0]
        cells = [r["config"], str(r["avg_bits"]), str(r.get("seed", "")), f"{r['bytes']:,}",
                 f"{r['bytes'] / fp32['bytes']:.3f}", f"{100 * r['wer']:.2f}", f"{100 * r['cer']:.2f}",
                 vs["wer"].describe(100, " pt").split(" 95 %")[0] if vs else "",
                 vs["cer"].describe(100, " pt").split(" 95 %")[0] if vs else "", pair, r.get("kept") or ""]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join([*lines, "", *_verdicts(rows), "<!-- system:end -->"])


def _verdicts(rows: list[dict]) -> list[str]:
    """Per budget and seed: the system plan's test WER vs graph by graph and vs FP32, in the words
    of benchmarks/stats.py (better / worse / within noise at 95 %)."""
    fp32 = next(r for r in rows if r["config"] == "FP32")
    out = []
    for r in (r for r in rows if r["config"] == "system"):
        gbg = next((x for x in rows if x["config"] == "graph by graph" and x["avg_bits"] == r["avg_bits"]), None)
        vs_gbg = task_difference("wer", gbg["items"], r["items"]).verdict() if gbg is not None else "-"
        vs_fp32 = task_difference("wer", fp32["items"], r["items"])
        out.append(f"- {r['avg_bits']:g} bits, seed {r.get('seed', 0)}: WER vs graph by graph: {vs_gbg}; vs FP32: "
                   f"{100 * vs_fp32.estimate:+.2f} points, {vs_fp32.verdict(margin=0.003)} (0.3-point margin)")
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bits", default="4,3.5,3", help="average-bit budgets")
    parser.add_argument("--seeds", default="0", help="sample splits of the system compile (CompileOptions.seed)")
    parser.add_argument("--write", action="store_true", help="write benchmarks/results/system.json and BENCHMARKS.md")
    parser.add_argument("--render-only", action="store_true", help="re-render benchmarks/results/system.json")
    args = parser.parse_args()
    import json

    if args.render_only:
        rows = json.loads((RESULTS / "system.json").read_text())
    else:
        with tempfile.TemporaryDirectory() as tmp:
            rows = measure([float(b) for b in args.bits.split(",")], [int(s) for s in args.seeds.split(",")], Path(tmp))
        # the three graphs' hashes in the stamp, and the command that measured the rows
        command = "python " + " ".join(["benchmarks/bench_system.py", *sys.argv[1:]])
        rows += [{"model": f"rnnt_sys/{g}", "config": "stamp only", "command": command} for g in GRAPHS]
    command = next((r["command"] for r in rows if "command" in r), None)
    rows = stamped_rows(rows)
    shown = [r for r in rows if r.get("config") != "stamp only"]
    section = render(shown)
    print(with_stamp(section, stamp("system", rows, command)[0]))
    if args.write:
        publish("system", rows, section, command)
    return 0


if __name__ == "__main__":
    sys.exit(main())
