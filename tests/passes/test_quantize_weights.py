import ml_dtypes
import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from q4c.config import CompileOptions, Granularity, Target
from q4c.passes.assign_precision import AssignPrecisionPass
from q4c.passes.quantize_weights import QuantizeWeightsPass
from q4c.pipeline import PassContext
from q4c.testing import heavy_tailed, make_model, matmul_model, op_histogram, run_interp, run_ort, run_pass, sqnr_db

ONNX_ONLY = CompileOptions(target=Target.ONNX)


def _quantize(model, options=ONNX_ONLY):
    ctx = PassContext(options=options)
    planned, _ = run_pass(AssignPrecisionPass(), model, ctx=ctx)
    return run_pass(QuantizeWeightsPass(), planned, ctx=ctx)


def _initializer(model, name):
    return next(t for t in model.graph.initializer if t.name == name)


def test_matmul_weight_becomes_packed_int4_feeding_dequantize(rng):
    model = matmul_model(rng, m=4, k=64, n=16)
    packed, result = _quantize(model)

    assert result.modified and result.stats == {"quantized": 1}
    assert op_histogram(packed) == {"DequantizeLinear": 1, "MatMul": 1}
    codes = _initializer(packed, "W_int4")
    assert codes.data_type == TensorProto.INT4 and len(codes.raw_data) == 64 * 16 // 2
    dq = next(n for n in packed.graph.node if n.op_type == "DequantizeLinear")
    assert {a.name: a.i for a in dq.attribute} == {"axis": 0, "block_size": 64}  # auto: float32 scales
    assert list(_initializer(packed, "W_scale").dims) == [1, 16]

    feeds = {"x": rng.standard_normal((4, 64), dtype=np.float32)}
    np.testing.assert_allclose(run_interp(packed, feeds)["y"], run_ort(packed, feeds)["y"], rtol=1e-5, atol=1e-5)
    assert sqnr_db(run_ort(model, feeds)["y"], run_ort(packed, feeds)["y"]) > 15  # measured ~19 dB


def test_second_run_is_a_no_op(rng):
    packed, _ = _quantize(matmul_model(rng))
    ctx = PassContext(options=ONNX_ONLY)
    run_pass(AssignPrecisionPass(), packed, ctx=ctx)
    assert not run_pass(QuantizeWeightsPass(), packed, ctx=ctx)[1].modified


def test_dequantized_weight_matches_hand_quantization():
    # Per channel: column 0 has amax 0.7 -> scale 0.1, column 1 amax 0.14 -> scale 0.02; both
    # columns sit exactly on those grids, so clipping ratio 1.0 (zero error) must win.
    w = np.array([[0.7, 0.14], [-0.3, -0.04]] * 8, np.float32)  # K=16, N=2
    model = make_model([helper.make_node("MatMul", ["x", "W"], ["y"])],
                       [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16])],
                       [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2])], {"W": w})
    packed, _ = _quantize(model, CompileOptions(target=Target.ONNX, granularity=Granularity("channel"), min_elements=0))
    codes = numpy_helper.to_array(_initializer(packed, "W_int4")).astype(np.int8)
    scale = numpy_helper.to_array(_initializer(packed, "W_scale"))
    np.testing.assert_allclose(scale, [0.1, 0.02], rtol=1e-6)
    assert codes[:2].tolist() == [[7, 7], [-3, -2]]


def test_gemm_conv_lstm_gru_gather_einsum_weights_are_all_quantized(rng):
    f = TensorProto.FLOAT
    nodes = [
        helper.make_node("Gather", ["emb", "tok"], ["e"]),  # [1, 8, 64]
        helper.make_node("LSTM", ["e_t", "lw", "lr", "lb"], ["", "h", ""], hidden_size=32, direction="bidirectional"),
        helper.make_node("Transpose", ["e"], ["e_t"], perm=[1, 0, 2]),
        helper.make_node("GRU", ["e_t", "gw", "gr"], ["", "gh"], hidden_size=32),
        helper.make_node("Conv", ["img", "cw"], ["c"], pads=[1, 1]),
        helper.make_node("Einsum", ["e", "ew"], ["ee"], equation="btd,dk->btk"),
        helper.make_node("Gemm", ["g_in", "gemm_w"], ["gg"], transB=1),
    ]
    inits = {
        "emb": heavy_tailed(rng, (100, 64)), "lw": heavy_tailed(rng, (2, 128, 64)), "lr": heavy_tailed(rng, (2, 128, 32)),
        "lb": np.zeros((2, 256), np.float32), "gw": heavy_tailed(rng, (1, 96, 64)), "gr": heavy_tailed(rng, (1, 96, 32)),
        "cw": heavy_tailed(rng, (16, 8, 3)), "ew": heavy_tailed(rng, (64, 32)), "gemm_w": heavy_tailed(rng, (32, 64)),
    }
    model = make_model(
        nodes,
        [helper.make_tensor_value_info("tok", TensorProto.INT64, [1, 8]), helper.make_tensor_value_info("img", f, [1, 8, 20]),
         helper.make_tensor_value_info("g_in", f, [3, 64])],
        [helper.make_tensor_value_info(n, f, None) for n in ("h", "gh", "c", "ee", "gg")],
        inits,
    )
    packed, result = _quantize(model, CompileOptions(target=Target.ONNX, min_elements=256))
    assert result.stats["quantized"] == 8  # lb is a bias: never quantized
    assert op_histogram(packed)["DequantizeLinear"] == 8
    scales = {t.name: list(t.dims) for t in packed.graph.initializer if t.name.endswith("_scale")}
    assert scales["lw_scale"] == [2, 128, 2]  # per direction, per gate row, blocks along I
    assert scales["lr_scale"] == [2, 128, 1]  # H=32: one block per row
    assert scales["cw_scale"] == [16]  # Conv [M, C=8, k=3]: C, k < 32, one scale per channel (conv_block_layout)
    assert scales["emb_scale"] == [100, 1]  # embedding rows, blocks of 64 along D
    assert scales["gemm_w_scale"] == [32, 1]  # transB=1: [N, K], blocks along K
    assert {t.name: t.data_type for t in packed.graph.initializer}["lw_scale"] == TensorProto.FLOAT16

    feeds = {"tok": rng.integers(0, 100, (1, 8)), "img": rng.standard_normal((1, 8, 20), dtype=np.float32),
             "g_in": rng.standard_normal((3, 64), dtype=np.float32)}
    want, got = run_ort(packed, feeds), run_interp(packed, feeds)
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-5, atol=1e-5, err_msg=name)
    reference = run_ort(model, feeds)
    for name in want:
        assert sqnr_db(reference[name], want[name]) > 10, name


def test_small_weights_and_keep_fp32_stay_float(rng):
    model = matmul_model(rng, k=16, n=16)  # 256 elements < default 1024
    ctx = PassContext(options=ONNX_ONLY)
    _, result = run_pass(AssignPrecisionPass(), model, ctx=ctx)
    assert result.stats == {"skipped_small": 1}
    model = matmul_model(rng, k=64, n=64)
    ctx = PassContext(options=CompileOptions(target=Target.ONNX, keep_fp32=frozenset({"W"})))
    _, result = run_pass(AssignPrecisionPass(), model, ctx=ctx)
    assert result.stats == {"kept_fp32": 1}


@pytest.mark.parametrize("bits, dtype", [(8, np.int8), (2, ml_dtypes.int4), (3, ml_dtypes.int4)])
def test_other_bit_widths_use_their_storage_and_range(rng, bits, dtype):
    packed, _ = _quantize(matmul_model(rng, k=64, n=32), CompileOptions(target=Target.ONNX, bits=bits))
    codes = numpy_helper.to_array(next(t for t in packed.graph.initializer if t.name.startswith("W_int")))
    assert codes.dtype == dtype
    lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    assert codes.astype(np.int16).min() >= lo and codes.astype(np.int16).max() <= hi
