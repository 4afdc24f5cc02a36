import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper

from q4c.cli import main
from q4c.testing import heavy_tailed, make_model, run_ort

F = TensorProto.FLOAT
REPO_EXAMPLE = str(Path(__file__).resolve().parents[2] / "examples" / "remove_identity_pass.py") + ":RemoveIdentityPass"


@pytest.fixture
def runner():
    return CliRunner()


@pytest.fixture
def model_path(tmp_path, rng):
    """x -> Identity -> MatMul(W) -> Gemm(transB) -> y, small but with weights to quantize."""
    model = make_model(
        [helper.make_node("Identity", ["x"], ["xi"]), helper.make_node("MatMul", ["xi", "W"], ["h"]),
         helper.make_node("Gemm", ["h", "W2", "b"], ["y"], transB=1)],
        [helper.make_tensor_value_info("x", F, ["batch", 64])], [helper.make_tensor_value_info("y", F, ["batch", 32])],
        {"W": heavy_tailed(rng, (64, 128)), "W2": heavy_tailed(rng, (32, 128)), "b": heavy_tailed(rng, (32,))},
        opset=17,
    )
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    return path


def test_compile_writes_beside_the_input_and_leaves_the_input_untouched(runner, model_path):
    before = model_path.read_bytes()
    result = runner.invoke(main, ["compile", str(model_path), "--json", "--kernels", "low-bit", "--bits", "4"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    out = model_path.with_name("m.q4.onnx")
    assert report["schema"] == "q4c.compile/1" and report["output"]["path"] == str(out)
    assert model_path.read_bytes() == before
    assert report["output"]["bytes"] == out.stat().st_size
    assert report["compression"] > 4
    assert report["verification"]["checker"] and report["verification"]["ort_loads"]
    assert report["verification"]["interp_vs_ort_max_abs"] < 1e-4
    assert {t["name"]: t["bits"] for t in report["tensors"]} == {"W": 4, "W2_kn": 4}
    model = onnx.load(out)
    onnx.checker.check_model(model, full_check=True)
    ops = {n.op_type for n in model.graph.node}
    assert "MatMulNBits" in ops and "Gemm" not in ops and "Identity" in ops
    assert {p.key: p.value for p in model.metadata_props}["q4c.ort_session_config"] == "{}"


def test_compile_table_output_goes_to_stdout_and_progress_to_stderr(runner, model_path, tmp_path):
    result = runner.invoke(main, ["compile", str(model_path), "-o", str(tmp_path / "o.onnx")])
    assert result.exit_code == 0
    assert "smaller" in result.stdout and "W2_kn" in result.stdout
    assert "fold-constants" in result.stderr and "fold-constants" not in result.stdout


def test_not_onnx_is_one_line_exit_1_and_no_output(runner, tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_text("not a model")
    result = runner.invoke(main, ["compile", str(bad)])
    assert result.exit_code == 1
    assert result.stderr.startswith("Error: ") and len(result.stderr.strip().splitlines()) == 1
    assert "Traceback" not in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.onnx"]


def test_missing_model_file_exit_1(runner, tmp_path):
    result = runner.invoke(main, ["compile", str(tmp_path / "missing.onnx")])
    assert result.exit_code == 1 and "no such file" in result.stderr


def test_model_without_weights_fails_and_leaves_no_output(runner, tmp_path):
    model = make_model([helper.make_node("Relu", ["x"], ["y"])], [helper.make_tensor_value_info("x", F, [4])],
                       [helper.make_tensor_value_info("y", F, [4])])
    path = tmp_path / "relu.onnx"
    onnx.save(model, path)
    result = runner.invoke(main, ["compile", str(path)])
    assert result.exit_code == 1 and "no float weights" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["relu.onnx"]


def test_bad_bits_is_a_usage_error(runner, model_path):
    assert runner.invoke(main, ["compile", str(model_path), "--bits", "5"]).exit_code == 2


def test_passes_bare_names_replace_the_pipeline(runner, model_path, tmp_path):
    out = tmp_path / "canon.onnx"
    result = runner.invoke(main, ["compile", str(model_path), "-o", str(out), "--passes", "lower-gemm", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert [p["name"] for p in report["passes"]] == ["lower-gemm"]
    ops = {n.op_type for n in onnx.load(out).graph.node}
    assert ops == {"Identity", "MatMul", "Add"}


def test_passes_plus_and_minus_edit_the_default(runner, model_path, tmp_path):
    result = runner.invoke(main, ["compile", str(model_path), "-o", str(tmp_path / "o.onnx"), "--json",
                                  "--passes", f"default,-lower-ort-kernels,+{REPO_EXAMPLE}"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    names = [p["name"] for p in report["passes"]]
    assert "lower-ort-kernels" not in names and names[-1] == "remove-identity"
    assert report["passes"][-1]["stats"] == {"removed": 1}
    ops = {n.op_type for n in onnx.load(tmp_path / "o.onnx").graph.node}
    assert "Identity" not in ops and "MatMulNBits" not in ops and "DequantizeLinear" in ops


def test_unknown_pass_names_the_known_ones(runner, model_path):
    result = runner.invoke(main, ["compile", str(model_path), "--passes", "default,+no-such-pass"])
    assert result.exit_code == 1 and "unknown pass 'no-such-pass'" in result.stderr and "fold-constants" in result.stderr


def test_saved_plan_replays_with_hand_edits(runner, model_path, tmp_path):
    plan = tmp_path / "plan.json"
    assert runner.invoke(main, ["compile", str(model_path), "-o", str(tmp_path / "a.onnx"), "--bits", "4",
                                "--save-plan", str(plan)]).exit_code == 0
    doc = json.loads(plan.read_text())
    assert doc["schema"] == "q4c.plan/2" and doc["tensors"]["W"]["bits"] == 4
    doc["tensors"]["W"]["bits"] = 8
    plan.write_text(json.dumps(doc))
    result = runner.invoke(main, ["compile", str(model_path), "-o", str(tmp_path / "b.onnx"), "--plan", str(plan), "--json"])
    assert result.exit_code == 0, result.output
    assert {t["name"]: t["bits"] for t in json.loads(result.stdout)["tensors"]} == {"W": 8, "W2_kn": 4}


def test_inspect_json_counts_packed_weights(runner, model_path, tmp_path):
    out = tmp_path / "o.onnx"
    runner.invoke(main, ["compile", str(model_path), "-o", str(out), "--kernels", "low-bit", "--bits", "4"])
    result = runner.invoke(main, ["inspect", str(out), "--json"])
    assert result.exit_code == 0
    info = json.loads(result.stdout)
    assert info["schema"] == "q4c.inspect/1" and info["opsets"]["ai.onnx"] == 21
    assert info["weights"]["uint4 (packed in uint8)"]["params"] == 64 * 128 + 128 * 32
    assert info["inputs"] == [{"name": "x", "dtype": "float32", "shape": ["batch", 64]}]


def test_run_writes_outputs_that_match_onnx_runtime(runner, model_path, tmp_path, rng):
    x = rng.standard_normal((3, 64), dtype=np.float32)
    np.savez(tmp_path / "in.npz", x=x)
    for backend in ("ort", "interp"):
        out = tmp_path / f"{backend}.npz"
        result = runner.invoke(main, ["run", str(model_path), "--data", str(tmp_path / "in.npz"), "-o", str(out),
                                      "--backend", backend])
        assert result.exit_code == 0, result.output
        np.testing.assert_allclose(np.load(out)["y"], run_ort(onnx.load(model_path), {"x": x})["y"], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arrays, message", [
    ({"z": np.zeros((1, 64), np.float32)}, "missing input(s) x"),
    ({"x": np.zeros((64,), np.float32)}, "rank 1"),
    ({"x": np.full((1, 64), np.nan, np.float32)}, "NaN"),
    ({"x": np.zeros((1, 64), np.complex64)}, "cannot be cast"),
])
def test_run_rejects_bad_data_naming_file_and_key(runner, model_path, tmp_path, arrays, message):
    data = tmp_path / "bad.npz"
    np.savez(data, **arrays)
    result = runner.invoke(main, ["run", str(model_path), "--data", str(data), "-o", str(tmp_path / "o.npz")])
    assert result.exit_code == 1 and message in result.stderr and "bad.npz" in result.stderr
    assert not (tmp_path / "o.npz").exists()


def test_passes_lists_builtins_with_origin(runner):
    result = runner.invoke(main, ["passes", "--json"])
    doc = json.loads(result.stdout)
    assert doc["default"][0] == "fold-constants"
    assert {p["name"]: p["origin"] for p in doc["passes"]}["quantize-weights"] == "builtin"


def test_copy_of_bundled_model_compiles(runner, tmp_path, bundled):
    src = tmp_path / "lstm_lm.onnx"
    shutil.copy(bundled("lstm_lm"), src)
    result = runner.invoke(main, ["compile", str(src), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["compression"] > 1 / 0.15


def test_auto_kernels_keep_the_form_they_report(runner, model_path, tmp_path):
    out = tmp_path / "auto.onnx"
    result = runner.invoke(main, ["compile", str(model_path), "-o", str(out), "--json"])
    assert result.exit_code == 0, result.output
    choice = json.loads(result.stdout)["kernel_choice"]
    model = onnx.load(out)
    has_nbits = any(n.op_type == "MatMulNBits" for n in model.graph.node)
    assert has_nbits == (choice["chosen"] == "low-bit")
    config = json.loads({p.key: p.value for p in model.metadata_props}["q4c.ort_session_config"])
    assert config == ({} if has_nbits else {"session.disable_quant_qdq": "1"})


def test_plot_pareto_writes_a_png(runner, model_path, tmp_path):
    png = tmp_path / "pareto.png"
    result = runner.invoke(main, ["compile", str(model_path), "-o", str(tmp_path / "o.onnx"), "--plot-pareto", str(png)])
    assert result.exit_code == 0, result.output
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


def test_conflicting_budgets_are_one_line_errors(runner, model_path):
    result = runner.invoke(main, ["compile", str(model_path), "--bits", "4", "--avg-bits", "3"])
    assert result.exit_code == 1 and "excludes --avg-bits" in result.stderr
    result = runner.invoke(main, ["compile", str(model_path), "--avg-bits", "0.5"])
    assert result.exit_code == 1 and "--avg-bits must be between 1 and 16" in result.stderr


def test_inputs_the_model_cannot_take_are_a_one_line_data_error(runner, tmp_path, bundled):
    data = tmp_path / "bad_state.npz"  # h_in's batch (3) disagrees with tokens' batch (1)
    np.savez(data, tokens=np.zeros((1, 1), np.int64), h_in=np.zeros((1, 3, 128), np.float32),
             c_in=np.zeros((1, 3, 128), np.float32))
    result = runner.invoke(main, ["compile", str(bundled("rnnt_predictor")), "-o", str(tmp_path / "o.onnx"),
                                  "--calib", str(data)])
    assert result.exit_code == 1, result.output
    assert "ONNX Runtime cannot run the model on inputs" in result.stderr and "h_in [1, 3, 128]" in result.stderr
    assert len(result.stderr.strip().splitlines()) <= 12 and "Traceback" not in result.stderr
    assert not (tmp_path / "o.onnx").exists()
