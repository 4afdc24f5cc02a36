"""Fold nodes whose inputs are all constants into constants, evaluated by q4c's interpreter.

Real exports keep weights in Constant nodes and route LSTM W/R through Slice/Concat gate
re-ordering or Transpose; folding turns all of that into plain initializers, so every weight
is found by the quantizer.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import helper, numpy_helper
from onnx_graphsurgeon.exporters.onnx_exporter import OnnxExporter

from q4c import graph as g
from q4c.errors import Q4cError
from q4c.interp import Interpreter
from q4c.pipeline import Pass, PassContext, PassResult
from q4c.quant.closed_form import is_generator

logger = logging.getLogger(__name__)

#: Ops never folded: quantized weights must stay quantized, random ops are not constant.
_NEVER_FOLD = {"DequantizeLinear", "QuantizeLinear", "RandomNormal", "RandomUniform",
               "RandomNormalLike", "RandomUniformLike", "Multinomial", "Bernoulli"}
#: A folded result may grow this much beyond its inputs (ConstantOfShape, Expand, Tile make
#: large tensors from small ones; storing them would bloat the file).
_MAX_GROWTH_BYTES = 1 << 20


class FoldConstantsPass(Pass):
    """Replace Constant nodes and constant-only subgraphs by initializers.

    Requires: nothing.  Ensures: no Constant node remains outside graph outputs.
    Stats: folded, skipped_large, skipped_unsupported.
    """

    name = "fold-constants"

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        stats = {"folded": 0, "skipped_large": 0, "skipped_unsupported": 0}
        for sub in list(g.iter_graphs(graph)):
            outputs = {t.name for t in sub.outputs}
            for node in list(sub.nodes):
                if not self._foldable(node, outputs):
                    continue
                values = self._evaluate(node, ctx, stats)
                if values is None:
                    continue
                in_bytes = sum(np.asarray(t.values).nbytes for t in node.inputs if isinstance(t, gs.Constant))
                if node.op != "Constant" and sum(v.nbytes for v in values) > in_bytes + _MAX_GROWTH_BYTES:
                    stats["skipped_large"] += 1
                    continue
                for tensor, value in zip(node.outputs, values):
                    tensor.to_constant(np.asarray(value))
                node.outputs.clear()
                node.inputs.clear()
                stats["folded"] += 1
        return PassResult(stats["folded"] > 0, {k: v for k, v in stats.items() if v})

    @staticmethod
    def _foldable(node: gs.Node, graph_outputs: set[str]) -> bool:
        if node.op in _NEVER_FOLD or node.domain not in ("", "ai.onnx", None):
            return False
        if is_generator(node.name):  # synthesize-constants computes this weight in-graph on purpose
            return False
        if any(isinstance(v, gs.Graph) for v in node.attrs.values()):
            return False
        if not node.outputs or any(t.name in graph_outputs for t in node.outputs):
            return False
        return all(isinstance(t, gs.Constant) or t.is_empty() for t in node.inputs)

    @staticmethod
    def _evaluate(node: gs.Node, ctx: PassContext, stats: dict[str, int]) -> list[np.ndarray] | None:
        if node.op == "Constant":
            value = node.attrs.get("value")
            if isinstance(value, gs.Constant):
                return [np.asarray(value.values)]

        model = _single_node_model(node, ctx.opset)
        try:
            result = Interpreter(model).run({})
        except Q4cError as e:
            logger.debug("fold-constants: cannot evaluate %s (%s): %s", node.name, node.op, e)
            stats["skipped_unsupported"] += 1
            return None
        return [result[t.name] for t in node.outputs]


def _single_node_model(node: gs.Node, opset: int) -> onnx.ModelProto:
    """The node alone as a model, its constant inputs as initializers."""
    node_proto = OnnxExporter.export_node(node)
    initializers = [numpy_helper.from_array(np.asarray(t.values), t.name)
                    for t in node.inputs if isinstance(t, gs.Constant)]
    outputs = [helper.make_empty_tensor_value_info(t.name) for t in node.outputs]
    graph = helper.make_graph([node_proto], "fold", [], outputs, initializer=initializers)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=g.IR_VERSION)
