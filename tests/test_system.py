"""q4c compile --system: several graphs run by a driver, compiled under one plan (issue 14)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from q4c.cli import main
from q4c.compiler import compile_model
from q4c.config import CompileOptions
from q4c.system_compile import compile_system
from q4c.testing import TWO_GRAPH_DRIVER, write_two_graph_system

# Graph a: x [8, 64] -> MatMul W1 -> h.  Graph b: h -> MatMul W2 -> y, and h -> MatMul W3 -> z.
# The driver returns only y: z (the larger weight) is computed but unused, as DeepFilterNet3's
# encoder computes an lsnr nobody reads. Compiled graph by graph, b spends its bytes on W3 as on
# W2 (both outputs count); compiled as a system, W3 is free to shrink and W2 gets the bytes.

OPTIONS = {"kernels": "fp32-at-load", "schemes": ("symmetric",), "workers": 1}


def _ort(model: onnx.ModelProto | Path, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    data = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    return dict(zip([o.name for o in session.get_outputs()], session.run(None, feeds), strict=True))


def _y(a: onnx.ModelProto | Path, b: onnx.ModelProto | Path, xs: list[np.ndarray]) -> np.ndarray:
    return np.stack([_ort(b, {"h": _ort(a, {"x": x})["h"]})["y"] for x in xs])


def _weight_bytes(model: onnx.ModelProto | Path) -> int:
    proto = onnx.load(str(model)) if isinstance(model, Path) else model
    return sum(len(t.raw_data) if t.raw_data else t.ByteSize() for t in proto.graph.initializer)


def _sqnr(ref: np.ndarray, out: np.ndarray) -> float:  # hand-written: not the code under test
    return float(10 * np.log10(np.sum(ref.astype(np.float64) ** 2) / np.sum((ref - out).astype(np.float64) ** 2)))


def test_system_knapsack_beats_per_graph_budgets_on_the_driver_output(tmp_path, rng):
    spec = write_two_graph_system(tmp_path, rng)
    gen = np.random.default_rng(7)  # the driver's samples
    xs = [gen.standard_normal((8, 64)).astype(np.float32) for _ in range(4)]
    test_xs = [np.random.default_rng(100 + i).standard_normal((8, 64)).astype(np.float32) for i in range(4)]
    a, b = onnx.load(str(tmp_path / "a.onnx")), onnx.load(str(tmp_path / "b.onnx"))
    fp32 = _y(a, b, test_xs)

    # Graph by graph: each at its own uniform-4-bit budget, scored on its own outputs.
    hs = [_ort(a, {"x": x})["h"] for x in xs]
    a_q, _ = compile_model(a, CompileOptions(**OPTIONS), samples=[{"x": x} for x in xs])
    b_q, _ = compile_model(b, CompileOptions(**OPTIONS), samples=[{"h": h} for h in hs])
    per_graph = _y(a_q, b_q, test_xs)

    report = compile_system(spec, tmp_path / "out", CompileOptions(**OPTIONS))
    out = tmp_path / "out"
    system = _y(out / "a.onnx", out / "b.onnx", test_xs)

    plan = report["plan"]["tensors"]
    assert plan["b/W3"]["bits"] < 4 < plan["b/W2"]["bits"]  # the unused output's weight paid for W2
    assert _weight_bytes(out / "a.onnx") + _weight_bytes(out / "b.onnx") <= _weight_bytes(a_q) + _weight_bytes(b_q)
    sqnr_system, sqnr_per_graph = _sqnr(fp32, system), _sqnr(fp32, per_graph)
    assert sqnr_system > sqnr_per_graph + 10  # measured 42.3 vs 18.9 dB
    assert abs(report["system"]["outputs"]["y"]["sqnr_db"] - _sqnr(
        _y(a, b, xs), _y(out / "a.onnx", out / "b.onnx", xs))) < 0.5  # the report's figure, on the driver's samples
    assert sorted(p.name for p in out.iterdir()) == ["a.onnx", "b.onnx", "report.json"]


def test_saved_system_plan_replays_to_the_same_graphs(tmp_path, rng):
    spec = write_two_graph_system(tmp_path, rng)
    runner = CliRunner()
    first = runner.invoke(main, ["compile", "--system", str(spec), "-o", str(tmp_path / "one"), "--kernels",
                                 "fp32-at-load", "--schemes", "symmetric", "--save-plan", str(tmp_path / "plan.json")])
    assert first.exit_code == 0, first.output
    plan = json.loads((tmp_path / "plan.json").read_text())
    assert set(plan["tensors"]) == {"a/W1", "b/W2", "b/W3"}
    second = runner.invoke(main, ["compile", "--system", str(spec), "-o", str(tmp_path / "two"), "--kernels",
                                  "fp32-at-load", "--plan", str(tmp_path / "plan.json")])
    assert second.exit_code == 0, second.output
    for name in ("a.onnx", "b.onnx"):
        one, two = onnx.load(str(tmp_path / "one" / name)), onnx.load(str(tmp_path / "two" / name))
        assert {t.name: t.raw_data for t in one.graph.initializer} == {t.name: t.raw_data for t in two.graph.initializer}


@pytest.mark.parametrize("case, expected", [
    ("missing_file", "graph 'b': no such file"),
    ("missing_driver", "driver run = 'driver.py:run': no such file"),
    ("driver_raises", "driver driver.py:run raised on sample 0: ValueError: boom"),
    ("never_called", "graph 'b' of"),
])
def test_spec_errors_exit_1_with_one_line_and_write_nothing(tmp_path, rng, case, expected):
    spec = write_two_graph_system(tmp_path, rng)
    if case == "missing_file":
        (tmp_path / "b.onnx").unlink()
    elif case == "missing_driver":
        (tmp_path / "driver.py").unlink()
    elif case == "driver_raises":
        (tmp_path / "driver.py").write_text(TWO_GRAPH_DRIVER.replace('    h = graphs["a"]', '    raise ValueError("boom")\n    h = graphs["a"]'))
    else:
        (tmp_path / "driver.py").write_text(TWO_GRAPH_DRIVER.replace('graphs["b"]({"h": h})["y"]', 'h'))
    before = sorted(p.name for p in tmp_path.iterdir())
    result = CliRunner().invoke(main, ["compile", "--system", str(spec), "-o", str(tmp_path / "out"),
                                       "--kernels", "fp32-at-load", "--schemes", "symmetric"])
    assert result.exit_code == 1
    lines = [line for line in result.stderr.splitlines() if not line.startswith("q4c: ")]  # progress lines
    assert len(lines) == 1 and lines[0].startswith("Error: ") and expected in lines[0], result.stderr
    if case == "never_called":
        assert "never called by driver driver.py:run" in lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no OUTDIR, no temporary directory left


def test_diff_system_compares_the_driver_outputs(tmp_path, rng):
    spec = write_two_graph_system(tmp_path, rng)
    runner = CliRunner()
    compiled = runner.invoke(main, ["compile", "--system", str(spec), "-o", str(tmp_path / "out"), "--bits", "2",
                                    "--kernels", "fp32-at-load"])
    assert compiled.exit_code == 0, compiled.output
    gen = np.random.default_rng(7)  # the driver's samples
    xs = [gen.standard_normal((8, 64)).astype(np.float32) for _ in range(4)]
    expected = _sqnr(_y(tmp_path / "a.onnx", tmp_path / "b.onnx", xs),
                     _y(tmp_path / "out" / "a.onnx", tmp_path / "out" / "b.onnx", xs))
    result = runner.invoke(main, ["diff", "--system", str(spec), str(tmp_path / "out"), "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert abs(doc["outputs"]["y"]["sqnr_db"] - expected) < 0.05 and doc["samples"] == 4
    over = runner.invoke(main, ["diff", "--system", str(spec), str(tmp_path / "out"), "--tolerance", str(expected + 1)])
    assert over.exit_code == 3  # uniform 2-bit is below its own SQNR + 1 dB


def test_bench_system_needs_every_graph_in_outdir(tmp_path, rng):
    spec = write_two_graph_system(tmp_path, rng)
    (tmp_path / "out").mkdir()
    onnx.save(onnx.load(str(tmp_path / "a.onnx")), tmp_path / "out" / "a.onnx")
    result = CliRunner().invoke(main, ["bench", "--system", str(spec), str(tmp_path / "out")])
    assert result.exit_code == 1
    expected = f"Error: {tmp_path / 'out'}: graph 'b': no such file {tmp_path / 'out' / 'b.onnx'}"
    assert result.stderr.strip().splitlines() == [expected]


def test_require_finds_a_system_plan_meeting_the_sqnr_on_held_out_samples(tmp_path, rng):
    spec = write_two_graph_system(tmp_path, rng)
    report = compile_system(spec, tmp_path / "out", CompileOptions(requirements=("sqnr>=30dB",), **OPTIONS))
    gen = np.random.default_rng(7)  # the driver's samples; the last two (of 4) are held out
    held = [gen.standard_normal((8, 64)).astype(np.float32) for _ in range(4)][2:]
    out = tmp_path / "out"
    measured = _sqnr(_y(tmp_path / "a.onnx", tmp_path / "b.onnx", held), _y(out / "a.onnx", out / "b.onnx", held))
    assert measured >= 29.5  # materialised like the scored plan, measured independently
    assert report["sensitivity"]["measured"]["require"]["bytes"] < 4 * (64 * 64 * 2 + 64 * 256)  # below FP32
    assert report["plan"]["tensors"]["b/W3"]["bits"] == 2  # the unused output's weight costs nothing


def test_require_that_no_plan_meets_exits_1_and_writes_nothing(tmp_path, rng):
    spec = write_two_graph_system(tmp_path, rng)
    result = CliRunner().invoke(main, ["compile", "--system", str(spec), "-o", str(tmp_path / "out"), "--kernels",
                                       "fp32-at-load", "--schemes", "symmetric", "--require", "sqnr>=200dB", "--avg-bits", "3"])
    assert result.exit_code == 1
    lines = [line for line in result.stderr.splitlines() if not line.startswith("q4c: ")]
    assert len(lines) == 1 and "no system plan smaller than the cap of" in lines[0], result.stderr
    assert not (tmp_path / "out").exists()


def test_a_graph_with_nothing_to_quantize_is_written_as_it_is(tmp_path, rng):
    spec = write_two_graph_system(tmp_path, rng)
    relu = helper.make_graph([helper.make_node("Relu", ["y"], ["r"])], "c",
                             [helper.make_tensor_value_info("y", TensorProto.FLOAT, [8, 64])],
                             [helper.make_tensor_value_info("r", TensorProto.FLOAT, [8, 64])])
    onnx.save(helper.make_model(relu, opset_imports=[helper.make_opsetid("", 17)], ir_version=10), tmp_path / "c.onnx")
    (tmp_path / "driver.py").write_text(TWO_GRAPH_DRIVER.replace('return {"y": graphs["b"]({"h": h})["y"]}',
                                                       'return {"r": graphs["c"]({"y": graphs["b"]({"h": h})["y"]})["r"]}'))
    spec.write_text(spec.read_text().replace('b = "b.onnx"\n', 'b = "b.onnx"\nc = "c.onnx"\n'))
    report = compile_system(spec, tmp_path / "out", CompileOptions(bits=4, **OPTIONS))
    assert (tmp_path / "out" / "c.onnx").read_bytes() == (tmp_path / "c.onnx").read_bytes()
    assert report["graphs"]["c"]["tensors"] == [] and report["graphs"]["b"]["avg_weight_bits"] == 4


def test_unchanged_graphs_answer_from_the_fp32_run_only_when_their_feeds_match(tmp_path, rng):
    from q4c.system import CallLog, SystemRunner, load_spec

    spec = load_spec(write_two_graph_system(tmp_path, rng))
    models = {n: onnx.load(str(p)) for n, p in spec.graphs.items()}
    for m in models.values():  # initializers listed as inputs too: a feed may override them
        m.graph.input.extend(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in m.graph.initializer)
    sessions = {n: ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
                for n, m in models.items()}
    ran: list[str] = []

    def run_graph(name, feeds, changes):  # changes: initializers fed as inputs override them in ORT
        ran.append(name)
        out = sessions[name].run(None, {**feeds, **changes})
        return dict(zip([o.name for o in sessions[name].get_outputs()], out, strict=True))

    runner = SystemRunner(spec, run_graph)
    x = rng.standard_normal((8, 64)).astype(np.float32)
    log = CallLog()
    fp32 = runner.run(x, 0, log=log)
    w2 = numpy_helper.to_array(models["b"].graph.initializer[0]) * 0.5
    ran.clear()
    changed_b = runner.run(x, 0, {"b": {"W2": w2}}, cached=log)
    assert ran == ["b"]  # a's call got the FP32 feeds: answered from the log
    np.testing.assert_allclose(changed_b["y"], 0.5 * fp32["y"], rtol=1e-5, atol=1e-6)
    w1 = numpy_helper.to_array(models["a"].graph.initializer[0]) * 2.0
    ran.clear()
    changed_a = runner.run(x, 0, {"a": {"W1": w1}}, cached=log)
    assert ran == ["a", "b"]  # b's feeds differ from the FP32 run's: it runs
    np.testing.assert_allclose(changed_a["y"], 2.0 * fp32["y"], rtol=1e-5, atol=1e-6)


def test_strict_exits_4_and_writes_nothing_when_a_system_output_loses_quality(tmp_path, rng):
    spec = write_two_graph_system(tmp_path, rng)
    result = CliRunner().invoke(main, ["compile", "--system", str(spec), "-o", str(tmp_path / "out"), "--bits", "2",
                                       "--kernels", "fp32-at-load", "--strict", "--report", str(tmp_path / "r.json")])
    assert result.exit_code == 4, result.output
    lost = json.loads((tmp_path / "r.json").read_text())["system"]["quality"]["lost"]
    assert [x["output"] for x in lost] == ["y"] and lost[0]["value"] < 20  # uniform 2-bit: 6.6 dB
    assert not (tmp_path / "out").exists()


def test_options_the_driver_replaces_are_usage_errors_withwrite_two_graph_system(tmp_path, rng):
    spec = write_two_graph_system(tmp_path, rng)
    result = CliRunner().invoke(main, ["compile", "--system", str(spec), "-o", str(tmp_path / "out"),
                                       "--calib", str(tmp_path / "a.onnx")])
    assert result.exit_code == 2 and "--calib cannot be used with --system" in result.stderr


def test_objective_names_a_driver_output_not_a_graph_output(tmp_path, rng):
    spec = write_two_graph_system(tmp_path, rng)
    report = compile_system(spec, tmp_path / "out", CompileOptions(objectives=(("y", "kl"),), **OPTIONS))
    assert report["objectives"]["y"]["objective"] == "kl" and (tmp_path / "out" / "b.onnx").is_file()
