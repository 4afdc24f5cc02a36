"""compile --system --save-plan, then --plan: the system plan keeps every graph's forms and
opset, so the replay writes the same graphs and the same plan file (q4c.system_plan)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from q4c.config import CompileOptions
from q4c.errors import ConfigError
from q4c.system_compile import compile_system
from q4c.testing import write_two_graph_system

# The system of q4c.testing.write_two_graph_system: z is unused by the driver, so the budget gives W3
# 2 bits and graph b opset 25, while a stays at opset 21.


@pytest.fixture
def spec(tmp_path, monkeypatch, rng):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # --kernels auto's cache: not the real one
    return write_two_graph_system(tmp_path, rng)


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _opset(path: Path) -> int:
    return next(i.version for i in onnx.load(str(path)).opset_import if i.domain in ("", "ai.onnx"))


@pytest.mark.parametrize("options", [{}, {"bits": 4}], ids=["budgeted", "uniform-4"])
def test_a_saved_system_plan_replays_to_the_same_bytes_and_plan(spec, tmp_path, options):
    one, two = tmp_path / "one", tmp_path / "two"
    compile_system(spec, one, CompileOptions(workers=1, **options), verify=False, save_plan=tmp_path / "p1.json")
    plan = json.loads((tmp_path / "p1.json").read_text())
    assert set(plan["graphs"]) == {"a", "b"} and all("form" in t for t in plan["tensors"].values())
    assert {n: g["opset"] for n, g in plan["graphs"].items()} == {n: _opset(one / f"{n}.onnx") for n in "ab"}
    compile_system(spec, two, CompileOptions(workers=1, plan_path=tmp_path / "p1.json"), verify=False,
                   save_plan=tmp_path / "p2.json")
    assert {n: _sha(one / f"{n}.onnx") for n in "ab"} == {n: _sha(two / f"{n}.onnx") for n in "ab"}
    assert (tmp_path / "p1.json").read_text() == (tmp_path / "p2.json").read_text()


def _run(path: Path, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def test_a_hand_edited_graph_opset_is_replayed_and_an_older_plan_still_reads(spec, tmp_path):
    compile_system(spec, tmp_path / "one", CompileOptions(workers=1), verify=False, save_plan=tmp_path / "p.json")
    doc = json.loads((tmp_path / "p.json").read_text())
    assert doc["graphs"] == {"a": {"opset": 21}, "b": {"opset": 25}}  # W3 at 2 bits needs INT2 (opset 25)
    doc["graphs"]["a"]["opset"] = 25
    (tmp_path / "edited.json").write_text(json.dumps(doc))
    compile_system(spec, tmp_path / "two", CompileOptions(workers=1, plan_path=tmp_path / "edited.json"), verify=False)
    assert _opset(tmp_path / "two" / "a.onnx") == 25
    x = np.random.default_rng(3).standard_normal((8, 64)).astype(np.float32)
    np.testing.assert_array_equal(_run(tmp_path / "one" / "a.onnx", {"x": x})[0], _run(tmp_path / "two" / "a.onnx", {"x": x})[0])
    del doc["graphs"]  # as saved before system plans recorded opsets: decided from the bits again
    (tmp_path / "old.json").write_text(json.dumps(doc))
    compile_system(spec, tmp_path / "three", CompileOptions(workers=1, plan_path=tmp_path / "old.json"), verify=False)
    assert [_opset(tmp_path / "three" / f"{n}.onnx") for n in "ab"] == [21, 25]
    assert _sha(tmp_path / "three" / "b.onnx") == _sha(tmp_path / "one" / "b.onnx")


@pytest.mark.parametrize("graphs", [{"a": {"opset": 20}}, {"a": 21}, {"a": {"opset": True}}, ["a"]])
def test_a_bad_graph_opset_is_a_one_line_error_and_writes_nothing(spec, tmp_path, graphs):
    plan = tmp_path / "p.json"
    plan.write_text(json.dumps({"schema": "q4c.plan/2", "tensors": {}, "graphs": graphs}))
    with pytest.raises(ConfigError, match="graph|graphs") as e:
        compile_system(spec, tmp_path / "out", CompileOptions(workers=1, plan_path=plan), verify=False)
    assert "\n" not in str(e.value) and not (tmp_path / "out").exists()
