import os

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from q4c import graph as g
from q4c.errors import ConfigError, ModelLoadError
from q4c.testing import make_model, run_ort


def _reduce_mean_model(opset):
    return make_model(
        [helper.make_node("ReduceMean", ["x"], ["y"], axes=[1], keepdims=0)],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
        opset=opset,
    )


def test_load_rejects_a_missing_file(tmp_path):
    with pytest.raises(ModelLoadError, match="no such file"):
        g.load(tmp_path / "nope.onnx")


def test_load_rejects_a_directory(tmp_path):
    with pytest.raises(ModelLoadError, match="not a file"):
        g.load(tmp_path)


def test_load_rejects_text_that_is_not_onnx(tmp_path):
    path = tmp_path / "x.onnx"
    path.write_text("hello, I am not a model\n")
    with pytest.raises(ModelLoadError, match="not"):
        g.load(path)


def test_load_rejects_a_truncated_model(tmp_path, rng):
    path = tmp_path / "t.onnx"
    data = _reduce_mean_model(13).SerializeToString()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelLoadError):
        g.load(path)


def test_load_rejects_opset_older_than_11(tmp_path):
    model = make_model([helper.make_node("Relu", ["x"], ["y"])],
                       [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                       [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])], opset=9)
    path = tmp_path / "old.onnx"
    onnx.save(model, path)
    with pytest.raises(ModelLoadError, match="opset 9 < minimum 11"):
        g.load(path)


def test_convert_opset_rewrites_reduce_mean_axes_into_an_input():
    # ReduceMean moved `axes` from attribute to input at opset 18: bumping opset_import alone
    # would leave a graph ONNX Runtime refuses.
    converted = g.convert_opset(_reduce_mean_model(13), 21)
    node = converted.graph.node[-1]
    assert g.default_opset(converted) == 21
    assert node.op_type == "ReduceMean" and len(node.input) == 2 and not node.attribute[1:]
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    np.testing.assert_allclose(run_ort(converted, {"x": x})["y"], x.mean(axis=1))


def test_save_is_atomic_and_leaves_no_temp_file(tmp_path):
    path = tmp_path / "m.onnx"
    path.write_bytes(b"old")
    g.save(_reduce_mean_model(21), path)
    assert onnx.load(path).graph.node[0].op_type == "ReduceMean"
    assert sorted(os.listdir(tmp_path)) == ["m.onnx"]


def test_save_failure_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "m.onnx"
    path.write_bytes(b"old")

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(ConfigError, match="disk full"):  # one line for the user, not a bare OSError
        g.save(_reduce_mean_model(21), path)
    assert path.read_bytes() == b"old"
    assert sorted(os.listdir(tmp_path)) == ["m.onnx"]


def test_unique_name_avoids_names_in_subgraphs():
    then_graph = helper.make_graph([helper.make_node("Identity", ["x"], ["w_int4"])], "then", [],
                                   [helper.make_tensor_value_info("w_int4", TensorProto.FLOAT, [2])])
    model = make_model(
        [helper.make_node("If", ["c"], ["y"], then_branch=then_graph, else_branch=then_graph)],
        [helper.make_tensor_value_info("c", TensorProto.BOOL, []), helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
    )
    graph = g.import_graph(model)
    assert g.unique_name(graph, "w_int4") == "w_int4_1"
    assert g.op_histogram(graph) == {"Identity": 2, "If": 1}


def test_saved_model_gets_umask_permissions_not_owner_only(tmp_path):
    model = onnx.helper.make_model(onnx.helper.make_graph([], "g", [], []))
    old = os.umask(0o022)
    try:
        g.save(model, tmp_path / "m.onnx")
    finally:
        os.umask(old)
    assert (tmp_path / "m.onnx").stat().st_mode & 0o777 == 0o644
    assert [p.name for p in tmp_path.iterdir()] == ["m.onnx"]  # no temporary left behind


def _if_model_sharing_a_weight(w: np.ndarray) -> onnx.ModelProto:
    """y = x @ W in both branches of an If: the export holds W once per branch, as real
    exports that switch on batch size or sample rate do."""
    def branch(name: str, scale: float) -> onnx.GraphProto:
        return helper.make_graph(
            [helper.make_node("MatMul", ["x", "W"], [f"{name}_mm"]),
             helper.make_node("Mul", [f"{name}_mm", f"{name}_s"], [f"{name}_y"])],
            name, [], [helper.make_tensor_value_info(f"{name}_y", TensorProto.FLOAT, [2, 64])],
            [onnx.numpy_helper.from_array(w, "W"), onnx.numpy_helper.from_array(np.float32(scale), f"{name}_s")])
    node = helper.make_node("If", ["c"], ["y"], then_branch=branch("then", 1.0), else_branch=branch("else", 2.0))
    return make_model([node], [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 64]),
                               helper.make_tensor_value_info("c", TensorProto.BOOL, [])],
                      [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 64])], opset=21)


def test_export_stores_a_weight_shared_by_if_branches_once(rng):
    w = rng.standard_normal((64, 64)).astype(np.float32)
    model = _if_model_sharing_a_weight(w)
    exported = g.export_model(g.import_graph(model), like=model)

    holders = [sub.name for sub in g.iter_graph_protos(exported.graph) if any(t.name == "W" for t in sub.initializer)]
    assert holders == [exported.graph.name]  # hoisted to the main graph, gone from both branches
    onnx.checker.check_model(exported, full_check=True)
    x = rng.standard_normal((2, 64)).astype(np.float32)
    for c, scale in ((True, 1.0), (False, 2.0)):
        got = run_ort(exported, {"x": x, "c": np.array(c)})["y"]
        np.testing.assert_allclose(got, scale * (x @ w), rtol=1e-5, atol=1e-5)


def test_export_keeps_same_named_initializers_that_differ(rng):
    model = _if_model_sharing_a_weight(rng.standard_normal((64, 64)).astype(np.float32))
    else_w = model.graph.node[0].attribute[1].g.initializer[0]
    else_w.CopyFrom(onnx.numpy_helper.from_array(np.zeros((64, 64), np.float32), "W"))
    assert g.hoist_shared_initializers(model) == 0
    assert all(any(t.name == "W" for t in a.g.initializer) for a in model.graph.node[0].attribute)
