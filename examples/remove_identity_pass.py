"""An example user pass: drop Identity nodes. Run it with

    q4c compile model.onnx --passes default,examples/remove_identity_pass.py:RemoveIdentityPass

or package it and declare it in your pyproject.toml:

    [project.entry-points."q4c.passes"]
    remove-identity = "my_package.remove_identity_pass:RemoveIdentityPass"
"""

from __future__ import annotations

import onnx_graphsurgeon as gs

from q4c import Pass, PassContext, PassResult
from q4c.graph import consumers, iter_graphs


class RemoveIdentityPass(Pass):
    """Rewire consumers of an Identity to its input; the pipeline's cleanup drops the node.

    Requires: nothing.  Ensures: Identity remains only on graph outputs.  Stats: removed.
    """

    name = "remove-identity"

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        removed = 0
        for sub in iter_graphs(graph):
            graph_outputs = {t.name for t in sub.outputs}  # gs tensors are unhashable: key by name
            for node in sub.nodes:
                if node.op != "Identity" or node.outputs[0].name in graph_outputs or not node.outputs[0].outputs:
                    continue
                src, dst = node.inputs[0], node.outputs[0]
                for consumer in consumers(dst):
                    for i, tensor in enumerate(consumer.inputs):
                        if tensor is dst:
                            consumer.inputs[i] = src
                removed += 1
        return PassResult(modified=removed > 0, stats={"removed": removed})
