"""The layers a latency plan chooses forms for, and how each is called on the user's inputs.

A layer is a weight-bearing node of the main graph whose speed depends on its form: MatMul with
a constant [K, N] weight (B input), LSTM and GRU with constant W and R. Its `LayerShape` comes
from one ONNX Runtime run of the float model on a sample input, with the layer's activation
input exposed as an extra output (rows = every axis but the last, for MatMul; steps and batch
for the recurrent ops). Layers inside If/Loop/Scan bodies are not planned (their call pattern
is not a single tensor shape): they keep the form the other passes give them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import helper

from q4c import graph as g
from q4c import ort as q4ort
from q4c.latency.forms import LayerKind, LayerShape

_RECURRENT = {"LSTM": LayerKind.LSTM, "GRU": LayerKind.GRU}


@dataclass(frozen=True)
class Layer:
    """A plannable layer: its node name, the weight tensors it reads (MatMul: B; LSTM/GRU: W, R)
    and the shape it is called with."""

    node: str
    weights: tuple[str, ...]
    shape: LayerShape


def _const_name(node: gs.Node, index: int) -> str | None:
    if index < len(node.inputs) and isinstance(node.inputs[index], gs.Constant):
        return node.inputs[index].name
    return None


def candidates(graph: gs.Graph) -> list[tuple[gs.Node, tuple[str, ...], str]]:
    """(node, weight names, activation input name) of every plannable node of the main graph."""
    out = []
    for node in graph.nodes:
        if node.domain not in ("", "ai.onnx", None):
            continue
        if node.op == "MatMul":
            b = _const_name(node, 1)
            if b is not None and _const_name(node, 0) is None and node.inputs[1].values.ndim == 2:
                out.append((node, (b,), node.inputs[0].name))
        elif node.op in _RECURRENT:
            w, r = _const_name(node, 1), _const_name(node, 2)
            if w is not None and r is not None and not node.inputs[0].is_empty():
                out.append((node, (w, r), node.inputs[0].name))
    return out


def activation_shapes(model: onnx.ModelProto, names: Sequence[str], feeds: Mapping[str, np.ndarray]) -> dict[str, tuple[int, ...]]:
    """Shapes of the main-graph tensors `names` on `feeds` (one ONNX Runtime run, 1 thread)."""
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    present = {o.name for o in probe.graph.output}
    inputs = {i.name for i in probe.graph.input}
    wanted = [n for n in dict.fromkeys(names) if n not in present]
    for name in wanted:
        probe.graph.output.append(helper.make_empty_tensor_value_info(name))
    session = q4ort.make_session(probe, threads=1, config={})
    feeds = {k: v for k, v in feeds.items() if k in inputs}
    outs = q4ort.run(session, feeds)
    shapes = {k: tuple(int(d) for d in np.shape(v)) for k, v in outs.items()}
    shapes.update({k: tuple(np.shape(v)) for k, v in feeds.items()})
    return {n: shapes[n] for n in names if n in shapes}


def find_layers(graph: gs.Graph, feeds: Mapping[str, np.ndarray], like: onnx.ModelProto | None = None) -> list[Layer]:
    """Every plannable layer of `graph` with the shape it is called with on `feeds`."""
    found = candidates(graph)
    if not found:
        return []
    model = g.export_model(graph.copy(), like=like)
    shapes = activation_shapes(model, [act for _, _, act in found], feeds)
    layers = []
    for node, weights, act in found:
        shape = shapes.get(act)
        if not shape:
            continue
        if node.op == "MatMul":
            k, n = node.inputs[1].values.shape
            layers.append(Layer(node.name or node.outputs[0].name, weights, LayerShape(LayerKind.MATMUL, int(k), int(n), math.prod(shape[:-1]))))
            continue
        w = node.inputs[1].values  # [nd, gates*H, I]
        hidden = int(node.attrs.get("hidden_size") or node.inputs[2].values.shape[-1])
        steps, batch = (shape[1], shape[0]) if int(node.attrs.get("layout", 0)) else (shape[0], shape[1])
        layers.append(Layer(node.name or node.outputs[0].name, weights, LayerShape(_RECURRENT[node.op], int(w.shape[2]), hidden, int(batch),
                                                           int(steps), int(w.shape[0]))))
    return layers


__all__ = ["Layer", "activation_shapes", "candidates", "find_layers"]
