"""`--activations int8`: QuantizeLinear/DequantizeLinear on the activations entering MatMul,
Gemm and Conv, in the forms ONNX Runtime fuses into integer kernels.

ONNX Runtime 1.31 (CPU) turns
- DQ(x uint8) -> MatMul <- DQ(W int8, per column, zero point 0) into com.microsoft
  MatMulIntegerToFloat, or, where its level-1 optimizer first fuses MatMul + Add(bias) into Gemm,
  into com.microsoft QGemm with float output if the bias is DQ(int32) (so such biases are
  quantized: a float bias would leave that Gemm in float);
- DQ(x) -> Conv <- DQ(W int8, per output channel) -> Q(y) into QLinearConv: a Conv needs its
  output quantized too, so it is only quantized when that output feeds no Softmax/normalization;
- DQ(x) -> Gemm <- DQ(W) -> Q(y) into QGemm, on the same terms as Conv.
Activations are per-tensor asymmetric uint8 with the calibrated range; weights of these ops are
int8 symmetric per output channel with an explicit zero point (ORT's QDQ fusion takes no
blocked or 4-bit weights), whatever bits the plan gave them (the plan is updated to say so).
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Iterable

import numpy as np
import onnx_graphsurgeon as gs

from q4c import graph as g
from q4c.calib.table import CalibrationTable
from q4c.config import CompileOptions
from q4c.pipeline import Artifact, Pass, PassContext, PassResult
from q4c.quant.plan import FLOAT, Form, FormBasis, TensorPrecision
from q4c.quant.qparams import quantize
from q4c.quant.weights import WeightSlot, find_weight_slots
from q4c.records import QuantizedTensor

logger = logging.getLogger(__name__)

#: ops a value passes through unchanged in meaning (layout, selection, concatenation)
_PASS_THROUGH = frozenset({"Identity", "Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten", "Concat", "Slice",
                           "Split", "Gather", "Cast", "Expand", "Tile"})
#: between a projection and its gate nonlinearities in a decomposed LSTM/GRU cell
_GATE_PATH = _PASS_THROUGH | {"Add", "Sub", "Mul"}
_RNN_OPS = frozenset({"LSTM", "GRU", "RNN", "Scan", "Loop"})
_FRONT_END = frozenset({"STFT", "DFT", "MelWeightMatrix"})
_COMPUTE = frozenset({"MatMul", "Gemm", "Conv", "ConvTranspose", "MatMulInteger", "QLinearMatMul", "QLinearConv"})
#: where quantized activations are known to hurt: a Conv/Gemm output feeding these keeps float
_KEEP_FLOAT_INPUTS = frozenset({"Softmax", "LogSoftmax", "LayerNormalization", "BatchNormalization",
                                "InstanceNormalization", "GroupNormalization", "RMSNormalization",
                                "SimplifiedLayerNormalization", "SkipLayerNormalization", "ReduceMean"})
_SEARCH_DEPTH = 6


class InsertActivationQdqPass(Pass):
    """Q/DQ (uint8, per tensor, calibrated range) on the activation input of every MatMul, Gemm
    and Conv with a planned quantized weight, whose weight becomes int8 per output channel.

    Kept float, with the reason counted: recurrent state (a stateful model's state inputs, LSTM/
    GRU state outputs, h = o * tanh(c) of decomposed cells), LSTM/GRU internals (projections
    feeding both Sigmoid and Tanh gates, anything inside Scan/Loop bodies), signal-processing
    front ends (inputs computed from STFT/DFT), Conv/Gemm whose output feeds Softmax or a
    normalization, weights the plan keeps float, uncalibrated activations. MatMuls of two
    activations (attention) stay float too.
    Requires: ctx.calibration, ctx.plan (when --activations int8; otherwise a no-op).
    Ensures: every quantized op is in a form ORT fuses.
    Stats: quantized_matmul, quantized_conv, quantized_gemm, weights_to_int8, kept_float_* (the
    ops above by reason, plus kept_float_recurrent_op: LSTM/GRU/RNN/Scan/Loop nodes).
    """

    name = "insert-activation-qdq"
    provides = frozenset({Artifact.INT8_ACTIVATIONS})

    def needs(self, options: CompileOptions) -> frozenset[Artifact]:
        return frozenset({Artifact.CALIBRATION, Artifact.PLAN}) if options.activations == "int8" else frozenset()

    def requires(self, graph: gs.Graph, ctx: PassContext) -> None:
        if ctx.options.activations == "int8":
            ctx.require_calibration()
            ctx.require_plan()

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        if ctx.options.activations != "int8":
            return PassResult(False)
        table: CalibrationTable = ctx.require_calibration()
        plan = ctx.require_plan()
        stats: dict[str, int] = defaultdict(int)
        analysis = _Analysis(graph, table)
        self._q_cache: dict[str, tuple[gs.Variable, gs.Constant, gs.Constant]] = {}
        decided: list[tuple[WeightSlot, str]] = []
        for slot in find_weight_slots(graph):
            if not isinstance(slot, WeightSlot) or slot.role not in ("matmul_b", "gemm_b", "conv"):
                continue
            if slot.graph is not graph:
                stats["kept_float_subgraph"] += 1
                continue
            precision = plan.tensors.get(slot.tensor.name)
            reason = None
            if precision is None or precision.bits == FLOAT:
                reason = "kept_float_weight"
            else:
                reason = analysis.keep_float(slot)
            if reason is not None:
                stats[reason] += 1
                continue
            decided.append((slot, slot.node.op))
        weights: dict[str, _Codes] = {}
        promoted: set[str] = set()
        decided_names = {slot.tensor.name for slot, _ in decided}
        for slot, op in decided:
            x = slot.node.inputs[0]
            x_name = x.name
            self._quantize_input(graph, slot.node, 0, table)
            name = slot.tensor.name
            if plan.tensors[name].bits != 8 or plan.tensors[name].granularity != "channel":
                promoted.add(name)
            w_scale = self._quantize_weight(graph, slot, weights, ctx)
            if op == "MatMul" and _gemm_fusable(x):
                add = _bias_add(slot.node, w_scale.size)
                if add is not None:
                    # ORT fuses MatMul + Add into Gemm first; with a float bias that Gemm stays
                    # float, with an int32 one it becomes QGemm (float output)
                    self._quantize_bias(graph, add, table.qparams(x_name)[0], w_scale,
                                        index=next(i for i, t in enumerate(add.inputs) if isinstance(t, gs.Constant)))
            if op in ("Conv", "Gemm"):
                node = slot.node
                if len(node.inputs) > 2 and g.is_float_constant(node.inputs[2]) and np.asarray(node.inputs[2].values).ndim == 1:
                    self._quantize_bias(graph, node, table.qparams(x_name)[0], w_scale)
                self._quantize_output(graph, node, table)
            stats[f"quantized_{op.lower()}"] += 1
        for name in decided_names:
            old = plan.tensors[name]
            plan.tensors[name] = TensorPrecision(8, "channel", old.scheme, Form.INT8_ACTIVATIONS, FormBasis.OPTION)
        if promoted:
            stats["weights_to_int8"] = len(promoted)
        stats["kept_float_activation_matmul"] = analysis.activation_matmuls()
        stats["kept_float_recurrent_op"] = sum(1 for sub in g.iter_graphs(graph) for n in sub.nodes if n.op in _RNN_OPS)
        kept = {k[len("kept_float_"):]: v for k, v in stats.items() if k.startswith("kept_float_") and v}
        if kept:
            ctx.warn("--activations int8: kept float " + ", ".join(f"{v} {_REASONS[k]}" for k, v in sorted(kept.items()))
                     + "; Softmax and normalization inputs always stay float")
        if promoted:
            ctx.warn(f"--activations int8: {len(promoted)} weight(s) stored as int8 per channel instead of the planned "
                     f"precision: ONNX Runtime's integer MatMul/Conv kernels take int8 weights only")
        changed = sum(v for k, v in stats.items() if k.startswith("quantized_"))
        return PassResult(changed > 0, {k: v for k, v in stats.items() if v})

    def _quantize_input(self, root: gs.Graph, node: gs.Node, index: int, table: CalibrationTable) -> None:
        """x -> Q (one per tensor) -> DQ (one per consumer: ORT fuses groups with their own DQ)."""
        x = node.inputs[index]
        if x.name not in self._q_cache:
            scale, zp = table.qparams(x.name)
            scale_c = gs.Constant(g.unique_name(root, f"{x.name}_scale"), np.array(scale, np.float32))
            zp_c = gs.Constant(g.unique_name(root, f"{x.name}_zero_point"), np.array(zp, np.uint8))
            q_out = gs.Variable(g.unique_name(root, f"{x.name}_uint8"), dtype=np.uint8, shape=x.shape)
            root.nodes.append(gs.Node("QuantizeLinear", g.unique_name(root, f"{x.name}_QuantizeLinear"),
                                      inputs=[x, scale_c, zp_c], outputs=[q_out]))
            self._q_cache[x.name] = (q_out, scale_c, zp_c)
        q_out, scale_c, zp_c = self._q_cache[x.name]
        dq_out = gs.Variable(g.unique_name(root, f"{x.name}_dq"), dtype=np.float32, shape=x.shape)
        root.nodes.append(gs.Node("DequantizeLinear", g.unique_name(root, f"{x.name}_DequantizeLinear"),
                                  inputs=[q_out, scale_c, zp_c], outputs=[dq_out]))
        node.inputs[index] = dq_out

    def _quantize_output(self, root: gs.Graph, node: gs.Node, table: CalibrationTable) -> None:
        """y keeps its name (consumers, graph outputs) and is now DQ(Q(y_pre))."""
        y = node.outputs[0]
        scale, zp = table.qparams(y.name)
        pre = gs.Variable(g.unique_name(root, f"{y.name}_float"), dtype=np.float32, shape=y.shape)
        q_out = gs.Variable(g.unique_name(root, f"{y.name}_uint8"), dtype=np.uint8, shape=y.shape)
        scale_c = gs.Constant(g.unique_name(root, f"{y.name}_scale"), np.array(scale, np.float32))
        zp_c = gs.Constant(g.unique_name(root, f"{y.name}_zero_point"), np.array(zp, np.uint8))
        node.outputs[0] = pre
        root.nodes.append(gs.Node("QuantizeLinear", g.unique_name(root, f"{y.name}_QuantizeLinear"),
                                  inputs=[pre, scale_c, zp_c], outputs=[q_out]))
        root.nodes.append(gs.Node("DequantizeLinear", g.unique_name(root, f"{y.name}_DequantizeLinear"),
                                  inputs=[q_out, scale_c, zp_c], outputs=[y]))

    @staticmethod
    def _quantize_weight(root: gs.Graph, slot: WeightSlot, done: dict[str, _Codes], ctx: PassContext) -> np.ndarray:
        """int8 codes + float32 scale + int8 zero point 0 per output channel; one DQ per consumer.
        Returns the per-channel scales."""
        weight = slot.tensor
        values = np.asarray(weight.values, dtype=np.float32)
        if weight.name not in done:
            qw = quantize(values, 8, granularity="channel", axis=slot.channel_axis)
            codes = g.make_constant(g.unique_name(root, f"{weight.name}_int8"), qw.q.astype(np.int8))
            scale = gs.Constant(g.unique_name(root, f"{weight.name}_scale"), qw.scale.astype(np.float32))
            zp = gs.Constant(g.unique_name(root, f"{weight.name}_zero_point"), np.zeros(qw.scale.shape, np.int8))
            done[weight.name] = (codes, scale, zp)
            error = qw.dequantize() - values
            noise = float(np.sum(np.square(error, dtype=np.float64)))
            power = float(np.sum(np.square(values, dtype=np.float64)))
            ctx.quantized.append(QuantizedTensor(
                name=weight.name, codes=codes.name, op=slot.node.op, role=slot.role, shape=list(values.shape), bits=8,
                granularity="channel", scheme="symmetric", stored_bits=8, activations="uint8",
                sensitivity={"weight_sqnr_db": float("inf") if noise == 0 else round(10 * np.log10(power / noise), 2)}))
        codes, scale, zp = done[weight.name]
        out = gs.Variable(g.unique_name(root, f"{weight.name}_dq"), dtype=np.float32, shape=list(values.shape))
        root.nodes.append(gs.Node("DequantizeLinear", g.unique_name(root, f"{weight.name}_DequantizeLinear"),
                                  attrs={"axis": int(slot.channel_axis)}, inputs=[codes, scale, zp], outputs=[out]))
        slot.node.inputs[slot.index] = out
        return np.asarray(scale.values, np.float32)

    @staticmethod
    def _quantize_bias(root: gs.Graph, node: gs.Node, x_scale: float, w_scale: np.ndarray, index: int = 2) -> None:
        """A bias as int32 codes at scale x_scale * w_scale (zero point 0), the form QLinearConv
        and QGemm take; rounding error is below half an accumulator step."""
        bias = node.inputs[index]
        values = np.asarray(bias.values, np.float32)
        scale = (np.float32(x_scale) * w_scale).astype(np.float32)
        codes = np.clip(np.rint(values / scale), -(2 ** 31), 2 ** 31 - 1).astype(np.int32)
        codes_c = gs.Constant(g.unique_name(root, f"{bias.name}_int32"), codes)
        scale_c = gs.Constant(g.unique_name(root, f"{bias.name}_scale"), scale)
        out = gs.Variable(g.unique_name(root, f"{bias.name}_dq"), dtype=np.float32, shape=list(values.shape))
        root.nodes.append(gs.Node("DequantizeLinear", g.unique_name(root, f"{bias.name}_DequantizeLinear"),
                                  attrs={"axis": 0}, inputs=[codes_c, scale_c], outputs=[out]))
        node.inputs[index] = out


def _gemm_fusable(x: gs.Tensor) -> bool:
    """Whether ORT's MatMulAddFusion can turn MatMul(x, W) + b into Gemm: x 2-D, or of fully
    known shape (it reshapes to 2-D around the Gemm); with symbolic dims it leaves them alone."""
    shape = x.shape
    return shape is not None and (len(shape) == 2 or all(isinstance(d, int) and d > 0 for d in shape))


def _bias_add(matmul: gs.Node, n: int) -> gs.Node | None:
    """The Add that is a MatMul's only consumer and adds a constant [N] bias, if any."""
    users = g.consumers(matmul.outputs[0])
    if len(users) != 1 or users[0].op != "Add":
        return None
    add = users[0]
    others = [t for t in add.inputs if t is not matmul.outputs[0]]
    if len(others) != 1 or not g.is_float_constant(others[0]) or tuple(others[0].shape) != (n,):
        return None
    return add


_Codes = tuple[gs.Constant, gs.Constant, gs.Constant]

_REASONS = {
    "weight": "op(s) whose weight the plan keeps float",
    "recurrent": "op(s) fed recurrent state",
    "cell": "LSTM/GRU cell projection(s)",
    "front_end": "op(s) on an STFT/DFT front end",
    "output_to_norm": "Conv/Gemm whose output feeds Softmax/normalization",
    "uncalibrated": "op(s) with an uncalibrated or constant input",
    "subgraph": "op(s) inside Scan/Loop/If bodies",
    "activation_matmul": "MatMul(s) of two activations (attention)",
    "recurrent_op": "LSTM/GRU/RNN/Scan/Loop op(s) with their gates and state",
    "layout": "op(s) in a layout ONNX Runtime does not fuse",
}


class _Analysis:
    """Why an op's activation should stay float, from the graph's structure."""

    def __init__(self, graph: gs.Graph, table: CalibrationTable) -> None:
        self.graph = graph
        self.table = table
        self.state_inputs = {name for name, s in table.tensors.items() if s.state} | set(table.state_pairs.values())

    def keep_float(self, slot: WeightSlot) -> str | None:
        node = slot.node
        if node.op == "Gemm" and (int(node.attrs.get("transA", 0)) or float(node.attrs.get("alpha", 1.0)) != 1.0):
            return "kept_float_layout"
        if node.op == "Conv" and len(node.inputs[1].shape) not in (3, 4):
            return "kept_float_layout"
        x = node.inputs[0]
        if x.name not in self.table or isinstance(x, gs.Constant):
            return "kept_float_uncalibrated"
        if self._recurrent(x):
            return "kept_float_recurrent"
        if self._feeds_gates(node.outputs[0]):
            return "kept_float_cell"
        if self._front_end(x):
            return "kept_float_front_end"
        if node.op in ("Conv", "Gemm"):
            y = node.outputs[0]
            if y.name not in self.table:
                return "kept_float_uncalibrated"
            if any(c.op in _KEEP_FLOAT_INPUTS for c in _through(y, _PASS_THROUGH)):
                return "kept_float_output_to_norm"
        return None

    def _recurrent(self, tensor: gs.Tensor) -> bool:
        """Reached backwards through layout ops: a state input, an RNN state output, or the
        hidden state h = o * tanh(c) of a decomposed LSTM cell."""
        for t in _back(tensor, _PASS_THROUGH):
            if t.name in self.state_inputs:
                return True
            prod = g.producer(t)
            if prod is None:
                continue
            if prod.op in _RNN_OPS and any(o is t for o in prod.outputs[1:]):
                return True
            if prod.op == "Mul" and {_op(i) for i in prod.inputs} == {"Sigmoid", "Tanh"}:
                return True
        return False

    @staticmethod
    def _feeds_gates(out: gs.Tensor) -> bool:
        """A projection whose output reaches both Sigmoid and Tanh through adds and splits: the
        gate pre-activations of a decomposed LSTM/GRU cell."""
        reached = {c.op for c in _through(out, _GATE_PATH)}
        return "Sigmoid" in reached and "Tanh" in reached

    @staticmethod
    def _front_end(tensor: gs.Tensor) -> bool:
        """Computed from STFT/DFT without a MatMul/Conv in between."""
        seen: set[str] = set()
        stack = [tensor]
        while stack:
            t = stack.pop()
            if t.name in seen:
                continue
            seen.add(t.name)
            prod = g.producer(t)
            if prod is None:
                continue
            if prod.op in _FRONT_END:
                return True
            if prod.op in _COMPUTE:
                continue
            stack.extend(i for i in prod.inputs if not isinstance(i, gs.Constant))
        return False

    def activation_matmuls(self) -> int:
        return sum(1 for n in self.graph.nodes if n.op == "MatMul"
                   and not any(isinstance(i, gs.Constant) for i in n.inputs)
                   and not any(_op(i) == "DequantizeLinear" for i in n.inputs))


def _op(tensor: gs.Tensor) -> str | None:
    prod = g.producer(tensor)
    return prod.op if prod is not None else None


def _back(tensor: gs.Tensor, through: frozenset[str]) -> Iterable[gs.Tensor]:
    """`tensor` and the tensors it is computed from through `through` ops (data inputs only)."""
    seen: set[str] = set()
    stack = [(tensor, 0)]
    while stack:
        t, depth = stack.pop()
        if t.name in seen or isinstance(t, gs.Constant):
            continue
        seen.add(t.name)
        yield t
        prod = g.producer(t)
        if prod is not None and prod.op in through and depth < _SEARCH_DEPTH:
            data = prod.inputs[:1] if prod.op in ("Reshape", "Slice", "Gather", "Expand", "Tile") else prod.inputs
            stack.extend((i, depth + 1) for i in data)


def _through(tensor: gs.Tensor, through: frozenset[str]) -> Iterable[gs.Node]:
    """Consumers of `tensor`, following `through` ops forward a few levels."""
    seen: set[str] = set()
    stack = [(tensor, 0)]
    while stack:
        t, depth = stack.pop()
        if t.name in seen:
            continue
        seen.add(t.name)
        for consumer in g.consumers(t):
            yield consumer
            if consumer.op in through and depth < _SEARCH_DEPTH:
                stack.extend((o, depth + 1) for o in consumer.outputs)
