"""One-layer ONNX models of a layer shape in a given form, for micro-benchmarks in ONNX Runtime.

Weights are random (speed does not depend on their values); the low-bit forms are built the way
q4c's materialising passes build them (q4c.quant.packing for MatMulNBits, q4c.recurrent_lowering
for the recurrent forms), so a micro-benchmark times the graph a compile would write.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import TensorProto, helper, numpy_helper

from q4c import graph as g
from q4c.latency.forms import Form, LayerKind, LayerShape
from q4c.quant.packing import kernel_bits, matmulnbits_weights
from q4c.quant.plan import FLOAT
from q4c.quant.qparams import QuantizedWeight
from q4c.recurrent_lowering import (
    Emitter,
    lower_to_dynamic_lstm,
    lower_to_scan,
    match_layer,
)

#: MatMulNBits block along K (q4c's default granularity for float32-scaled kernel weights).
MATMUL_BLOCK = 64
#: Block of recurrent weights (float16 scales: q4c's default block 32).
RECURRENT_BLOCK = 32
_GATES = {LayerKind.LSTM: 4, LayerKind.GRU: 3}


def _model(nodes: list[onnx.NodeProto], inputs: list[onnx.ValueInfoProto], outputs: list[onnx.ValueInfoProto],
           inits: list[onnx.TensorProto]) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "layer", inputs, outputs, initializer=inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", g.TARGET_OPSET),
                                                   helper.make_opsetid(g.MS_DOMAIN, 1)], ir_version=g.IR_VERSION)


def _codes(rng: np.random.Generator, shape: tuple[int, ...], bits: int) -> np.ndarray:
    lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return rng.integers(lo, hi + 1, shape).astype(np.int8)


def matmul_model(shape: LayerShape, form: Form, bits: int, seed: int = 0) -> onnx.ModelProto:
    """x [M, K] @ W [K, N] in `form` (`bits` the weight's width; FLOAT for the FP32 op)."""
    rng = np.random.default_rng(seed)
    k, n, m = shape.k, shape.n, shape.rows
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [m, k])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [m, n])
    if form is Form.FP32_AT_LOAD or bits == FLOAT:
        w = (rng.standard_normal((k, n)) / np.sqrt(k)).astype(np.float32)
        return _model([helper.make_node("MatMul", ["x", "W"], ["y"])], [x], [y], [numpy_helper.from_array(w, "W")])
    if form is Form.INT8_DYNAMIC:
        inits = [numpy_helper.from_array(_codes(rng, (k, n), 8), "B"),
                 numpy_helper.from_array(np.full(n, 0.01, np.float32), "b_scale"),
                 numpy_helper.from_array(np.zeros(n, np.int8), "b_zp")]
        node = helper.make_node("DynamicQuantizeMatMul", ["x", "B", "b_scale", "b_zp"], ["y"], domain=g.MS_DOMAIN)
        return _model([node], [x], [y], inits)
    if form is Form.INT8_AT_LOAD:
        return _int8_at_load_model(rng, shape, bits, x, y)
    if form not in (Form.NBITS_ACC4, Form.NBITS_ACC0):
        raise ValueError(f"{form.value} is not a MatMul form")
    block = MATMUL_BLOCK if k >= MATMUL_BLOCK else 16
    nb = -(-k // block)
    qw = QuantizedWeight(_codes(rng, (k, n), kernel_bits(bits)), np.full((nb, n), 0.01, np.float32), bits, 0, block)
    packed, scales = matmulnbits_weights(qw)
    inits = [numpy_helper.from_array(packed, "B"), numpy_helper.from_array(scales.reshape(-1), "scales")]
    node = helper.make_node("MatMulNBits", ["x", "B", "scales"], ["y"], domain=g.MS_DOMAIN, K=k, N=n,
                            bits=kernel_bits(bits), block_size=block,
                            accuracy_level=4 if form is Form.NBITS_ACC4 else 0)
    return _model([node], [x], [y], inits)


def int8_at_load_nodes(codes: str, block_scale: str, block: int, a: str, y: str) -> list[onnx.NodeProto]:
    """The int8-at-load form as passes/lower_int8_dynamic.py emits it: DequantizeLinear(codes [K, N],
    blocks along K) -> QuantizeLinear(int8, per column, scale max(ReduceMax(|W|, K) / 127, eps)) ->
    DynamicQuantizeMatMul(a, ., scale); everything but the last node folds at session load."""
    return [helper.make_node("DequantizeLinear", [codes, block_scale], ["w"], axis=0, block_size=block),
            helper.make_node("Abs", ["w"], ["w_abs"]),
            helper.make_node("ReduceMax", ["w_abs", "axes0"], ["w_peak"], keepdims=0),
            helper.make_node("Div", ["w_peak", "c127"], ["w_step"]),
            helper.make_node("Max", ["w_step", "eps"], ["w_scale"]),
            helper.make_node("QuantizeLinear", ["w", "w_scale"], ["w_int8"], axis=1, output_dtype=TensorProto.INT8),
            helper.make_node("DynamicQuantizeMatMul", [a, "w_int8", "w_scale"], [y], domain=g.MS_DOMAIN)]


def _int8_at_load_model(rng: np.random.Generator, shape: LayerShape, bits: int, x: onnx.ValueInfoProto,
                        y: onnx.ValueInfoProto) -> onnx.ModelProto:
    k, n = shape.k, shape.n
    block = MATMUL_BLOCK if k >= MATMUL_BLOCK else 16
    scale = np.full((-(-k // block), n), 0.01, np.float32)
    inits = [numpy_helper.from_array(_codes(rng, (k, n), kernel_bits(bits)).astype(ml_dtypes.int4), "B"),
             numpy_helper.from_array(scale, "scales"), numpy_helper.from_array(np.array([0], np.int64), "axes0"),
             numpy_helper.from_array(np.array(127.0, np.float32), "c127"),
             numpy_helper.from_array(np.array(1e-30, np.float32), "eps")]
    return _model(int8_at_load_nodes("B", "scales", block, "x", "y"), [x], [y], inits)


def recurrent_model(shape: LayerShape, form: Form, bits: int, seed: int = 0) -> onnx.ModelProto:
    """One LSTM/GRU layer, X [T, B, I], initial and final states, in `form`."""
    rng = np.random.default_rng(seed)
    op = "LSTM" if shape.kind is LayerKind.LSTM else "GRU"
    nd, h, i, gates = shape.directions, shape.n, shape.k, _GATES[shape.kind]
    x = helper.make_tensor_value_info("X", TensorProto.FLOAT, [shape.steps, shape.rows, i])
    h0 = helper.make_tensor_value_info("h0", TensorProto.FLOAT, [nd, shape.rows, h])
    outs = [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [shape.steps, nd, shape.rows, h]),
            helper.make_tensor_value_info("Y_h", TensorProto.FLOAT, [nd, shape.rows, h])]
    attrs = {"hidden_size": h, "direction": "bidirectional" if nd == 2 else "forward"}
    if op == "GRU":
        attrs["linear_before_reset"] = 1
    bias = numpy_helper.from_array((rng.standard_normal((nd, 2 * gates * h)) * 0.1).astype(np.float32), "B")
    node_inputs = ["X", "W", "R", "B", "", "h0"]
    if form is Form.FP32_AT_LOAD or bits == FLOAT:
        inits = [numpy_helper.from_array((rng.standard_normal((nd, gates * h, n)) / np.sqrt(n)).astype(np.float32), name)
                 for name, n in (("W", i), ("R", h))] + [bias]
        return _model([helper.make_node(op, node_inputs, ["Y", "Y_h"], **attrs)], [x, h0], outs, inits)
    if form is Form.DYNAMIC_QUANTIZE_LSTM and (op != "LSTM" or bits != 8):
        raise ValueError("DynamicQuantizeLSTM runs 8-bit LSTM weights only")
    if form not in (Form.SCAN_NBITS, Form.SCAN_INT8_PROJECTION, Form.DYNAMIC_QUANTIZE_LSTM):
        raise ValueError(f"{form.value} is not a recurrent form")
    store = {2: ml_dtypes.int2, 3: ml_dtypes.int4, 4: ml_dtypes.int4, 8: np.int8}[bits]
    graph = gs.Graph(opset=g.TARGET_OPSET)
    tensors = {"X": gs.Variable("X", np.float32, [shape.steps, shape.rows, i]),
               "h0": gs.Variable("h0", np.float32, [nd, shape.rows, h])}
    int8_projection = form is Form.SCAN_INT8_PROJECTION
    widths = {"W": 8 if int8_projection else bits, "R": bits}
    for name, width in (("W", i), ("R", h)):
        block = width if form is Form.DYNAMIC_QUANTIZE_LSTM else RECURRENT_BLOCK
        kind = np.int8 if widths[name] == 8 else store
        codes = gs.Constant(f"{name}_codes", _codes(rng, (nd, gates * h, width), widths[name]).astype(kind))
        scale = gs.Constant(f"{name}_scale", np.full((nd, gates * h, -(-width // block)), 0.01, np.float32))
        tensors[name] = gs.Variable(name, np.float32)
        graph.nodes.append(gs.Node("DequantizeLinear", f"{name}_dq", {"axis": 2, "block_size": block},
                                   inputs=[codes, scale], outputs=[tensors[name]]))
    tensors["B"] = gs.Constant("B", numpy_helper.to_array(bias))
    out_vars = [gs.Variable("Y", np.float32), gs.Variable("Y_h", np.float32)]
    if op == "LSTM":
        out_vars.append(gs.Variable("Y_c", np.float32))
    node = gs.Node(op, "layer", dict(attrs), inputs=[tensors[n] if n else gs.Variable.empty() for n in node_inputs],
                   outputs=out_vars)
    graph.nodes.append(node)
    graph.inputs = [tensors["X"], tensors["h0"]]
    graph.outputs = out_vars[:2]
    layer = match_layer(graph, node, {f"{n}_codes": widths[n] for n in ("W", "R")})
    assert not hasattr(layer, "code"), f"micro model did not match: {layer}"
    if form in (Form.SCAN_NBITS, Form.SCAN_INT8_PROJECTION):
        lower_to_scan(layer, Emitter(graph, "layer"), int8_projection=int8_projection)
    else:
        lower_to_dynamic_lstm(layer, Emitter(graph, "layer"))
    graph.cleanup().toposort()
    model = gs.export_onnx(graph)
    model.ir_version = g.IR_VERSION
    if not any(o.domain == g.MS_DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(g.MS_DOMAIN, 1))
    return model


def layer_model(shape: LayerShape, form: Form, bits: int, seed: int = 0) -> onnx.ModelProto:
    if shape.kind is LayerKind.MATMUL:
        return matmul_model(shape, form, bits, seed)
    return recurrent_model(shape, form, bits, seed)


def layer_feeds(shape: LayerShape, seed: int = 1) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    if shape.kind is LayerKind.MATMUL:
        return {"x": rng.standard_normal((shape.rows, shape.k)).astype(np.float32)}
    return {"X": (rng.standard_normal((shape.steps, shape.rows, shape.k)) * 0.5).astype(np.float32),
            "h0": np.zeros((shape.directions, shape.rows, shape.n), np.float32)}


__all__ = ["MATMUL_BLOCK", "RECURRENT_BLOCK", "int8_at_load_nodes", "layer_feeds", "layer_model", "matmul_model", "recurrent_model"]
