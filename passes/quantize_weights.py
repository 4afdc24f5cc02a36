"""Quantize the weights the plan names and feed them to their ops through DequantizeLinear."""

from __future__ import annotations

import logging
from collections import defaultdict

import numpy as np
import onnx_graphsurgeon as gs
from onnx import TensorProto

from q4c import graph as g
from q4c.config import CODEBOOK_SCHEMES, CompileOptions, Granularity
from q4c.errors import ConfigError
from q4c.names import fresh_tag
from q4c.pipeline import Artifact, Pass, PassContext, PassResult
from q4c.quant import planes
from q4c.quant.codebook import CodebookWeight, emit_decoder
from q4c.quant.gptq import fitting_calls, input_hessians
from q4c.quant.packing import onnx_codes, storage_bits
from q4c.quant.plan import FLOAT, Form, TensorPrecision
from q4c.quant.sensitivity import MAX_SAMPLES, gptq_eligible
from q4c.quant.weights import WeightSlot, find_weight_slots, quantize_slot
from q4c.records import QuantizedTensor

logger = logging.getLogger(__name__)


class QuantizeWeightsPass(Pass):
    """Replace each planned float weight W by DequantizeLinear(W_int4, W_scale) (opset 21,
    `axis`/`block_size`), with the scale chosen per group to minimize squared weight error.

    Codes are stored packed as ONNX INT4 (2/3/4 bits) or INT8 (8 bits). Scales are float32 where
    ONNX Runtime's low-bit kernels read them (MatMul, Gemm, embeddings: MatMulNBits and
    GatherBlockQuantized take scales of the activation type) and float16 elsewhere (LSTM, GRU,
    Conv, Einsum), followed by a Cast to float: half the scale bytes, 0.05 % scale error. One DQ
    per graph level that consumes the weight; consumers that are not weight slots keep the float
    tensor. The codes and scales keep the weight's name; the decoder's nodes and tensors are
    named by a short tag (q4c.names.fresh_tag), since every name is stored once per reference.

    Scales of MatMul/Gemm/embedding weights are float16 too when the plan's form folds them at
    load (FP32_AT_LOAD: no kernel reads them).

    Codebook schemes (mulaw, kmeans, nf4) store packed indices and float16 centroid tables
    instead, decoded by a Gather chain of standard ops from initializers only
    (q4c.quant.codebook.emit_decoder), which ONNX Runtime folds at session load.
    Requires: ctx.plan.  Ensures: no planned weight feeds a slot in float.
    Stats: quantized, declined reasons (skipped_*).
    """

    name = "quantize-weights"
    provides = frozenset({Artifact.QUANTIZED_WEIGHTS})

    def needs(self, options: CompileOptions) -> frozenset[Artifact]:
        int8 = {Artifact.INT8_ACTIVATIONS} if options.activations == "int8" else set()
        return frozenset({Artifact.PLAN, Artifact.FORMS, *int8})

    def requires(self, graph: gs.Graph, ctx: PassContext) -> None:
        ctx.require_plan()

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        plan = ctx.require_plan()
        stats: dict[str, int] = defaultdict(int)
        by_tensor: dict[str, list[WeightSlot]] = defaultdict(list)
        for slot in find_weight_slots(graph):
            if isinstance(slot, WeightSlot):
                by_tensor[slot.tensor.name].append(slot)
            else:
                stats[slot[1]] += 1
        hessians = self._hessians(graph, by_tensor, ctx)
        for name, slots in by_tensor.items():
            precision = plan.tensors.get(name)
            if precision is None or precision.bits == FLOAT:
                continue
            if precision.scheme in CODEBOOK_SCHEMES:
                self._codebook(graph, slots, precision.bits, precision.granularity, precision.scheme, ctx,
                               hessians.get(name))
            else:
                self._quantize(graph, slots, precision.bits, Granularity.parse(precision.granularity),
                               precision.scheme, ctx, hessians.get(name), kernel_scales=_kernel_scales(precision, ctx),
                               block_axis=precision.block_axis)
            stats["quantized"] += 1
        return PassResult(stats["quantized"] > 0, dict(stats))

    @staticmethod
    def _hessians(graph: gs.Graph, by_tensor: dict[str, list[WeightSlot]], ctx: PassContext) -> dict[str, list[np.ndarray]]:
        """gptq's input statistics: measure-sensitivity's, else (a replayed plan) from the samples.
        Codebooks use them where they exist (GPTQ-style index assignment), the same ones the
        sensitivity scores were measured with; without a measurement, from the samples."""
        plan = ctx.require_plan()
        gptq = {n for n, tp in plan.tensors.items() if tp.scheme == "gptq" and tp.bits != FLOAT and n in by_tensor}
        known = dict(getattr(ctx.sensitivity, "hessians", None) or {})
        books = {n for n, tp in plan.tensors.items() if tp.scheme in CODEBOOK_SCHEMES and tp.bits != FLOAT
                 and n in by_tensor and n not in known}
        if books and ctx.sensitivity is None and ctx.samples:
            eligible = gptq_eligible(graph, {n: by_tensor[n][0] for n in books})
            known.update(input_hessians(g.export_model(graph.copy()), eligible, ctx.samples,
                                        fitting_calls(ctx.sequences, MAX_SAMPLES)))
        missing = gptq - set(known)
        if missing:
            if not ctx.samples:
                raise ConfigError(f"the plan rounds {sorted(missing)[0]} with gptq, which needs calibration data (--calib)")
            eligible = gptq_eligible(graph, {n: by_tensor[n][0] for n in missing})
            known.update(input_hessians(g.export_model(graph.copy()), eligible, ctx.samples,
                                        fitting_calls(ctx.sequences, MAX_SAMPLES)))
        unmet = sorted(missing - set(known))
        if unmet and unmet[0] in gptq_eligible(graph, {unmet[0]: by_tensor[unmet[0]][0]}):
            raise ConfigError(f"{unmet[0]}: gptq needs at least as many calibration input rows as the weight has "
                              "columns, and the samples gave fewer; pass --calib with more samples")
        if unmet:
            raise ConfigError(f"{unmet[0]}: gptq needs a MatMul/Gemm/LSTM/GRU/RNN/Conv weight whose inputs can be read "
                              "(not one inside a Loop or Scan body)")
        return known

    @staticmethod
    def _codebook(root: gs.Graph, slots: list[WeightSlot], bits: int, granularity: str, scheme: str,
                  ctx: PassContext, hessians: list[np.ndarray] | None = None) -> None:
        """Indices + centroid tables decoded in-graph, one decoder per graph level (see
        q4c.quant.codebook)."""
        first = slots[0]
        weight = first.tensor
        values = np.asarray(weight.values, dtype=np.float32)
        cw = quantize_slot(first, values, bits, granularity, scheme, hessians=hessians)
        assert isinstance(cw, CodebookWeight)
        decoded: dict[int, tuple[gs.Variable, str]] = {}
        stored: dict[str, gs.Constant] = {}  # one set of indices/table/scales for every graph level
        for slot in slots:
            key = id(slot.graph)
            if key not in decoded:
                decoded[key] = emit_decoder(root, slot.graph, weight.name, cw, stored)
            slot.node.inputs[slot.index] = decoded[key][0]
        codes = decoded[id(first.graph)][1]
        ctx.quantized.append(_codebook_entry(weight.name, codes, first, values, cw, cw.dequantize() - values))

    @staticmethod
    def _quantize(root: gs.Graph, slots: list[WeightSlot], bits: int, gran: Granularity, scheme: str,
                  ctx: PassContext, hessians: list[np.ndarray] | None = None, *, kernel_scales: bool = True,
                  block_axis: int | None = None) -> None:
        first = slots[0]
        weight = first.tensor
        values = np.asarray(weight.values, dtype=np.float32)
        qw = quantize_slot(first, values, bits, gran, scheme, kernel_scales=kernel_scales, hessians=hessians,
                           block_axis=block_axis)
        kind = "tensor" if qw.scale.ndim == 0 else ("block" if qw.block_size else "channel")
        stored = storage_bits(bits, ctx.opset)
        if stored == planes.BITS and first.role not in planes.ROLES:
            raise ConfigError(f"{weight.name}: 6-bit codes are for Conv and LSTM/GRU/RNN weights, which ONNX Runtime "
                              f"decodes at load; this one feeds {first.node.op}")
        if stored == planes.BITS:  # a 4-bit and a 2-bit plane, DequantizeLinear(hi) * 4 + DequantizeLinear(lo)
            hi, lo = planes.split(qw.q)
            codes = [g.make_constant(g.unique_name(root, f"{weight.name}_int4hi"), hi),
                     g.make_constant(g.unique_name(root, f"{weight.name}_uint2lo"), lo)]
        else:
            codes = [g.make_constant(g.unique_name(root, f"{weight.name}_int{stored}"), onnx_codes(qw, ctx.opset))]
        scale = gs.Constant(g.unique_name(root, f"{weight.name}_scale"), qw.scale)
        attrs = {"axis": int(qw.axis)} if kind != "tensor" else {}
        if qw.block_size:
            attrs["block_size"] = int(qw.block_size)
        names = _DecoderNames(fresh_tag(root, "q"))
        dq_out: dict[int, gs.Variable] = {}
        for slot in slots:
            key = id(slot.graph)
            if key not in dq_out:
                parts = [_dequantize(slot.graph, names, c, scale, attrs, list(values.shape)) for c in codes]
                if len(parts) == 2:
                    parts = [_plane_sum(slot.graph, names, parts, list(values.shape))]
                dq_out[key] = parts[0]
            slot.node.inputs[slot.index] = dq_out[key]
        error = qw.dequantize() - values  # what DequantizeLinear reproduces, up to float16 rounding
        ctx.quantized.append(QuantizedTensor(
            name=weight.name, codes=codes[0].name, op=first.node.op, role=first.role, shape=list(values.shape), bits=bits,
            granularity=_granularity(kind, qw.block_size, int(qw.axis), first.reduce_axis),
            block_axis=int(qw.axis) if kind == "block" else None, stored_bits=stored,
            scheme=scheme, sensitivity={"weight_sqnr_db": _sqnr_db(values, error)}))


class _DecoderNames:
    """Names of one weight's decoder: "<tag>.<i>" for its tensors and DequantizeLinear nodes
    (ONNX Runtime wants node names unique), none for the Cast/Mul/Add after them. Each name is
    stored once per reference (q4c.names.fresh_tag); the codes and scales keep the weight's name."""

    def __init__(self, tag: str) -> None:
        self.tag, self.count = tag, 0

    def __call__(self) -> str:
        self.count += 1
        return f"{self.tag}.{self.count - 1}"


def _dequantize(graph: gs.Graph, names: _DecoderNames, codes: gs.Constant, scale: gs.Constant,
                attrs: dict[str, int], shape: list[int]) -> gs.Variable:
    """DequantizeLinear(codes, scale) appended to `graph`, as float32 (a Cast after float16 scales)."""
    out = gs.Variable(names(), dtype=scale.values.dtype, shape=shape)
    graph.nodes.append(gs.Node("DequantizeLinear", names(), attrs=dict(attrs), inputs=[codes, scale], outputs=[out]))
    if scale.values.dtype != np.float16:
        return out
    as_float = gs.Variable(names(), dtype=np.float32, shape=shape)
    graph.nodes.append(gs.Node("Cast", "", attrs={"to": TensorProto.FLOAT}, inputs=[out], outputs=[as_float]))
    return as_float


def _plane_sum(graph: gs.Graph, names: _DecoderNames, parts: list[gs.Variable], shape: list[int]) -> gs.Variable:
    """hi * 4 + lo (q4c.quant.planes), in float32."""
    high = gs.Variable(names(), dtype=np.float32, shape=shape)
    out = gs.Variable(names(), dtype=np.float32, shape=shape)
    weight = gs.Constant(names(), np.array(planes.HIGH, np.float32))
    graph.nodes.append(gs.Node("Mul", "", inputs=[parts[0], weight], outputs=[high]))
    graph.nodes.append(gs.Node("Add", "", inputs=[high, parts[1]], outputs=[out]))
    return out


def _kernel_scales(precision: TensorPrecision, ctx: PassContext) -> bool:
    """Float32 scales for MatMul/Gemm/embedding weights unless the weight is folded to FP32 at load
    (the plan's form; a plan without forms: as --kernels says)."""
    if precision.form is None:
        return ctx.options.kernel_scales
    return precision.form not in (Form.FP32_AT_LOAD, Form.INT8_AT_LOAD)  # both: no kernel reads the scales


def _codebook_entry(name: str, codes: str, first: WeightSlot, values: np.ndarray, cw: CodebookWeight,
                    error: np.ndarray) -> QuantizedTensor:
    return QuantizedTensor(
        name=name, codes=codes, op=first.node.op, role=first.role, shape=list(values.shape), bits=cw.bits,
        granularity=cw.granularity, block_axis=None, stored_bits=cw.bits, scheme=cw.scheme,
        codebook={"index_bytes": cw.index_bytes, "table_bytes": cw.table_bytes, "scale_bytes": cw.scale_bytes,
                  "tables": int(cw.table.shape[0]), "mu": cw.mu},
        sensitivity={"weight_sqnr_db": _sqnr_db(values, error)})


def _granularity(kind: str, block_size: int, axis: int, reduce_axis: int) -> str:
    """"block:32", or "block:32@axis2" when the blocks run along another axis than the op's
    reduction axis (a Conv kernel axis, see weights.conv_block_layout)."""
    if kind != "block":
        return kind
    return f"block:{block_size}" if axis == reduce_axis else f"block:{block_size}@axis{axis}"


def _sqnr_db(signal: np.ndarray, error: np.ndarray) -> float:
    noise = float(np.sum(np.square(error, dtype=np.float64)))
    power = float(np.sum(np.square(signal, dtype=np.float64)))
    return float("inf") if noise == 0 else round(10 * np.log10(power / noise), 2)
