"""Compile's own quality judgement (q4c.verify): thresholds over (output, metric, value)
measurements, the measurements themselves against an independent ONNX Runtime run, and the
refusal of NaN / infinite weights wherever they sit."""

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import q4c
from q4c import ort as q4ort
from q4c.config import CompileOptions
from q4c.errors import NonFiniteWeightError
from q4c.testing import heavy_tailed, make_model, run_ort
from q4c.verify import (
    QUALITY_THRESHOLDS,
    Measurement,
    Threshold,
    describe_loss,
    find_nonfinite_weights,
    judge_quality,
    measure_outputs,
    refuse_nonfinite_weights,
)

F = TensorProto.FLOAT


def _sqnr(ref, out):  # computed here, not by q4c
    ref, out = ref.astype(np.float64), out.astype(np.float64)
    return 10 * np.log10(np.sum(ref**2) / np.sum((ref - out) ** 2))


def mlp(rng, w2=None, *, w2_as_constant=False):
    """x [4, 64] -> MatMul W1 -> Tanh -> MatMul W2 -> y [4, 32]."""
    w1 = heavy_tailed(rng, (64, 128))
    w2 = heavy_tailed(rng, (128, 32)) if w2 is None else w2
    nodes = [helper.make_node("MatMul", ["x", "W1"], ["h"]), helper.make_node("Tanh", ["h"], ["t"]),
             helper.make_node("MatMul", ["t", "W2"], ["y"])]
    inits = {"W1": w1}
    if w2_as_constant:
        nodes.insert(0, helper.make_node("Constant", [], ["W2"], value=numpy_helper.from_array(w2, "W2_value")))
    else:
        inits["W2"] = w2
    return make_model(nodes, [helper.make_tensor_value_info("x", F, [4, 64])],
                      [helper.make_tensor_value_info("y", F, [4, 32])], inits, opset=17)


# -- judging ---------------------------------------------------------------------------------

def test_sqnr_below_20_db_is_lost_and_at_20_is_kept():
    quality = judge_quality([Measurement("y", "sqnr_db", 19.99), Measurement("state", "sqnr_db", 20.0)])
    assert quality["ok"] is False
    assert quality["lost"] == [{"output": "y", "metric": "sqnr_db", "value": 19.99, "threshold": 20.0}]
    assert quality["thresholds"] == {"sqnr_db": {"min": 20.0}, "flips": {"max": 0.01}, "kl": {"max": 0.1},
                                     "nonfinite": {"max": 0}}


def test_any_nonfinite_value_is_lost_and_none_is_ok():
    assert judge_quality([Measurement("y", "nonfinite", 0)])["ok"] is True
    lost = judge_quality([Measurement("y", "nonfinite", 1)])["lost"]
    assert [(x["output"], x["metric"], x["threshold"]) for x in lost] == [("y", "nonfinite", 0)]


def test_thresholds_extend_to_new_metrics_and_unknown_metrics_are_not_judged():
    kl = {**QUALITY_THRESHOLDS, "kl": Threshold(max=0.01)}
    measured = [Measurement("p", "kl", 0.02), Measurement("p", "prob_sqnr_db", 3.0)]
    quality = judge_quality(measured, kl)
    assert [x["metric"] for x in quality["lost"]] == ["kl"] and quality["lost"][0]["threshold"] == 0.01
    assert judge_quality(measured)["ok"] is True  # 0.02 nats is within the default 0.1; prob_sqnr_db is not judged
    assert len(judge_quality(measured)["measured"]) == 2


def test_default_thresholds_judge_flips_above_one_percent_and_kl_above_a_tenth_of_a_nat():
    lost = judge_quality([Measurement("p", "flips", 0.0101), Measurement("p", "flips", 0.01),
                          Measurement("d", "kl", 0.1001), Measurement("d", "kl", 0.1)])["lost"]
    assert [(x["metric"], x["value"]) for x in lost] == [("flips", 0.0101), ("kl", 0.1001)]
    assert describe_loss(lost[0]) == "output 'p': 1.01 % of decisions at 0.5 flipped vs FP32, above 1 %"


def test_loss_reads_as_one_line_naming_output_and_figure():
    assert describe_loss({"output": "stateN", "metric": "sqnr_db", "value": 1.6, "threshold": 20.0}) == \
        "output 'stateN': 1.6 dB SQNR vs FP32, below 20 dB"
    assert describe_loss({"output": "y", "metric": "nonfinite", "value": 3, "threshold": 0}) == \
        "output 'y': 3 NaN/inf values where FP32 has none"


# -- measuring -------------------------------------------------------------------------------

def test_measured_sqnr_pools_samples_and_matches_an_independent_computation(rng):
    model = mlp(rng)
    noisy = onnx.ModelProto()
    noisy.CopyFrom(model)
    w2 = numpy_helper.to_array(noisy.graph.initializer[1])
    noisy.graph.initializer[1].CopyFrom(numpy_helper.from_array(w2 + 0.02 * rng.standard_normal(w2.shape).astype(np.float32), "W2"))
    samples = [{"x": rng.standard_normal((4, 64)).astype(np.float32)} for _ in range(3)]
    got = measure_outputs(q4ort.make_session(noisy), q4ort.make_session(model), [[s] for s in samples])

    ref = np.concatenate([run_ort(model, s)["y"].ravel() for s in samples])
    out = np.concatenate([run_ort(noisy, s)["y"].ravel() for s in samples])
    values = {m.metric: m.value for m in got}
    assert values["nonfinite"] == 0
    assert values["sqnr_db"] == pytest.approx(_sqnr(ref, out), abs=0.01)


def test_nan_in_the_compiled_output_only_is_counted_not_turned_into_nan_sqnr(rng):
    model = mlp(rng)
    broken = onnx.ModelProto()
    broken.CopyFrom(model)
    w2 = numpy_helper.to_array(broken.graph.initializer[1]).copy()
    w2[:, 5] = np.nan  # column 5 of y becomes NaN on every row: 4 rows x 2 samples
    broken.graph.initializer[1].CopyFrom(numpy_helper.from_array(w2, "W2"))
    samples = [{"x": rng.standard_normal((4, 64)).astype(np.float32)} for _ in range(2)]
    got = measure_outputs(q4ort.make_session(broken), q4ort.make_session(model), [[s] for s in samples])
    assert [(m.metric, m.value) for m in got] == [("nonfinite", 8)]


def _vad_cell(w: np.ndarray, r: np.ndarray, v: np.ndarray) -> onnx.ModelProto:
    """h = tanh(x W + state R); p = sigmoid(h V): a state output and a probability output."""
    nodes = [helper.make_node("MatMul", ["x", "W"], ["xw"]), helper.make_node("MatMul", ["state", "R"], ["hr"]),
             helper.make_node("Add", ["xw", "hr"], ["pre"]), helper.make_node("Tanh", ["pre"], ["state_out"]),
             helper.make_node("MatMul", ["state_out", "V"], ["logit"]), helper.make_node("Sigmoid", ["logit"], ["p"])]
    return make_model(nodes, [helper.make_tensor_value_info("x", F, [1, 8]), helper.make_tensor_value_info("state", F, [1, 16])],
                      [helper.make_tensor_value_info("p", F, [1, 1]), helper.make_tensor_value_info("state_out", F, [1, 16])],
                      {"W": w, "R": r, "V": v}, opset=17)


def test_stateful_outputs_are_judged_closed_loop_by_their_objective(rng):
    from q4c.objectives import detect_objectives

    w, r, v = (rng.standard_normal(s).astype(np.float32) for s in ((8, 16), (16, 16), (16, 1)))
    model = _vad_cell(w, (0.9 * r / 4).astype(np.float32), v)
    noisy = _vad_cell(w, ((0.9 * r + 0.3 * rng.standard_normal(r.shape)) / 4).astype(np.float32), v)
    units = [[{"x": rng.standard_normal((1, 8)).astype(np.float32), "state": np.zeros((1, 16), np.float32)}
              for _ in range(40)] for _ in range(3)]
    pairs = {"state_out": "state"}
    objectives = detect_objectives(model, pairs)
    got = {(m.output, m.metric): m.value for m in measure_outputs(
        q4ort.make_session(noisy), q4ort.make_session(model), units, objectives, pairs)}

    def closed_loop(m):  # each model fed its own state, computed here with ONNX Runtime
        out = []
        for unit in units:
            state = unit[0]["state"]
            for feeds in unit:
                res = run_ort(m, {"x": feeds["x"], "state": state})
                state = res["state_out"]
                out.append(res["p"].ravel())
        return np.concatenate(out)

    ref, act = closed_loop(model), closed_loop(noisy)
    flips = float(np.mean((ref >= 0.5) != (act >= 0.5)))
    assert flips > 0  # the premise: the noisy recurrence changes decisions
    assert got[("p", "flips")] == pytest.approx(flips)
    assert ("state_out", "sqnr_db") not in got and got[("state_out", "nonfinite")] == 0  # state is not judged
    assert ("p", "sqnr_db") not in got  # probabilities are judged by their decisions, not by SQNR


# -- non-finite weights ----------------------------------------------------------------------

def test_nan_initializer_is_refused_naming_tensor_and_count(rng):
    w2 = heavy_tailed(rng, (128, 32))
    w2[0, :3] = np.nan
    with pytest.raises(NonFiniteWeightError) as e:
        refuse_nonfinite_weights(mlp(rng, w2), allow=False)
    assert str(e.value) == "weight 'W2' holds 3 NaN values; fix the export (or pass --allow-nonfinite)"


def test_inf_in_a_constant_node_feeding_matmul_is_refused(rng):
    w2 = heavy_tailed(rng, (128, 32))
    w2[1, 1], w2[2, 2] = np.inf, -np.inf
    with pytest.raises(NonFiniteWeightError, match="weight 'W2' holds 2 infinite values"):
        refuse_nonfinite_weights(mlp(rng, w2, w2_as_constant=True), allow=False)


def test_nan_in_an_if_branch_weight_is_found(rng):
    w = heavy_tailed(rng, (8, 8))
    w[3, 3] = np.nan
    branch = helper.make_graph([helper.make_node("MatMul", ["x", "Wb"], ["yb"])], "then", [],
                               [helper.make_tensor_value_info("yb", F, [2, 8])], [numpy_helper.from_array(w, "Wb")])
    other = helper.make_graph([helper.make_node("Identity", ["x"], ["yo"])], "else", [],
                              [helper.make_tensor_value_info("yo", F, [2, 8])])
    model = make_model([helper.make_node("If", ["c"], ["y"], then_branch=branch, else_branch=other)],
                       [helper.make_tensor_value_info("c", TensorProto.BOOL, []),
                        helper.make_tensor_value_info("x", F, [2, 8])],
                       [helper.make_tensor_value_info("y", F, [2, 8])], opset=17)
    [found] = find_nonfinite_weights(model)
    assert (found.name, found.nan, found.inf, found.refused) == ("Wb", 1, 0, True)


def test_inf_reaching_matmul_through_constant_arithmetic_is_refused(rng):
    # W = Transpose(V) * s: the infinity in V is still a weight's
    v = heavy_tailed(rng, (32, 128))
    v[0, 0] = np.inf
    model = make_model([helper.make_node("Transpose", ["V"], ["Vt"]), helper.make_node("Mul", ["Vt", "s"], ["W"]),
                        helper.make_node("MatMul", ["x", "W"], ["y"])],
                       [helper.make_tensor_value_info("x", F, [4, 128])], [helper.make_tensor_value_info("y", F, [4, 32])],
                       {"V": v, "s": np.float32(0.5)}, opset=17)
    [found] = find_nonfinite_weights(model)
    assert found.refused and {"Vt", "W"} <= found.reaches


def test_minus_inf_attention_mask_and_clip_bound_are_not_refused(rng):
    # Where(mask, -inf, scores) and Clip(x, 0, inf): infinities meant by the exporter
    model = make_model(
        [helper.make_node("MatMul", ["x", "W"], ["s"]), helper.make_node("Where", ["m", "neg_inf", "s"], ["masked"]),
         helper.make_node("Clip", ["masked", "zero", "pos_inf"], ["y"])],
        [helper.make_tensor_value_info("x", F, [4, 64]), helper.make_tensor_value_info("m", TensorProto.BOOL, [4, 32])],
        [helper.make_tensor_value_info("y", F, [4, 32])],
        {"W": heavy_tailed(rng, (64, 32)), "neg_inf": np.float32(-np.inf), "zero": np.float32(0),
         "pos_inf": np.float32(np.inf)}, opset=17)
    assert {f.name for f in find_nonfinite_weights(model)} == {"neg_inf", "pos_inf"}
    assert refuse_nonfinite_weights(model, allow=False) == (model, [])


def test_allowed_nonfinite_weight_stays_float_with_a_warning(rng):
    w2 = heavy_tailed(rng, (128, 32))
    w2[0, :3] = np.nan
    x = rng.standard_normal((4, 64)).astype(np.float32)
    model = mlp(rng, w2)
    out, report = q4c.compile_model(model, CompileOptions(bits=4, allow_nonfinite=True), samples=[{"x": x}])
    kept = {q["name"]: q["bits"] for q in report["tensors"]}
    assert kept.get("W2", 32) == 32  # float (FLOAT = 32 bits) or not listed
    assert "W1" in kept and kept["W1"] == 4
    assert any("'W2' holds 3 NaN values: kept in float" in w for w in report["warnings"])
    # y is NaN exactly where FP32's is (columns 0-2)
    ref, got = run_ort(model, {"x": x})["y"], run_ort(out, {"x": x})["y"]
    assert np.isnan(ref).any()
    np.testing.assert_array_equal(np.isnan(ref), np.isnan(got))


def test_allowed_nonfinite_gemm_weight_stays_float_after_lower_gemm_renames_it(rng):
    # lower-gemm turns Gemm(transB=1) into MatMul on a new tensor W_kn: the unnamed Gemm gets a
    # name so --keep-fp32 still holds it; the user's model is not touched
    w = heavy_tailed(rng, (32, 128))
    w[0, 0] = np.nan
    model = make_model([helper.make_node("MatMul", ["x", "W1"], ["h"]),
                        helper.make_node("Gemm", ["h", "W", "b"], ["y"], transB=1)],
                       [helper.make_tensor_value_info("x", F, [4, 64])], [helper.make_tensor_value_info("y", F, [4, 32])],
                       {"W1": heavy_tailed(rng, (64, 128)), "W": w, "b": np.zeros(32, np.float32)}, opset=17)
    before = model.SerializeToString()
    out, report = q4c.compile_model(model, CompileOptions(bits=4, allow_nonfinite=True))
    assert model.SerializeToString() == before
    assert {q["name"]: q["bits"] for q in report["tensors"] if q["bits"] != 32} == {"W1": 4}
    x = rng.standard_normal((4, 64)).astype(np.float32)
    ref, got = run_ort(model, {"x": x})["y"], run_ort(out, {"x": x})["y"]
    np.testing.assert_array_equal(np.isnan(ref), np.isnan(got))  # column 0 NaN in both, as FP32 says
