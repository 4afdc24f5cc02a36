import numpy as np
import pytest
from onnx import TensorProto, helper

from q4c.objectives import Scorer, detect_objectives, parse_objective
from q4c.testing import make_model


def _vi(name, shape, dtype=TensorProto.FLOAT):
    return helper.make_tensor_value_info(name, dtype, shape)


def _heads_model():
    """x -> MatMul -> logits, feeding: Softmax -> Reshape (p), LogSoftmax -> Identity (logp),
    Sigmoid -> ReduceMean -> Squeeze (speech, as Silero's), the logits themselves (y), an
    ArgMax (int64), and a recurrent state h_out = Tanh(logits + h)."""
    w = np.ones((4, 4), np.float32)
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["sm"], axis=-1),
        helper.make_node("Reshape", ["sm", "shape"], ["p"]),
        helper.make_node("LogSoftmax", ["logits"], ["ls"], axis=1),
        helper.make_node("Identity", ["ls"], ["logp"]),
        helper.make_node("Sigmoid", ["logits"], ["sig"]),
        helper.make_node("ReduceMean", ["sig"], ["mean"], axes=[1], keepdims=1),
        helper.make_node("Squeeze", ["mean"], ["speech"]),
        helper.make_node("Identity", ["logits"], ["y"]),
        helper.make_node("ArgMax", ["logits"], ["best"], axis=1),
        helper.make_node("Add", ["logits", "h"], ["pre"]),
        helper.make_node("Tanh", ["pre"], ["h_out"]),
    ]
    outputs = [_vi("p", [4]), _vi("logp", [1, 4]), _vi("speech", []), _vi("y", [1, 4]),
               _vi("best", [1], TensorProto.INT64), _vi("h_out", [1, 4])]
    return make_model(nodes, [_vi("x", [1, 4]), _vi("h", [1, 4])], outputs,
                      {"W": w, "shape": np.array([4], np.int64)}, opset=17)


def test_objectives_follow_the_graph():
    found = detect_objectives(_heads_model(), state_outputs=["h_out"])
    assert {n: o.kind for n, o in found.items()} == {
        "p": "kl", "logp": "kl", "speech": "bce", "y": "snr", "best": "ignore", "h_out": "ignore"}
    assert (found["p"].form, found["logp"].form) == ("prob", "logprob")
    assert found["logp"].axis == 1  # Identity keeps the LogSoftmax axis; Reshape does not
    assert found["p"].axis == -1
    assert found["h_out"].reason.startswith("state")


def test_state_output_is_scored_when_not_declared_state():
    assert detect_objectives(_heads_model())["h_out"].kind == "snr"


def test_sigmoid_inside_both_if_branches_is_found():
    def branch(name, op):
        return helper.make_graph([helper.make_node(op, ["x"], [f"{name}_o"])], name, [], [_vi(f"{name}_o", [1, 4])])

    nodes = [helper.make_node("If", ["c"], ["o"], then_branch=branch("t", "Sigmoid"),
                              else_branch=branch("e", "Sigmoid"))]
    model = make_model(nodes, [_vi("x", [1, 4]), _vi("c", [], TensorProto.BOOL)], [_vi("o", [1, 4])], {}, opset=17)
    assert detect_objectives(model)["o"].kind == "bce"
    mixed = [helper.make_node("If", ["c"], ["o"], then_branch=branch("t", "Sigmoid"),
                              else_branch=branch("e", "Tanh"))]
    model = make_model(mixed, [_vi("x", [1, 4]), _vi("c", [], TensorProto.BOOL)], [_vi("o", [1, 4])], {}, opset=17)
    assert detect_objectives(model)["o"].kind == "snr"


def test_overrides_win_and_unknown_outputs_are_named():
    found = detect_objectives(_heads_model(), ["h_out"], {"y": "kl", "speech": "ignore", "h_out": "snr"})
    assert (found["y"].kind, found["y"].form) == ("kl", "logits")
    assert found["speech"].kind == "ignore" and found["h_out"].kind == "snr"
    with pytest.raises(KeyError, match="nope.*outputs: p, logp, speech, y, best, h_out"):
        detect_objectives(_heads_model(), [], {"nope": "kl"})


def test_parse_objective():
    assert parse_objective("a/b=KL") == ("a/b", "kl")
    for bad in ("y", "=kl", "y=mse"):
        with pytest.raises(ValueError):
            parse_objective(bad)


def test_scores_are_hand_computed():
    found = detect_objectives(_heads_model(), ["h_out"])
    scorer = Scorer(found, keep=True)
    ref1 = {"p": np.array([0.5, 0.5, 0, 0]), "logp": np.log([[0.25] * 4]), "speech": np.array(0.8),
            "y": np.array([[1.0, 2.0, 0.0, 0.0]]), "best": np.array([1]), "h_out": np.zeros((1, 4))}
    out1 = {"p": np.array([0.9, 0.1, 0, 0]), "logp": np.log([[0.25] * 4]), "speech": np.array(0.4),
            "y": np.array([[1.0, 1.0, 0.0, 0.0]]), "best": np.array([3]), "h_out": np.ones((1, 4))}
    ref2 = {**ref1, "speech": np.array(0.1), "y": np.array([[0.0, 0.0, 3.0, 0.0]])}
    out2 = {**out1, "speech": np.array(0.2), "y": np.array([[0.0, 0.0, 3.0, 0.0]])}
    scorer.add(ref1, out1)
    scorer.add(ref2, out2)
    kl_p = 0.5 * np.log(0.5 / 0.9) + 0.5 * np.log(0.5 / 0.1)  # both calls
    bkl = [0.8 * np.log(0.8 / 0.4) + 0.2 * np.log(0.2 / 0.6), 0.1 * np.log(0.1 / 0.2) + 0.9 * np.log(0.9 / 0.8)]
    snr = 0.5 * 1.0 / (1 + 4 + 9)  # noise and power pooled over both calls
    metrics = scorer.metrics()
    assert metrics["p"]["damage"] == pytest.approx(kl_p)
    assert metrics["logp"]["damage"] == pytest.approx(0.0)
    assert metrics["speech"]["damage"] == pytest.approx(np.mean(bkl))
    assert metrics["speech"]["flips"] == pytest.approx(0.5)  # 0.8 -> 0.4 crosses 0.5, 0.1 -> 0.2 does not
    assert metrics["y"]["damage"] == pytest.approx(snr)
    assert metrics["y"]["sqnr_db"] == pytest.approx(10 * np.log10(14.0), abs=0.01)
    assert set(metrics) == {"p", "logp", "speech", "y"}
    assert scorer.damage() == pytest.approx(kl_p + np.mean(bkl) + snr)
