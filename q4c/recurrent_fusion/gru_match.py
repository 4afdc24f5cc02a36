"""Recognize one decomposed GRU cell and express it as ONNX GRU weights (gates z, r, h).

PyTorch's GRUCell (ONNX `linear_before_reset=1`):
    r = sigmoid(x W_r + b_ir + h U_r + b_hr),  z = sigmoid(x W_z + b_iz + h U_z + b_hz)
    n = tanh(x W_n + b_in + r * (h U_n + b_hn)),  h' = (1 - z) * n + z * h
and the original formulation (`linear_before_reset=0`): n = tanh(x W_n + (r * h) U_n + b).
The update may be written (1 - z) * n + z * h, n + z * (h - n), or with z and 1 - z swapped
(then ONNX's z is 1 - z: its weights and bias are negated, sigmoid(-a) = 1 - sigmoid(a)).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs

from q4c.nomatch import NoMatch
from q4c.recurrent_fusion.affine import Affine, AffineParser
from q4c.recurrent_fusion.lstm_match import ACTIVATION_OPS
from q4c.recurrent_fusion.view import DataflowView


@dataclass
class GruCell:
    """One matched GRU cell in ONNX layout: W [3H, I], R [3H, H], Wb/Rb [3H] (gates z, r, h)."""

    hidden: int
    h_out: gs.Tensor
    h_prev: gs.Tensor
    x: gs.Tensor
    w: np.ndarray
    r: np.ndarray
    wb: np.ndarray
    rb: np.ndarray
    linear_before_reset: int
    nodes: set[str] = field(default_factory=set)


@dataclass
class _Update:
    z: gs.Tensor  # the gate multiplying h_prev in h' (ONNX's z when not flipped)
    n: gs.Tensor
    h_prev: gs.Tensor
    flipped: bool  # h' = z * n + (1 - z) * h: ONNX z = 1 - graph z
    nodes: list[gs.Node]


def match_gru_cell(view: DataflowView, node: gs.Node) -> GruCell | NoMatch | None:
    """Match the GRU cell whose h' is `node`'s output; None when `node` is not a candidate."""
    update = _update(view, node)
    if update is None:
        return None
    nodes = {view.key(n) for n in update.nodes}
    z_act, n_act = view.producer(update.z), view.producer(update.n)
    if z_act.op != "Sigmoid" or n_act.op != "Tanh":
        return NoMatch("skipped_nonstandard_activation", f"{node.name}: z={z_act.op}, n={n_act.op}")
    nodes.update({view.key(z_act), view.key(n_act)})
    h_prev = view.resolve(update.h_prev)
    parser = AffineParser(view, set())
    z_aff = parser.parse(z_act.inputs[0])
    if isinstance(z_aff, NoMatch):
        return z_aff
    found = _candidate_gate(view, n_act.inputs[0], parser, h_prev)
    if isinstance(found, NoMatch):
        return found
    r_act, r_aff, x_n, h_n, lbr, n_nodes = found
    nodes.update(n_nodes)
    nodes.add(view.key(r_act))
    nodes |= parser.nodes
    hidden = z_aff.width
    if any(a.width != hidden for a in (r_aff, x_n, h_n)):
        return NoMatch("skipped_gate_shape", f"{node.name}: gate widths differ")
    operands = {**z_aff.operands, **r_aff.operands, **x_n.operands}
    xs = [name for name in operands if name != h_prev.name]
    if len(xs) != 1 or set(h_n.operands) - {h_prev.name}:
        return NoMatch("skipped_extra_inputs", f"{node.name}: gates read {sorted(operands)}, not one x and h")
    x = xs[0]
    rows = {name: a.weights[name].shape[0] for a in (z_aff, r_aff, x_n, h_n) for name in a.weights}
    if rows.get(h_prev.name, hidden) != hidden:
        return NoMatch("skipped_gate_shape", f"{node.name}: recurrent weights are not [H, 3H]")
    sign = -1 if update.flipped else 1
    w = np.concatenate([sign * z_aff.weight(x, rows[x]), r_aff.weight(x, rows[x]), x_n.weight(x, rows[x])], axis=1).T
    r = np.concatenate([sign * z_aff.weight(h_prev.name, hidden), r_aff.weight(h_prev.name, hidden),
                        h_n.weight(h_prev.name, hidden)], axis=1).T
    every = {None, x, h_prev.name}
    wb = np.concatenate([sign * z_aff.bias(every), r_aff.bias(every), x_n.bias(every)])
    rb = np.concatenate([np.zeros(2 * hidden, np.float32), h_n.bias(every)])
    if any(a.dtype != np.float32 for a in (w, r)):
        return NoMatch("skipped_dtype", f"{node.name}: gate weights are not float32")
    cell = GruCell(hidden, node.outputs[0], h_prev, operands[x], np.ascontiguousarray(w), np.ascontiguousarray(r),
                   wb.astype(np.float32), rb.astype(np.float32), lbr, nodes)
    for key in nodes:
        for tensor in view.nodes[key].outputs:
            if tensor.name != cell.h_out.name and view.escapes(tensor, nodes):
                return NoMatch("skipped_intermediate_used", f"{tensor.name} (inside the GRU cell at {node.name}) is read outside it")
    return cell


def _update(view: DataflowView, node: gs.Node) -> _Update | None:
    """h' = (1 - z) * n + z * h  |  z * n + (1 - z) * h  |  n + z * (h - n), operands in any order."""
    if node.op != "Add" or len(node.inputs) != 2:
        return None
    a, b = (view.producer(t) for t in node.inputs)
    if a is None or b is None:
        return None
    if a.op == "Mul" and b.op == "Mul":
        for m1, m2 in ((a, b), (b, a)):
            for i in (0, 1):
                sub = view.producer(m1.inputs[i])
                if sub is None or sub.op != "Sub" or not _is_one(view, sub.inputs[0]):
                    continue
                z, other = sub.inputs[1].name, m1.inputs[1 - i]
                names = [t.name for t in m2.inputs]
                if z not in names:
                    continue
                partner = m2.inputs[1 - names.index(z)]
                z_t = m2.inputs[names.index(z)]
                # (1 - z) * other + z * partner: n is the Tanh-like one, h the other
                if _act(view, other) and not _act(view, partner):  # (1 - z) * n + z * h
                    return _Update(z_t, other, partner, False, [node, m1, m2, sub])
                if _act(view, partner) and not _act(view, other):  # z * n + (1 - z) * h
                    return _Update(z_t, partner, other, True, [node, m1, m2, sub])
    for n_side, m in ((a, b), (b, a)):  # n + z * (h - n)
        if m.op != "Mul" or n_side is None:
            continue
        n_t = n_side.outputs[0]
        for i in (0, 1):
            sub = view.producer(m.inputs[i])
            if sub is not None and sub.op == "Sub" and sub.inputs[1].name == n_t.name and _act(view, n_t) \
                    and _act(view, m.inputs[1 - i]):
                return _Update(m.inputs[1 - i], n_t, sub.inputs[0], False, [node, m, sub])
    return None


def _candidate_gate(view: DataflowView, pre_n: gs.Tensor, parser: AffineParser, h_prev: gs.Tensor):
    """Split n's pre-activation into its reset-gate part: returns (r activation node, r's
    affine, x-side affine of n, h-side affine of n, linear_before_reset, nodes)."""
    terms, adds = _add_terms(view, pre_n)
    nodes = {view.key(n) for n in adds}
    reset = []
    for t in terms:
        m = view.producer(t)
        if m is not None and m.op == "Mul":
            for i in (0, 1):
                r = view.producer(m.inputs[i])
                if r is not None and r.op in ACTIVATION_OPS:
                    reset.append((t, m, r, m.inputs[1 - i]))
                    break
    if len(reset) == 1:  # r * (h U_n + b_hn): linear_before_reset = 1
        t, m, r_act, inner = reset[0]
        if r_act.op != "Sigmoid":
            return NoMatch("skipped_nonstandard_activation", f"reset gate {r_act.op}")
        h_n = parser.parse(inner)
        rest = [x for x in terms if x.name != t.name]
        x_n = _sum(parser, rest)
        if isinstance(h_n, NoMatch) or isinstance(x_n, NoMatch):
            return h_n if isinstance(h_n, NoMatch) else x_n
        if set(h_n.operands) != {h_prev.name} or h_prev.name in x_n.operands:
            return NoMatch("skipped_gate_projection", "n mixes x and h outside the reset product")
        r_aff = parser.parse(r_act.inputs[0])
        if isinstance(r_aff, NoMatch):
            return r_aff
        return r_act, r_aff, x_n, h_n, 1, nodes | {view.key(m)}
    # (r * h) U_n + x W_n + b: linear_before_reset = 0
    full = _sum(parser, terms)
    if isinstance(full, NoMatch):
        return full
    for name, operand in full.operands.items():
        m = view.producer(operand)
        if m is None or m.op != "Mul":
            continue
        names = [view.resolve(t).name for t in m.inputs]
        if h_prev.name in names:
            r_act = view.producer(m.inputs[1 - names.index(h_prev.name)])
            if r_act is None or r_act.op != "Sigmoid":
                return NoMatch("skipped_nonstandard_activation", "reset gate is not a Sigmoid")
            r_aff = parser.parse(r_act.inputs[0])
            if isinstance(r_aff, NoMatch):
                return r_aff
            h_n = Affine(full.width, {h_prev.name: full.weights[name]}, {h_prev.name: h_prev})
            x_n = Affine(full.width, {k: w for k, w in full.weights.items() if k != name},
                         {k: t for k, t in full.operands.items() if k != name}, dict(full.biases))
            return r_act, r_aff, x_n, h_n, 0, nodes | {view.key(m)}
    return NoMatch("skipped_cell_structure", f"{pre_n.name}: no reset gate in the candidate's pre-activation")


def _add_terms(view: DataflowView, tensor: gs.Tensor) -> tuple[list[gs.Tensor], list[gs.Node]]:
    terms, adds, stack = [], [], [tensor]
    while stack:
        t = stack.pop()
        node = view.producer(t)
        if node is not None and node.op == "Add":
            adds.append(node)
            stack.extend(node.inputs)
        else:
            terms.append(t)
    return terms, adds


def _sum(parser: AffineParser, terms: list[gs.Tensor]) -> Affine | NoMatch:
    parts, biases = [], []
    for t in terms:
        const = parser.view.constant(t)
        if const is not None:
            biases.append(np.asarray(const, np.float32))
            continue
        a = parser.parse(t)
        if isinstance(a, NoMatch):
            return a
        parts.append(a)
    if not parts:
        return NoMatch("skipped_gate_projection", "no input term in n")
    out = Affine(parts[0].width)
    for p in parts:
        if p.width != out.width:
            return NoMatch("skipped_gate_shape", "terms of different widths in n")
        out.add(p)
    for b in biases:
        if b.size not in (1, out.width):
            return NoMatch("skipped_bias_shape", f"a bias of shape {b.shape} in n")
        out.add(Affine(out.width, biases={None: np.broadcast_to(b.reshape(-1), (out.width,)).astype(np.float32)}))
    return out


def _act(view: DataflowView, tensor: gs.Tensor) -> bool:
    return view.op_of(tensor) in ACTIVATION_OPS


def _is_one(view: DataflowView, tensor: gs.Tensor) -> bool:
    value = view.constant(tensor)
    return value is not None and value.size >= 1 and bool(np.all(value == 1))
