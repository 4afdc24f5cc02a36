"""Recognize one decomposed plain RNN cell, h' = f(x·Wᵀ + h·Rᵀ + b), as ONNX RNN weights.

PyTorch's RNNCell (tanh or relu) exports as MatMul/Gemm products of x and h, added with biases,
then Tanh/Relu: any sum of constant-weight products that q4c.recurrent_fusion.affine reads. A single such
cell is indistinguishable from an MLP layer, so `match_rnn_cell` only proposes candidates
(no NoMatch: declining every Tanh layer would only be noise); q4c.recurrent_fusion.rnn_plan keeps the
ones that form a recurrence: chains of at least two steps with equal weights, or the one cell
of a Scan/Loop body whose h is the carried state.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs

from q4c.nomatch import NoMatch
from q4c.recurrent_fusion.affine import AffineParser
from q4c.recurrent_fusion.view import DataflowView

#: Graph ops that are an ONNX RNN activation of the same name (activation_alpha/beta unused).
RNN_ACTIVATIONS = {"Tanh": "Tanh", "Relu": "Relu", "Sigmoid": "Sigmoid"}


@dataclass
class RnnCell:
    """One candidate cell: weights [H, K] per operand (ONNX RNN layout), biases [H] keyed by the
    operand whose Gemm carried them (None: free), `activation` the ONNX RNN name."""

    hidden: int
    h_out: gs.Tensor
    operands: dict[str, gs.Tensor]
    weights: dict[str, np.ndarray]
    biases: dict[str | None, np.ndarray]
    activation: str
    nodes: set[str] = field(default_factory=set)

    def bias_for(self, names: set[str | None]) -> np.ndarray:
        total = np.zeros(self.hidden, np.float32)
        for key, value in self.biases.items():
            if key in names:
                total = total + value
        return total


def match_rnn_cell(view: DataflowView, node: gs.Node) -> RnnCell | None:
    """The candidate cell whose h' is `node`'s output (a Tanh/Relu/Sigmoid of one or two
    operands' products), or None."""
    if node.op not in RNN_ACTIVATIONS or not node.inputs or not node.outputs:
        return None
    parser = AffineParser(view, set())
    affine = parser.parse(node.inputs[0])
    if isinstance(affine, NoMatch) or not 1 <= len(affine.operands) <= 2:
        return None
    hidden = affine.width
    if len(affine.operands) == 2 and all(w.shape[0] != hidden for w in affine.weights.values()):
        return None  # no operand can be h (R is [H, H])
    if any(w.dtype != np.float32 for w in affine.weights.values()):
        return None
    nodes = parser.nodes | {view.key(node)}
    for key in nodes:
        for tensor in view.nodes[key].outputs:
            if tensor.name != node.outputs[0].name and view.escapes(tensor, nodes):
                return None
    weights = {name: np.ascontiguousarray(w.T) for name, w in affine.weights.items()}
    biases = {key: np.asarray(b, np.float32) for key, b in affine.biases.items()}
    return RnnCell(hidden, node.outputs[0], dict(affine.operands), weights, biases, RNN_ACTIVATIONS[node.op], nodes)
