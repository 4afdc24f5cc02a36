"""Read tensors that live inside `If` branches as outputs of the main graph.

A session's extra outputs can only name main-graph tensors. Exported models often put whole
layers inside `If` branches (Silero VAD's LSTM behind a "state given?" test, or its whole 16 kHz
and 8 kHz networks behind a sample-rate test), so the inputs those layers multiply their weights
with (what gptq's Hessians need) are branch tensors. `lifted` threads each such tensor up
through its chain of If nodes: the branch that computes it returns it as an extra output, the
other branch returns an empty float tensor in that place, and the If node gets one more output,
up to the main graph. A run in which the branch was not taken gives an empty array.

Tensors inside Loop or Scan bodies are not lifted: a body's value differs per iteration and
reaches the outside only as a scan output, which would change what the model computes.

The model is edited in place and put back when the `with` block ends (a copy of the model would
be a copy of every weight)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import TensorProto, helper, numpy_helper

#: Prefix of the names lifted values take on their way up
LIFTED = "q4c.lift/"

Path = list[tuple[onnx.NodeProto, str]]


def locations(graph: onnx.GraphProto, path: Path | None = None) -> dict[str, Path | None]:
    """Every tensor `graph` and its subgraphs define -> the (If node, branch attribute) chain from
    `graph` down to the graph defining it ([] for `graph` itself; None below a Loop/Scan body)."""
    path = [] if path is None else path
    found: dict[str, Path | None] = {v.name: path for v in graph.input}
    found.update({t.name: path for t in graph.initializer})
    found.update({o: path for node in graph.node for o in node.output if o})
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                below = locations(attr.g, [*path, (node, attr.name)])
                found.update(below if node.op_type == "If" else dict.fromkeys(below))
    return found


def if_only(root: gs.Graph, graph: gs.Graph) -> bool:
    """Is `graph` the main graph `root`, or reached from it through If branches only?"""
    return graph is root or any(
        if_only(value, graph) for node in root.nodes if node.op == "If"
        for value in node.attrs.values() if isinstance(value, gs.Graph))


def _branch(node: onnx.NodeProto, name: str) -> onnx.GraphProto:
    return next(a.g for a in node.attribute if a.name == name)


@contextmanager
def lifted(model: onnx.ModelProto, tensors: Iterable[str]) -> Iterator[dict[str, str]]:
    """Within the block, `model`'s main graph outputs every tensor of `tensors` that some graph
    reached through If branches defines; yields tensor -> main output name (the tensor's own
    name in the main graph). Tensors no such graph defines are left out."""
    sizes: dict[int, tuple[object, int]] = {}

    def grow(field, item) -> None:
        sizes.setdefault(id(field), (field, len(field)))
        field.append(item)

    outputs = {o.name for o in model.graph.output}
    where = locations(model.graph)
    names: dict[str, str] = {}
    try:
        for n, tensor in enumerate(sorted(set(tensors))):
            path = where.get(tensor)
            if path is None:
                continue
            name = tensor
            for depth, (node, branch) in enumerate(reversed(path)):
                other = "else_branch" if branch == "then_branch" else "then_branch"
                own, empty = _branch(node, branch), _branch(node, other)
                filler = f"{LIFTED}{n}/{depth}/empty"
                grow(empty.node, helper.make_node("Constant", [], [filler], value=numpy_helper.from_array(
                    np.zeros((0,), np.float32), filler)))
                grow(own.output, helper.make_tensor_value_info(name, TensorProto.FLOAT, None))
                grow(empty.output, helper.make_tensor_value_info(filler, TensorProto.FLOAT, None))
                name = f"{LIFTED}{n}/{depth}"
                grow(node.output, name)
            if name not in outputs:
                grow(model.graph.output, helper.make_tensor_value_info(name, TensorProto.FLOAT, None))
                outputs.add(name)
            names[tensor] = name
        yield names
    finally:
        for field, size in sizes.values():
            del field[size:]  # type: ignore[attr-defined]
