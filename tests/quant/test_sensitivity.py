import numpy as np
import pytest
from onnx import TensorProto, helper

from q4c.quant.sensitivity import WeightInputRunner, divergence, hutchinson_trace, output_kind
from q4c.testing import make_model


def _linear(w):
    k, n = w.shape
    return make_model([helper.make_node("MatMul", ["x", "W"], ["y"])],
                      [helper.make_tensor_value_info("x", TensorProto.FLOAT, [k, k])],
                      [helper.make_tensor_value_info("y", TensorProto.FLOAT, [k, n])], {"W": w})


def test_kl_of_log_probabilities_is_hand_computed():
    p = np.log(np.array([[0.5, 0.5]]))
    q = np.log(np.array([[0.9, 0.1]]))
    expected = 0.5 * np.log(0.5 / 0.9) + 0.5 * np.log(0.5 / 0.1)
    assert output_kind(p) == "logprob"
    assert divergence(p, q, "logprob") == pytest.approx(expected)


def test_runner_without_changes_gives_zero_divergence(rng):
    w = rng.standard_normal((8, 4)).astype(np.float32)
    runner = WeightInputRunner(_linear(w), {"W": w}, [{"x": rng.standard_normal((8, 8)).astype(np.float32)}])
    assert runner.divergence({}) == 0.0
    assert runner.divergence({"W": w + 0.1}) > 0


def test_hutchinson_matches_the_exact_hessian_trace_of_a_linear_layer(rng):
    # y = x W, a plain float output (snr objective): damage = |x E|^2 / (2 |y|^2). Its Hessian in E
    # is (x^T x (x) I_N) / |y|^2, so tr(H) = N sum_m |x_m|^2 / |y|^2. With orthogonal rows
    # (x diagonal) the Hessian is diagonal and Rademacher probes are exact.
    k, n = 8, 4
    w = rng.standard_normal((k, n)).astype(np.float32)
    x = np.diag(rng.uniform(0.5, 2.0, k)).astype(np.float32)
    y = x @ w
    exact = n * np.sum(x.astype(np.float64) ** 2) / np.sum(y.astype(np.float64) ** 2)
    runner = WeightInputRunner(_linear(w), {"W": w}, [{"x": x}])
    trace, stderr, probes = hutchinson_trace(lambda v: runner.divergence({"W": v}), w, rng, step=0.05)
    assert trace == pytest.approx(exact, rel=1e-2)
    assert probes == 2 and stderr <= 1e-2 * trace


def test_hutchinson_is_unbiased_with_correlated_inputs(rng):
    # General x: off-diagonal Hessian terms add variance, not bias; 8 probes land within 3 s.e.
    k, n = 8, 4
    w = rng.standard_normal((k, n)).astype(np.float32)
    x = rng.standard_normal((k, k)).astype(np.float32)
    exact = n * np.sum(x.astype(np.float64) ** 2) / np.sum((x @ w).astype(np.float64) ** 2)
    runner = WeightInputRunner(_linear(w), {"W": w}, [{"x": x}])
    trace, stderr, _ = hutchinson_trace(lambda v: runner.divergence({"W": v}), w, rng, step=0.05,
                                        min_probes=8, max_probes=8)
    assert abs(trace - exact) <= 3 * stderr + 1e-3 * exact


@pytest.mark.parametrize("measure_name", ["kl", "hessian"])
def test_parallel_scoring_gives_the_same_scores_as_one_thread(rng, measure_name):
    import dataclasses

    import onnx_graphsurgeon as gs

    from q4c.config import CompileOptions
    from q4c.quant.sensitivity import measure
    from q4c.testing import heavy_tailed

    model = make_model(
        [helper.make_node("MatMul", ["x", "A"], ["a"]), helper.make_node("MatMul", ["a", "B"], ["b"]),
         helper.make_node("MatMul", ["b", "C"], ["y"])],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 32])],
        {"A": heavy_tailed(rng, (64, 64)), "B": heavy_tailed(rng, (64, 64)), "C": heavy_tailed(rng, (64, 32))}, opset=21)
    samples = [{"x": rng.standard_normal((8, 64)).astype(np.float32)} for _ in range(3)]
    opts = CompileOptions(sensitivity=measure_name, candidates=(2, 4))
    one = measure(gs.import_onnx(model), dataclasses.replace(opts, workers=1), 21, samples)
    two = measure(gs.import_onnx(model), dataclasses.replace(opts, workers=3), 21, samples)
    assert one.scores == two.scores and two.workers == 3
    assert one.runner.runs == two.runner.runs  # the same forward passes, spread over threads
