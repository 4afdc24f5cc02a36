"""Recognize one decomposed LSTM cell: gate projections, Split/Slice into four gates,
Sigmoid/Tanh, c' = f*c + i*g, h' = o*tanh(c').

The matcher starts at a candidate h' (a Mul of something and act(Add(Mul, Mul))) and returns
an `LstmCell` with its weights already in ONNX LSTM layout, or `NoMatch(code, detail)`. Each
gate's pre-activation is read by q4c.recurrent_fusion.affine, so every layout that is a sum of constant-
weight products works: one fused projection split by `Split` or four `Slice`s (bounds may be
computed from `Shape`, as torch.chunk exports them), x and h projections split separately and
added per gate, one projection on Concat(x, h), four separate per-gate projections; with or
without biases, in any gate order.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs

from q4c.nomatch import NoMatch
from q4c.recurrent_fusion.affine import Affine, AffineParser
from q4c.recurrent_fusion.view import DataflowView

#: Unary ops that can sit where an LSTM applies an activation: any of them makes a candidate,
#: only Sigmoid (gates) and Tanh (candidate cell, output) make a standard LSTM.
ACTIVATION_OPS = frozenset({"Sigmoid", "Tanh", "HardSigmoid", "Relu", "LeakyRelu", "Elu", "Softsign",
                            "Softplus", "ThresholdedRelu", "HardSwish", "Gelu", "Selu"})
#: PyTorch's order is i, f, g, o; ONNX LSTM W/R/B stack gates i, o, f, c (c = PyTorch's g).
ONNX_GATE_ORDER = ("i", "o", "f", "g")


@dataclass
class LstmCell:
    """One matched cell. Weights are [4H, K] per operand in ONNX gate order (i, o, f, c);
    biases [4H] in ONNX order, keyed by the operand whose Gemm carried them (None: free)."""

    hidden: int
    h_out: gs.Tensor
    c_out: gs.Tensor
    c_prev: gs.Tensor
    operands: dict[str, gs.Tensor]
    weights: dict[str, np.ndarray]
    biases: dict[str | None, np.ndarray]
    nodes: set[str] = field(default_factory=set)

    def bias_for(self, names: set[str | None]) -> np.ndarray:
        total = np.zeros(4 * self.hidden, np.float32)
        for key, value in self.biases.items():
            if key in names:
                total = total + value
        return total


def candidate(view: DataflowView, node: gs.Node) -> tuple[int, gs.Node, gs.Node | None, gs.Node] | None:
    """(operand index of act(c'), act node, Clip node or None, c' Add) if `node` looks like
    h' = o * act(c') with c' = Add(Mul, Mul); None when it is not an LSTM candidate at all."""
    if node.op != "Mul" or len(node.inputs) != 2:
        return None
    for j in (0, 1):
        act = view.producer(node.inputs[j])
        if act is None or act.op not in ACTIVATION_OPS:
            continue
        clip = None
        update = view.producer(act.inputs[0])
        if update is not None and update.op == "Clip":
            clip, update = update, view.producer(update.inputs[0])
        if update is None or update.op != "Add" or len(update.inputs) != 2:
            continue
        if all((p := view.producer(t)) is not None and p.op == "Mul" for t in update.inputs):
            return j, act, clip, update
    return None


def match_lstm_cell(view: DataflowView, node: gs.Node) -> LstmCell | NoMatch | None:
    """Match the cell whose h' is `node`'s output. None: not a candidate (nothing to count)."""
    found = candidate(view, node)
    if found is None:
        return None
    j, act, clip, update = found
    if clip is not None:
        return NoMatch("skipped_cell_clip", f"{clip.name}: the cell state is clipped before the output activation")
    h_out, c_out = node.outputs[0], update.outputs[0]
    nodes = {view.key(n) for n in (node, act, update)}
    muls = [view.producer(t) for t in update.inputs]
    nodes.update(view.key(m) for m in muls)

    gate_like = [[_is_gate_like(view, t) for t in m.inputs] for m in muls]
    both = [all(flags) for flags in gate_like]
    if sum(both) != 1 or not any(gate_like[both.index(False)]):
        return NoMatch("skipped_cell_structure", f"{update.name}: not f*c + i*g (which product is f*c is unclear)")
    ig, fc = muls[both.index(True)], muls[both.index(False)]
    f_index = gate_like[both.index(False)].index(True)
    f_t, c_prev = fc.inputs[f_index], fc.inputs[1 - f_index]
    if _is_gate_like(view, c_prev):
        return NoMatch("skipped_cell_structure", f"{fc.name}: both factors of f*c are activations")
    i_t, g_t = ig.inputs
    if view.op_of(i_t) != "Sigmoid" and view.op_of(g_t) == "Sigmoid":
        i_t, g_t = g_t, i_t
    o_t = node.inputs[1 - j]
    if not _is_gate_like(view, o_t):
        return NoMatch("skipped_cell_structure", f"{node.name}: the output gate is not an activation")
    gate_outputs = {"i": i_t, "f": f_t, "g": g_t, "o": o_t}
    gate_acts = {k: view.producer(t) for k, t in gate_outputs.items()}
    if len({view.key(n) for n in gate_acts.values()}) != 4:
        return NoMatch("skipped_cell_structure", f"{node.name}: gates share an activation node")
    wanted = {"i": "Sigmoid", "f": "Sigmoid", "g": "Tanh", "o": "Sigmoid"}
    odd = {k: n.op for k, n in gate_acts.items() if n.op != wanted[k]}
    if act.op != "Tanh":
        odd["h"] = act.op
    if odd:
        return NoMatch("skipped_nonstandard_activation", f"{node.name}: " + ", ".join(f"{k}={v}" for k, v in sorted(odd.items())))
    nodes.update(view.key(n) for n in gate_acts.values())
    c_prev_names = {view.resolve(c_prev).name, c_prev.name}
    pre = {k: n.inputs[0] for k, n in gate_acts.items()}

    cell = _gates(view, pre, nodes, c_prev_names)
    if isinstance(cell, NoMatch):
        return cell
    hidden, operands, weights, biases = cell
    if any(w.dtype != np.float32 for w in weights.values()):
        return NoMatch("skipped_dtype", f"{node.name}: gate weights are not float32")
    result = LstmCell(hidden, h_out, c_out, view.resolve(c_prev), operands, weights, biases, nodes)
    for key in result.nodes:
        for tensor in view.nodes[key].outputs:
            if tensor.name not in (h_out.name, c_out.name) and view.escapes(tensor, result.nodes):
                return NoMatch("skipped_intermediate_used", f"{tensor.name} (inside the cell at {node.name}) is read outside it")
    return result


def _is_gate_like(view: DataflowView, tensor: gs.Tensor) -> bool:
    return view.op_of(tensor) in ACTIVATION_OPS


def _gates(view: DataflowView, pre: dict[str, gs.Tensor], nodes: set[str], c_prev_names: set[str]):
    """The gate projections: (hidden, operands, weights [4H, K] ONNX order, biases [4H])."""
    parser = AffineParser(view, c_prev_names)
    affines: dict[str, Affine] = {}
    for k, t in pre.items():
        affine = parser.parse(t)
        if isinstance(affine, NoMatch):
            return affine
        affines[k] = affine
    widths = {a.width for a in affines.values()}
    if len(widths) != 1:
        return NoMatch("skipped_gate_shape", f"gate widths differ: {sorted(widths)}")
    hidden = widths.pop()
    nodes |= parser.nodes
    operands: dict[str, gs.Tensor] = {}
    rows: dict[str, int] = {}
    for a in affines.values():
        operands.update(a.operands)
        for name, w in a.weights.items():
            if rows.setdefault(name, w.shape[0]) != w.shape[0]:
                return NoMatch("skipped_gate_shape", f"operand {name} has weights of different widths")
    weights = {name: np.ascontiguousarray(np.concatenate(
        [affines[k].weight(name, rows[name]) for k in ONNX_GATE_ORDER], axis=1).T) for name in operands}
    biases = {key: np.concatenate([affines[k].bias({key}) for k in ONNX_GATE_ORDER])
              for key in {key for a in affines.values() for key in a.biases}}
    return hidden, operands, weights, biases
