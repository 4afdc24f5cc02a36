"""Rewrite DequantizeLinear(INT8, per output channel) -> MatMul into com.microsoft DynamicQuantizeMatMul
for the weights whose plan form is `int8-dynamic`.

DynamicQuantizeMatMul (ONNX Runtime ContribOperators.md) quantizes its activation input to uint8
on the fly and multiplies with int8 [K, N] weights whose scale (and zero point) is per column
[N]: ORT-NOTES measures 0.14-0.33x FP32 MatMul time at 16-256 rows per call, 2-3x faster than
MatMulNBits there. Weights planned per output channel at 8 bits are used as they are; block-wise
8-bit codes are re-quantized per channel (and the added error folded into the report).
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs
from onnx import numpy_helper
from onnx_graphsurgeon.ir.tensor import LazyValues

from q4c import graph as g
from q4c.config import Target
from q4c.pipeline import Pass, PassContext, PassResult
from q4c.quant.plan import Form
from q4c.quant.qparams import QuantizedWeight, quantize

#: the plan's form this pass materialises (its string value; absent from older plans)
INT8_DYNAMIC = "int8-dynamic"


def _form_of(ctx: PassContext) -> dict[str, Form]:
    return {codes: form for codes, form in ctx.forms_by_codes().items() if form.value == INT8_DYNAMIC}


class LowerInt8DynamicPass(Pass):
    """For `--target ort-cpu`: DQ(int8) -> MatMul of `int8-dynamic` weights to DynamicQuantizeMatMul.

    Requires: quantize-weights ran.  Ensures: no `int8-dynamic` weight still feeds a MatMul
    through DequantizeLinear.  Stats: dynamic_quantize_matmul, requantized, skipped_layout.
    """

    name = "lower-int8-dynamic"

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        if ctx.options.target is not Target.ORT_CPU:
            return PassResult(False)
        wanted = _form_of(ctx)
        if not wanted:
            return PassResult(False)
        stats = {"dynamic_quantize_matmul": 0, "requantized": 0, "skipped_layout": 0}
        for sub in list(g.iter_graphs(graph)):
            for dq in [n for n in sub.nodes if n.op == "DequantizeLinear" and n.inputs[0].name in wanted]:
                users = g.consumers(dq.outputs[0])
                if not users or not all(u.op == "MatMul" and u.inputs[1] is dq.outputs[0] for u in users):
                    stats["skipped_layout"] += 1
                    continue
                qw = _per_channel(dq)
                if qw is None:
                    stats["skipped_layout"] += 1
                    continue
                codes, scale, requantized = qw
                stats["requantized"] += requantized
                base = dq.inputs[0].name
                b = g.make_constant(g.unique_name(graph, f"{base}_int8kn"), codes)
                s = g.make_constant(g.unique_name(graph, f"{base}_int8kn_scale"), scale)
                for mm in users:
                    a, out = mm.inputs[0], mm.outputs[0]
                    mm.inputs.clear()
                    mm.outputs.clear()
                    sub.nodes.append(gs.Node("DynamicQuantizeMatMul", mm.name, domain=g.MS_DOMAIN,
                                             inputs=[a, b, s], outputs=[out]))
                    stats["dynamic_quantize_matmul"] += 1
        if stats["skipped_layout"]:
            ctx.warn(f"lower-int8-dynamic: {stats['skipped_layout']} int8-dynamic weight(s) not read by MatMul as "
                     f"[K, N] B: kept as DequantizeLinear")
        return PassResult(stats["dynamic_quantize_matmul"] > 0, {k: v for k, v in stats.items() if v})


def _array(t: gs.Constant) -> np.ndarray:
    return numpy_helper.to_array(t._values.tensor) if isinstance(t._values, LazyValues) else np.asarray(t.values)


def _per_channel(dq: gs.Node) -> tuple[np.ndarray, np.ndarray, int] | None:
    """int8 [K, N] codes, float32 [N] scales and 1 if they were re-quantized from block-wise codes."""
    codes_t, scale_t = dq.inputs[0], dq.inputs[1]
    if not isinstance(codes_t, gs.Constant) or not isinstance(scale_t, gs.Constant):
        return None
    if len(dq.inputs) > 2 and not dq.inputs[2].is_empty():
        return None
    codes = _array(codes_t)
    if codes.ndim != 2 or codes.dtype.name not in ("int8", "int4", "int2"):
        return None
    scale = np.asarray(_array(scale_t), np.float32)
    k, n = codes.shape
    axis = int(dq.attrs.get("axis", 1)) % 2
    block = int(dq.attrs.get("block_size", 0))
    if codes.dtype.name == "int8" and not block and axis == 1 and scale.shape == (n,):
        return np.ascontiguousarray(codes.astype(np.int8)), scale, 0
    if scale.size == 1 and not block:
        values = codes.astype(np.float32) * scale.reshape(())
    elif block and axis == 0 and scale.shape == (-(-k // block), n):
        values = QuantizedWeight(codes.astype(np.int8), scale, 8, 0, block).dequantize()
    else:
        return None
    qw = quantize(values, 8, granularity="channel", axis=1)
    return np.ascontiguousarray(qw.q.astype(np.int8)), np.asarray(qw.scale, np.float32).reshape(n), 1


__all__ = ["INT8_DYNAMIC", "LowerInt8DynamicPass"]
