"""ONNX protos as the interpreter's values: attributes, initializers (dense and sparse, external data
resolved against the model's directory) and declared input/output types."""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
from onnx import AttributeProto, numpy_helper

from q4c.errors import ModelLoadError, UnsupportedOpError
from q4c.interp.ops.dtypes import np_dtype


def attribute_value(attr: onnx.AttributeProto, base_dir: str) -> Any:
    kind = attr.type
    if kind == AttributeProto.FLOAT:
        return float(attr.f)
    if kind == AttributeProto.INT:
        return int(attr.i)
    if kind == AttributeProto.STRING:
        return attr.s.decode("utf-8")
    if kind == AttributeProto.TENSOR:
        return to_array(attr.t, base_dir)
    if kind == AttributeProto.SPARSE_TENSOR:
        return sparse_to_array(attr.sparse_tensor, base_dir)
    if kind == AttributeProto.FLOATS:
        return [float(v) for v in attr.floats]
    if kind == AttributeProto.INTS:
        return [int(v) for v in attr.ints]
    if kind == AttributeProto.STRINGS:
        return [s.decode("utf-8") for s in attr.strings]
    if kind == AttributeProto.TENSORS:
        return [to_array(t, base_dir) for t in attr.tensors]
    raise UnsupportedOpError(f"attribute '{attr.name}' of type {kind} is not supported")


def to_array(tensor: onnx.TensorProto, base_dir: str) -> np.ndarray:
    try:
        return numpy_helper.to_array(tensor, base_dir)
    except (FileNotFoundError, OSError) as e:
        raise ModelLoadError(
            f"tensor '{tensor.name}': external data not found ({e}); load the model with its data "
            "or pass base_dir"
        ) from e


def sparse_to_array(sparse: onnx.SparseTensorProto, base_dir: str) -> np.ndarray:
    values = to_array(sparse.values, base_dir)
    indices = to_array(sparse.indices, base_dir).astype(np.int64)
    dense = np.zeros(tuple(sparse.dims), dtype=values.dtype)
    if indices.ndim == 1:  # linearised indices
        dense.reshape(-1)[indices] = values
    else:
        dense[tuple(indices.T)] = values
    return dense


def declared_type(value_info: onnx.ValueInfoProto) -> tuple[np.dtype | None, tuple[int, ...] | None]:
    if not value_info.type.HasField("tensor_type"):
        return None, None
    tt = value_info.type.tensor_type
    dtype = np_dtype(tt.elem_type) if tt.elem_type else None
    shape = None
    if tt.HasField("shape") and all(d.HasField("dim_value") for d in tt.shape.dim):
        shape = tuple(d.dim_value for d in tt.shape.dim)
    return dtype, shape
