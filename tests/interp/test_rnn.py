"""LSTM, GRU and RNN against ONNX Runtime for every attribute, and the per-step probes."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper

from q4c.interp import Interpreter

T, B, INPUT, H = 5, 3, 4, 6
GATES = {"LSTM": 4, "GRU": 3, "RNN": 1}


def recurrent_model(make_model, rng, op_type, *, direction="forward", seq=False, init=False, peepholes=False,
                    bias=True, layout=0, opset=14, **attrs):
    """One recurrent node with random weights; returns (model, feeds)."""
    nd = 2 if direction == "bidirectional" else 1
    g = GATES[op_type]
    inits = {
        "W": (rng.standard_normal((nd, g * H, INPUT)) * 0.5).astype(np.float32),
        "R": (rng.standard_normal((nd, g * H, H)) * 0.5).astype(np.float32),
    }
    names = ["X", "W", "R", "B" if bias else "", "seq" if seq else "", "h0" if init else ""]
    if bias:
        inits["B"] = (rng.standard_normal((nd, 2 * g * H)) * 0.5).astype(np.float32)
    if op_type == "LSTM":
        names += ["c0" if init else "", "P" if peepholes else ""]
        if peepholes:
            inits["P"] = (rng.standard_normal((nd, 3 * H)) * 0.5).astype(np.float32)
    while names[-1] == "":
        names.pop()
    x_shape = (B, T, INPUT) if layout else (T, B, INPUT)
    h_shape = (B, nd, H) if layout else (nd, B, H)
    inputs = [helper.make_tensor_value_info("X", TensorProto.FLOAT, x_shape)]
    feeds = {"X": rng.standard_normal(x_shape).astype(np.float32)}
    if seq:
        inputs.append(helper.make_tensor_value_info("seq", TensorProto.INT32, (B,)))
        feeds["seq"] = np.array([T, 2, 4], dtype=np.int32)[:B]
    if init:
        states = ["h0", "c0"] if op_type == "LSTM" else ["h0"]
        for name in states:
            inputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, h_shape))
            feeds[name] = rng.standard_normal(h_shape).astype(np.float32)
    outputs = ["Y", "Y_h"] + (["Y_c"] if op_type == "LSTM" else [])
    node = helper.make_node(op_type, names, outputs, name="rnn", hidden_size=H, direction=direction,
                            layout=layout, **attrs)
    return make_model([node], inputs, outputs, inits, opset=opset), feeds


def assert_agrees(model, feeds, run_ort):
    expected = run_ort(model, feeds)
    actual = Interpreter(model).run(feeds)
    for name, value in expected.items():
        np.testing.assert_allclose(actual[name], value, rtol=1e-5, atol=1e-5, err_msg=name)


@pytest.mark.parametrize("op_type", ["LSTM", "GRU", "RNN"])
@pytest.mark.parametrize("direction", ["forward", "reverse", "bidirectional"])
@pytest.mark.parametrize("seq_init", [False, True], ids=["plain", "seq_lens_and_initial_state"])
def test_recurrent_directions_agree_with_ort(make_model, run_ort, rng, op_type, direction, seq_init):
    model, feeds = recurrent_model(make_model, rng, op_type, direction=direction, seq=seq_init, init=seq_init)
    assert_agrees(model, feeds, run_ort)


@pytest.mark.parametrize(
    "op_type, attrs",
    [
        ("LSTM", {"peepholes": True, "seq": True, "init": True, "direction": "bidirectional"}),
        ("LSTM", {"clip": 0.5, "direction": "bidirectional"}),
        ("LSTM", {"input_forget": 1, "peepholes": True}),
        ("LSTM", {"bias": False}),
        ("LSTM", {"activations": ["LeakyRelu", "Tanh", "Tanh"], "activation_alpha": [0.3]}),
        ("LSTM", {"activations": ["HardSigmoid", "Tanh", "ScaledTanh"], "activation_alpha": [0.3, 0.7],
                  "activation_beta": [0.4, 1.5]}),
        ("LSTM", {"activations": ["Sigmoid", "Affine", "Elu"], "activation_alpha": [0.3, 0.7],
                  "activation_beta": [0.4]}),
        ("LSTM", {"direction": "bidirectional",
                  "activations": ["Sigmoid", "Tanh", "Tanh", "HardSigmoid", "Softsign", "Relu"]}),
        ("GRU", {"clip": 0.5, "seq": True}),
        ("GRU", {"linear_before_reset": 1, "direction": "bidirectional", "seq": True, "init": True}),
        ("GRU", {"activations": ["HardSigmoid", "Softplus"], "activation_alpha": [0.25], "activation_beta": [0.45]}),
        ("GRU", {"activations": ["Sigmoid", "ThresholdedRelu"], "activation_alpha": [0.1]}),
        ("RNN", {"activations": ["Relu"], "clip": 1.0}),
    ],
    ids=lambda v: v if isinstance(v, str) else "-".join(f"{k}" for k in v),
)
def test_recurrent_attributes_agree_with_ort(make_model, run_ort, rng, op_type, attrs):
    model, feeds = recurrent_model(make_model, rng, op_type, **attrs)
    assert_agrees(model, feeds, run_ort)


@pytest.mark.parametrize("op_type", ["LSTM", "GRU"])
def test_layout_1_is_layout_0_transposed(make_model, run_ort, rng, op_type):
    # ONNX Runtime's CPU kernels refuse layout=1, so compare with ORT on the time-major twin.
    kwargs = {"direction": "bidirectional", "seq": True, "init": True}
    batch_major, feeds_1 = recurrent_model(make_model, np.random.default_rng(7), op_type, layout=1, **kwargs)
    time_major, feeds_0 = recurrent_model(make_model, np.random.default_rng(7), op_type, layout=0, **kwargs)
    feeds_0 = {k: (v.transpose(1, 0, 2) if v.ndim == 3 else v) for k, v in feeds_1.items()}
    expected = run_ort(time_major, feeds_0)
    actual = Interpreter(batch_major).run(feeds_1)
    np.testing.assert_allclose(actual["Y"], expected["Y"].transpose(2, 0, 1, 3), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(actual["Y_h"], expected["Y_h"].transpose(1, 0, 2), rtol=1e-5, atol=1e-5)


def test_optional_outputs_may_be_omitted(make_model, run_ort, rng):
    model, feeds = recurrent_model(make_model, rng, "LSTM", direction="bidirectional")
    node = model.graph.node[0]
    node.output[0] = ""  # only Y_h and Y_c
    del model.graph.output[0]
    out = Interpreter(model).run(feeds)
    assert sorted(out) == ["Y_c", "Y_h"]
    np.testing.assert_allclose(out["Y_h"], run_ort(model, feeds)["Y_h"], rtol=1e-5, atol=1e-5)


def test_lstm_probe_final_h_equals_y_h(make_model, rng):
    model, feeds = recurrent_model(make_model, rng, "LSTM", direction="bidirectional", peepholes=True)
    out = Interpreter(model).run(feeds, probes=True)
    for what in ("i", "o", "f", "c_tilde", "c", "h"):
        assert out[f"rnn::{what}"].shape == (T, 2, B, H)
    h = out["rnn::h"]
    np.testing.assert_array_equal(h[-1, 0], out["Y_h"][0])  # forward ends at the last step
    np.testing.assert_array_equal(h[0, 1], out["Y_h"][1])  # reverse ends at the first step
    np.testing.assert_array_equal(h, out["Y"])
    np.testing.assert_allclose(out["rnn::c"][-1, 0], out["Y_c"][0])


def test_lstm_probe_cell_follows_the_gate_equations(make_model, rng):
    # One step, one unit: c = f * c0 + i * c_tilde, h = o * tanh(c) with hand-computed gates.
    w = np.array([[[0.5], [-0.3], [0.8], [0.2]]], dtype=np.float32)  # i, o, f, c
    r = np.array([[[0.1], [0.4], [-0.2], [0.3]]], dtype=np.float32)
    b = np.array([[0.1, 0.2, 0.3, 0.4, 0.0, -0.1, 0.05, 0.0]], dtype=np.float32)
    node = helper.make_node("LSTM", ["X", "W", "R", "B", "", "h0", "c0"], ["Y", "Y_h", "Y_c"], name="cell",
                            hidden_size=1)
    inputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, s)
              for n, s in [("X", (1, 1, 1)), ("h0", (1, 1, 1)), ("c0", (1, 1, 1))]]
    model = make_model([node], inputs, ["Y", "Y_h", "Y_c"], {"W": w, "R": r, "B": b}, opset=14)
    x, h0, c0 = 0.7, -0.4, 0.6
    feeds = {k: np.full((1, 1, 1), v, np.float32) for k, v in [("X", x), ("h0", h0), ("c0", c0)]}
    out = Interpreter(model).run(feeds, probes=True)

    def pre(k):
        return w[0, k, 0] * x + r[0, k, 0] * h0 + b[0, k] + b[0, 4 + k]

    def sig(v):
        return 1 / (1 + np.exp(-v))

    i, o, f, c_tilde = sig(pre(0)), sig(pre(1)), sig(pre(2)), np.tanh(pre(3))
    c = f * c0 + i * c_tilde
    for what, value in {"i": i, "o": o, "f": f, "c_tilde": c_tilde, "c": c, "h": o * np.tanh(c)}.items():
        np.testing.assert_allclose(out[f"cell::{what}"].reshape(()), value, rtol=1e-6, err_msg=what)
    np.testing.assert_allclose(out["Y_c"].reshape(()), c, rtol=1e-6)


def test_probes_zero_past_sequence_lens(make_model, rng):
    model, feeds = recurrent_model(make_model, rng, "GRU", direction="bidirectional", seq=True)
    out = Interpreter(model).run(feeds, probes=True)
    lens = feeds["seq"]
    for what in ("z", "r", "h_tilde", "h"):
        probe = out[f"rnn::{what}"]
        for b, n in enumerate(lens):
            assert not probe[n:, :, b].any()
    np.testing.assert_array_equal(out["rnn::h"], out["Y"])


def test_probes_absent_unless_asked(make_model, rng):
    model, feeds = recurrent_model(make_model, rng, "LSTM")
    assert sorted(Interpreter(model).run(feeds)) == ["Y", "Y_c", "Y_h"]
