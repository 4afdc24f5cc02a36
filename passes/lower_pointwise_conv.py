"""Rewrite pointwise Conv1d (kernel 1) as Transpose -> MatMul (+ Add) -> Transpose.

ONNX Runtime has no low-bit Conv kernel (DQ -> pointwise Conv runs 1.3-5.7x slower than
FP32), but fuses a MatMul on a [K, N] low-bit weight into MatMulNBits. A weight that stays float
(fewer than `--min-elements` elements, or kept FP32 by name) is not lowered: it gains nothing and
costs ONNX Runtime its Conv + activation fusion and four nodes a call (Silero's 128 -> 1 decoder
Conv + Sigmoid became Transpose, Reshape, Gemm, Reshape, Transpose, Sigmoid: 1-2 % of its call).
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from q4c import graph as g
from q4c.pipeline import Pass, PassContext, PassResult


class LowerPointwiseConvPass(Pass):
    """Conv(x[N, C, T], W[M, C, 1], b) with unit strides/dilations, no padding, group 1 becomes
    Transpose(MatMul(Transpose(x), W[C, M]) + b); the output keeps its name.

    Requires: nothing.  Ensures: no such Conv remains.  Stats: lowered.
    """

    name = "lower-pointwise-conv"

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        lowered = 0
        options = ctx.options
        for sub in list(g.iter_graphs(graph)):
            for node in list(sub.nodes):
                if self._matches(node) and not (int(np.prod(node.inputs[1].shape)) < options.min_elements
                                                or node.inputs[1].name in options.keep_fp32):
                    self._lower(sub, graph, node)
                    lowered += 1
        return PassResult(lowered > 0, {"lowered": lowered} if lowered else {})

    @staticmethod
    def _matches(node: gs.Node) -> bool:
        if node.op != "Conv" or not g.is_float_constant(node.inputs[1]):
            return False
        w = node.inputs[1]
        attrs = node.attrs
        return (
            len(w.shape) == 3
            and w.shape[2] == 1
            and int(attrs.get("group", 1)) == 1
            and all(int(v) == 1 for v in attrs.get("strides", [1]))
            and all(int(v) == 1 for v in attrs.get("dilations", [1]))
            and all(int(v) == 0 for v in attrs.get("pads", [0, 0]))
            and attrs.get("auto_pad", "NOTSET") in ("NOTSET", "VALID", b"NOTSET", b"VALID")
        )

    @staticmethod
    def _lower(sub: gs.Graph, root: gs.Graph, node: gs.Node) -> None:
        x, w = node.inputs[0], node.inputs[1]
        bias = node.inputs[2] if len(node.inputs) > 2 and not node.inputs[2].is_empty() else None
        out = node.outputs[0]
        node.outputs.clear()
        node.inputs.clear()
        base = node.name or out.name
        weight = gs.Constant(g.unique_name(root, f"{w.name}_kn"), np.ascontiguousarray(np.asarray(w.values)[:, :, 0].T))
        x_t = gs.Variable(g.unique_name(root, f"{x.name}_ntc"), dtype=np.float32)
        y_t = gs.Variable(g.unique_name(root, f"{out.name}_ntc"), dtype=np.float32)
        sub.nodes.append(gs.Node("Transpose", g.unique_name(root, f"{base}_in"), attrs={"perm": [0, 2, 1]}, inputs=[x], outputs=[x_t]))
        if bias is None:
            sub.nodes.append(gs.Node("MatMul", base, inputs=[x_t, weight], outputs=[y_t]))
        else:
            product = gs.Variable(g.unique_name(root, f"{out.name}_matmul"), dtype=np.float32)
            sub.nodes.append(gs.Node("MatMul", base, inputs=[x_t, weight], outputs=[product]))
            sub.nodes.append(gs.Node("Add", g.unique_name(root, f"{base}_bias"), inputs=[product, bias], outputs=[y_t]))
        sub.nodes.append(gs.Node("Transpose", g.unique_name(root, f"{base}_out"), attrs={"perm": [0, 2, 1]}, inputs=[y_t], outputs=[out]))
