"""QuantizeLinear / DequantizeLinear at every integer width, DynamicQuantizeLinear, MatMulInteger.

Quantization parameters come in three granularities (QuantizeLinear-21): a scalar (per tensor),
a 1-D tensor along `axis` (per axis), or a tensor of the input's rank whose `axis` dimension is
ceil(D / block_size) (blocked). `expand_param` broadcasts all three to the input's shape.
"""

from __future__ import annotations

import numpy as np

from q4c.errors import UnsupportedOpError
from q4c.interp.ops.dtypes import (
    INTEGER_RANGES,
    NARROW_FLOATS,
    as_int,
    is_float8,
    is_integer,
    np_dtype,
    saturate_cast,
)
from q4c.interp.registry import op


def expand_param(param: np.ndarray, shape: tuple[int, ...], axis: int, block_size: int) -> np.ndarray:
    """Broadcastable view of a per-tensor, per-axis or blocked scale/zero point for `shape`."""
    rank = len(shape)
    if block_size > 0:
        axis = axis + rank if axis < 0 else axis
        if param.ndim != rank:
            raise UnsupportedOpError(
                f"blocked quantization needs a parameter of rank {rank}, got shape {param.shape}"
            )
        blocks = param.shape[axis]
        if not (blocks * block_size >= shape[axis] > (blocks - 1) * block_size):
            raise UnsupportedOpError(
                f"block_size {block_size} with {blocks} blocks does not cover dimension {shape[axis]} "
                f"of axis {axis}"
            )
        return np.repeat(param, block_size, axis=axis).take(np.arange(shape[axis]), axis=axis)
    if param.size == 1:
        return param.reshape(())
    if param.ndim != 1:
        raise UnsupportedOpError(
            f"a scale of shape {param.shape} needs block_size > 0 (blocked) or must be 1-D (per axis)"
        )
    axis = axis + rank if axis < 0 else axis
    if param.shape[0] != shape[axis]:
        raise UnsupportedOpError(f"per-axis parameter of length {param.shape[0]} for axis {axis} of {shape}")
    view = [1] * rank
    view[axis] = -1
    return param.reshape(view)


def _check_supported(dtype: np.dtype, op_type: str) -> None:
    if dtype not in INTEGER_RANGES and dtype not in NARROW_FLOATS and dtype != np.int32:
        raise UnsupportedOpError(f"{op_type} on {dtype} is not supported by q4c.interp")


def quantize_array(
    x: np.ndarray, scale: np.ndarray, zero_point: np.ndarray | None, target: np.dtype, axis: int = 1,
    block_size: int = 0, compute: np.dtype | None = None,
) -> np.ndarray:
    """saturate(round_half_to_even(x / scale) + zero_point) as `target`.

    The division runs in `compute` (default: the scale's type, QuantizeLinear-23), the zero point
    is added in float64, which holds every rounded quotient and zero point of the supported
    widths exactly.
    """
    lo, hi = INTEGER_RANGES[target]
    cdt = np.dtype(compute or scale.dtype)
    if cdt.kind != "f":
        cdt = np.dtype(np.float32)
    s = expand_param(scale.astype(cdt, copy=False), x.shape, axis, block_size)
    with np.errstate(divide="ignore", invalid="ignore"):
        q = np.rint(x.astype(cdt, copy=False) / s).astype(np.float64)
    if zero_point is not None:
        q += expand_param(as_int(zero_point), x.shape, axis, block_size)
    np.clip(q, lo, hi, out=q)
    return q.astype(target)


@op("QuantizeLinear", since=10)
@op("QuantizeLinear", since=13)
@op("QuantizeLinear", since=19)
@op("QuantizeLinear", since=21)
@op("QuantizeLinear", since=23)
@op("QuantizeLinear", since=25)
@op("QuantizeLinear", since=1, domain="com.microsoft")
def quantize_linear(
    x, y_scale, y_zero_point=None, *, axis: int = 1, block_size: int = 0, output_dtype: int = 0,
    saturate: int = 1, precision: int = 0,
):
    if y_zero_point is not None:
        target = y_zero_point.dtype
        if output_dtype and np_dtype(output_dtype) != target:
            raise UnsupportedOpError(f"output_dtype {np_dtype(output_dtype)} differs from y_zero_point's {target}")
    else:
        target = np_dtype(output_dtype) if output_dtype else np.dtype(np.uint8)
    compute = np_dtype(precision) if precision else None
    if target in NARROW_FLOATS:
        return (_quantize_narrow_float(x, y_scale, y_zero_point, target, axis, block_size, compute, saturate),)
    if target not in INTEGER_RANGES:
        raise UnsupportedOpError(f"QuantizeLinear to {target} is not supported by q4c.interp")
    return (quantize_array(x, y_scale, y_zero_point, target, axis, block_size, compute),)


def _quantize_narrow_float(x, scale, zero_point, target, axis, block_size, compute, saturate) -> np.ndarray:
    """float8/float4: x / scale + zero_point, rounded to nearest even by the conversion itself."""
    cdt = np.dtype(compute or scale.dtype)
    if cdt.kind != "f":
        cdt = np.dtype(np.float32)
    q = x.astype(cdt, copy=False) / expand_param(scale.astype(cdt, copy=False), x.shape, axis, block_size)
    if zero_point is not None:
        q = q + expand_param(zero_point.astype(cdt), x.shape, axis, block_size)
    return saturate_cast(q, target, saturate)


def dequantize_array(
    x: np.ndarray, scale: np.ndarray, zero_point: np.ndarray | None, out: np.dtype, axis: int = 1,
    block_size: int = 0,
) -> np.ndarray:
    """(x - zero_point) * scale, the subtraction in integers (floats for float8), the product in `out`."""
    widen = (lambda a: a.astype(np.float32)) if x.dtype in NARROW_FLOATS else as_int
    xi = widen(x)
    if zero_point is not None:
        xi = xi - expand_param(widen(zero_point), x.shape, axis, block_size)
    s = expand_param(scale.astype(out, copy=False), x.shape, axis, block_size)
    return xi.astype(out) * s


@op("DequantizeLinear", since=10)
@op("DequantizeLinear", since=13)
@op("DequantizeLinear", since=19)
@op("DequantizeLinear", since=21)
@op("DequantizeLinear", since=23)
@op("DequantizeLinear", since=25)
@op("DequantizeLinear", since=1, domain="com.microsoft")
def dequantize_linear(x, x_scale, x_zero_point=None, *, axis: int = 1, block_size: int = 0, output_dtype: int = 0):
    _check_supported(x.dtype, "DequantizeLinear")
    if is_float8(x_scale.dtype) or x_scale.dtype.kind != "f" and x_scale.dtype.name != "bfloat16":
        raise UnsupportedOpError(f"DequantizeLinear with a {x_scale.dtype} scale is not supported")
    if x.dtype == np.int32 and x_zero_point is not None and np.any(x_zero_point != 0):
        raise UnsupportedOpError("DequantizeLinear of int32 takes no (or a zero) zero point")
    out = np_dtype(output_dtype) if output_dtype else x_scale.dtype
    return (dequantize_array(x, x_scale, x_zero_point, out, axis, block_size),)


def dynamic_quantize_params(x: np.ndarray) -> tuple[np.float32, np.uint8]:
    """uint8 scale and zero point of DynamicQuantizeLinear-11, the range widened to include 0.

    A constant-zero input (max == min == 0) gets scale 1 rather than a division by zero, as
    ONNX Runtime does; the spec leaves that case undefined.
    """
    f32 = np.float32
    lo = min(f32(np.min(x)) if x.size else f32(0), f32(0))
    hi = max(f32(np.max(x)) if x.size else f32(0), f32(0))
    scale = f32(1.0) if hi == lo else f32((hi - lo) / f32(255))
    zp = np.clip(np.rint(f32(0) - lo / scale), 0, 255)
    return f32(scale), np.uint8(zp)


@op("DynamicQuantizeLinear", since=11)
def dynamic_quantize_linear(x):
    scale, zp = dynamic_quantize_params(x)
    y = quantize_array(x, np.array(scale), np.array(zp), np.dtype(np.uint8))
    return y, np.array(scale, dtype=np.float32), np.array(zp, dtype=np.uint8)


def _matmul_int(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Exact integer matmul with int32 results: float64 BLAS is exact below 2**53."""
    return np.rint(np.matmul(a.astype(np.float64), b.astype(np.float64))).astype(np.int64).astype(np.int32)


@op("MatMulInteger", since=10)
@op("MatMulInteger", since=1, domain="com.microsoft")
def mat_mul_integer(A, B, a_zero_point=None, b_zero_point=None):  # noqa: N803
    if not (is_integer(A.dtype) and is_integer(B.dtype)):
        raise UnsupportedOpError(f"MatMulInteger on {A.dtype} x {B.dtype}")
    a = as_int(A) if a_zero_point is None else as_int(A) - _row_param(as_int(a_zero_point))
    b = as_int(B) if b_zero_point is None else as_int(B) - _col_param(as_int(b_zero_point))
    return (_matmul_int(a, b),)


def _row_param(p: np.ndarray) -> np.ndarray:
    """A scalar (per tensor) or a per-row vector of A (length M) as a broadcastable column."""
    return p.reshape(-1, 1) if p.size > 1 else p.reshape(())


def _col_param(p: np.ndarray) -> np.ndarray:
    """A scalar (per tensor) or a per-column vector of B (length N)."""
    return p if p.size > 1 else p.reshape(())


@op("QLinearMatMul", since=10)
def q_linear_mat_mul(a, a_scale, a_zero_point, b, b_scale, b_zero_point, y_scale, y_zero_point):
    acc = _matmul_int(as_int(a) - _row_param(as_int(a_zero_point)), as_int(b) - _col_param(as_int(b_zero_point)))
    multiplier = _row_param(a_scale.astype(np.float32)) * _col_param(b_scale.astype(np.float32))
    real = acc.astype(np.float32) * (multiplier / y_scale.astype(np.float32).reshape(()))
    lo, hi = INTEGER_RANGES[y_zero_point.dtype]
    q = np.clip(np.rint(real).astype(np.float64) + as_int(y_zero_point).reshape(()), lo, hi)
    return (q.astype(y_zero_point.dtype),)
