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

from q4c import graph as g
from q4c import ort as q4ort
from q4c.calib.readers import CalibrationReader, Feeds, Sample, SamplesReader, open_reader, synthetic_samples
from q4c.calib.runner import Progress, materialize
from q4c.config import CODEBOOK_SCHEMES, CompileOptions
from q4c.errors import ConfigError, ModelLoadError, NonFiniteWeightError, QualityLostError
from q4c.objectives import group_sequences
from q4c.quant.sensitivity import objectives_for
from q4c.metrics import sqnr_db  # noqa: F401  (re-exported: q4c.testing and the benchmarks import it from here)
from q4c.pipeline import Pass, PassContext, Pipeline
from q4c.quant.packing import INT2_OPSET
from q4c.quant.plan import FLOAT, PrecisionPlan
from q4c.quant.tying import share_transposed_tables
from q4c.quant.weights import WeightSlot, find_weight_slots
from q4c.registry import find_pass, resolve_pipeline
from q4c.verify import (QUALITY_SAMPLES, describe_loss, judge_quality, refuse_inconsistent_model, refuse_nonfinite_weights,
                        verify_model)

logger = logging.getLogger(__name__)

REPORT_SCHEMA = "q4c.compile/1"
#: wall-clock budget for timing the two ONNX Runtime forms when --kernels auto
KERNEL_TIMING_SECONDS = 3.0


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
    names = _with_calibration(resolve_pipeline(passes, DEFAULT_PIPELINE), options, save_calib is not None)
    pass_objects = [find_pass(n)() for n in names]
    converted = g.convert_opset(model, _target_opset(options))
    graph = g.import_graph(converted)
    if samples is None:
        samples = synthetic_samples(model, count=1, seed=options.seed)
        logger.warning("no --calib data: analysing and verifying on synthetic inputs built from the input signature")
    reader = samples if isinstance(samples, CalibrationReader) else SamplesReader(samples)
    taken = SamplesReader(itertools.islice(reader, options.calib_samples), reader.state_pairs)
    samples = materialize(converted, taken)
    state_pairs, sequences = group_sequences(converted, taken, samples)
    ctx = PassContext(options=options, opset=g.default_opset(converted) or g.TARGET_OPSET, samples=samples,
                      sample_progress=sample_progress, sequences=sequences, state_pairs=state_pairs)
    for f in nonfinite:
        ctx.warn(f"{f.describe()}: kept in float (--allow-nonfinite)")
    # Run up to the kernel lowering, keep that (DequantizeLinear) form, then lower: for
    # kernels="auto" both forms are timed and the faster one is kept.
    split = names.index("lower-ort-kernels") if "lower-ort-kernels" in names else len(names)
    # Weights are quantized from here on: "auto" may redo it with float16 scales (see below).
    qsplit = names.index("quantize-weights") if "quantize-weights" in names else split
    common = dict(dump_dir=dump_dir, check_each=check_each, like=converted, progress=progress)
    Pipeline(pass_objects[:qsplit], **common).run(graph, ctx)
    auto = options.kernels == "auto" and options.activations == "none" and qsplit < split < len(names)
    unquantized = g.export_model(graph, like=converted) if auto else None
    Pipeline(pass_objects[qsplit:split], first_index=qsplit + 1, **common).run(graph, ctx)
    dq_form = g.export_model(graph, like=converted) if split < len(names) else None
    Pipeline(pass_objects[split:], first_index=split + 1, **common).run(graph, ctx)
    out = g.export_model(graph, like=converted)

    if "quantize-weights" in names and not ctx.quantized:
        raise ModelLoadError(_nothing_quantized(graph, options))
    kernel_choice = None
    if auto and "com.microsoft::MatMulNBits" in g.op_histogram(out):
        out, kernel_choice = _choose_kernels(out, dq_form, samples[0], ctx)
        if kernel_choice["chosen"] == "fp32-at-load" and unquantized is not None:
            # MatMul and embedding weights got float32 scales for kernels that will not run:
            # quantize again with float16 scales, as --kernels fp32-at-load does. Same bytes
            # (auto blocks: 32 x float16 = 64 x float32 per weight), half the block: less error.
            graph, out = _requantize_for_fp32_at_load(unquantized, pass_objects[qsplit:], ctx, common, qsplit)
            kernel_choice["tied_tables_shared"] = share_transposed_tables(out)
    config, slow_ops = q4ort.needed_session_config(out)
    if options.activations == "int8":
        config, slow_ops = _int8_session_config(out, config, slow_ops, ctx)
    if options.kernels == "fp32-at-load" or (kernel_choice is not None and kernel_choice["chosen"] == "fp32-at-load"):
        config["session.disable_quant_qdq"] = "1"  # else ORT re-fuses DQ -> MatMul into MatMulNBits
    if slow_ops:
        ctx.warn(f"weights of {', '.join(slow_ops)} have no low-bit kernel in ONNX Runtime: they are stored "
                 f"in low bits but folded to FP32 at session load (session.disable_quant_qdq=1)")
    q4ort.set_session_config(out, config)

    _add_sensitivity(ctx)
    report: dict[str, Any] = {
        "schema": REPORT_SCHEMA,
        "input": {"params": _float_params(converted)},
        "avg_weight_bits": _avg_weight_bits(graph, ctx),
        "weight_bytes": _weight_bytes(out),
        "tensors": ctx.quantized,
        "passes": [{"name": r.name, "modified": r.modified, "seconds": round(r.seconds, 4), "stats": r.stats}
                   for r in ctx.records],
        "session_config": config,
        "warnings": ctx.warnings,
    }
    if kernel_choice is not None:
        report["kernel_choice"] = kernel_choice
    if ctx.sensitivity is not None:
        report["sensitivity"] = ctx.sensitivity.summary()
    if ctx.pareto:
        report["pareto"] = ctx.pareto
    stored = [(int(np.prod(q["shape"])), q.get("stored_bits", q["bits"])) for q in ctx.quantized]
    if stored:
        report["avg_stored_bits"] = round(sum(n * b for n, b in stored) / sum(n for n, _ in stored), 3)
    if ctx.plan is not None:
        report["plan"] = ctx.plan.to_json()
    if ctx.calibration is not None:
        table = ctx.calibration
        report["calibration"] = {"observer": table.observer, "samples": table.samples, "calls": table.calls,
                                 "tensors": len(table.tensors), "state_pairs": table.state_pairs}
        if save_calib is not None:
            table.save(save_calib)
    if verify:
        units, judged_on = _quality_units(ctx, samples)
        report["verification"] = verify_model(out, samples[:1], reference=converted, quality_units=units,
                                              objectives=objectives_for(converted, options, ctx.state_pairs),
                                              state_pairs=ctx.state_pairs)
        report["verification"]["quality_judged_on"] = judged_on
        report["quality"] = judge_quality(report["verification"]["measurements"])
        for lost in report["quality"]["lost"]:
            ctx.warn(describe_loss(lost))
    return out, report


def _quality_units(ctx: PassContext, samples: list[Feeds]) -> tuple[list[list[Feeds]], str]:
    """What the compiled model's quality is judged on: the held-out calibration samples where
    the plan was chosen without them (--require), else the first QUALITY_SAMPLES samples; whole
    sequences (closed loop) for stateful models."""
    units = [list(u) for u in ctx.sequences] if ctx.sequences else [[f] for f in samples]
    table = ctx.sensitivity
    held = getattr(table, "held_out", None)
    if held is not None and getattr(table, "fit", None) != held and held.stop <= len(units):
        return units[held], f"held-out calibration samples {held.start}..{held.stop - 1} (not used to choose the plan)"
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
    samples = open_reader(model, data, reader=reader) if data is not None or reader is not None else None
    try:
        out, report = compile_model(model, options, passes=passes, samples=samples, dump_dir=dump_dir,
                                    check_each=check_each, verify=verify, progress=progress,
                                    sample_progress=sample_progress, save_calib=save_calib)
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


def _with_calibration(names: list[str], options: CompileOptions, save_calib: bool) -> list[str]:
    """Add 'insert-activation-qdq' (before quantize-weights) for --activations int8, and
    'calibrate' (before the analyses) when something needs or saves a calibration table."""
    names = list(names)
    if options.activations == "int8" and "insert-activation-qdq" not in names and "quantize-weights" in names:
        names.insert(names.index("quantize-weights"), "insert-activation-qdq")
    wanted = save_calib or options.calib_table is not None or (
        options.activations == "int8" and "insert-activation-qdq" in names)
    if wanted and "calibrate" not in names:
        anchors = [n for n in ("measure-sensitivity", "assign-precision", "insert-activation-qdq") if n in names]
        names.insert(names.index(anchors[0]) if anchors else len(names), "calibrate")
    return names


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
    """Opset 25 when a plan may hold 2-bit weights (INT2 storage), else 21 (INT4/INT8)."""
    two_bit = options.bits == 2
    if options.bits is None and options.plan_path is None:
        two_bit = 2 in options.candidates
    elif options.plan_path is not None:
        two_bit = any(tp.bits == 2 for tp in PrecisionPlan.load(options.plan_path).tensors.values())
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
    done = {q["name"] for q in ctx.quantized}
    for q in ctx.quantized:
        if q["name"] in table.scores:
            q["sensitivity"][table.measure] = dict(table.scores[q["name"]])
    for name, slot in table.slots.items():
        if name not in done and ctx.plan is not None and name in ctx.plan.tensors:
            ctx.quantized.append({"name": name, "op": slot.node.op, "role": slot.role,
                                  "shape": [int(d) for d in slot.tensor.shape], "bits": FLOAT, "granularity": "none",
                                  "scheme": "float", "stored_bits": 32,
                                  "sensitivity": {table.measure: dict(table.scores[name])}})
    for point in ctx.pareto:
        measured = table.measure_plan(point["choice"], ctx.options.granularity)
        if measured is not None:
            point["measured"] = measured


def _requantize_for_fp32_at_load(unquantized: onnx.ModelProto, passes: list[Pass], ctx: PassContext,
                                 common: dict[str, Any], first: int) -> tuple[gs.Graph, onnx.ModelProto]:
    """Run the quantizing passes again on `unquantized` with --kernels fp32-at-load: the plan's
    bits and schemes stay; weights whose granularity was the auto block for float32 scales take
    the auto block for float16 ones."""
    options = dataclasses.replace(ctx.options, kernels="fp32-at-load")
    graph = g.import_graph(unquantized)
    ctx.options = options
    if ctx.plan is not None and options.granularity.kind == "block" and options.granularity.block == 0:
        wide, narrow = str(options.granularity.resolve(True)), str(options.granularity.resolve(False))
        # (Codebook granularities name tables or nf4's scale blocks, not kernel scales: kept.)
        ctx.plan = PrecisionPlan({n: dataclasses.replace(tp, granularity=narrow)
                                  if tp.granularity == wide and tp.scheme not in CODEBOOK_SCHEMES else tp
                                  for n, tp in ctx.plan.tensors.items()}, dict(ctx.plan.defaults))
    redone = {p.name for p in passes}
    ctx.records = [r for r in ctx.records if r.name not in redone]
    ctx.quantized = []
    Pipeline(passes, first_index=first + 1, **common).run(graph, ctx)
    return graph, g.export_model(graph, like=unquantized)


def _choose_kernels(lowered: onnx.ModelProto, dq_form: onnx.ModelProto, feeds: Feeds,
                    ctx: PassContext) -> tuple[onnx.ModelProto, dict[str, Any]]:
    """Keep the faster ORT form: the decision cached for this machine, model and input shape
    (q4c.kernel_cache), else measured now (1 thread, interleaved, median process-CPU time:
    q4c.timing) and cached, so the same command on the same machine writes the same bytes.

    MatMulNBits keeps weights 4-bit in memory and wins where few rows go through a large weight
    per call (streaming, big layers); on small layers with many rows per call, quantizing the
    activations costs more than it saves, and DequantizeLinear folded to FP32 at load is faster.
    """
    from q4c import kernel_cache
    from q4c.timing import interleaved

    # Folded at load anyway, so a tied output projection can read the embedding's codes.
    tied = share_transposed_tables(dq_form)
    cache_key = kernel_cache.key([lowered, dq_form], feeds)
    cached = kernel_cache.lookup(cache_key)
    if cached is not None:
        median = {"low-bit": cached["low_bit_ms"] / 1e3, "fp32-at-load": cached["fp32_at_load_ms"] / 1e3}
        chosen, runs, source, stored = cached["chosen"], cached["runs"], "cache", True
        measured_on = cached.get("measured_on")
    else:
        fold = {"session.disable_quant_qdq": "1"}
        sessions = {"low-bit": q4ort.make_session(lowered, threads=1, config=q4ort.needed_session_config(lowered)[0]),
                    "fp32-at-load": q4ort.make_session(dq_form, threads=1, config=fold)}
        # q4ort.run: a sample the model cannot take is a one-line DataError, not ORT's exception
        timing = interleaved({k: (lambda s=s: q4ort.run(s, feeds)) for k, s in sessions.items()}, rounds=25, warmup=1,
                             min_rounds=5, max_seconds=KERNEL_TIMING_SECONDS)
        median = {k: timing.median(k) for k in sessions}
        chosen = "fp32-at-load" if median["fp32-at-load"] < 0.95 * median["low-bit"] else "low-bit"
        runs, source, measured_on = timing.rounds, "measured", time.strftime("%Y-%m-%d")
        stored = kernel_cache.record(cache_key, {
            "chosen": chosen, "low_bit_ms": round(1e3 * median["low-bit"], 3),
            "fp32_at_load_ms": round(1e3 * median["fp32-at-load"], 3), "runs": runs, "measured_on": measured_on,
            "machine": kernel_cache.machine()})
    if chosen == "fp32-at-load":
        ctx.warn(f"MatMulNBits was slower than FP32 MatMul for this model's input shape "
                 f"({1e3 * median['low-bit']:.2f} vs {1e3 * median['fp32-at-load']:.2f} ms, {source}): MatMul weights "
                 f"stay low-bit in the file but are folded to FP32 at load; pass --kernels low-bit to keep them 4-bit "
                 f"in memory, or --data with inputs shaped like your deployment")
    result = {"chosen": chosen, "low_bit_ms": round(1e3 * median["low-bit"], 3),
              "fp32_at_load_ms": round(1e3 * median["fp32-at-load"], 3), "runs": runs,
              "tied_tables_shared": tied, "source": source, "measured_on": measured_on,
              "clock": "process-CPU time", "cache": str(kernel_cache.cache_path()), "cache_key": cache_key,
              "cached": stored}
    return (dq_form if chosen == "fp32-at-load" else lowered), result


def _float_params(model: onnx.ModelProto) -> int:
    return sum(int(np.prod(t.dims)) for graph in g.iter_graph_protos(model.graph) for t in graph.initializer
               if t.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE))


def _avg_weight_bits(graph: Any, ctx: PassContext) -> float | None:
    """Mean code bits over every quantizable weight (float ones count 32)."""
    quantized = {q["name"]: q for q in ctx.quantized if q["bits"] != FLOAT}
    total = weighted = 0
    for name, entry in quantized.items():
        n = int(np.prod(entry["shape"]))
        total += n
        weighted += n * entry["bits"]
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
