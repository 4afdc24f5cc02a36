"""The ONNX decoder of a codebook weight (q4c.quant.codebook): packed indices -> Gather into the
float16 table (x block scales) -> the float weight, from initializers only."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx_graphsurgeon as gs
from onnx import TensorProto

from q4c import graph as g
from q4c.names import fresh_tag
from q4c.quant.codebook import DECODER_PREFIX, CodebookWeight
from q4c.quant.codebook_pack import pack_indices


def _stored(stored: dict[str, gs.Constant], key: str, make: Callable[[], gs.Constant]) -> gs.Constant:
    if key not in stored:
        stored[key] = make()
    return stored[key]


def emit_decoder(root: gs.Graph, graph: gs.Graph, name: str, cw: CodebookWeight,
                 stored: dict[str, gs.Constant] | None = None) -> tuple[gs.Variable, str]:
    """Append to `graph` the nodes that rebuild `cw` as a float32 tensor of the weight's shape
    from initializers alone (see the module docstring); returns that tensor and the name of the
    packed-index initializer. `stored` keeps the indices, table and scales between calls for
    several graph levels (If branches reading one weight): each level gets its own decoder
    nodes, but the bytes are one set of initializers, which export stores once."""
    stored = {} if stored is None else stored
    k = 2**cw.bits
    c, l_, rp = cw.codes.shape
    t = cw.table.shape[0]
    nodes: list[gs.Node] = []
    tag = fresh_tag(root, "cb", strip=DECODER_PREFIX)

    # Short names (each is stored, most twice); only the nodes reading constants alone (the
    # first Reshape, nf4's scale Cast) and the table's Gather carry DECODER_PREFIX: fold-constants
    # can only start folding at the former, and `q4c inspect` finds the bytes through all three.
    consts: dict[str, gs.Constant] = {}

    def const(label: str, value: np.ndarray) -> gs.Constant:
        if label not in consts:
            consts[label] = gs.Constant(f"{tag}.{label}", np.asarray(value))
        assert np.array_equal(consts[label].values, value), label
        return consts[label]

    def node(op: str, inputs: list[gs.Tensor], dtype: type, shape: list[int] | None, **attrs: object) -> gs.Variable:
        # Intermediate tensors carry no type or shape (no value_info bytes; inference recovers them)
        out = gs.Variable(f"{tag}.{len(nodes)}", dtype=None, shape=None)
        marked = op == "Gather" or all(isinstance(t, gs.Constant) for t in inputs)
        label = f"{DECODER_PREFIX}{tag}.{len(nodes)}" if marked else ""
        nodes.append(gs.Node(op, label, attrs=dict(attrs), inputs=inputs, outputs=[out]))
        graph.nodes.append(nodes[-1])
        return out

    count = cw.codes.size
    words = -(-count // 8)
    packed = _stored(stored, "packed", lambda: g.make_constant(g.unique_name(root, f"{name}.idx{cw.bits}"),
                                                               pack_indices(cw.codes, cw.bits)))
    x = node("Reshape", [packed, const("shape_w", np.array([words, cw.bits], np.int64))], np.uint8, [words, cw.bits])
    x = node("Cast", [x], np.int64, [words, cw.bits], to=TensorProto.INT64)
    x = node("Mul", [x, const("byte_w", 256 ** np.arange(cw.bits, dtype=np.int64))], np.int64, [words, cw.bits])
    x = node("ReduceSum", [x, const("axis1", np.array([1], np.int64))], np.int64, [words, 1], keepdims=1)
    x = node("Div", [x, const("bit_w", 2 ** (cw.bits * np.arange(8, dtype=np.int64)))], np.int64, [words, 8])
    x = node("Mod", [x, const("k", np.array(k, np.int64))], np.int64, [words, 8])
    x = node("Reshape", [x, const("flat", np.array([-1], np.int64))], np.int64, [words * 8])
    if words * 8 != count:
        x = node("Slice", [x, const("zero", np.array([0], np.int64)), const("count", np.array([count], np.int64))],
                 np.int64, [count])
    if t > 1:  # one row of indices per table  # table j's centroids start at j * 2^b; computed, not stored (8 bytes a table)
        offsets = node("Range", [const("zero_s", np.array(0, np.int64)), const("end", np.array(t * k, np.int64)),
                                 const("k", np.array(k, np.int64))], np.int64, [t])
        offsets = node("Unsqueeze", [offsets, const("axis1", np.array([1], np.int64))], np.int64, [t, 1])
        x = node("Reshape", [x, const("shape_t", np.array([t, count // t], np.int64))], np.int64, [t, count // t])
        x = node("Add", [x, offsets], np.int64, [t, count // t])
    table = _stored(stored, "table", lambda: gs.Constant(g.unique_name(root, f"{name}.table"),
                                                         np.ascontiguousarray(cw.table.reshape(-1))))
    x = node("Gather", [table, x], np.float16, [t, count // t], axis=0)
    x = node("Cast", [x], np.float32, [t, count // t], to=TensorProto.FLOAT)
    if cw.scale is not None:
        nb = rp // cw.block_size
        x = node("Reshape", [x, const("shape_b", np.array([c, l_, nb, cw.block_size], np.int64))], np.float32,
                 [c, l_, nb, cw.block_size])
        scale = _stored(stored, "scale", lambda: gs.Constant(g.unique_name(root, f"{name}.scale"),
                                                             np.ascontiguousarray(cw.scale[..., None])))
        s = node("Cast", [scale], np.float32, [c, l_, nb, 1], to=TensorProto.FLOAT)
        x = node("Mul", [x, s], np.float32, [c, l_, nb, cw.block_size])
    r = cw.reduce_len
    if rp != r:
        x = node("Reshape", [x, const("shape_m", np.array([c, l_, rp], np.int64))], np.float32, [c, l_, rp])
        x = node("Slice", [x, const("zero_r", np.array([0], np.int64)), const("r", np.array([r], np.int64)),
                           const("axis2", np.array([2], np.int64))], np.float32, [c, l_, r])
    moved = list(cw.moved_shape)
    x = node("Reshape", [x, const("shape_o", np.array(moved, np.int64))], np.float32, moved)
    inverse = [int(a) for a in np.argsort(cw.perm)]
    if inverse != list(range(len(inverse))):
        x = node("Transpose", [x], np.float32, list(cw.shape), perm=inverse)
    x.dtype, x.shape = np.float32, list(cw.shape)  # what the consumer reads
    return x, packed.name
