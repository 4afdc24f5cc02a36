"""ONNX element types as numpy dtypes, and the integer ranges quantization saturates to."""

from __future__ import annotations

import ml_dtypes
import numpy as np
from onnx import TensorProto, helper

from q4c.errors import UnsupportedOpError

INT4 = np.dtype(ml_dtypes.int4)
UINT4 = np.dtype(ml_dtypes.uint4)
INT2 = np.dtype(ml_dtypes.int2)
UINT2 = np.dtype(ml_dtypes.uint2)

# Inclusive [lo, hi] of every integer type QuantizeLinear may produce (ONNX QuantizeLinear-25).
INTEGER_RANGES: dict[np.dtype, tuple[int, int]] = {
    np.dtype(np.uint8): (0, 255),
    np.dtype(np.int8): (-128, 127),
    np.dtype(np.uint16): (0, 65535),
    np.dtype(np.int16): (-32768, 32767),
    UINT4: (0, 15),
    INT4: (-8, 7),
    UINT2: (0, 3),
    INT2: (-2, 1),
}
SUB_BYTE = frozenset({INT4, UINT4, INT2, UINT2})
# Narrow floats whose ONNX conversion rules (Cast-25 tables) ml_dtypes implements once values
# are clipped for saturate=1: round to nearest even, NaN kept, overflow to NaN or inf otherwise.
NARROW_FLOATS = frozenset(np.dtype(t) for t in (
    ml_dtypes.float8_e4m3fn, ml_dtypes.float8_e4m3fnuz, ml_dtypes.float8_e5m2, ml_dtypes.float8_e5m2fnuz,
    ml_dtypes.float4_e2m1fn,
))
# Types that ml_dtypes represents but whose ONNX arithmetic (saturation tables, NaN encodings)
# the interpreter does not implement.
_FLOAT8_NAMES = ("float8_", "float4_", "float6_")


def np_dtype(onnx_type: int) -> np.dtype:
    """The numpy dtype of an ONNX `TensorProto.DataType` value (ml_dtypes for sub-byte types)."""
    if onnx_type == TensorProto.STRING:
        return np.dtype(object)
    try:
        return np.dtype(helper.tensor_dtype_to_np_dtype(onnx_type))
    except (KeyError, ValueError) as e:
        raise UnsupportedOpError(f"ONNX element type {onnx_type} has no numpy equivalent") from e


def is_float8(dtype: np.dtype) -> bool:
    """True for ml_dtypes' float8/float6/float4 types, whose ONNX semantics are not implemented."""
    return any(dtype.name.startswith(prefix) for prefix in _FLOAT8_NAMES)


def saturate_cast(x: np.ndarray, target: np.dtype, saturate: int = 1) -> np.ndarray:
    """Convert to a float8/float4 type: with `saturate`, +-inf and out-of-range values become +-max."""
    if x.dtype.kind in "iub" or x.dtype.itemsize < 4:
        x = x.astype(np.float32)
    if saturate:
        top = float(ml_dtypes.finfo(target).max)
        x = np.clip(x, -top, top)
    return x.astype(target)


def is_integer(dtype: np.dtype) -> bool:
    """True for numpy integers and ml_dtypes' int4/uint4/int2/uint2."""
    return dtype.kind in "iu" or dtype in SUB_BYTE


def as_int(x: np.ndarray) -> np.ndarray:
    """Integer values widened to int32 (int64 for 32/64-bit inputs) so arithmetic cannot wrap."""
    if x.dtype.itemsize >= 4 and x.dtype.kind in "iu":
        return x.astype(np.int64)
    return x.astype(np.int32)
