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


def _defines(graph: onnx.GraphProto) -> set[str]:
    names = {v.name for v in graph.input} | {t.name for t in graph.initializer}
    return names | {o for node in graph.node for o in node.output if o}


def locate(graph: onnx.GraphProto, tensor: str) -> Path | None:
    """The (If node, branch attribute) chain from `graph` down to the graph that defines `tensor`:
    [] when `graph` defines it, None when no graph does or the chain passes a Loop/Scan body."""
    if tensor in _defines(graph):
        return []
    for node in graph.node:
        for attr in node.attribute:
            if attr.type != onnx.AttributeProto.GRAPH:
                continue
            below = locate(attr.g, tensor)
            if below is not None:
                return [(node, attr.name)] + below if node.op_type == "If" else None
    return None


def if_only(root: gs.Graph, graph: gs.Graph) -> bool:
    """Is `graph` the main graph `root`, or reached from it through If branches only?"""
    if graph is root:
        return True
    for node in root.nodes:
        for value in node.attrs.values():
            if isinstance(value, gs.Graph) and (value is graph or _contains(value, graph)):
                return node.op == "If" and if_only(value, graph)
    return False


def _contains(outer: gs.Graph, graph: gs.Graph) -> bool:
    return any(value is graph or _contains(value, graph)
               for node in outer.nodes for value in node.attrs.values() if isinstance(value, gs.Graph))


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
    names: dict[str, str] = {}
    try:
        for n, tensor in enumerate(sorted(set(tensors))):
            path = locate(model.graph, tensor)
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
