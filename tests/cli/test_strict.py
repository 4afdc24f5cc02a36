"""`q4c compile` says when its own verification measured lost quality (stderr, --json,
--report), `--strict` turns that into exit 4 with nothing written, and weights holding NaN or
infinite values are refused (exit 1, one line) unless --allow-nonfinite."""

import json

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from q4c.cli import main
from q4c.testing import heavy_tailed, make_model, run_ort

F = TensorProto.FLOAT


@pytest.fixture
def runner():
    return CliRunner()


def _sqnr(ref, out):  # by hand, not by q4c
    ref, out = ref.astype(np.float64), out.astype(np.float64)
    return 10 * np.log10(np.sum(ref**2) / np.sum((ref - out) ** 2))


def _mlp(rng, w2=None, *, w2_as_constant=False):
    """x [4, 64] -> MatMul W1 [64, 128] -> Tanh -> MatMul W2 [128, 32] -> y."""
    w1 = heavy_tailed(rng, (64, 128))
    w2 = heavy_tailed(rng, (128, 32)) if w2 is None else w2
    nodes = [helper.make_node("MatMul", ["x", "W1"], ["h"]), helper.make_node("Tanh", ["h"], ["t"]),
             helper.make_node("MatMul", ["t", "W2"], ["y"])]
    inits = {"W1": w1}
    if w2_as_constant:
        nodes.insert(0, helper.make_node("Constant", [], ["W2"], value=numpy_helper.from_array(w2, "W2_value")))
    else:
        inits["W2"] = w2
    return make_model(nodes, [helper.make_tensor_value_info("x", F, [4, 64])],
                      [helper.make_tensor_value_info("y", F, [4, 32])], inits, opset=17)


@pytest.fixture
def mlp(tmp_path, rng):
    """The model file and a calibration sample, so compile verifies on inputs the test knows."""
    path = tmp_path / "mlp.onnx"
    onnx.save(_mlp(rng), path)
    x = rng.standard_normal((4, 64)).astype(np.float32)
    np.savez(tmp_path / "x.npz", x=x)
    return path, tmp_path / "x.npz", x


def _files(tmp_path):
    return sorted(p.name for p in tmp_path.iterdir())


def test_two_bit_compile_warns_naming_the_output_and_its_measured_sqnr(runner, mlp, tmp_path):
    model, data, x = mlp
    out = tmp_path / "q2.onnx"
    result = runner.invoke(main, ["compile", str(model), "-o", str(out), "--bits", "2", "--calib", str(data),
                                  "--json", "--report", str(tmp_path / "r.json")])
    assert result.exit_code == 0, result.output
    fp32, q2 = run_ort(onnx.load(model), {"x": x})["y"], run_ort(onnx.load(out), {"x": x})["y"]
    measured = _sqnr(fp32, q2)
    assert measured < 20  # the premise, measured independently: 2-bit weights lost quality

    report = json.loads(result.stdout)
    assert report["quality"]["ok"] is False
    assert report["quality"]["thresholds"]["sqnr_db"] == {"min": 20.0}
    [lost] = report["quality"]["lost"]
    assert (lost["output"], lost["metric"], lost["threshold"]) == ("y", "sqnr_db", 20.0)
    assert lost["value"] == pytest.approx(measured, abs=0.05)
    assert json.loads((tmp_path / "r.json").read_text())["quality"] == report["quality"]
    warning = f"output 'y': {lost['value']:.1f} dB SQNR vs FP32, below 20 dB"
    assert warning in result.stderr and warning in report["warnings"]


def test_strict_exits_4_and_writes_nothing_when_quality_is_lost(runner, mlp, tmp_path):
    model, data, _ = mlp
    before = model.read_bytes()
    out = tmp_path / "q2.onnx"
    result = runner.invoke(main, ["compile", str(model), "-o", str(out), "--bits", "2", "--calib", str(data),
                                  "--strict", "--json", "--report", str(tmp_path / "r.json")])
    assert result.exit_code == 4, result.output
    assert not out.exists() and model.read_bytes() == before
    assert _files(tmp_path) == ["mlp.onnx", "r.json", "x.npz"]
    assert "Traceback" not in result.output
    assert result.stderr.strip().splitlines()[-1].startswith("Error: ")
    assert "output 'y'" in result.stderr.strip().splitlines()[-1]
    report = json.loads(result.stdout)  # the report still says what was measured
    assert report["quality"]["ok"] is False and report["output"] is None
    assert json.loads((tmp_path / "r.json").read_text())["quality"]["lost"] == report["quality"]["lost"]


def test_strict_eight_bit_compile_is_above_threshold_and_exits_0(runner, mlp, tmp_path):
    model, data, x = mlp
    out = tmp_path / "q8.onnx"
    result = runner.invoke(main, ["compile", str(model), "-o", str(out), "--bits", "8", "--calib", str(data),
                                  "--strict", "--json"])
    assert result.exit_code == 0, result.output
    assert _sqnr(run_ort(onnx.load(model), {"x": x})["y"], run_ort(onnx.load(out), {"x": x})["y"]) > 20
    report = json.loads(result.stdout)
    assert report["quality"]["ok"] is True and report["quality"]["lost"] == []
    assert "SQNR vs FP32, below" not in result.stderr


def test_strict_needs_verification(runner, mlp, tmp_path):
    model, _, _ = mlp
    result = runner.invoke(main, ["compile", str(model), "-o", str(tmp_path / "o.onnx"), "--strict", "--no-verify"])
    assert result.exit_code == 1 and "--no-verify" in result.stderr
    assert not (tmp_path / "o.onnx").exists()


def _refused(runner, tmp_path, model, name):
    path = tmp_path / name
    onnx.save(model, path)
    before = path.read_bytes()
    result = runner.invoke(main, ["compile", str(path)])
    assert result.exit_code == 1
    assert "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("Error: ") and sum(line.startswith("Error") for line in lines) == 1
    assert _files(tmp_path) == [name]  # no output, no scratch file
    assert path.read_bytes() == before
    return lines[-1]


def test_nan_weight_is_refused_with_one_line_naming_it(runner, tmp_path, rng):
    w2 = heavy_tailed(rng, (128, 32))
    w2[0, :3] = np.nan
    line = _refused(runner, tmp_path, _mlp(rng, w2), "nan.onnx")
    assert line == (f"Error: {tmp_path / 'nan.onnx'}: weight 'W2' holds 3 NaN values; "
                    f"fix the export (or pass --allow-nonfinite)")


def test_inf_in_a_constant_node_is_refused(runner, tmp_path, rng):
    w2 = heavy_tailed(rng, (128, 32))
    w2[5, 7] = -np.inf
    line = _refused(runner, tmp_path, _mlp(rng, w2, w2_as_constant=True), "inf.onnx")
    assert "weight 'W2' holds 1 infinite value;" in line and "--allow-nonfinite" in line


def test_allow_nonfinite_compiles_and_keeps_that_weight_float(runner, tmp_path, rng):
    w2 = heavy_tailed(rng, (128, 32))
    w2[0, :3] = np.nan
    model = _mlp(rng, w2)
    path, out = tmp_path / "nan.onnx", tmp_path / "nan.q.onnx"
    onnx.save(model, path)
    result = runner.invoke(main, ["compile", str(path), "-o", str(out), "--allow-nonfinite", "--bits", "4", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert {t["name"]: t["bits"] for t in report["tensors"] if t["bits"] != 32} == {"W1": 4}
    assert "weight 'W2' holds 3 NaN values: kept in float (--allow-nonfinite)" in result.stderr
    # the compiled model is NaN exactly where FP32 is (columns 0-2 of y), finite elsewhere
    x = rng.standard_normal((4, 64)).astype(np.float32)
    ref, got = run_ort(model, {"x": x})["y"], run_ort(onnx.load(out), {"x": x})["y"]
    assert np.isnan(ref).any()
    np.testing.assert_array_equal(np.isnan(ref), np.isnan(got))
    assert not any(lost["metric"] == "nonfinite" for lost in report["quality"]["lost"])
