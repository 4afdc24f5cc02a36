"""A Conv weight's block axis is a plan field (q4c.quant.plan.TensorPrecision.block_axis):
choose-kernels records the axis derived from the shape, and a hand-edited plan changes the
DequantizeLinear axis quantize-weights emits."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import q4c
from q4c.errors import ConfigError
from q4c.quant.plan import PrecisionPlan
from q4c.testing import heavy_tailed, make_model, run_interp, run_ort, sqnr_db


def _conv(rng) -> onnx.ModelProto:
    """Conv1d with W [16, 64, 48]: I = 64 >= 32, so blocks run along I (axis 1) by default."""
    return make_model([helper.make_node("Conv", ["x", "W"], ["y"])],
                      [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64, 100])],
                      [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 16, 53])], {"W": heavy_tailed(rng, (16, 64, 48))})


def _dq(path):
    model = onnx.load(str(path))
    node = next(n for n in model.graph.node if n.op_type == "DequantizeLinear")
    scale = next(t for t in model.graph.initializer if t.name == node.input[1])
    return {a.name: a.i for a in node.attribute}, numpy_helper.to_array(scale).shape


def _compile(src, out, tmp_path, **options):
    return q4c.compile_file(src, out, q4c.CompileOptions(min_elements=0, **options), verify=False,
                            save_plan=tmp_path / f"{out.stem}.plan.json")


@pytest.fixture
def conv(tmp_path, rng):
    src = tmp_path / "conv.onnx"
    model = _conv(rng)
    onnx.save(model, src)
    return src, model


def test_the_derived_axis_is_written_and_a_hand_edit_moves_the_blocks(conv, tmp_path, rng):
    src, model = conv
    _compile(src, tmp_path / "a.onnx", tmp_path, bits=4)
    doc = json.loads((tmp_path / "a.plan.json").read_text())
    assert doc["schema"] == "q4c.plan/2" and doc["tensors"]["W"]["block_axis"] == 1
    attrs, scale = _dq(tmp_path / "a.onnx")
    assert attrs == {"axis": 1, "block_size": 32} and scale == (16, 2, 48)

    doc["tensors"]["W"]["block_axis"] = 2  # along the kernel axis instead
    (tmp_path / "edited.json").write_text(json.dumps(doc))
    _compile(src, tmp_path / "b.onnx", tmp_path, plan_path=tmp_path / "edited.json")
    attrs, scale = _dq(tmp_path / "b.onnx")
    assert attrs == {"axis": 2, "block_size": 32} and scale == (16, 64, 2)
    assert json.loads((tmp_path / "b.plan.json").read_text())["tensors"]["W"]["block_axis"] == 2
    feeds = {"x": rng.standard_normal((1, 64, 100)).astype(np.float32)}
    compiled = onnx.load(str(tmp_path / "b.onnx"))
    via_ort = run_ort(compiled, feeds)["y"]
    np.testing.assert_allclose(run_interp(compiled, feeds)["y"], via_ort, rtol=1e-4, atol=1e-4)
    assert sqnr_db(run_ort(model, feeds)["y"], via_ort) > 15  # still a 4-bit Conv of the same weight


def test_a_plan_without_the_axis_replays_to_the_same_bytes(conv, tmp_path):
    src, _ = conv
    _compile(src, tmp_path / "a.onnx", tmp_path, bits=4)
    doc = json.loads((tmp_path / "a.plan.json").read_text())
    del doc["tensors"]["W"]["block_axis"]  # as plans were saved before the field existed
    (tmp_path / "old.json").write_text(json.dumps(doc))
    _compile(src, tmp_path / "b.onnx", tmp_path, plan_path=tmp_path / "old.json")
    assert (tmp_path / "a.onnx").read_bytes() == (tmp_path / "b.onnx").read_bytes()
    assert (tmp_path / "a.plan.json").read_text() == (tmp_path / "b.plan.json").read_text()


@pytest.mark.parametrize(("entry", "message"), [
    ({"block_axis": 0}, "block_axis must be an integer >= 1"),
    ({"block_axis": True}, "block_axis must be an integer >= 1"),
    ({"block_axis": 2, "granularity": "channel"}, "block_axis is for block-wise uniform scales"),
    ({"block_axis": 3}, "block_axis 3 is not an input or kernel axis of its rank-3 Conv weight"),
])
def test_a_bad_block_axis_is_a_one_line_error(conv, tmp_path, entry, message):
    src, _ = conv
    plan = tmp_path / "p.json"
    plan.write_text(json.dumps({"schema": "q4c.plan/2", "tensors": {"W": {"bits": 4, "granularity": "block:32", **entry}}}))
    with pytest.raises(ConfigError, match=message) as e:
        _compile(src, tmp_path / "out.onnx", tmp_path, plan_path=plan)
    assert "\n" not in str(e.value) and not (tmp_path / "out.onnx").exists()


def test_a_block_axis_on_a_matmul_weight_is_refused(tmp_path, rng):
    src = tmp_path / "m.onnx"
    onnx.save(make_model([helper.make_node("MatMul", ["x", "W"], ["y"])],
                         [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 64])],
                         [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 16])], {"W": heavy_tailed(rng, (64, 16))}),
              src)
    plan = tmp_path / "p.json"
    PrecisionPlan.from_json({"schema": "q4c.plan/2", "tensors": {"W": {"bits": 4, "block_axis": 1}}}).save(plan)
    with pytest.raises(ConfigError, match="block_axis is for Conv weights; this one feeds MatMul"):
        _compile(src, tmp_path / "out.onnx", tmp_path, plan_path=plan, kernels="low-bit")
