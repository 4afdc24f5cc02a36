"""Emit one ONNX LSTM, GRU or RNN for a matched recurrence and re-produce the tensors the graph used.

The op works in its own layout (X [T, B, I], Y [T, 1, B, H], Y_h/Y_c [1, B, H]; ONNX Runtime
has no batch-major `layout=1` kernel), so thin adapters (Transpose, Squeeze, Gather) map it back
to what the original graph read. Tensors that the graph keeps (graph outputs, consumers outside
the fused cells) keep their names and objects: their old producer gets a throw-away output, and
the pipeline's cleanup drops the dead cell nodes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs

from q4c.names import NameGenerator
from q4c.recurrent_fusion.view import DataflowView


@dataclass
class SeqInput:
    """X from one sequence tensor: time on `axis`, steps [start, start + length) (length None:
    the whole axis; `length_tensor` a scalar int64 tensor when only known at run time)."""

    src: gs.Tensor
    axis: int
    rank: int = 3
    start: int = 0
    length: int | None = None
    length_tensor: gs.Tensor | None = None


@dataclass
class RnnPlan:
    """Everything one ONNX LSTM (or GRU, RNN) needs and everything it must produce."""

    graph: gs.Graph
    hidden: int
    w: np.ndarray  # [4H, I], LSTM gates i, o, f, c ([3H, I], GRU gates z, r, h; [H, I], RNN)
    r: np.ndarray  # [4H, H]
    wb: np.ndarray  # [4H]
    rb: np.ndarray  # [4H]
    x: SeqInput | list[gs.Tensor]  # a sequence, or the step inputs [B, I] to stack
    initial_h: gs.Tensor | None = None  # [B, H]; None: zeros
    initial_c: gs.Tensor | None = None
    op: str = "LSTM"
    linear_before_reset: int = 0  # GRU only
    activation: str = "Tanh"  # RNN only: its ONNX activation
    steps: int | None = None  # T when static
    stacks: list[tuple[gs.Tensor, int]] = field(default_factory=list)  # (tensor, axis of T in [B, H])
    step_h: list[tuple[gs.Tensor, int]] = field(default_factory=list)  # (tensor, t) per-step h read elsewhere
    last_h: list[gs.Tensor] = field(default_factory=list)
    last_c: list[gs.Tensor] = field(default_factory=list)


def stacked_input(view: DataflowView, xs: list[gs.Tensor]) -> SeqInput | list[gs.Tensor]:
    """Recognize step inputs x_t = Gather(src, t0 + t, axis) (how exporters index time) as one
    slice of `src`; otherwise keep the list (it is stacked with Unsqueeze + Concat)."""
    gathers = [view.producer(view.resolve(x)) for x in xs]
    if any(n is None or n.op != "Gather" for n in gathers):
        return xs
    src = gathers[0].inputs[0]
    shape = view.shape(src)
    if shape is None or len(shape) != 3:
        return xs
    axes = {int(n.attrs.get("axis", 0)) % 3 for n in gathers}
    if len(axes) != 1 or any(n.inputs[0].name != src.name for n in gathers):
        return xs
    axis = axes.pop()
    indices = [view.constant(n.inputs[1]) for n in gathers]
    if any(i is None or i.ndim != 0 for i in indices):
        return xs
    idx = [int(i) for i in indices]
    if any(i < 0 for i in idx):
        if shape[axis] is None:
            return xs
        idx = [i + shape[axis] if i < 0 else i for i in idx]
    if idx != list(range(idx[0], idx[0] + len(idx))):
        return xs
    whole = idx[0] == 0 and shape[axis] == len(idx)
    return SeqInput(src, axis, 3, idx[0], None if whole else len(idx))


class _Emitter:
    def __init__(self, names: NameGenerator, plan: RnnPlan, name: str) -> None:
        self.names, self.plan, self.name = names, plan, name
        self.sub = plan.graph

    def var(self, suffix: str, dtype=np.float32) -> gs.Variable:
        return gs.Variable(self.names(f"{self.name}_{suffix}"), dtype=dtype)

    def const(self, suffix: str, value: np.ndarray) -> gs.Constant:
        return gs.Constant(self.names(f"{self.name}_{suffix}"), np.asarray(value))

    def node(self, op: str, inputs: list[gs.Tensor], outputs: list[gs.Tensor] | None = None,
             attrs: dict | None = None, suffix: str | None = None, dtype=np.float32) -> list[gs.Tensor]:
        outputs = outputs or [self.var((suffix or op.lower()) + "_out", dtype)]
        for t in outputs:
            _detach(self.names, t)
        node = gs.Node(op, self.names(f"{self.name}/{suffix or op}"), attrs=attrs or {},
                       inputs=inputs, outputs=outputs)
        self.sub.nodes.append(node)
        return outputs

    def axes(self, *values: int) -> gs.Constant:
        return self.const("axes", np.array(values, np.int64))


def emit_rnn(names: NameGenerator, plan: RnnPlan, name: str) -> gs.Node:
    """Append the LSTM/GRU/RNN and its adapters to `plan.graph`; returns the new op."""
    e = _Emitter(names, plan, names(name))
    x = _sequence(e, plan.x)
    hidden = plan.hidden
    w = e.const("W", plan.w[None].astype(np.float32))
    r = e.const("R", plan.r[None].astype(np.float32))
    b = e.const("B", np.concatenate([plan.wb, plan.rb])[None].astype(np.float32))
    lstm = plan.op == "LSTM"
    states = []
    for state, label in ((plan.initial_h, "initial_h"), (plan.initial_c, "initial_c"))[: 2 if lstm else 1]:
        states.append(e.node("Unsqueeze", [state, e.axes(0)], suffix=label)[0] if state is not None else gs.Variable.empty())
    inputs = [x, w, r, b, gs.Variable.empty(), *states]
    while inputs[-1].is_empty():
        inputs.pop()
    y, y_h, y_c = e.var("Y"), e.var("Y_h"), e.var("Y_c")
    attrs: dict = {"hidden_size": hidden}
    if plan.op == "GRU":
        attrs["linear_before_reset"] = plan.linear_before_reset
    elif plan.op == "RNN" and plan.activation != "Tanh":
        attrs["activations"] = [plan.activation]
    rnn = gs.Node(plan.op, e.name, attrs=attrs, inputs=inputs, outputs=[y, y_h, y_c] if lstm else [y, y_h])
    e.sub.nodes.append(rnn)

    y_seq: list[gs.Tensor] = []  # Y without its direction axis: [T, B, H], made on first use

    def seq(out: gs.Tensor | None = None) -> gs.Tensor:
        if not y_seq:
            y_seq.append(e.node("Squeeze", [y, e.axes(1)], [out] if out is not None else None, suffix="Y_seq")[0])
        return y_seq[0]

    done: set[str] = set()
    for tensor, axis in plan.stacks:
        if tensor.name in done:
            continue
        done.add(tensor.name)
        if axis == 0 and not y_seq:
            seq(tensor)
            continue
        if axis == 0:
            e.node("Identity", [seq()], [tensor])
            continue
        perm = [*range(1, axis + 1), 0, *range(axis + 1, 3)]
        e.node("Transpose", [seq()], [tensor], attrs={"perm": perm})
    for tensors, state in ((plan.last_h, y_h), (plan.last_c, y_c)):
        for tensor in tensors:
            if tensor.name not in done:
                done.add(tensor.name)
                e.node("Squeeze", [state, e.axes(0)], [tensor])
    last = plan.steps - 1 if plan.steps is not None else None
    for tensor, t in plan.step_h:
        if tensor.name in done:
            continue
        done.add(tensor.name)
        if t == last:
            e.node("Squeeze", [y_h, e.axes(0)], [tensor])
        else:
            e.node("Gather", [seq(), e.const("t", np.array(t, np.int64))], [tensor], attrs={"axis": 0})
    return rnn


def _sequence(e: _Emitter, x: SeqInput | list[gs.Tensor]) -> gs.Tensor:
    if isinstance(x, list):
        steps = [e.node("Unsqueeze", [t, e.axes(0)], suffix="x_step")[0] for t in x]
        return steps[0] if len(steps) == 1 else e.node("Concat", steps, attrs={"axis": 0}, suffix="X")[0]
    t = x.src
    if x.length_tensor is not None:
        end = e.node("Reshape", [x.length_tensor, e.const("shape", np.array([1], np.int64))], suffix="steps", dtype=np.int64)[0]
        start = e.const("start", np.array([x.start], np.int64))
        if x.start:
            end = e.node("Add", [end, start], suffix="end", dtype=np.int64)[0]
        t = e.node("Slice", [t, start, end, e.axes(x.axis)], suffix="x_steps")[0]
    elif x.length is not None or x.start:
        end = x.start + x.length if x.length is not None else np.iinfo(np.int64).max
        t = e.node("Slice", [t, e.const("start", np.array([x.start], np.int64)), e.const("end", np.array([end], np.int64)),
                             e.axes(x.axis)], suffix="x_steps")[0]
    if x.axis != 0:
        perm = [x.axis, *(a for a in range(x.rank) if a != x.axis)]
        t = e.node("Transpose", [t], attrs={"perm": perm}, suffix="X")[0]
    return t


def _detach(names: NameGenerator, tensor: gs.Tensor) -> None:
    """Give `tensor`'s current producer a throw-away output so a new node can produce it."""
    for node in list(tensor.inputs):
        for i, out in enumerate(node.outputs):
            if out is tensor:
                node.outputs[i] = gs.Variable(names(f"{tensor.name}_unfused"), dtype=tensor.dtype)
