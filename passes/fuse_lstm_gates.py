"""Recognize LSTM (and GRU, plain RNN) cells exported as separate ops, unrolled over time or in a
Scan/Loop body, and replace each recurrence by one ONNX LSTM (GRU, RNN).

Exporters write an LSTMCell loop as MatMul/Gemm + Split/Slice + Sigmoid/Tanh + Mul/Add per time
step (or as a Scan body). As one LSTM op the recurrence is one node ONNX Runtime runs with a
fused kernel, its W/R are two weight tensors the quantizer treats per gate, and the unrolled
graphs shrink 50-70x. Match -> check -> rewrite: q4c.recurrent_fusion.lstm_match / gru_match / rnn_match
find cells (h' = tanh/relu/sigmoid(x·Wᵀ + h·Rᵀ + b) for RNN),
q4c.recurrent_fusion.rnn_plan chains them and checks one op can stand for them, and
q4c.recurrent_fusion.rnn_emit writes the op with adapters back to the tensors the graph reads.
"""

from __future__ import annotations

import collections
import logging

import onnx_graphsurgeon as gs

from q4c import graph as g
from q4c.errors import PreconditionError
from q4c.names import NameGenerator
from q4c.nomatch import NoMatch
from q4c.pipeline import Pass, PassContext, PassResult
from q4c.recurrent_fusion.loop_plan import loop_plan
from q4c.recurrent_fusion.rnn_emit import RnnPlan, emit_rnn
from q4c.recurrent_fusion.rnn_plan import match_cells, unrolled_plans
from q4c.recurrent_fusion.view import DataflowView, LazyShapes

logger = logging.getLogger(__name__)

#: Squeeze/Unsqueeze take axes as an input from opset 13 on; that is what the adapters emit.
MIN_OPSET = 13


class FuseLstmGatesPass(Pass):
    """Replace decomposed LSTM/GRU/RNN cells (unrolled chains, Scan/Loop bodies) by ONNX LSTM/GRU/RNN ops.

    Requires: default-domain opset >= 13 (q4c converts to 21 on load).
    Ensures: every matched chain is one op; tensors the graph reads keep their names.
    Stats: fused (ops emitted), fused_gru / fused_rnn (of which GRU / RNN), fused_cells (decomposed steps
    absorbed), fused_loops (Scan/Loop nodes replaced), skipped_<code> per declined candidate
    (cell_structure, nonstandard_activation, peephole, cell_clip, gate_projection, gate_shape,
    bias_shape, unknown_bounds, unknown_width, intermediate_used, extra_inputs, rank, dtype,
    loop_signature, loop_direction, loop_state, loop_outputs, loop_body).
    """

    name = "fuse-lstm-gates"

    def requires(self, graph: gs.Graph, ctx: PassContext) -> None:
        if ctx.opset < MIN_OPSET:
            raise PreconditionError(f"fuse-lstm-gates needs opset >= {MIN_OPSET}, the graph has {ctx.opset}; "
                                    f"convert it (q4c compile does) or re-export")

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        stats: collections.Counter[str] = collections.Counter()
        shapes = LazyShapes(graph)
        plans: list[tuple[RnnPlan, str]] = []

        def decline(reason: NoMatch) -> None:
            stats[reason.code] += 1
            logger.debug("fuse-lstm-gates: skipped (%s): %s", reason.code, reason.detail)

        bodies = _loop_bodies(graph)
        for sub in list(g.iter_graphs(graph)):
            if id(sub) in bodies:
                continue  # cells inside a Scan/Loop body are fused with their loop, or not at all
            view = DataflowView(sub, shapes)
            for node in sub.nodes:
                if node.op in ("Scan", "Loop") and isinstance(node.attrs.get("body"), gs.Graph):
                    result = loop_plan(view, node, DataflowView(node.attrs["body"], shapes))
                    if isinstance(result, NoMatch):
                        decline(result)
                    elif result is not None:
                        plans.append((result, "loop"))
            cells, declined = match_cells(view)
            for reason in declined:
                decline(reason)
            chain_plans, declined, fused_cells = unrolled_plans(view, cells)
            for reason in declined:
                decline(reason)
            plans.extend((plan, "unrolled") for plan in chain_plans)
            stats["fused_cells"] += fused_cells

        names = NameGenerator(graph) if plans else None
        for plan, kind in plans:
            emit_rnn(names, plan, f"fused_{plan.op.lower()}")
            stats["fused"] += 1
            if plan.op in ("GRU", "RNN"):
                stats[f"fused_{plan.op.lower()}"] += 1
            if kind == "loop":
                stats["fused_loops"] += 1
                stats["fused_cells"] += 1
        return PassResult(stats["fused"] > 0, {k: v for k, v in sorted(stats.items()) if v})


def _loop_bodies(graph: gs.Graph) -> set[int]:
    """ids of every graph nested in a Scan/Loop body."""
    found: set[int] = set()
    for sub in g.iter_graphs(graph):
        for node in sub.nodes:
            body = node.attrs.get("body") if node.op in ("Scan", "Loop") else None
            if isinstance(body, gs.Graph):
                found.update(id(inner) for inner in g.iter_graphs(body))
    return found
