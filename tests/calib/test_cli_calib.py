"""`q4c compile` with calibration: --calib DIR, --save-calib/--load-calib, --calib-reader,
--activations int8, the progress bar on stderr, and data errors as one line."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
from click.testing import CliRunner

from q4c.cli import main

MODELS = Path(__file__).resolve().parents[2] / "models"


def _compile(*args: str):
    return CliRunner().invoke(main, ["compile", *args], catch_exceptions=False)


def test_calibrate_save_and_load_a_table(tmp_path, sample_dirs):
    model = str(MODELS / "rnnt_joiner.onnx")
    table = tmp_path / "calib.json"
    result = _compile(model, "-o", str(tmp_path / "a.onnx"), "--bits", "4", "--calib", str(sample_dirs("rnnt_joiner")),
                      "--activations", "int8", "--observer", "mse", "--save-calib", str(table), "--json")
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    passes = [p["name"] for p in report["passes"]]
    assert passes.index("calibrate") < passes.index("assign-precision") < passes.index("insert-activation-qdq") \
        < passes.index("quantize-weights")
    assert report["calibration"]["samples"] == 32 and report["calibration"]["observer"] == "mse"
    assert "q4c: calibrating" in result.stderr
    doc = json.loads(table.read_text())
    assert doc["schema"] == "q4c.calib/1" and doc["samples"] == 32 and "enc" in doc["tensors"]
    assert report["verification"]["activation_codes_exact"] > 0

    again = _compile(model, "-o", str(tmp_path / "b.onnx"), "--bits", "4", "--activations", "int8",
                     "--load-calib", str(table), "--observer", "mse", "--json")
    assert again.exit_code == 0, again.stderr
    calibrate = next(p for p in json.loads(again.stdout)["passes"] if p["name"] == "calibrate")
    assert calibrate["stats"] == {"loaded": len(doc["tensors"])}
    # the same table gives the same graph
    assert onnx.load(tmp_path / "a.onnx").graph == onnx.load(tmp_path / "b.onnx").graph


def test_a_python_reader_with_sequences_for_a_stateful_model(tmp_path):
    reader = tmp_path / "tokens.py"
    reader.write_text(
        "import numpy as np\n"
        "def sequences():\n"
        "    rng = np.random.default_rng(0)\n"
        "    for _ in range(4):\n"
        "        yield {'tokens': rng.integers(0, 501, size=(1, 6)).astype(np.int64)}\n"
        "sequences.state_pairs = {'h_out': 'h_in', 'c_out': 'c_in'}\n")
    table = tmp_path / "t.json"
    result = _compile(str(MODELS / "rnnt_predictor.onnx"), "-o", str(tmp_path / "p.onnx"), "--bits", "4",
                      "--calib-reader", f"{reader}:sequences", "--save-calib", str(table), "--json")
    assert result.exit_code == 0, result.stderr
    doc = json.loads(table.read_text())
    assert doc["calls"] == 24 and doc["state_pairs"] == {"h_out": "h_in", "c_out": "c_in"}
    assert doc["tensors"]["h_in"]["state"] and doc["tensors"]["h_in"]["max"] > doc["tensors"]["h_in"]["min"]


def test_bad_data_is_one_line_naming_file_and_key(tmp_path):
    np.savez(tmp_path / "000.npz", enc=np.zeros((1, 4, 320), np.float32), pred=np.zeros((1, 2, 128), np.float32))
    bad = np.zeros((1, 4, 320), np.float32)
    bad[0, 0, 0] = np.inf
    np.savez(tmp_path / "001.npz", enc=bad, pred=np.zeros((1, 2, 128), np.float32))
    result = CliRunner().invoke(main, ["compile", str(MODELS / "rnnt_joiner.onnx"), "-o", str(tmp_path / "o.onnx"),
                                       "--calib", str(tmp_path), "--bits", "4"])
    assert result.exit_code == 1
    assert result.stderr.strip().splitlines()[-1] == f"Error: {tmp_path / '001.npz'}: key 'enc' contains NaN or infinity"
    assert not (tmp_path / "o.onnx").exists()
