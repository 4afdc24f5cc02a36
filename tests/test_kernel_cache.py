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


def test_key_is_stable_and_changes_with_model_and_input_shape(rng):
    a, b = matmul_model(rng, k=64, n=16), matmul_model(rng, k=64, n=16)  # different weights
    feeds = {"x": np.zeros((4, 64), np.float32)}
    assert kernel_cache.key([a], feeds) == kernel_cache.key([a], dict(feeds))
    assert kernel_cache.key([a], feeds) != kernel_cache.key([b], feeds)
    assert kernel_cache.key([a], feeds) != kernel_cache.key([a], {"x": np.zeros((8, 64), np.float32)})


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
