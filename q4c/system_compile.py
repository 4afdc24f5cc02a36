"""Compile a system of several graphs as one (q4c compile --system): one sensitivity table scored
on the driver's outputs, one knapsack over every graph's weights, each graph then compiled with
its part of the plan and calibrated on the feeds the driver passed it.

Sensitivity (q4c.system_score): every graph gets one ONNX Runtime session with its candidate
weights as graph inputs; the whole driver runs with one tensor of one graph replaced by a
candidate's dequantized values (the other graphs' calls that get the FP32 feeds are answered from
the FP32 run) and the damage of the driver's outputs against the FP32 system's (q4c.objectives,
summed) is that candidate's score. Plan names are the graph's tensor names prefixed with "<graph>/".
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from q4c import graph as g
from q4c import ort as q4ort
from q4c.compiler import _target_opset, compile_model
from q4c.config import CompileOptions
from q4c.errors import ConfigError, QualityLostError
from q4c.pipeline import PassContext, Pipeline
from q4c.quant.plan import FLOAT, PrecisionPlan
from q4c.quant.sensitivity import _weights_as_inputs, candidate_slots, movable_weights
from q4c.quant.weights import element_count
from q4c.registry import find_pass
from q4c.system import (
    CallLog,
    SystemRunner,
    SystemSpec,
    check_all_called,
    load_spec,
    score_outputs,
    session_graph_runner,
    system_objectives,
)
from q4c.system_plan import SystemPlan, combined_plan, split_plan
from q4c.system_score import (
    Member,
    SampleSplit,
    Scoring,
    candidates,
    knapsack,
    score,
    split_samples,
    weight_errors,
)
from q4c.verify import Measurement, describe_loss, judge_quality

logger = logging.getLogger(__name__)

REPORT_SCHEMA = "q4c.compile-system/1"
#: calls of one graph handed to its compile as calibration samples (spread over all recorded calls)
CALIB_CALLS = 32


@dataclass
class _Chosen:
    """The plan per graph (None: uniform --bits), its defaults and the scoring report."""

    plans: dict[str, PrecisionPlan] | None
    defaults: dict[str, Any]
    scoring: dict[str, Any]


def compile_system(spec_path: str | os.PathLike[str], outdir: str | os.PathLike[str],
                   options: CompileOptions | None = None, *, verify: bool = True,
                   save_plan: str | os.PathLike[str] | None = None,
                   progress: Callable[[str], None] | None = None, strict: bool = False) -> dict[str, Any]:
    """Compile every graph of the SPEC into OUTDIR/<name>.onnx under one plan; returns the report
    (also written as OUTDIR/report.json). Nothing is written on error: the graphs go to a
    temporary directory renamed to OUTDIR at the end. `strict`: raise QualityLostError (nothing
    written) when a driver output measures below the quality thresholds (q4c.verify).
    `options.seed` > 0 shuffles the driver samples before they are split into scoring and held-out."""
    start = time.perf_counter()
    options = options or CompileOptions()
    say = progress or (lambda _msg: None)
    _check_options(options)
    spec = load_spec(spec_path)
    outdir = Path(outdir)
    if outdir.exists() and not outdir.is_dir():
        raise ConfigError(f"{outdir}: exists and is not a directory")
    warnings: list[str] = []
    say("canonicalize")
    members = {name: _canonical(name, path, options) for name, path in spec.graphs.items()}
    samples = spec.load_samples(options.calib_samples)  # recorded: every graph's calibration feeds
    scoring = _fp32_runs(spec, members, samples, options, say)
    if not scoring.split.unseen:
        warnings.append(f"{len(samples)} driver sample(s): too few to hold any out; whole plans are judged on the "
                        f"samples they were scored on")
    chosen = _choose(scoring, options, warnings, say)
    tmp = Path(tempfile.mkdtemp(prefix=f".{outdir.name}.", dir=outdir.resolve().parent))
    try:
        reports, compiled = _materialise(members, scoring.logs, chosen.plans, options, tmp, outdir, verify, say, warnings)
        say("measure the compiled system")
        system = _measure_compiled(spec, compiled, samples, scoring.references, scoring.objectives, scoring.split)
        warnings += [f"system {describe_loss(lost)}" for lost in system["quality"]["lost"]]
        combined = combined_plan(reports, chosen.defaults)
        report = _report(spec, outdir, members, reports, system, scoring, chosen, combined, warnings)
        report["seconds"] = round(time.perf_counter() - start, 2)
        (tmp / "report.json").write_text(json.dumps(report, indent=2, sort_keys=True, default=str) + "\n")
        if save_plan is not None:
            combined.save(save_plan)
        if strict and not system["quality"]["ok"]:
            lost = "; ".join(describe_loss(x) for x in system["quality"]["lost"])
            raise QualityLostError(f"{spec.path}: system quality lost ({lost}); --strict: nothing written", report)
        _replace_dir(tmp, outdir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return report


def _check_options(options: CompileOptions) -> None:
    if options.requirements and (options.bits is not None or options.plan_path is not None):
        raise ConfigError("--require chooses the plan; it excludes --bits and --plan")
    if options.activations != "none":
        raise ConfigError("--activations int8 with --system is not supported yet (issue 14)")


def _fp32_runs(spec: SystemSpec, members: Mapping[str, Member], samples: Sequence[Any], options: CompileOptions,
               say: Callable[[str], None]) -> Scoring:
    """Sessions with the weights as inputs, the FP32 system run on every sample (its calls logged)."""
    for m in members.values():
        m.slots = candidate_slots(m.graph, options)
        movable = movable_weights(g.export_model(m.graph.copy())) if m.slots else set()
        m.weights = {n: np.asarray(s.tensor.values, np.float32) for n, s in m.slots.items() if n in movable}
        canonical = g.export_model(m.graph.copy())
        m.session = q4ort.make_session(_weights_as_inputs(canonical, m.weights), threads=1)

    def run_graph(name: str, feeds: dict[str, np.ndarray], changes: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        m = members[name]
        return q4ort.run(m.session, {**feeds, **m.weights, **changes})

    runner = SystemRunner(spec, run_graph)
    say(f"FP32 system run over {len(samples)} sample(s)")
    logs, references = [], []
    for i, sample in enumerate(samples):
        log = CallLog()
        references.append(runner.run(sample, i, log=log))
        logs.append(log)
    check_all_called(spec, logs)
    objectives = system_objectives(references[0], options.objectives, spec.objectives)
    return Scoring(members, runner, samples, references, logs, objectives, split_samples(len(samples), options.seed))


def _choose(s: Scoring, options: CompileOptions, warnings: list[str], say: Callable[[str], None]) -> _Chosen:
    """The system's plan: replayed (--plan), uniform (--bits), or scored and budgeted."""
    fp32_seconds = s.runner.seconds / max(s.runner.runs, 1)
    common = {"fp32_system_seconds_per_sample": round(fp32_seconds, 4), "recorded_samples": len(s.samples)}
    if options.plan_path is not None:
        system_plan = SystemPlan.load(options.plan_path)
        defaults = dict(system_plan.plan.defaults, mode=system_plan.plan.defaults.get("mode", "replayed"))
        return _Chosen(split_plan(system_plan, s.members, warnings), defaults, common)
    if options.bits is not None:
        return _Chosen(None, {"mode": "uniform", "bits": options.bits}, common)
    for m in s.members.values():
        m.table = candidates(m, options, s.logs, s.split)
    scoring: dict[str, Any] = {}
    if options.sensitivity != "mse":
        say(f"sensitivity: {sum(len(m.slots) for m in s.members.values())} tensors, system runs on "
            f"{len(s.split.score)} sample(s)")
        scoring = score(s, options)
    else:
        for m in s.members.values():
            m.table.scores = {n: weight_errors(m, n) for n in m.slots}
    plans, defaults, measured = knapsack(s, options, warnings)
    for plan in plans.values():
        plan.defaults = dict(defaults)
    return _Chosen(plans, defaults, {**scoring, **common, "measured": measured})


def _materialise(members: Mapping[str, Member], logs: Sequence[CallLog], plans: dict[str, PrecisionPlan] | None,
                 options: CompileOptions, tmp: Path, outdir: Path, verify: bool, say: Callable[[str], None],
                 warnings: list[str]) -> tuple[dict[str, dict], dict[str, onnx.ModelProto]]:
    """Each graph compiled into TMP/<name>.onnx with its plan, calibrated on the driver's calls."""
    say("materialise")
    reports, compiled = {}, {}
    for name, m in members.items():
        say(f"compile {name}")
        opts = dataclasses.replace(options, objectives=(), requirements=())  # they name driver outputs
        plan_file = tmp / f".{name}.plan.json"
        if plans is not None:
            plans[name].save(plan_file)
            opts = dataclasses.replace(opts, plan_path=plan_file, bits=None, avg_bits=None, size_budget=None,
                                       ratio=None)
        if not m.slots or (plans is not None and all(tp.bits == FLOAT for tp in plans[name].tensors.values())):
            out, report = m.model, {"input": {}, "tensors": [], "plan": PrecisionPlan().to_json(),
                                    "note": "no weight quantized (none large enough, or the plan keeps all in "
                                            "float): the input graph as it is"}
        else:
            out, report = compile_model(m.model, opts, samples=_calibration_calls(logs, name), verify=verify)
        plan_file.unlink(missing_ok=True)
        out_bytes = g.save(out, tmp / f"{name}.onnx")
        report["input"] = {"path": str(m.path), "bytes": m.path.stat().st_size, **report["input"]}
        report["output"] = {"path": str(outdir / f"{name}.onnx"), "bytes": out_bytes}
        report["compression"] = round(report["input"]["bytes"] / out_bytes, 3)
        reports[name], compiled[name] = report, out
        warnings += [f"{name}: {w}" for w in report.get("warnings", [])]
    return reports, compiled


def _report(spec: SystemSpec, outdir: Path, members: Mapping[str, Member], reports: Mapping[str, dict],
            system: dict, s: Scoring, chosen: _Chosen, combined: SystemPlan, warnings: list[str]) -> dict[str, Any]:
    fp32_bytes = sum(r["input"]["bytes"] for r in reports.values())
    out_bytes = sum(r["output"]["bytes"] for r in reports.values())
    return {
        "schema": REPORT_SCHEMA, "spec": str(spec.path), "output": str(outdir),
        "graphs": dict(reports),
        "bytes": {"fp32": fp32_bytes, "compiled": out_bytes, "ratio": round(out_bytes / fp32_bytes, 4),
                  "weights_fp32": sum(_fp32_weight_bytes(m) for m in members.values())},
        "system": system, "objectives": {n: o.to_json() for n, o in s.objectives.items()},
        "sensitivity": chosen.scoring, "plan": combined.to_json(), "warnings": warnings,
    }


def _canonical(name: str, path: Path, options: CompileOptions) -> Member:
    """Load and run the passes before measure-sensitivity (the names the plan uses)."""
    from q4c.passes import DEFAULT_PIPELINE

    model = g.load(path)
    opset = _target_opset(options)  # with --plan: from the system plan's bits, as compile_model does per graph
    converted = g.convert_opset(model, opset)
    graph = g.import_graph(converted)
    names = list(DEFAULT_PIPELINE[:DEFAULT_PIPELINE.index("measure-sensitivity")])
    ctx = PassContext(options=options, opset=g.default_opset(converted) or g.TARGET_OPSET, samples=[])
    Pipeline([find_pass(n)() for n in names], like=converted).run(graph, ctx)
    return Member(name, path, model, ctx.opset, graph)


def _calibration_calls(logs: Sequence[CallLog], name: str) -> list[dict[str, np.ndarray]]:
    calls = [feeds for log in logs for feeds, _ in log.calls.get(name, [])]
    if len(calls) <= CALIB_CALLS:
        return calls
    picks = np.linspace(0, len(calls) - 1, CALIB_CALLS).round().astype(int)
    return [calls[i] for i in sorted(set(picks))]


def _measure_compiled(spec: SystemSpec, compiled: Mapping[str, onnx.ModelProto], samples: Sequence[Any],
                      references: Sequence[Mapping[str, np.ndarray]], objectives: Mapping[str, Any],
                      split: SampleSplit) -> dict[str, Any]:
    """The driver's outputs with the compiled graphs (ONNX Runtime, their session configs) vs the
    FP32 system, on the held-out driver samples."""
    runner = SystemRunner(spec, session_graph_runner(compiled))
    which = list(split.held)
    outs = [runner.run(samples[i], i) for i in which]
    refs = [references[i] for i in which]
    metrics = score_outputs(objectives, refs, outs, keep=True).metrics()
    measurements = [Measurement(name, "sqnr_db", float(m["sqnr_db"])) for name, m in metrics.items() if "sqnr_db" in m]
    for name, objective in objectives.items():
        if objective.kind != "ignore":
            bad = sum(int(np.sum(~np.isfinite(o[name]) & np.isfinite(r[name]))) for r, o in zip(refs, outs)
                      if o[name].shape == r[name].shape)
            measurements.append(Measurement(name, "nonfinite", bad))
    return {"samples": len(which), "outputs": metrics, "quality": judge_quality(measurements),
            "on": f"{split.describe()}; calibration data: use the driver's own test split to judge"}


def _fp32_weight_bytes(m: Member) -> int:
    return sum(4 * element_count(s.tensor) for s in m.slots.values())


def _replace_dir(tmp: Path, outdir: Path) -> None:
    """Move the finished TMP to OUTDIR; an existing OUTDIR is replaced only now, as a whole."""
    old = None
    if outdir.exists():
        old = outdir.with_name(f".{outdir.name}.old.{os.getpid()}")
        outdir.rename(old)
    tmp.rename(outdir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
