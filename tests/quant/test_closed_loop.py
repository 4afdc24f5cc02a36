"""Closed-loop scoring of a stateful model: the quantized model's own state fed back."""

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from q4c.calib.readers import SamplesReader
from q4c.compiler import compile_model
from q4c.config import CompileOptions
from q4c.quant.sensitivity import WeightInputRunner
from q4c.testing import make_model

H, X = 8, 4


def _cell(w, r, v):
    """h_out = tanh(x W + h R), y = h_out V: a recurrent cell whose state feeds the next call."""
    nodes = [helper.make_node("MatMul", ["x", "W"], ["xw"]), helper.make_node("MatMul", ["h", "R"], ["hr"]),
             helper.make_node("Add", ["xw", "hr"], ["pre"]), helper.make_node("Tanh", ["pre"], ["h_out"]),
             helper.make_node("MatMul", ["h_out", "V"], ["y"])]

    def vi(n, s):
        return helper.make_tensor_value_info(n, TensorProto.FLOAT, s)

    return make_model(nodes, [vi("x", [1, X]), vi("h", [1, H])], [vi("y", [1, 2]), vi("h_out", [1, H])],
                      {"W": w, "R": r, "V": v}, opset=17)


def _setup(calls=200, sequences=3):
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((X, H)) * 0.05).astype(np.float32)
    r = (0.99 * np.eye(H)).astype(np.float32)  # long memory: state errors compound
    v = rng.standard_normal((H, 2)).astype(np.float32)
    seqs = []
    for _ in range(sequences):
        steps = [{"x": rng.standard_normal((1, X)).astype(np.float32)} for _ in range(calls)]
        h = np.zeros((1, H), np.float32)
        for step in steps:  # each call holds the FP32 state, as q4c.calib.runner.materialize makes them
            step["h"] = h
            h = np.tanh(step["x"] @ w + h @ r).astype(np.float32)
        seqs.append(steps)
    # A white error on W (it meets zero-mean inputs) and a small coherent one on R (it meets the
    # slowly varying state, and the error it puts in the state is fed back call after call).
    dw = (rng.standard_normal(w.shape) * 0.002).astype(np.float32)
    dr = (0.005 * np.eye(H)).astype(np.float32)
    return w, r, v, seqs, dw, dr


def _ort_loop_damage(model_ref, model_q, seqs):
    """Half the relative noise power of y over every call of every sequence, each model run in
    its own ONNX Runtime loop with its own state fed back (the snr objective, computed here)."""
    ref = ort.InferenceSession(model_ref.SerializeToString(), providers=["CPUExecutionProvider"])
    quant = ort.InferenceSession(model_q.SerializeToString(), providers=["CPUExecutionProvider"])
    noise = power = 0.0
    for steps in seqs:
        h_ref = h_q = np.zeros((1, H), np.float32)
        for step in steps:
            y_ref, h_ref = ref.run(["y", "h_out"], {"x": step["x"], "h": h_ref})
            y_q, h_q = quant.run(["y", "h_out"], {"x": step["x"], "h": h_q})
            noise += float(np.sum((y_ref.astype(np.float64) - y_q) ** 2))
            power += float(np.sum(y_ref.astype(np.float64) ** 2))
    return 0.5 * noise / power


def test_closed_loop_ranking_differs_from_open_loop_and_matches_the_measured_sequence_error():
    w, r, v, seqs, dw, dr = _setup()
    flat = [c for s in seqs for c in s]
    runners = {closed: WeightInputRunner(_cell(w, r, v), {"W": w, "R": r}, flat, sequences=seqs,
                                         state_pairs={"h_out": "h"}, closed_loop=closed) for closed in (False, True)}
    assert runners[True].divergence({}) == 0.0
    open_w, open_r = (runners[False].divergence(c) for c in ({"W": w + dw}, {"R": r + dr}))
    closed_w, closed_r = (runners[True].divergence(c) for c in ({"W": w + dw}, {"R": r + dr}))
    measured_w = _ort_loop_damage(_cell(w, r, v), _cell(w + dw, r, v), seqs)
    measured_r = _ort_loop_damage(_cell(w, r, v), _cell(w, r + dr, v), seqs)
    assert open_w > open_r  # open loop: W looks worse
    assert measured_r > measured_w and closed_r > closed_w  # in deployment R is worse, and closed loop says so
    assert closed_w == pytest.approx(measured_w, rel=1e-3)
    assert closed_r == pytest.approx(measured_r, rel=1e-3)
    assert runners[True].kinds == {"y": "snr", "h_out": "ignore"}


def test_compile_scores_sequences_closed_loop_by_default_and_open_loop_on_request():
    w, r, v, seqs, _, _ = _setup(calls=30, sequences=2)
    samples = [[{"x": s["x"]} for s in steps] for steps in seqs]  # state starts at zero, carried by q4c
    reports = {}
    for scoring in ("auto", "open-loop"):
        options = CompileOptions(min_elements=16, scoring=scoring, kernels="fp32-at-load", workers=1,
                                 candidates=(2, 4, 8))
        _, reports[scoring] = compile_model(_cell(w, r, v), options, samples=SamplesReader(samples, {"h_out": "h"}),
                                            verify=False)
    closed, opened = reports["auto"]["sensitivity"], reports["open-loop"]["sensitivity"]
    assert (closed["scoring"], closed["units"], closed["calls"]) == ("closed-loop", 2, 60)
    assert opened["scoring"] == "open-loop"
    assert closed["objectives"]["h_out"]["objective"] == "ignore"
    # R at 2 bits: its closed-loop score exceeds its open-loop one (the error compounds)
    scores = {k: {t["name"]: t["sensitivity"]["kl"] for t in rep["tensors"]} for k, rep in reports.items()}
    assert scores["auto"]["R"]["2"] > scores["open-loop"]["R"]["2"]
    assert "flips" not in closed["measured"]["plan"]["y"] and "sqnr_db" in closed["measured"]["plan"]["y"]
