"""Regression tests for crashes the fuzz runs found: each builds the smallest input that hit
the bug and asserts the one-line error (or the correct result) the CLI now gives."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from harness import invoke
from onnx import helper, numpy_helper
from test_mutations import tiny_model

from q4c.errors import ModelLoadError
from q4c.interp import Interpreter
from q4c.metrics import sqnr_db
from q4c.ort import session_config
from q4c.testing import run_ort


def _matmul_model() -> onnx.ModelProto:
    w = np.random.default_rng(0).standard_normal((64, 32)).astype(np.float32)
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["y"])], "mm",
                              [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 64])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2, 32])],
                              [numpy_helper.from_array(w, "W")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)


def test_input_with_undefined_element_type_is_a_load_error(tmp_path):
    """inspect crashed with KeyError: 0 in readers._spec (graph input elem_type UNDEFINED)."""
    model = _matmul_model()
    model.graph.input[0].type.tensor_type.elem_type = 0
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    result = invoke(["inspect", str(path)])
    assert result.exit_code == 1
    assert "'x' has element type 0" in result.error



def test_checker_message_spanning_lines_is_one_line(tmp_path):
    """A node dropped: the checker's message continues after 'of node:' on new lines; the error
    line used to stop at 'of node: ' and lose which node."""
    model = _matmul_model()
    model.graph.node.insert(0, helper.make_node("Relu", ["x"], ["r"], name="first"))
    model.graph.node[1].input[0] = "r"
    del model.graph.node[0]
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    result = invoke(["inspect", str(path)])
    assert result.exit_code == 1
    assert "OpType: MatMul" in result.error and "topologically sorted" in result.error



def test_session_config_metadata_not_utf8_is_a_load_error(tmp_path):
    """diff/run crashed with UnicodeDecodeError on a damaged q4c.ort_session_config value."""
    model = _matmul_model()
    prop = model.metadata_props.add()
    prop.key = "q4c.ort_session_config"
    prop.value = "{}"
    data = model.SerializeToString().replace(b'\x02{}', b'\x02\x91}')
    path = tmp_path / "m.onnx"
    path.write_bytes(data)
    np.savez(tmp_path / "x.npz", x=np.ones((2, 64), np.float32))
    result = invoke(["run", str(path), "--data", str(tmp_path / "x.npz")])
    assert result.exit_code == 1
    assert "not valid UTF-8" in result.error  # since the load-time string check; before it, ort.py's
    with pytest.raises(ModelLoadError, match="q4c.ort_session_config is not a JSON object"):
        session_config(onnx.ModelProto.FromString(data))


def test_empty_npz_is_a_data_error(tmp_path):
    """run --data on a 0-byte file crashed with EOFError inside np.load."""
    model_path, data = tmp_path / "m.onnx", tmp_path / "x.npz"
    onnx.save(_matmul_model(), model_path)
    data.write_bytes(b"")
    result = invoke(["run", str(model_path), "--data", str(data)])
    assert result.exit_code == 1
    assert "not a readable .npz file" in result.error


def _plan(tmp_path, doc) -> list[str]:
    model_path, plan = tmp_path / "m.onnx", tmp_path / "plan.json"
    onnx.save(_matmul_model(), model_path)
    plan.write_bytes(doc if isinstance(doc, bytes) else json.dumps(doc).encode())
    return ["compile", str(model_path), "-o", str(tmp_path / "out.onnx"), "--plan", str(plan)]


GOOD_PLAN = {"schema": "q4c.plan/1", "defaults": {"bits": 4}, "tensors": {"W": {"bits": 4, "granularity": "block:32",
                                                                               "scheme": "symmetric"}}}


def test_plan_not_utf8_is_a_config_error(tmp_path):
    result = invoke(_plan(tmp_path, b'{"schema": "q4c.plan/1", \x91}'))
    assert result.exit_code == 1 and "cannot read plan" in result.error
    assert not (tmp_path / "out.onnx").exists()


def test_plan_defaults_not_an_object_is_a_config_error(tmp_path):
    result = invoke(_plan(tmp_path, {**GOOD_PLAN, "defaults": 1.5}))
    assert result.exit_code == 1 and "'defaults' must be an object" in result.error


def test_plan_granularity_not_a_string_is_a_config_error(tmp_path):
    """A number or null granularity crashed Granularity.parse with AttributeError."""
    for value in (0, None, -1e308):
        doc = json.loads(json.dumps(GOOD_PLAN))
        doc["tensors"]["W"]["granularity"] = value
        result = invoke(_plan(tmp_path, doc))
        assert result.exit_code == 1 and "granularity and scheme must be strings" in result.error


def test_plan_bits_not_an_integer_is_a_config_error(tmp_path):
    for value in (4.0, "4", True):
        doc = json.loads(json.dumps(GOOD_PLAN))
        doc["tensors"]["W"]["bits"] = value
        result = invoke(_plan(tmp_path, doc))
        assert result.exit_code == 1 and "bits must be an integer" in result.error


def test_good_plan_still_replays(tmp_path):
    result = invoke(_plan(tmp_path, GOOD_PLAN))
    assert result.exit_code == 0, result.stderr
    assert (tmp_path / "out.onnx").exists()


def test_calibration_table_not_utf8_is_a_config_error(tmp_path):
    """--load-calib on non-UTF-8 bytes crashed inside the calibrate pass (PassError)."""
    model_path, table = tmp_path / "m.onnx", tmp_path / "calib.json"
    onnx.save(_matmul_model(), model_path)
    table.write_bytes(b'{"schema": "q4c.calib/1", "tensors": {\xa0}}')
    result = invoke(["compile", str(model_path), "-o", str(tmp_path / "out.onnx"), "--bits", "8", "--load-calib",
                     str(table)])
    assert result.exit_code == 1 and "cannot read calibration table" in result.error


def test_input_shape_contradicting_the_output_is_a_load_error(tmp_path):
    """Input declared [-1, 64] with the output declared [2, 32]: the compiled model failed the
    full checker's strict shape inference and the InferenceError escaped as an internal error.
    The input is at fault (q4c keeps declared shapes), so the error says so."""
    model = _matmul_model()
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_value = -1
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    result = invoke(["compile", str(path), "-o", str(tmp_path / "out.onnx"), "--bits", "4"])
    assert result.exit_code == 1
    assert "fails the full ONNX checker" in result.error
    assert not (tmp_path / "out.onnx").exists()


def test_initializer_data_not_matching_its_dims_is_a_load_error(tmp_path):
    """A flipped data_type (INT64 -> FLOAT) left 16 bytes under dims [2]: to_array raised a bare
    'cannot reshape array' ValueError inside the non-finite weight check."""
    model = _matmul_model()
    shape = numpy_helper.from_array(np.array([2, 64], np.int64), "shape")
    shape.data_type = onnx.TensorProto.INT32
    model.graph.initializer.append(shape)
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    for command in (["inspect", str(path)], ["compile", str(path), "-o", str(tmp_path / "out.onnx")]):
        result = invoke(command)
        assert result.exit_code == 1
        assert "initializer 'shape' declares INT32[2] (8 bytes) but holds 16" in result.error


def test_string_field_not_utf8_is_a_load_error(tmp_path):
    """A node name with a non-UTF-8 byte: onnx's checker raised UnicodeDecodeError."""
    model = _matmul_model()
    model.graph.node[0].name = "mm_node"
    path = tmp_path / "m.onnx"
    path.write_bytes(model.SerializeToString().replace(b"mm_node", b"mm\xefnode"))
    result = invoke(["diff", str(path), str(path), "--data", str(tmp_path / "none.npz")])
    assert result.exit_code in (1, 2)
    result = invoke(["inspect", str(path)])
    assert result.exit_code == 1 and "not valid UTF-8" in result.error


def test_axis_attribute_out_of_range_is_a_model_error(tmp_path):
    """Softmax axis=2**40 passes onnx's full checker; the interpreter died in np.max with
    'integer won't fit into a C int' (compile, run --backend interp)."""
    model = _matmul_model()
    model.graph.node.append(helper.make_node("Softmax", ["y"], ["p"], axis=2**40, name="sm"))
    model.graph.output[0].name = "p"
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    np.savez(tmp_path / "x.npz", x=np.ones((2, 64), np.float32))
    for command in (["compile", str(path), "-o", str(tmp_path / "out.onnx"), "--bits", "4"],
                    ["run", str(path), "--data", str(tmp_path / "x.npz"), "--backend", "interp"]):
        result = invoke(command)
        assert result.exit_code == 1
        assert "node 'sm' (Softmax): axis=1099511627776 is out of range" in result.error
    model.graph.node[-1].attribute[0].i = 5  # plainly out of range for rank 2: numpy's AxisError
    # (the CLI's strict shape inference refuses this one first; the interpreter alone must too)
    with pytest.raises(ModelLoadError, match="axis=5 is out of range"):
        Interpreter(model).run({"x": np.ones((2, 64), np.float32)})


def test_recurrent_hidden_size_disagreeing_with_weights_is_a_model_error(tmp_path):
    """LSTM hidden_size=2 with W [1, 64, 16] (H=16): the interpreter failed in a numpy
    broadcast ('operands could not be broadcast together')."""
    rng = np.random.default_rng(0)
    w, r = rng.standard_normal((1, 64, 16)).astype(np.float32), rng.standard_normal((1, 64, 16)).astype(np.float32)
    graph = helper.make_graph([helper.make_node("LSTM", ["x", "W", "R"], ["y"], hidden_size=2, name="lstm")], "l",
                              [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [3, 1, 16])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(w, "W"), numpy_helper.from_array(r, "R")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)
    model.graph.output[0].type.tensor_type.shape.SetInParent()
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    np.savez(tmp_path / "x.npz", x=np.ones((3, 1, 16), np.float32))
    result = invoke(["run", str(path), "--data", str(tmp_path / "x.npz"), "--backend", "interp"])
    assert result.exit_code == 1  # since run checks shapes first: strict inference refuses it
    with pytest.raises(ModelLoadError, match=r"node 'lstm' \(LSTM\): W is \[1, 64, 16\] but hidden_size=2"):
        Interpreter(model).run({"x": np.ones((3, 1, 16), np.float32)})


def test_unwritable_side_files_fail_before_the_output_is_written(tmp_path):
    """--save-plan / --report / --save-calib / --dump-dir / -o under a path that is a file: was an
    internal FileNotFoundError, and for --save-plan and --report only after the output had been
    written (an output left by a failed run)."""
    model_path, blocker = tmp_path / "m.onnx", tmp_path / "blocker"
    onnx.save(_matmul_model(), model_path)
    blocker.write_text("a file, not a directory")
    out = tmp_path / "out.onnx"
    for option in ("--save-plan", "--report", "--save-calib", "--dump-dir", "-o"):
        target = blocker / "sub" / ("d" if option == "--dump-dir" else "x.json")
        args = ["compile", str(model_path), "--bits", "4", option, str(target)]
        if option != "-o":
            args += ["-o", str(out)]
        result = invoke(args)
        assert result.exit_code == 1, (option, result.stderr)
        assert f"{option} {target}: cannot write there" in result.error
        assert sorted(p.name for p in tmp_path.iterdir()) == ["blocker", "m.onnx"], option


def test_run_output_unwritable_is_one_line(tmp_path):
    model_path = tmp_path / "m.onnx"
    onnx.save(_matmul_model(), model_path)
    np.savez(tmp_path / "x.npz", x=np.ones((2, 64), np.float32))
    (tmp_path / "blocker").write_text("")
    result = invoke(["run", str(model_path), "--data", str(tmp_path / "x.npz"), "-o", str(tmp_path / "blocker" / "y.npz")])
    assert result.exit_code == 1 and "cannot write" in result.error


def test_weight_beyond_float16_range_dequantizes_finite(tmp_path):
    """A 1e6 weight (the mutation fuzzer's 1e38 first): float16 scales made its DequantizeLinear
    output inf, so the compiled model gave NaN/inf where FP32 was finite (a quality warning,
    exit 0). Such weights now get float32 scales."""
    model = _matmul_model()
    w = numpy_helper.to_array(model.graph.initializer[0]).copy()
    w[3, 4] = 1e6
    model.graph.initializer[0].CopyFrom(numpy_helper.from_array(w, "W"))
    path, out = tmp_path / "m.onnx", tmp_path / "out.onnx"
    onnx.save(model, path)
    x = np.random.default_rng(1).standard_normal((2, 64)).astype(np.float32)
    want = x @ w
    for option in (("--kernels", "fp32-at-load"), ("--bits", "8", "--granularity", "channel"), ("--bits", "4")):
        result = invoke(["compile", str(path), "-o", str(out), *option])
        assert result.exit_code == 0, result.stderr
        assert "NaN/inf" not in result.stderr, option
        got = run_ort(onnx.load(out), {"x": x})["y"]
        assert np.all(np.isfinite(got)), option
        assert sqnr_db(want, got) > 40, option  # the outlier dominates: measured 100+ dB


def test_low_bit_kernels_compile(tmp_path):
    """--kernels low-bit quantizes slots whose node was rewritten by then: the float16-range
    check (above) read slot.tensor there and raised IndexError; it now measures the values
    being quantized."""
    path, out = tmp_path / "m.onnx", tmp_path / "out.onnx"
    onnx.save(tiny_model(), path)  # MatMul + LSTM: the LSTM slot is the one that failed
    result = invoke(["compile", str(path), "-o", str(out), "--kernels", "low-bit"])
    assert result.exit_code == 0, result.stderr
    assert any(n.op_type == "MatMulNBits" for n in onnx.load(out).graph.node)


def test_calibration_table_with_wrong_field_types_is_a_config_error(tmp_path):
    """'calls': [1, 2] or 'block:-32' crashed inside the calibrate pass (int() on them)."""
    model_path, table = tmp_path / "m.onnx", tmp_path / "calib.json"
    onnx.save(_matmul_model(), model_path)
    for field, value in (("calls", [1, 2]), ("samples", "block:-32"), ("state_pairs", [1, 2])):
        doc = {"schema": "q4c.calib/1", "observer": "minmax", "tensors": {}, field: value}
        table.write_text(json.dumps(doc))
        result = invoke(["compile", str(model_path), "-o", str(tmp_path / "out.onnx"), "--bits", "8",
                         "--activations", "int8", "--load-calib", str(table)])
        assert result.exit_code == 1, field
        assert "'samples' and 'calls' must be integers" in result.error, field


def test_npz_with_unknown_compression_method_is_a_data_error(tmp_path):
    """zipfile raises NotImplementedError for a compression method it does not know."""
    model_path, data = tmp_path / "m.onnx", tmp_path / "x.npz"
    onnx.save(_matmul_model(), model_path)
    np.savez(data, x=np.ones((2, 64), np.float32))
    raw = bytearray(data.read_bytes())
    for signature, offset in ((b"PK\x03\x04", 8), (b"PK\x01\x02", 10)):  # local and central headers
        at = raw.find(signature)
        raw[at + offset:at + offset + 2] = (99).to_bytes(2, "little")
    data.write_bytes(bytes(raw))
    result = invoke(["run", str(model_path), "--data", str(data)])
    assert result.exit_code == 1 and "not a readable .npz file" in result.error


def test_interpreter_refuses_a_shape_contradicting_graph(tmp_path):
    """MatMul reading the input twice (x [2, 64] @ x): run --backend interp died in numpy's
    matmul; the graph fails strict shape inference, which run/diff now check first."""
    model = _matmul_model()
    model.graph.node[0].input[1] = "x"
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    np.savez(tmp_path / "x.npz", x=np.ones((2, 64), np.float32))
    result = invoke(["run", str(path), "--data", str(tmp_path / "x.npz"), "--backend", "interp"])
    assert result.exit_code == 1 and "fails the full ONNX checker" in result.error
    result = invoke(["diff", str(path), str(path), "--data", str(tmp_path / "x.npz"), "--backend", "interp"])
    assert result.exit_code == 1 and "fails the full ONNX checker" in result.error


def test_bytes_python_protobuf_reads_but_the_checker_cannot_parse(tmp_path):
    """One flipped bit near the end of a model (fuzz_long seed 14): Python's protobuf parsed it,
    the checker's C++ parse raised ValueError('Unable to parse proto')."""
    data = bytearray(tiny_model().SerializeToString())
    data[25424] = 11
    path = tmp_path / "m.onnx"
    path.write_bytes(bytes(data))
    result = invoke(["inspect", str(path)])
    assert result.exit_code == 1 and "invalid ONNX model: Unable to parse proto" in result.error


def test_npz_flagged_encrypted_is_a_data_error(tmp_path):
    """A flipped zip flag bit marks the entry encrypted: zipfile raised RuntimeError."""
    model_path, data = tmp_path / "m.onnx", tmp_path / "x.npz"
    onnx.save(_matmul_model(), model_path)
    np.savez(data, x=np.ones((2, 64), np.float32))
    raw = bytearray(data.read_bytes())
    for signature, offset in ((b"PK\x03\x04", 6), (b"PK\x01\x02", 8)):  # general purpose flags, bit 0
        at = raw.find(signature)
        raw[at + offset] |= 1
    data.write_bytes(bytes(raw))
    result = invoke(["run", str(model_path), "--data", str(data)])
    assert result.exit_code == 1 and "not a readable .npz file" in result.error
