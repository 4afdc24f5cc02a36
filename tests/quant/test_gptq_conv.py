"""GPTQ for Conv weights: Hessians from the input patches, q4c's Conv scale layouts, less output
error than nearest rounding, and a compiled model the checker, ONNX Runtime and the interpreter
agree on."""

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from onnx import TensorProto, helper

import q4c
from q4c.config import CompileOptions
from q4c.interp import run_model
from q4c.quant import gptq
from q4c.quant.conv_patches import ConvGeometry, conv_patches
from q4c.quant.gptq import fitting_calls, input_hessians
from q4c.quant.gptq_conv import gptq_conv
from q4c.quant.qparams import CLIP_RATIOS, quantize
from q4c.quant.weights import find_weight_slots
from q4c.testing import heavy_tailed, make_model, run_ort

F = TensorProto.FLOAT


def _loop_patches(x, kernel, stride, pad):
    """Patches of a 1-D conv input x [N, C, T] by explicit loops (the reference)."""
    n, c, t = x.shape
    xp = np.zeros((n, c, t + 2 * pad))
    xp[:, :, pad: pad + t] = x
    rows = []
    for b in range(n):
        for p in range(0, xp.shape[2] - kernel + 1, stride):
            rows.append([xp[b, ci, p + k] for ci in range(c) for k in range(kernel)])
    return np.array(rows)


def _conv_model(rng, c_in=24, c_out=16, kernel=3, stride=2):
    w = heavy_tailed(rng, (c_out, c_in, kernel))
    return make_model([helper.make_node("Conv", ["x", "W", "B"], ["y"], pads=[1, 1], strides=[stride])],
                      [helper.make_tensor_value_info("x", F, [1, c_in, "T"])],
                      [helper.make_tensor_value_info("y", F, [1, c_out, "U"])],
                      {"W": w, "B": rng.standard_normal(c_out).astype(np.float32)}, opset=21)


def _correlated(rng, mix, t):
    """[1, C, t] inputs whose channels are a low-rank mix (where error compensation pays)."""
    c = mix.shape[1]
    return ((rng.standard_normal((t, mix.shape[0])) @ mix + 0.2 * rng.standard_normal((t, c))).T[None]).astype(np.float32)


def test_patches_match_explicit_loops_and_reproduce_onnx_runtime_conv(rng):
    x = rng.standard_normal((2, 3, 11))
    geom = ConvGeometry(kernel=(4,), strides=(3,), pads=(2, 2), dilations=(1,))
    np.testing.assert_allclose(conv_patches(x, geom), _loop_patches(x, 4, 3, 2))
    # 2-D, strides, asymmetric pads and dilation: patches @ W^T is ONNX Runtime's Conv
    x2 = rng.standard_normal((2, 3, 9, 7)).astype(np.float32)
    w2 = rng.standard_normal((4, 3, 3, 2)).astype(np.float32)
    model = make_model([helper.make_node("Conv", ["x", "W"], ["y"], strides=[2, 1], pads=[1, 0, 1, 1], dilations=[1, 2])],
                       [helper.make_tensor_value_info("x", F, None)], [helper.make_tensor_value_info("y", F, None)],
                       {"W": w2}, opset=21)
    y = run_ort(model, {"x": x2})["y"]
    got = conv_patches(x2, ConvGeometry((3, 2), (2, 1), (1, 0, 1, 1), (1, 2))) @ w2.reshape(4, -1).T
    np.testing.assert_allclose(got, np.transpose(y, (0, 2, 3, 1)).reshape(-1, 4), atol=1e-5)


@pytest.mark.parametrize(("shape", "kind", "axis", "block"), [
    ((8, 40, 3), "block", 1, 16),    # blocks along C_in, last one short
    ((8, 1, 64), "block", 2, 16),    # blocks along the kernel (Silero's STFT basis layout)
    ((8, 5, 3), "channel", 0, 0),
    ((6, 20, 3, 3), "block", 1, 16),
])
def test_identity_hessian_is_nearest_rounding_in_every_conv_layout(rng, monkeypatch, shape, kind, axis, block):
    # Nothing to compensate without input correlation (and no dampening): quantize()'s codes and scales.
    monkeypatch.setattr(gptq, "DAMP", 0.0)
    w = heavy_tailed(rng, shape)
    cols = int(np.prod(shape[1:]))
    qw = gptq_conv(w, np.eye(cols), 4, kind=kind, axis=axis, block_size=block, clip_ratios=CLIP_RATIOS,
                   scale_dtype=np.float16)
    ref = quantize(w, 4, granularity=kind, axis=axis, block_size=block, scale_dtype=np.float16)
    np.testing.assert_array_equal(qw.q, ref.q)
    np.testing.assert_array_equal(qw.scale, ref.scale)


def test_conv_hessian_is_the_mean_outer_product_of_the_patches_and_gptq_lowers_output_error(rng):
    model = _conv_model(rng)
    graph = gs.import_onnx(model)
    slots = {s.tensor.name: s for s in find_weight_slots(graph) if not isinstance(s, tuple)}
    mix = rng.standard_normal((3, 24))
    samples = [{"x": _correlated(rng, mix, 40)} for _ in range(4)]
    hs = input_hessians(model, slots, samples)
    p = np.concatenate([_loop_patches(s["x"].astype(np.float64), 3, 2, 1) for s in samples])
    np.testing.assert_allclose(hs["W"][0], p.T @ p / len(p), rtol=1e-6, atol=1e-9)
    w = next(onnx.numpy_helper.to_array(t) for t in model.graph.initializer if t.name == "W")
    held_out = np.concatenate([_loop_patches(_correlated(rng, mix, 40).astype(np.float64), 3, 2, 1) for _ in range(4)])
    errors = {}
    for kind, axis, block in (("channel", 0, 0), ("block", 1, 8)):
        g = gptq_conv(w, hs["W"][0], 3, kind=kind, axis=axis, block_size=block, clip_ratios=CLIP_RATIOS, scale_dtype=np.float16)
        n = quantize(w, 3, granularity=kind, axis=axis, block_size=block, scale_dtype=np.float16)
        errors[kind] = [float(np.sum((held_out @ (q.dequantize() - w).reshape(16, -1).T) ** 2)) for q in (g, n)]
        assert errors[kind][0] < 0.8 * errors[kind][1], errors


def test_gptq_conv_compile_is_verified_and_more_accurate_than_nearest(rng, tmp_path):
    model = _conv_model(rng, c_in=64, c_out=32)
    path = tmp_path / "conv.onnx"
    onnx.save(model, path)
    calib = tmp_path / "calib"
    calib.mkdir()
    mix = rng.standard_normal((4, 64))
    for i in range(6):
        np.savez(calib / f"{i}.npz", x=_correlated(rng, mix, 100))
    x = _correlated(rng, mix, 50)
    ref = run_ort(model, {"x": x})["y"]
    errors = {}
    for scheme in ("symmetric", "gptq"):
        out = tmp_path / f"{scheme}.onnx"
        report = q4c.compile_file(path, out, CompileOptions(bits=3, scheme=scheme, min_elements=0), data=calib)
        assert {t["scheme"] for t in report["tensors"]} == {scheme}
        compiled = onnx.load(out)
        onnx.checker.check_model(compiled, full_check=True)
        got = run_ort(compiled, {"x": x})["y"]
        np.testing.assert_allclose(run_model(compiled, {"x": x})["y"], got, atol=1e-4)  # interpreter agrees
        errors[scheme] = float(np.mean((ref - got) ** 2))
    assert errors["gptq"] < 0.8 * errors["symmetric"], errors


def test_hessians_read_more_calls_until_every_column_has_enough_rows(rng):
    # 100 calls of one 16-wide row each: the first 8 calls alone would give a rank-8 Hessian (not
    # used: fewer rows than columns). Calls are
    # added, every 16th of the rest first (8, 24, 40, ...), until 4 rows per column (64 rows).
    model = make_model([helper.make_node("MatMul", ["x", "M"], ["y"])], [helper.make_tensor_value_info("x", F, [1, 16])],
                       [helper.make_tensor_value_info("y", F, [1, 4])], {"M": heavy_tailed(rng, (16, 4))}, opset=21)
    slots = {s.tensor.name: s for s in find_weight_slots(gs.import_onnx(model)) if not isinstance(s, tuple)}
    samples = [{"x": rng.standard_normal((1, 16)).astype(np.float32)} for _ in range(100)]
    assert "M" not in input_hessians(model, slots, samples)  # no extra calls given: 8 rows for 16 columns
    h = input_hessians(model, slots, samples, extra=samples)["M"][0]
    order = list(range(8)) + [i for offset in range(16) for i in range(8 + offset, 100, 16)]
    x = np.concatenate([samples[i]["x"] for i in order[:64]]).astype(np.float64)
    np.testing.assert_allclose(h, x.T @ x / 64, rtol=1e-6)
    assert np.linalg.eigvalsh(h).min() > 1e-3  # full rank


def test_extra_hessian_calls_come_from_the_scored_sequences_only():
    # Never from the held-out half: 10 sequences, 4 scored -> the first 4; 3 sequences -> the first 2
    # (at most the first half is fitted on, rounding up: 3 - 3 // 2).
    seqs = [[{"x": np.full((1, 1), 10 * u + c, np.float32)} for c in range(3)] for u in range(10)]
    assert [int(c["x"][0, 0]) for c in fitting_calls(seqs, 4)] == [0, 1, 2, 10, 11, 12, 20, 21, 22, 30, 31, 32]
    assert [int(c["x"][0, 0]) for c in fitting_calls(seqs[:3], 4)] == [0, 1, 2, 10, 11, 12]
    assert fitting_calls(None, 4) == []


def test_each_hessian_stops_at_its_own_rows_so_a_replayed_plan_gets_the_same_one(rng):
    # M1 reads 16 features (needs 64 rows), M2 64 features (needs 256): measured together or M1
    # alone (a replayed plan asks only for the weights it rounds with gptq), M1's Hessian is the same.
    model = make_model([helper.make_node("MatMul", ["a", "M1"], ["y1"]), helper.make_node("MatMul", ["b", "M2"], ["y2"])],
                       [helper.make_tensor_value_info("a", F, [1, 16]), helper.make_tensor_value_info("b", F, [1, 64])],
                       [helper.make_tensor_value_info("y1", F, [1, 4]), helper.make_tensor_value_info("y2", F, [1, 4])],
                       {"M1": heavy_tailed(rng, (16, 4)), "M2": heavy_tailed(rng, (64, 4))}, opset=21)
    slots = {s.tensor.name: s for s in find_weight_slots(gs.import_onnx(model)) if not isinstance(s, tuple)}
    samples = [{"a": rng.standard_normal((1, 16)).astype(np.float32), "b": rng.standard_normal((1, 64)).astype(np.float32)}
               for _ in range(400)]
    both = input_hessians(model, slots, samples, extra=samples)
    alone = input_hessians(model, {"M1": slots["M1"]}, samples, extra=samples)
    np.testing.assert_array_equal(both["M1"][0], alone["M1"][0])
    assert np.linalg.matrix_rank(both["M2"][0]) == 64  # M2 read on past M1's 64 rows
