"""Fallbacks that used to be silent now say why (issue 17): a failed shape inference in
calibration and in recurrent fusion warns with the reason; reading a lazily loaded constant in
the recurrent lowering leaves it as it was (no private graph-surgeon attribute)."""

from __future__ import annotations

import logging

import ml_dtypes
import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import TensorProto, helper

from q4c import graph as g
from q4c.calib.runner import float_tensors
from q4c.recurrent_fusion.view import inferred_shapes
from q4c.recurrent_lowering import layer


def _model() -> onnx.ModelProto:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])
    nodes = [helper.make_node("Relu", ["x"], ["mid"]), helper.make_node("Neg", ["mid"], ["y"])]
    return helper.make_model(helper.make_graph(nodes, "g", [x], [y]), opset_imports=[helper.make_opsetid("", 17)],
                             ir_version=10)


def _reject(*args, **kwargs):
    raise onnx.shape_inference.InferenceError("[ShapeInferenceError] planted failure")


def test_calibration_warns_when_shape_inference_fails(monkeypatch, caplog):
    model = _model()
    assert float_tensors(model)[0] == ["x", "mid", "y"]  # inference types the intermediate
    monkeypatch.setattr(onnx.shape_inference, "infer_shapes", _reject)
    with caplog.at_level(logging.WARNING, logger="q4c"):
        floats, _ = float_tensors(model)
    assert floats == ["x", "y"]  # only what the model declares
    assert "shape inference failed (InferenceError: [ShapeInferenceError] planted failure)" in caplog.text


def test_fusion_warns_when_shape_inference_fails(monkeypatch, caplog):
    graph = g.import_graph(_model())
    assert inferred_shapes(graph)["mid"] == (2,)
    monkeypatch.setattr(onnx.shape_inference, "infer_shapes", _reject)
    with caplog.at_level(logging.WARNING, logger="q4c"):
        assert inferred_shapes(graph) == {}
    assert "planted failure" in caplog.text


def test_reading_int4_codes_leaves_the_constant_exportable():
    codes = np.array([[1, -2], [3, -8]], dtype=ml_dtypes.int4)
    const = g.make_constant("codes", codes)
    np.testing.assert_array_equal(layer._array(const).astype(np.int8), [[1, -2], [3, -8]])
    out = gs.Variable("y", np.float32, [2, 2])
    scale = gs.Constant("s", np.array(0.5, np.float32))
    graph = gs.Graph(nodes=[gs.Node("DequantizeLinear", inputs=[const, scale], outputs=[out])], outputs=[out], opset=21)
    exported = {t.name: t for t in gs.export_onnx(graph).graph.initializer}
    assert exported["codes"].data_type == TensorProto.INT4  # still the INT4 proto, not a cast copy


def _int4_lstm() -> gs.Graph:
    """LSTM (H=2, I=4) whose W and R are DequantizeLinear of INT4 codes, blocks along K."""
    rng = np.random.default_rng(0)
    hidden, inputs = 2, 4
    x = gs.Variable("x", np.float32, [3, 1, inputs])
    y = gs.Variable("y", np.float32, [3, 1, 1, hidden])

    def dq(name: str, k: int) -> gs.Variable:
        codes = g.make_constant(f"{name}_codes", rng.integers(-8, 8, (1, 4 * hidden, k)).astype(ml_dtypes.int4))
        scale = gs.Constant(f"{name}_scale", np.full((1, 4 * hidden, 1), 0.1, np.float32))
        out = gs.Variable(name, np.float32, [1, 4 * hidden, k])
        nodes.append(gs.Node("DequantizeLinear", f"{name}_dq", {"axis": 2, "block_size": k}, [codes, scale], [out]))
        return out

    nodes: list[gs.Node] = []
    w, r = dq("W", inputs), dq("R", hidden)
    nodes.append(gs.Node("LSTM", "lstm", {"hidden_size": hidden}, [x, w, r], [y]))
    return gs.Graph(nodes=nodes, inputs=[x], outputs=[y], opset=21)


def test_lowering_warns_when_the_plan_misses_a_codes_tensor(caplog):
    graph = _int4_lstm()
    node = next(n for n in graph.nodes if n.op == "LSTM")
    with caplog.at_level(logging.WARNING, logger="q4c"):
        planned = layer.match_layer(graph, node, {"W_codes": 3, "R_codes": 3})
    assert [w.bits for w in planned.w + planned.r] == [3, 3] and not caplog.text
    with caplog.at_level(logging.WARNING, logger="q4c"):
        partial = layer.match_layer(graph, node, {"W_codes": 3})
    assert [w.bits for w in partial.w + partial.r] == [3, 4]
    assert "R_codes is not in the precision plan: its width is taken from its int4 storage type (4 bits)" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="q4c"):
        unplanned = layer.match_layer(graph, node, {})  # no plan at all: storage width, nothing to warn about
    assert [w.bits for w in unplanned.w + unplanned.r] == [4, 4] and not caplog.text
