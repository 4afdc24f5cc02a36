"""Decomposed LSTMs (no LSTM op) for the gate-fusion passes, each with the weights of a real
nn.LSTM so that the ``.ref.npz`` outputs are those of torch's LSTM:

- lstm_unrolled: 16 steps, per step MatMul(x) + MatMul(h) + Add bias, Split into i,f,g,o.
- lstm_unrolled_concat: 16 steps, per step one Gemm on Concat(x, h), then torch.chunk, which
  the exporter writes as four Slice nodes (bounds computed with Shape/Div/Mul) for i,f,g,o;
  exported from a frozen trace, so the weights are Constant nodes; h0/c0 are inputs.
- lstm_scan: the same cell as the body of an ONNX Scan over time, written with onnx.helper;
  the body reads the weights from outer-scope initializers.
"""

from __future__ import annotations

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from _common import (
    MODELS, MAX_IR_VERSION, assert_sane, check_dynamic, export, gate_stats, log_mel_features,
    lstm_reference, realistic_, save_and_verify, seed_all, to_np, trained_rnn_,
)  # fmt: skip

N_IN, STEPS = 80, 16
HIDDEN = 128  # not 256: keeps models/ under 40 MB (README)


def _torch_lstm(seed: int) -> tuple[nn.LSTM, np.random.Generator]:
    rng = seed_all(seed)
    lstm = realistic_(nn.LSTM(N_IN, HIDDEN, 1, batch_first=True), rng)
    trained_rnn_(lstm)
    return lstm.eval(), rng


def _weights(lstm: nn.LSTM):
    return lstm.weight_ih_l0.detach(), lstm.weight_hh_l0.detach(), (lstm.bias_ih_l0 + lstm.bias_hh_l0).detach()


@torch.no_grad()
def _features_and_state(rng, lstm: nn.LSTM, batch: int, frames: int):
    """A chunk of ``frames`` features plus the LSTM state reached on the preceding 24 frames."""
    feats = log_mel_features(rng, frames=24 + frames, batch=batch)
    _, (h, c) = lstm(torch.from_numpy(feats[:, :24]))
    return np.ascontiguousarray(feats[:, 24:]), to_np(h[0]), to_np(c[0])


@torch.no_grad()
def _reference(lstm: nn.LSTM, feats, h0, c0) -> dict[str, np.ndarray]:
    hs, (h, c) = lstm(torch.from_numpy(feats), (torch.from_numpy(h0)[None], torch.from_numpy(c0)[None]))
    return {"hs": to_np(hs), "h_n": to_np(h[0]), "c_n": to_np(c[0])}


def _gates(lstm: nn.LSTM, feats, h0, c0) -> dict[str, float]:
    *_, acts = lstm_reference(torch.from_numpy(feats), *_weights(lstm), torch.from_numpy(h0), torch.from_numpy(c0))
    return gate_stats(acts)


class UnrolledLSTM(nn.Module):
    """x and h each through a bias-free Linear (exported as MatMul), plus a separate bias."""

    def __init__(self, lstm: nn.LSTM):
        super().__init__()
        w_ih, w_hh, bias = _weights(lstm)
        self.x2g, self.h2g = nn.Linear(N_IN, 4 * HIDDEN, bias=False), nn.Linear(HIDDEN, 4 * HIDDEN, bias=False)
        self.bias = nn.Parameter(bias.clone())
        with torch.no_grad():
            self.x2g.weight.copy_(w_ih)
            self.h2g.weight.copy_(w_hh)

    def forward(self, features):
        h = features.new_zeros(features.size(0), HIDDEN)
        c = features.new_zeros(features.size(0), HIDDEN)
        hs = []
        for t in range(STEPS):
            i, f, g, o = (self.x2g(features[:, t]) + self.h2g(h) + self.bias).split(HIDDEN, dim=1)  # -> Split
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            h = torch.sigmoid(o) * torch.tanh(c)
            hs.append(h)
        return torch.stack(hs, dim=1), h, c


class UnrolledConcatLSTM(nn.Module):
    """One Linear on Concat(x, h) (exported as Gemm) producing the gates in PyTorch order."""

    def __init__(self, lstm: nn.LSTM):
        super().__init__()
        w_ih, w_hh, bias = _weights(lstm)
        self.gates = nn.Linear(N_IN + HIDDEN, 4 * HIDDEN)
        with torch.no_grad():
            self.gates.weight.copy_(torch.cat([w_ih, w_hh], dim=1))
            self.gates.bias.copy_(bias)

    def forward(self, features, h0, c0):
        h, c, hs = h0, c0, []
        for t in range(STEPS):
            i, f, g, o = self.gates(torch.cat([features[:, t], h], dim=1)).chunk(4, dim=1)  # -> 4 Slices
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            h = torch.sigmoid(o) * torch.tanh(c)
            hs.append(h)
        return torch.stack(hs, dim=1), h, c


OUTPUTS = ["hs", "h_n", "c_n"]
OUT_AXES = {"hs": {0: "batch"}, "h_n": {0: "batch"}, "c_n": {0: "batch"}}


def lstm_unrolled() -> dict:
    name = "lstm_unrolled"
    lstm, rng = _torch_lstm(109)
    model = UnrolledLSTM(lstm).eval()
    feats, _, _ = _features_and_state(rng, lstm, 1, STEPS)
    zeros = np.zeros((1, HIDDEN), np.float32)
    ref = _reference(lstm, feats, zeros, zeros)
    with torch.no_grad():
        own = dict(zip(OUTPUTS, map(to_np, model(torch.from_numpy(feats)))))
    for k in OUTPUTS:  # the decomposed cell is exactly nn.LSTM
        np.testing.assert_allclose(own[k], ref[k], rtol=1e-5, atol=1e-6)
    gates = _gates(lstm, feats, zeros, zeros)
    assert_sane(name, gates)
    export(model, (torch.from_numpy(feats),), MODELS / f"{name}.onnx", input_names=["features"], output_names=OUTPUTS,
           dynamic_axes={"features": {0: "batch"}, **OUT_AXES}, opset=17)  # fmt: skip
    info = save_and_verify(name, {"features": feats}, ref)
    f2, _, _ = _features_and_state(rng, lstm, 3, STEPS)
    z2 = np.zeros((3, HIDDEN), np.float32)
    check_dynamic(name, {"features": f2}, _reference(lstm, f2, z2, z2))
    return {**info, "gates": gates}


def lstm_unrolled_concat() -> dict:
    name = "lstm_unrolled_concat"
    lstm, rng = _torch_lstm(110)
    model = UnrolledConcatLSTM(lstm).eval()
    feats, h0, c0 = _features_and_state(rng, lstm, 1, STEPS)
    ref = _reference(lstm, feats, h0, c0)
    args = tuple(map(torch.from_numpy, (feats, h0, c0)))
    with torch.no_grad():
        own = dict(zip(OUTPUTS, map(to_np, model(*args))))
    for k in OUTPUTS:
        np.testing.assert_allclose(own[k], ref[k], rtol=1e-5, atol=1e-6)
    gates = _gates(lstm, feats, h0, c0)
    assert_sane(name, gates)
    export(model, args, MODELS / f"{name}.onnx", input_names=["features", "h0", "c0"], output_names=OUTPUTS,
           dynamic_axes={"features": {0: "batch"}, "h0": {0: "batch"}, "c0": {0: "batch"}, **OUT_AXES},
           opset=17, mode="frozen")  # fmt: skip
    info = save_and_verify(name, {"features": feats, "h0": h0, "c0": c0}, ref)
    f2, h2, c2 = _features_and_state(rng, lstm, 2, STEPS)
    check_dynamic(name, {"features": f2, "h0": h2, "c0": c2}, _reference(lstm, f2, h2, c2))
    return {**info, "gates": gates}


def _scan_model(lstm: nn.LSTM) -> onnx.ModelProto:
    w_ih, w_hh, bias = (to_np(t) for t in _weights(lstm))
    hidden = HIDDEN
    f32 = TensorProto.FLOAT
    body_nodes = [
        helper.make_node("MatMul", ["x_t", "W_ih_T"], ["x_gates"]),
        helper.make_node("MatMul", ["h_prev", "W_hh_T"], ["h_gates"]),
        helper.make_node("Add", ["x_gates", "h_gates"], ["gates_nb"]),
        helper.make_node("Add", ["gates_nb", "B"], ["gates"]),
        helper.make_node("Constant", [], ["split_sizes"], value=numpy_helper.from_array(np.full(4, hidden, np.int64), "split_sizes")),
        helper.make_node("Split", ["gates", "split_sizes"], ["i_pre", "f_pre", "g_pre", "o_pre"], axis=1),
        helper.make_node("Sigmoid", ["i_pre"], ["i"]),
        helper.make_node("Sigmoid", ["f_pre"], ["f"]),
        helper.make_node("Tanh", ["g_pre"], ["g"]),
        helper.make_node("Sigmoid", ["o_pre"], ["o"]),
        helper.make_node("Mul", ["f", "c_prev"], ["fc"]),
        helper.make_node("Mul", ["i", "g"], ["ig"]),
        helper.make_node("Add", ["fc", "ig"], ["c_next"]),
        helper.make_node("Tanh", ["c_next"], ["c_act"]),
        helper.make_node("Mul", ["o", "c_act"], ["h_next"]),
        helper.make_node("Identity", ["h_next"], ["h_t"]),
    ]
    state = ["batch", hidden]
    body = helper.make_graph(
        body_nodes, "lstm_cell",
        [helper.make_tensor_value_info("h_prev", f32, state), helper.make_tensor_value_info("c_prev", f32, state),
         helper.make_tensor_value_info("x_t", f32, ["batch", N_IN])],
        [helper.make_tensor_value_info("h_next", f32, state), helper.make_tensor_value_info("c_next", f32, state),
         helper.make_tensor_value_info("h_t", f32, state)],
    )  # fmt: skip
    scan = helper.make_node(
        "Scan", ["h0", "c0", "features"], ["h_n", "c_n", "hs"], name="lstm_scan",
        body=body, num_scan_inputs=1, scan_input_axes=[1], scan_output_axes=[1],
    )  # fmt: skip
    graph = helper.make_graph(
        [scan], "lstm_scan",
        [helper.make_tensor_value_info("features", f32, ["batch", "time", N_IN]),
         helper.make_tensor_value_info("h0", f32, state), helper.make_tensor_value_info("c0", f32, state)],
        [helper.make_tensor_value_info("hs", f32, ["batch", "time", hidden]),
         helper.make_tensor_value_info("h_n", f32, state), helper.make_tensor_value_info("c_n", f32, state)],
        initializer=[numpy_helper.from_array(np.ascontiguousarray(w_ih.T), "W_ih_T"),
                     numpy_helper.from_array(np.ascontiguousarray(w_hh.T), "W_hh_T"),
                     numpy_helper.from_array(bias, "B")],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="q4c-models")
    model.ir_version = min(8, MAX_IR_VERSION)
    return model


def lstm_scan() -> dict:
    name = "lstm_scan"
    lstm, rng = _torch_lstm(111)
    feats, h0, c0 = _features_and_state(rng, lstm, 1, 40)
    ref = _reference(lstm, feats, h0, c0)
    gates = _gates(lstm, feats, h0, c0)
    assert_sane(name, gates)
    onnx.save(_scan_model(lstm), str(MODELS / f"{name}.onnx"))
    info = save_and_verify(name, {"features": feats, "h0": h0, "c0": c0}, ref)
    f2, h2, c2 = _features_and_state(rng, lstm, 2, 7)
    check_dynamic(name, {"features": f2, "h0": h2, "c0": c2}, _reference(lstm, f2, h2, c2))
    return {**info, "gates": gates}
