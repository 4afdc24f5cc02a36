"""Rewrite Gemm with a constant B as MatMul on a [K, N] weight (+ Add for the bias).

PyTorch exports Linear as Gemm(transB=1); ONNX Runtime fuses low-bit weights into MatMulNBits
only for MatMul with B laid out [K, N], and runs DQ -> Gemm(transB=1) 5-38x slower than FP32.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from q4c import graph as g
from q4c.pipeline import Pass, PassContext, PassResult


class LowerGemmPass(Pass):
    """Gemm(A, B, C; alpha, beta, transB) with constant B and transA=0 becomes
    MatMul(A, alpha * op(B)) + beta * C; the output keeps its name.

    Requires: nothing.  Ensures: no such Gemm remains.  Stats: lowered, skipped_trans_a.
    """

    name = "lower-gemm"

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        lowered = skipped = 0
        for sub in list(g.iter_graphs(graph)):
            for node in list(sub.nodes):
                if node.op != "Gemm" or not g.is_float_constant(node.inputs[1]):
                    continue
                if int(node.attrs.get("transA", 0)):
                    skipped += 1
                    continue
                self._lower(sub, graph, node)
                lowered += 1
        stats = {"lowered": lowered, "skipped_trans_a": skipped}
        return PassResult(lowered > 0, {k: v for k, v in stats.items() if v})

    @staticmethod
    def _lower(sub: gs.Graph, root: gs.Graph, node: gs.Node) -> None:
        a, b = node.inputs[0], node.inputs[1]
        bias = node.inputs[2] if len(node.inputs) > 2 and not node.inputs[2].is_empty() else None
        alpha = np.float32(node.attrs.get("alpha", 1.0))
        beta = np.float32(node.attrs.get("beta", 1.0))
        weight = b
        if int(node.attrs.get("transB", 0)) or alpha != 1:
            w = np.asarray(b.values)
            w = (w.T if int(node.attrs.get("transB", 0)) else w) * alpha
            weight = gs.Constant(g.unique_name(root, f"{b.name}_kn"), np.ascontiguousarray(w, dtype=np.float32))
        out = node.outputs[0]
        node.outputs.clear()
        node.inputs.clear()
        if bias is None:
            sub.nodes.append(gs.Node("MatMul", node.name, inputs=[a, weight], outputs=[out]))
            return
        if beta != 1:
            if isinstance(bias, gs.Constant):
                bias = gs.Constant(g.unique_name(root, f"{bias.name}_scaled"), (np.asarray(bias.values) * beta).astype(np.float32))
            else:
                scaled = gs.Variable(g.unique_name(root, f"{bias.name}_scaled"), dtype=np.float32)
                beta_c = gs.Constant(g.unique_name(root, f"{node.name}_beta"), np.array(beta, np.float32))
                sub.nodes.append(gs.Node("Mul", inputs=[bias, beta_c], outputs=[scaled]))
                bias = scaled
        product = gs.Variable(g.unique_name(root, f"{out.name}_matmul"), dtype=np.float32)
        sub.nodes.append(gs.Node("MatMul", node.name, inputs=[a, weight], outputs=[product]))
        sub.nodes.append(gs.Node("Add", g.unique_name(root, f"{node.name}_bias"), inputs=[product, bias], outputs=[out]))
