"""q4c.diff: metrics against hand-computed values, tensor alignment on a bundled model with one
weight perturbed, per-step recurrent error on a hand-built LSTM."""

import math

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from q4c import ort as q4ort
from q4c.diff import ErrorStats, below_tolerance, diff_models, edit_distance, greedy_ctc
from q4c.errors import ConfigError
from q4c.testing import make_model


def perturb(model: onnx.ModelProto, name: str, scale: float = 1.1) -> onnx.ModelProto:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    for init in copy.graph.initializer:
        if init.name == name:
            value = numpy_helper.to_array(init)
            init.CopyFrom(numpy_helper.from_array((value * scale).astype(value.dtype), name))
            return copy
    raise AssertionError(f"no initializer {name}")


def middle_weight(model: onnx.ModelProto) -> tuple[str, str]:
    """A float weight initializer halfway down the graph, and the first tensor computed from it."""
    inits = {i.name for i in model.graph.initializer if i.data_type == TensorProto.FLOAT and np.prod(i.dims) > 1}
    first_use = {}
    for node in model.graph.node:
        for name in node.input:
            if name in inits and name not in first_use:
                first_use[name] = node.output[0]
    names = list(first_use)
    name = names[len(names) // 2]
    return name, first_use[name]


def test_error_stats_match_hand_computed_values():
    ref = np.array([3.0, 4.0], np.float32)
    other = np.array([3.0, 3.0], np.float32)
    stats = ErrorStats()
    stats.update(ref, other)
    m = stats.metrics()
    assert m["sqnr_db"] == round(10 * math.log10(25 / 1), 2)
    assert m["max_abs"] == 1.0 and m["mean_abs"] == 0.5
    assert m["cosine"] == pytest.approx((9 + 12) / (5 * math.sqrt(18)), abs=1e-8)
    same = ErrorStats()
    same.update(ref, ref)
    assert same.metrics() == {"sqnr_db": math.inf, "max_abs": 0.0, "mean_abs": 0.0, "cosine": 1.0}


def test_error_stats_pool_samples_of_different_lengths():
    pooled = ErrorStats()
    pooled.update(np.ones(3), np.zeros(3))
    pooled.update(np.full(1, 2.0), np.full(1, 2.0))
    # signal 3 + 4, noise 3
    assert pooled.metrics()["sqnr_db"] == round(10 * math.log10(7 / 3), 2)
    assert pooled.metrics()["mean_abs"] == 0.75


def test_error_stats_agreeing_infinities_are_exact_and_disagreeing_ones_infinite():
    mask = np.array([0.0, -np.inf, 2.0])
    agree = ErrorStats()
    agree.update(mask, np.array([0.0, -np.inf, 1.0]))
    assert agree.metrics()["sqnr_db"] == round(10 * math.log10(4 / 1), 2) and agree.metrics()["max_abs"] == 1.0
    differ = ErrorStats()
    differ.update(mask, np.array([0.0, -5.0, 2.0]))
    assert differ.metrics()["sqnr_db"] == -math.inf and differ.metrics()["max_abs"] == math.inf


def test_greedy_ctc_collapses_repeats_and_drops_blank():
    frames = [1, 1, 0, 1, 2, 2, 0, 0, 3]
    log_probs = np.log(np.eye(4)[frames] * 0.97 + 0.01)
    assert greedy_ctc(log_probs) == [1, 1, 2, 3]


def test_edit_distance_counts_substitutions_insertions_deletions():
    assert edit_distance([1, 2, 3], [1, 2, 3]) == 0
    assert edit_distance([1, 2, 3], [1, 4, 3]) == 1
    assert edit_distance([1, 2, 3], [1, 3]) == 1
    assert edit_distance([], [5, 6]) == 2
    assert edit_distance([1, 2, 3, 4], [2, 1, 4, 3, 5]) == 3  # insert 2; 2->4; 4->5


def _softmax_model(log: bool) -> onnx.ModelProto:
    op = "LogSoftmax" if log else "Softmax"
    return make_model(
        [helper.make_node("MatMul", ["x", "W"], ["z"]), helper.make_node(op, ["z"], ["p"], axis=-1)],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 6, 8])],
        [helper.make_tensor_value_info("p", TensorProto.FLOAT, [1, 6, 5])],
        {"W": np.random.default_rng(1).standard_normal((8, 5)).astype(np.float32)},
    )


@pytest.mark.parametrize("log", [False, True])
def test_probability_outputs_get_kl_and_argmax_agreement(log, rng):
    model = _softmax_model(log)
    other = perturb(model, "W", 1.5)
    x = rng.standard_normal((1, 6, 8)).astype(np.float32)
    doc = diff_models(model, other, [{"x": x}])
    out = doc["outputs"]["p"]
    assert out["kind"] == ("log_prob" if log else "prob")
    w = numpy_helper.to_array(model.graph.initializer[0]).astype(np.float64)
    z_ref, z_other = x[0] @ w, x[0] @ (w * np.float32(1.5))
    log_p = z_ref - np.log(np.exp(z_ref).sum(-1, keepdims=True))
    log_q = z_other - np.log(np.exp(z_other).sum(-1, keepdims=True))
    assert out["kl"] == pytest.approx(float((np.exp(log_p) * (log_p - log_q)).sum(-1).mean()), rel=1e-4)
    assert out["argmax_agreement"] == 1.0  # scaling logits keeps every arg-max
    # a model with float inputs and [batch, time, vocab] log-probs is read as CTC
    assert ("ctc" in out) == log
    if log:
        assert out["ctc"]["transcript_match"] == 1.0 and out["ctc"]["token_error_rate"] == 0.0


def test_model_against_itself_is_identical_everywhere(bundled):
    model = onnx.load(bundled("bilstm_am"))
    feeds = dict(np.load(bundled("bilstm_am").with_suffix(".npz")))
    doc = diff_models(model, model, [feeds], tensors=True)
    assert doc["outputs"]["log_probs"]["sqnr_db"] == math.inf
    assert doc["outputs"]["log_probs"]["ctc"]["transcript_match"] == 1.0
    assert doc["first_error"] is None
    assert doc["tensors"] and all(t["max_abs"] == 0 for t in doc["tensors"])
    assert doc["tensors_skipped"]["only_in_reference"] == 0 and doc["tensors_skipped"]["only_in_other"] == 0
    assert set(doc["recurrent"]) == {"/rnn/LSTM", "/rnn/LSTM_1", "/rnn/LSTM_2"}
    assert all(len(r["per_step_sqnr_db"]) == 160 and set(r["per_step_sqnr_db"]) == {math.inf}
               for r in doc["recurrent"].values())
    assert below_tolerance(doc, 1000.0) == []


@pytest.mark.parametrize("name", ["bilstm_am", "conformer"])
def test_perturbed_weight_shows_first_at_its_consumer(bundled, name):
    model = onnx.load(bundled(name))
    weight, consumer_output = middle_weight(model)
    other = perturb(model, weight)
    feeds = dict(np.load(bundled(name).with_suffix(".npz")))
    doc = diff_models(model, other, [feeds], tensors=True)
    assert doc["first_error"]["name"] == consumer_output
    names = [t["name"] for t in doc["tensors"]]
    index = names.index(consumer_output)
    assert all(t["sqnr_db"] == math.inf for t in doc["tensors"][:index])
    assert math.isfinite(doc["tensors"][index]["sqnr_db"])
    (out,) = doc["outputs"].values()
    assert math.isfinite(out["sqnr_db"]) and out["sqnr_db"] > 0
    assert below_tolerance(doc, out["sqnr_db"] + 1) == [model.graph.output[0].name]


def test_ort_backend_outputs_agree_with_interpreter_backend(bundled):
    model = onnx.load(bundled("bilstm_am"))
    weight, _ = middle_weight(model)
    other = perturb(model, weight)
    feeds = dict(np.load(bundled("bilstm_am").with_suffix(".npz")))
    by_interp = diff_models(model, other, [feeds])
    a, b = q4ort.make_session(model, threads=1), q4ort.make_session(other, threads=1)
    by_ort = diff_models(model, other, [feeds], run_reference=lambda f: q4ort.run(a, f),
                         run_other=lambda f: q4ort.run(b, f))
    assert by_ort["outputs"]["log_probs"]["sqnr_db"] == pytest.approx(by_interp["outputs"]["log_probs"]["sqnr_db"],
                                                                      abs=0.05)


def _lstm_model(rng, seq: int = 6, hidden: int = 4) -> onnx.ModelProto:
    return make_model(
        [helper.make_node("LSTM", ["x", "W", "R", "B"], ["y"], name="lstm", hidden_size=hidden)],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["seq", 1, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["seq", 1, 1, hidden])],
        {"W": rng.standard_normal((1, 4 * hidden, 3)).astype(np.float32) * 0.5,
         "R": rng.standard_normal((1, 4 * hidden, hidden)).astype(np.float32) * 0.5,
         "B": np.zeros((1, 8 * hidden), np.float32)},
    )


def test_recurrent_error_per_step_starts_after_the_recurrent_weight_is_first_used(rng):
    model = _lstm_model(rng)
    other = perturb(model, "R", 1.3)
    feeds = {"x": rng.standard_normal((6, 1, 3)).astype(np.float32)}
    doc = diff_models(model, other, [feeds, {"x": feeds["x"][:4]}], tensors=True)
    steps = doc["recurrent"]["lstm"]
    assert steps["op"] == "LSTM" and len(steps["per_step_max_abs"]) == 6
    # h_{-1} = 0, so R has no effect on step 0: the first step is exact, every later one is not
    assert steps["per_step_max_abs"][0] == 0.0 and steps["per_step_sqnr_db"][0] == math.inf
    assert all(e > 0 for e in steps["per_step_max_abs"][1:])
    # Y is h at every step: ONNX Runtime's Y gives the same per-step error, pooled over both samples
    a, b = q4ort.make_session(model, threads=1), q4ort.make_session(other, threads=1)
    errors = [np.abs(q4ort.run(a, f)["y"] - q4ort.run(b, f)["y"]).reshape(len(f["x"]), -1).max(1)
              for f in (feeds, {"x": feeds["x"][:4]})]
    expected = np.maximum(errors[0], np.pad(errors[1], (0, 2)))
    np.testing.assert_allclose(steps["per_step_max_abs"], expected, rtol=1e-4, atol=1e-6)


def test_models_with_different_outputs_are_refused(rng):
    model = _lstm_model(rng)
    other = onnx.ModelProto()
    other.CopyFrom(model)
    other.graph.output[0].name = "z"
    other.graph.node[0].output[0] = "z"
    with pytest.raises(ConfigError, match="outputs differ"):
        diff_models(model, other, [{"x": np.zeros((6, 1, 3), np.float32)}])
