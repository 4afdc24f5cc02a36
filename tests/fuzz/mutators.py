"""Seeded mutations of model protobufs, .npz samples and JSON documents (plans, calibration
tables): what a half-written download, a hand edit or another tool's bug leaves behind.

Every mutator takes the original bytes and a numpy Generator and returns (kind, new bytes).
"""

from __future__ import annotations

import io
import json
import math
import zipfile

import numpy as np
import onnx
from onnx import AttributeProto, TensorProto

OP_TYPES = ("MatMul", "Gemm", "Conv", "LSTM", "GRU", "RNN", "Add", "Relu", "Identity", "If", "Loop", "Scan",
            "Reshape", "Gather", "Softmax", "Transpose", "NoSuchOp", "", "MatMulNBits", "DequantizeLinear")
ODD_INTS = (0, 1, -1, 2, 3, 7, 64, 2**31 - 1, -(2**31), 2**40, 10**12)


# ---------------------------------------------------------------- bytes


def flip_bits(data: bytes, rng: np.random.Generator) -> tuple[str, bytes]:
    buf = bytearray(data)
    for _ in range(int(rng.integers(1, 9))):
        i = int(rng.integers(0, max(len(buf), 1)))
        if buf:
            buf[i] ^= 1 << int(rng.integers(0, 8))
    return "flip_bits", bytes(buf)


def truncate(data: bytes, rng: np.random.Generator) -> tuple[str, bytes]:
    cut = int(rng.integers(0, max(len(data), 1)))
    return f"truncate@{cut}", data[:cut]


def splice(data: bytes, rng: np.random.Generator) -> tuple[str, bytes]:
    """Insert, delete or overwrite a short run of random bytes."""
    buf = bytearray(data)
    i = int(rng.integers(0, len(buf) + 1))
    junk = rng.integers(0, 256, int(rng.integers(1, 16)), dtype=np.uint8).tobytes()
    how = int(rng.integers(0, 3))
    if how == 0:
        buf[i:i] = junk
    elif how == 1:
        del buf[i:i + len(junk)]
    else:
        buf[i:i + len(junk)] = junk
    return ("insert", "delete", "overwrite")[how], bytes(buf)


def garbage(data: bytes, rng: np.random.Generator) -> tuple[str, bytes]:
    n = int(rng.choice([0, 1, 7, 100, 4096]))
    return f"garbage{n}", rng.integers(0, 256, n, dtype=np.uint8).tobytes()


BYTE_MUTATORS = (flip_bits, truncate, splice, garbage)


# ---------------------------------------------------------------- ONNX fields


def _graphs(graph: onnx.GraphProto):
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == AttributeProto.GRAPH:
                yield from _graphs(attr.g)
            for sub in attr.graphs:
                yield from _graphs(sub)


def mutate_field(data: bytes, rng: np.random.Generator) -> tuple[str, bytes]:
    """One structural edit of a parsed ModelProto: the file stays valid protobuf."""
    model = onnx.ModelProto.FromString(data)
    graphs = list(_graphs(model.graph))
    graph = graphs[int(rng.integers(0, len(graphs)))]
    nodes, inits = graph.node, graph.initializer
    names = [n for node in nodes for n in list(node.input) + list(node.output)] + [t.name for t in inits]
    choice = int(rng.integers(0, 16))
    kind = "noop"
    if choice == 0 and nodes:
        node = nodes[int(rng.integers(0, len(nodes)))]
        node.op_type = str(rng.choice(OP_TYPES))
        kind = f"op_type={node.op_type}"
    elif choice == 1 and inits:
        t = inits[int(rng.integers(0, len(inits)))]
        if t.dims:
            t.dims[int(rng.integers(0, len(t.dims)))] = int(rng.choice(ODD_INTS))
        else:
            t.dims.append(int(rng.choice(ODD_INTS)))
        kind = "dims"
    elif choice == 2 and inits:
        t = inits[int(rng.integers(0, len(inits)))]
        t.data_type = int(rng.integers(0, 27))
        kind = f"data_type={t.data_type}"
    elif choice == 3 and nodes:
        attrs = [a for node in nodes for a in node.attribute]
        if attrs:
            a = attrs[int(rng.integers(0, len(attrs)))]
            a.type = int(rng.choice([0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 13]))
            kind = f"attr_type {a.name}={a.type}"
    elif choice == 4 and nodes:
        attrs = [a for node in nodes for a in node.attribute if a.type == AttributeProto.INT]
        if attrs:
            a = attrs[int(rng.integers(0, len(attrs)))]
            a.i = int(rng.choice(ODD_INTS))
            kind = f"attr_int {a.name}={a.i}"
    elif choice == 5 and nodes:
        node = nodes[int(rng.integers(0, len(nodes)))]
        if node.input:
            i = int(rng.integers(0, len(node.input)))
            node.input[i] = str(rng.choice(names + ["", "no_such_tensor"]))
            kind = f"input_name {node.op_type}[{i}]={node.input[i]!r}"
    elif choice == 6 and nodes:
        del nodes[int(rng.integers(0, len(nodes)))]
        kind = "drop_node"
    elif choice == 7 and nodes:
        nodes.append(onnx.NodeProto.FromString(nodes[int(rng.integers(0, len(nodes)))].SerializeToString()))
        kind = "dup_node"
    elif choice == 8:
        del model.opset_import[:]
        model.opset_import.append(onnx.helper.make_opsetid("", int(rng.choice([1, 9, 10, 11, 13, 21, 22, 25, 99]))))
        kind = f"opset={model.opset_import[0].version}"
    elif choice == 9:
        model.ir_version = int(rng.choice([0, 1, 3, 7, 10, 11, 13, 14, 99]))
        kind = f"ir_version={model.ir_version}"
    elif choice == 10 and inits:
        t = inits[int(rng.integers(0, len(inits)))]
        if t.raw_data:
            t.raw_data = t.raw_data[: int(rng.integers(0, len(t.raw_data)))]
        kind = "raw_data_short"
    elif choice == 11 and graph.input:
        vi = graph.input[int(rng.integers(0, len(graph.input)))]
        tt = vi.type.tensor_type
        how = int(rng.integers(0, 3))
        if how == 0:
            tt.elem_type = int(rng.integers(0, 27))
        elif how == 1:
            tt.ClearField("shape")
        elif tt.shape.dim:
            tt.shape.dim[int(rng.integers(0, len(tt.shape.dim)))].dim_value = int(rng.choice(ODD_INTS[:8]))
        kind = f"graph_input_type{how}"
    elif choice == 12 and inits:
        t = inits[int(rng.integers(0, len(inits)))]
        t.name = str(rng.choice(names + ["renamed"]))
        kind = "init_rename"
    elif choice == 13 and graph.output:
        graph.output[0].name = str(rng.choice(names + ["no_such_output"]))
        kind = "output_name"
    elif choice == 14 and inits:
        t = inits[int(rng.integers(0, len(inits)))]
        if t.data_type == TensorProto.FLOAT and t.raw_data:
            arr = np.frombuffer(t.raw_data, np.float32).copy()
            arr[int(rng.integers(0, arr.size))] = float(rng.choice([np.nan, np.inf, -np.inf, 1e38]))
            t.raw_data = arr.tobytes()
        kind = "nonfinite"
    elif choice == 15 and nodes:
        node = nodes[int(rng.integers(0, len(nodes)))]
        node.domain = str(rng.choice(["com.microsoft", "ai.onnx.ml", "custom", "ai.onnx"]))
        kind = f"domain={node.domain}"
    return kind, model.SerializeToString()


MODEL_MUTATORS = BYTE_MUTATORS + (mutate_field, mutate_field, mutate_field)


# ---------------------------------------------------------------- .npz


def mutate_npz(data: bytes, rng: np.random.Generator) -> tuple[str, bytes]:
    """Edit the arrays of a sample (names, dtypes, shapes, values) or the zip bytes."""
    if rng.integers(0, 4) == 0:
        return BYTE_MUTATORS[int(rng.integers(0, len(BYTE_MUTATORS)))](data, rng)
    with np.load(io.BytesIO(data)) as f:
        arrays = {k: f[k] for k in f.files}
    key = sorted(arrays)[int(rng.integers(0, len(arrays)))]
    a = arrays[key]
    how = int(rng.integers(0, 9))
    kind = ("rename", "drop", "extra", "dtype", "reshape", "nonfinite", "empty", "scalar", "object")[how]
    if how == 0:
        arrays["renamed"] = arrays.pop(key)
    elif how == 1:
        del arrays[key]
    elif how == 2:
        arrays["extra"] = np.zeros(3, np.float32)
    elif how == 3:
        arrays[key] = a.astype(rng.choice([np.float64, np.float16, np.int64, np.int8, np.bool_, np.complex64, "U3"]))
    elif how == 4:
        arrays[key] = a.reshape(-1) if a.ndim > 1 else a.reshape(1, -1, 1)
    elif how == 5:
        b = a.astype(np.float32).copy()
        b.flat[int(rng.integers(0, max(b.size, 1)))] = rng.choice([np.nan, np.inf])
        arrays[key] = b
    elif how == 6:
        arrays[key] = np.zeros((0,) + a.shape[1:], a.dtype)
    elif how == 7:
        arrays[key] = np.float32(1.0)
    else:
        arrays[key] = np.array([{"a": 1}], dtype=object)
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return f"npz_{kind}", buf.getvalue()


# ---------------------------------------------------------------- JSON


def _paths(doc, prefix=()):
    yield prefix
    if isinstance(doc, dict):
        for k, v in doc.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            yield from _paths(v, prefix + (i,))


ODD_VALUES = (None, True, 0, -1, 3, 2**40, 1.5, -1e308, math.nan, math.inf, "", "x", "block:0", "block:-32",
              "channel", "tensor", [], {}, [1, 2], {"bits": 4})


def mutate_json(data: bytes, rng: np.random.Generator) -> tuple[str, bytes]:
    """Replace, delete or add one value anywhere in the document, or damage the text."""
    if rng.integers(0, 4) == 0:
        return BYTE_MUTATORS[int(rng.integers(0, len(BYTE_MUTATORS)))](data, rng)
    doc = json.loads(data)
    paths = list(_paths(doc))
    path = paths[int(rng.integers(0, len(paths)))]
    value = ODD_VALUES[int(rng.integers(0, len(ODD_VALUES)))]
    if not path:
        doc = value
        kind = "root"
    else:
        parent = doc
        for p in path[:-1]:
            parent = parent[p]
        how = int(rng.integers(0, 3))
        if how == 0 or isinstance(parent, list):
            parent[path[-1]] = value
            kind = f"set {'/'.join(map(str, path))}={value!r}"
        elif how == 1:
            del parent[path[-1]]
            kind = f"del {'/'.join(map(str, path))}"
        else:
            parent[f"{path[-1]}_extra"] = value
            kind = f"add {'/'.join(map(str, path))}_extra"
    return kind, json.dumps(doc).encode()


def npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def is_zip(data: bytes) -> bool:
    return zipfile.is_zipfile(io.BytesIO(data))
