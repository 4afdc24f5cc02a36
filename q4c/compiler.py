"""compile_model / compile_file: load, canonicalize, run the pass pipeline, verify, save, report."""

from __future__ import annotations

import dataclasses
import itertools
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from q4c import external_data
from q4c import graph as g
from q4c import ort as q4ort
from q4c.calib.readers import (
    CalibrationReader,
    Feeds,
    Sample,
    SamplesReader,
    open_reader,
    synthetic_samples,
)
from q4c.calib.runner import Progress, materialize
from q4c.config import PLANE_BITS, CompileOptions
from q4c.errors import (
    ConfigError,
    ModelLoadError,
    NonFiniteWeightError,
    QualityLostError,
)
from q4c.metrics import sqnr_db  # noqa: F401  (re-exported: q4c.testing and the benchmarks import it from here)
from q4c.objectives import group_sequences
from q4c.pipeline import Artifact, PassContext, Pipeline
from q4c.quant.holdout import interleaved
from q4c.quant.packing import INT2_OPSET
from q4c.quant.plan import FLOAT, Form, PrecisionPlan
from q4c.quant.sensitivity import objectives_for
from q4c.quant.tying import share_transposed_tables
from q4c.quant.weights import WeightSlot, find_weight_slots
from q4c.records import QuantizedTensor
from q4c.registry import complete_pipeline, find_pass, resolve_pipeline
from q4c.verify import (
    QUALITY_SAMPLES,
    describe_loss,
    judge_quality,
    refuse_inconsistent_model,
    refuse_nonfinite_weights,
    verify_model,
)

logger = logging.getLogger(__name__)

REPORT_SCHEMA = "q4c.compile/1"


def default_output(model_path: Path) -> Path:
    name = model_path.name[: -len(".onnx")] if model_path.name.endswith(".onnx") else model_path.name
    return model_path.with_name(f"{name}.q4.onnx")


def compile_model(
    model: onnx.ModelProto,
    options: CompileOptions | None = None,
    *,
    passes: str | None = None,
    samples: CalibrationReader | list[Sample] | None = None,
    dump_dir: Path | None = None,
    check_each: bool = False,
    verify: bool = True,
    progress: Callable[[str], None] | None = None,
    sample_progress: Progress | None = None,
    save_calib: str | os.PathLike[str] | None = None,
    task_progress: Callable[[str, int, int], None] | None = None,
) -> tuple[onnx.ModelProto, dict[str, Any]]:
    """Run the pipeline on a loaded FP32 model. Returns the new model and the report
    (without file fields; compile_file adds them).

    `samples` (feed dicts, sequences of them for stateful models, or a reader; at most
    `options.calib_samples` are used) become `ctx.samples`, one complete feed dict per call.
    """
    from q4c.passes import DEFAULT_PIPELINE

    options = options or CompileOptions()
    refuse_inconsistent_model(model)
    model, nonfinite = refuse_nonfinite_weights(model, allow=options.allow_nonfinite)
    if nonfinite:  # --allow-nonfinite: those weights (and what is computed from them) stay float
        options = dataclasses.replace(options, keep_fp32=options.keep_fp32.union(*(f.reaches for f in nonfinite)))
    # a table to save or load, or ranges for int8 activations: calibrated before the analyses
    calibrated = save_calib is not None or options.calib_table is not None or options.activations == "int8"
    wanted = frozenset({Artifact.CALIBRATION}) if calibrated else frozenset()
    names = complete_pipeline(resolve_pipeline(passes, DEFAULT_PIPELINE), options, wanted)
    converted = g.convert_opset(model, _target_opset(options))
    graph = g.import_graph(converted)
    ctx = _context(converted, options, samples, sample_progress)
    ctx.task_progress = task_progress
    for f in nonfinite:
        ctx.warn(f"{f.describe()}: kept in float (--allow-nonfinite)")
    Pipeline([find_pass(n)() for n in names], dump_dir=dump_dir, check_each=check_each, audit=check_each,
             like=converted, progress=progress).run(graph, ctx)
    out = g.export_model(graph, like=converted)
    g.keep_declared_value_info(out, model)
    if any(Artifact.QUANTIZED_WEIGHTS in find_pass(n).provides for n in names) and not ctx.quantized:
        raise ModelLoadError(_nothing_quantized(graph, options))
    if ctx.kernel_choice is not None and ctx.kernel_choice["chosen"] == "fp32-at-load":
        # Folded at load anyway, so a tied output projection can read the embedding's codes.
        ctx.kernel_choice["tied_tables_shared"] = share_transposed_tables(out)
    elif ctx.plan is not None and Form.INT8_AT_LOAD in ctx.plan.forms().values():
        share_transposed_tables(out)  # int8-at-load: every DQ is folded at load too (session.disable_quant_qdq=1)
    config = _session_config(out, ctx)
    report = _report(converted, graph, out, ctx, config)
    if ctx.calibration is not None and save_calib is not None:
        ctx.calibration.save(save_calib)
    if verify:
        _verify(report, out, converted, ctx)
    return out, report


def _context(converted: onnx.ModelProto, options: CompileOptions,
             samples: CalibrationReader | list[Sample] | None, sample_progress: Progress | None) -> PassContext:
    """The pass context: at most `options.calib_samples` samples, one complete feed dict per call
    (synthetic ones from the input signature when none are given), grouped by sequence."""
    if samples is None:
        samples = synthetic_samples(converted, count=1, seed=options.seed)
        logger.warning("no --calib data: analysing and verifying on synthetic inputs built from the input signature")
    reader = samples if isinstance(samples, CalibrationReader) else SamplesReader(samples)
    taken = SamplesReader(itertools.islice(reader, options.calib_samples), reader.state_pairs)
    feeds = materialize(converted, taken)
    state_pairs, sequences = group_sequences(converted, taken, feeds)
    if len(sequences) > 1 and all(sequences):  # units of every input group come first (holdout.interleaved)
        sequences = interleaved(sequences)
        feeds = [call for sequence in sequences for call in sequence]
    return PassContext(options=options, opset=g.default_opset(converted) or g.TARGET_OPSET, samples=feeds,
                       sample_progress=sample_progress, sequences=sequences, state_pairs=state_pairs)


def _session_config(out: onnx.ModelProto, ctx: PassContext) -> dict[str, str]:
    """What ONNX Runtime needs to run `out` as planned, written into its metadata."""
    config, slow_ops = q4ort.needed_session_config(out)
    if ctx.options.activations == "int8":
        config, slow_ops = _int8_session_config(out, config, slow_ops, ctx)
    if ctx.plan is not None and {Form.FP32_AT_LOAD, Form.INT8_AT_LOAD} & set(ctx.plan.forms().values()):
        config["session.disable_quant_qdq"] = "1"  # else ORT re-fuses DQ -> MatMul into MatMulNBits
    if slow_ops:
        ctx.warn(f"weights of {', '.join(slow_ops)} have no low-bit kernel in ONNX Runtime: they are stored "
                 f"in low bits but folded to FP32 at session load (session.disable_quant_qdq=1)")
    q4ort.set_session_config(out, config)
    return config


def _report(converted: onnx.ModelProto, graph: gs.Graph, out: onnx.ModelProto, ctx: PassContext,
            config: dict[str, str]) -> dict[str, Any]:
    _add_sensitivity(ctx)
    report: dict[str, Any] = {
        "schema": REPORT_SCHEMA,
        "input": {"params": _float_params(converted)},
        "avg_weight_bits": _avg_weight_bits(graph, ctx),
        "weight_bytes": _weight_bytes(out),
        "tensors": [q.to_json() for q in ctx.quantized],
        "passes": [{"name": r.name, "modified": r.modified, "seconds": round(r.seconds, 4), "stats": r.stats}
                   for r in ctx.records],
        "session_config": config,
        "warnings": ctx.warnings,
    }
    if ctx.kernel_choice is not None:
        report["kernel_choice"] = ctx.kernel_choice
    if ctx.sensitivity is not None:
        report["sensitivity"] = ctx.sensitivity.summary()
    if ctx.pareto:
        report["pareto"] = ctx.pareto
    stored = [(int(np.prod(q.shape)), q.stored_bits) for q in ctx.quantized]
    if stored:
        report["avg_stored_bits"] = round(sum(n * b for n, b in stored) / sum(n for n, _ in stored), 3)
    if ctx.plan is not None:
        report["plan"] = ctx.plan.to_json()
    if ctx.calibration is not None:
        table = ctx.calibration
        report["calibration"] = {"observer": table.observer, "samples": table.samples, "calls": table.calls,
                                 "tensors": len(table.tensors), "state_pairs": table.state_pairs}
    return report


def _verify(report: dict[str, Any], out: onnx.ModelProto, converted: onnx.ModelProto, ctx: PassContext) -> None:
    """The verification stage: the compiled model against the FP32 one on held-out or first samples."""
    units, judged_on = _quality_units(ctx, ctx.samples)
    report["verification"] = verify_model(out, ctx.samples[:1], reference=converted, quality_units=units,
                                          objectives=objectives_for(converted, ctx.options, ctx.state_pairs),
                                          state_pairs=ctx.state_pairs)
    report["verification"]["quality_judged_on"] = judged_on
    report["quality"] = judge_quality(report["verification"]["measurements"])
    for lost in report["quality"]["lost"]:
        ctx.warn(describe_loss(lost))


def _quality_units(ctx: PassContext, samples: list[Feeds]) -> tuple[list[list[Feeds]], str]:
    """What the compiled model's quality is judged on: the held-out calibration samples where
    there are (--require: unseen by the scores and the fitting, though its search judged plans
    on them), else the first QUALITY_SAMPLES samples; whole sequences (closed loop) for stateful
    models."""
    units = [list(u) for u in ctx.sequences] if ctx.sequences else [[f] for f in samples]
    table = ctx.sensitivity
    held = getattr(table, "held_out", None)
    if held is not None and getattr(table, "fit", None) != held and held.stop <= len(units):
        return units[held], (f"held-out calibration samples {held.start}..{held.stop - 1} (not used for the "
                             "scores or fitting; the --require search judged plans on them)")
    return units[:QUALITY_SAMPLES], f"the first {min(len(units), QUALITY_SAMPLES)} calibration sample(s)"


def compile_file(
    model_path: str | os.PathLike[str],
    output: str | os.PathLike[str] | None = None,
    options: CompileOptions | None = None,
    *,
    passes: str | None = None,
    data: str | os.PathLike[str] | None = None,
    reader: str | None = None,
    dump_dir: Path | None = None,
    check_each: bool = False,
    verify: bool = True,
    progress: Callable[[str], None] | None = None,
    sample_progress: Progress | None = None,
    save_plan: str | os.PathLike[str] | None = None,
    save_calib: str | os.PathLike[str] | None = None,
    strict: bool = False,
    task_progress: Callable[[str, int, int], None] | None = None,
) -> dict[str, Any]:
    """Compile MODEL to OUTPUT (default MODEL.q4.onnx beside it); never touches MODEL and
    leaves no OUTPUT behind on failure. Returns the report. `strict`: raise QualityLostError
    (and write nothing) when verification measured an output below the quality thresholds.

    Samples come from `data` (.npz or a directory of them) or a Python `reader`
    ('module:function' or 'file.py:function'); see q4c.calib.readers."""
    model_path = Path(model_path)
    output = Path(output) if output is not None else default_output(model_path)
    if output.resolve() == model_path.resolve():
        raise ModelLoadError(f"{output}: output would overwrite the input model; choose another -o")
    for path, what in ((output, "-o"), (save_plan, "--save-plan"), (save_calib, "--save-calib")):
        if path is not None:
            g.check_writable(path, what)
    start = time.perf_counter()
    if strict and not verify:
        raise ConfigError("--strict judges the compile's verification; drop --no-verify")
    model = g.load(model_path)
    if external_data.approx_bytes(model) > q4ort.SESSION_DETACH_BYTES:  # large: no second copy of every weight
        model = g.convert_opset(model, _target_opset(options or CompileOptions()), consume=True)
    samples = open_reader(model, data, reader=reader) if data is not None or reader is not None else None
    try:
        out, report = compile_model(model, options, passes=passes, samples=samples, dump_dir=dump_dir,
                                    check_each=check_each, verify=verify, progress=progress,
                                    sample_progress=sample_progress, save_calib=save_calib,
                                    task_progress=task_progress)
    except NonFiniteWeightError as e:
        raise NonFiniteWeightError(f"{model_path}: {e}") from e
    if strict and not report["quality"]["ok"]:
        report.update(input={"path": str(model_path), "bytes": model_path.stat().st_size, **report["input"]},
                      output=None)
        lost = "; ".join(describe_loss(x) for x in report["quality"]["lost"])
        raise QualityLostError(f"{model_path}: quality lost ({lost}); --strict: nothing written", report)
    out_bytes = g.save(out, output)
    if save_plan is not None and "plan" in report:
        PrecisionPlan.from_json(report["plan"]).save(save_plan)
    in_bytes = model_path.stat().st_size
    report["input"] = {"path": str(model_path), "bytes": in_bytes, **report["input"]}
    report["output"] = {"path": str(output), "bytes": out_bytes}
    report["compression"] = round(in_bytes / out_bytes, 3)
    report["seconds"] = round(time.perf_counter() - start, 3)
    return report


def _int8_session_config(model: onnx.ModelProto, config: dict[str, str], slow_ops: list[str],
                         ctx: PassContext) -> tuple[dict[str, str], list[str]]:
    """With int8 activations, a DQ weight feeding a Conv/Gemm whose activation is DQ too is a QDQ
    group ONNX Runtime fuses into an integer kernel, not a slow op; session.disable_quant_qdq
    would turn those fusions off, so it is set only if truly slow ops remain, with a warning."""
    initializers = {t.name for graph in g.iter_graph_protos(model.graph) for t in graph.initializer}
    slow: set[str] = set()
    for graph in g.iter_graph_protos(model.graph):
        producers = {o: n for n in graph.node for o in n.output}
        dq_weights = {n.output[0] for n in graph.node if n.op_type == "DequantizeLinear" and n.input[0] in initializers}
        dq_weights |= {n.output[0] for n in graph.node if n.op_type == "Cast" and n.input[0] in dq_weights}
        for node in graph.node:
            if node.op_type not in slow_ops or not dq_weights.intersection(node.input):
                continue
            first = producers.get(node.input[0]) if node.input else None
            in_qdq_group = first is not None and first.op_type == "DequantizeLinear" and first.input[0] not in initializers
            if not in_qdq_group:
                slow.add(node.op_type)
    config = dict(config)
    if not slow:
        config.pop("session.disable_quant_qdq", None)
    else:
        ctx.warn(f"--activations int8: weights of {', '.join(sorted(slow))} need session.disable_quant_qdq=1 to "
                 f"run at FP32 speed, which also turns off ONNX Runtime's integer kernels: the int8 activations "
                 f"are simulated (Q/DQ executed in float)")
    return config, sorted(slow)


def _target_opset(options: CompileOptions) -> int:
    """Opset 25 when a plan may hold 2-bit weights (INT2 storage) or 6-bit ones (a UINT2 plane),
    else 21 (INT4/INT8)."""
    two_bit = options.bits == 2
    if options.bits is None and options.plan_path is None:
        two_bit = any(b == 2 or b in PLANE_BITS for b in options.candidates)
    elif options.plan_path is not None:
        plan = PrecisionPlan.load(options.plan_path)
        if plan.opset is not None:  # the opset the plan was made for (INT2 candidates measured or not)
            return plan.opset
        two_bit = any(tp.bits == 2 or tp.bits in PLANE_BITS for tp in plan.tensors.values())
    return INT2_OPSET if two_bit else g.TARGET_OPSET


def _nothing_quantized(graph: gs.Graph, options: CompileOptions) -> str:
    """Why no weight was quantized, in one line: the largest weights and their sizes when all
    are under `min_elements`."""
    sizes: dict[str, tuple[list[int], int]] = {}
    for slot in find_weight_slots(graph):
        if isinstance(slot, WeightSlot) and g.is_float_constant(slot.tensor):
            shape = [int(d) for d in slot.tensor.shape]
            sizes[slot.tensor.name] = (shape, int(np.prod(shape)))
    if not sizes:
        return "no float weights to quantize (MatMul, Gemm, Conv, LSTM, GRU, RNN, Gather, Einsum)"
    largest = sorted(sizes.items(), key=lambda kv: -kv[1][1])
    if largest[0][1][1] >= options.min_elements:
        return (f"no weight was quantized: all {len(sizes)} quantizable weights are kept in float "
                f"(--keep-fp32 or the plan)")
    shown = ", ".join(f"{name} [{','.join(map(str, shape))}] ({n})" for name, (shape, n) in largest[:3])
    more = f" and {len(largest) - 3} smaller" if len(largest) > 3 else ""
    return (f"no weight has >= {options.min_elements} elements (smaller ones stay float): largest are "
            f"{shown}{more}; {sum(n for _, n in sizes.values())} weights in all, nothing worth quantizing")


def _add_sensitivity(ctx: PassContext) -> None:
    """Per-tensor scores into the report entries, float-kept candidates listed, and the measured
    damage of each Pareto point's plan (all its tensors quantized at once)."""
    table = ctx.sensitivity
    if table is None:
        return
    done = {q.name for q in ctx.quantized}
    for q in ctx.quantized:
        if q.name in table.scores:
            q.sensitivity[table.measure] = dict(table.scores[q.name])
    for name, slot in table.slots.items():
        if name not in done and ctx.plan is not None and name in ctx.plan.tensors:
            ctx.quantized.append(QuantizedTensor(
                name=name, op=slot.node.op, role=slot.role, shape=[int(d) for d in slot.tensor.shape], bits=FLOAT,
                granularity="none", scheme="float", stored_bits=32, sensitivity={table.measure: dict(table.scores[name])}))
    for point in ctx.pareto:
        measured = table.measure_plan(point["choice"], ctx.options.granularity)
        if measured is not None:
            point["measured"] = measured


def _float_params(model: onnx.ModelProto) -> int:
    return sum(int(np.prod(t.dims)) for graph in g.iter_graph_protos(model.graph) for t in graph.initializer
               if t.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE))


def _avg_weight_bits(graph: Any, ctx: PassContext) -> float | None:
    """Mean code bits over every quantizable weight (float ones count 32)."""
    quantized = {q.name: q for q in ctx.quantized if q.bits != FLOAT}
    total = weighted = 0
    for entry in quantized.values():
        n = int(np.prod(entry.shape))
        total += n
        weighted += n * entry.bits
    if ctx.plan is not None:
        # Planned-but-float tensors are still float constants in the graph: they count 32 bits.
        still_float = {s.tensor.name: s.tensor for s in find_weight_slots(graph) if isinstance(s, WeightSlot)}
        for name in ctx.plan.tensors:
            if name not in quantized and name in still_float:
                n = int(np.prod(still_float[name].shape))
                total += n
                weighted += 32 * n
    return round(weighted / total, 3) if total else None


def _weight_bytes(model: onnx.ModelProto) -> dict[str, int]:
    """Initializer bytes by ONNX dtype name (packed sub-byte sizes)."""
    out: dict[str, int] = {}
    for graph in g.iter_graph_protos(model.graph):
        for t in graph.initializer:
            name = onnx.TensorProto.DataType.Name(t.data_type).lower()
            out[name] = out.get(name, 0) + (len(t.raw_data) if t.raw_data else t.ByteSize())
    return dict(sorted(out.items()))
