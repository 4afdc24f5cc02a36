"""Recognize one decomposed LSTM cell: gate projections, Split/Slice into four gates,
Sigmoid/Tanh, c' = f*c + i*g, h' = o*tanh(c').

The matcher starts at a candidate h' (a Mul of something and act(Add(Mul, Mul))) and returns
an `LstmCell` with its weights already in ONNX LSTM layout, or `NoMatch(code, detail)`. Layouts
recognized: one gate projection per operand (MatMul or Gemm, any bias placement) split by
`Split` or four `Slice`s (bounds may be computed from `Shape`, as torch.chunk exports them);
one projection on Concat(x, h); four separate per-gate projections; any gate order.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs

from q4c.rewrite.view import DataflowView

#: Unary ops that can sit where an LSTM applies an activation: any of them makes a candidate,
#: only Sigmoid (gates) and Tanh (candidate cell, output) make a standard LSTM.
ACTIVATION_OPS = frozenset({"Sigmoid", "Tanh", "HardSigmoid", "Relu", "LeakyRelu", "Elu", "Softsign",
                            "Softplus", "ThresholdedRelu", "HardSwish", "Gelu", "Selu"})
#: PyTorch's order is i, f, g, o; ONNX LSTM W/R/B stack gates i, o, f, c (c = PyTorch's g).
ONNX_GATE_ORDER = ("i", "o", "f", "g")


@dataclass(frozen=True)
class NoMatch:
    """Why a candidate was declined: `code` is counted as `skipped_<code>`, `detail` logged."""

    code: str
    detail: str


@dataclass
class LstmCell:
    """One matched cell. Weights are [4H, K] per operand in ONNX gate order (i, o, f, c);
    biases [4H] in ONNX order, keyed by the operand whose Gemm carried them (None: free)."""

    hidden: int
    h_out: gs.Tensor
    c_out: gs.Tensor
    c_prev: gs.Tensor
    operands: dict[str, gs.Tensor]
    weights: dict[str, np.ndarray]
    biases: dict[str | None, np.ndarray]
    nodes: set[str] = field(default_factory=set)
    c_mul: str = ""  # key of Mul(f, c_prev): the node a successor's c must feed

    def bias_for(self, names: set[str | None]) -> np.ndarray:
        total = np.zeros(4 * self.hidden, np.float32)
        for key, value in self.biases.items():
            if key in names:
                total = total + value
        return total


@dataclass
class _Affine:
    """sum over operands of operand @ weight[K, N], plus biases [N] (keyed like LstmCell.biases)."""

    weights: dict[str, np.ndarray] = field(default_factory=dict)
    operands: dict[str, gs.Tensor] = field(default_factory=dict)
    biases: dict[str | None, np.ndarray] = field(default_factory=dict)
    width: int = 0


def candidate(view: DataflowView, node: gs.Node) -> tuple[int, gs.Node, gs.Node | None, gs.Node] | None:
    """(operand index of act(c'), act node, Clip node or None, c' Add) if `node` looks like
    h' = o * act(c') with c' = Add(Mul, Mul); None when it is not an LSTM candidate at all."""
    if node.op != "Mul" or len(node.inputs) != 2:
        return None
    for j in (0, 1):
        act = view.producer(node.inputs[j])
        if act is None or act.op not in ACTIVATION_OPS:
            continue
        clip = None
        update = view.producer(act.inputs[0])
        if update is not None and update.op == "Clip":
            clip, update = update, view.producer(update.inputs[0])
        if update is None or update.op != "Add" or len(update.inputs) != 2:
            continue
        if all((p := view.producer(t)) is not None and p.op == "Mul" for t in update.inputs):
            return j, act, clip, update
    return None


def match_lstm_cell(view: DataflowView, node: gs.Node) -> LstmCell | NoMatch | None:
    """Match the cell whose h' is `node`'s output. None: not a candidate (nothing to count)."""
    found = candidate(view, node)
    if found is None:
        return None
    j, act, clip, update = found
    if clip is not None:
        return NoMatch("cell_clip", f"{clip.name}: the cell state is clipped before the output activation")
    h_out, c_out = node.outputs[0], update.outputs[0]
    nodes = {view.key(n) for n in (node, act, update)}
    muls = [view.producer(t) for t in update.inputs]
    nodes.update(view.key(m) for m in muls)

    gate_like = [[_is_gate_like(view, t) for t in m.inputs] for m in muls]
    both = [all(flags) for flags in gate_like]
    if sum(both) != 1 or not any(gate_like[both.index(False)]):
        return NoMatch("cell_structure", f"{update.name}: not f*c + i*g (which product is f*c is unclear)")
    ig, fc = muls[both.index(True)], muls[both.index(False)]
    f_index = gate_like[both.index(False)].index(True)
    f_t, c_prev = fc.inputs[f_index], fc.inputs[1 - f_index]
    if _is_gate_like(view, c_prev):
        return NoMatch("cell_structure", f"{fc.name}: both factors of f*c are activations")
    i_t, g_t = ig.inputs
    if view.op_of(i_t) != "Sigmoid" and view.op_of(g_t) == "Sigmoid":
        i_t, g_t = g_t, i_t
    o_t = node.inputs[1 - j]
    if not _is_gate_like(view, o_t):
        return NoMatch("cell_structure", f"{node.name}: the output gate is not an activation")
    gate_outputs = {"i": i_t, "f": f_t, "g": g_t, "o": o_t}
    gate_acts = {k: view.producer(t) for k, t in gate_outputs.items()}
    if len({view.key(n) for n in gate_acts.values()}) != 4:
        return NoMatch("cell_structure", f"{node.name}: gates share an activation node")
    wanted = {"i": "Sigmoid", "f": "Sigmoid", "g": "Tanh", "o": "Sigmoid"}
    odd = {k: n.op for k, n in gate_acts.items() if n.op != wanted[k]}
    if act.op != "Tanh":
        odd["h"] = act.op
    if odd:
        return NoMatch("nonstandard_activation", f"{node.name}: " + ", ".join(f"{k}={v}" for k, v in sorted(odd.items())))
    nodes.update(view.key(n) for n in gate_acts.values())
    c_prev_names = {view.resolve(c_prev).name, c_prev.name}
    pre = {k: n.inputs[0] for k, n in gate_acts.items()}

    cell = _gates(view, pre, nodes, c_prev_names)
    if isinstance(cell, NoMatch):
        return cell
    hidden, operands, weights, biases = cell
    if any(w.dtype != np.float32 for w in weights.values()):
        return NoMatch("dtype", f"{node.name}: gate weights are not float32")
    result = LstmCell(hidden, h_out, c_out, view.resolve(c_prev), operands, weights, biases, nodes, view.key(fc))
    for key in result.nodes:
        for tensor in view.nodes[key].outputs:
            if tensor.name not in (h_out.name, c_out.name) and view.escapes(tensor, result.nodes):
                return NoMatch("intermediate_used", f"{tensor.name} (inside the cell at {node.name}) is read outside it")
    return result


def _is_gate_like(view: DataflowView, tensor: gs.Tensor) -> bool:
    return view.op_of(tensor) in ACTIVATION_OPS


def _gates(view: DataflowView, pre: dict[str, gs.Tensor], nodes: set[str], c_prev_names: set[str]):
    """The gate projections: (hidden, operands, weights [4H, K] ONNX order, biases [4H])."""
    producers = {k: view.producer(t) for k, t in pre.items()}
    ops = {k: (p.op if p is not None else None) for k, p in producers.items()}
    if all(op == "Split" for op in ops.values()) and len({view.key(p) for p in producers.values()}) == 1:
        return _fused(view, pre, producers, nodes, c_prev_names, split=True)
    if all(op == "Slice" for op in ops.values()) and len({producers[k].inputs[0].name for k in pre}) == 1:
        return _fused(view, pre, producers, nodes, c_prev_names, split=False)
    if any(op in ("Split", "Slice") for op in ops.values()):
        for k, p in producers.items():
            if p is not None and p.op not in ("Split", "Slice") and _reads(view, p, c_prev_names, depth=3):
                return NoMatch("peephole", f"gate {k} ({p.name}) adds a term computed from the cell state")
        return NoMatch("gate_layout", "gates come from different Split/Slice sources: " + ", ".join(f"{k}={v}" for k, v in ops.items()))
    # four separate gate projections
    affines: dict[str, _Affine] = {}
    for k, t in pre.items():
        affine = _parse_affine(view, t, nodes, c_prev_names)
        if isinstance(affine, NoMatch):
            return affine
        affines[k] = affine
    widths = {a.width for a in affines.values()}
    if len(widths) != 1:
        return NoMatch("gate_shape", f"gate widths differ: {sorted(widths)}")
    hidden = widths.pop()
    operands: dict[str, gs.Tensor] = {}
    for a in affines.values():
        operands.update(a.operands)
    weights: dict[str, np.ndarray] = {}
    for name in operands:
        ks = {a.weights[name].shape[0] for a in affines.values() if name in a.weights}
        if len(ks) != 1:
            return NoMatch("gate_shape", f"operand {name} has weights of different widths {sorted(ks)}")
        k = ks.pop()
        cols = [affines[g].weights.get(name, np.zeros((k, hidden), np.float32)) for g in ONNX_GATE_ORDER]
        weights[name] = np.ascontiguousarray(np.concatenate(cols, axis=1).T)
    biases: dict[str | None, np.ndarray] = {}
    for key in {key for a in affines.values() for key in a.biases}:
        biases[key] = np.concatenate([affines[g].biases.get(key, np.zeros(hidden, np.float32)) for g in ONNX_GATE_ORDER])
    return hidden, operands, weights, biases


def _fused(view, pre, producers, nodes, c_prev_names, *, split: bool):
    """Gates as four pieces of one projection z (one Split, or four Slices of z)."""
    first = next(iter(producers.values()))
    z = first.inputs[0]
    affine = _parse_affine(view, z, nodes, c_prev_names)
    if isinstance(affine, NoMatch):
        return affine
    n = affine.width
    if n % 4:
        return NoMatch("gate_shape", f"gate projection width {n} is not 4 * hidden")
    hidden = n // 4
    rank = 2
    ranges: dict[str, tuple[int, int]] = {}
    if split:
        node = first
        if len(node.outputs) != 4:
            return NoMatch("gate_shape", f"{node.name}: Split into {len(node.outputs)}, not 4")
        axis = int(node.attrs.get("axis", 0))
        if axis not in (-1, rank - 1):
            return NoMatch("gate_shape", f"{node.name}: Split on axis {axis}, not the feature axis")
        sizes = _split_sizes(view, node, n)
        if sizes is None:
            return NoMatch("unknown_bounds", f"{node.name}: split sizes are not constant")
        starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
        names = [t.name for t in node.outputs]
        for k, t in pre.items():
            i = names.index(t.name)
            ranges[k] = (int(starts[i]), int(starts[i] + sizes[i]))
        nodes.add(view.key(node))
    else:
        view.set_shape(z, (None, n))
        for k, node in producers.items():
            r = _slice_range(view, node, n, rank)
            if isinstance(r, NoMatch):
                return r
            ranges[k] = r
            nodes.add(view.key(node))
    if any(e - s != hidden for s, e in ranges.values()) or len({s for s, _ in ranges.values()}) != 4:
        return NoMatch("gate_shape", f"gate pieces {ranges} are not four distinct blocks of {hidden}")
    order = [np.arange(*ranges[g]) for g in ONNX_GATE_ORDER]
    cols = np.concatenate(order)
    weights = {name: np.ascontiguousarray(w[:, cols].T) for name, w in affine.weights.items()}
    biases = {key: np.ascontiguousarray(b[cols]) for key, b in affine.biases.items()}
    return hidden, affine.operands, weights, biases


def _split_sizes(view: DataflowView, node: gs.Node, n: int) -> list[int] | None:
    if len(node.inputs) > 1 and not node.inputs[1].is_empty():
        sizes = view.eval_ints(node.inputs[1])
        return None if sizes is None else [int(s) for s in np.asarray(sizes).reshape(-1)]
    if "split" in node.attrs:  # Split-2..11 kept sizes in an attribute
        return [int(s) for s in node.attrs["split"]]
    count = len(node.outputs)
    return [n // count] * count if n % count == 0 else None


def _slice_range(view: DataflowView, node: gs.Node, n: int, rank: int) -> tuple[int, int] | NoMatch:
    args = [view.eval_ints(t) if i < len(node.inputs) and not t.is_empty() else None
            for i, t in enumerate(node.inputs[1:5], start=1)]
    args += [None] * (4 - len(args))
    starts, ends, axes, steps = args
    if starts is None or ends is None or (len(node.inputs) > 3 and not node.inputs[3].is_empty() and axes is None) \
            or (len(node.inputs) > 4 and not node.inputs[4].is_empty() and steps is None):
        return NoMatch("unknown_bounds", f"{node.name}: Slice bounds are not computable from constants and shapes")
    starts, ends = np.asarray(starts).reshape(-1), np.asarray(ends).reshape(-1)
    axes = np.arange(len(starts)) if axes is None else np.asarray(axes).reshape(-1)
    steps = np.ones(len(starts), np.int64) if steps is None else np.asarray(steps).reshape(-1)
    if len(starts) != 1 or int(axes[0]) not in (-1, rank - 1) or int(steps[0]) != 1:
        return NoMatch("gate_shape", f"{node.name}: not a unit-step slice of the feature axis")
    s, e = int(starts[0]), int(ends[0])
    s = min(max(s + n if s < 0 else s, 0), n)
    e = min(max(e + n if e < 0 else e, 0), n)
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


def _parse_affine(view: DataflowView, tensor: gs.Tensor, nodes: set[str], c_prev_names: set[str]) -> _Affine | NoMatch:
    """Parse `tensor` as a sum of (operand @ constant weight) terms and constant biases."""
    out = _Affine()
    raw_biases: list[tuple[str | None, np.ndarray]] = []
    terms: list[tuple[gs.Tensor, np.ndarray, gs.Node]] = []
    stack = [tensor]
    while stack:
        t = stack.pop()
        const = view.constant(t)
        if const is not None:
            raw_biases.append((None, const))
            continue
        node = view.producer(t)
        if node is None:
            return NoMatch("gate_projection", f"{t.name} reaches a gate without a weight product")
        key = view.key(node)
        if node.op == "Identity":
            nodes.add(key)
            stack.append(node.inputs[0])
        elif node.op == "Add":
            nodes.add(key)
            stack.extend(node.inputs)
        elif node.op == "MatMul":
            w = view.constant(node.inputs[1])
            if w is None or w.ndim != 2:
                return NoMatch("gate_projection", f"{node.name}: MatMul without a constant 2-D weight")
            nodes.add(key)
            terms.append((node.inputs[0], np.asarray(w), node))
        elif node.op == "Gemm":
            w = view.constant(node.inputs[1])
            if w is None or int(node.attrs.get("transA", 0)):
                return NoMatch("gate_projection", f"{node.name}: Gemm without a constant weight (or with transA)")
            w = np.asarray(w).T if int(node.attrs.get("transB", 0)) else np.asarray(w)
            w = w * np.asarray(node.attrs.get("alpha", 1.0), w.dtype)
            nodes.add(key)
            terms.append((node.inputs[0], w, node))
            if len(node.inputs) > 2 and not node.inputs[2].is_empty():
                c = view.constant(node.inputs[2])
                if c is None:
                    return NoMatch("gate_projection", f"{node.name}: Gemm bias is not constant")
                raw_biases.append((node.inputs[0].name, np.asarray(c) * np.asarray(node.attrs.get("beta", 1.0), c.dtype)))
        else:
            if t.name in c_prev_names or _reads(view, node, c_prev_names, depth=2):
                return NoMatch("peephole", f"{node.name} ({node.op}) adds a cell-state term to a gate")
            return NoMatch("gate_projection", f"{node.name} ({node.op}) in a gate pre-activation")
    if not terms:
        return NoMatch("gate_projection", f"{tensor.name}: no weight product")
    widths = {w.shape[1] for _, w, _ in terms}
    if len(widths) != 1:
        return NoMatch("gate_shape", f"{tensor.name}: products of widths {sorted(widths)}")
    out.width = n = widths.pop()
    owners: dict[str, str | None] = {}  # Gemm operand name -> resolved operand its bias belongs to
    for operand, w, node in terms:
        parts = _concat_parts(view, operand, w.shape[0], nodes)
        if isinstance(parts, NoMatch):
            return parts
        owners[operand.name] = view.resolve(parts[0][0]).name if len(parts) == 1 else None
        row = 0
        for part, width in parts:
            part = view.resolve(part)
            piece = w[row:row + width]
            row += width
            out.operands[part.name] = part
            out.weights[part.name] = out.weights[part.name] + piece if part.name in out.weights else piece
    for key, b in raw_biases:
        b = np.asarray(b)
        if b.size == 1:
            b = np.full(n, b.reshape(()), b.dtype)
        elif b.size != n or b.shape[-1] != n:
            return NoMatch("bias_shape", f"{tensor.name}: bias of shape {b.shape} for {n} gate columns")
        owner = owners.get(key) if key is not None else None
        b = b.reshape(n).astype(np.float32)
        out.biases[owner] = out.biases[owner] + b if owner in out.biases else b
    return out


def _concat_parts(view: DataflowView, operand: gs.Tensor, k: int, nodes: set[str]):
    """[(part, width)] of an operand: itself, or the parts of a feature-axis Concat."""
    resolved = view.resolve(operand)
    node = view.producer(resolved)
    if node is None or node.op != "Concat" or int(node.attrs.get("axis", 0)) not in (-1, 1):
        return [(operand, k)]
    shape = view.shape(resolved)
    if int(node.attrs.get("axis", 0)) == 1 and shape is not None and len(shape) != 2:
        return [(operand, k)]
    widths = [view.last_dim(t) for t in node.inputs]
    unknown = [i for i, w in enumerate(widths) if w is None]
    if len(unknown) == 1:
        widths[unknown[0]] = k - sum(w for w in widths if w is not None)
    elif unknown:
        return NoMatch("unknown_width", f"{node.name}: widths of the concatenated gate inputs are unknown")
    if sum(widths) != k or any(w <= 0 for w in widths):
        return NoMatch("gate_shape", f"{node.name}: concatenated widths {widths} do not match weight rows {k}")
    nodes.add(view.key(node))
    return list(zip(node.inputs, widths))
