"""Hypothesis strategies that build random valid ONNX models from the ops q4c handles.

A model is a chain of blocks over one float activation `[B, T, F]`: each block reads the
current tensor and leaves a new one (its feature size may change). Blocks cover MatMul / Gemm
(transB both ways, Constant-node, shared and tied weights), Einsum, Conv 1-D and 2-D (plain,
grouped, depthwise), LSTM / GRU / RNN with random attributes (direction, activations, clip,
layout, bias, initial states as inputs or initializers, extra state outputs), a decomposed
(unrolled) tanh RNN cell, If / Loop / Scan whose bodies read outer-scope weights,
LayerNormalization and Softmax; a model may start from a Gather embedding of token ids. Shapes
stay small (weights of 1-4 K elements) so that each compile takes well under a second.

`models()` draws a `GeneratedModel` (the proto plus a short description for failure messages).
Every model passes the full ONNX checker and runs in ONNX Runtime (see `test_generator_is_valid`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

IR_VERSION = 10
FLOAT = TensorProto.FLOAT

#: activations both q4c's interpreter and ONNX Runtime's CPU LSTM/GRU/RNN kernels implement.
#: Not Softplus: as a gate it lets the cell state grow without bound, and ONNX Runtime's Softplus
#: overflows to inf (then NaN) above ~88 where the interpreter's logaddexp stays finite, so the
#: two disagree on such models for reasons that are not q4c's (fuzz_long seed 11 found it).
RNN_ACTIVATIONS = ("Sigmoid", "Tanh", "Relu", "HardSigmoid", "LeakyRelu", "Softsign")
#: op -> the first opset it exists in (with the attributes the generator uses)
MIN_OPSET = {"Einsum": 12, "LayerNormalization": 17, "layout": 14}

BLOCKS = ("matmul", "gemm", "einsum", "conv1d", "conv2d", "lstm", "gru", "rnn", "unrolled_rnn", "unrolled_lstm",
          "if", "loop", "scan", "layernorm", "softmax", "shared", "constant_matmul", "relu")


@dataclass
class _Builder:
    """Accumulates nodes, initializers, inputs and outputs; names stay unique."""

    rng: np.random.Generator
    opset: int
    nodes: list = field(default_factory=list)
    inits: list = field(default_factory=list)
    inputs: list = field(default_factory=list)
    outputs: list = field(default_factory=list)
    counter: int = 0
    weights: dict = field(default_factory=dict)  # name -> shape, for shared weights
    notes: list = field(default_factory=list)
    time_steps: int = 3

    def name(self, base: str) -> str:
        self.counter += 1
        return f"{base}_{self.counter}"

    def weight(self, base: str, shape: tuple[int, ...], scale: float | None = None) -> str:
        name = self.name(base)
        fan_in = shape[-1] if len(shape) > 1 else shape[0]
        w = self.rng.standard_normal(shape).astype(np.float32) * np.float32(scale or 1.0 / np.sqrt(fan_in))
        self.inits.append(numpy_helper.from_array(w, name))
        self.weights[name] = shape
        return name

    def const(self, base: str, values: np.ndarray) -> str:
        name = self.name(base)
        self.inits.append(numpy_helper.from_array(np.asarray(values), name))
        return name

    def node(self, op: str, inputs: list[str], n_out: int = 1, **attrs) -> list[str]:
        outs = [self.name(op.lower()) for _ in range(n_out)]
        self.nodes.append(helper.make_node(op, inputs, outs, name=self.name(f"n_{op}"), **attrs))
        return outs

    def reshape_back(self, flat: str, like: str, last: int) -> str:
        """Reshape a [B*T, N] tensor to [B, T, N] with B, T read from `like` (symbolic dims allowed)."""
        shape = self.node("Shape", [like])[0]
        bt = self.node("Slice", [shape, self.const("s0", np.array([0], np.int64)),
                                 self.const("s2", np.array([2], np.int64))])[0]
        target = self.node("Concat", [bt, self.const("n", np.array([last], np.int64))], axis=0)[0]
        return self.node("Reshape", [flat, target])[0]


@dataclass
class GeneratedModel:
    model: onnx.ModelProto
    description: str
    opset: int
    nonfinite: str | None = None  # name of a weight holding NaN/inf, if any
    #: False when ONNX Runtime's CPU kernels refuse the model (LSTM/GRU/RNN layout=1, valid ONNX)
    ort_runs: bool = True

    def __repr__(self) -> str:  # what hypothesis prints for a falsifying example
        return f"GeneratedModel(opset={self.opset}, {self.description}, nonfinite={self.nonfinite})"


def _small_dim(draw, choices=(8, 16, 24, 32)) -> int:
    return draw(st.sampled_from(choices))


def _out_dim(draw, f: int, per_row: int = 1) -> int:
    """An output size (a multiple of 8) that makes an f x n weight (x per_row) hold >= 1024
    elements most of the time: smaller weights stay float, and a compile with nothing to
    quantize only says so."""
    n = draw(st.sampled_from([16, 32, 48, 64]))
    if draw(st.integers(0, 5)):
        n = max(n, -(-1024 // (f * per_row) // 8) * 8)
    return n


def _matmul(b: _Builder, draw, x: str, f: int) -> tuple[str, int]:
    n = _out_dim(draw, f)
    w = b.weight("W", (f, n))
    y = b.node("MatMul", [x, w])[0]
    if draw(st.booleans()):
        y = b.node("Add", [y, b.weight("bias", (n,))])[0]
    return y, n


def _constant_matmul(b: _Builder, draw, x: str, f: int) -> tuple[str, int]:
    """A weight held by a Constant node instead of an initializer."""
    n = _out_dim(draw, f)
    w = (b.rng.standard_normal((f, n)) / np.sqrt(f)).astype(np.float32)
    cname = b.name("Wconst")
    b.nodes.append(helper.make_node("Constant", [], [cname], value=numpy_helper.from_array(w, cname + "_v")))
    return b.node("MatMul", [x, cname])[0], n


def _shared(b: _Builder, draw, x: str, f: int) -> tuple[str, int]:
    """The same square weight read by two MatMuls (dedupe and tied-weight handling)."""
    w = b.weight("Wshared", (f, f))
    h = b.node("Tanh", b.node("MatMul", [x, w]))[0]
    return b.node("MatMul", [h, w])[0], f


def _gemm(b: _Builder, draw, x: str, f: int) -> tuple[str, int]:
    n = _out_dim(draw, f)
    trans_b = draw(st.integers(0, 1))
    w = b.weight("Wg", (n, f) if trans_b else (f, n))
    flat = b.node("Reshape", [x, b.const("shape", np.array([-1, f], np.int64))])[0]
    ins = [flat, w]
    attrs = {"transB": trans_b}
    if draw(st.booleans()):
        ins.append(b.weight("bg", (n,)))
        attrs["beta"] = draw(st.sampled_from([1.0, 0.5]))
    if draw(st.booleans()):
        attrs["alpha"] = draw(st.sampled_from([1.0, 2.0, 0.25]))
    y = b.node("Gemm", ins, **attrs)[0]
    return b.reshape_back(y, x, n), n


def _einsum(b: _Builder, draw, x: str, f: int) -> tuple[str, int]:
    n = _out_dim(draw, f)
    if draw(st.booleans()):
        w, eq = b.weight("We", (f, n)), "btf,fn->btn"
    else:
        w, eq = b.weight("We", (n, f)), "btf,nf->btn"
    return b.node("Einsum", [x, w], equation=eq)[0], n


def _conv1d(b: _Builder, draw, x: str, f: int) -> tuple[str, int]:
    kind = draw(st.sampled_from(["plain", "depthwise", "grouped", "pointwise"]))
    k = 1 if kind == "pointwise" else draw(st.sampled_from([1, 3, 5]))
    if kind == "depthwise":
        group, n = f, f * draw(st.sampled_from([1, 2]))
    elif kind == "grouped":
        group = draw(st.sampled_from([2, 4]))
        n = group * draw(st.sampled_from([4, 8]))
    else:
        group, n = 1, _small_dim(draw, (16, 32, 48))
    w = b.weight("Wc", (n, f // group, k), scale=1.0 / np.sqrt(k * f // group))
    xt = b.node("Transpose", [x], perm=[0, 2, 1])[0]  # [B, F, T]
    ins = [xt, w]
    if draw(st.booleans()):
        ins.append(b.weight("bc", (n,)))
    y = b.node("Conv", ins, group=group, kernel_shape=[k], pads=[k // 2, k // 2])[0]
    b.notes.append(f"conv1d({kind},k={k},g={group})")
    return b.node("Transpose", [y], perm=[0, 2, 1])[0], n


def _conv2d(b: _Builder, draw, x: str, f: int) -> tuple[str, int]:
    """[B, T, F] -> [B, c, T, F/c] -> Conv2d (groups g | c) -> [B, T, C2 * F/c]."""
    c = 4 if f % 4 == 0 else 2
    kind = draw(st.sampled_from(["plain", "depthwise", "grouped"]))
    group = {"plain": 1, "depthwise": c, "grouped": 2}[kind]
    c2 = group * draw(st.sampled_from([1, 2])) if kind != "plain" else draw(st.sampled_from([4, 8]))
    kh, kw = draw(st.sampled_from([1, 3])), draw(st.sampled_from([1, 3]))
    w = b.weight("Wc2", (c2, c // group, kh, kw), scale=1.0 / np.sqrt(kh * kw * c // group))
    r = b.node("Reshape", [x, b.const("shape", np.array([0, 0, c, f // c], np.int64))])[0]
    r = b.node("Transpose", [r], perm=[0, 2, 1, 3])[0]
    ins = [r, w] + ([b.weight("bc2", (c2,))] if draw(st.booleans()) else [])
    y = b.node("Conv", ins, group=group, kernel_shape=[kh, kw], pads=[kh // 2, kw // 2, kh // 2, kw // 2])[0]
    y = b.node("Transpose", [y], perm=[0, 2, 1, 3])[0]
    b.notes.append(f"conv2d({kind},{kh}x{kw},g={group})")
    return b.node("Reshape", [y, b.const("shape", np.array([0, 0, c2 * (f // c)], np.int64))])[0], c2 * (f // c)


_GATES = {"LSTM": 4, "GRU": 3, "RNN": 1}
_N_ACT = {"LSTM": 3, "GRU": 2, "RNN": 1}


def _recurrent(op: str):
    def block(b: _Builder, draw, x: str, f: int) -> tuple[str, int]:
        h = draw(st.sampled_from([8, 16]))
        if draw(st.integers(0, 3)):
            h = max(h, -(-1024 // (_GATES[op] * f) // 8) * 8)
        direction = draw(st.sampled_from(["forward", "reverse", "bidirectional"]))
        d = 2 if direction == "bidirectional" else 1
        gates = _GATES[op]
        layout = draw(st.integers(0, 1)) if b.opset >= MIN_OPSET["layout"] else 0
        attrs: dict = {"hidden_size": h, "direction": direction}
        if layout:
            attrs["layout"] = 1
        if draw(st.integers(0, 3)) == 0:
            acts = [draw(st.sampled_from(RNN_ACTIVATIONS)) for _ in range(_N_ACT[op])] * d
            attrs["activations"] = acts
        if draw(st.integers(0, 3)) == 0:
            attrs["clip"] = draw(st.sampled_from([0.5, 1.0, 3.0]))
        if op == "GRU" and draw(st.booleans()):
            attrs["linear_before_reset"] = 1
        w = b.weight(f"W{op}", (d, gates * h, f))
        r = b.weight(f"R{op}", (d, gates * h, h))
        ins = [b.node("Transpose", [x], perm=[1, 0, 2])[0] if not layout else x, w, r]
        if draw(st.booleans()):
            ins.append(b.weight(f"B{op}", (d, 2 * gates * h), scale=0.1))
        else:
            ins.append("")
        batch_static = b.inputs[0].type.tensor_type.shape.dim[0].HasField("dim_value")
        seq_lens = batch_static and draw(st.integers(0, 4)) == 0
        if seq_lens:  # per-batch lengths <= T (padding steps are zero in Y)
            steps, n = _time_steps(b), b.inputs[0].type.tensor_type.shape.dim[0].dim_value
            ins.append(b.const("seq_lens", b.rng.integers(1, steps + 1, n).astype(np.int32)))
        else:
            ins.append("")
        init_kind = draw(st.sampled_from(["none", "initializer", "input"] if batch_static else ["none"]))
        bsz = b.inputs[0].type.tensor_type.shape.dim[0].dim_value
        state_shape = (bsz, d, h) if layout else (d, bsz, h)
        n_states = 2 if op == "LSTM" else 1
        for s in range(n_states):
            if init_kind == "initializer":
                ins.append(b.const(f"init{s}", (0.1 * b.rng.standard_normal(state_shape)).astype(np.float32)))
            elif init_kind == "input":
                name = b.name(f"state_in{s}")
                b.inputs.append(helper.make_tensor_value_info(name, FLOAT, list(state_shape)))
                ins.append(name)
        if op == "LSTM" and draw(st.integers(0, 4)) == 0:  # peepholes
            ins += [""] * (7 - len(ins)) + [b.weight("P", (d, 3 * h), scale=0.1)]
        while ins and ins[-1] == "":
            ins.pop()
        want_state = draw(st.booleans())
        outs = b.node(op, ins, n_out=1 + n_states if want_state else 1, **attrs)
        if want_state:  # Y_h (and Y_c) as extra graph outputs: state pairs for closed-loop scoring
            for o in outs[1:]:
                b.outputs.append(helper.make_tensor_value_info(o, FLOAT, [None] * 3))
        y = outs[0]
        if not layout:
            y = b.node("Transpose", [y], perm=[2, 0, 1, 3])[0]  # [T, D, B, H] -> [B, T, D, H]
        b.notes.append(f"{op}({direction},layout={layout},acts={attrs.get('activations')},clip={attrs.get('clip')},"
                       f"init={init_kind},seq_lens={seq_lens},peep={len(ins) == 8})")
        return b.node("Reshape", [y, b.const("shape", np.array([0, 0, d * h], np.int64))])[0], d * h

    return block


def _time_steps(b: _Builder) -> int:
    return b.inputs[0].type.tensor_type.shape.dim[1].dim_value or b.time_steps


def _unrolled_rnn(b: _Builder, draw, x: str, f: int) -> tuple[str, int]:
    """h_t = tanh(x_t W + h_{t-1} R + bias), unrolled over T steps, outputs stacked: a decomposed
    cell fuse-lstm-gates may turn into an ONNX RNN."""
    h = _out_dim(draw, f)
    steps = _time_steps(b)
    w, r = b.weight("Wu", (f, h)), b.weight("Ru", (h, h))
    bias = b.weight("bu", (h,), scale=0.1)
    act = draw(st.sampled_from(["Tanh", "Relu"]))
    state = None
    ys = []
    for t in range(steps):
        xt = b.node("Gather", [x, b.const("t", np.array(t, np.int64))], axis=1)[0]  # [B, F]
        pre = b.node("Add", [b.node("MatMul", [xt, w])[0], bias])[0]
        if state is not None:
            pre = b.node("Add", [pre, b.node("MatMul", [state, r])[0]])[0]
        state = b.node(act, [pre])[0]
        ys.append(b.node("Unsqueeze", [state], axes=[1])[0] if b.opset < 13 else
                  b.node("Unsqueeze", [state, b.const("ax", np.array([1], np.int64))])[0])
    b.notes.append(f"unrolled_rnn({act},T={steps})")
    return b.node("Concat", ys, axis=1)[0], h


def _unrolled_lstm(b: _Builder, draw, x: str, f: int) -> tuple[str, int]:
    """An LSTM cell written out op by op over T steps (gates i, o, f, c as ONNX orders them,
    sliced from one x W + h R + b product): what fuse-lstm-gates looks for."""
    h = draw(st.sampled_from([8, 16]))
    steps = _time_steps(b)
    w, r = b.weight("Wul", (f, 4 * h)), b.weight("Rul", (h, 4 * h))
    bias = b.weight("bul", (4 * h,), scale=0.1)
    bounds = [(b.const("st", np.array([k * h], np.int64)), b.const("en", np.array([(k + 1) * h], np.int64)))
              for k in range(4)]
    axis = b.const("ax", np.array([-1], np.int64))
    state = cell = None
    ys = []
    for t in range(steps):
        xt = b.node("Gather", [x, b.const("t", np.array(t, np.int64))], axis=1)[0]
        pre = b.node("Add", [b.node("MatMul", [xt, w])[0], bias])[0]
        if state is not None:
            pre = b.node("Add", [pre, b.node("MatMul", [state, r])[0]])[0]
        i, o, fg, c = (b.node("Slice", [pre, s, e, axis])[0] for s, e in bounds)
        i, o, fg = (b.node("Sigmoid", [v])[0] for v in (i, o, fg))
        new = b.node("Mul", [i, b.node("Tanh", [c])[0]])[0]
        cell = new if cell is None else b.node("Add", [b.node("Mul", [fg, cell])[0], new])[0]
        state = b.node("Mul", [o, b.node("Tanh", [cell])[0]])[0]
        ys.append(b.node("Unsqueeze", [state], axes=[1])[0] if b.opset < 13 else
                  b.node("Unsqueeze", [state, b.const("ax", np.array([1], np.int64))])[0])
    b.notes.append(f"unrolled_lstm(T={steps})")
    return b.node("Concat", ys, axis=1)[0], h


def _body_value(name: str, shape=(None, None), dtype=FLOAT):
    return helper.make_tensor_value_info(name, dtype, shape)


def _if(b: _Builder, draw, x: str, f: int) -> tuple[str, int]:
    """Two branches reading outer-scope weights; the condition is data-dependent or constant."""
    n = _out_dim(draw, f)
    w1, w2 = b.weight("Wthen", (f, n)), b.weight("Welse", (f, n))
    if draw(st.booleans()):
        flat = b.node("Reshape", [x, b.const("flat", np.array([-1], np.int64))])[0]
        first = b.node("Gather", [flat, b.const("i0", np.array(0, np.int64))], axis=0)[0]
        cond = b.node("Greater", [first, b.const("zero", np.array(0.0, np.float32))])[0]
        kind = "data"
    else:
        cond = b.const("cond", np.array(draw(st.booleans())))
        kind = "constant"
    then_out, else_out = b.name("then_y"), b.name("else_y")
    then_g = helper.make_graph([helper.make_node("MatMul", [x, w1], [then_out])], b.name("then"), [],
                               [_body_value(then_out, [None] * 3)])
    act = b.name("else_mm")
    else_g = helper.make_graph([helper.make_node("MatMul", [x, w2], [act]),
                                helper.make_node("Relu", [act], [else_out])], b.name("else"), [],
                               [_body_value(else_out, [None] * 3)])
    b.notes.append(f"if({kind})")
    return b.node("If", [cond], then_branch=then_g, else_branch=else_g)[0], n


def _loop(b: _Builder, draw, x: str, f: int) -> tuple[str, int]:
    """A Loop over time whose body is a tanh RNN cell with outer-scope weights; the per-step
    states are its scan output [T, B, H]."""
    h = _out_dim(draw, f)
    steps = _time_steps(b)
    w, r = b.weight("Wl", (f, h)), b.weight("Rl", (h, h))
    it, cond_in, h_in = b.name("iter"), b.name("cond_in"), b.name("h_in")
    cond_out, h_out, y_out = b.name("cond_out"), b.name("h_out"), b.name("y_out")
    xt, xw, hr, pre = b.name("xt"), b.name("xw"), b.name("hr"), b.name("pre")
    body_nodes = [
        helper.make_node("Identity", [cond_in], [cond_out]),
        helper.make_node("Gather", [x, it], [xt], axis=1),
        helper.make_node("MatMul", [xt, w], [xw]),
        helper.make_node("MatMul", [h_in, r], [hr]),
        helper.make_node("Add", [xw, hr], [pre]),
        helper.make_node("Tanh", [pre], [h_out]),
        helper.make_node("Identity", [h_out], [y_out]),
    ]
    body = helper.make_graph(body_nodes, b.name("loop_body"),
                             [_body_value(it, [], TensorProto.INT64), _body_value(cond_in, [], TensorProto.BOOL),
                              _body_value(h_in)],
                             [_body_value(cond_out, [], TensorProto.BOOL), _body_value(h_out), _body_value(y_out)])
    shape = b.node("Shape", [x])[0]
    bdim = b.node("Slice", [shape, b.const("s0", np.array([0], np.int64)), b.const("s1", np.array([1], np.int64))])[0]
    h0_shape = b.node("Concat", [bdim, b.const("h", np.array([h], np.int64))], axis=0)[0]
    h0 = b.node("ConstantOfShape", [h0_shape], value=numpy_helper.from_array(np.zeros(1, np.float32)))[0]
    trip = b.const("trip", np.array(steps, np.int64))
    _, ys = b.node("Loop", [trip, "", h0], n_out=2, body=body)
    b.notes.append(f"loop(T={steps})")
    return b.node("Transpose", [ys], perm=[1, 0, 2])[0], h


def _scan(b: _Builder, draw, x: str, f: int) -> tuple[str, int]:
    """Scan over the time axis (axis 1) with an RNN-cell body reading outer-scope weights."""
    h = _out_dim(draw, f)
    w, r = b.weight("Ws", (f, h)), b.weight("Rs", (h, h))
    h_in, x_in, h_out, y_out = b.name("sh_in"), b.name("sx_in"), b.name("sh_out"), b.name("sy_out")
    xw, hr, pre = b.name("sxw"), b.name("shr"), b.name("spre")
    body = helper.make_graph([
        helper.make_node("MatMul", [x_in, w], [xw]),
        helper.make_node("MatMul", [h_in, r], [hr]),
        helper.make_node("Add", [xw, hr], [pre]),
        helper.make_node("Tanh", [pre], [h_out]),
        helper.make_node("Identity", [h_out], [y_out]),
    ], b.name("scan_body"), [_body_value(h_in), _body_value(x_in)], [_body_value(h_out), _body_value(y_out)])
    bsz = b.inputs[0].type.tensor_type.shape.dim[0].dim_value
    if bsz:
        h0 = b.const("h0", np.zeros((bsz, h), np.float32))
    else:
        shape = b.node("Shape", [x])[0]
        bdim = b.node("Slice", [shape, b.const("s0", np.array([0], np.int64)),
                                b.const("s1", np.array([1], np.int64))])[0]
        h0_shape = b.node("Concat", [bdim, b.const("h", np.array([h], np.int64))], axis=0)[0]
        h0 = b.node("ConstantOfShape", [h0_shape], value=numpy_helper.from_array(np.zeros(1, np.float32)))[0]
    _, ys = b.node("Scan", [h0, x], n_out=2, body=body, num_scan_inputs=1, scan_input_axes=[1],
                   scan_output_axes=[1])
    b.notes.append("scan")
    return ys, h


def _layernorm(b: _Builder, draw, x: str, f: int) -> tuple[str, int]:
    ins = [x, b.const("ln_scale", (1 + 0.1 * b.rng.standard_normal(f)).astype(np.float32))]
    if draw(st.booleans()):
        ins.append(b.const("ln_bias", (0.1 * b.rng.standard_normal(f)).astype(np.float32)))
    return b.node("LayerNormalization", ins, axis=-1, epsilon=1e-5)[0], f


def _softmax(b: _Builder, draw, x: str, f: int) -> tuple[str, int]:
    return b.node("Softmax", [x], axis=-1)[0], f


def _relu(b: _Builder, draw, x: str, f: int) -> tuple[str, int]:
    return b.node(draw(st.sampled_from(["Relu", "Tanh", "Sigmoid"])), [x])[0], f


_BLOCK_FNS = {
    "matmul": _matmul, "gemm": _gemm, "einsum": _einsum, "conv1d": _conv1d, "conv2d": _conv2d,
    "lstm": _recurrent("LSTM"), "gru": _recurrent("GRU"), "rnn": _recurrent("RNN"), "unrolled_rnn": _unrolled_rnn, "unrolled_lstm": _unrolled_lstm,
    "if": _if, "loop": _loop, "scan": _scan, "layernorm": _layernorm, "softmax": _softmax,
    "shared": _shared, "constant_matmul": _constant_matmul, "relu": _relu,
}


def _available(block: str, opset: int) -> bool:
    if block == "einsum":
        return opset >= MIN_OPSET["Einsum"]
    if block == "layernorm":
        return opset >= MIN_OPSET["LayerNormalization"]
    return True


@st.composite
def models(draw, opsets: tuple[int, ...] = tuple(range(11, 22)), max_blocks: int = 4,
           nonfinite: bool = False, blocks: tuple[str, ...] = BLOCKS, min_weight: int = 1024) -> GeneratedModel:
    """A random valid model; `nonfinite=True` may put NaN/inf into one weight; `min_weight`: a
    final MatMul is added when no weight has that many elements (0: never)."""
    opset = draw(st.sampled_from(opsets))
    seed = draw(st.integers(0, 2**32 - 1))
    b = _Builder(np.random.default_rng(seed), opset)
    bsz = draw(st.sampled_from([1, 2]))
    steps = draw(st.sampled_from([3, 5]))
    b.time_steps = steps
    symbolic_batch = draw(st.integers(0, 4)) == 0
    batch_dim = "batch" if symbolic_batch else bsz
    f = _small_dim(draw, (16, 32))
    parts = []
    if draw(st.integers(0, 3)) == 0:  # token ids -> embedding table (maybe tied to the output head)
        vocab = draw(st.sampled_from([40, 64]))
        table = b.weight("E", (vocab, f), scale=1.0)
        b.inputs.append(helper.make_tensor_value_info("ids", TensorProto.INT64, [batch_dim, steps]))
        x = b.node("Gather", [table, "ids"], axis=0)[0]
        parts.append(f"embedding(V={vocab})")
        tied = draw(st.booleans())
    else:
        b.inputs.append(helper.make_tensor_value_info("x", FLOAT, [batch_dim, steps, f]))
        x, table, tied = "x", None, False
    allowed = [blk for blk in blocks if _available(blk, opset)]
    for blk in draw(st.lists(st.sampled_from(allowed), min_size=1, max_size=max_blocks)):
        x, f = _BLOCK_FNS[blk](b, draw, x, f)
        parts.append(blk)
    if tied:
        if f != table_dim(b, table):
            x, f = _matmul_to(b, x, f, table_dim(b, table))
        trans = draw(st.booleans())
        if trans:  # logits = x @ E^T through Gemm transB=1 on the flattened activations
            flat = b.node("Reshape", [x, b.const("shape", np.array([-1, f], np.int64))])[0]
            y = b.node("Gemm", [flat, table], transB=1)[0]
            x = b.reshape_back(y, x, b.weights[table][0])
        else:
            x = b.node("MatMul", [x, b.node("Transpose", [table], perm=[1, 0])[0]])[0]
        f = b.weights[table][0]
        parts.append(f"tied_head(gemm={trans})")
    if min_weight and not any(np.prod(shape) >= min_weight for shape in b.weights.values()):
        x, f = _matmul_to(b, x, f, -(-min_weight // f))
        parts.append("head")
    b.outputs.insert(0, helper.make_tensor_value_info(x, FLOAT, [None, None, f]))
    bad = None
    if nonfinite and draw(st.integers(0, 3)) == 0:
        floats = [t for t in b.inits if t.name in b.weights and len(t.dims) >= 2]
        if floats:
            t = floats[draw(st.integers(0, len(floats) - 1))]
            arr = numpy_helper.to_array(t).copy()
            arr.flat[draw(st.integers(0, arr.size - 1))] = draw(st.sampled_from([np.nan, np.inf, -np.inf]))
            t.CopyFrom(numpy_helper.from_array(arr, t.name))
            bad = t.name
    graph = helper.make_graph(b.nodes, "fuzz", b.inputs, b.outputs, initializer=b.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=IR_VERSION,
                              producer_name="q4c-fuzz")
    desc = " -> ".join(parts) + (f" [{'; '.join(b.notes)}]" if b.notes else "") + f" batch={batch_dim} T={steps}"
    return GeneratedModel(model, desc, opset, bad, ort_runs=not any("layout=1" in n for n in b.notes))


def table_dim(b: _Builder, table: str) -> int:
    return b.weights[table][1]


def _matmul_to(b: _Builder, x: str, f: int, n: int) -> tuple[str, int]:
    return b.node("MatMul", [x, b.weight("Wproj", (f, n))])[0], n


def feeds_for(model: onnx.ModelProto, seed: int = 0) -> dict[str, np.ndarray]:
    """One random sample for the model's inputs (symbolic batch -> 1); ids stay inside the table."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for vi in model.graph.input:
        shape = [d.dim_value if d.HasField("dim_value") else 1 for d in vi.type.tensor_type.shape.dim]
        if vi.type.tensor_type.elem_type == TensorProto.INT64:
            vocab = min(numpy_helper.to_array(t).shape[0] for t in model.graph.initializer if t.name.startswith("E_"))
            feeds[vi.name] = rng.integers(0, vocab, size=shape).astype(np.int64)
        else:
            feeds[vi.name] = rng.standard_normal(shape).astype(np.float32)
    return feeds
