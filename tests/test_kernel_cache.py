"""--kernels auto decides once per machine, model and input shape (q4c.kernel_cache), so the same
compile on the same machine writes the same bytes."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

import q4c
from q4c import kernel_cache
from q4c.testing import matmul_model


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # Path.home() reads HOME: keep the real cache untouched
    return tmp_path / "home"


def test_key_is_stable_and_changes_with_its_parts_and_input_shape():
    feeds = {"x": np.zeros((4, 64), np.float32)}
    a, b = {"graph": "aa", "plan": {"W": {"bits": 4}}}, {"graph": "aa", "plan": {"W": {"bits": 3}}}
    assert kernel_cache.key(a, feeds) == kernel_cache.key(dict(a), dict(feeds))
    assert kernel_cache.key(a, feeds) != kernel_cache.key(b, feeds)
    assert kernel_cache.key(a, feeds) != kernel_cache.key({**a, "graph": "ab"}, feeds)
    assert kernel_cache.key(a, feeds) != kernel_cache.key(a, {"x": np.zeros((8, 64), np.float32)})


def test_record_and_lookup_round_trip_and_survive_a_corrupt_file(home):
    path = kernel_cache.cache_path()
    assert path.is_relative_to(home) and kernel_cache.lookup("k") is None
    assert kernel_cache.record("k", {"chosen": "low-bit", "runs": 5})
    assert kernel_cache.lookup("k") == {"chosen": "low-bit", "runs": 5}
    path.write_text("{not json")
    assert kernel_cache.lookup("k") is None
    assert kernel_cache.record("k2", {"chosen": "fp32-at-load"}) and kernel_cache.lookup("k2")["chosen"] == "fp32-at-load"
    assert kernel_cache.lookup("bogus") is None


def _compile(src, out):
    return q4c.compile_file(src, out, q4c.CompileOptions(bits=4), verify=False)


def test_second_compile_reuses_the_decision_and_writes_the_same_bytes(home, tmp_path, rng):
    src = tmp_path / "m.onnx"
    onnx.save(matmul_model(rng, m=4, k=256, n=64), src)
    first = _compile(src, tmp_path / "a.onnx")["kernel_choice"]
    second = _compile(src, tmp_path / "b.onnx")["kernel_choice"]
    assert first["source"] == "measured" and first["cached"]
    assert second["source"] == "cache" and second["chosen"] == first["chosen"]
    assert (tmp_path / "a.onnx").read_bytes() == (tmp_path / "b.onnx").read_bytes()


def test_a_cached_decision_is_obeyed_not_remeasured(home, tmp_path, rng):
    src = tmp_path / "m.onnx"
    onnx.save(matmul_model(rng, m=4, k=256, n=64), src)
    first = _compile(src, tmp_path / "a.onnx")["kernel_choice"]
    doc = json.loads(kernel_cache.cache_path().read_text())
    flipped = "fp32-at-load" if first["chosen"] == "low-bit" else "low-bit"
    doc[first["cache_key"]]["chosen"] = flipped  # plant the other decision
    kernel_cache.cache_path().write_text(json.dumps(doc))
    report = _compile(src, tmp_path / "b.onnx")
    assert report["kernel_choice"]["chosen"] == flipped and report["kernel_choice"]["source"] == "cache"
    ops = {n.op_type for n in onnx.load(tmp_path / "b.onnx").graph.node}
    assert ("MatMulNBits" in ops) == (flipped == "low-bit")


def _counting(monkeypatch):
    """Count the copies --kernels auto builds (each one quantizes every weight)."""
    from q4c.passes import choose_kernels

    calls = []
    real = choose_kernels.materialise_copy

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(choose_kernels, "materialise_copy", counted)
    return calls


class _LowBitFaster:
    """What q4c.timing.interleaved returns, with MatMulNBits planted twice as fast (so the plan
    keeps its granularity: folding would halve the auto block)."""

    rounds = 5

    def median(self, key: str) -> float:
        return {"low-bit": 0.5e-3, "fp32-at-load": 1e-3}[key]


def test_a_warm_cache_builds_no_copy_and_a_changed_plan_misses(home, tmp_path, rng, monkeypatch):
    from q4c.passes import choose_kernels

    monkeypatch.setattr(choose_kernels, "interleaved", lambda *a, **k: _LowBitFaster())
    src = tmp_path / "m.onnx"
    onnx.save(matmul_model(rng, m=4, k=256, n=64), src)
    built = _counting(monkeypatch)
    first = q4c.compile_file(src, tmp_path / "a.onnx", q4c.CompileOptions(bits=4), verify=False,
                             save_plan=tmp_path / "p.json")["kernel_choice"]
    assert first["source"] == "measured" and first["chosen"] == "low-bit" and len(built) == 2  # the two timed forms
    built.clear()
    second = _compile(src, tmp_path / "b.onnx")["kernel_choice"]
    assert second["source"] == "cache" and second["cache_key"] == first["cache_key"] and built == []
    assert (tmp_path / "a.onnx").read_bytes() == (tmp_path / "b.onnx").read_bytes()
    # the same plan without its forms (decided again, to the same ones) and with other defaults
    # (how it was chosen: no pass reads them) hits; other bits miss
    doc = json.loads((tmp_path / "p.json").read_text())
    for entry in doc["tensors"].values():
        entry.pop("form", None), entry.pop("chosen_for", None)
    doc["defaults"] = {"mode": "edited by hand"}
    (tmp_path / "same.json").write_text(json.dumps(doc))
    same = q4c.compile_file(src, tmp_path / "c.onnx", q4c.CompileOptions(plan_path=tmp_path / "same.json"),
                            verify=False)["kernel_choice"]
    assert same["source"] == "cache" and same["cache_key"] == first["cache_key"] and built == []
    [name] = doc["tensors"]
    doc["tensors"][name]["bits"] = 8
    (tmp_path / "other.json").write_text(json.dumps(doc))
    other = q4c.compile_file(src, tmp_path / "d.onnx", q4c.CompileOptions(plan_path=tmp_path / "other.json"),
                             verify=False)["kernel_choice"]
    assert other["source"] == "measured" and other["cache_key"] != first["cache_key"] and len(built) == 2


def test_a_changed_input_shape_misses(home, tmp_path, rng, monkeypatch):
    src = tmp_path / "m.onnx"
    model = matmul_model(rng, m=4, k=256, n=64)
    for value in (model.graph.input[0], model.graph.output[0]):
        value.type.tensor_type.shape.dim[0].dim_param = "rows"  # any number of rows
    onnx.save(model, src)
    for rows, name in ((4, "a"), (16, "b")):
        np.savez(tmp_path / f"{name}.npz", x=rng.standard_normal((rows, 256)).astype(np.float32))
    built = _counting(monkeypatch)
    first = q4c.compile_file(src, tmp_path / "a.onnx", q4c.CompileOptions(bits=4), data=tmp_path / "a.npz",
                             verify=False)["kernel_choice"]
    other = q4c.compile_file(src, tmp_path / "b.onnx", q4c.CompileOptions(bits=4), data=tmp_path / "b.npz",
                             verify=False)["kernel_choice"]
    assert first["source"] == other["source"] == "measured" and first["cache_key"] != other["cache_key"]
    assert len(built) == 4


def _if_model(branch_value: float, alpha: float) -> onnx.ModelProto:
    """Gemm(x, W, alpha) then an If whose branches add a constant: values, attributes, subgraphs."""
    from onnx import TensorProto, helper, numpy_helper

    def branch(name, value):
        c = helper.make_node("Constant", [], [f"{name}_c"], value=numpy_helper.from_array(np.full((1,), value, np.float32)))
        add = helper.make_node("Add", ["y", f"{name}_c"], [f"{name}_out"])
        return helper.make_graph([c, add], name, [], [helper.make_tensor_value_info(f"{name}_out", TensorProto.FLOAT, [4, 16])])

    w = numpy_helper.from_array(np.arange(64 * 16, dtype=np.float32).reshape(64, 16) / 1e3, "W")
    nodes = [helper.make_node("Gemm", ["x", "W"], ["y"], alpha=alpha),
             helper.make_node("If", ["flag"], ["z"], then_branch=branch("then", branch_value), else_branch=branch("else", 0.0))]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 64]),
                                           helper.make_tensor_value_info("flag", TensorProto.BOOL, [])],
                              [helper.make_tensor_value_info("z", TensorProto.FLOAT, [4, 16])], [w])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)


def test_the_graph_digest_sees_weights_attributes_and_subgraphs(rng):
    from q4c import graph as g
    from q4c.passes.choose_kernels import graph_digest

    base = graph_digest(g.import_graph(_if_model(1.0, 1.0)))
    assert graph_digest(g.import_graph(_if_model(1.0, 1.0))) == base  # a fresh import of the same model
    assert graph_digest(g.import_graph(_if_model(2.0, 1.0))) != base  # a constant inside a branch
    assert graph_digest(g.import_graph(_if_model(1.0, 0.5))) != base  # an attribute
    other = _if_model(1.0, 1.0)
    other.graph.initializer[0].raw_data = np.ones((64, 16), np.float32).tobytes()
    assert graph_digest(g.import_graph(other)) != base  # a weight's values
