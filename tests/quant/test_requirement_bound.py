"""--require judges decision flips by a bootstrap upper bound over the held-out units
(q4c.requirements.upper_bound), and q4c.quant.holdout.plan_metrics gives it per-unit counts."""

import numpy as np
import onnx
from onnx import TensorProto, helper
from q4c.passes.measure_sensitivity import MeasureSensitivityPass

from q4c.config import CompileOptions
from q4c.pipeline import PassContext
from q4c.quant.holdout import plan_metrics
from q4c.requirements import check_all, parse_requirement, upper_bound
from q4c.testing import make_model, run_ort, run_pass


def test_upper_bound_of_one_bad_unit_in_ten_is_the_binomial_quantile():
    # nine clean units and one with 10 flips in 100: a resample of 10 units holds the bad one
    # X ~ Binomial(10, 0.1) times, rate X / 100. P(X <= 1) = 0.736, P(X <= 2) = 0.930: the 90 %
    # quantile is X = 2, a 2 % rate (the pooled rate is 1 %).
    units = [[0, 100]] * 9 + [[10, 100]]
    assert upper_bound(units) == 0.02
    assert upper_bound(units, confidence=0.5) == 0.01
    assert upper_bound([[3, 100]] * 5) == 0.03  # identical units: no spread
    assert upper_bound([[3, 100]]) == 0.03  # one unit: the rate itself


def test_flips_are_judged_by_the_bound_and_the_point_figure_is_reported():
    metrics = {"p": {"objective": "bce", "damage": 0.01, "flips": 0.004, "flips_upper": 0.007,
                     "flips_units": [[1, 250], [1, 250], [0, 250], [2, 250]]}}
    ok, figures = check_all([parse_requirement("flips<=0.5%")], metrics)
    assert not ok
    assert figures == ["flips 0.7% (90% upper bound over 4 held-out units; measured 0.4%)"]
    assert check_all([parse_requirement("flips<=1%")], metrics)[0]


def _w_at_2_bits(model: onnx.ModelProto, samples: list[dict], held: slice) -> tuple[dict, onnx.ModelProto]:
    """plan_metrics of output p for the plan "W at 2 bits" on the `held` units, and the model with
    that plan's dequantized W (what ONNX Runtime checks the counts against)."""
    ctx = PassContext(options=CompileOptions(avg_bits=3.0), samples=samples, opset=25)
    run_pass(MeasureSensitivityPass(), model, ctx=ctx)
    metrics = plan_metrics(ctx.sensitivity, {"W": "2"}, ctx.options.granularity, held)["p"]
    deq = ctx.sensitivity.plan_changes({"W": "2"}, ctx.options.granularity)["W"]
    quant = onnx.helper.make_model(model.graph, opset_imports=model.opset_import)
    quant.graph.initializer[0].CopyFrom(onnx.numpy_helper.from_array(deq, "W"))
    return metrics, quant


def test_plan_metrics_counts_flips_per_unit_as_onnx_runtime_does(rng):
    # p = sigmoid(x @ W): the plan (W at 2 bits) flips some decisions; each unit's count must be
    # what ONNX Runtime's FP32 model and the dequantized weights give, and the units must pool.
    w = rng.standard_normal((128, 16)).astype(np.float32)
    model = make_model([helper.make_node("MatMul", ["x", "W"], ["z"]), helper.make_node("Sigmoid", ["z"], ["p"])],
                       [helper.make_tensor_value_info("x", TensorProto.FLOAT, [64, 128])],
                       [helper.make_tensor_value_info("p", TensorProto.FLOAT, [64, 16])], {"W": w}, opset=25)
    samples = [{"x": rng.standard_normal((64, 128)).astype(np.float32)} for _ in range(6)]
    metrics, quant = _w_at_2_bits(model, samples, slice(2, 6))
    expected = []
    for feeds in samples[2:]:
        ref, act = run_ort(model, feeds)["p"], run_ort(quant, feeds)["p"]
        expected.append([int(np.sum((ref >= 0.5) != (act >= 0.5))), ref.size])
    assert metrics["flips_units"] == expected
    assert sum(k for k, _ in expected) > 0
    assert np.isclose(metrics["flips"], sum(k for k, _ in expected) / sum(n for _, n in expected))
    assert metrics["flips_upper"] >= metrics["flips"]


def test_held_out_units_start_after_the_scored_and_the_fitted_ones():
    from q4c.requirements import require_split

    # 16 one-call units, scores on the first 4: the other 12 are held out
    assert require_split([1] * 16, 4, 0) == (slice(0, 4), slice(4, 16))
    # gptq statistics from the first 8 calls = the first 8 one-call units
    assert require_split([1] * 16, 4, 8) == (slice(0, 8), slice(8, 16))
    # long sequences: the 8 fitted calls lie inside the first unit; the scores' 4 units decide
    assert require_split([150] * 40, 4, 8) == (slice(0, 4), slice(4, 40))
    assert require_split([3, 3, 3, 150, 5, 5, 5, 5, 5, 5], 2, 10) == (slice(0, 4), slice(4, 10))
    # never fewer than half held out (the split before session 5)
    assert require_split([1] * 6, 4, 0) == (slice(0, 3), slice(3, 6))
    assert require_split([1] * 16, 4, 100) == (slice(0, 8), slice(8, 16))
    assert require_split([5, 5], 4, 0) == (slice(0, 1), slice(1, 2))


def test_strata_need_every_group_to_hold_enough_units():
    from q4c.quant.holdout import MIN_STRATUM_UNITS, strata

    assert strata(["sr=16000", "sr=8000"] * MIN_STRATUM_UNITS) == {
        "sr=16000": list(range(0, 2 * MIN_STRATUM_UNITS, 2)), "sr=8000": list(range(1, 2 * MIN_STRATUM_UNITS, 2))}
    few = ["a"] * 10 + ["b"] * (MIN_STRATUM_UNITS - 1)
    assert strata(few) == {"": list(range(len(few)))}
    assert strata([""] * 7) == {"": list(range(7))}


def test_flips_are_bounded_per_input_group_and_the_worst_group_decides(rng):
    # p = sigmoid((x @ W) * mode): mode 0 gives p = 0.5 whatever W is (no decision can flip),
    # mode 1 flips some; pooled, the mode-0 units would halve the rate the mode-1 units see
    w = rng.standard_normal((128, 16)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "W"], ["z"]), helper.make_node("Cast", ["mode"], ["m"], to=1),
             helper.make_node("Mul", ["z", "m"], ["zm"]), helper.make_node("Sigmoid", ["zm"], ["p"])]
    model = make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [64, 128]),
                               helper.make_tensor_value_info("mode", TensorProto.INT64, [])],
                       [helper.make_tensor_value_info("p", TensorProto.FLOAT, [64, 16])], {"W": w}, opset=25)
    samples = [{"x": rng.standard_normal((64, 128)).astype(np.float32), "mode": np.array(i % 2, np.int64)}
               for i in range(16)]
    metrics, quant = _w_at_2_bits(model, samples, slice(4, 16))
    counts = {0: [], 1: []}
    for feeds in samples[4:]:
        ref, act = run_ort(model, feeds)["p"], run_ort(quant, feeds)["p"]
        counts[int(feeds["mode"])].append([int(np.sum((ref >= 0.5) != (act >= 0.5))), ref.size])
    assert not any(k for k, _ in counts[0]) and sum(k for k, _ in counts[1]) > 0
    groups = metrics["flips_strata"]
    assert set(groups) == {"mode=0", "mode=1"}
    assert groups["mode=0"] == {"flips": 0.0, "flips_upper": 0.0, "units": 6}
    assert groups["mode=1"]["flips_upper"] == upper_bound(counts[1])
    assert metrics["flips_upper"] == upper_bound(counts[1]) > upper_bound(counts[0] + counts[1])
    _, figures = check_all([parse_requirement("flips<=0.5%")], {"p": metrics})
    assert "6 held-out units with mode=1, the worst of 2 input groups" in figures[0]


def test_units_are_interleaved_over_input_groups_so_the_scored_ones_cover_every_group():
    """Every third unit at 8 kHz (Silero's reader): the first four, which the scores run on, held
    one 8 kHz unit; round-robin they hold two, and each group keeps its own order."""
    from q4c.quant.holdout import interleaved

    units = [[{"x": np.full((1, 2), i, np.float32), "sr": np.array(8000 if i % 3 == 1 else 16000)}] for i in range(9)]
    order = [int(u[0]["x"][0, 0]) for u in interleaved(units)]
    assert order == [0, 1, 2, 4, 3, 7, 5, 6, 8]
    assert [int(u[0]["sr"]) for u in interleaved(units)][:4] == [16000, 8000, 16000, 8000]
    one_group = [[{"x": np.zeros((1, 2), np.float32)}] for _ in range(3)]
    assert interleaved(one_group) == one_group


def test_a_compile_scores_on_units_of_every_input_group_first(rng, tmp_path):
    """Through compile: the samples the pipeline analyses come grouped round-robin by sample rate."""
    import q4c
    from q4c.compiler import _context

    model = make_model([helper.make_node("Identity", ["x"], ["y"])],
                       [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4]),
                        helper.make_tensor_value_info("sr", TensorProto.INT64, [])],
                       [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])])
    samples = [{"x": np.full((1, 4), i, np.float32), "sr": np.array(8000 if i % 3 == 1 else 16000)} for i in range(6)]
    ctx = _context(model, q4c.CompileOptions(), samples, None)
    assert [int(s["sr"]) for s in ctx.samples] == [16000, 8000, 16000, 8000, 16000, 16000]
    assert [float(s["x"][0, 0]) for s in ctx.samples] == [0, 1, 2, 4, 3, 5]
