"""synthesize-constants: DFT bases and windows built here with numpy (np.fft, np.hanning, ...),
independently of q4c's formulas, must be regenerated within 1e-6 by q4c's interpreter and by
ONNX Runtime; anything else is left alone."""

import copy
import os
import tempfile

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from q4c.passes.fold_constants import FoldConstantsPass
from q4c.passes.synthesize_constants import SynthesizeConstantsPass

from q4c import graph as g
from q4c.quant.weights import WeightSlot, find_weight_slots
from q4c.testing import make_model, op_histogram, run_interp, run_ort, run_pass


def _window(name, n):
    if name == "none":
        return np.ones(n)
    if name == "hann":  # periodic, as torch.hann_window / librosa (fftbins=True)
        return np.hanning(n + 1)[:-1]
    if name == "hamming":
        return np.hamming(n + 1)[:-1]
    if name == "hamming_symmetric":
        return np.hamming(n)
    if name == "povey":  # Kaldi: symmetric hann ** 0.85
        return np.hanning(n) ** 0.85
    if name == "vorbis":
        t = np.arange(n)
        return np.sin(np.pi / 2 * np.sin(np.pi * (t + 0.5) / n) ** 2)
    raise ValueError(name)


def _stft_basis(n, window, scale=1.0):
    """[2(n/2+1), n]: real rows then imaginary rows of the one-sided DFT, windowed and scaled."""
    fourier = np.fft.fft(np.eye(n))[: n // 2 + 1]
    return np.vstack([fourier.real, fourier.imag]) * _window(window, n)[None, :] * scale


def _conv_model(basis):
    w = basis[:, None, :].astype(np.float32)  # [2K, 1, n], PyTorch STFT-as-Conv1d
    n = w.shape[-1]
    return make_model([helper.make_node("Conv", ["x", "basis"], ["y"], strides=[n // 2])],
                      [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 3 * n])],
                      [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, w.shape[0], 5])], {"basis": w}), w


def _matmul_model(basis):
    w = basis.T.astype(np.float32).copy()  # [n, 2K]: frames @ W
    n = w.shape[0]
    return make_model([helper.make_node("MatMul", ["x", "basis"], ["y"])],
                      [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, n])],
                      [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, w.shape[1]])], {"basis": w}), w


def _feeds(model, rng):
    x = model.graph.input[0]
    shape = [d.dim_value for d in x.type.tensor_type.shape.dim]
    return {x.name: rng.uniform(-1, 1, shape).astype(np.float32)}


def _tensor(model, name, feeds):
    """`name` (an intermediate) as computed by the interpreter and by ONNX Runtime."""
    probe = copy.deepcopy(model)
    probe.graph.output.append(helper.make_empty_tensor_value_info(name))
    return run_interp(probe, feeds)[name], run_ort(probe, feeds)[name]


def _weight_input(model):
    return next(n for n in model.graph.node if n.op_type in ("Conv", "MatMul")).input[1]


@pytest.mark.parametrize("n", [64, 256, 400, 512])
@pytest.mark.parametrize("window", ["none", "hann", "hamming", "povey"])
@pytest.mark.parametrize("layout", ["conv", "matmul"])
def test_dft_basis_is_regenerated_within_1e6(rng, n, window, layout):
    scale = {"none": 1.0, "hann": 1.0, "hamming": 1 / np.sqrt(n), "povey": 2.0 / n}[window]
    model, w = (_conv_model if layout == "conv" else _matmul_model)(_stft_basis(n, window, scale))
    out, result = run_pass(SynthesizeConstantsPass(), model)

    assert result.modified and result.stats["synthesized"] == 1
    assert 0 < result.stats["bytes_saved"] < w.nbytes
    assert not out.graph.initializer or max(numpy_helper.to_array(t).size for t in out.graph.initializer) < n
    assert out.ByteSize() < model.ByteSize() - w.nbytes + 1024  # the generator costs under 1 KiB
    g.check(out)

    feeds = _feeds(model, rng)
    via_interp, via_ort = _tensor(out, _weight_input(out), feeds)
    assert np.max(np.abs(via_interp - w)) <= 1e-6 and np.max(np.abs(via_ort - w)) <= 1e-6
    want = run_ort(model, feeds)["y"]
    np.testing.assert_allclose(run_ort(out, feeds)["y"], want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(run_interp(out, feeds)["y"], want, rtol=1e-5, atol=1e-5)


def test_basis_with_an_unnamed_window_keeps_only_the_window(rng):
    n = 256
    fourier = np.fft.fft(np.eye(n))[: n // 2 + 1]
    basis = np.vstack([fourier.real, fourier.imag]) * np.sqrt(np.hanning(n + 1)[:-1])  # sqrt-hann: no family
    model, w = _conv_model(basis)
    out, result = run_pass(SynthesizeConstantsPass(), model)

    assert result.stats["synthesized"] == 1
    assert w.nbytes - 2 * 1024 < result.stats["bytes_saved"] < w.nbytes - n * 4  # the window stays stored
    feeds = _feeds(model, rng)
    via_interp, via_ort = _tensor(out, _weight_input(out), feeds)
    assert np.max(np.abs(via_interp - w)) <= 1e-6 and np.max(np.abs(via_ort - w)) <= 1e-6


@pytest.mark.parametrize("window", ["hann", "hamming_symmetric", "povey", "vorbis"])
def test_window_tensor_is_regenerated(rng, window):
    w = (0.8 * _window(window, 400)).astype(np.float32)
    model = make_model([helper.make_node("Mul", ["x", "win"], ["y"])],
                       [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 400])],
                       [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 400])], {"win": w})
    out, result = run_pass(SynthesizeConstantsPass(), model)

    assert result.modified and result.stats["synthesized"] == 1 and result.stats["bytes_saved"] > 0
    feeds = _feeds(model, rng)
    name = next(n for n in out.graph.node if n.op_type == "Mul" and n.output[0] == "y").input[1]
    via_interp, via_ort = _tensor(out, name, feeds)
    assert np.max(np.abs(via_interp - w)) <= 1e-6 and np.max(np.abs(via_ort - w)) <= 1e-6


def test_near_miss_is_left_alone():
    basis = _stft_basis(256, "hann")
    basis[7, 100] += 1e-3
    model, w = _conv_model(basis)
    out, result = run_pass(SynthesizeConstantsPass(), model)

    assert not result.modified and result.stats == {"skipped_tolerance": 1}
    assert op_histogram(out) == {"Conv": 1}
    np.testing.assert_array_equal(numpy_helper.to_array(out.graph.initializer[0]), w)


def test_random_weight_of_basis_shape_is_left_alone(rng):
    model, w = _conv_model(rng.standard_normal((258, 256)) * 0.1)
    out, result = run_pass(SynthesizeConstantsPass(), model)
    assert not result.modified and not result.stats.get("synthesized")
    np.testing.assert_array_equal(numpy_helper.to_array(out.graph.initializer[0]), w)


def test_second_run_and_fold_constants_keep_the_generator():
    model, _ = _conv_model(_stft_basis(256, "hann"))
    out, _ = run_pass(SynthesizeConstantsPass(), model)

    assert not run_pass(SynthesizeConstantsPass(), out)[1].modified
    folded, result = run_pass(FoldConstantsPass(), out)
    assert not result.modified
    assert {"Range", "Cos", "Sin"} <= set(op_histogram(folded))
    # ...so the quantizer finds no weight to quantize in the Conv
    assert not [s for s in find_weight_slots(g.import_graph(folded)) if isinstance(s, WeightSlot)]


def test_onnx_runtime_folds_the_generator_at_session_load():
    model, _ = _conv_model(_stft_basis(256, "hann"))
    out, _ = run_pass(SynthesizeConstantsPass(), model)
    with tempfile.TemporaryDirectory() as tmp:
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        options.optimized_model_filepath = os.path.join(tmp, "opt.onnx")
        ort.InferenceSession(out.SerializeToString(), options, providers=["CPUExecutionProvider"])
        assert op_histogram(onnx.load(options.optimized_model_filepath)) == {"Conv": 1}


def test_bases_inside_if_branches_are_each_replaced(rng):
    def branch(name, n):
        w = _stft_basis(n, "hann")[:, None, :].astype(np.float32)
        node = helper.make_node("Conv", ["x", f"{name}_basis"], [f"{name}_y"], strides=[n])
        return helper.make_graph([node], name, [], [helper.make_tensor_value_info(f"{name}_y", TensorProto.FLOAT,
                                                                                   [1, n + 2, 512 // n])],
                                 initializer=[numpy_helper.from_array(w, f"{name}_basis")]), w
    then_graph, w16 = branch("then", 256)
    else_graph, w8 = branch("else", 128)
    model = make_model([helper.make_node("If", ["cond"], ["y"], then_branch=then_graph, else_branch=else_graph)],
                       [helper.make_tensor_value_info("cond", TensorProto.BOOL, []),
                        helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 512])],
                       [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, None, None])])
    out, result = run_pass(SynthesizeConstantsPass(), model)

    assert result.stats["synthesized"] == 2 and result.stats["bytes_saved"] > 0.99 * (w16.nbytes + w8.nbytes)
    g.check(out)
    x = rng.uniform(-1, 1, (1, 1, 512)).astype(np.float32)
    for cond in (True, False):
        feeds = {"cond": np.array(cond), "x": x}
        want = run_ort(model, feeds)["y"]
        np.testing.assert_allclose(run_ort(out, feeds)["y"], want, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(run_interp(out, feeds)["y"], want, rtol=1e-5, atol=1e-5)
