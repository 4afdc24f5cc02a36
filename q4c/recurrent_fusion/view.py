"""A networkx view of one graph level, and the constant/shape facts matchers ask of it.

gs nodes and tensors are unhashable, so the view's DiGraph is keyed by names: a tensor is its
name, a node is ``"#<index>"`` (node names may be empty or repeated). Edges run tensor -> node
(a consumer, also through nested subgraphs that read the tensor) and node -> tensor (its
producer). Lookups return the gs objects.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping

import networkx as nx
import numpy as np
import onnx
import onnx_graphsurgeon as gs

from q4c import graph as g

logger = logging.getLogger(__name__)


def node_key(index: int) -> str:
    return f"#{index}"


class DataflowView:
    """Producer/consumer lookups over one gs graph level (tensors and nodes as DiGraph nodes).

    A node whose subgraphs (If branches, Loop/Scan bodies) read a tensor of this level counts
    as that tensor's consumer: a rewrite must not remove what a body still reads.
    """

    def __init__(self, graph: gs.Graph, inferred: Callable[[], Mapping[str, tuple]] | None = None) -> None:
        self.graph = graph
        self.dag = nx.DiGraph()
        self.nodes: dict[str, gs.Node] = {}
        self.tensors: dict[str, gs.Tensor] = {}
        self._shapes: dict[str, tuple] = {}
        self._inferred = inferred
        self._keys: dict[int, str] = {}
        for index, node in enumerate(graph.nodes):
            key = node_key(index)
            self.nodes[key] = node
            self._keys[id(node)] = key
            self.dag.add_node(key, kind="node", op=node.op)
            for tensor in node.outputs:
                self._add_tensor(tensor)
                self.dag.add_edge(key, tensor.name)
            for tensor in [*node.inputs, *_implicit_inputs(node)]:
                if tensor.is_empty():
                    continue
                self._add_tensor(tensor)
                self.dag.add_edge(tensor.name, key)
        self.outputs = {t.name for t in graph.outputs}

    def _add_tensor(self, tensor: gs.Tensor) -> None:
        if tensor.name not in self.tensors:
            self.tensors[tensor.name] = tensor
            self.dag.add_node(tensor.name, kind="tensor")

    def key(self, node: gs.Node) -> str:
        return self._keys[id(node)]

    def producer(self, tensor: gs.Tensor) -> gs.Node | None:
        """The node of this level writing `tensor`; None for inputs, constants, outer tensors."""
        if tensor.name not in self.dag:
            return None
        preds = list(self.dag.predecessors(tensor.name))
        return self.nodes[preds[0]] if preds else None

    def consumers(self, tensor: gs.Tensor) -> list[gs.Node]:
        if tensor.name not in self.dag:
            return []
        return [self.nodes[k] for k in self.dag.successors(tensor.name)]

    def escapes(self, tensor: gs.Tensor, inside: set[str]) -> bool:
        """Whether `tensor` is a graph output or read by a node outside the keys `inside`
        (Shape nodes excepted: they read no values, so a rewrite never changes what they see)."""
        if tensor.name in self.outputs:
            return True
        return any(k not in inside and self.nodes[k].op != "Shape" for k in self.dag.successors(tensor.name))

    def resolve(self, tensor: gs.Tensor) -> gs.Tensor:
        """Look through Identity nodes (exporters put them on shared weights and outputs)."""
        seen = 0
        while (node := self.producer(tensor)) is not None and node.op == "Identity" and seen < 64:
            tensor = node.inputs[0]
            seen += 1
        return tensor

    def op_of(self, tensor: gs.Tensor) -> str | None:
        node = self.producer(tensor)
        return node.op if node is not None else None

    # -- constants and shapes -------------------------------------------------------------

    def constant(self, tensor: gs.Tensor) -> np.ndarray | None:
        """The value of a constant tensor (through Identity and Constant nodes), else None."""
        tensor = self.resolve(tensor)
        if isinstance(tensor, gs.Constant):
            return np.asarray(tensor.values)
        node = self.producer(tensor)
        if node is not None and node.op == "Constant":
            value = node.attrs.get("value")
            if isinstance(value, gs.Constant):
                return np.asarray(value.values)
        return None

    def is_zero(self, tensor: gs.Tensor) -> bool:
        """A tensor known to be all zeros: a zero constant or ConstantOfShape of zero (how
        exporters write a zero initial RNN state for a dynamic batch)."""
        value = self.constant(tensor)
        if value is not None:
            return value.size > 0 and not np.any(value)
        node = self.producer(self.resolve(tensor))
        if node is not None and node.op == "ConstantOfShape":
            fill = node.attrs.get("value")
            return fill is None or not np.any(np.asarray(fill.values))
        return False

    def shape(self, tensor: gs.Tensor, infer: bool = True) -> tuple | None:
        """The tensor's shape with None for unknown dims, or None when even the rank is unknown.
        ONNX shape inference (run once per pass, on first need) only fills an unknown rank,
        and not with `infer=False`."""
        known = self._shapes.get(tensor.name)
        if known is not None:
            return tuple(known)
        if isinstance(tensor, gs.Constant):
            return tuple(tensor.shape)
        own = None if tensor.shape is None else tuple(d if isinstance(d, int) and d >= 0 else None for d in tensor.shape)
        if own is None:
            own = self._local_shape(tensor)
        if own is None and infer:
            own = self.inferred_shape(tensor)
        return own

    def inferred_shape(self, tensor: gs.Tensor) -> tuple | None:
        return self._inferred().get(tensor.name) if self._inferred is not None else None

    def _local_shape(self, tensor: gs.Tensor) -> tuple | None:
        """Cheap rules for the shapes matchers ask most (before running shape inference):
        a step sliced out of a sequence by Gather with a scalar index, and Identity."""
        node = self.producer(tensor)
        if node is None or len(node.inputs) < 1:
            return None
        if node.op == "Identity":
            return self.shape(node.inputs[0])
        if node.op == "Gather":
            index = self.constant(node.inputs[1])
            src = self.shape(node.inputs[0])
            if index is None or src is None or index.ndim != 0:
                return None
            axis = int(node.attrs.get("axis", 0)) % len(src)
            return src[:axis] + src[axis + 1:]
        return None

    def last_dim(self, tensor: gs.Tensor) -> int | None:
        for t in (self.resolve(tensor), tensor):
            shape = self.shape(t, infer=False)
            if not shape or shape[-1] is None:
                shape = self.inferred_shape(t)
            if shape and shape[-1] is not None:
                return shape[-1]
        return None

    def set_shape(self, tensor: gs.Tensor, shape: tuple) -> None:
        self._shapes[tensor.name] = tuple(shape)

    def eval_ints(self, tensor: gs.Tensor, depth: int = 0) -> np.ndarray | None:
        """Evaluate a small integer expression (Slice/Split bounds) from constants and known
        dims: Shape, Gather, Add/Sub/Mul/Div, Concat, (Un)Squeeze, Cast, Identity. None when
        any value it needs is unknown."""
        value = self.constant(tensor)
        if value is not None:
            return value if np.issubdtype(value.dtype, np.integer) else None
        node = self.producer(tensor)
        if node is None or depth > 32:
            return None
        try:
            return _eval_node(self, node, depth)
        except (TypeError, ValueError, IndexError):  # an unknown dim (None) reached arithmetic
            return None


def _eval_node(view: DataflowView, node: gs.Node, depth: int) -> np.ndarray | None:
    def arg(i: int) -> np.ndarray | None:
        return view.eval_ints(node.inputs[i], depth + 1) if len(node.inputs) > i and not node.inputs[i].is_empty() else None

    op = node.op
    if op == "Shape":
        shape = view.shape(node.inputs[0])
        if shape is None:
            return None
        rank = len(shape)
        start = int(node.attrs.get("start", 0))
        end = int(node.attrs.get("end", rank))
        return np.array(shape[slice(start, end)], dtype=object)
    if op in ("Identity", "Cast"):
        return arg(0)
    if op == "Gather":
        data, index = arg(0), arg(1)
        if data is None or index is None or int(node.attrs.get("axis", 0)) != 0:
            return None
        out = np.asarray(data)[np.asarray(index, dtype=np.int64)]
        return _known(out)
    if op in ("Add", "Sub", "Mul", "Div"):
        a, b = arg(0), arg(1)
        if a is None or b is None:
            return None
        a, b = np.asarray(a, dtype=np.int64), np.asarray(b, dtype=np.int64)
        if op == "Div":  # ONNX integer Div truncates toward zero
            return (np.sign(a) * np.sign(b) * (np.abs(a) // np.abs(b))).astype(np.int64)
        return {"Add": np.add, "Sub": np.subtract, "Mul": np.multiply}[op](a, b)
    if op == "Concat":
        parts = [view.eval_ints(t, depth + 1) for t in node.inputs]
        if any(p is None for p in parts):
            return None
        return _known(np.concatenate([np.atleast_1d(np.asarray(p, dtype=object)) for p in parts]))
    if op in ("Unsqueeze", "Squeeze"):
        data = arg(0)
        if data is None:
            return None
        data = np.asarray(data)
        return data.reshape(-1) if op == "Unsqueeze" and data.ndim == 0 else (data.reshape(()) if data.size == 1 and op == "Squeeze" else data)
    return None


def _known(values: np.ndarray) -> np.ndarray:
    """Object arrays from Shape become int64 once every entry used is known."""
    flat = np.asarray(values, dtype=object).reshape(-1)
    if any(v is None for v in flat):
        return np.asarray(values, dtype=object)
    return np.asarray(values, dtype=object).astype(np.int64)


def _implicit_inputs(node: gs.Node) -> list[gs.Tensor]:
    """Tensors of enclosing graphs read by `node`'s subgraphs (at any depth)."""
    subgraphs: list[gs.Graph] = []
    for value in node.attrs.values():
        if isinstance(value, gs.Graph):
            subgraphs.append(value)
        elif isinstance(value, (list, tuple)):
            subgraphs.extend(v for v in value if isinstance(v, gs.Graph))
    found: dict[str, gs.Tensor] = {}
    for sub in subgraphs:
        for inner in g.iter_graphs(sub):
            local = {t.name for t in inner.inputs}
            local.update(t.name for n in inner.nodes for t in n.outputs)
            for n in inner.nodes:
                for t in n.inputs:
                    if not t.is_empty() and t.name not in local and not isinstance(t, gs.Constant):
                        found.setdefault(t.name, t)
    return list(found.values())


def inferred_shapes(graph: gs.Graph, like: onnx.ModelProto | None = None) -> dict[str, tuple]:
    """Shapes from ONNX shape inference over every graph level (None for unknown dims)."""
    model = g.export_model(graph.copy(), like=like)
    try:
        model = onnx.shape_inference.infer_shapes(model, strict_mode=False)
    except (onnx.shape_inference.InferenceError, onnx.checker.ValidationError, RuntimeError, ValueError) as e:
        # a hint only: cells still match where the graph declares its shapes
        logger.warning("ONNX shape inference failed (%s: %s): recurrent cells are matched with the declared "
                       "shapes only", type(e).__name__, (str(e).strip().splitlines() or [""])[0][:300])
        return {}
    shapes: dict[str, tuple] = {}
    for proto in g.iter_graph_protos(model.graph):
        for info in [*proto.value_info, *proto.input, *proto.output]:
            t = info.type.tensor_type
            if t.HasField("shape"):
                shapes[info.name] = tuple(d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim)
    return shapes


class LazyShapes:
    """ONNX shape inference over the whole model, run once and only if a matcher asks."""

    def __init__(self, graph: gs.Graph) -> None:
        self._graph = graph
        self._shapes: dict[str, tuple] | None = None

    def __call__(self) -> Mapping[str, tuple]:
        if self._shapes is None:
            self._shapes = inferred_shapes(self._graph)
        return self._shapes
