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
from q4c.testing import heavy_tailed, make_model, op_histogram, run_ort


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
                                            (LayerKind.LSTM, Form.DYNAMIC_QUANTIZE_LSTM, 8)])
def test_recurrent_micro_models_compute_the_layer(kind, form, bits):
    """The lowered micro model against the same random weights as a DequantizeLinear-fed ONNX op:
    it times the real computation, not a broken graph."""
    shape = LayerShape(kind, 24, 32, 2, 6, 1)
    model = layer_model(shape, form, bits, seed=3)
    ops = op_histogram(model)
    assert ("Scan" in ops) if form is Form.SCAN_NBITS else ("com.microsoft::DynamicQuantizeLSTM" in ops)
    feeds = layer_feeds(shape)
    y = run_ort(model, feeds, optimized=True)["Y"]
    assert y.shape == (6, 1, 2, 32)
    # reference: the ONNX op on the codes x scales the micro model stores (seeded identically)
    ref_model = _reference(shape, bits, seed=3, per_channel=form is Form.DYNAMIC_QUANTIZE_LSTM)
    ref = run_ort(ref_model, feeds)["Y"]
    assert sqnr_db(ref, y) > 25  # int8 activations inside MatMulNBits acc 4 / DynamicQuantizeLSTM


def _reference(shape, bits, seed, per_channel):
    from q4c.latency import micro

    rng = np.random.default_rng(seed)
    nd, h, i = shape.directions, shape.n, shape.k
    gates = 4 if shape.kind is LayerKind.LSTM else 3
    op = "LSTM" if shape.kind is LayerKind.LSTM else "GRU"
    bias = (rng.standard_normal((nd, 2 * gates * h)) * 0.1).astype(np.float32)
    weights = {}
    for name, width in (("W", i), ("R", h)):
        weights[name] = micro._codes(rng, (nd, gates * h, width), bits).astype(np.float32) * 0.01
    attrs = {"hidden_size": h}
    if op == "GRU":
        attrs["linear_before_reset"] = 1
    return make_model([helper.make_node(op, ["X", "W", "R", "B", "", "h0"], ["Y"], **attrs)],
                      [helper.make_tensor_value_info("X", TensorProto.FLOAT, [shape.steps, shape.rows, i]),
                       helper.make_tensor_value_info("h0", TensorProto.FLOAT, [nd, shape.rows, h])],
                      [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)],
                      {**weights, "B": bias})
