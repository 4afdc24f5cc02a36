"""LSTM/GRU/RNN as one hoisted input projection plus a Scan over time whose body runs the cell.

Emitted form (per direction d; all directions share one Scan, so a bidirectional layer pays
the per-step Scan overhead once):

    XW_d = MatMulNBits(X, W_d, bias = biases that do not depend on h)   # all frames at once
    Scan(states h_d (, c_d); scan inputs XW_d (, mask)):
        g = XW_d[t] + MatMulNBits(h, R_d)  -> gate activations -> c, h update
    Y = Concat(Unsqueeze(y_d)), Y_h = Concat(Unsqueeze(h_d)), Y_c likewise

A reverse direction runs through Scan's scan_input_directions / scan_output_directions. With
`sequence_lens`, a reverse direction's projection is reversed within each sequence's length
(ReverseSequence), every direction then runs forward with a [T, B, 1] mask (state held and
zeros emitted past a sequence's end, as ONNX LSTM/GRU/RNN specify), and the outputs are reversed back.
One deviation: a batch entry with sequence length 0 returns its initial state as Y_h/Y_c where
ONNX Runtime returns zeros.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs
from onnx import TensorProto

from q4c import graph as g
from q4c.recurrent_lowering.emit import Emitter
from q4c.recurrent_lowering.layer import RecurrentLayer, Weight


def _rows(weight: Weight, start: int, stop: int) -> Weight:
    if weight.quantized:
        return Weight(codes=weight.codes[start:stop], scale=weight.scale[start:stop], block=weight.block,
                      bits=weight.bits, codes_name=weight.codes_name)
    return Weight(values=weight.values[start:stop])


def _biases(layer: RecurrentLayer, d: int) -> tuple[np.ndarray | None, np.ndarray | None]:
    """(bias added to the hoisted input projection, bias added to h·Rᵀ in the body)."""
    if layer.bias is None:
        return None, None
    n = layer.gates * layer.hidden
    wb, rb = layer.bias[d, :n], layer.bias[d, n:]
    if layer.op == "GRU" and layer.linear_before_reset:
        # h~ = tanh(x·Whᵀ + Wbh + r ⊙ (h·Rhᵀ + Rbh)): Rbh stays with the recurrent product.
        h2 = 2 * layer.hidden
        proj = wb + np.concatenate([rb[:h2], np.zeros_like(rb[h2:])])
        rec = np.concatenate([np.zeros_like(rb[:h2]), rb[h2:]])
        return proj, rec
    return wb + rb, None


def _int8_projection(e: Emitter, graph: gs.Graph, x: gs.Tensor, weight: Weight, bias: np.ndarray | None,
                     base: str) -> gs.Variable:
    """x·weightᵀ (+ bias) as com.microsoft DynamicQuantizeMatMul: int8 per-channel [K, N] codes (block-wise
    8-bit codes re-quantized per channel), activations quantized to uint8 per call. For many rows
    (all frames at once) 2-3x faster than MatMulNBits (ORT-NOTES)."""
    from q4c.recurrent_lowering.dynamic import per_channel_int8

    codes, scales, _ = per_channel_int8([weight])  # [1, K, N], [1, N]
    inputs: list[gs.Tensor | None] = [x, e.const(f"{base}_int8kn", codes[0]), e.const(f"{base}_int8kn_scale", scales[0])]
    if bias is not None and np.any(bias):
        inputs += [None, e.const(f"{base}_bias", bias.astype(np.float32))]
    return e.one(graph, "DynamicQuantizeMatMul", inputs, domain=g.MS_DOMAIN)


def lower_to_scan(layer: RecurrentLayer, e: Emitter, *, int8_projection: bool = False) -> None:
    """Replace `layer.node` by the Scan form in `layer.graph` (outputs keep their tensors). With
    `int8_projection` (W planned at 8 bits), the hoisted input projection is DynamicQuantizeMatMul."""
    graph, nd = layer.graph, layer.nd
    x = layer.x
    if layer.layout:
        x = e.one(graph, "Transpose", [x], attrs={"perm": [1, 0, 2]})  # [B, T, I] -> [T, B, I]
    biases = [_biases(layer, d) for d in range(nd)]
    if int8_projection:
        assert all(w.quantized and w.bits == 8 for w in layer.w), "callers check W is 8-bit"
        xw = [_int8_projection(e, graph, x, layer.w[d], biases[d][0], f"W{d}") for d in range(nd)]
    else:
        xw = [e.matmul(graph, x, layer.w[d], biases[d][0], f"W{d}") for d in range(nd)]
    mask, seq = _sequence_mask(layer, e, x, xw)
    body, n_outputs, n_ys = _scan_body(layer, e, biases, masked=mask is not None)
    inits = _initial_states(layer, e, x)
    directions = [int(r and mask is None) for r in layer.reverse]
    finals = [e.var(f"final{i}") for i in range(n_outputs)]
    y_steps = [e.var(f"y{d}") for d in range(n_ys)]
    attrs = {"body": body, "num_scan_inputs": nd + (mask is not None),
             "scan_input_directions": directions + ([0] if mask is not None else [])}
    if n_ys:  # no Y read: no scan outputs, and an empty list attribute cannot be exported (no type)
        attrs["scan_output_directions"] = directions[:n_ys]
    e.node(graph, "Scan", inits + xw + ([mask] if mask is not None else []), finals + y_steps, attrs=attrs)
    _scan_outputs(layer, e, finals, y_steps, mask is not None, seq)
    layer.node.inputs.clear()
    layer.node.outputs.clear()


def _initial_states(layer: RecurrentLayer, e: Emitter, x: gs.Tensor) -> list[gs.Tensor]:
    """Each direction's initial h (and c): the layer's, or one shared zero tensor [B, H]."""
    graph = layer.graph
    zeros = None

    def initial(state: gs.Tensor | None, d: int) -> gs.Tensor:
        nonlocal zeros
        if state is not None:
            return e.one(graph, "Gather", [state, e.const("dir", np.array(d, np.int64))],
                         attrs={"axis": 1 if layer.layout else 0})
        if zeros is None:
            batch = e.one(graph, "Shape", [x], attrs={"start": 1, "end": 2}, dtype=np.int64)
            shape = e.one(graph, "Concat", [batch, e.ints("hidden", [layer.hidden])], attrs={"axis": 0}, dtype=np.int64)
            zeros = e.one(graph, "ConstantOfShape", [shape],
                          attrs={"value": gs.Constant(e.name("zero"), np.zeros(1, np.float32))})
        return zeros

    inits: list[gs.Tensor] = []
    for d in range(layer.nd):
        inits.append(initial(layer.initial_h, d))
        if layer.op == "LSTM":
            inits.append(initial(layer.initial_c, d))
    return inits


def _sequence_mask(layer: RecurrentLayer, e: Emitter, x: gs.Tensor,
                   xw: list[gs.Tensor]) -> tuple[gs.Tensor | None, gs.Tensor | None]:
    """With sequence_lens: the [T, B, 1] mask of valid steps and the int64 lengths; reverse
    directions' projections are reversed per sequence in place (in `xw`)."""
    if layer.sequence_lens is None:
        return None, None
    graph = layer.graph
    seq = e.one(graph, "Cast", [layer.sequence_lens], attrs={"to": TensorProto.INT64}, dtype=np.int64)
    steps = e.one(graph, "Shape", [x], attrs={"start": 0, "end": 1}, dtype=np.int64)
    steps = e.one(graph, "Squeeze", [steps, e.ints("axis0", [0])], dtype=np.int64)
    t = e.one(graph, "Range", [e.const("start", np.array(0, np.int64)), steps, e.const("delta", np.array(1, np.int64))],
              dtype=np.int64)
    t = e.one(graph, "Unsqueeze", [t, e.ints("axis1", [1])], dtype=np.int64)  # [T, 1]
    lens = e.one(graph, "Unsqueeze", [seq, e.ints("axis0", [0])], dtype=np.int64)  # [1, B]
    mask = e.one(graph, "Less", [t, lens], dtype=np.bool_)
    mask = e.one(graph, "Unsqueeze", [mask, e.ints("axis2", [2])], dtype=np.bool_)  # [T, B, 1]
    for d in range(layer.nd):
        if layer.reverse[d]:
            xw[d] = e.one(graph, "ReverseSequence", [xw[d], seq], attrs={"batch_axis": 1, "time_axis": 0})
    return mask, seq


def _scan_body(layer: RecurrentLayer, e: Emitter, biases: list, *, masked: bool) -> tuple[gs.Graph, int, int]:
    """The Scan body running every direction's cell for one step; returns it with its number of
    outputs (states, then per-step ys) and of per-step ys."""
    H, is_lstm = layer.hidden, layer.op == "LSTM"
    want_y = layer.outputs[0] is not None
    n_state = 2 if is_lstm else 1
    body = gs.Graph(name=e.name("body"))
    state_in: list[gs.Variable] = []
    state_out: list[gs.Variable] = []
    scan_in = [e.var(f"xw{d}_t") for d in range(layer.nd)]
    mask_t = e.var("mask_t", np.bool_) if masked else None
    zero = e.const("zero_f", np.array(0, np.float32)) if masked else None
    ys: list[gs.Variable] = []
    for d in range(layer.nd):
        h = e.var(f"h{d}")
        c = e.var(f"c{d}") if is_lstm else None
        state_in += [h] + ([c] if c is not None else [])
        if is_lstm:
            h_new, c_new = _lstm_cell(e, body, layer, d, h, c, scan_in[d])
            new = [h_new, c_new]
        elif layer.op == "RNN":
            new = [_rnn_cell(e, body, layer, d, h, scan_in[d])]
        else:
            new = [_gru_cell(e, body, layer, d, h, scan_in[d], biases[d][1])]
        if mask_t is not None:
            held = [e.one(body, "Where", [mask_t, n, o]) for n, o in zip(new, state_in[-n_state:])]
            if want_y:
                ys.append(e.one(body, "Where", [mask_t, new[0], zero]))
            new = held
        elif want_y:
            ys.append(e.one(body, "Identity", [new[0]]))
        state_out += new
    body.inputs = state_in + scan_in + ([mask_t] if mask_t is not None else [])
    body.outputs = state_out + ys
    for t in body.inputs + body.outputs:  # the checker wants shapes on subgraph inputs/outputs
        t.shape = [None, 1 if t is mask_t else (layer.gates * H if t in scan_in else H)]
    return body, len(state_out), len(ys)


def _scan_outputs(layer: RecurrentLayer, e: Emitter, finals: list[gs.Variable], y_steps: list[gs.Variable],
                  masked: bool, seq: gs.Tensor | None) -> None:
    """Stack the Scan's per-direction outputs into the tensors the layer's op produced."""
    graph, nd = layer.graph, layer.nd
    n_state = 2 if layer.op == "LSTM" else 1
    dir_axis = 2 if layer.layout else 1  # Y: [T, nd, B, H], or [B, T, nd, H] for layout 1
    if layer.outputs[0] is not None:
        parts = []
        for d, y in enumerate(y_steps):  # [T, B, H]
            if masked and layer.reverse[d]:
                y = e.one(graph, "ReverseSequence", [y, seq], attrs={"batch_axis": 1, "time_axis": 0})
            if layer.layout:
                y = e.one(graph, "Transpose", [y], attrs={"perm": [1, 0, 2]})  # [B, T, H]
            parts.append(y)
        _stack(e, graph, parts, dir_axis, layer.outputs[0])
    state_axis = 1 if layer.layout else 0  # Y_h/Y_c: [nd, B, H], or [B, nd, H] for layout 1
    for k, out in enumerate(layer.outputs[1:]):
        if out is not None:
            _stack(e, graph, [finals[d * n_state + k] for d in range(nd)], state_axis, out)


def _stack(e: Emitter, graph: gs.Graph, parts: list[gs.Tensor], axis: int, out: gs.Variable) -> None:
    """Unsqueeze each part at `axis` and concatenate them there, into `out`."""
    axes = e.ints("axis", [axis])
    if len(parts) == 1:
        e.one(graph, "Unsqueeze", [parts[0], axes], out=out)
        return
    expanded = [e.one(graph, "Unsqueeze", [p, axes]) for p in parts]
    e.one(graph, "Concat", expanded, attrs={"axis": axis}, out=out)


def _split(e: Emitter, graph: gs.Graph, x: gs.Tensor, sizes: list[int]) -> list[gs.Variable]:
    return e.node(graph, "Split", [x, e.ints("split", sizes)], len(sizes), attrs={"axis": -1})


def _lstm_cell(e: Emitter, body: gs.Graph, layer: RecurrentLayer, d: int, h: gs.Tensor, c: gs.Tensor,
               xw_t: gs.Tensor) -> tuple[gs.Variable, gs.Variable]:
    """ONNX LSTM gates i, o, f, c: c' = f⊙c + i⊙tanh(g_c), h' = o⊙tanh(c')."""
    H = layer.hidden
    gates = e.one(body, "Add", [xw_t, e.matmul(body, h, layer.r[d], None, f"R{d}")])
    ifo, cand = _split(e, body, gates, [3 * H, H])
    i, o, f = _split(e, body, e.one(body, "Sigmoid", [ifo]), [H, H, H])
    cand = e.one(body, "Tanh", [cand])
    c_new = e.one(body, "Add", [e.one(body, "Mul", [f, c]), e.one(body, "Mul", [i, cand])])
    h_new = e.one(body, "Mul", [o, e.one(body, "Tanh", [c_new])])
    return h_new, c_new


def _gru_cell(e: Emitter, body: gs.Graph, layer: RecurrentLayer, d: int, h: gs.Tensor, xw_t: gs.Tensor,
              rec_bias: np.ndarray | None) -> gs.Variable:
    """ONNX GRU gates z, r, h: h' = n + z⊙(h - n), n = tanh(x·Whᵀ + ... ) per linear_before_reset."""
    H = layer.hidden
    x_zr, x_n = _split(e, body, xw_t, [2 * H, H])
    if layer.linear_before_reset:
        h_zr, h_n = _split(e, body, e.matmul(body, h, layer.r[d], rec_bias, f"R{d}"), [2 * H, H])
        z, r = _split(e, body, e.one(body, "Sigmoid", [e.one(body, "Add", [x_zr, h_zr])]), [H, H])
        pre = e.one(body, "Add", [x_n, e.one(body, "Mul", [r, h_n])])
    else:
        h_zr = e.matmul(body, h, _rows(layer.r[d], 0, 2 * H), None, f"R{d}_zr")
        z, r = _split(e, body, e.one(body, "Sigmoid", [e.one(body, "Add", [x_zr, h_zr])]), [H, H])
        h_n = e.matmul(body, e.one(body, "Mul", [r, h]), _rows(layer.r[d], 2 * H, 3 * H), None, f"R{d}_h")
        pre = e.one(body, "Add", [x_n, h_n])
    n = e.one(body, "Tanh", [pre])
    return e.one(body, "Add", [n, e.one(body, "Mul", [z, e.one(body, "Sub", [h, n])])])


def _rnn_cell(e: Emitter, body: gs.Graph, layer: RecurrentLayer, d: int, h: gs.Tensor, xw_t: gs.Tensor) -> gs.Variable:
    """ONNX RNN: h' = f(clip(x·Wᵀ + h·Rᵀ + Wb + Rb)), f this direction's activation."""
    pre = e.one(body, "Add", [xw_t, e.matmul(body, h, layer.r[d], None, f"R{d}")])
    if layer.clip is not None:
        pre = e.one(body, "Clip", [pre, e.const("clip_lo", np.array(-layer.clip, np.float32)),
                                   e.const("clip_hi", np.array(layer.clip, np.float32))])
    name, alpha, beta = layer.activations[d] if layer.activations else ("tanh", 0.0, 0.0)
    return _activation(e, body, pre, name, alpha, beta)


#: ONNX recurrent activation names whose ONNX op of the same meaning takes no alpha/beta.
_PLAIN_OPS = {"tanh": "Tanh", "sigmoid": "Sigmoid", "relu": "Relu", "softsign": "Softsign", "softplus": "Softplus"}


def _activation(e: Emitter, body: gs.Graph, x: gs.Tensor, name: str, alpha: float, beta: float) -> gs.Variable:
    """One ONNX recurrent activation function (RNN spec's list) as standard ops."""
    if name in _PLAIN_OPS:
        return e.one(body, _PLAIN_OPS[name], [x])
    if name in ("leakyrelu", "thresholdedrelu", "elu"):
        op = {"leakyrelu": "LeakyRelu", "thresholdedrelu": "ThresholdedRelu", "elu": "Elu"}[name]
        return e.one(body, op, [x], attrs={"alpha": float(alpha)})
    if name == "hardsigmoid":
        return e.one(body, "HardSigmoid", [x], attrs={"alpha": float(alpha), "beta": float(beta)})
    a, b = e.const("alpha", np.array(alpha, np.float32)), e.const("beta", np.array(beta, np.float32))
    if name == "affine":  # alpha * x + beta
        return e.one(body, "Add", [e.one(body, "Mul", [x, a]), b])
    assert name == "scaledtanh", name  # alpha * tanh(beta * x); match_layer admits nothing else
    return e.one(body, "Mul", [e.one(body, "Tanh", [e.one(body, "Mul", [x, b])]), a])
