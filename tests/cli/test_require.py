"""--require: grammar, usage errors, the smallest plan meeting a requirement, and the error when
none does; --objective usage errors."""

import json

import numpy as np
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper

from q4c.cli import main
from q4c.requirements import Requirement, check_all, parse_requirement
from q4c.testing import make_model


@pytest.mark.parametrize("text, metric, op, value", [
    ("flips<=0.5%", "flips", "<=", 0.005),
    ("flips < 0.01", "flips", "<", 0.01),
    ("sqnr>=25dB", "sqnr", ">=", 25.0),
    ("SQNR > 30", "sqnr", ">", 30.0),
    ("kl<=0.01", "kl", "<=", 0.01),
    ("kl<=1e-3", "kl", "<=", 0.001),
])
def test_requirement_grammar(text, metric, op, value):
    req = parse_requirement(text)
    assert (req.metric, req.op) == (metric, op)
    assert req.value == pytest.approx(value)


@pytest.mark.parametrize("text", ["flips<=abc", "flips>=1%", "sqnr<=20dB", "kl<=1%", "sqnr>=5%", "wer<=1%",
                                  "flips<=150%", "flips", "", "flips<=0.5%%"])
def test_requirement_grammar_rejects(text):
    with pytest.raises(ValueError):
        parse_requirement(text)


def test_figures_are_the_worst_output():
    metrics = {"a": {"objective": "bce", "damage": 0.02, "flips": 0.004, "sqnr_db": 31.0},
               "b": {"objective": "bce", "damage": 0.001, "flips": 0.006, "sqnr_db": 24.0},
               "c": {"objective": "snr", "damage": 0.1, "sqnr_db": 40.0}}
    reqs = [parse_requirement("flips<=0.5%"), parse_requirement("sqnr>=25dB"), parse_requirement("kl<=0.05")]
    assert [r.figure(metrics) for r in reqs] == [0.006, 24.0, 0.02]
    ok, figures = check_all(reqs, metrics)
    assert not ok and figures[0] == "flips 0.6%"
    assert check_all([Requirement("kl", "<=", 0.05, "kl<=0.05")], metrics)[0]


def _model(tmp_path):
    rng = np.random.default_rng(0)
    w = rng.standard_normal((64, 48)).astype(np.float32)
    model = make_model([helper.make_node("MatMul", ["x", "W"], ["y"])],
                       [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 64])],
                       [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 48])], {"W": w})
    path = tmp_path / "m.onnx"
    path.write_bytes(model.SerializeToString())
    data = tmp_path / "calib"
    data.mkdir()
    samples = [rng.standard_normal((4, 64)).astype(np.float32) for _ in range(8)]
    for i, x in enumerate(samples):
        np.savez(data / f"s{i}.npz", x=x)
    return path, data, samples


def _sqnr(model_a, model_b, samples):
    a = ort.InferenceSession(str(model_a), providers=["CPUExecutionProvider"])
    b = ort.InferenceSession(str(model_b), providers=["CPUExecutionProvider"])
    ref = np.concatenate([a.run(None, {"x": x})[0].ravel() for x in samples]).astype(np.float64)
    out = np.concatenate([b.run(None, {"x": x})[0].ravel() for x in samples]).astype(np.float64)
    return 10 * np.log10(np.sum(ref**2) / np.sum((ref - out) ** 2))


@pytest.mark.parametrize("required", [20.0, 30.0])
def test_require_gives_a_small_plan_that_meets_the_requirement_on_held_out_samples(tmp_path, required):
    path, data, samples = _model(tmp_path)
    out = tmp_path / "o.onnx"
    result = CliRunner().invoke(main, ["compile", str(path), "-o", str(out), "--calib", str(data), "--json",
                                       "--kernels", "fp32-at-load", "--require", f"sqnr>={required}dB"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    held = report["sensitivity"]["held_out"]["samples"]
    assert held == [4, 5, 6, 7]  # the second half of the 8 calibration samples
    assert _sqnr(path, out, [samples[i] for i in held]) >= required  # measured here, with ONNX Runtime
    used = report["plan"]["defaults"]["used_bytes"]
    assert used < 64 * 48 * 4 * (0.3 if required == 20.0 else 0.5)  # far below FP32
    assert report["sensitivity"]["measured"]["require"]["figures"][0].startswith("sqnr")


def test_unreachable_requirement_exits_1_with_one_line_and_writes_nothing(tmp_path):
    path, data, _ = _model(tmp_path)
    out = tmp_path / "o.onnx"
    result = CliRunner().invoke(main, ["compile", str(path), "-o", str(out), "--calib", str(data),
                                       "--require", "sqnr>=200dB"])
    assert result.exit_code == 1
    lines = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(lines) == 1 and "sqnr>=200dB" in lines[0] and "bytes" in lines[0]
    assert not out.exists()


@pytest.mark.parametrize("args", [["--require", "flips<=abc"], ["--require", "sqnr<=3dB"],
                                  ["--objective", "nope=kl"], ["--objective", "y=mse"], ["--objective", "y"]])
def test_bad_require_or_objective_is_a_usage_error(tmp_path, args):
    path, data, _ = _model(tmp_path)
    result = CliRunner().invoke(main, ["compile", str(path), "-o", str(tmp_path / "o.onnx"), *args])
    assert result.exit_code == 2
    if "nope=kl" in args:
        assert "outputs: y" in result.stderr
    assert not (tmp_path / "o.onnx").exists()


def test_requirement_on_a_metric_no_output_has_is_an_error(tmp_path):
    path, data, _ = _model(tmp_path)
    result = CliRunner().invoke(main, ["compile", str(path), "-o", str(tmp_path / "o.onnx"), "--calib", str(data),
                                       "--require", "flips<=1%"])
    assert result.exit_code == 1
    assert "no task output has a flips figure" in result.stderr


def test_size_budget_caps_the_search(tmp_path):
    path, data, _ = _model(tmp_path)
    args = ["compile", str(path), "--calib", str(data), "--kernels", "fp32-at-load", "--json", "--require", "sqnr>=10dB"]
    roomy = CliRunner().invoke(main, [*args, "-o", str(tmp_path / "a.onnx"), "--size-budget", "6000"])
    assert roomy.exit_code == 0, roomy.output
    assert json.loads(roomy.stdout)["plan"]["defaults"]["used_bytes"] <= 6000
    tight = CliRunner().invoke(main, [*args, "-o", str(tmp_path / "b.onnx"), "--size-budget", "100"])
    assert tight.exit_code == 1 and "cap" in tight.stderr
    assert not (tmp_path / "b.onnx").exists()


def _counting_reader(tmp_path, n):
    """A reader of `n` samples that appends one line to a file per sample taken from it."""
    (tmp_path / "taken").write_text("")
    reader = tmp_path / "reader.py"
    reader.write_text(
        "import numpy as np\n"
        "def calib():\n"
        f"    rng = np.random.default_rng(1)\n"
        f"    for i in range({n}):\n"
        f"        open({str(tmp_path / 'taken')!r}, 'a').write('x\\n')\n"
        "        yield {'x': rng.standard_normal((4, 64)).astype(np.float32)}\n")
    return f"{reader}:calib"


@pytest.mark.parametrize("extra, taken", [
    ([], 32),  # no requirement: the default 32 samples
    (["--require", "sqnr>=10dB"], 128),  # a requirement takes more, for a tighter held-out bound
    (["--require", "sqnr>=10dB", "--calib-samples", "40"], 40),  # an explicit count wins
])
def test_require_defaults_to_more_calibration_samples(tmp_path, extra, taken):
    path = _model(tmp_path)[0]
    reader = _counting_reader(tmp_path, 300)
    result = CliRunner().invoke(main, ["compile", str(path), "-o", str(tmp_path / "o.onnx"),
                                       "--calib-reader", reader, *extra])
    assert result.exit_code == 0, result.output
    assert len((tmp_path / "taken").read_text().splitlines()) == taken


def test_scoring_and_the_plan_search_report_their_progress(tmp_path):
    """Long analyses report (what, done, total): every sensitivity task as it finishes, and every
    plan the --require search measures (its cap as the total); the CLI draws them as bars."""
    import q4c
    from q4c.config import CompileOptions
    from q4c.quant.require_search import MAX_PLANS

    path, data, _ = _model(tmp_path)
    seen: list[tuple[str, int, int]] = []
    report = q4c.compile_file(path, tmp_path / "o.onnx", CompileOptions(requirements=("sqnr>=20dB",), workers=2),
                              data=data, task_progress=lambda what, done, total: seen.append((what, done, total)))
    scoring = [(d, t) for w, d, t in seen if w == "scoring"]
    tasks = len(report["tensors"][0]["sensitivity"]["kl"])  # one task per candidate of the one weight
    assert sorted(d for d, _ in scoring) == list(range(1, tasks + 1)) and {t for _, t in scoring} == {tasks}
    plans = [d for w, d, t in seen if w == "measuring plans" and t == MAX_PLANS]
    assert plans == list(range(1, report["sensitivity"]["measured"]["require"]["plans_measured"] + 1))
    cli = CliRunner().invoke(main, ["compile", str(path), "-o", str(tmp_path / "c.onnx"), "--calib", str(data),
                                    "--require", "sqnr>=20dB"])
    assert cli.exit_code == 0 and "q4c: scoring" in cli.stderr and "q4c: measuring plans" in cli.stderr
