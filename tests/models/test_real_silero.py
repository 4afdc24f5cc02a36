"""models/real/silero.py drives Silero's interface as the silero-vad package does.

Tiny stand-ins built with onnx.helper have Silero's inputs and outputs; their output reveals the
context each call was given and the state it was carried (values worked out by hand below).
"""

from __future__ import annotations

import importlib.util
import sys
import types
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from q4c.calib.readers import PythonReader
from q4c.calib.runner import materialize

SILERO_PY = Path(__file__).resolve().parents[2] / "models" / "real" / "silero.py"


@pytest.fixture(scope="module")
def silero():
    spec = importlib.util.spec_from_file_location("q4c_test_real_silero", SILERO_PY)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _const(name, values, dtype=np.int64):
    return helper.make_node("Constant", [], [name], value=onnx.numpy_helper.from_array(np.array(values, dtype), name))


def _streaming_model(path: Path, with_sr: bool, fixed: bool = False) -> Path:
    """output = mean(input[:, :32]) + 1e4 * state[0, 0, 0]; stateN = state + sr / 8000 (+1 without sr)."""
    nodes = [
        _const("s0", [0]), _const("s32", [32]), _const("ax1", [1]),
        helper.make_node("Slice", ["input", "s0", "s32", "ax1"], ["ctx"]),
        helper.make_node("ReduceMean", ["ctx"], ["ctx_mean"], axes=[1], keepdims=1),  # [1, 1]
        _const("z", [0]), _const("one", [1]), _const("ax0", [0]),
        helper.make_node("Slice", ["state", "z", "one", "ax0"], ["st0"]),
        helper.make_node("Slice", ["st0", "z", "one", "ax1"], ["st00"]),
        _const("ax2", [2]),
        helper.make_node("Slice", ["st00", "z", "one", "ax2"], ["st000"]),  # [1, 1, 1]
        _const("flat", [1, 1]),
        helper.make_node("Reshape", ["st000", "flat"], ["st"]),
        _const("scale", [1e4], np.float32),
        helper.make_node("Mul", ["st", "scale"], ["st_scaled"]),
        helper.make_node("Add", ["ctx_mean", "st_scaled"], ["output"]),
    ]
    inputs = [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 576] if fixed else ["batch", "sequence"]),
              helper.make_tensor_value_info("state", TensorProto.FLOAT, [2, "batch", 128] if not fixed else [2, 1, 128])]
    if with_sr:
        inputs.append(helper.make_tensor_value_info("sr", TensorProto.INT64, []))
        nodes += [helper.make_node("Cast", ["sr"], ["sr_f"], to=TensorProto.FLOAT),
                  _const("eighth", [1 / 8000], np.float32),
                  helper.make_node("Mul", ["sr_f", "eighth"], ["step"])]
    else:
        nodes.append(_const("step", [1.0], np.float32))
    nodes.append(helper.make_node("Add", ["state", "step"], ["stateN"]))
    graph = helper.make_graph(nodes, "tiny_silero", inputs, [
        helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, 1]),
        helper.make_tensor_value_info("stateN", TensorProto.FLOAT, [2, 1, 128])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(path))
    return path


def _sequence_model(path: Path) -> Path:
    """speech_probs[n] = mean(input[n, :32]) + 1e4 * h[0, 0, 0]; hn = h + N; cn = c - 1."""
    nodes = [
        _const("s0", [0]), _const("s32", [32]), _const("ax1", [1]),
        helper.make_node("Slice", ["input", "s0", "s32", "ax1"], ["ctx"]),
        helper.make_node("ReduceMean", ["ctx"], ["ctx_mean"], axes=[1], keepdims=0),  # [N]
        _const("z", [0]), _const("one", [1]), _const("ax2", [2]),
        helper.make_node("Slice", ["h", "z", "one", "ax2"], ["h0"]),  # [1, 1, 1]
        _const("flat", [1]),
        helper.make_node("Reshape", ["h0", "flat"], ["h0f"]),
        _const("scale", [1e4], np.float32),
        helper.make_node("Mul", ["h0f", "scale"], ["h_scaled"]),
        helper.make_node("Add", ["ctx_mean", "h_scaled"], ["speech_probs"]),
        helper.make_node("Shape", ["input"], ["shape"], end=1),
        helper.make_node("Cast", ["shape"], ["n"], to=TensorProto.FLOAT),
        helper.make_node("Add", ["h", "n"], ["hn"]),
        _const("minus1", [-1.0], np.float32),
        helper.make_node("Add", ["c", "minus1"], ["cn"]),
    ]
    graph = helper.make_graph(nodes, "tiny_silero_sequence", [
        helper.make_tensor_value_info("input", TensorProto.FLOAT, ["sequence_length", 576]),
        helper.make_tensor_value_info("h", TensorProto.FLOAT, [1, 1, 128]),
        helper.make_tensor_value_info("c", TensorProto.FLOAT, [1, 1, 128])], [
        helper.make_tensor_value_info("speech_probs", TensorProto.FLOAT, ["sequence_length"]),
        helper.make_tensor_value_info("hn", TensorProto.FLOAT, [1, 1, 128]),
        helper.make_tensor_value_info("cn", TensorProto.FLOAT, [1, 1, 128])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(path))
    return path


# audio x[k] = k + 1, 3 full chunks and 100 samples at 16 kHz
AUDIO = np.arange(1, 3 * 512 + 100 + 1, dtype=np.float32)


def test_streaming_16k_context_state_and_sr(silero, tmp_path):
    run = silero.session_runner(_streaming_model(tmp_path / "m.onnx", with_sr=True))
    got = silero.probs(run, AUDIO, "silero_vad", 16000)
    # call i gets the 64 samples before chunk i (x = 448..511 -> values 449..512 for i = 1) and
    # the state after i calls at +2 per call (sr 16000 / 8000): mean of the first 32 + 2e4 * i
    want = [0.0, (449 + 480) / 2 + 2e4, (961 + 992) / 2 + 4e4, (1473 + 1504) / 2 + 6e4]
    np.testing.assert_array_equal(got, np.array(want, np.float32))


def test_streaming_8k_uses_256_sample_chunks_and_32_sample_context(silero, tmp_path):
    run = silero.session_runner(_streaming_model(tmp_path / "m.onnx", with_sr=True))
    audio = AUDIO[:700]  # 2 full 256-sample chunks and 188 samples
    got = silero.probs(run, audio, "silero_vad_op18_ifless", 8000)
    # context of chunk i: samples 256 i - 32 .. 256 i - 1 (values 225..256 for i = 1); +1 per call
    want = [0.0, (225 + 256) / 2 + 1e4, (481 + 512) / 2 + 2e4]
    np.testing.assert_array_equal(got, np.array(want, np.float32))
    with pytest.raises(ValueError, match="16000"):
        silero.probs(run, audio, "silero_vad_16k_op15", 8000)


def test_streaming_without_sr_input_and_fixed_shape(silero, tmp_path):
    run = silero.session_runner(_streaming_model(tmp_path / "m.onnx", with_sr=False, fixed=True))
    got = silero.probs(run, AUDIO, "silero_vad_openvino_16k")
    want = [0.0, (449 + 480) / 2 + 1e4, (961 + 992) / 2 + 2e4, (1473 + 1504) / 2 + 3e4]
    np.testing.assert_array_equal(got, np.array(want, np.float32))


def test_calls_zero_pad_the_last_chunk(silero):
    steps = silero.calls(AUDIO, "silero_vad", 16000)
    assert len(steps) == 4 and all(s["input"].shape == (1, 576) for s in steps)
    assert steps[0]["sr"].dtype == np.int64 and int(steps[0]["sr"]) == 16000
    last = steps[3]["input"][0]
    np.testing.assert_array_equal(last[64:164], np.arange(1537, 1637, dtype=np.float32))
    assert not last[164:].any()
    assert "sr" not in silero.calls(AUDIO, "silero_vad_half")[0]


def test_sequence_export_stacks_rows_and_carries_h_c_between_blocks(silero, tmp_path, monkeypatch):
    run = silero.session_runner(_sequence_model(tmp_path / "s.onnx"))
    ctx = [0.0, (449 + 480) / 2, (961 + 992) / 2, (1473 + 1504) / 2]
    got = silero.probs(run, AUDIO, "silero_vad_16k_sequence")  # one call of 4 rows, h = 0
    np.testing.assert_array_equal(got, np.array(ctx, np.float32))
    monkeypatch.setattr(silero, "SEQUENCE_MAX_FRAMES", 3)  # two calls: 3 rows, then 1 row with h = 3
    got = silero.probs(run, AUDIO, "silero_vad_16k_sequence")
    np.testing.assert_array_equal(got, np.array(ctx[:3] + [ctx[3] + 3e4], np.float32))


def test_calibration_reader_feeds_q4c_as_the_driver_runs(silero, tmp_path, monkeypatch):
    fake = types.ModuleType("audio")
    utterances = [("u0", AUDIO[:1100]), ("u1", AUDIO[:600]), ("u2", AUDIO[:520]), ("u3", AUDIO[:520]),
                  ("u4", AUDIO[:520])]
    fake.load = lambda split, sr: utterances if (split, sr) == ("calib", 16000) else []
    monkeypatch.setitem(sys.modules, "audio", fake)
    model = _streaming_model(tmp_path / "m.onnx", with_sr=True)
    reader = PythonReader(f"{SILERO_PY}:calib_silero_vad")
    assert reader.state_pairs == {"stateN": "state"}
    samples = list(reader)
    # each utterance once (independent units for --require): u1 and u4 at 8 kHz, the others at
    # 16 kHz; one call per chunk
    assert [len(s) for s in samples] == [3, 2, 2, 2, 2]  # 8 kHz: 300 and 260 samples
    assert [int(s[0]["sr"]) for s in samples] == [16000, 8000, 16000, 16000, 8000]
    assert not samples[0][0]["state"].any() and "state" not in samples[0][1]
    # q4c carries the state the way probs() does: call t of a 16 kHz sequence sees state 2 t
    calls = materialize(onnx.load(str(model)), reader)
    assert [float(c["state"][0, 0, 0]) for c in calls] == [0, 2, 4, 0, 1, 0, 2, 0, 2, 0, 1]
    only_16k = PythonReader(f"{SILERO_PY}:calib_silero_vad_16k_sequence")
    assert only_16k.state_pairs == {"hn": "h", "cn": "c"}
    assert [s[0]["input"].shape for s in only_16k] == [(3, 576), (2, 576), (2, 576), (2, 576), (2, 576)]


def test_to_8k_keeps_the_speech_band_and_removes_what_would_alias(silero):
    t = np.arange(16000) / 16000

    def amplitude(freq):
        y = silero.to_8k(np.sin(2 * np.pi * freq * t).astype(np.float32))
        assert y.shape == (8000,)
        return np.sqrt(2 * np.mean(y[100:-100].astype(np.float64) ** 2))

    assert amplitude(1000) == pytest.approx(1.0, abs=0.01)
    assert amplitude(3000) == pytest.approx(1.0, abs=0.01)
    assert amplitude(6000) < 0.01  # would alias to 2 kHz
