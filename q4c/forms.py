"""Which lowering form each quantized weight's layer takes, decided from the plan before any weight
is quantized (the choose-kernels analysis writes these into the plan; the materialising passes,
quantize-weights, lower-ort-kernels and lower-recurrent, only read them).

Rules (the measured ones are in passes/lower_recurrent.py's docstring, BENCHMARKS.md "recurrent"):
- `--kernels fp32-at-load`: FP32_AT_LOAD everywhere (any target); `--target onnx`: DEQUANTIZE_LINEAR.
- MatMul weights (all consumers MatMul, weight as B, a MatMulNBits block fits): MATMULNBITS;
  embeddings read only by Gather on axis 0 with blocks along the row: GATHER_BLOCK_QUANTIZED,
  except under `--kernels auto` when no weight takes MATMULNBITS or INT8_ACTIVATIONS (whose
  QDQ fusions folding at load would turn off): then FP32_AT_LOAD (the kernel
  is never faster than Gather -- 1.2x at 1 token, up to 9x at 256 -- and with no MatMulNBits to
  share the packed table with, 4-bit storage in memory is all it buys: the RNN-T prediction
  network ran 1.03x FP32 with it); other weights DEQUANTIZE_LINEAR (scales as the op reads them).
- LSTM/GRU/RNN: `recurrent_form` (DynamicQuantizeLSTM for all-8-bit LSTMs from H=256, Scan +
  MatMulNBits from H=384, any size with `--kernels low-bit` or layout 1), else FP32_AT_LOAD.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, replace

import numpy as np
import onnx_graphsurgeon as gs

from q4c.config import CODEBOOK_SCHEMES, PLANE_BITS, Granularity, Target
from q4c.nomatch import NoMatch
from q4c.quant.plan import (
    MATMULNBITS_FORMS,
    RECURRENT_FORMS,
    Form,
    FormBasis,
    PrecisionPlan,
    TensorPrecision,
)
from q4c.quant.weights import WeightSlot, find_weight_slots, scale_layout
from q4c.recurrent_lowering import RecurrentLayer, kernel_block, match_layer
from q4c.recurrent_lowering.emit import KERNEL_BLOCKS
from q4c.recurrent_lowering.layer import Weight

#: Smallest hidden size at which the Scan form beats FP32 at 1 thread for a single step, a short
#: chunk and a whole utterance alike (benchmarks/bench_recurrent.py; see lower-recurrent).
SCAN_MIN_HIDDEN = 384
#: Smallest hidden size at which DynamicQuantizeLSTM beats FP32 (same benchmark).
DYNAMIC_LSTM_MIN_HIDDEN = 256
_RECURRENT = ("LSTM", "GRU", "RNN")


@dataclass(frozen=True)
class Decision:
    form: Form
    basis: FormBasis


def choose_form(layer: RecurrentLayer, kernels: str = "auto") -> str:
    """"scan", "dynamic_quantize_lstm", "kept_dq" or a skipped_<reason> for one layer (the rule
    in LowerRecurrentPass's docstring)."""
    weights = layer.w + layer.r
    if not any(w.quantized for w in weights):
        return "skipped_float_weights"
    # ONNX Runtime refuses LSTM/GRU with layout 1 (batch first): only a lowered form runs there.
    any_size = kernels == "low-bit" or layer.layout == 1
    if layer.op == "LSTM" and all(w.quantized and w.bits == 8 for w in weights):
        return "dynamic_quantize_lstm" if any_size or layer.hidden >= DYNAMIC_LSTM_MIN_HIDDEN else "kept_dq"
    if any(w.quantized and kernel_block(w) is None for w in weights):
        return "skipped_block_size"
    return "scan" if any_size or layer.hidden >= SCAN_MIN_HIDDEN else "kept_dq"


def rule_forms(graph: gs.Graph, plan: PrecisionPlan, target: Target, kernels: str) -> dict[str, Decision]:
    """The form of every quantized, form-less weight of `plan` by the rules above (`kernels` is
    "low-bit" or "auto": "auto" applies the recurrent thresholds; MatMul kernel forms are timed
    by the caller)."""
    wanted = {n for n, tp in plan.tensors.items() if tp.quantized and tp.form is None}
    slots: dict[str, list[WeightSlot]] = defaultdict(list)
    for slot in find_weight_slots(graph):
        if isinstance(slot, WeightSlot) and slot.tensor.name in wanted:
            slots[slot.tensor.name].append(slot)
    if kernels == "fp32-at-load":  # standard ONNX too: DequantizeLinear with float16 scales
        return {n: Decision(Form.FP32_AT_LOAD, FormBasis.OPTION) for n in slots}
    if target is not Target.ORT_CPU:
        return {n: Decision(Form.DEQUANTIZE_LINEAR, FormBasis.OPTION) for n in slots}
    basis = FormBasis.OPTION if kernels == "low-bit" else FormBasis.SPEED_RULE
    out: dict[str, Decision] = {}
    for name, group in slots.items():
        tp = plan.tensors[name]
        if any(s.node.op in _RECURRENT for s in group):
            continue  # below, per layer
        kernel = _kernel_form(group, tp)
        out[name] = Decision(kernel, basis) if kernel is not None else Decision(Form.DEQUANTIZE_LINEAR, FormBasis.REQUIRED)
    for node in {id(s.node): s.node for group in slots.values() for s in group if s.node.op in _RECURRENT}.values():
        out.update(_recurrent_decisions(graph, node, plan, kernels, basis))
    planned = {tp.form for tp in plan.tensors.values()} | {d.form for d in out.values()}
    if kernels == "auto" and not planned & {*MATMULNBITS_FORMS, Form.INT8_ACTIVATIONS}:
        out = {n: Decision(Form.FP32_AT_LOAD, FormBasis.SPEED_RULE) if d.form is Form.GATHER_BLOCK_QUANTIZED else d
               for n, d in out.items()}
    return out


def _kernel_form(slots: list[WeightSlot], tp: TensorPrecision) -> Form | None:
    """MATMULNBITS / GATHER_BLOCK_QUANTIZED when lower-ort-kernels can express the weight."""
    if tp.decoded_at_load:
        return None
    shape = [int(d) for d in slots[0].tensor.shape]
    if len(shape) != 2:
        return None
    gran = Granularity.parse(tp.granularity.partition("@")[0]).resolve(float32_scales=True)
    kind, axis, block = scale_layout(tuple(shape), slots[0], gran.kind, gran.block)
    if all(s.role == "matmul_b" for s in slots):
        if kind == "block":
            return Form.MATMULNBITS if axis == 0 and block in KERNEL_BLOCKS else None
        fits = kind == "channel" and any(b >= shape[0] for b in KERNEL_BLOCKS)
        return Form.MATMULNBITS if fits else None
    embedding = all(s.role == "embedding" and int(s.node.attrs.get("axis", 0)) == 0 for s in slots)
    if embedding and kind == "block" and axis == 1 and block in KERNEL_BLOCKS and shape[1] % block == 0:
        return Form.GATHER_BLOCK_QUANTIZED
    return None


def _planned_weights(weights: list[Weight], tp: TensorPrecision | None) -> list[Weight]:
    """Stand-ins for a layer's weights as quantize-weights will store them under `tp` (codes and
    scales of the right shapes, zero), so the lowering rule can be applied before quantizing."""
    if tp is None or not tp.quantized or tp.scheme in CODEBOOK_SCHEMES:
        return weights
    gran = Granularity.parse(tp.granularity.partition("@")[0])
    out = []
    for w in weights:
        n, k = w.shape
        block = gran.block if gran.kind == "block" and gran.block else k
        out.append(Weight(codes=np.zeros((n, k), np.int8), scale=np.zeros((n, -(-k // block)), np.float16),
                          block=block, bits=tp.bits))
    return out


def _recurrent_decisions(graph: gs.Graph, node: gs.Node, plan: PrecisionPlan, kernels: str,
                         basis: FormBasis) -> dict[str, Decision]:
    names = [t.name for t in node.inputs[1:3] if isinstance(t, gs.Constant) and plan.tensors.get(t.name)
             and plan.tensors[t.name].quantized]
    decided = [plan.tensors[n] for n in names if plan.tensors[n].form is not None]
    if decided:  # a layer has one form: the rest of its weights take the one the plan gives
        return {n: Decision(decided[0].form, decided[0].chosen_for or FormBasis.USER)
                for n in names if plan.tensors[n].form is None}
    sub = next((s for s in _graphs_of(graph) if any(n is node for n in s.nodes)), graph)
    layer = match_layer(sub, node, {})
    if any(plan.tensors[n].decoded_at_load for n in names):
        return {n: Decision(Form.DEQUANTIZE_LINEAR, FormBasis.REQUIRED) for n in names}
    if isinstance(layer, NoMatch):  # DequantizeLinear -> LSTM/GRU/RNN: folded at load
        return {n: Decision(Form.FP32_AT_LOAD, FormBasis.REQUIRED) for n in names}
    layer = replace(layer, w=_planned_weights(layer.w, plan.tensors.get(node.inputs[1].name)),
                    r=_planned_weights(layer.r, plan.tensors.get(node.inputs[2].name)))
    chosen = choose_form(layer, kernels)
    form = {"scan": Form.SCAN_MATMULNBITS, "dynamic_quantize_lstm": Form.DYNAMIC_QUANTIZE_LSTM}.get(chosen)
    if form is None:
        why = basis if chosen == "kept_dq" else FormBasis.REQUIRED
        return {n: Decision(Form.FP32_AT_LOAD, why) for n in names}
    return {n: Decision(form, FormBasis.REQUIRED if layer.layout == 1 and kernels != "low-bit" else basis) for n in names}


def _graphs_of(graph: gs.Graph) -> list[gs.Graph]:
    from q4c import graph as g

    return list(g.iter_graphs(graph))


def check_form(name: str, tp: TensorPrecision, slots: list[WeightSlot], target: Target) -> str | None:
    """Why a plan's form cannot be honoured for this weight (one line), or None if it can."""
    assert tp.form is not None
    ops = {s.node.op for s in slots}
    if tp.bits in PLANE_BITS and tp.form not in (Form.DEQUANTIZE_LINEAR, Form.FP32_AT_LOAD):
        return f"form {tp.form.value!r} cannot read 6-bit codes (two planes, decoded at load)"
    if target is not Target.ORT_CPU and tp.form not in (Form.DEQUANTIZE_LINEAR, Form.FP32_AT_LOAD):
        return f"form {tp.form.value!r} needs --target ort-cpu"
    if ops & set(_RECURRENT):
        if tp.form not in RECURRENT_FORMS:
            return f"form {tp.form.value!r} is not a form of {'/'.join(sorted(ops))} layers"
        if tp.form is Form.DYNAMIC_QUANTIZE_LSTM and (ops != {"LSTM"} or tp.bits != 8):
            return "form 'dynamic-quantize-lstm' takes LSTM weights planned at 8 bits"
        if tp.form in (Form.SCAN_MATMULNBITS, Form.SCAN_INT8_PROJECTION) and tp.scheme in CODEBOOK_SCHEMES:
            return f"form {tp.form.value!r} cannot read {tp.scheme} codebook weights"
        if tp.form is Form.SCAN_INT8_PROJECTION and tp.bits != 8 and any(s.role.endswith("_w") for s in slots):
            return "form 'scan-int8-projection' takes W planned at 8 bits"
        return None
    if tp.form in MATMULNBITS_FORMS and _kernel_form(slots, replace(tp, form=None)) is not Form.MATMULNBITS:
        return f"form {tp.form.value!r} needs a 2-D MatMul B weight with a MatMulNBits block (16-256) at {tp.granularity}"
    if tp.form is Form.GATHER_BLOCK_QUANTIZED and _kernel_form(slots, replace(tp, form=None)) is not tp.form:
        return f"form 'gather-block-quantized' needs an embedding read by Gather with row blocks (16-256) at {tp.granularity}"
    if tp.form in (Form.SCAN_MATMULNBITS, Form.DYNAMIC_QUANTIZE_LSTM):
        return f"form {tp.form.value!r} is for LSTM/GRU/RNN weights, not {'/'.join(sorted(ops))}"
    if tp.form is Form.INT8_DYNAMIC and (tp.bits != 8 or tp.granularity != "channel" or tp.scheme in CODEBOOK_SCHEMES
                                         or any(s.role != "matmul_b" or len(s.tensor.shape) != 2 for s in slots)):
        return "form 'int8-dynamic' takes 2-D MatMul B weights planned at 8 bits per channel"
    if tp.form is Form.INT8_AT_LOAD and (tp.bits not in (1, 2, 3, 4, 8)
                                         or any(s.role != "matmul_b" or len(s.tensor.shape) != 2 for s in slots)):
        return "form 'int8-at-load' takes 2-D MatMul B weights planned at 1-4 or 8 bits"
    return None
