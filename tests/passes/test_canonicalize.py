"""fold-constants, lower-gemm, lower-pointwise-conv, dedupe-weights: semantics-preserving
rewrites, each checked by check_pass (checker, idempotence, ORT before == after == interpreter)."""

import numpy as np
from onnx import TensorProto, helper, numpy_helper

from q4c.passes.dedupe_weights import DedupeWeightsPass
from q4c.passes.fold_constants import FoldConstantsPass
from q4c.passes.lower_gemm import LowerGemmPass
from q4c.passes.lower_pointwise_conv import LowerPointwiseConvPass
from q4c.testing import check_pass, heavy_tailed, make_model, op_histogram, run_pass

F = TensorProto.FLOAT


def test_fold_constants_turns_pytorch_gate_reordering_into_an_initializer(rng):
    # PyTorch exports LSTM W as Constant -> Slice x4 -> Concat (gates i, f, g, o -> i, o, f, g).
    hidden, inp = 8, 6
    w = heavy_tailed(rng, (1, 4 * hidden, inp))
    nodes = [helper.make_node("Constant", [], ["w_raw"], value=numpy_helper.from_array(w, "w_raw"))]
    for i, (start, end) in enumerate([(0, 1), (3, 4), (1, 2), (2, 3)]):
        nodes.append(helper.make_node("Slice", ["w_raw", f"s{i}", f"e{i}", "ax"], [f"part{i}"]))
    nodes.append(helper.make_node("Concat", [f"part{i}" for i in range(4)], ["w"], axis=1))
    nodes.append(helper.make_node("LSTM", ["x", "w", "r"], ["y"], hidden_size=hidden))
    inits = {"r": heavy_tailed(rng, (1, 4 * hidden, hidden)), "ax": np.array([1], np.int64)}
    for i, (start, end) in enumerate([(0, 1), (3, 4), (1, 2), (2, 3)]):
        inits[f"s{i}"] = np.array([start * hidden], np.int64)
        inits[f"e{i}"] = np.array([end * hidden], np.int64)
    model = make_model(nodes, [helper.make_tensor_value_info("x", F, [5, 1, inp])],
                       [helper.make_tensor_value_info("y", F, [5, 1, 1, hidden])], inits)

    folded = check_pass(FoldConstantsPass(), model, {"x": rng.standard_normal((5, 1, inp), dtype=np.float32)})
    assert op_histogram(folded) == {"LSTM": 1}
    lstm_w = next(t for t in folded.graph.initializer if t.name == "w")
    expected = np.concatenate([w[:, 0:8], w[:, 24:32], w[:, 8:16], w[:, 16:24]], axis=1)
    np.testing.assert_array_equal(numpy_helper.to_array(lstm_w), expected)


def test_fold_constants_leaves_dequantize_alone(rng):
    import ml_dtypes

    codes = rng.integers(-8, 8, (16, 4)).astype(ml_dtypes.int4)
    model = make_model([helper.make_node("DequantizeLinear", ["q", "s"], ["w"], axis=1),
                        helper.make_node("MatMul", ["x", "w"], ["y"])],
                       [helper.make_tensor_value_info("x", F, [2, 16])], [helper.make_tensor_value_info("y", F, [2, 4])],
                       {"q": codes, "s": np.full(4, 0.1, np.float32)})
    _, result = run_pass(FoldConstantsPass(), model)
    assert not result.modified


def test_lower_gemm_trans_b_with_alpha_beta_and_bias(rng):
    model = make_model([helper.make_node("Gemm", ["x", "W", "b"], ["y"], transB=1, alpha=0.5, beta=2.0)],
                       [helper.make_tensor_value_info("x", F, [3, 64])], [helper.make_tensor_value_info("y", F, [3, 32])],
                       {"W": heavy_tailed(rng, (32, 64)), "b": heavy_tailed(rng, (32,))})
    out = check_pass(LowerGemmPass(), model, {"x": rng.standard_normal((3, 64), dtype=np.float32)})
    assert op_histogram(out) == {"Add": 1, "MatMul": 1}
    weight = next(t for t in out.graph.initializer if list(t.dims) == [64, 32])  # [K, N] for MatMulNBits
    assert weight.name == "W_kn"


def test_lower_gemm_declines_trans_a(rng):
    model = make_model([helper.make_node("Gemm", ["x", "W"], ["y"], transA=1)],
                       [helper.make_tensor_value_info("x", F, [64, 3])], [helper.make_tensor_value_info("y", F, [3, 32])],
                       {"W": heavy_tailed(rng, (64, 32))})
    _, result = run_pass(LowerGemmPass(), model)
    assert not result.modified and result.stats == {"skipped_trans_a": 1}


def test_lower_pointwise_conv_to_matmul(rng):
    model = make_model([helper.make_node("Conv", ["x", "W", "b"], ["y"], kernel_shape=[1]),
                        helper.make_node("Conv", ["x", "W3"], ["z"], pads=[1, 1]),  # kernel 3: not pointwise
                        helper.make_node("Conv", ["x", "Ws"], ["s"])],  # 64 weights: stays float, not lowered
                       [helper.make_tensor_value_info("x", F, [2, 64, 10])],
                       [helper.make_tensor_value_info("y", F, [2, 24, 10]), helper.make_tensor_value_info("z", F, [2, 24, 10]),
                        helper.make_tensor_value_info("s", F, [2, 1, 10])],
                       {"W": heavy_tailed(rng, (24, 64, 1)), "b": heavy_tailed(rng, (24,)), "W3": heavy_tailed(rng, (24, 64, 3)),
                        "Ws": heavy_tailed(rng, (1, 64, 1))})
    out = check_pass(LowerPointwiseConvPass(), model, {"x": rng.standard_normal((2, 64, 10), dtype=np.float32)})
    assert op_histogram(out) == {"Add": 1, "Conv": 2, "MatMul": 1, "Transpose": 2}


def test_dedupe_weights_shares_identical_tensors(rng):
    w = heavy_tailed(rng, (64, 32))
    model = make_model([helper.make_node("MatMul", ["x", "W1"], ["y1"]), helper.make_node("MatMul", ["x", "W2"], ["y2"])],
                       [helper.make_tensor_value_info("x", F, [2, 64])],
                       [helper.make_tensor_value_info("y1", F, [2, 32]), helper.make_tensor_value_info("y2", F, [2, 32])],
                       {"W1": w, "W2": w.copy()})
    out = check_pass(DedupeWeightsPass(), model, {"x": rng.standard_normal((2, 64), dtype=np.float32)})
    assert [t.name for t in out.graph.initializer] == ["W1"]
