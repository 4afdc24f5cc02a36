"""`--system SPEC` for compile, diff and bench: several graphs run by a driver (q4c.system)."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

import click

from q4c.cli.render import emit_json, human_bytes, table
from q4c.config import CompileOptions
from q4c.errors import QualityLostError


def compile_system_cmd(spec: Path, output: Path | None, options: CompileOptions, *, verify: bool,
                       save_plan: Path | None, report_path: Path | None, as_json: bool, strict: bool = False,
                       unsupported: dict[str, object] | None = None) -> None:
    """q4c compile --system SPEC -o OUTDIR: the graphs to OUTDIR/<name>.onnx, OUTDIR/report.json."""
    from q4c.system_compile import compile_system

    if output is None:
        raise click.UsageError("--system needs -o OUTDIR (a directory for <graph>.onnx and report.json)")
    given = [name for name, value in (unsupported or {}).items() if value]
    if given:
        raise click.UsageError(f"{', '.join(given)} cannot be used with --system (the driver supplies the samples)")

    def progress(step: str) -> None:
        click.echo(f"q4c: {step}", err=True)

    try:
        report = compile_system(spec, output, options, verify=verify, save_plan=save_plan, progress=progress,
                                strict=strict)
    except QualityLostError as e:
        if e.report is not None and report_path is not None:
            report_path.write_text(json.dumps(e.report, indent=2, sort_keys=True, default=str) + "\n")
        if e.report is not None and as_json:
            emit_json(e.report)
        click.echo(f"Error: {e}", err=True)
        raise click.exceptions.Exit(e.exit_code) from e
    if report_path is not None:
        report_path.write_text(json.dumps(report, indent=2, sort_keys=True, default=str) + "\n")
    if as_json:
        emit_json(report)
        return
    rows = [(name, human_bytes(r["input"]["bytes"]), human_bytes(r["output"]["bytes"]), r["compression"],
             r.get("avg_weight_bits", "-"), len(r["tensors"]))
            for name, r in report["graphs"].items()]
    b = report["bytes"]
    rows.append(("system", human_bytes(b["fp32"]), human_bytes(b["compiled"]), round(b["fp32"] / b["compiled"], 3),
                 "-", sum(len(r["tensors"]) for r in report["graphs"].values())))
    click.echo(f"{report['spec']} -> {report['output']}: {b['ratio']:.3f} of the FP32 bytes")
    click.echo(table(["graph", "FP32", "compiled", "x smaller", "avg bits", "quantized tensors"], rows))
    sens = report["sensitivity"]
    if "system_runs" in sens:
        click.echo(f"sensitivity: {sens['tensors']} tensors x candidates = {sens['candidates']} scores, "
                   f"{sens['system_runs']} system runs on {sens['score_samples']} sample(s) in {sens['seconds']:.1f} s")
    plan = report["plan"]["defaults"]
    if plan.get("mode") == "budgeted-system":
        kept = plan.get("kept", "mixed")
        held = sens.get("measured", {}).get("on", "")
        click.echo(f"budget: {plan['used_bytes']} of {plan['budget_bytes']} weight bytes over the whole system"
                   + (f" (kept {kept}: least damage on {held})" if kept != "mixed" and held else ""))
    system = report["system"]
    figures = [f"{n} {m['objective']} {m['damage']:.4g}" + (f", SQNR {m['sqnr_db']:.1f} dB" if "sqnr_db" in m else "")
               for n, m in system["outputs"].items()]
    click.echo(f"system outputs vs FP32 system on {system['samples']} driver sample(s): {'; '.join(figures)}")


def system_runs(spec_path: Path, compiled_dir: Path, against: Path | None = None,
                limit: int | None = None) -> tuple[Any, dict[str, Any], dict[str, Any], list[Any]]:
    """(spec, FP32 runner graphs, compiled runner graphs, samples) for diff and bench."""
    from q4c import graph as g
    from q4c.system import graph_paths, load_spec

    spec = load_spec(spec_path)
    quant = {n: g.load(p) for n, p in graph_paths(compiled_dir, spec.graphs).items()}
    ref_paths = graph_paths(against, spec.graphs) if against is not None else spec.graphs
    ref = {n: g.load(p) for n, p in ref_paths.items()}
    return spec, ref, quant, spec.load_samples(limit)


def diff_system(spec_path: Path, compiled_dir: Path, samples: int, tolerance: float | None,
                as_json: bool) -> list[str]:
    """q4c diff --system SPEC OUTDIR: driver outputs with FP32 vs compiled graphs. Returns the
    outputs below `tolerance` dB."""
    from q4c.diff import diff_models  # noqa: F401  (the per-graph table: q4c diff per graph)
    from q4c.metrics import sqnr_db
    from q4c.system import (
        SystemRunner,
        score_outputs,
        session_graph_runner,
        system_objectives,
    )

    spec, ref, quant, data = system_runs(spec_path, compiled_dir, limit=samples)
    ref_runner = SystemRunner(spec, session_graph_runner(ref))
    quant_runner = SystemRunner(spec, session_graph_runner(quant))
    refs = [ref_runner.run(s, i) for i, s in enumerate(data)]
    outs = [quant_runner.run(s, i) for i, s in enumerate(data)]
    objectives = system_objectives(refs[0], spec=spec.objectives)
    metrics = score_outputs(objectives, refs, outs, keep=True).metrics()
    per_sample = {n: [sqnr_db(r[n], o[n]) for r, o in zip(refs, outs, strict=True)] for n in metrics}
    doc = {"schema": "q4c.diff-system/1", "spec": str(spec_path), "quant": str(compiled_dir), "samples": len(data),
           "outputs": {n: {**m, "per_sample_sqnr_db": per_sample[n]} for n, m in metrics.items()},
           "tolerance_db": tolerance}
    failing = [n for n, m in metrics.items()
               if tolerance is not None and "sqnr_db" in m and not m["sqnr_db"] >= tolerance]
    doc["passed"] = not failing
    if as_json:
        emit_json(doc)
    else:
        click.echo(f"{compiled_dir} vs the FP32 graphs of {spec_path}, driver {spec.run_name}, {len(data)} sample(s)")
        click.echo(table(["output", "objective", "damage", "SQNR dB (pooled)", "SQNR dB min over samples"],
                         [(n, m["objective"], f"{m['damage']:.4g}", m.get("sqnr_db", "-"),
                           min(per_sample[n], default=math.inf)) for n, m in metrics.items()]))
    return failing


def bench_system(spec_path: Path, compiled_dir: Path, samples: int, threads: int, iters: int, warmup: int,
                 as_json: bool) -> None:
    """q4c bench --system SPEC OUTDIR: the driver over the compiled graphs vs the FP32 ones,
    interleaved, per sample (q4c.timing)."""
    from q4c.system import SystemRunner, session_graph_runner
    from q4c.timing import interleaved

    spec, ref, quant, data = system_runs(spec_path, compiled_dir, limit=samples)
    runners = {"compiled": SystemRunner(spec, session_graph_runner(quant, threads)),
               "fp32": SystemRunner(spec, session_graph_runner(ref, threads))}
    def call(key: str) -> None:  # one round: every sample once
        for i, sample in enumerate(data):
            runners[key].run(sample, i)

    timing = interleaved({k: (lambda k=k: call(k)) for k in runners}, rounds=iters, warmup=warmup)
    doc = {"schema": "q4c.bench-system/1", "spec": str(spec_path), "compiled": str(compiled_dir),
           "threads": threads, "samples": len(data), "rounds": timing.rounds,
           "p50_ms": {k: round(1e3 * timing.median(k) / len(data), 3) for k in runners},
           "ratio_p50": round(timing.median("compiled") / timing.median("fp32"), 4)}
    if as_json:
        emit_json(doc)
        return
    click.echo(f"driver {spec.run_name} over {len(data)} sample(s), ONNX Runtime {threads} thread(s), "
               f"{timing.rounds} interleaved rounds (process-CPU medians)")
    click.echo(table(["graphs", "p50 ms per sample"], [(k, v) for k, v in doc["p50_ms"].items()]))
    click.echo(f"time ratio compiled / FP32: {doc['ratio_p50']:.3f}")
    sys.stdout.flush()
