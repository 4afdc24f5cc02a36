"""Compile a system of several graphs as one (q4c compile --system): one sensitivity table scored
on the driver's outputs, one knapsack over every graph's weights, each graph then compiled with
its part of the plan and calibrated on the feeds the driver passed it.

Sensitivity: every graph gets one ONNX Runtime session with its candidate weights as graph
inputs; the whole driver runs with one tensor of one graph replaced by a candidate's dequantized
values (the other graphs' calls that get the FP32 feeds are answered from the FP32 run) and the
damage of the driver's outputs against the FP32 system's (q4c.objectives, summed) is that
candidate's score. Plan names are the graph's tensor names prefixed with "<graph>/".
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
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from q4c import graph as g
from q4c import ort as q4ort
from q4c.compiler import _target_opset, compile_model
from q4c.config import CompileOptions
from q4c.errors import ConfigError, QualityLostError
from q4c.pipeline import PassContext, Pipeline
from q4c.quant.candidates import Candidate, candidate_list
from q4c.quant.knapsack import Option, solve
from q4c.quant.plan import FLOAT, PrecisionPlan, TensorPrecision
from q4c.quant.sensitivity import (
    SensitivityTable,
    _weights_as_inputs,
    candidate_slots,
    gptq_eligible,
    main_constants,
    movable_weights,
)
from q4c.quant.tying import tied_groups
from q4c.quant.weights import WeightSlot, element_count, quantize_slot
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
from q4c.system_plan import combined_plan, smallest_meeting, split_plan
from q4c.verify import Measurement, describe_loss, judge_quality

logger = logging.getLogger(__name__)

REPORT_SCHEMA = "q4c.compile-system/1"
#: samples each (tensor, candidate) score runs the whole system on
SCORE_SAMPLES = 3
#: samples whole plans are measured on (the uniform-4-bit guard, the report's system figures)
PLAN_SAMPLES = 8
#: calls of one graph handed to its compile as calibration samples (spread over all recorded calls)
CALIB_CALLS = 32


@dataclass
class _Member:
    """One graph of the system, canonicalized (the non-quantizing passes), ready to score."""

    name: str
    path: Path
    model: onnx.ModelProto  # as loaded
    opset: int
    graph: gs.Graph  # canonical
    slots: dict[str, WeightSlot] = field(default_factory=dict)
    weights: dict[str, np.ndarray] = field(default_factory=dict)  # measured weights (graph inputs)
    table: SensitivityTable | None = None
    session: Any = None


def compile_system(spec_path: str | os.PathLike[str], outdir: str | os.PathLike[str],
                   options: CompileOptions | None = None, *, verify: bool = True,
                   save_plan: str | os.PathLike[str] | None = None,
                   progress: Callable[[str], None] | None = None, strict: bool = False) -> dict[str, Any]:
    """Compile every graph of the SPEC into OUTDIR/<name>.onnx under one plan; returns the report
    (also written as OUTDIR/report.json). Nothing is written on error: the graphs go to a
    temporary directory renamed to OUTDIR at the end. `strict`: raise QualityLostError (nothing
    written) when a driver output measures below the quality thresholds (q4c.verify)."""
    start = time.perf_counter()
    options = options or CompileOptions()
    say = progress or (lambda _msg: None)
    if options.requirements and (options.bits is not None or options.plan_path is not None):
        raise ConfigError("--require chooses the plan; it excludes --bits and --plan")
    if options.activations != "none":
        raise ConfigError("--activations int8 with --system is not supported yet (issue 14)")
    spec = load_spec(spec_path)
    outdir = Path(outdir)
    if outdir.exists() and not outdir.is_dir():
        raise ConfigError(f"{outdir}: exists and is not a directory")
    system_plan = PrecisionPlan.load(options.plan_path) if options.plan_path is not None else None
    warnings: list[str] = []

    say("canonicalize")
    members = {name: _canonical(name, path, options) for name, path in spec.graphs.items()}
    samples = spec.load_samples(options.calib_samples)  # recorded: every graph's calibration feeds
    data_driven = options.bits is None and system_plan is None and options.sensitivity != "mse"
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
    objectives = system_objectives(references[0], options.objectives)
    fp32_seconds = runner.seconds / max(runner.runs, 1)

    scoring: dict[str, Any] = {}
    if system_plan is not None:
        plans = split_plan(system_plan, members, warnings)
        defaults = dict(system_plan.defaults, mode=system_plan.defaults.get("mode", "replayed"))
    elif options.bits is not None:
        plans, defaults = None, {"mode": "uniform", "bits": options.bits}
    else:
        for m in members.values():
            m.table = _candidates(m, options, logs)
        if data_driven:
            say(f"sensitivity: {sum(len(m.slots) for m in members.values())} tensors, system runs on "
                f"{min(SCORE_SAMPLES, len(samples))} sample(s)")
            scoring = _score(members, runner, samples, references, logs, objectives, options)
        else:
            for m in members.values():
                m.table.scores = {n: _weight_errors(m, n) for n in m.slots}
        plans, defaults, measured = _knapsack(members, runner, samples, references, logs, objectives, options,
                                              warnings)
        scoring["measured"] = measured

    say("materialise")
    tmp = Path(tempfile.mkdtemp(prefix=f".{outdir.name}.", dir=outdir.resolve().parent))
    try:
        reports, compiled = {}, {}
        for name, m in members.items():
            say(f"compile {name}")
            calls = _calibration_calls(logs, name)
            opts = dataclasses.replace(options, objectives=(), requirements=())  # they name driver outputs
            if plans is not None:
                plan_file = tmp / f".{name}.plan.json"
                plans[name].save(plan_file)
                opts = dataclasses.replace(opts, plan_path=plan_file, bits=None, avg_bits=None, size_budget=None,
                                           ratio=None, requirements=())
            if not m.slots or (plans is not None and all(tp.bits == FLOAT for tp in plans[name].tensors.values())):
                out, report = m.model, {"input": {}, "tensors": [], "plan": PrecisionPlan().to_json(),
                                        "note": "no weight quantized (none large enough, or the plan keeps all in "
                                                "float): the input graph as it is"}
            else:
                out, report = compile_model(m.model, opts, samples=calls, verify=verify)
            if plans is not None:
                plan_file.unlink(missing_ok=True)
            out_bytes = g.save(out, tmp / f"{name}.onnx")
            report["input"] = {"path": str(m.path), "bytes": m.path.stat().st_size, **report["input"]}
            report["output"] = {"path": str(outdir / f"{name}.onnx"), "bytes": out_bytes}
            report["compression"] = round(report["input"]["bytes"] / out_bytes, 3)
            reports[name], compiled[name] = report, out
            warnings += [f"{name}: {w}" for w in report.get("warnings", [])]
        say("measure the compiled system")
        system = _measure_compiled(spec, compiled, samples, references, objectives)
        warnings += [f"system {describe_loss(lost)}" for lost in system["quality"]["lost"]]
        combined = combined_plan(reports, defaults)
        fp32_bytes = sum(r["input"]["bytes"] for r in reports.values())
        out_bytes = sum(r["output"]["bytes"] for r in reports.values())
        report = {
            "schema": REPORT_SCHEMA, "spec": str(spec.path), "output": str(outdir),
            "graphs": reports,
            "bytes": {"fp32": fp32_bytes, "compiled": out_bytes, "ratio": round(out_bytes / fp32_bytes, 4),
                      "weights_fp32": sum(_fp32_weight_bytes(m) for m in members.values())},
            "system": system, "objectives": {n: o.to_json() for n, o in objectives.items()},
            "sensitivity": {**scoring, "fp32_system_seconds_per_sample": round(fp32_seconds, 4),
                            "recorded_samples": len(samples)},
            "plan": combined.to_json(), "warnings": warnings,
            "seconds": round(time.perf_counter() - start, 2),
        }
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


def _canonical(name: str, path: Path, options: CompileOptions) -> _Member:
    """Load and run the passes before measure-sensitivity (the names the plan uses)."""
    from q4c.passes import DEFAULT_PIPELINE

    model = g.load(path)
    opset = _target_opset(options)  # with --plan: from the system plan's bits, as compile_model does per graph
    converted = g.convert_opset(model, opset)
    graph = g.import_graph(converted)
    names = list(DEFAULT_PIPELINE[:DEFAULT_PIPELINE.index("measure-sensitivity")])
    ctx = PassContext(options=options, opset=g.default_opset(converted) or g.TARGET_OPSET, samples=[])
    Pipeline([find_pass(n)() for n in names], like=converted).run(graph, ctx)
    return _Member(name, path, model, ctx.opset, graph)


def _calibration_calls(logs: Sequence[CallLog], name: str) -> list[dict[str, np.ndarray]]:
    calls = [feeds for log in logs for feeds, _ in log.calls.get(name, [])]
    if len(calls) <= CALIB_CALLS:
        return calls
    picks = np.linspace(0, len(calls) - 1, CALIB_CALLS).round().astype(int)
    return [calls[i] for i in sorted(set(picks))]


def _candidates(m: _Member, options: CompileOptions, logs: Sequence[CallLog]) -> SensitivityTable:
    table = SensitivityTable(options.sensitivity if options.sensitivity != "hessian" else "kl", slots=m.slots)
    table.kernel_scales = options.kernel_scales
    if options.sensitivity != "mse" and options.granularity.kind == "block" and m.weights:
        from q4c.quant.gptq import input_hessians

        eligible = {n: s for n, s in gptq_eligible(m.graph, m.slots, main_constants(m.graph)).items() if n in m.weights}
        calls = [feeds for log in logs[:SCORE_SAMPLES] for feeds, _ in log.calls.get(m.name, [])]
        table.hessians = input_hessians(g.export_model(m.graph.copy()), eligible, calls[:4]) if eligible else {}
    tied = {n for group in tied_groups(dict(m.slots)) if len(group) > 1 for n in group}
    opts = options if options.sensitivity != "hessian" else dataclasses.replace(options, sensitivity="kl")
    for name, slot in m.slots.items():
        table.candidates[name] = candidate_list(slot, opts, m.opset, gptq=name in table.hessians, tied=name in tied)
    return table


def _dequantized(m: _Member, name: str, cand: Candidate) -> np.ndarray:
    cache = m.__dict__.setdefault("_dq", {})
    if (name, cand.key) not in cache:
        cache[name, cand.key] = _uncached(m, name, cand)
    return cache[name, cand.key]


def _weight_errors(m: _Member, name: str) -> dict[str, float]:
    w = np.asarray(m.slots[name].tensor.values, np.float32)
    return {c.key: float(np.sum(np.square(_uncached(m, name, c) - w, dtype=np.float64)))
            for c in m.table.candidates[name] if c.bits != FLOAT}


def _uncached(m: _Member, name: str, cand: Candidate) -> np.ndarray:
    w = np.asarray(m.slots[name].tensor.values, np.float32)
    return quantize_slot(m.slots[name], w, cand.bits, cand.granularity, cand.scheme,
                         kernel_scales=m.table.kernel_scales, hessians=m.table.hessians.get(name)).dequantize()


def _score(members: Mapping[str, _Member], runner: SystemRunner, samples: Sequence[Any],
           references: Sequence[Mapping[str, np.ndarray]], logs: Sequence[CallLog], objectives: Mapping[str, Any],
           options: CompileOptions) -> dict[str, Any]:
    """scores[tensor][candidate] = damage of the driver's outputs with only that tensor of that
    graph quantized (weights without a session input fall back to their weight error)."""
    start = time.perf_counter()
    n = min(SCORE_SAMPLES, len(samples))
    runs_before = runner.runs

    def damage(changes: Mapping[str, Mapping[str, np.ndarray]]) -> float:
        outs = [runner.run(samples[i], i, changes, cached=logs[i]) for i in range(n)]
        return score_outputs(objectives, references[:n], outs).damage()

    jobs = [(m, name) for m in members.values() for name in m.slots]

    def score(job: tuple[_Member, str]) -> dict[str, float]:
        m, name = job
        if name not in m.weights:
            return _weight_errors(m, name)
        return {c.key: damage({m.name: {name: _uncached(m, name, c)}}) for c in m.table.candidates[name]
                if c.bits != FLOAT}

    with ThreadPoolExecutor(max_workers=max(1, options.resolved_workers)) as pool:
        for (m, name), scores in zip(jobs, pool.map(score, jobs), strict=True):
            m.table.scores[name] = scores
            logger.info("%s/%s: %s", m.name, name, {k: f"{s:.3g}" for k, s in scores.items()})
    return {"measure": "system-output damage", "tensors": len(jobs), "score_samples": n,
            "candidates": sum(len(m.table.candidates[t]) - 1 for m, t in jobs),
            "system_runs": runner.runs - runs_before, "seconds": round(time.perf_counter() - start, 2),
            "note": "each score: the whole system run through the driver with one tensor of one graph at a "
                    "candidate; damage summed over the driver's outputs (q4c.objectives, nats)"}


def _knapsack(members: Mapping[str, _Member], runner: SystemRunner, samples: Sequence[Any],
              references: Sequence[Mapping[str, np.ndarray]], logs: Sequence[CallLog], objectives: Mapping[str, Any],
              options: CompileOptions, warnings: list[str]) -> tuple[dict[str, PrecisionPlan], dict[str, Any], dict]:
    """One multiple-choice knapsack over all graphs' tensors under the system's budget; the
    mixed plan is measured against uniform 4-bit on the system and the better one kept."""
    from q4c.passes.assign_precision import (
        _group_options,
        _uniform_choice,
        budget_bytes,
    )

    items: list[list[Option]] = []
    where: list[tuple[_Member, list[str]]] = []
    uniform: list[int] | None = []
    budget = 0
    for m in members.values():
        if not m.slots:
            continue
        groups = tied_groups(dict(m.slots))
        opts_m = [_group_options(group, m.table) for group in groups]
        items += opts_m
        where += [(m, group) for group in groups]
        u = _uniform_choice(groups, opts_m, m.table)
        uniform = None if uniform is None or u is None else uniform + list(u)
        budget += budget_bytes(dataclasses.replace(options, size_budget=None), m.slots, m.opset, groups)
    if options.size_budget is not None:
        budget = int(options.size_budget)
    u_choice = tuple(uniform) if uniform is not None else None
    if u_choice is not None and sum(items[i][k].cost for i, k in enumerate(u_choice)) > budget \
            and not options.requirements:
        u_choice = None

    def keyed(choice: Sequence[int]) -> dict[str, dict[str, Candidate]]:
        out: dict[str, dict[str, Candidate]] = {}
        for (m, group), k in zip(where, choice, strict=True):
            for name in group:
                out.setdefault(m.name, {})[name] = m.table.candidates[name][k]
        return out

    n = min(PLAN_SAMPLES, len(samples))

    def measure(choice: Sequence[int], which: Sequence[int] = range(n)) -> dict[str, Any]:
        picked = keyed(choice)
        changes = {gname: {t: _dequantized(members[gname], t, c)
                           for t, c in cands.items() if c.bits != FLOAT and t in members[gname].weights}
                   for gname, cands in picked.items()}
        outs = [runner.run(samples[i], i, changes, cached=logs[i]) for i in which]
        return score_outputs(objectives, [references[i] for i in which], outs).metrics()

    if options.requirements:
        fp32 = sum(max(o.cost for o in opts) for opts in items)
        capped = any(b is not None for b in (options.avg_bits, options.size_budget, options.ratio))
        budget = min(budget, fp32 - 1) if capped else fp32 - 1
        solution, measured = smallest_meeting(items, budget, capped, u_choice, measure, len(samples), options)
        u_choice = None
    else:
        solution = solve(items, budget, incumbent=u_choice)
        measured = {"samples": n, "plan": measure(solution.choice)}
    kept_uniform = False
    if u_choice is not None and tuple(solution.choice) != u_choice:
        measured["uniform_4bit"] = measure(u_choice)
        mixed = sum(v["damage"] for v in measured["plan"].values())
        flat = sum(v["damage"] for v in measured["uniform_4bit"].values())
        if flat < mixed:
            warnings.append(f"the mixed system plan measured worse than uniform 4-bit on the system outputs "
                            f"({mixed:.4g} vs {flat:.4g}); kept uniform 4-bit")
            kept_uniform = True
            measured["plan"] = measured["uniform_4bit"]
    choice = u_choice if kept_uniform else tuple(solution.choice)
    used = sum(items[i][k].cost for i, k in enumerate(choice))
    plans = {name: PrecisionPlan() for name in members}
    for gname, cands in keyed(choice).items():
        for t, c in cands.items():
            plans[gname].tensors[t] = TensorPrecision(c.bits, c.granularity, c.scheme)
    defaults = {"mode": "budgeted-system", "sensitivity": members and next(iter(members.values())).table.measure,
                "budget_bytes": budget, "used_bytes": used, "kept_uniform_4bit": kept_uniform,
                "predicted_damage": sum(items[i][k].score for i, k in enumerate(choice)),
                "candidates": list(options.candidates), "granularity": str(options.granularity)}
    for plan in plans.values():
        plan.defaults = dict(defaults)
    return plans, defaults, measured


def _measure_compiled(spec: SystemSpec, compiled: Mapping[str, onnx.ModelProto], samples: Sequence[Any],
                      references: Sequence[Mapping[str, np.ndarray]], objectives: Mapping[str, Any]) -> dict[str, Any]:
    """The driver's outputs with the compiled graphs (ONNX Runtime, their session configs) vs the
    FP32 system, on the first PLAN_SAMPLES samples."""
    runner = SystemRunner(spec, session_graph_runner(compiled))
    n = min(PLAN_SAMPLES, len(samples))
    outs = [runner.run(samples[i], i) for i in range(n)]
    metrics = score_outputs(objectives, references[:n], outs, keep=True).metrics()
    measurements = [Measurement(name, "sqnr_db", float(m["sqnr_db"])) for name, m in metrics.items() if "sqnr_db" in m]
    for name, objective in objectives.items():
        if objective.kind != "ignore":
            bad = sum(int(np.sum(~np.isfinite(o[name]) & np.isfinite(r[name]))) for r, o in zip(references, outs)
                      if o[name].shape == r[name].shape)
            measurements.append(Measurement(name, "nonfinite", bad))
    return {"samples": n, "outputs": metrics, "quality": judge_quality(measurements),
            "on": "the first driver samples (calibration data: use the driver's own test split to judge)"}


def _fp32_weight_bytes(m: _Member) -> int:
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
