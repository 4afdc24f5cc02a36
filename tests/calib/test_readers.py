"""Readers: .npz files and directories, Python readers, synthetic samples, validation errors
that name file and key, state pairs by name, and sequences split into calls."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from q4c.calib.readers import (
    NpzReader,
    PythonReader,
    as_sequence,
    infer_state_pairs,
    input_specs,
    load_samples,
    open_reader,
)
from q4c.errors import ConfigError, DataError
from q4c.testing import make_model

MODELS = Path(__file__).resolve().parents[2] / "models"


def _model(inputs, outputs):
    """Identity-ish model: each output is the matching input through Identity (for signatures)."""
    nodes = [helper.make_node("Identity", [i.name], [o.name]) for i, o in zip(inputs, outputs)]
    return make_model(nodes, inputs, outputs)


def _x_model():
    vi = helper.make_tensor_value_info
    return _model([vi("x", TensorProto.FLOAT, ["batch", "time", 4])], [vi("y", TensorProto.FLOAT, ["batch", "time", 4])])


def test_directory_is_read_in_sorted_name_order(tmp_path, rng):
    for name in ("b", "a", "c"):
        np.savez(tmp_path / f"{name}.npz", x=np.full((1, 3, 4), ord(name), np.float32))
    reader = open_reader(_x_model(), tmp_path)
    assert isinstance(reader, NpzReader) and len(reader) == 3
    assert [int(s["x"][0, 0, 0]) for s in reader] == [ord("a"), ord("b"), ord("c")]
    assert [int(s["x"][0, 0, 0]) for s in reader] == [ord("a"), ord("b"), ord("c")]  # iterates again


def test_missing_key_names_the_file_and_key(tmp_path):
    np.savez(tmp_path / "s.npz", z=np.zeros((1, 3, 4), np.float32))
    with pytest.raises(DataError, match=r"s\.npz: missing input\(s\) x; the model expects x: float32\[batch, time, 4\]"):
        load_samples(tmp_path / "s.npz", input_specs(_x_model()))


def test_extra_key_is_an_error(tmp_path):
    np.savez(tmp_path / "s.npz", x=np.zeros((1, 3, 4), np.float32), mask=np.ones(3))
    with pytest.raises(DataError, match=r"s\.npz: unknown key\(s\) mask"):
        load_samples(tmp_path / "s.npz", input_specs(_x_model()))


def test_wrong_rank_and_fixed_dim_are_errors(tmp_path):
    specs = input_specs(_x_model())
    np.savez(tmp_path / "r.npz", x=np.zeros((3, 4), np.float32))
    with pytest.raises(DataError, match=r"r\.npz: key 'x' has rank 2"):
        load_samples(tmp_path / "r.npz", specs)
    np.savez(tmp_path / "d.npz", x=np.zeros((1, 3, 5), np.float32))
    with pytest.raises(DataError, match=r"d\.npz: key 'x' has shape \(1, 3, 5\)"):
        load_samples(tmp_path / "d.npz", specs)


def test_lossy_dtype_and_non_finite_values_are_errors(tmp_path):
    vi = helper.make_tensor_value_info
    model = _model([vi("ids", TensorProto.INT64, [1, "n"])], [vi("o", TensorProto.INT64, [1, "n"])])
    np.savez(tmp_path / "f.npz", ids=np.array([[1.5, 2.0]]))
    with pytest.raises(DataError, match=r"f\.npz: key 'ids' has dtype float64, which cannot be cast to int64"):
        load_samples(tmp_path / "f.npz", input_specs(model))
    x = np.zeros((1, 3, 4), np.float32)
    x[0, 1, 2] = np.nan
    np.savez(tmp_path / "n.npz", x=x)
    with pytest.raises(DataError, match=r"n\.npz: key 'x' contains NaN or infinity"):
        load_samples(tmp_path / "n.npz", input_specs(_x_model()))


def test_unreadable_file_and_empty_directory(tmp_path):
    (tmp_path / "bad.npz").write_text("not a zip")
    with pytest.raises(DataError, match=r"bad\.npz: not a readable \.npz file"):
        load_samples(tmp_path / "bad.npz", input_specs(_x_model()))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="holds no .npz samples"):
        open_reader(_x_model(), empty)


def test_python_reader_from_a_file_and_a_module(tmp_path, monkeypatch):
    (tmp_path / "my_reader.py").write_text(
        "import numpy as np\n"
        "def samples():\n"
        "    for i in range(3):\n"
        "        yield {'x': np.full((1, 2, 4), i, np.float32)}\n"
        "samples.state_pairs = {'y': 'x'}\n"
        "def broken():\n"
        "    return 42\n"
        "def bad_item():\n"
        "    return [{'x': np.zeros((1, 2, 4), np.float32)}, {'q': np.zeros(1)}]\n"
    )
    by_path = PythonReader(f"{tmp_path / 'my_reader.py'}:samples")
    assert [float(s["x"][0, 0, 0]) for s in by_path] == [0.0, 1.0, 2.0]
    assert by_path.state_pairs == {"y": "x"}
    monkeypatch.syspath_prepend(str(tmp_path))
    by_module = open_reader(_x_model(), reader="my_reader:samples")
    assert len(list(by_module)) == 3
    with pytest.raises(DataError, match="my_reader:broken: the reader must return an iterable of samples, got int"):
        list(PythonReader("my_reader:broken"))
    items = list(PythonReader("my_reader:bad_item"))
    with pytest.raises(DataError, match=r"item 1: missing input\(s\) x"):
        as_sequence(items[1], input_specs(_x_model()), {}, "item 1")
    with pytest.raises(ConfigError, match="has no function 'nope'"):
        PythonReader("my_reader:nope")
    with pytest.raises(ConfigError, match="expected 'module:function'"):
        PythonReader("my_reader")


def test_synthetic_reader_warns(caplog):
    q4c_logger = logging.getLogger("q4c")  # the CLI may have stopped its propagation: listen on it
    q4c_logger.addHandler(caplog.handler)
    try:
        with caplog.at_level(logging.WARNING, logger="q4c"):
            reader = open_reader(_x_model(), count=2)
    finally:
        q4c_logger.removeHandler(caplog.handler)
    assert "synthetic" in caplog.text
    samples = list(reader)
    assert len(samples) == 2 and samples[0]["x"].shape == (1, 32, 4)


@pytest.mark.parametrize("name, pairs", [
    ("rnnt_predictor", {"h_out": "h_in", "c_out": "c_in"}),
    ("lstm_scan", {"h_n": "h0", "c_n": "c0"}),
    ("lstm_unrolled_concat", {"h_n": "h0", "c_n": "c0"}),
    ("lstm_unrolled", {}),
    ("conformer", {}),
])
def test_state_pairs_of_the_bundled_models(name, pairs):
    assert infer_state_pairs(onnx.load(MODELS / f"{name}.onnx")) == pairs


def test_state_pair_naming_rule():
    vi = helper.make_tensor_value_info
    f = TensorProto.FLOAT
    inputs = [vi("x", f, [1, 8]), vi("state", f, [2, 1, 64]), vi("h", f, [1, 16]), vi("cache_prev", f, [4]),
              vi("mem0", f, [3])]
    outputs = [vi("y", f, [1, 8]), vi("state_out", f, [2, 1, 64]), vi("hn", f, [1, 16]), vi("cache_next", f, [4]),
               vi("mem_n", f, [5])]  # mem: shapes disagree, not a pair
    assert infer_state_pairs(_model(inputs, outputs)) == {"state_out": "state", "hn": "h", "cache_next": "cache_prev"}
    # two outputs claiming one input: ambiguous, not paired
    ambiguous = _model([vi("s", f, [4])], [vi("s_out", f, [4]), vi("new_s", f, [4])])
    assert infer_state_pairs(ambiguous) == {}


def test_a_sequence_in_one_sample_is_split_into_calls_with_zero_initial_state():
    model = onnx.load(MODELS / "rnnt_predictor.onnx")
    specs = input_specs(model)
    tokens = np.arange(5, dtype=np.int64).reshape(1, 5)
    steps = as_sequence({"tokens": tokens}, specs, infer_state_pairs(model), "s")
    assert len(steps) == 5
    assert [int(s["tokens"][0, 0]) for s in steps] == [0, 1, 2, 3, 4]
    assert steps[0]["h_in"].shape == (1, 1, 128) and not steps[0]["h_in"].any()
    # without state pairs the same sample is just the wrong shape
    with pytest.raises(DataError, match=r"key 'tokens' has shape \(1, 5\)"):
        as_sequence({"tokens": tokens, "h_in": steps[0]["h_in"], "c_in": steps[0]["c_in"]}, specs, {}, "s")
