"""Make identical float weights one tensor, so they are quantized and stored once."""

from __future__ import annotations

import hashlib

import numpy as np
import onnx_graphsurgeon as gs

from q4c import graph as g
from q4c.pipeline import Pass, PassContext, PassResult


class DedupeWeightsPass(Pass):
    """Point every consumer of a float constant at the first constant with equal bytes.

    Requires: nothing.  Ensures: no two float constants of at least `min_elements` are equal.
    Stats: merged.
    """

    name = "dedupe-weights"

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        first: dict[tuple[str, tuple[int, ...], str], gs.Constant] = {}
        merged = 0
        for sub in g.iter_graphs(graph):
            for node in sub.nodes:
                for i, tensor in enumerate(node.inputs):
                    if not g.is_float_constant(tensor) or np.prod(tensor.shape) < ctx.options.min_elements:
                        continue
                    values = np.ascontiguousarray(tensor.values)
                    key = (str(values.dtype), values.shape, hashlib.sha1(values.tobytes()).hexdigest())
                    kept = first.setdefault(key, tensor)
                    if kept is not tensor:
                        node.inputs[i] = kept
                        merged += 1
        return PassResult(merged > 0, {"merged": merged} if merged else {})
