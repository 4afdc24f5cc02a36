"""--kernels auto decides the forms before anything is quantized: whichever form it keeps, the file
is byte for byte what forcing that form writes (weights quantized once, with the scales the form
reads; no com.microsoft opset left behind by the timed copies)."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import q4c
from q4c import kernel_cache
from q4c.testing import heavy_tailed, make_model


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # keep the real kernel cache untouched
    return tmp_path / "home"


def _lm(rng):
    """Gather(E) -> MatMul(W): an embedding and a MatMul, both with kernel forms."""
    return make_model([helper.make_node("Gather", ["E", "tok"], ["h"]), helper.make_node("MatMul", ["h", "W"], ["y"])],
                      [helper.make_tensor_value_info("tok", TensorProto.INT64, [1, 6])],
                      [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 6, 96])],
                      {"E": heavy_tailed(rng, (200, 128)), "W": heavy_tailed(rng, (128, 96))})


@pytest.mark.parametrize("planted", ["low-bit", "fp32-at-load"])
def test_auto_writes_the_bytes_of_the_kernel_setting_it_chose(home, tmp_path, rng, planted):
    src = tmp_path / "m.onnx"
    onnx.save(_lm(rng), src)
    data = tmp_path / "d.npz"
    np.savez(data, tok=np.array([[1, 5, 9, 2, 7, 3]], np.int64))
    auto = q4c.compile_file(src, tmp_path / "auto.onnx", q4c.CompileOptions(bits=4), data=data, verify=False)
    doc = json.loads(kernel_cache.cache_path().read_text())
    doc[auto["kernel_choice"]["cache_key"]]["chosen"] = planted  # the machine's verdict, planted
    kernel_cache.cache_path().write_text(json.dumps(doc))
    again = q4c.compile_file(src, tmp_path / "again.onnx", q4c.CompileOptions(bits=4), data=data, verify=False,
                             save_plan=tmp_path / "p.json")
    assert again["kernel_choice"]["chosen"] == planted and again["kernel_choice"]["source"] == "cache"
    forced = q4c.compile_file(src, tmp_path / "forced.onnx", q4c.CompileOptions(bits=4, kernels=planted), data=data,
                              verify=False)
    assert (tmp_path / "again.onnx").read_bytes() == (tmp_path / "forced.onnx").read_bytes()
    assert again["session_config"] == forced["session_config"]
    assert [p["name"] for p in again["passes"]].count("quantize-weights") == 1
    forms = {t["form"] for t in json.loads((tmp_path / "p.json").read_text())["tensors"].values()}
    assert forms == ({"fp32-at-load"} if planted == "fp32-at-load" else {"gather-block-quantized", "matmulnbits-acc4"})
    if planted == "fp32-at-load":
        model = onnx.load(tmp_path / "again.onnx")
        assert {i.domain for i in model.opset_import} == {""}  # nothing from the timed MatMulNBits copy


def test_a_timed_compile_replays_without_timing(home, tmp_path, rng):
    src = tmp_path / "m.onnx"
    onnx.save(_lm(rng), src)
    first = q4c.compile_file(src, tmp_path / "a.onnx", q4c.CompileOptions(bits=4), verify=False,
                             save_plan=tmp_path / "p.json")
    assert first["kernel_choice"]["source"] == "measured"
    kernel_cache.cache_path().write_text("{}")  # forget the verdict: the plan alone must reproduce it
    again = q4c.compile_file(src, tmp_path / "b.onnx", q4c.CompileOptions(plan_path=tmp_path / "p.json"),
                             verify=False, save_plan=tmp_path / "p2.json")
    assert "kernel_choice" not in again  # nothing timed
    assert (tmp_path / "a.onnx").read_bytes() == (tmp_path / "b.onnx").read_bytes()
    assert json.loads((tmp_path / "p2.json").read_text()) == json.loads((tmp_path / "p.json").read_text())


class _FakeTiming:
    """What q4c.timing.interleaved returns, with planted medians (seconds)."""

    def __init__(self, medians: dict[str, float]):
        self.medians, self.rounds = medians, 7

    def median(self, key: str) -> float:
        return self.medians[key]


@pytest.mark.parametrize(("low_bit_ms", "chosen"), [(0.779, "fp32-at-load"),  # a tie (0.8 % apart): FP32 speed
                                                    (0.740, "fp32-at-load"),  # 4.3 % faster: within noise
                                                    (0.700, "low-bit")])      # 9.4 % faster: kept
def test_auto_keeps_low_bit_kernels_only_when_clearly_faster(home, tmp_path, rng, monkeypatch, low_bit_ms, chosen):
    from q4c.passes import choose_kernels

    planted = {"low-bit": low_bit_ms / 1e3, "fp32-at-load": 0.773e-3}
    monkeypatch.setattr(choose_kernels, "interleaved", lambda *a, **k: _FakeTiming(planted))
    src = tmp_path / "m.onnx"
    onnx.save(_lm(rng), src)
    report = q4c.compile_file(src, tmp_path / "a.onnx", q4c.CompileOptions(bits=4), verify=False)
    assert report["kernel_choice"]["chosen"] == chosen and report["kernel_choice"]["source"] == "measured"


def test_a_verdict_cached_by_an_older_rule_is_measured_again(home, tmp_path, rng, monkeypatch):
    from q4c.passes import choose_kernels

    src = tmp_path / "m.onnx"
    onnx.save(_lm(rng), src)
    first = q4c.compile_file(src, tmp_path / "a.onnx", q4c.CompileOptions(bits=4), verify=False)
    doc = json.loads(kernel_cache.cache_path().read_text())
    entry = doc[first["kernel_choice"]["cache_key"]]
    del entry["rule"]  # as rule 1 wrote it: low-bit on a tie
    entry.update(chosen="low-bit", low_bit_ms=0.779, fp32_at_load_ms=0.773)
    kernel_cache.cache_path().write_text(json.dumps(doc))
    monkeypatch.setattr(choose_kernels, "interleaved",
                        lambda *a, **k: _FakeTiming({"low-bit": 0.779e-3, "fp32-at-load": 0.773e-3}))
    again = q4c.compile_file(src, tmp_path / "b.onnx", q4c.CompileOptions(bits=4), verify=False)
    assert again["kernel_choice"]["source"] == "measured" and again["kernel_choice"]["chosen"] == "fp32-at-load"
    third = q4c.compile_file(src, tmp_path / "c.onnx", q4c.CompileOptions(bits=4), verify=False)
    assert third["kernel_choice"]["source"] == "cache"  # the new verdict is cached with its rule
