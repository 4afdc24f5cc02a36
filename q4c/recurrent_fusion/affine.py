"""Read a tensor as an affine function of graph tensors: sum_k operand_k @ W_k + b.

Gate pre-activations of exported recurrent cells are sums of MatMul/Gemm products with constant
weights and constant biases, possibly cut into gate-sized pieces by Split or Slice (whose bounds
torch.chunk computes from Shape), with Concat(x, h) operands split back into x and h rows.
`parse_affine` turns such a subgraph into per-operand weight matrices, or says why it cannot.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs

from q4c.nomatch import NoMatch
from q4c.recurrent_fusion.view import DataflowView


@dataclass
class Affine:
    """sum over operands of operand @ weights[name] ([K, width]) + sum of biases ([width]).

    Biases are keyed by the resolved name of the operand whose Gemm carried them (None: a free
    Add, or a Gemm on a Concat), so a caller can tell input-side from recurrent-side biases.
    """

    width: int
    weights: dict[str, np.ndarray] = field(default_factory=dict)
    operands: dict[str, gs.Tensor] = field(default_factory=dict)
    biases: dict[str | None, np.ndarray] = field(default_factory=dict)

    def add(self, other: Affine) -> None:
        for name, w in other.weights.items():
            self.weights[name] = self.weights[name] + w if name in self.weights else w
            self.operands[name] = other.operands[name]
        for key, b in other.biases.items():
            self.biases[key] = self.biases[key] + b if key in self.biases else b

    def columns(self, cols: np.ndarray) -> Affine:
        return Affine(len(cols), {k: w[:, cols] for k, w in self.weights.items()}, dict(self.operands),
                      {k: b[cols] for k, b in self.biases.items()})

    def weight(self, name: str | None, rows: int) -> np.ndarray:
        """The weight of operand `name` (zeros [rows, width] when it does not appear)."""
        if name is not None and name in self.weights:
            return self.weights[name]
        return np.zeros((rows, self.width), np.float32)

    def bias(self, owners: set[str | None]) -> np.ndarray:
        total = np.zeros(self.width, np.float32)
        for key, b in self.biases.items():
            if key in owners:
                total = total + b
        return total


class AffineParser:
    """Parses tensors of one cell; pieces of one projection share its parse (a cache), and
    every node consumed is added to `nodes` (the cell's node keys)."""

    def __init__(self, view: DataflowView, stop: set[str]) -> None:
        self.view = view
        self.stop = stop  # cell-state tensors: a term reading them is a peephole
        self.nodes: set[str] = set()
        self._cache: dict[str, Affine | NoMatch] = {}

    def parse(self, tensor: gs.Tensor) -> Affine | NoMatch:
        if tensor.name not in self._cache:
            self._cache[tensor.name] = self._parse(tensor)
        return self._cache[tensor.name]

    def _parse(self, tensor: gs.Tensor) -> Affine | NoMatch:
        view = self.view
        parts: list[Affine] = []
        free_biases: list[np.ndarray] = []
        stack = [tensor]
        while stack:
            t = stack.pop()
            const = view.constant(t)
            if const is not None:
                free_biases.append(np.asarray(const))
                continue
            node = view.producer(t)
            if node is None:
                return NoMatch("skipped_gate_projection", f"{t.name} reaches a gate without a weight product")
            key = view.key(node)
            if node.op in ("Identity", "Add"):
                self.nodes.add(key)
                stack.extend(node.inputs)
                continue
            if node.op in ("MatMul", "Gemm"):
                part = self._product(node)
            elif node.op in ("Split", "Slice"):
                part = self._piece(node, t)
            else:
                if t.name in self.stop or _reads(view, node, self.stop, depth=2):
                    return NoMatch("skipped_peephole", f"{node.name} ({node.op}) adds a cell-state term to a gate")
                return NoMatch("skipped_gate_projection", f"{node.name} ({node.op}) in a gate pre-activation")
            if isinstance(part, NoMatch):
                return part
            self.nodes.add(key)
            parts.append(part)
        if not parts:
            return NoMatch("skipped_gate_projection", f"{tensor.name}: no weight product")
        widths = {p.width for p in parts}
        if len(widths) != 1:
            return NoMatch("skipped_gate_shape", f"{tensor.name}: sums products of widths {sorted(widths)}")
        out = Affine(widths.pop())
        for part in parts:
            out.add(part)
        for b in free_biases:
            b = _broadcast_bias(b, out.width)
            if b is None:
                return NoMatch("skipped_bias_shape", f"{tensor.name}: a bias that does not broadcast to {out.width} columns")
            out.add(Affine(out.width, biases={None: b}))
        return out

    def _product(self, node: gs.Node) -> Affine | NoMatch:
        view = self.view
        w = view.constant(node.inputs[1])
        if w is None or w.ndim != 2 or (node.op == "Gemm" and int(node.attrs.get("transA", 0))):
            return NoMatch("skipped_gate_projection", f"{node.name}: {node.op} without a constant 2-D weight")
        w = np.asarray(w)
        bias = None
        if node.op == "Gemm":
            w = (w.T if int(node.attrs.get("transB", 0)) else w) * np.asarray(node.attrs.get("alpha", 1.0), w.dtype)
            if len(node.inputs) > 2 and not node.inputs[2].is_empty():
                c = view.constant(node.inputs[2])
                if c is None:
                    return NoMatch("skipped_gate_projection", f"{node.name}: Gemm bias is not constant")
                bias = _broadcast_bias(np.asarray(c) * np.asarray(node.attrs.get("beta", 1.0), c.dtype), w.shape[1])
                if bias is None:
                    return NoMatch("skipped_bias_shape", f"{node.name}: Gemm bias of shape {c.shape}")
        parts = self._concat_parts(node.inputs[0], w.shape[0])
        if isinstance(parts, NoMatch):
            return parts
        out = Affine(w.shape[1])
        row = 0
        for part, rows in parts:
            part = view.resolve(part)
            out.add(Affine(out.width, {part.name: w[row:row + rows]}, {part.name: part}))
            row += rows
        if bias is not None:
            out.add(Affine(out.width, biases={view.resolve(parts[0][0]).name if len(parts) == 1 else None: bias}))
        return out

    def _concat_parts(self, operand: gs.Tensor, k: int) -> list[tuple[gs.Tensor, int]] | NoMatch:
        """[(part, rows)] of an operand: itself, or the parts of a feature-axis Concat."""
        view = self.view
        resolved = view.resolve(operand)
        node = view.producer(resolved)
        if node is None or node.op != "Concat" or int(node.attrs.get("axis", 0)) not in (-1, 1):
            return [(operand, k)]
        shape = view.shape(resolved, infer=False)
        if int(node.attrs.get("axis", 0)) == 1 and shape is not None and len(shape) != 2:
            return [(operand, k)]
        widths = [view.last_dim(t) for t in node.inputs]
        unknown = [i for i, w in enumerate(widths) if w is None]
        if len(unknown) == 1:
            widths[unknown[0]] = k - sum(w for w in widths if w is not None)
        elif unknown:
            return NoMatch("skipped_unknown_width", f"{node.name}: widths of the concatenated gate inputs are unknown")
        if sum(widths) != k or any(w <= 0 for w in widths):
            return NoMatch("skipped_gate_shape", f"{node.name}: concatenated widths {widths} do not match weight rows {k}")
        self.nodes.add(view.key(node))
        return list(zip(node.inputs, widths))

    def _piece(self, node: gs.Node, piece: gs.Tensor) -> Affine | NoMatch:
        """The columns of a projection that one Split output or Slice selects (feature axis)."""
        src = self.parse(node.inputs[0])
        if isinstance(src, NoMatch):
            return src
        n = src.width
        if node.op == "Split":
            axis = int(node.attrs.get("axis", 0))
            if axis not in (-1, 1):
                return NoMatch("skipped_gate_shape", f"{node.name}: Split on axis {axis}, not the feature axis")
            sizes = _split_sizes(self.view, node, n)
            if sizes is None or sum(sizes) != n:
                return NoMatch("skipped_unknown_bounds", f"{node.name}: split sizes unknown or not summing to {n}")
            index = [t.name for t in node.outputs].index(piece.name)
            start = sum(sizes[:index])
            return src.columns(np.arange(start, start + sizes[index]))
        self.view.set_shape(node.inputs[0], (None, n))
        bounds = _slice_range(self.view, node, n)
        if isinstance(bounds, NoMatch):
            return bounds
        return src.columns(np.arange(*bounds))


def _broadcast_bias(b: np.ndarray, n: int) -> np.ndarray | None:
    if b.size == 1:
        return np.full(n, b.reshape(()), np.float32)
    if b.size != n or b.shape[-1] != n:
        return None
    return b.reshape(n).astype(np.float32)


def _split_sizes(view: DataflowView, node: gs.Node, n: int) -> list[int] | None:
    if len(node.inputs) > 1 and not node.inputs[1].is_empty():
        sizes = view.eval_ints(node.inputs[1])
        return None if sizes is None else [int(s) for s in np.asarray(sizes).reshape(-1)]
    if "split" in node.attrs:  # Split-2..11 kept sizes in an attribute
        return [int(s) for s in node.attrs["split"]]
    count = len(node.outputs)
    if n % count == 0:
        return [n // count] * count
    return None


def _slice_range(view: DataflowView, node: gs.Node, n: int) -> tuple[int, int] | NoMatch:
    present = [i < len(node.inputs) and not node.inputs[i].is_empty() for i in range(1, 5)]
    args = [view.eval_ints(node.inputs[i]) if present[i - 1] else None for i in range(1, 5)]
    starts, ends, axes, steps = args
    if starts is None or ends is None or (present[2] and axes is None) or (present[3] and steps is None):
        return NoMatch("skipped_unknown_bounds", f"{node.name}: Slice bounds are not computable from constants and shapes")
    starts, ends = np.asarray(starts).reshape(-1), np.asarray(ends).reshape(-1)
    axes = np.arange(len(starts)) if axes is None else np.asarray(axes).reshape(-1)
    steps = np.ones(len(starts), np.int64) if steps is None else np.asarray(steps).reshape(-1)
    if len(starts) != 1 or int(axes[0]) not in (-1, 1) or int(steps[0]) != 1:
        return NoMatch("skipped_gate_shape", f"{node.name}: not a unit-step slice of the feature axis")
    s, e = int(starts[0]), int(ends[0])
    s = min(max(s + n if s < 0 else s, 0), n)
    e = min(max(e + n if e < 0 else e, 0), n)
    if e <= s:
        return NoMatch("skipped_gate_shape", f"{node.name}: empty slice")
    return s, e


def _reads(view: DataflowView, node: gs.Node, names: set[str], depth: int) -> bool:
    """Whether `node` reads any of `names` within `depth` producers upstream."""
    for t in node.inputs:
        if t.name in names or view.resolve(t).name in names:
            return True
        p = view.producer(t)
        if depth > 0 and p is not None and _reads(view, p, names, depth - 1):
            return True
    return False
