"""`q4c diff`: exit codes, the q4c.diff/1 JSON keys, the table, and the PNG plot."""

import json
import struct
import sys

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import numpy_helper

from q4c.cli import main
from q4c.errors import ConfigError

OUTPUT_KEYS = {"kind", "sqnr_db", "max_abs", "mean_abs", "cosine"}
PROB_KEYS = OUTPUT_KEYS | {"kl", "argmax_agreement"}
CTC_KEYS = {"sequences", "transcript_match", "token_error_rate", "reference_tokens"}
TOP_KEYS = {"schema", "samples", "outputs", "float", "quant", "backend", "tolerance_db", "passed"}
TENSOR_TOP_KEYS = TOP_KEYS | {"tensors", "first_error", "tensors_skipped", "recurrent"}
TENSOR_KEYS = {"name", "op", "shape", "sqnr_db", "max_abs", "mean_abs", "cosine"}


@pytest.fixture
def runner():
    return CliRunner()


@pytest.fixture
def perturbed(tmp_path, bundled):
    """bilstm_am with its second layer's reverse recurrent weight scaled by 1.1."""
    model = onnx.load(bundled("bilstm_am"))
    for init in model.graph.initializer:
        if init.name == "rnn.weight_hh_l1_reverse":
            init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) * np.float32(1.1), init.name))
    path = tmp_path / "perturbed.onnx"
    onnx.save(model, path)
    return path


def _args(bundled, other, *extra):
    return ["diff", str(bundled("bilstm_am")), str(other), "--data", str(bundled("bilstm_am").with_suffix(".npz")),
            *extra]


def test_model_against_itself_is_infinite_sqnr_and_exit_0(runner, bundled):
    result = runner.invoke(main, _args(bundled, bundled("bilstm_am"), "--json", "--tolerance", "200"))
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert set(doc) == TOP_KEYS and doc["schema"] == "q4c.diff/1"
    out = doc["outputs"]["log_probs"]
    assert set(out) == PROB_KEYS | {"ctc"} and set(out["ctc"]) == CTC_KEYS
    assert out["sqnr_db"] == "inf" and out["max_abs"] == 0 and out["cosine"] == 1 and out["kl"] == 0
    assert doc["passed"] is True and doc["backend"] == "ort"


def test_tensors_json_keys_and_first_error_at_the_perturbed_weight(runner, bundled, perturbed):
    result = runner.invoke(main, _args(bundled, perturbed, "--json", "--tensors", "--backend", "interp"))
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert set(doc) == TENSOR_TOP_KEYS
    assert all(set(t) == TENSOR_KEYS for t in doc["tensors"])
    assert set(doc["tensors_skipped"]) == {"only_in_reference", "only_in_other", "shape_mismatch", "not_float"}
    assert set(doc["first_error"]) == {"name", "op", "sqnr_db"}
    # rnn.weight_hh_l1_reverse is first read by the Slice that cuts its first gate
    assert doc["first_error"]["name"] == "/rnn/Slice_41_output_0" and doc["first_error"]["op"] == "Slice"
    names = [t["name"] for t in doc["tensors"]]
    assert names.index("/rnn/LSTM_output_0") < names.index("/rnn/LSTM_1_output_0") < names.index("log_probs")
    assert {t["name"]: t["sqnr_db"] for t in doc["tensors"]}["/rnn/LSTM_output_0"] == "inf"  # layer 1 untouched
    layer = doc["recurrent"]["/rnn/LSTM_1"]
    assert set(layer) == {"op", "per_step_max_abs", "per_step_sqnr_db"} and len(layer["per_step_sqnr_db"]) == 160
    assert doc["recurrent"]["/rnn/LSTM"]["per_step_sqnr_db"] == ["inf"] * 160


def test_exit_3_when_an_output_is_below_tolerance(runner, bundled, perturbed):
    result = runner.invoke(main, _args(bundled, perturbed, "--json", "--tolerance", "200"))
    assert result.exit_code == 3, result.output
    doc = json.loads(result.stdout)
    assert doc["passed"] is False and doc["tolerance_db"] == 200
    assert "over tolerance: log_probs" in result.stderr
    sqnr = doc["outputs"]["log_probs"]["sqnr_db"]
    ok = runner.invoke(main, _args(bundled, perturbed, "--tolerance", str(sqnr - 1)))
    assert ok.exit_code == 0 and "over tolerance" not in ok.stderr


def test_table_marks_the_first_error_and_logs_stay_off_stdout(runner, bundled, perturbed):
    result = runner.invoke(main, _args(bundled, perturbed, "--tensors"))
    assert result.exit_code == 0, result.output
    line = next(l for l in result.stdout.splitlines() if "<- first error" in l)
    assert "/rnn/Slice_41_output_0" in line
    assert "recurrent layer" in result.stdout and "/rnn/LSTM_2" in result.stdout
    assert result.stderr == ""


def test_plot_is_a_readable_png(runner, bundled, perturbed, tmp_path):
    import matplotlib.image

    png = tmp_path / "diff.png"
    result = runner.invoke(main, _args(bundled, perturbed, "--plot", str(png)))
    assert result.exit_code == 0, result.output
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    width, height = struct.unpack(">II", data[16:24])  # IHDR
    assert width >= 600 and height >= 400
    pixels = matplotlib.image.imread(png)
    assert pixels.shape[:2] == (height, width) and pixels.std() > 0.05  # not a blank canvas
    assert "first error" in result.stdout  # --plot implies --tensors


def test_plot_without_matplotlib_is_a_clear_error(monkeypatch, tmp_path):
    from q4c.plot import plot_diff

    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # import now raises ImportError
    with pytest.raises(ConfigError, match=r"pip install 'q4c\[plot\]'"):
        plot_diff({"outputs": {}, "tensors": []}, tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


def test_models_with_different_signatures_are_one_line_error(runner, bundled):
    result = runner.invoke(main, _args(bundled, bundled("lstm_lm")))
    assert result.exit_code == 1
    assert result.stderr.startswith("Error: ") and "differ" in result.stderr and len(result.stderr.splitlines()) == 1
