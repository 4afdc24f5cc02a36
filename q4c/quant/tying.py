"""Share the codes of a tied embedding and output projection in DequantizeLinear form.

A tied LM reads its embedding table E [V, D] with Gather and its transpose E^T [D, V] with
MatMul; exports store E^T as a second initializer. Quantized along D with the same block, both
get identical codes and scales, so the MatMul's DequantizeLinear can read E's codes and
transpose the result: half the table bytes, bit-identical outputs. (In ONNX Runtime's kernel
form the two already share one packed table; see lower-ort-kernels.)
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from q4c import graph as g
from q4c.quant.weights import WeightSlot


def share_transposed_tables(model: onnx.ModelProto) -> int:
    """Rewrite, in the main graph, each DQ(C_t, S_t; axis 0) whose codes and scales are the
    transposes of another DQ(C, S; axis 1) with the same block size as Transpose(DQ(C, S)).
    Returns how many tables were shared."""
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    dqs = [n for n in graph.node if n.op_type == "DequantizeLinear" and len(n.input) == 2
           and n.input[0] in inits and n.input[1] in inits]
    attrs = {id(n): {a.name: a.i for a in n.attribute} for n in dqs}
    rows = [n for n in dqs if attrs[id(n)].get("axis") == 1 and len(inits[n.input[0]].dims) == 2]
    shared = 0
    for dq in dqs:
        a = attrs[id(dq)]
        if a.get("axis") != 0 or len(inits[dq.input[0]].dims) != 2:
            continue
        codes_t = numpy_helper.to_array(inits[dq.input[0]])
        for src in rows:
            if attrs[id(src)].get("block_size") != a.get("block_size") or list(inits[src.input[0]].dims) != list(codes_t.shape[::-1]):
                continue
            if not (np.array_equal(numpy_helper.to_array(inits[src.input[0]]), codes_t.T)
                    and np.array_equal(numpy_helper.to_array(inits[src.input[1]]), numpy_helper.to_array(inits[dq.input[1]]).T)):
                continue
            rows_out = dq.output[0] + "_rows"
            old_codes, old_scale = dq.input[0], dq.input[1]
            dq.input[0], dq.input[1] = src.input[0], src.input[1]
            for attr in dq.attribute:
                if attr.name == "axis":
                    attr.i = 1
            out = dq.output[0]
            dq.output[0] = rows_out
            index = list(graph.node).index(dq)
            graph.node.insert(index + 1, helper.make_node("Transpose", [rows_out], [out], perm=[1, 0],
                                                          name=(dq.name or out) + "_transpose"))
            _drop_unused(graph, {old_codes, old_scale})
            inits = {t.name: t for t in graph.initializer}
            shared += 1
            break
    return shared


def _drop_unused(graph: onnx.GraphProto, names: set[str]) -> None:
    used = {i for sub in g.iter_graph_protos(graph) for n in sub.node for i in n.input}
    keep = [t for t in graph.initializer if t.name not in names or t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(keep)


def tied_groups(chosen: dict[str, WeightSlot]) -> list[list[str]]:
    """Knapsack items: single tensors, and a tied embedding with the MatMul weight that is its
    transpose (an LM's output projection). Tied tensors take the same candidate, so their codes
    are identical and stored once (one packed table for GatherBlockQuantized and MatMulNBits,
    or shared DequantizeLinear codes)."""
    embeddings = {n: s for n, s in chosen.items() if s.role == "embedding"}
    tied: dict[str, str] = {}
    for name, slot in sorted(chosen.items()):
        if slot.role != "matmul_b" or name in tied:
            continue
        w = np.asarray(slot.tensor.values)
        for e_name, e_slot in sorted(embeddings.items()):
            if e_name in tied.values() or tuple(e_slot.tensor.shape) != tuple(w.shape[::-1]):
                continue
            if np.array_equal(np.asarray(e_slot.tensor.values), w.T):
                tied[name] = e_name
                break
    grouped = set(tied) | set(tied.values())
    groups = [[n] for n in sorted(chosen) if n not in grouped]
    groups += [sorted([w, e]) for w, e in sorted(tied.items())]
    return groups
