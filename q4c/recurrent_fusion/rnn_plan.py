"""From matched LSTM/GRU/RNN cells to plans for one ONNX op each: chain unrolled steps and cut chains
where one op cannot stand for them (Scan/Loop nodes whose body is one cell: loop_plan).

A chain links cell t+1 to cell t when t+1's recurrent input is t's h' (and, for an LSTM, its
c_prev is t's c'; for a plain RNN, t and t+1 share a weight, which tells a layer's own previous
step from the layer below in a stack). Plain RNN cells are only candidates (rnn_match): an
unrolled chain of fewer than two of them is left alone. A chain is cut where the weights change, where an intermediate LSTM c' is
read by anything but the next step (the LSTM op exposes only its last c), where a state fans out
to two cells, and where a step input depends on an earlier step (autoregressive feedback:
stacking the inputs up front would make a cycle).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import networkx as nx
import numpy as np
import onnx_graphsurgeon as gs

from q4c.nomatch import NoMatch
from q4c.recurrent_fusion.gru_match import GruCell, match_gru_cell
from q4c.recurrent_fusion.lstm_match import LstmCell, match_lstm_cell
from q4c.recurrent_fusion.rnn_emit import RnnPlan, stacked_input
from q4c.recurrent_fusion.rnn_match import RnnCell, match_rnn_cell
from q4c.recurrent_fusion.view import DataflowView

Cell = LstmCell | GruCell | RnnCell


@dataclass
class Step:
    """A cell with its operands' roles settled: x (step input) and h (recurrent, or None)."""

    cell: Cell
    x: str
    h: str | None

    @property
    def x_tensor(self) -> gs.Tensor:
        return self.cell.x if isinstance(self.cell, GruCell) else self.cell.operands[self.x]

    def params(self) -> tuple[str, int | str, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(op, variant, W, R, Wb, Rb) in ONNX layout; variant: GRU linear_before_reset, RNN
        activation, LSTM 0."""
        c = self.cell
        if isinstance(c, GruCell):
            return "GRU", c.linear_before_reset, c.w, c.r, c.wb, c.rb
        op, variant, gates = ("RNN", c.activation, 1) if isinstance(c, RnnCell) else ("LSTM", 0, 4)
        r = c.weights[self.h] if self.h is not None else np.zeros((gates * c.hidden, c.hidden), np.float32)
        return op, variant, c.weights[self.x], r, c.bias_for({self.x, None}), c.bias_for({self.h} if self.h else set())

    def same_params(self, other: Step) -> bool:
        a, b = self.params(), other.params()
        return a[:2] == b[:2] and all(x.shape == y.shape and np.array_equal(x, y) for x, y in zip(a[2:], b[2:]))

    def zero_state_head_of(self, other: Step) -> bool:
        """Whether this RNN step without a recurrent term (its state zero and folded away,
        Rb folded into its bias) computes `other`'s step from a zero state."""
        if not isinstance(self.cell, RnnCell) or self.h is not None or other.h is None:
            return False
        a, b = self.params(), other.params()
        return (a[:2] == b[:2] and a[2].shape == b[2].shape and np.array_equal(a[2], b[2])
                and np.allclose(a[4] + a[5], b[4] + b[5], rtol=1e-6, atol=0))


def match_cells(view: DataflowView) -> tuple[list[Cell], list[NoMatch]]:
    """Every LSTM/GRU cell candidate of one graph level, matched or declined, and the plain RNN
    cell candidates outside them."""
    cells: list[Cell] = []
    declined: list[NoMatch] = []
    for node in view.graph.nodes:
        for matcher in (match_lstm_cell, match_gru_cell):
            result = matcher(view, node)
            if isinstance(result, (LstmCell, GruCell)):
                cells.append(result)
            elif isinstance(result, NoMatch):
                declined.append(result)
            if result is not None:
                break
    taken = set().union(*(c.nodes for c in cells)) if cells else set()
    for node in view.graph.nodes:
        if view.key(node) not in taken:
            rnn = match_rnn_cell(view, node)
            if rnn is not None and not rnn.nodes & taken:
                cells.append(rnn)
    return cells, declined


def unrolled_plans(view: DataflowView, cells: list[Cell]) -> tuple[list[RnnPlan], list[NoMatch], int]:
    """Plans for the chains of `cells` in `view`'s graph: (plans, declined, cells fused)."""
    declined: list[NoMatch] = []
    usable = []
    for cell in cells:
        reason = _cell_problem(view, cell)
        if reason is None:
            usable.append(cell)
        elif not isinstance(cell, RnnCell):  # a plain RNN candidate is as likely an MLP layer: not counted
            declined.append(reason)
    plans: list[RnnPlan] = []
    fused = 0
    for path in _paths(usable):
        for segment in _segments(view, path):
            if isinstance(segment[0].cell, RnnCell) and len(segment) < 2:
                continue  # one Tanh/Relu layer: an MLP as much as an RNN step
            plans.append(_segment_plan(view, segment))
            fused += len(segment)
    return plans, declined, fused


def _cell_problem(view: DataflowView, cell: Cell) -> NoMatch | None:
    if isinstance(cell, (LstmCell, RnnCell)) and (len(cell.operands) > 2 or (len(cell.operands) == 2 and all(
            w.shape[1] != cell.hidden for w in cell.weights.values()))):
        return NoMatch("skipped_extra_inputs", f"{cell.h_out.name}: gates read {sorted(cell.operands)}, not one x and one h")
    operands = (cell.x, cell.h_prev) if isinstance(cell, GruCell) else cell.operands.values()
    for tensor in operands:
        shape = view.shape(tensor, infer=False)
        if shape is not None and len(shape) != 2:
            return NoMatch("skipped_rank", f"{cell.h_out.name}: gate operand {tensor.name} has rank {len(shape)}, not 2")
    return None


def _predecessor(cell: Cell, by_h: dict[str, int], by_c: dict[str, int], cells: list[Cell]) -> int | None:
    if isinstance(cell, RnnCell):
        if len(cell.operands) != 2:
            return None
        # The previous step of the same layer shares W (and R, once it has an h) with this one;
        # the layer below in a stack, whose h' is this cell's x, shares neither.
        mine = list(cell.weights.values())
        found = [p for name in cell.operands if (p := by_h.get(name)) is not None and isinstance(cells[p], RnnCell)
                 and any(w.shape == v.shape and np.array_equal(w, v) for w in cells[p].weights.values() for v in mine)]
        return found[0] if len(found) == 1 else None
    if isinstance(cell, GruCell):
        p = by_h.get(cell.h_prev.name)
        return p if p is not None and isinstance(cells[p], GruCell) else None
    p = by_c.get(cell.c_prev.name)
    if p is not None and isinstance(cells[p], LstmCell) and cells[p].h_out.name in cell.operands and len(cell.operands) == 2:
        return p
    return None


def _paths(cells: list[Cell]) -> list[list[Cell]]:
    """Maximal chains t -> t+1 (networkx: a DiGraph of cells, fan-out edges dropped)."""
    dag = nx.DiGraph()
    dag.add_nodes_from(range(len(cells)))
    by_h = {c.h_out.name: i for i, c in enumerate(cells)}
    by_c = {c.c_out.name: i for i, c in enumerate(cells) if isinstance(c, LstmCell)}
    for i, cell in enumerate(cells):
        p = _predecessor(cell, by_h, by_c, cells)
        if p is not None and p != i:
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


def _segments(view: DataflowView, path: list[Cell]) -> list[list[Step]]:
    steps = [_head_step(view, path[0], path[1] if len(path) > 1 else None)]
    for prev, cell in itertools.pairwise(path):
        if isinstance(cell, GruCell):
            steps.append(Step(cell, cell.x.name, cell.h_prev.name))
        else:  # LSTM or RNN: the operand that is not the previous step's h' is x
            h = prev.h_out.name
            steps.append(Step(cell, next(n for n in cell.operands if n != h), h))
    segments: list[list[Step]] = [[steps[0]]]
    inside = set(steps[0].cell.nodes)
    for prev, step in itertools.pairwise(steps):
        internal_c = not isinstance(prev.cell, LstmCell) or not view.escapes(prev.cell.c_out, prev.cell.nodes | step.cell.nodes)
        x_name = step.x_tensor.name
        feedback = bool(inside & nx.ancestors(view.dag, x_name)) if x_name in view.dag else False
        head = segments[-1][0]
        if internal_c and not feedback and (step.same_params(_reference(segments[-1])) or
                                            (len(segments[-1]) == 1 and head.zero_state_head_of(step))):
            segments[-1].append(step)
            inside |= step.cell.nodes
        else:
            segments.append([step])
            inside = set(step.cell.nodes)
    return segments


def _reference(segment: list[Step]) -> Step:
    """The step whose parameters stand for the segment: past a zero-state RNN head, the next."""
    return segment[1] if len(segment) > 1 and segment[0].zero_state_head_of(segment[1]) else segment[0]


def _head_step(view: DataflowView, cell: Cell, nxt: Cell | None) -> Step:
    """Which operand of a chain's first LSTM (or RNN) cell is h. Any choice computes the same first step;
    a wrong one only makes the weights differ from the next step's, which cuts the chain there."""
    if isinstance(cell, GruCell):
        return Step(cell, cell.x.name, cell.h_prev.name)
    names = list(cell.operands)
    if len(names) == 1:
        return Step(cell, names[0], None)
    fits = [n for n in names if cell.weights[n].shape[1] == cell.hidden]
    h = fits[0] if len(fits) == 1 else None
    if h is None and type(nxt) is type(cell) and cell.h_out.name in nxt.operands:
        r_next = nxt.weights[cell.h_out.name]
        same = [n for n in fits if cell.weights[n].shape == r_next.shape and np.array_equal(cell.weights[n], r_next)]
        h = same[0] if len(same) == 1 else None
    if h is None:
        zero = [n for n in fits if view.is_zero(cell.operands[n])]
        h = zero[0] if len(zero) == 1 else names[-1]
    return Step(cell, next(n for n in names if n != h), h)


def _segment_plan(view: DataflowView, segment: list[Step]) -> RnnPlan:
    head, last = segment[0], segment[-1]
    op, variant, w, r, wb, rb = _reference(segment).params()
    if isinstance(head.cell, GruCell):
        initial_h, initial_c = head.cell.h_prev, None
    else:
        initial_h = head.cell.operands[head.h] if head.h is not None else None
        initial_c = head.cell.c_prev if isinstance(head.cell, LstmCell) else None
    plan = RnnPlan(
        graph=view.graph, hidden=head.cell.hidden, w=w, r=r, wb=wb, rb=rb, op=op, **variant_fields(op, variant),
        x=stacked_input(view, [s.x_tensor for s in segment]),
        initial_h=None if initial_h is None or view.is_zero(initial_h) else initial_h,
        initial_c=None if initial_c is None or view.is_zero(initial_c) else initial_c, steps=len(segment),
    )
    inside = set().union(*(s.cell.nodes for s in segment))
    absorbed = _stacks(view, segment, plan)
    for t, step in enumerate(segment):
        if view.escapes(step.cell.h_out, inside | absorbed):
            plan.step_h.append((step.cell.h_out, t))
    if isinstance(last.cell, LstmCell) and view.escapes(last.cell.c_out, last.cell.nodes):
        plan.last_c.append(last.cell.c_out)
    return plan


def _stacks(view: DataflowView, segment: list[Step], plan: RnnPlan) -> set[str]:
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


def variant_fields(op: str, variant: int | str) -> dict[str, int | str]:
    """RnnPlan fields for a params() variant."""
    return {"activation": str(variant)} if op == "RNN" else {"linear_before_reset": int(variant)}
