"""Scan and Loop nodes whose body is one LSTM/GRU/RNN cell, as plans for one ONNX op.

A Scan qualifies with one scan input (forward, rank 3) and the cell's states as its carried
states; a Loop with a trip count, a condition that is constant true, and the step input read by
Gather(outer sequence, iteration number). The carried states must be the cell's new states and
every scan output the cell's h'.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx_graphsurgeon as gs

from q4c.nomatch import NoMatch
from q4c.recurrent_fusion.gru_match import GruCell
from q4c.recurrent_fusion.lstm_match import LstmCell
from q4c.recurrent_fusion.rnn_emit import RnnPlan, SeqInput
from q4c.recurrent_fusion.rnn_match import RnnCell
from q4c.recurrent_fusion.rnn_plan import Cell, Step, match_cells, variant_fields
from q4c.recurrent_fusion.view import DataflowView


def loop_plan(view: DataflowView, node: gs.Node, body_view: DataflowView) -> RnnPlan | NoMatch | None:
    """A plan replacing a Scan/Loop whose body is one LSTM/GRU/RNN cell by one op; None when the
    body holds no cell candidate."""
    cells, declined = match_cells(body_view)
    if any(not isinstance(c, RnnCell) for c in cells):
        cells = [c for c in cells if not isinstance(c, RnnCell)]
    else:  # plain RNN candidates count only when one of their operands is a carried state
        states = {t.name for t in body_view.graph.inputs}
        cells = [c for c in cells if states & set(c.operands)]
    if not cells and not declined:
        return None
    if declined:
        return declined[0]
    if len(cells) > 1:
        return NoMatch("skipped_loop_body", f"{node.name}: {len(cells)} cells in one body")
    cell = cells[0]
    n_states = 2 if isinstance(cell, LstmCell) else 1
    if node.op == "Scan":
        return _scan_plan(view, node, body_view, cell, n_states)
    return _loop_plan(view, node, body_view, cell, n_states)


def _roles(cell: Cell, states: list[gs.Tensor], is_x: Callable[[str], bool]) -> tuple[int, int | None, str] | NoMatch:
    """(index of the h state, index of the c state (LSTM), x operand name) among body states."""
    names = [t.name for t in states]
    if isinstance(cell, GruCell):
        if cell.h_prev.name not in names or not is_x(cell.x.name):
            return NoMatch("skipped_loop_state", "the GRU's h is not the carried state or x is not the step input")
        return names.index(cell.h_prev.name), None, cell.x.name
    if isinstance(cell, RnnCell):
        h_names = [n for n in cell.operands if n in names]
        x_names = [n for n in cell.operands if n not in names]
        if len(h_names) != 1 or len(x_names) != 1 or not is_x(x_names[0]):
            return NoMatch("skipped_loop_state", f"RNN operands {sorted(cell.operands)} are not one state h and one step input")
        return names.index(h_names[0]), None, x_names[0]
    if cell.c_prev.name not in names:
        return NoMatch("skipped_loop_state", f"c_prev {cell.c_prev.name} is not a loop-carried state")
    c_index = names.index(cell.c_prev.name)
    h_names = [n for n in cell.operands if n in names and names.index(n) != c_index]
    x_names = [n for n in cell.operands if n not in names]
    if len(h_names) != 1 or len(x_names) != 1 or not is_x(x_names[0]):
        return NoMatch("skipped_loop_state", f"gate operands {sorted(cell.operands)} are not one state h and one step input")
    return names.index(h_names[0]), c_index, x_names[0]


def _check_outputs(body_view: DataflowView, cell: Cell, outs: list[gs.Tensor], h_i: int, c_i: int | None,
                   n_states: int) -> NoMatch | None:
    resolved = [body_view.resolve(t).name for t in outs]
    if resolved[h_i] != cell.h_out.name or (c_i is not None and resolved[c_i] != cell.c_out.name):
        return NoMatch("skipped_loop_outputs", "the carried states are not the cell's new states")
    for name in resolved[n_states:]:
        if name != cell.h_out.name:
            return NoMatch("skipped_loop_outputs", f"scan output {name} is not the cell's h'")
    return None


def _scan_plan(view: DataflowView, node: gs.Node, body_view: DataflowView, cell: Cell, n_states: int) -> RnnPlan | NoMatch:
    body = body_view.graph
    n_scan = int(node.attrs.get("num_scan_inputs", 1))
    if len(node.inputs) - n_scan != n_states or n_scan != 1:
        return NoMatch("skipped_loop_signature", f"{node.name}: {len(node.inputs) - n_scan} states and {n_scan} scan inputs")
    if any(int(d) for d in [*node.attrs.get("scan_input_directions", []), *node.attrs.get("scan_output_directions", [])]):
        return NoMatch("skipped_loop_direction", f"{node.name}: reverse scan directions")
    x_body = body.inputs[n_states].name
    roles = _roles(cell, list(body.inputs[:n_states]), lambda n: n == x_body)
    if isinstance(roles, NoMatch):
        return roles
    h_i, c_i, x_name = roles
    problem = _check_outputs(body_view, cell, list(body.outputs), h_i, c_i, n_states)
    if problem is not None:
        return problem
    src = node.inputs[n_states]
    shape = view.shape(src)
    if shape is not None and len(shape) != 3:
        return NoMatch("skipped_rank", f"{node.name}: scan input of rank {len(shape)}, not 3")
    axis = int((node.attrs.get("scan_input_axes") or [0])[0]) % 3
    plan = _state_plan(view, node, cell, x_name, body.inputs[h_i].name, SeqInput(src, axis), h_i, c_i, None)
    out_axes = list(node.attrs.get("scan_output_axes", [])) or [0] * (len(node.outputs) - n_states)
    for tensor, axis_k in zip(node.outputs[n_states:], out_axes):
        plan.stacks.append((tensor, int(axis_k) % 3))
    return plan


def _loop_plan(view: DataflowView, node: gs.Node, body_view: DataflowView, cell: Cell, n_states: int) -> RnnPlan | NoMatch:
    body = body_view.graph
    if len(node.inputs) != 2 + n_states or node.inputs[0].is_empty():
        return NoMatch("skipped_loop_signature", f"{node.name}: not Loop(M, cond, states) with a trip count")
    cond = node.inputs[1]
    if not cond.is_empty() and not _true(view, cond):
        return NoMatch("skipped_loop_signature", f"{node.name}: the loop condition is not constant true")
    iter_in, cond_in = body.inputs[0], body.inputs[1]
    if body_view.resolve(body.outputs[0]).name != cond_in.name and not _true(body_view, body.outputs[0]):
        return NoMatch("skipped_loop_signature", f"{node.name}: the body may stop early")
    gathers: dict[str, gs.Node] = {}

    def is_step_input(name: str) -> bool:
        gather = body_view.producer(body_view.tensors[name])
        if gather is None or gather.op != "Gather" or body_view.resolve(gather.inputs[1]).name != iter_in.name:
            return False
        if body_view.producer(gather.inputs[0]) is not None:  # must come from outside the body
            return False
        gathers[name] = gather
        return True

    roles = _roles(cell, list(body.inputs[2:2 + n_states]), is_step_input)
    if isinstance(roles, NoMatch):
        return roles
    h_i, c_i, x_name = roles
    problem = _check_outputs(body_view, cell, list(body.outputs[1:]), h_i, c_i, n_states)
    if problem is not None:
        return problem
    gather = gathers[x_name]
    src = gather.inputs[0]
    shape = view.shape(src)
    if shape is not None and len(shape) != 3:
        return NoMatch("skipped_rank", f"{node.name}: the step input is indexed from a rank-{len(shape)} tensor, not 3")
    axis = int(gather.attrs.get("axis", 0)) % 3
    trips = view.constant(node.inputs[0])
    length = int(np.asarray(trips).reshape(())) if trips is not None else None
    whole = shape is not None and length is not None and shape[axis] == length
    x = SeqInput(src, axis, 3, 0, None if whole else length, None if length is not None else node.inputs[0])
    plan = _state_plan(view, node, cell, x_name, body.inputs[2 + h_i].name, x, h_i, c_i, 2)
    plan.steps = length
    for tensor in node.outputs[n_states:]:  # Loop stacks scan outputs on a new leading axis
        plan.stacks.append((tensor, 0))
    return plan


def _state_plan(view: DataflowView, node: gs.Node, cell: Cell, x_name: str, h_name: str, x: SeqInput,
                h_i: int, c_i: int | None, first_state: int | None) -> RnnPlan:
    """The plan of a loop node: initial states are its state inputs, final states its outputs."""
    offset = first_state or 0
    op, variant, w, r, wb, rb = Step(cell, x_name, h_name).params()
    h0 = node.inputs[offset + h_i]
    c0 = node.inputs[offset + c_i] if c_i is not None else None
    plan = RnnPlan(graph=view.graph, hidden=cell.hidden, w=w, r=r, wb=wb, rb=rb, x=x, op=op, **variant_fields(op, variant),
                   initial_h=None if view.is_zero(h0) else h0,
                   initial_c=None if c0 is None or view.is_zero(c0) else c0)
    plan.last_h.append(node.outputs[h_i])
    if c_i is not None:
        plan.last_c.append(node.outputs[c_i])
    return plan


def _true(view: DataflowView, tensor: gs.Tensor) -> bool:
    value = view.constant(tensor)
    return value is not None and value.size == 1 and bool(value.reshape(()))
