"""Decide each quantized weight's lowering form and write it into the plan (an analysis).

Runs after assign-precision and before any weight is quantized, so quantize-weights stores each
weight once with the scales its form reads, and a replayed plan (`--plan`) writes the same bytes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from collections import defaultdict
from typing import Any

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from q4c import graph as g
from q4c import kernel_cache
from q4c import ort as q4ort
from q4c.config import CODEBOOK_SCHEMES, CompileOptions, Granularity, Target
from q4c.errors import ConfigError
from q4c.forms import Decision, check_form, rule_forms
from q4c.pipeline import Artifact, Pass, PassContext, PassResult, run_one
from q4c.quant.int8_activations import int8_slots
from q4c.quant.plan import Form, FormBasis, PrecisionPlan, TensorPrecision
from q4c.quant.tying import share_transposed_tables
from q4c.quant.weights import WeightSlot, find_weight_slots, float32_scales, scale_layout
from q4c.registry import find_pass
from q4c.timing import interleaved

#: wall-clock budget for timing the two ONNX Runtime forms when --kernels auto
KERNEL_TIMING_SECONDS = 3.0
#: what the two alternatives of --kernels auto are built with, on copies of the graph
_MATERIALISE = ("quantize-weights", "lower-ort-kernels", "lower-recurrent")


class ChooseKernelsPass(Pass):
    """Write every quantized weight's lowering form (q4c.quant.plan.Form) and the basis it was
    chosen on into the plan, by q4c.forms' rules; with `--kernels auto`, when MatMulNBits would
    be used, both ONNX Runtime forms are built on copies and timed (q4c.timing, cached per machine
    by q4c.kernel_cache) and the faster kept: if folding at load wins, every weight takes
    FP32_AT_LOAD and auto-block weights the float16-scale block (32 instead of 64).

    Forms already in the plan (a replayed or hand-edited `--plan`, a latency planner) are kept
    when they can be honoured, else refused with a one-line reason. Also records the target
    opset in the plan. Requires: ctx.plan.  Stats: one count per form, timed.
    """

    name = "choose-kernels"
    analysis = True
    provides = frozenset({Artifact.FORMS})

    def needs(self, options: CompileOptions) -> frozenset[Artifact]:
        calibration = {Artifact.CALIBRATION} if options.activations == "int8" else set()
        return frozenset({Artifact.PLAN, *calibration})

    def requires(self, graph: gs.Graph, ctx: PassContext) -> None:
        ctx.require_plan()

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        plan = ctx.require_plan()
        if plan.opset is None:
            plan.opset = ctx.opset
        _check_planned(graph, plan, ctx)
        opts = ctx.options
        if opts.plan_path is not None and opts.kernels != "auto":
            _say_plan_wins(graph, plan, ctx)
        stats: dict[str, int] = defaultdict(int)
        if opts.activations == "int8":
            stats["weights_to_int8"] = _int8_forms(graph, plan, ctx)
        decisions = rule_forms(graph, plan, opts.target, opts.kernels)
        timed = (opts.kernels == "auto" and opts.activations == "none" and opts.target is Target.ORT_CPU
                 and any(d.form is Form.MATMULNBITS for d in decisions.values()))
        _write(plan, decisions)
        if timed and not ctx.samples:
            ctx.warn("--kernels auto: no input sample to time MatMulNBits against folding at load; kept MatMulNBits")
        elif timed:
            stats["timed"] = 1
            if _time_forms(graph, plan, ctx) == "fp32-at-load":
                _fold_all(plan, decisions, opts)
        stats["conv_block_axes"] = _write_block_axes(graph, plan, opts)
        for tp in plan.tensors.values():
            if tp.form is not None:
                stats[tp.form.value] += 1
        return PassResult(False, {k: v for k, v in stats.items() if v})


def _say_plan_wins(graph: gs.Graph, plan: PrecisionPlan, ctx: PassContext) -> None:
    """A replayed plan's forms are kept over an explicit --kernels: warn where they differ."""
    stripped = PrecisionPlan({n: dataclasses.replace(tp, form=None, chosen_for=None) for n, tp in plan.tensors.items()},
                             dict(plan.defaults), plan.opset)
    wanted = rule_forms(graph, stripped, ctx.options.target, ctx.options.kernels)
    differ = sorted(n for n, d in wanted.items() if plan.tensors[n].form not in (None, d.form, Form.INT8_ACTIVATIONS))
    if differ:
        first = differ[0]
        ctx.warn(f"--plan: {len(differ)} weight(s) keep the plan's form over --kernels {ctx.options.kernels} "
                 f"(e.g. {first}: {plan.tensors[first].form.value}, not {wanted[first].form.value}); "
                 f"edit the plan's forms to change them")


def _int8_forms(graph: gs.Graph, plan: PrecisionPlan, ctx: PassContext) -> int:
    """--activations int8: the weights whose activation q4c.quant.int8_activations quantizes take
    form int8-activations at 8 bits per channel (ORT's integer kernels take nothing else).
    Returns how many changed precision."""
    slots, _ = int8_slots(graph, ctx.require_calibration(), plan)
    changed = 0
    for name in dict.fromkeys(s.tensor.name for s in slots):
        old = plan.tensors[name]
        if old.form is not None:  # a replayed or hand-edited plan decided already
            continue
        changed += (old.bits, old.granularity) != (8, "channel")
        scheme = "symmetric" if old.scheme in CODEBOOK_SCHEMES else old.scheme  # int8 codes: uniform levels
        plan.tensors[name] = TensorPrecision(8, "channel", scheme, Form.INT8_ACTIVATIONS, FormBasis.OPTION)
    if changed:
        ctx.warn(f"--activations int8: {changed} weight(s) stored as int8 per channel instead of the planned "
                 f"precision: ONNX Runtime's integer MatMul/Conv kernels take int8 weights only")
    return changed


def _write(plan: PrecisionPlan, decisions: dict[str, Decision]) -> None:
    for name, d in decisions.items():
        plan.tensors[name] = plan.tensors[name].with_form(d.form, d.basis)


def _check_planned(graph: gs.Graph, plan: PrecisionPlan, ctx: PassContext) -> None:
    """Refuse, in one line, a form in the plan this weight cannot take."""
    if not plan.forms() and all(tp.block_axis is None for tp in plan.tensors.values()):
        return
    slots: dict[str, list[WeightSlot]] = defaultdict(list)
    for slot in find_weight_slots(graph):
        if isinstance(slot, WeightSlot):
            slots[slot.tensor.name].append(slot)
    for name, tp in sorted(plan.tensors.items()):
        if tp.form is None or name not in slots:
            continue
        why = check_form(name, tp, slots[name], ctx.options.target)
        if why is None and tp.form is Form.INT8_ACTIVATIONS and ctx.options.activations != "int8":
            why = "form 'int8-activations' needs --activations int8"
        if why is not None:
            raise ConfigError(f"plan: tensor {name!r}: {why}")
    for name, tp in sorted(plan.tensors.items()):
        why = _layer_mismatch(name, tp, slots[name], plan) if tp.form is not None and name in slots else None
        if why is None and tp.block_axis is not None and name in slots:
            why = _block_axis_mismatch(tp, slots[name])
        if why is not None:
            raise ConfigError(f"plan: tensor {name!r}: {why}")


def _conv_slots(graph: gs.Graph) -> dict[str, WeightSlot]:
    """Each Conv weight's first slot (the one quantize-weights lays its scales out for)."""
    slots: dict[str, WeightSlot] = {}
    for slot in find_weight_slots(graph):
        if isinstance(slot, WeightSlot) and slot.role == "conv" and len(slot.tensor.shape) >= 3:
            slots.setdefault(slot.tensor.name, slot)
    return slots


def _write_block_axes(graph: gs.Graph, plan: PrecisionPlan, opts: CompileOptions) -> int:
    """Record in the plan the block axis quantize-weights would derive for each block-wise Conv
    weight without one (q4c.quant.weights.scale_layout), so a saved plan shows it and a hand edit
    can change it. Returns how many were written."""
    written = 0
    for name, slot in sorted(_conv_slots(graph).items()):
        tp = plan.tensors.get(name)
        if tp is None or not tp.quantized or tp.block_axis is not None or tp.scheme in CODEBOOK_SCHEMES:
            continue
        gran = Granularity.parse(tp.granularity)
        if gran.kind != "block":
            continue
        kernel_scales = opts.kernel_scales if tp.form is None else tp.form is not Form.FP32_AT_LOAD
        values = np.asarray(slot.tensor.values)
        gran = gran.resolve(float32_scales(slot, kernel_scales, values))
        kind, axis, _ = scale_layout(tuple(values.shape), slot, gran.kind, gran.block)
        if kind == "block":
            plan.tensors[name] = dataclasses.replace(tp, block_axis=axis)
            written += 1
    return written


def _block_axis_mismatch(tp: TensorPrecision, slots: list[WeightSlot]) -> str | None:
    """A planned block axis must name an input or kernel axis of a Conv weight."""
    for slot in slots:
        rank = len(slot.tensor.shape)
        if slot.role != "conv" or rank < 3:
            return f"block_axis is for Conv weights; this one feeds {slot.node.op} ({slot.role})"
        if not 1 <= tp.block_axis < rank:
            return f"block_axis {tp.block_axis} is not an input or kernel axis of its rank-{rank} Conv weight"
    return None


def _layer_mismatch(name: str, tp: TensorPrecision, slots: list[WeightSlot], plan: PrecisionPlan) -> str | None:
    """An LSTM/GRU/RNN runs in one form: its weights cannot be given two."""
    for slot in slots:
        if slot.node.op not in ("LSTM", "GRU", "RNN"):
            continue
        for other in slot.node.inputs[1:3]:
            form = plan.tensors[other.name].form if other.name in plan.tensors else None
            if other.name != name and form is not None and form is not tp.form:
                return (f"its {slot.node.op} layer's other weight {other.name!r} has form {form.value!r}; "
                        f"a layer has one form")
    return None


def _fold_all(plan: PrecisionPlan, decisions: dict[str, Decision], opts: Any) -> None:
    """Every decided weight folds at load; weights at the auto block of float32 scales take the
    auto block of float16 ones (same bytes, half the block: less error). Codebook granularities
    name tables or nf4's scale blocks, not kernel scales: kept."""
    wide = narrow = None
    if opts.granularity.kind == "block" and opts.granularity.block == 0:
        wide, narrow = str(opts.granularity.resolve(True)), str(opts.granularity.resolve(False))
    for name in decisions:
        tp = plan.tensors[name]
        if wide is not None and tp.granularity == wide and tp.scheme not in CODEBOOK_SCHEMES:
            tp = dataclasses.replace(tp, granularity=narrow)
        plan.tensors[name] = tp.with_form(Form.FP32_AT_LOAD, FormBasis.SPEED_MEASURED)


def materialise_copy(graph: gs.Graph, plan: PrecisionPlan, ctx: PassContext,
                     passes: tuple[str, ...] = _MATERIALISE) -> onnx.ModelProto:
    """The model the materialising `passes` would write for `plan`, built on a copy (ctx untouched)."""
    scratch = dataclasses.replace(ctx, plan=plan, quantized=[], records=[], warnings=[])
    copy = graph.copy()
    # graph-surgeon's copy shares the import_domains list, which export extends with com.microsoft:
    # a private list keeps the lowered copy's domains out of the graph the compile writes
    copy.import_domains = list(graph.import_domains) if graph.import_domains is not None else None
    for name in passes:
        run_one(find_pass(name)(), copy, scratch)
    return g.export_model(copy)


#: The low-bit kernels are kept only when the whole model runs clearly faster with them (by 5 %,
#: more than the timing's run-to-run noise); a tie folds to FP32 at load, which runs at FP32
#: speed by construction. (Rule 1 kept them on a tie, and a near tie measured at compile time,
#: 0.779 vs 0.773 ms on transformer_lm, became 1.07-1.34x FP32 when benchmarked.)
KERNEL_RULE = 2


def kernel_verdict(low_bit_s: float, fp32_at_load_s: float) -> str:
    """'low-bit' when its median time is under 0.95 of the folded form's, else 'fp32-at-load'."""
    return "low-bit" if low_bit_s < 0.95 * fp32_at_load_s else "fp32-at-load"


def graph_digest(graph: gs.Graph) -> str:
    """sha256 of the graph as it stands (before any weight is quantized): every node (op, domain,
    name, attributes, tensor names, dtypes and shapes), every constant's values once, subgraphs,
    the opset imports. Walked in place: no export, no serialized copy (a model past protobuf's
    2 GiB could not be serialized whole)."""
    h = hashlib.sha256()
    h.update(json.dumps([graph.opset, sorted((i.domain, i.version) for i in graph.import_domains or [])]).encode())
    _digest(graph, h, set())
    return h.hexdigest()


def _digest(graph: gs.Graph, h: Any, seen: set[int]) -> None:
    def tensor(t: gs.Tensor) -> list[Any]:
        if isinstance(t, gs.Constant) and id(t) not in seen:  # each constant object once (names may be "")
            seen.add(id(t))
            h.update(hashlib.sha256(_value_bytes(t.values)).digest())
        return [t.name, str(t.dtype), None if t.shape is None else [str(d) for d in t.shape], isinstance(t, gs.Constant)]

    h.update(json.dumps(["graph", [tensor(t) for t in graph.inputs], [tensor(t) for t in graph.outputs]]).encode())
    for node in graph.nodes:
        h.update(json.dumps([node.op, node.domain, node.name, [tensor(t) for t in node.inputs],
                             [tensor(t) for t in node.outputs]]).encode())
        for key, value in sorted(node.attrs.items()):
            h.update(key.encode())
            if isinstance(value, gs.Graph):
                _digest(value, h, seen)
            elif isinstance(value, gs.Tensor):
                h.update(json.dumps(tensor(value)).encode())
            else:
                h.update(repr(value).encode())


def _value_bytes(values: Any) -> Any:
    """A constant's values as bytes to hash (strings by their text, not object pointers)."""
    array = np.asarray(values)
    if array.dtype.kind == "O":
        return repr(array.tolist()).encode()
    return np.ascontiguousarray(array).reshape(-1).view(np.uint8)


def verdict_key(graph: gs.Graph, plan: PrecisionPlan, ctx: PassContext) -> str:
    """The kernel cache key of a --kernels auto verdict, from what decides the two timed models
    without building them: the unquantized graph, the plan (bits, scheme, granularity and form
    per weight, opset; not its `defaults`, which record how it was chosen and no pass reads),
    the options the materialising passes read, the timed input's shapes and (in
    kernel_cache.key) the machine and ONNX Runtime version."""
    weights = {name: tp.to_json() for name, tp in sorted(plan.tensors.items())}
    return kernel_cache.key({"graph": graph_digest(graph), "plan": {"tensors": weights, "opset": plan.opset},
                             "opset": ctx.opset,
                             "kernel_scales": ctx.options.kernel_scales, "passes": list(_MATERIALISE)},
                            ctx.samples[0])


def _time_forms(graph: gs.Graph, plan: PrecisionPlan, ctx: PassContext) -> str:
    """Read the machine's cached verdict for this graph and plan or, on a miss, build the kernel
    form and the folded form on copies and time them; return the faster. The measurement goes to
    ctx.kernel_choice."""
    key = verdict_key(graph, plan, ctx)
    cached = kernel_cache.lookup(key)
    if cached is not None and cached.get("rule") != KERNEL_RULE:
        cached = None  # a verdict taken by an older rule is measured again
    if cached is not None:
        entry, source, stored = cached, "cache", True
    else:
        entry = _measure(graph, plan, ctx)
        source, stored = "measured", kernel_cache.record(key, entry)
    chosen, low_ms, fold_ms = entry["chosen"], entry["low_bit_ms"], entry["fp32_at_load_ms"]
    if chosen == "fp32-at-load":
        ctx.warn(f"MatMulNBits was not clearly faster than FP32 MatMul for this model's input shape "
                 f"({low_ms:.2f} vs {fold_ms:.2f} ms, {source}): MatMul weights "
                 f"stay low-bit in the file but are folded to FP32 at load; pass --kernels low-bit to keep them 4-bit "
                 f"in memory, or --data with inputs shaped like your deployment")
    ctx.kernel_choice = {
        "chosen": chosen, "low_bit_ms": low_ms, "fp32_at_load_ms": fold_ms, "runs": entry["runs"],
        "tied_tables_shared": 0, "source": source, "measured_on": entry.get("measured_on"),
        "clock": "process-CPU time", "cache": str(kernel_cache.cache_path()), "cache_key": key, "cached": stored}
    return chosen


def _measure(graph: gs.Graph, plan: PrecisionPlan, ctx: PassContext) -> dict[str, Any]:
    """Build both forms on copies (every weight quantized twice) and time them interleaved; the
    cache entry of the verdict."""
    folded_plan = PrecisionPlan({n: tp for n, tp in plan.tensors.items()}, dict(plan.defaults), plan.opset)
    _fold_all(folded_plan, {n: Decision(Form.FP32_AT_LOAD, FormBasis.SPEED_MEASURED)
                            for n, tp in plan.tensors.items() if tp.form is not None}, ctx.options)
    lowered = materialise_copy(graph, plan, ctx)
    folded = materialise_copy(graph, folded_plan, ctx)
    share_transposed_tables(folded)  # as the compile writes a folded model (q4c.compiler)
    feeds = ctx.samples[0]
    sessions = {"low-bit": q4ort.make_session(lowered, threads=1, config=q4ort.needed_session_config(lowered)[0]),
                "fp32-at-load": q4ort.make_session(folded, threads=1, config={"session.disable_quant_qdq": "1"})}
    # q4ort.run: a sample the model cannot take is a one-line DataError, not ORT's exception
    timing = interleaved({k: (lambda s=s: q4ort.run(s, feeds)) for k, s in sessions.items()}, rounds=25, warmup=1,
                         min_rounds=5, max_seconds=KERNEL_TIMING_SECONDS)
    median = {k: timing.median(k) for k in sessions}
    return {"chosen": kernel_verdict(median["low-bit"], median["fp32-at-load"]),
            "low_bit_ms": round(1e3 * median["low-bit"], 3), "fp32_at_load_ms": round(1e3 * median["fp32-at-load"], 3),
            "runs": timing.rounds, "measured_on": time.strftime("%Y-%m-%d"), "machine": kernel_cache.machine(),
            "rule": KERNEL_RULE}


__all__ = ["KERNEL_RULE", "ChooseKernelsPass", "graph_digest", "kernel_verdict", "materialise_copy", "verdict_key"]
