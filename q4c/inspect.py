"""What a model holds: opsets, op histogram, weights by dtype and bit width, inputs/outputs."""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx

from q4c import graph as g
from q4c import ort as q4ort
from q4c.quant.codebook import DECODER_PREFIX
from q4c.signature import input_specs

INSPECT_SCHEMA = "q4c.inspect/1"
_KERNELS = {"MatMulNBits": 1, "GatherBlockQuantized": 0}
#: How inspect names 6-bit weights stored as a 4-bit and a 2-bit plane
PLANES = "int6 (int4 + uint2 planes)"


def inspect_model(model: onnx.ModelProto) -> dict[str, Any]:
    graphs = list(g.iter_graph_protos(model.graph))
    packed_bits: dict[str, int] = {}
    for graph in graphs:
        for node in graph.node:
            if node.op_type in _KERNELS:
                bits = next((a.i for a in node.attribute if a.name == "bits"), 4)
                packed_bits[node.input[_KERNELS[node.op_type]]] = bits
    weights: dict[str, dict[str, int]] = {}
    kinds = {t.name: t.data_type for graph in graphs for t in graph.initializer}
    planes = {name for graph in graphs for name in _plane_codes(graph, kinds)}
    for graph in graphs:
        for t in graph.initializer:
            dtype = onnx.TensorProto.DataType.Name(t.data_type).lower()
            nbytes = len(t.raw_data) if t.raw_data else t.ByteSize()
            params = int(np.prod(t.dims))
            if t.name in planes:  # one 6-bit weight is two initializers: count its weights once
                dtype = PLANES
                params = params if t.data_type == onnx.TensorProto.INT4 else 0
            elif t.name in packed_bits:
                bits = packed_bits[t.name]
                dtype = f"uint{bits} (packed in uint8)"
                params = nbytes * 8 // bits
            entry = weights.setdefault(dtype, {"tensors": 0, "params": 0, "bytes": 0})
            entry["tensors"] += 1
            entry["params"] += params
            entry["bytes"] += nbytes
    initializers = {t.name for t in model.graph.initializer}
    return {
        "schema": INSPECT_SCHEMA,
        "codebooks": _codebooks(graphs),
        "ir_version": model.ir_version,
        "opsets": {(imp.domain or "ai.onnx"): imp.version for imp in model.opset_import},
        "ops": g.op_histogram(model),
        "nodes": sum(len(graph.node) for graph in graphs),
        "weights": dict(sorted(weights.items())),
        "weight_bytes": sum(w["bytes"] for w in weights.values()),
        "inputs": [{"name": s.name, "dtype": str(s.dtype), "shape": [d if isinstance(d, int) and d > 0 else str(d or "?") for d in s.shape]}
                   for s in input_specs(model)],
        "outputs": [{"name": o.name, "dtype": str(onnx.helper.tensor_dtype_to_np_dtype(o.type.tensor_type.elem_type)),
                     "shape": [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in o.type.tensor_type.shape.dim]}
                    for o in model.graph.output if o.name not in initializers],
        "session_config": q4ort.session_config(model),
    }


def _plane_codes(graph: onnx.GraphProto, kinds: dict[str, int]) -> set[str]:
    """Initializers of 6-bit weights stored as planes (q4c.quant.planes): the INT4 and the UINT2
    code tensor of each DequantizeLinear(hi) * 4 + DequantizeLinear(lo) in `graph` (`kinds`: the
    data type of every initializer, an outer graph's included)."""
    producer = {o: n for n in graph.node for o in n.output}

    def codes(name: str, kind: int) -> str | None:
        node = producer.get(name)
        while node is not None and node.op_type in ("Cast", "Mul"):
            node = producer.get(node.input[0])
        if node is not None and node.op_type == "DequantizeLinear" and kinds.get(node.input[0]) == kind:
            return node.input[0]
        return None

    found = set()
    for node in graph.node:
        if node.op_type == "Add" and len(node.input) == 2:
            hi, lo = codes(node.input[0], onnx.TensorProto.INT4), codes(node.input[1], onnx.TensorProto.UINT2)
            if hi and lo:
                found |= {hi, lo}
    return found


def _codebooks(graphs: list[onnx.GraphProto]) -> dict[str, int]:
    """Bytes of codebook-quantized weights (q4c.quant.codebook): packed indices (uint8), float16
    centroid tables (read by the decoder's Gather) and nf4 block scales (its Cast to float)."""
    out = {"tensors": 0, "index_bytes": 0, "table_bytes": 0, "scale_bytes": 0}
    for graph in graphs:
        sizes = {t.name: len(t.raw_data) if t.raw_data else t.ByteSize() for t in graph.initializer}
        kinds = {t.name: t.data_type for t in graph.initializer}
        for node in graph.node:
            if not node.name.startswith(DECODER_PREFIX):
                continue
            first = node.input[0] if node.input else ""
            if node.op_type == "Reshape" and kinds.get(first) == onnx.TensorProto.UINT8:
                out["tensors"] += 1
                out["index_bytes"] += sizes[first]
            elif node.op_type == "Gather" and first in sizes:
                out["table_bytes"] += sizes[first]
            elif node.op_type == "Cast" and kinds.get(first) == onnx.TensorProto.FLOAT16:
                out["scale_bytes"] += sizes[first]
    out["bytes"] = out["index_bytes"] + out["table_bytes"] + out["scale_bytes"]
    return out
