"""compile/diff/bench --system: every way a SPEC or its driver can be wrong is one line naming the
graph or the driver function, exit 1, and nothing written (issue 14, "Errors")."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from q4c.cli import main

DRIVER = '''
import numpy as np
CALLS = [0]

def run(graphs, sample):
    CALLS[0] += 1
    h = graphs["a"]({"x": sample})["h"]
    return {"y": graphs["b"]({"h": h})["y"]}

def samples():
    rng = np.random.default_rng(7)
    return [rng.standard_normal((8, 64)).astype(np.float32) for _ in range(4)]
'''


def _mm(name: str, src: str, dst: str, w: np.ndarray) -> onnx.ModelProto:
    graph = helper.make_graph([helper.make_node("MatMul", [src, "W"], [dst])], name,
                              [helper.make_tensor_value_info(src, TensorProto.FLOAT, [8, 64])],
                              [helper.make_tensor_value_info(dst, TensorProto.FLOAT, [8, 64])],
                              [numpy_helper.from_array(w, "W")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)


def _system(tmp_path: Path, driver: str = DRIVER, spec_extra: str = "") -> Path:
    rng = np.random.default_rng(0)
    for name, src, dst in (("a", "x", "h"), ("b", "h", "y")):
        onnx.save(_mm(name, src, dst, (rng.standard_normal((64, 64)) / 8).astype(np.float32)), tmp_path / f"{name}.onnx")
    (tmp_path / "driver.py").write_text(driver)
    spec = tmp_path / "system.toml"
    spec.write_text('[graphs]\na = "a.onnx"\nb = "b.onnx"\n' + spec_extra +
                    '[driver]\nrun = "driver.py:run"\nsamples = "driver.py:samples"\n')
    return spec


def _one_error_line(result) -> str:
    lines = [line for line in result.stderr.splitlines() if not line.startswith("q4c: ")]  # progress lines
    assert result.exit_code == 1, result.output
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    assert "Traceback" not in result.output
    return lines[0]


@pytest.mark.parametrize("case, expected", [
    ("samples_raise", "driver driver.py:samples raised: RuntimeError: no audio"),
    ("no_samples", "driver driver.py:samples returned no samples"),
    ("missing_function", "driver run = 'driver.py:nosuch'"),
    ("unknown_graph", "driver driver.py:run raised on sample 0: KeyError: 'c'"),
    ("bad_output", "driver driver.py:run returned list on sample 0"),
    ("raises_after_fp32", "driver driver.py:run raised on sample"),
    ("missing_absolute_file", "graph 'c': no such file"),
])
def test_compile_system_errors_are_one_line_and_write_nothing(tmp_path, case, expected):
    driver, extra = DRIVER, ""
    if case == "samples_raise":
        driver = DRIVER.replace("    rng = np.random", "    raise RuntimeError('no audio')\n    rng = np.random")
    elif case == "no_samples":
        driver = DRIVER.replace("for _ in range(4)]", "for _ in range(0)]")
    elif case == "unknown_graph":
        driver = DRIVER.replace('graphs["b"]', 'graphs["c"]')
    elif case == "bad_output":
        driver = DRIVER.replace('return {"y": graphs["b"]({"h": h})["y"]}', 'return [h]')
    elif case == "raises_after_fp32":  # the 4 FP32 runs pass; the driver fails while plans are scored
        driver = DRIVER.replace("    h = graphs", "    if CALLS[0] > 6:\n        raise ValueError('late')\n    h = graphs")
    elif case == "missing_absolute_file":
        extra = f'c = "{tmp_path / "nowhere" / "c.onnx"}"\n'
    spec = _system(tmp_path, driver, extra)
    if case == "missing_function":
        spec.write_text(spec.read_text().replace("driver.py:run", "driver.py:nosuch"))
    before = sorted(p.name for p in tmp_path.iterdir())
    result = CliRunner().invoke(main, ["compile", "--system", str(spec), "-o", str(tmp_path / "out"),
                                       "--kernels", "fp32-at-load", "--schemes", "symmetric", "--workers", "1"])
    line = _one_error_line(result)
    assert expected in line, line
    if case == "missing_function":
        assert "has no function 'nosuch'" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no OUTDIR, no temporary directory left


@pytest.mark.parametrize("command", ["diff", "bench"])
def test_diff_and_bench_system_name_the_driver_that_raises(tmp_path, command):
    spec = _system(tmp_path)
    runner = CliRunner()
    compiled = runner.invoke(main, ["compile", "--system", str(spec), "-o", str(tmp_path / "out"), "--bits", "4",
                                    "--kernels", "fp32-at-load"])
    assert compiled.exit_code == 0, compiled.output
    # a new file: a driver file is imported once per process
    (tmp_path / "bad.py").write_text(DRIVER.replace("    h = graphs", "    raise ValueError('boom')\n    h = graphs"))
    spec.write_text(spec.read_text().replace('run = "driver.py:run"', 'run = "bad.py:run"'))
    before = sorted(p.name for p in tmp_path.rglob("*"))
    result = runner.invoke(main, [command, "--system", str(spec), str(tmp_path / "out")])
    line = _one_error_line(result)
    assert "driver bad.py:run raised on sample 0: ValueError: boom" in line, line
    assert sorted(p.name for p in tmp_path.rglob("*")) == before
