"""Layer discovery (shapes a layer is called with) and the one-layer models the costs are timed on."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper

from q4c import graph as g
from q4c.latency.forms import Form, LayerKind, LayerShape
from q4c.latency.layers import find_layers
from q4c.latency.micro import layer_feeds, layer_model
from q4c.metrics import sqnr_db
from q4c.testing import heavy_tailed, make_model, op_histogram, run_ort, run_pass


def test_find_layers_reads_rows_steps_and_batch_from_a_sample(rng):
    h = 16
    model = make_model(
        [helper.make_node("MatMul", ["x", "W"], ["p"]),  # [3, 7, 8] @ [8, 12]: 21 rows
         helper.make_node("Transpose", ["p"], ["pt"], perm=[1, 0, 2]),  # [7, 3, 12]: T = 7, B = 3
         helper.make_node("LSTM", ["pt", "Wl", "Rl"], ["y"], hidden_size=h)],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", "t", 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        {"W": heavy_tailed(rng, (8, 12)), "Wl": heavy_tailed(rng, (1, 4 * h, 12)), "Rl": heavy_tailed(rng, (1, 4 * h, h))})
    layers = find_layers(g.import_graph(model), {"x": rng.standard_normal((3, 7, 8), dtype=np.float32)})
    shapes = {layer.weights: layer.shape for layer in layers}
    assert shapes == {("W",): LayerShape(LayerKind.MATMUL, 8, 12, 21),
                      ("Wl", "Rl"): LayerShape(LayerKind.LSTM, 12, h, 3, 7, 1)}


@pytest.mark.parametrize("form,bits", [(Form.NBITS_ACC4, 4), (Form.NBITS_ACC0, 2), (Form.INT8_DYNAMIC, 8),
                                       (Form.FP32_AT_LOAD, 32)])
def test_matmul_micro_models_use_the_form_they_time(form, bits):
    shape = LayerShape(LayerKind.MATMUL, 128, 64, 5)
    model = layer_model(shape, form, bits)
    want = {Form.NBITS_ACC4: "com.microsoft::MatMulNBits", Form.NBITS_ACC0: "com.microsoft::MatMulNBits",
            Form.INT8_DYNAMIC: "com.microsoft::DynamicQuantizeMatMul", Form.FP32_AT_LOAD: "MatMul"}[form]
    assert op_histogram(model) == {want: 1}
    assert run_ort(model, layer_feeds(shape))["y"].shape == (5, 64)


@pytest.mark.parametrize("kind,form,bits", [(LayerKind.LSTM, Form.SCAN_NBITS, 4), (LayerKind.GRU, Form.SCAN_NBITS, 4),
                                            (LayerKind.LSTM, Form.DYNAMIC_QUANTIZE_LSTM, 8),
                                            (LayerKind.LSTM, Form.SCAN_INT8_PROJECTION, 4),
                                            (LayerKind.GRU, Form.SCAN_INT8_PROJECTION, 2)])
def test_recurrent_micro_models_compute_the_layer(kind, form, bits):
    """The lowered micro model against the same random weights as a DequantizeLinear-fed ONNX op:
    it times the real computation, not a broken graph."""
    shape = LayerShape(kind, 24, 32, 2, 6, 1)
    model = layer_model(shape, form, bits, seed=3)
    ops = op_histogram(model)
    assert ("Scan" in ops) if form is not Form.DYNAMIC_QUANTIZE_LSTM else ("com.microsoft::DynamicQuantizeLSTM" in ops)
    assert ("com.microsoft::DynamicQuantizeMatMul" in ops) == (form is Form.SCAN_INT8_PROJECTION)
    feeds = layer_feeds(shape)
    y = run_ort(model, feeds, optimized=True)["Y"]
    assert y.shape == (6, 1, 2, 32)
    # reference: the ONNX op on the codes x scales the micro model stores (seeded identically)
    ref_model = _reference(shape, bits, seed=3, w_bits=8 if form is Form.SCAN_INT8_PROJECTION else bits)
    ref = run_ort(ref_model, feeds)["Y"]
    assert sqnr_db(ref, y) > 25  # int8 activations inside MatMulNBits acc 4 / DynamicQuantizeLSTM


def _reference(shape, bits, seed, w_bits):
    from q4c.latency import micro

    rng = np.random.default_rng(seed)
    nd, h, i = shape.directions, shape.n, shape.k
    gates = 4 if shape.kind is LayerKind.LSTM else 3
    op = "LSTM" if shape.kind is LayerKind.LSTM else "GRU"
    bias = (rng.standard_normal((nd, 2 * gates * h)) * 0.1).astype(np.float32)
    weights = {}
    for name, width, b in (("W", i, w_bits), ("R", h, bits)):
        weights[name] = micro._codes(rng, (nd, gates * h, width), b).astype(np.float32) * 0.01
    attrs = {"hidden_size": h}
    if op == "GRU":
        attrs["linear_before_reset"] = 1
    return make_model([helper.make_node(op, ["X", "W", "R", "B", "", "h0"], ["Y"], **attrs)],
                      [helper.make_tensor_value_info("X", TensorProto.FLOAT, [shape.steps, shape.rows, i]),
                       helper.make_tensor_value_info("h0", TensorProto.FLOAT, [nd, shape.rows, h])],
                      [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)],
                      {**weights, "B": bias})


@pytest.mark.parametrize("op,direction", [("LSTM", "forward"), ("GRU", "bidirectional")])
def test_scan_int8_projection_form_is_lowered_and_computes_the_layer(rng, op, direction):
    """Planned form scan-int8-projection (W 8-bit, R 4-bit) through choose-kernels, quantize-weights
    and lower-recurrent: Scan + DynamicQuantizeMatMul, against the DQ-fed op in ONNX Runtime."""
    from q4c.config import CompileOptions
    from q4c.passes.assign_precision import AssignPrecisionPass
    from q4c.passes.choose_kernels import ChooseKernelsPass
    from q4c.passes.lower_recurrent import LowerRecurrentPass
    from q4c.passes.quantize_weights import QuantizeWeightsPass
    from q4c.pipeline import PassContext
    from q4c.quant.plan import Form as PlanForm
    from q4c.quant.plan import FormBasis, TensorPrecision

    nd, h, i, gates = (2 if direction == "bidirectional" else 1), 32, 40, (4 if op == "LSTM" else 3)
    attrs = {"hidden_size": h, "direction": direction, **({"linear_before_reset": 1} if op == "GRU" else {})}
    model = make_model([helper.make_node(op, ["X", "W", "R", "B"], ["Y"], **attrs)],
                       [helper.make_tensor_value_info("X", TensorProto.FLOAT, [6, 2, i])],
                       [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)],
                       {"W": heavy_tailed(rng, (nd, gates * h, i), 0.2), "R": heavy_tailed(rng, (nd, gates * h, h), 0.2),
                        "B": (rng.standard_normal((nd, 2 * gates * h)) * 0.1).astype(np.float32)})
    ctx = PassContext(options=CompileOptions(bits=4, min_elements=0))
    m, _ = run_pass(AssignPrecisionPass(), model, ctx=ctx)
    w, r = ctx.plan.tensors["W"], ctx.plan.tensors["R"]
    ctx.plan.tensors["W"] = TensorPrecision(8, w.granularity, w.scheme, PlanForm.SCAN_INT8_PROJECTION, FormBasis.USER)
    ctx.plan.tensors["R"] = r.with_form(PlanForm.SCAN_INT8_PROJECTION, FormBasis.USER)
    m, _ = run_pass(ChooseKernelsPass(), m, ctx=ctx)
    dq, _ = run_pass(QuantizeWeightsPass(), m, ctx=ctx)
    lowered, result = run_pass(LowerRecurrentPass(), dq, ctx=ctx)
    ops = op_histogram(lowered)
    assert result.stats.get("scan") == 1 and ops.get("Scan") == 1
    assert ops.get("com.microsoft::DynamicQuantizeMatMul") == nd
    feeds = {"X": rng.standard_normal((6, 2, i)).astype(np.float32)}
    want = run_ort(dq, feeds)["Y"]
    assert sqnr_db(want, run_ort(lowered, feeds, optimized=True)["Y"]) > 25  # int8 activations: ~35 dB
