"""Models stored with external data: loaded, converted, compiled and saved without copying every
weight through protobuf (q4c.external_data); a tiny member of models/make_large.py's family."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner

from q4c import external_data
from q4c import graph as g
from q4c import ort as q4ort
from q4c.cli import main
from q4c.compiler import compile_file
from q4c.config import CompileOptions
from q4c.errors import ModelLoadError
from q4c.testing import run_interp

MAKE_LARGE = Path(__file__).resolve().parents[2] / "models" / "make_large.py"


def _make_large():
    spec = importlib.util.spec_from_file_location("make_large", MAKE_LARGE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """A 2-layer Whisper-like encoder (d_model 64), weights in tiny.onnx.data beside it."""
    return _make_large().build(tmp_path_factory.mktemp("tiny"), layers=2, d_model=64, heads=4, ffn=256,
                               name="tiny.onnx")


def _mel(rng: np.random.Generator, frames: int = 16) -> dict[str, np.ndarray]:
    return {"mel": rng.standard_normal((1, 80, frames)).astype(np.float32)}


def test_generator_writes_weights_as_external_data(tiny):
    skeleton = onnx.load(str(tiny), load_external_data=False)
    external = [t for t in skeleton.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    assert len(external) >= 14  # 2 conv kernels, 6 matrices per layer (tensors under 1 KiB stay inline)
    assert tiny.with_name("tiny.onnx.data").stat().st_size > 4 * 200_000  # ~224k float32 parameters


def test_load_reads_external_data_and_the_session_runs_it_like_ort_from_the_path(tiny, rng):
    model = g.load(tiny)
    assert not external_data.has_external_data(model)  # data now inline
    feeds = _mel(rng)
    by_path = ort.InferenceSession(str(tiny), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    np.testing.assert_allclose(run_interp(model, feeds)["hidden"], by_path, rtol=1e-5, atol=1e-5)


def test_missing_data_file_is_a_one_line_error(tiny, tmp_path):
    lonely = tmp_path / "tiny.onnx"
    lonely.write_bytes(tiny.read_bytes())  # the .onnx without its .data
    with pytest.raises(ModelLoadError, match=r"cannot read its external data: .*tiny\.onnx\.data"):
        g.load(lonely)
    result = CliRunner().invoke(main, ["compile", str(lonely), "-o", str(tmp_path / "out.onnx"), "--bits", "4"])
    assert result.exit_code == 1
    assert result.output.startswith("Error: ") and "Traceback" not in result.output
    assert not (tmp_path / "out.onnx").exists()


def test_convert_opset_without_weights_equals_converting_the_whole_model(tiny):
    model = g.load(tiny)
    light = g.convert_opset(model, 21)
    whole = onnx.version_converter.convert_version(model, 21)
    assert g.default_opset(light) == 21
    assert not list(external_data.placeholders(light))
    by_name = {t.name: t for t in whole.graph.initializer}
    assert {t.name for t in light.graph.initializer} == set(by_name)
    for t in light.graph.initializer:
        np.testing.assert_array_equal(onnx.numpy_helper.to_array(t), onnx.numpy_helper.to_array(by_name[t.name]))
    assert [n.op_type for n in light.graph.node] == [n.op_type for n in whole.graph.node]


def test_session_of_a_large_model_reads_its_weights_from_a_file_it_then_deletes(tiny, rng, monkeypatch):
    model = g.load(tiny)
    feeds = _mel(rng)
    plain = q4ort.run(q4ort.make_session(model, threads=1), feeds)["hidden"]
    monkeypatch.setattr(q4ort, "SESSION_DETACH_BYTES", 0)
    written = []
    real = external_data.write_for_session

    def spy(proto, directory):
        path = real(proto, directory)
        skel = onnx.load(str(path), load_external_data=False)
        written.append((path, sum(t.data_location == onnx.TensorProto.EXTERNAL for t in skel.graph.initializer)))
        return path

    monkeypatch.setattr(external_data, "write_for_session", spy)
    session = q4ort.make_session(model, threads=1)
    ((path, external),) = written
    assert external >= 14 and not path.parent.exists()  # the weights went through a file, deleted after loading
    np.testing.assert_array_equal(q4ort.run(session, feeds)["hidden"], plain)


def test_compile_of_external_data_model_loads_in_ort_and_agrees_with_the_interpreter(tiny, tmp_path, rng):
    out = tmp_path / "tiny.q4.onnx"
    report = compile_file(tiny, out, CompileOptions(bits=4))
    assert len(report["tensors"]) >= 12  # 6 matrices per layer (the position table is not a weight)
    assert report["output"]["bytes"] < tiny.with_name("tiny.onnx.data").stat().st_size
    compiled = onnx.load(str(out))
    feeds = _mel(rng, frames=24)
    got = q4ort.run(q4ort.make_session(str(out)), feeds)["hidden"]
    np.testing.assert_allclose(got, run_interp(compiled, feeds)["hidden"], rtol=1e-4, atol=1e-4)


def test_output_over_the_protobuf_limit_is_written_with_external_data(tiny, tmp_path, rng, monkeypatch):
    monkeypatch.setattr(g, "_PROTOBUF_LIMIT", 10_000)  # the tiny model stands for a > 2 GiB one
    out = tmp_path / "tiny.q4.onnx"
    compile_file(tiny, out, CompileOptions(bits=8))
    data = tmp_path / "tiny.q4.onnx.data"
    assert data.stat().st_size > 10_000
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.q4.onnx", "tiny.q4.onnx.data"]  # no staging left
    skeleton = onnx.load(str(out), load_external_data=False)
    assert external_data.has_external_data(skeleton)
    feeds = _mel(rng)
    got = q4ort.run(q4ort.make_session(str(out)), feeds)["hidden"]
    np.testing.assert_allclose(got, run_interp(g.load(out), feeds)["hidden"], rtol=1e-4, atol=1e-4)


def test_large_model_path_converts_in_place_of_the_loaded_copy_and_writes_the_same_bytes(tiny, tmp_path, monkeypatch):
    plain = tmp_path / "plain.onnx"
    compile_file(tiny, plain, CompileOptions(bits=4), verify=False)
    monkeypatch.setattr(q4ort, "SESSION_DETACH_BYTES", 0)  # the tiny model takes the large-model path
    converted = []
    real = g.convert_opset
    monkeypatch.setattr(g, "convert_opset", lambda m, t=21, consume=False: converted.append(consume) or real(m, t, consume=consume))
    large = tmp_path / "large.onnx"
    compile_file(tiny, large, CompileOptions(bits=4), verify=False)
    assert converted[0] is True  # compile_file gave its loaded copy away
    assert large.read_bytes() == plain.read_bytes()
