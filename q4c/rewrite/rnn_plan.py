"""From matched LSTM cells to LSTM plans: chain unrolled steps, split chains where one ONNX
LSTM cannot stand for them, and turn Scan/Loop nodes whose body is one cell into a plan.

A chain links cell t+1 to cell t when t+1 reads t's h' as a gate operand and t's c' as its
c_prev. A chain is cut where the weights change, where an intermediate c' is read by anything
but the next step (an ONNX LSTM exposes only the last c), where the state fans out to two cells,
and where a step input depends on an earlier step (autoregressive feedback: stacking the inputs
would make a cycle).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import networkx as nx
import numpy as np
import onnx_graphsurgeon as gs

from q4c.rewrite.lstm_emit import LstmPlan, SeqInput, stacked_input
from q4c.rewrite.lstm_match import LstmCell, NoMatch, candidate, match_lstm_cell
from q4c.rewrite.view import DataflowView


@dataclass
class _Step:
    """A cell with its operands' roles settled: x (step input) and h (recurrent, or None)."""

    cell: LstmCell
    x: str
    h: str | None

    def params(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        c = self.cell
        hidden = c.hidden
        r = c.weights[self.h] if self.h is not None else np.zeros((4 * hidden, hidden), np.float32)
        return c.weights[self.x], r, c.bias_for({self.x, None}), c.bias_for({self.h} if self.h else set())

    def same_params(self, other: _Step) -> bool:
        return self.cell.hidden == other.cell.hidden and all(
            a.shape == b.shape and np.array_equal(a, b) for a, b in zip(self.params(), other.params()))


def match_cells(view: DataflowView) -> tuple[list[LstmCell], list[NoMatch]]:
    """Every LSTM cell candidate of one graph level, matched or declined."""
    cells: list[LstmCell] = []
    declined: list[NoMatch] = []
    for node in view.graph.nodes:
        result = match_lstm_cell(view, node)
        if isinstance(result, LstmCell):
            cells.append(result)
        elif isinstance(result, NoMatch):
            declined.append(result)
    return cells, declined


def unrolled_plans(view: DataflowView, cells: list[LstmCell]) -> tuple[list[LstmPlan], list[NoMatch], int]:
    """Plans for the chains of `cells` in `view`'s graph: (plans, declined, cells fused)."""
    declined: list[NoMatch] = []
    usable = []
    for cell in cells:
        reason = _cell_problem(view, cell)
        if reason is None:
            usable.append(cell)
        else:
            declined.append(reason)
    plans: list[LstmPlan] = []
    fused = 0
    for path in _paths(usable):
        for segment in _segments(view, path):
            plans.append(_segment_plan(view, segment))
            fused += len(segment)
    return plans, declined, fused


def _cell_problem(view: DataflowView, cell: LstmCell) -> NoMatch | None:
    if len(cell.operands) > 2 or (len(cell.operands) == 2 and all(
            w.shape[1] != cell.hidden for w in cell.weights.values())):
        return NoMatch("extra_inputs", f"{cell.h_out.name}: gates read {sorted(cell.operands)}, not one x and one h")
    for name, tensor in cell.operands.items():
        shape = view.shape(tensor, infer=False)
        if shape is not None and len(shape) != 2:
            return NoMatch("rank", f"{cell.h_out.name}: gate operand {name} has rank {len(shape)}, not 2")
    return None


def _paths(cells: list[LstmCell]) -> list[list[LstmCell]]:
    """Maximal chains t -> t+1 (networkx: a DiGraph of cells, fan-out edges dropped)."""
    dag = nx.DiGraph()
    dag.add_nodes_from(range(len(cells)))
    by_c = {c.c_out.name: i for i, c in enumerate(cells)}
    for i, cell in enumerate(cells):
        p = by_c.get(cell.c_prev.name)
        if p is not None and p != i and cells[p].h_out.name in cell.operands and len(cell.operands) == 2:
            dag.add_edge(p, i)
    for p in list(dag.nodes):
        if dag.out_degree(p) > 1:  # one state feeding two cells: not one sequence
            dag.remove_edges_from(list(dag.out_edges(p)))
    paths = []
    for head in nx.topological_sort(dag):
        if dag.in_degree(head) == 0:
            path = [head]
            while succ := list(dag.successors(path[-1])):
                path.append(succ[0])
            paths.append([cells[i] for i in path])
    return paths


def _segments(view: DataflowView, path: list[LstmCell]) -> list[list[_Step]]:
    steps = [_head_step(view, path[0], path[1] if len(path) > 1 else None)]
    for prev, cell in itertools.pairwise(path):
        h = prev.h_out.name
        steps.append(_Step(cell, next(n for n in cell.operands if n != h), h))
    segments: list[list[_Step]] = [[steps[0]]]
    inside = set(steps[0].cell.nodes)
    for prev, step in itertools.pairwise(steps):
        internal_c = not view.escapes(prev.cell.c_out, prev.cell.nodes | step.cell.nodes)
        feedback = bool(inside & nx.ancestors(view.dag, step.x)) if step.x in view.dag else False
        if internal_c and not feedback and step.same_params(segments[-1][0]):
            segments[-1].append(step)
            inside |= step.cell.nodes
        else:
            segments.append([step])
            inside = set(step.cell.nodes)
    return segments


def _head_step(view: DataflowView, cell: LstmCell, nxt: LstmCell | None) -> _Step:
    """Which operand of a chain's first cell is h. Any choice computes the same first step; a
    wrong one only makes the weights differ from the next step's, which cuts the chain there."""
    names = list(cell.operands)
    if len(names) == 1:
        return _Step(cell, names[0], None)
    fits = [n for n in names if cell.weights[n].shape[1] == cell.hidden]
    h = fits[0] if len(fits) == 1 else None
    if h is None and nxt is not None and cell.h_out.name in nxt.operands:
        r_next = nxt.weights[cell.h_out.name]
        same = [n for n in fits if cell.weights[n].shape == r_next.shape and np.array_equal(cell.weights[n], r_next)]
        h = same[0] if len(same) == 1 else None
    if h is None:
        zero = [n for n in fits if view.is_zero(cell.operands[n])]
        h = zero[0] if len(zero) == 1 else names[-1]
    x = next(n for n in names if n != h)
    return _Step(cell, x, h)


def _segment_plan(view: DataflowView, segment: list[_Step]) -> LstmPlan:
    head, last = segment[0], segment[-1]
    w, r, wb, rb = head.params()
    xs = [s.cell.operands[s.x] for s in segment]
    initial_h = head.cell.operands[head.h] if head.h is not None else None
    plan = LstmPlan(
        graph=view.graph, hidden=head.cell.hidden, w=w, r=r, wb=wb, rb=rb, x=stacked_input(view, xs),
        initial_h=None if initial_h is None or view.is_zero(initial_h) else initial_h,
        initial_c=None if view.is_zero(head.cell.c_prev) else head.cell.c_prev, steps=len(segment),
    )
    inside = set().union(*(s.cell.nodes for s in segment))
    absorbed = _stacks(view, segment, plan)
    for t, step in enumerate(segment):
        if view.escapes(step.cell.h_out, inside | absorbed):
            plan.step_h.append((step.cell.h_out, t))
    if view.escapes(last.cell.c_out, last.cell.nodes):
        plan.last_c.append(last.cell.c_out)
    return plan


def _stacks(view: DataflowView, segment: list[_Step], plan: LstmPlan) -> set[str]:
    """Find Concat(Unsqueeze(h_0, k), ..., Unsqueeze(h_T-1, k), axis=k) (torch.stack of the
    step outputs) and plan it as Y re-laid out; returns the Unsqueeze/Concat keys absorbed."""
    absorbed: set[str] = set()
    hs = [s.cell.h_out.name for s in segment]
    for unsq in view.consumers(segment[0].cell.h_out):
        if unsq.op != "Unsqueeze":
            continue
        for concat in view.consumers(unsq.outputs[0]):
            axis = _stack_axis(view, concat, hs)
            if axis is not None:
                plan.stacks.append((concat.outputs[0], axis))
                absorbed.add(view.key(concat))
                absorbed.update(view.key(view.producer(t)) for t in concat.inputs)
    return absorbed


def _stack_axis(view: DataflowView, concat: gs.Node, hs: list[str]) -> int | None:
    if concat.op != "Concat" or len(concat.inputs) != len(hs):
        return None
    axis = int(concat.attrs.get("axis", 0))
    axis = axis + 3 if axis < 0 else axis
    keys = {view.key(concat)}
    for tensor, h in zip(concat.inputs, hs):
        unsq = view.producer(tensor)
        if unsq is None or unsq.op != "Unsqueeze" or unsq.inputs[0].name != h:
            return None
        axes = view.constant(unsq.inputs[1]) if len(unsq.inputs) > 1 else np.asarray(unsq.attrs.get("axes", []))
        if axes is None or np.asarray(axes).size != 1 or int(np.asarray(axes).reshape(())) % 3 != axis:
            return None
        keys.add(view.key(unsq))
    if any(view.escapes(view.producer(t).outputs[0], keys) for t in concat.inputs):
        return None
    return axis if 0 <= axis <= 2 else None


# -- Scan / Loop bodies --------------------------------------------------------------------

def loop_plan(view: DataflowView, node: gs.Node, body_view: DataflowView) -> LstmPlan | NoMatch | None:
    """A plan replacing a Scan/Loop whose body is one LSTM cell by one LSTM; None when the body
    holds no LSTM candidate."""
    cells, declined = match_cells(body_view)
    if not cells and not declined:
        return None
    if declined:
        return declined[0]
    if len(cells) > 1:
        return NoMatch("loop_body", f"{node.name}: {len(cells)} cells in one body")
    cell = cells[0]
    body = body_view.graph
    if node.op == "Scan":
        return _scan_plan(view, node, body_view, body, cell)
    return _loop_plan(view, node, body_view, body, cell)


def _roles(body_view: DataflowView, cell: LstmCell, states: list[gs.Tensor], x_ok) -> tuple[int, int, str] | NoMatch:
    """(index of the h state, index of the c state, x operand name) among body state inputs."""
    names = [t.name for t in states]
    if cell.c_prev.name not in names:
        return NoMatch("loop_state", f"c_prev {cell.c_prev.name} is not a loop-carried state")
    c_index = names.index(cell.c_prev.name)
    h_names = [n for n in cell.operands if n in names and names.index(n) != c_index]
    x_names = [n for n in cell.operands if n not in names]
    if len(h_names) != 1 or len(x_names) != 1 or not x_ok(x_names[0]):
        return NoMatch("loop_state", f"gate operands {sorted(cell.operands)} are not one state h and one step input")
    return names.index(h_names[0]), c_index, x_names[0]


def _check_outputs(body_view: DataflowView, cell: LstmCell, outs: list[gs.Tensor], h_i: int, c_i: int) -> NoMatch | None:
    resolved = [body_view.resolve(t).name for t in outs]
    n_states = 2
    if resolved[h_i] != cell.h_out.name or resolved[c_i] != cell.c_out.name:
        return NoMatch("loop_outputs", "the carried states are not the cell's h' and c'")
    for name in resolved[n_states:]:
        if name != cell.h_out.name:
            return NoMatch("loop_outputs", f"scan output {name} is not the cell's h'")
    return None


def _scan_plan(view, node, body_view, body, cell) -> LstmPlan | NoMatch:
    n_scan = int(node.attrs.get("num_scan_inputs", 1))
    n_states = len(node.inputs) - n_scan
    if n_states != 2 or n_scan != 1:
        return NoMatch("loop_signature", f"{node.name}: {n_states} states and {n_scan} scan inputs, not h, c and x")
    if any(int(d) for d in [*node.attrs.get("scan_input_directions", []), *node.attrs.get("scan_output_directions", [])]):
        return NoMatch("loop_direction", f"{node.name}: reverse scan directions")
    x_body = body.inputs[2].name
    roles = _roles(body_view, cell, list(body.inputs[:2]), lambda n: n == x_body)
    if isinstance(roles, NoMatch):
        return roles
    h_i, c_i, x_name = roles
    problem = _check_outputs(body_view, cell, list(body.outputs), h_i, c_i)
    if problem is not None:
        return problem
    src = node.inputs[2]
    shape = view.shape(src)
    rank = len(shape) if shape is not None else 3
    if rank != 3:
        return NoMatch("rank", f"{node.name}: scan input of rank {rank}, not 3")
    axis = int((node.attrs.get("scan_input_axes") or [0])[0]) % 3
    step = _Step(cell, x_name, body.inputs[h_i].name)
    w, r, wb, rb = step.params()
    h0, c0 = node.inputs[h_i], node.inputs[c_i]
    plan = LstmPlan(graph=view.graph, hidden=cell.hidden, w=w, r=r, wb=wb, rb=rb, x=SeqInput(src, axis),
                    initial_h=None if view.is_zero(h0) else h0, initial_c=None if view.is_zero(c0) else c0)
    plan.last_h.append(node.outputs[h_i])
    plan.last_c.append(node.outputs[c_i])
    out_axes = list(node.attrs.get("scan_output_axes", [])) or [0] * (len(node.outputs) - 2)
    for tensor, axis_k in zip(node.outputs[2:], out_axes):
        plan.stacks.append((tensor, int(axis_k) % 3))
    return plan


def _loop_plan(view, node, body_view, body, cell) -> LstmPlan | NoMatch:
    if len(node.inputs) != 4 or node.inputs[0].is_empty():
        return NoMatch("loop_signature", f"{node.name}: not Loop(M, cond, h, c) with a trip count")
    cond = node.inputs[1]
    if not cond.is_empty() and not _true(view, cond):
        return NoMatch("loop_signature", f"{node.name}: the loop condition is not constant true")
    iter_in, cond_in = body.inputs[0], body.inputs[1]
    cond_out = body_view.resolve(body.outputs[0])
    if cond_out.name != cond_in.name and not _true(body_view, cond_out):
        return NoMatch("loop_signature", f"{node.name}: the body may stop early")
    gathers: dict[str, gs.Node] = {}

    def is_step_input(name: str) -> bool:
        gather = body_view.producer(body_view.tensors[name])
        if gather is None or gather.op != "Gather" or body_view.resolve(gather.inputs[1]).name != iter_in.name:
            return False
        if body_view.producer(gather.inputs[0]) is not None:  # must come from outside the body
            return False
        gathers[name] = gather
        return True

    roles = _roles(body_view, cell, list(body.inputs[2:4]), is_step_input)
    if isinstance(roles, NoMatch):
        return roles
    h_i, c_i, x_name = roles
    problem = _check_outputs(body_view, cell, list(body.outputs[1:]), h_i, c_i)
    if problem is not None:
        return problem
    gather = gathers[x_name]
    src = gather.inputs[0]
    shape = view.shape(src)
    if shape is not None and len(shape) != 3:
        return NoMatch("rank", f"{node.name}: the step input is indexed from a rank-{len(shape)} tensor, not 3")
    axis = int(gather.attrs.get("axis", 0)) % 3
    trips = view.constant(node.inputs[0])
    length = int(np.asarray(trips).reshape(())) if trips is not None else None
    whole = shape is not None and length is not None and shape[axis] == length
    x = SeqInput(src, axis, 3, 0, None if whole else length, None if length is not None else node.inputs[0])
    step = _Step(cell, x_name, body.inputs[2 + h_i].name)
    w, r, wb, rb = step.params()
    h0, c0 = node.inputs[2 + h_i], node.inputs[2 + c_i]
    plan = LstmPlan(graph=view.graph, hidden=cell.hidden, w=w, r=r, wb=wb, rb=rb, x=x, steps=length,
                    initial_h=None if view.is_zero(h0) else h0, initial_c=None if view.is_zero(c0) else c0)
    plan.last_h.append(node.outputs[h_i])
    plan.last_c.append(node.outputs[c_i])
    for tensor in node.outputs[2:]:  # Loop stacks scan outputs on a new leading axis
        plan.stacks.append((tensor, 0))
    return plan


def _true(view: DataflowView, tensor: gs.Tensor) -> bool:
    value = view.constant(tensor)
    return value is not None and value.size == 1 and bool(value.reshape(()))


__all__ = ["candidate", "loop_plan", "match_cells", "unrolled_plans"]
