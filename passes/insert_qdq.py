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

import numpy as np
import onnx_graphsurgeon as gs

from q4c import graph as g
from q4c.calib.table import CalibrationTable
from q4c.config import CompileOptions
from q4c.errors import ConfigError
from q4c.pipeline import Artifact, Pass, PassContext, PassResult
from q4c.quant.int8_activations import int8_slots, kept_float_warning
from q4c.quant.plan import Form
from q4c.quant.qparams import quantize
from q4c.quant.weights import WeightSlot, find_weight_slots
from q4c.records import QuantizedTensor

logger = logging.getLogger(__name__)


class InsertActivationQdqPass(Pass):
    """Q/DQ (uint8, per tensor, calibrated range) on the activation input of every MatMul, Gemm
    and Conv whose weight the plan gives form int8-activations (choose-kernels decides which, by
    q4c.quant.int8_activations); the weight is stored int8 per output channel.

    Kept float, with the reason counted: recurrent state (a stateful model's state inputs, LSTM/
    GRU state outputs, h = o * tanh(c) of decomposed cells), LSTM/GRU internals (projections
    feeding both Sigmoid and Tanh gates, anything inside Scan/Loop bodies), signal-processing
    front ends (inputs computed from STFT/DFT), Conv/Gemm whose output feeds Softmax or a
    normalization, weights the plan keeps float, uncalibrated activations. MatMuls of two
    activations (attention) stay float too.
    Requires: ctx.calibration, ctx.plan (when --activations int8; otherwise a no-op).
    Ensures: every quantized op is in a form ORT fuses.
    Stats: quantized_matmul, quantized_conv, quantized_gemm, kept_float_* (the ops above by
    reason, plus kept_float_recurrent_op: LSTM/GRU/RNN/Scan/Loop nodes, kept_float_plan: eligible
    ops the plan did not give int8-activations). choose-kernels counts weights_to_int8.
    """

    name = "insert-activation-qdq"
    provides = frozenset({Artifact.INT8_ACTIVATIONS})

    def needs(self, options: CompileOptions) -> frozenset[Artifact]:
        return frozenset({Artifact.CALIBRATION, Artifact.FORMS}) if options.activations == "int8" else frozenset()

    def requires(self, graph: gs.Graph, ctx: PassContext) -> None:
        if ctx.options.activations == "int8":
            ctx.require_calibration()
            ctx.require_plan()

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        if ctx.options.activations != "int8":
            return PassResult(False)
        table: CalibrationTable = ctx.require_calibration()
        plan = ctx.require_plan()
        self._q_cache: dict[str, tuple[gs.Variable, gs.Constant, gs.Constant]] = {}
        eligible, stats = int8_slots(graph, table, plan)
        decided = [(slot, slot.node.op) for slot in find_weight_slots(graph) if isinstance(slot, WeightSlot)
                   and slot.role in ("matmul_b", "gemm_b", "conv") and slot.graph is graph
                   and plan.tensors.get(slot.tensor.name) is not None
                   and plan.tensors[slot.tensor.name].form is Form.INT8_ACTIVATIONS]
        for slot, _ in decided:
            if slot.node.inputs[0].name not in table or isinstance(slot.node.inputs[0], gs.Constant):
                raise ConfigError(f"plan: tensor {slot.tensor.name!r}: form 'int8-activations' needs a calibrated "
                                  f"activation input, not {slot.node.inputs[0].name!r}")
        for slot in eligible:  # counted above as eligible; not chosen by the plan: say so
            if not any(s.node is slot.node and s.index == slot.index for s, _ in decided):
                stats["kept_float_plan"] = stats.get("kept_float_plan", 0) + 1
        weights: dict[str, _Codes] = {}
        for slot, op in decided:
            x = slot.node.inputs[0]
            x_name = x.name
            self._quantize_input(graph, slot.node, 0, table)
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
            stats[f"quantized_{op.lower()}"] = stats.get(f"quantized_{op.lower()}", 0) + 1
        warning = kept_float_warning(stats)
        if warning is not None:
            ctx.warn(warning)
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
