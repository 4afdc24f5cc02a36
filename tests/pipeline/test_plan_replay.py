"""The plan holds every decision: a saved plan replays to the same bytes and an equal plan file, and
a hand edit of a form is honoured or refused in one line."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import q4c
from q4c.config import CompileOptions
from q4c.errors import ConfigError
from q4c.testing import heavy_tailed, make_model, op_histogram, run_ort

H, I, T = 32, 16, 5


def _lstm_matmul_model(rng: np.random.Generator) -> onnx.ModelProto:
    """x [T, 1, I] -> LSTM (H) -> MatMul [H, 64]: a recurrent layer and a kernel-form MatMul."""
    nodes = [helper.make_node("LSTM", ["x", "W", "R", "B"], ["Y"], hidden_size=H),
             helper.make_node("Squeeze", ["Y", "axes"], ["h"]),
             helper.make_node("MatMul", ["h", "P"], ["y"])]
    inits = {"W": heavy_tailed(rng, (1, 4 * H, I)), "R": heavy_tailed(rng, (1, 4 * H, H)),
             "B": np.zeros((1, 8 * H), np.float32), "axes": np.array([1], np.int64), "P": heavy_tailed(rng, (H, 64))}
    return make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [T, 1, I])],
                      [helper.make_tensor_value_info("y", TensorProto.FLOAT, [T, 1, 64])], inits)


@pytest.fixture
def model_path(rng, tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save(_lstm_matmul_model(rng), path)
    return path


def _compile(src, out, options, **kw):
    return q4c.compile_file(src, out, options, verify=False, **kw)


@pytest.mark.parametrize("kernels", ["low-bit", "fp32-at-load"])
def test_a_saved_budgeted_plan_replays_to_the_same_bytes_and_plan(model_path, tmp_path, kernels):
    # the default budget with 2-bit candidates converts to opset 25 (INT2 storage): the plan says
    # so, and the replay converts to the same opset even if the plan holds no 2-bit weight
    base = CompileOptions(kernels=kernels, min_elements=0, workers=1)
    first = _compile(model_path, tmp_path / "a.onnx", base, save_plan=tmp_path / "p.json")
    plan = json.loads((tmp_path / "p.json").read_text())
    assert plan["opset"] == 25 and plan["schema"] == "q4c.plan/2"
    assert {t["form"] for t in plan["tensors"].values() if t["bits"] != 32} <= {
        "matmulnbits-acc4", "scan-matmulnbits", "dynamic-quantize-lstm", "fp32-at-load", "dequantize-linear"}
    again = _compile(model_path, tmp_path / "b.onnx", CompileOptions(kernels=kernels, plan_path=tmp_path / "p.json"),
                     save_plan=tmp_path / "p2.json")
    assert (tmp_path / "a.onnx").read_bytes() == (tmp_path / "b.onnx").read_bytes()
    assert json.loads((tmp_path / "p2.json").read_text()) == plan
    assert first["session_config"] == again["session_config"]


def test_a_hand_edited_form_is_honoured(model_path, tmp_path):
    _compile(model_path, tmp_path / "a.onnx", CompileOptions(bits=4, kernels="low-bit"), save_plan=tmp_path / "p.json")
    plan = json.loads((tmp_path / "p.json").read_text())
    assert plan["tensors"]["P"]["form"] == "matmulnbits-acc4" and plan["tensors"]["W"]["form"] == "scan-matmulnbits"
    assert "com.microsoft::MatMulNBits" in op_histogram(onnx.load(tmp_path / "a.onnx"))
    # fold the MatMul at load, keep the LSTM as an LSTM (both folded at load)
    for name in ("P", "W", "R"):
        plan["tensors"][name].update(form="fp32-at-load", chosen_for="user")
    (tmp_path / "edited.json").write_text(json.dumps(plan))
    report = _compile(model_path, tmp_path / "b.onnx", CompileOptions(plan_path=tmp_path / "edited.json"))
    out = onnx.load(tmp_path / "b.onnx")
    ops = op_histogram(out)
    assert "com.microsoft::MatMulNBits" not in ops and "Scan" not in ops and ops["LSTM"] == 1 and ops["MatMul"] == 1
    assert report["session_config"] == {"session.disable_quant_qdq": "1"}
    scale_types = {t.data_type for t in out.graph.initializer if t.name.endswith("_scale")}
    assert scale_types == {TensorProto.FLOAT16}  # folded at load: no kernel reads float32 scales
    x = np.random.default_rng(1).standard_normal((T, 1, I)).astype(np.float32)
    ref = run_ort(onnx.load(model_path), {"x": x})["y"]
    got = run_ort(out, {"x": x})["y"]
    assert q4c.testing.sqnr_db(ref, got) > 15


@pytest.mark.parametrize(("tensor", "edit", "reason"), [
    ("W", {"form": "dynamic-quantize-lstm"}, "takes LSTM weights planned at 8 bits"),
    ("W", {"form": "matmulnbits-acc4"}, "is not a form of LSTM layers"),
    ("P", {"form": "scan-matmulnbits"}, "is for LSTM/GRU/RNN weights"),
    ("P", {"form": "int8-activations"}, "needs --activations int8"),
    ("P", {"form": "warp-speed"}, "form must be one of"),
    ("P", {"chosen_for": "vibes"}, "chosen_for must be one of"),
    ("P", {"bits": 32}, r"a float \(bits 32\) weight has no lowering form"),
])
def test_a_hand_edit_that_cannot_be_honoured_is_refused_in_one_line(model_path, tmp_path, tensor, edit, reason):
    _compile(model_path, tmp_path / "a.onnx", CompileOptions(bits=4, kernels="low-bit"), save_plan=tmp_path / "p.json")
    plan = json.loads((tmp_path / "p.json").read_text())
    plan["tensors"][tensor].update(edit)
    (tmp_path / "edited.json").write_text(json.dumps(plan))
    with pytest.raises(ConfigError, match=reason) as err:
        _compile(model_path, tmp_path / "b.onnx", CompileOptions(plan_path=tmp_path / "edited.json"))
    assert "\n" not in str(err.value) and tensor in str(err.value)
    assert not (tmp_path / "b.onnx").exists()


def test_a_plan_of_schema_1_still_replays(model_path, tmp_path):
    # no forms, no opset: decided again as they were (4-bit only: opset 21)
    plan = {"schema": "q4c.plan/1", "defaults": {}, "tensors": {
        "P": {"bits": 4, "granularity": "block:32", "scheme": "symmetric"}}}
    (tmp_path / "p.json").write_text(json.dumps(plan))
    _compile(model_path, tmp_path / "b.onnx", CompileOptions(plan_path=tmp_path / "p.json", kernels="low-bit"),
             save_plan=tmp_path / "p2.json")
    saved = json.loads((tmp_path / "p2.json").read_text())
    assert saved["opset"] == 21 and saved["tensors"]["P"]["form"] == "matmulnbits-acc4"
    assert op_histogram(onnx.load(tmp_path / "b.onnx"))["com.microsoft::MatMulNBits"] == 1


def test_int8_activations_are_a_plan_decision_that_replays(model_path, tmp_path):
    options = CompileOptions(bits=4, kernels="low-bit", activations="int8", observer="minmax")
    first = _compile(model_path, tmp_path / "a.onnx", options, save_plan=tmp_path / "p.json")
    plan = json.loads((tmp_path / "p.json").read_text())
    assert plan["tensors"]["P"] == {"bits": 8, "granularity": "channel", "scheme": "symmetric",
                                    "form": "int8-activations", "chosen_for": "option"}
    assert next(p for p in first["passes"] if p["name"] == "choose-kernels")["stats"]["weights_to_int8"] == 1
    _compile(model_path, tmp_path / "b.onnx", dataclasses.replace(options, plan_path=tmp_path / "p.json"),
             save_plan=tmp_path / "p2.json")
    assert (tmp_path / "a.onnx").read_bytes() == (tmp_path / "b.onnx").read_bytes()
    assert json.loads((tmp_path / "p2.json").read_text()) == plan
    assert op_histogram(onnx.load(tmp_path / "b.onnx"))["QuantizeLinear"] == 1


def test_a_form_given_to_one_weight_of_a_layer_is_its_layers_form(model_path, tmp_path):
    # only W says fp32-at-load: R (form removed) follows it, the LSTM stays an LSTM
    _compile(model_path, tmp_path / "a.onnx", CompileOptions(bits=4, kernels="low-bit"), save_plan=tmp_path / "p.json")
    plan = json.loads((tmp_path / "p.json").read_text())
    plan["tensors"]["W"].update(form="fp32-at-load", chosen_for="user")
    del plan["tensors"]["R"]["form"], plan["tensors"]["R"]["chosen_for"]
    (tmp_path / "one.json").write_text(json.dumps(plan))
    _compile(model_path, tmp_path / "b.onnx", CompileOptions(plan_path=tmp_path / "one.json", kernels="low-bit"),
             save_plan=tmp_path / "p2.json")
    assert json.loads((tmp_path / "p2.json").read_text())["tensors"]["R"]["form"] == "fp32-at-load"
    assert op_histogram(onnx.load(tmp_path / "b.onnx"))["LSTM"] == 1
    # two forms for one layer: refused
    plan["tensors"]["R"].update(form="scan-matmulnbits", chosen_for="user")
    (tmp_path / "two.json").write_text(json.dumps(plan))
    with pytest.raises(ConfigError, match="a layer has one form"):
        _compile(model_path, tmp_path / "c.onnx", CompileOptions(plan_path=tmp_path / "two.json"))


def test_hand_edited_bits_granularity_and_scheme_are_honoured(model_path, tmp_path):
    _compile(model_path, tmp_path / "a.onnx", CompileOptions(bits=4, kernels="low-bit"), save_plan=tmp_path / "p.json")
    plan = json.loads((tmp_path / "p.json").read_text())
    plan["tensors"]["P"].update(bits=8, granularity="block:16", scheme="symmetric-absmax")
    (tmp_path / "edited.json").write_text(json.dumps(plan))
    report = _compile(model_path, tmp_path / "b.onnx", CompileOptions(plan_path=tmp_path / "edited.json"))
    entry = next(t for t in report["tensors"] if t["name"] == "P")
    assert (entry["bits"], entry["granularity"], entry["scheme"]) == (8, "block:16", "symmetric-absmax")
    (mm,) = [n for n in onnx.load(tmp_path / "b.onnx").graph.node if n.op_type == "MatMulNBits"
             and any(i.startswith("P") for i in n.input)]
    attrs = {a.name: a.i for a in mm.attribute}
    assert (attrs["bits"], attrs["block_size"], attrs["K"], attrs["N"]) == (8, 16, H, 64)


def test_a_replayed_plan_keeps_its_forms_over_an_explicit_kernels_option_and_says_so(model_path, tmp_path):
    _compile(model_path, tmp_path / "a.onnx", CompileOptions(bits=4, kernels="low-bit"), save_plan=tmp_path / "p.json")
    report = _compile(model_path, tmp_path / "b.onnx",
                      CompileOptions(plan_path=tmp_path / "p.json", kernels="fp32-at-load"))
    assert (tmp_path / "a.onnx").read_bytes() == (tmp_path / "b.onnx").read_bytes()
    said = "--plan: 3 weight(s) keep the plan's form over --kernels fp32-at-load"
    assert any(w.startswith(said) for w in report["warnings"])
