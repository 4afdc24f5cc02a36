"""compile --system: the SPEC's [objectives], the split of driver samples into scoring and
held-out, and the whole-plan guard judged on the held-out ones (issue 14)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from q4c.cli import main
from q4c.config import CompileOptions
from q4c.errors import ConfigError
from q4c.system_compile import compile_system
from q4c.system_score import MAX_SCORE_SAMPLES, split_samples

DRIVER = '''
import numpy as np

def run(graphs, sample):
    h = graphs["a"]({"x": sample})["h"]
    out = graphs["b"]({"h": h})
    return {"y": out["y"], "z": out["z"]}

def samples():
    rng = np.random.default_rng(7)
    return [rng.standard_normal((8, 64)).astype(np.float32) for _ in range(8)]
'''
OPTIONS = {"kernels": "fp32-at-load", "schemes": ("symmetric",), "workers": 1}


def _model(name: str, src: str, weights: dict[str, np.ndarray]) -> onnx.ModelProto:
    nodes = [helper.make_node("MatMul", [src, w], [out], name=f"mm_{out}") for out, w in
             ((o, f"W_{o}") for o in weights)]
    graph = helper.make_graph(nodes, name, [helper.make_tensor_value_info(src, TensorProto.FLOAT, [8, 64])],
                              [helper.make_tensor_value_info(o, TensorProto.FLOAT, [8, w.shape[1]]) for o, w in weights.items()],
                              [numpy_helper.from_array(w, f"W_{o}") for o, w in weights.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)


def _system(tmp_path: Path, objectives: str = "") -> Path:
    rng = np.random.default_rng(0)
    w = lambda n: (rng.standard_normal((64, n)) / 8).astype(np.float32)
    onnx.save(_model("a", "x", {"h": w(64)}), tmp_path / "a.onnx")
    onnx.save(_model("b", "h", {"y": w(64), "z": w(128)}), tmp_path / "b.onnx")
    (tmp_path / "driver.py").write_text(DRIVER)
    spec = tmp_path / "system.toml"
    spec.write_text('[graphs]\na = "a.onnx"\nb = "b.onnx"\n[driver]\nrun = "driver.py:run"\n'
                    'samples = "driver.py:samples"\n' + objectives)
    return spec


def _ort(path: Path, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return dict(zip([o.name for o in session.get_outputs()], session.run(None, feeds), strict=True))


def test_split_holds_out_the_last_quarter_and_scores_at_most_the_cap():
    s = split_samples(24)
    assert s.held == tuple(range(18, 24)) and s.score == tuple(range(MAX_SCORE_SAMPLES)) and s.unseen
    assert split_samples(8).held == (6, 7) and split_samples(8).score == tuple(range(6))
    few = split_samples(3)
    assert not few.unseen and few.held == (0, 1, 2) and few.score == (0, 1, 2)
    shuffled = split_samples(24, seed=1)
    assert shuffled.held != s.held and not set(shuffled.held) & set(shuffled.score)
    assert len(shuffled.held) == 6 and set(shuffled.held) | set(shuffled.score) <= set(range(24))


def test_spec_objectives_apply_and_the_command_line_wins(tmp_path):
    spec = _system(tmp_path, '[objectives]\nz = "ignore"\n')
    report = compile_system(spec, tmp_path / "one", CompileOptions(**OPTIONS))
    assert report["objectives"]["z"]["objective"] == "ignore" and report["objectives"]["y"]["objective"] == "snr"
    assert report["plan"]["tensors"]["b/W_z"]["bits"] == 2  # an ignored output's weight costs nothing
    report = compile_system(spec, tmp_path / "two", CompileOptions(objectives=(("z", "snr"),), **OPTIONS))
    assert report["objectives"]["z"]["objective"] == "snr"


@pytest.mark.parametrize("table, expected", [
    ('[objectives]\nz = "loud"\n', "[objectives]: objective of 'z' must be one of"),
    ('[objectives]\nq = "kl"\n', "[objectives] of the SPEC names 'q', not an output of the system's driver"),
])
def test_bad_spec_objectives_are_one_line_errors(tmp_path, table, expected):
    spec = _system(tmp_path, table)
    result = CliRunner().invoke(main, ["compile", "--system", str(spec), "-o", str(tmp_path / "out"),
                                       "--kernels", "fp32-at-load"])
    lines = [line for line in result.stderr.splitlines() if not line.startswith("q4c: ")]
    assert result.exit_code == 1 and len(lines) == 1 and expected in lines[0], result.stderr
    assert not (tmp_path / "out").exists()
    if "loud" in table:
        from q4c.system import load_spec

        with pytest.raises(ConfigError):
            load_spec(spec)


def test_report_judges_the_kept_plan_on_held_out_samples(tmp_path):
    spec = _system(tmp_path, '[objectives]\nz = "ignore"\n')
    report = compile_system(spec, tmp_path / "out", CompileOptions(**OPTIONS))  # uniform 4-bit fits
    measured = report["sensitivity"]["measured"]
    assert report["sensitivity"]["scored_on"] == list(range(6))
    assert {"mixed", "uniform 4-bit"} <= set(measured["compared"])
    damages = {k: v["damage"] for k, v in measured["compared"].items()}
    assert damages[measured["kept"]] == min(damages.values())
    gen = np.random.default_rng(7)
    xs = [gen.standard_normal((8, 64)).astype(np.float32) for _ in range(8)][6:]  # the held-out two
    out = tmp_path / "out"
    ref = np.stack([_ort(tmp_path / "b.onnx", {"h": _ort(tmp_path / "a.onnx", {"x": x})["h"]})["y"] for x in xs])
    got = np.stack([_ort(out / "b.onnx", {"h": _ort(out / "a.onnx", {"x": x})["h"]})["y"] for x in xs])
    sqnr = 10 * np.log10(np.sum(ref.astype(np.float64) ** 2) / np.sum((ref - got).astype(np.float64) ** 2))
    assert report["system"]["samples"] == 2
    assert abs(report["system"]["outputs"]["y"]["sqnr_db"] - sqnr) < 0.05
