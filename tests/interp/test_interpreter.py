"""The Interpreter's contract: outputs, kept intermediates, feeds, errors, and the op registry."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from q4c.errors import ConfigError, DataError, ModelLoadError, UnsupportedOpError
from q4c.interp import Interpreter, op, registered_ops, run_model
from q4c.interp.registry import REGISTRY, lookup

MODELS = Path(__file__).resolve().parents[2] / "models"


def chain_model(make_model):
    """y = relu(x @ w + b) with w, b initializers; b is also a graph input (overridable)."""
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["xw"]),
        helper.make_node("Add", ["xw", "b"], ["pre"]),
        helper.make_node("Relu", ["pre"], ["y"]),
    ]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, (2, 3)),
              helper.make_tensor_value_info("b", TensorProto.FLOAT, (4,))]
    inits = {"w": np.arange(12, dtype=np.float32).reshape(3, 4) / 10, "b": np.full(4, -0.5, np.float32)}
    return make_model(nodes, inputs, ["y"], inits)


def test_run_returns_only_graph_outputs(make_model, rng):
    x = rng.standard_normal((2, 3)).astype(np.float32)
    out = Interpreter(chain_model(make_model)).run({"x": x})
    assert list(out) == ["y"]
    w = np.arange(12, dtype=np.float32).reshape(3, 4) / 10
    np.testing.assert_allclose(out["y"], np.maximum(x @ w - 0.5, 0), rtol=1e-6)


def test_keep_true_returns_every_node_output(make_model, rng):
    out = Interpreter(chain_model(make_model)).run({"x": rng.standard_normal((2, 3)).astype(np.float32)}, keep=True)
    assert sorted(out) == ["pre", "xw", "y"]


def test_keep_names_returns_just_those(make_model, rng):
    out = Interpreter(chain_model(make_model)).run({"x": rng.standard_normal((2, 3)).astype(np.float32)},
                                                   keep=["xw"])
    assert sorted(out) == ["xw", "y"]


def test_keep_unknown_name_is_a_clear_error(make_model, rng):
    with pytest.raises(ConfigError, match="nope"):
        Interpreter(chain_model(make_model)).run({"x": np.zeros((2, 3), np.float32)}, keep=["nope"])


def test_feed_overrides_an_initializer_input(make_model):
    interp = Interpreter(chain_model(make_model))
    x = np.zeros((2, 3), np.float32)
    assert not interp.run({"x": x})["y"].any()  # b = -0.5 everywhere
    np.testing.assert_array_equal(interp.run({"x": x, "b": np.full(4, 2.0, np.float32)})["y"], np.full((2, 4), 2.0))


def test_missing_feed_names_the_input(make_model):
    with pytest.raises(DataError, match="'x'"):
        Interpreter(chain_model(make_model)).run({})


def test_wrong_feed_dtype_and_unknown_feed_are_data_errors(make_model):
    interp = Interpreter(chain_model(make_model))
    with pytest.raises(DataError, match="float64"):
        interp.run({"x": np.zeros((2, 3))})
    with pytest.raises(DataError, match="not a graph input"):
        interp.run({"x": np.zeros((2, 3), np.float32), "extra": np.zeros(1)})


def test_run_model_is_a_one_shot_interpreter(make_model):
    out = run_model(chain_model(make_model), {"x": np.ones((2, 3), np.float32)}, keep=["pre"])
    assert sorted(out) == ["pre", "y"]


def test_nodes_out_of_order_are_sorted(make_model, rng):
    model = chain_model(make_model)
    nodes = list(model.graph.node)
    del model.graph.node[:]
    model.graph.node.extend(reversed(nodes))
    x = rng.standard_normal((2, 3)).astype(np.float32)
    np.testing.assert_array_equal(Interpreter(model).run({"x": x})["y"],
                                  Interpreter(chain_model(make_model)).run({"x": x})["y"])


def test_undefined_tensor_is_a_load_error(make_model):
    node = helper.make_node("Relu", ["ghost"], ["y"])
    with pytest.raises(ModelLoadError, match="ghost"):
        Interpreter(make_model([node], [], ["y"]))


def test_unknown_op_names_domain_type_opset_and_known_versions(make_model):
    node = helper.make_node("Relu", ["x"], ["y"])
    model = make_model([node], [helper.make_tensor_value_info("x", TensorProto.FLOAT, (1,))], ["y"], opset=5)
    with pytest.raises(UnsupportedOpError, match=r"ai\.onnx::Relu at opset 5 .*known since-versions: 6"):
        Interpreter(model)
    weird = helper.make_node("Frobnicate", ["x"], ["y"], domain="acme")
    model = make_model([weird], [helper.make_tensor_value_info("x", TensorProto.FLOAT, (1,))], ["y"])
    model.opset_import.append(helper.make_opsetid("acme", 3))
    with pytest.raises(UnsupportedOpError, match=r"acme::Frobnicate at opset 3 .*known since-versions: none"):
        Interpreter(model)


def test_unsupported_attribute_is_refused_at_construction(make_model):
    node = helper.make_node("Relu", ["x"], ["y"], flavour=2)
    with pytest.raises(UnsupportedOpError, match="flavour"):
        Interpreter(make_model([node], [helper.make_tensor_value_info("x", TensorProto.FLOAT, (1,))], ["y"]))


def test_lookup_takes_the_highest_since_not_above_the_opset():
    assert lookup("", "Softmax", 12).__name__ == "softmax_1"
    assert lookup("", "Softmax", 13).__name__ == "softmax"
    assert lookup("ai.onnx", "Softmax", 22).__name__ == "softmax"
    assert lookup("com.microsoft", "MatMulNBits", 1).__name__ == "mat_mul_n_bits"


def test_duplicate_registration_is_refused():
    with pytest.raises(ValueError, match="already registered"):
        op("Relu", since=6)(lambda x: (x,))


def test_custom_op_registers_and_runs(make_model):
    @op("Double", since=1, domain="test.q4c")
    def double(x, *, factor: int = 2):
        return (x * factor,)

    try:
        node = helper.make_node("Double", ["x"], ["y"], domain="test.q4c", factor=3)
        model = make_model([node], [helper.make_tensor_value_info("x", TensorProto.FLOAT, (2,))], ["y"])
        model.opset_import.append(helper.make_opsetid("test.q4c", 1))
        assert run_model(model, {"x": np.array([1, 2], np.float32)})["y"].tolist() == [3, 6]
        assert registered_ops()[("test.q4c", "Double")] == (1,)
    finally:
        del REGISTRY[("test.q4c", "Double")]


def test_registered_ops_cover_the_issue_list():
    ops = registered_ops()
    for op_type in ["QuantizeLinear", "DequantizeLinear", "LSTM", "GRU", "If", "Loop", "Scan", "Conv",
                    "ConvTranspose", "Einsum", "LayerNormalization", "CumSum", "Trilu"]:
        assert ("", op_type) in ops
    for op_type in ["MatMulNBits", "GatherBlockQuantized", "DynamicQuantizeLSTM", "DynamicQuantizeMatMul",
                    "MatMulInteger"]:
        assert ("com.microsoft", op_type) in ops


def test_constant_nodes_are_folded_once(make_model):
    nodes = [helper.make_node("Constant", [], ["c"], value_floats=[1.0, 2.0]),
             helper.make_node("Add", ["x", "c"], ["y"])]
    model = make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, (2,))], ["y"])
    interp = Interpreter(model)
    assert interp.run({"x": np.zeros(2, np.float32)})["y"].tolist() == [1.0, 2.0]
    assert interp.run({"x": np.ones(2, np.float32)}, keep=True).keys() == {"c", "y"}  # still a node output


def test_error_inside_an_op_names_the_node(make_model):
    node = helper.make_node("MatMul", ["a", "b"], ["y"], name="bad_matmul")
    inputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("a", "b")]
    with pytest.raises(ValueError) as info:
        Interpreter(make_model([node], inputs, ["y"])).run({"a": np.ones((2, 3), np.float32),
                                                            "b": np.ones((4, 5), np.float32)})
    assert any("bad_matmul" in note for note in info.value.__notes__)


# Bundled FP32 models only: compiled *.q4.onnx artifacts may sit beside them, untracked.
@pytest.mark.parametrize("name", sorted(p.stem for p in MODELS.glob("*.onnx") if "." not in p.stem) or ["none"])
def test_bundled_models_agree_with_ort(run_ort, name):
    path = MODELS / f"{name}.onnx"
    if not path.exists() or not path.with_suffix(".npz").exists():
        pytest.skip("no bundled models with sample inputs")
    model = onnx.load(path)
    feeds = dict(np.load(path.with_suffix(".npz")))
    expected = run_ort(model, feeds)
    actual = Interpreter(model).run(feeds)
    for key, value in expected.items():
        np.testing.assert_allclose(actual[key], value, rtol=1e-4, atol=1e-5, err_msg=key)


def test_outputs_are_writeable_even_when_they_are_constants(make_model):
    nodes = [helper.make_node("Identity", ["w"], ["y"]), helper.make_node("Reshape", ["w", "shape"], ["z"])]
    inits = {"w": np.ones((2, 2), np.float32), "shape": np.array([4], np.int64)}
    out = run_model(make_model(nodes, [], ["y", "z"], inits), {})
    out["y"][0, 0] = 5.0
    out["z"][0] = 5.0
    assert out["y"].flags.writeable and out["z"].flags.writeable
