"""Verifying graphs with quantized activations (`--activations int8`).

A QuantizeLinear on an activation turns float noise into integer decisions: where the
interpreter's float input differs from ONNX Runtime's in the last bit (a LayerNorm, a long
MatMul), a value on a rounding boundary gets the neighbouring code, and the difference is then
one quantization step instead of 1e-7. So such graphs are verified in two exact halves:
- every activation QuantizeLinear, given ONNX Runtime's own float input, yields ONNX Runtime's
  codes bit for bit in the interpreter (`check_activation_quantizers`);
- the graph with those Q/DQ pairs taken out (`strip_activation_qdq`) agrees between the
  interpreter and ONNX Runtime within float noise, as any float graph must.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper

from q4c.errors import NumericMismatchError


def activation_quantizers(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """QuantizeLinear nodes of the main graph whose input is computed from graph inputs, not from
    initializers alone (a weight re-quantized at load, the int8-at-load form, is not an activation)."""
    constants = {t.name for t in model.graph.initializer}
    constants |= {o for n in model.graph.node if n.op_type == "Constant" for o in n.output}
    for n in model.graph.node:  # nodes are stored in topological order
        if n.input and all(not i or i in constants for i in n.input):
            constants.update(n.output)
    return [n for n in model.graph.node if n.op_type == "QuantizeLinear" and n.input[0] not in constants]


def strip_activation_qdq(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy where each DequantizeLinear(QuantizeLinear(x)) on an activation is Identity(x)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    quantizers = {n.output[0]: n.input[0] for n in activation_quantizers(out)}
    nodes = []
    for node in out.graph.node:
        if node.op_type == "QuantizeLinear" and node.output[0] in quantizers:
            continue
        if node.op_type == "DequantizeLinear" and node.input[0] in quantizers:
            node = helper.make_node("Identity", [quantizers[node.input[0]]], [node.output[0]], name=node.name)
        nodes.append(node)
    del out.graph.node[:]
    out.graph.node.extend(nodes)
    used = {i for n in out.graph.node for i in n.input}
    if any(q in used for q in quantizers):
        raise NumericMismatchError("an activation QuantizeLinear output feeds something other than DequantizeLinear")
    return out


def check_activation_quantizers(model: onnx.ModelProto, samples: Iterable[Mapping[str, np.ndarray]]) -> int:
    """Run ONNX Runtime (optimizations off) exposing every activation QuantizeLinear's input and
    output; re-quantize each input with the interpreter; raise NumericMismatchError unless
    every code matches. Returns the number of codes compared."""
    from q4c.interp import Interpreter

    quantizers = activation_quantizers(model)
    if not quantizers:
        return 0
    exposed = onnx.ModelProto()
    exposed.CopyFrom(model)
    have = {o.name for o in exposed.graph.output}
    for node in quantizers:
        for name in (node.input[0], node.output[0]):
            if name not in have:
                exposed.graph.output.append(onnx.ValueInfoProto(name=name))
                have.add(name)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    session = ort.InferenceSession(exposed.SerializeToString(), options, providers=["CPUExecutionProvider"])
    oracle = Interpreter(_quantizers_alone(model, quantizers))
    fetch = [o.name for o in session.get_outputs()]
    compared = 0
    for feeds in samples:
        values = dict(zip(fetch, session.run(fetch, dict(feeds))))
        codes = oracle.run({n.input[0]: values[n.input[0]] for n in quantizers})
        for node in quantizers:
            want, got = values[node.output[0]], codes[node.output[0]]
            if want.shape != got.shape or not np.array_equal(want, got):
                bad = int(np.count_nonzero(want != got)) if want.shape == got.shape else want.size
                raise NumericMismatchError(
                    f"QuantizeLinear {node.name or node.output[0]!r}: the interpreter gives other codes than ONNX "
                    f"Runtime for the same input ({bad} of {want.size}); this is a q4c bug, please report it")
            compared += want.size
    return compared


def _quantizers_alone(model: onnx.ModelProto, quantizers: list[onnx.NodeProto]) -> onnx.ModelProto:
    """The quantizers as a graph of their own: their inputs become graph inputs."""
    params = {i for n in quantizers for i in n.input[1:] if i}
    initializers = [t for t in model.graph.initializer if t.name in params]
    constant_nodes = [n for n in model.graph.node if n.op_type == "Constant" and n.output[0] in params]
    inputs = [helper.make_tensor_value_info(n.input[0], onnx.TensorProto.FLOAT, None) for n in quantizers]
    inputs = list({vi.name: vi for vi in inputs}.values())
    outputs = [helper.make_tensor_value_info(n.output[0], onnx.TensorProto.UINT8, None) for n in quantizers]
    graph = helper.make_graph([*constant_nodes, *quantizers], "quantizers", inputs, outputs, initializers)
    return helper.make_model(graph, opset_imports=list(model.opset_import), ir_version=model.ir_version)
