"""Tensor creation and conversion: Constant, ConstantOfShape, Range, Cast, Identity, Dropout..."""

from __future__ import annotations

import numpy as np

from q4c.errors import UnsupportedOpError
from q4c.interp.ops.dtypes import NARROW_FLOATS, is_float8, np_dtype, saturate_cast
from q4c.interp.registry import op


@op("Constant", since=1)
def constant(
    *,
    value=None,
    sparse_value=None,
    value_float: float | None = None,
    value_floats: list[float] | None = None,
    value_int: int | None = None,
    value_ints: list[int] | None = None,
    value_string: str | None = None,
    value_strings: list[str] | None = None,
):
    if value is not None:
        return (value,)
    if sparse_value is not None:
        return (sparse_value,)
    if value_float is not None:
        return (np.array(value_float, dtype=np.float32),)
    if value_floats is not None:
        return (np.array(value_floats, dtype=np.float32),)
    if value_int is not None:
        return (np.array(value_int, dtype=np.int64),)
    if value_ints is not None:
        return (np.array(value_ints, dtype=np.int64),)
    if value_string is not None:
        return (np.array(value_string, dtype=object),)
    if value_strings is not None:
        return (np.array(value_strings, dtype=object),)
    raise UnsupportedOpError("Constant without any value attribute")


@op("ConstantOfShape", since=9)
def constant_of_shape(input, *, value=None):  # noqa: A002
    fill = np.zeros(1, dtype=np.float32) if value is None else value
    dims = tuple(int(d) for d in np.asarray(input).reshape(-1))
    return (np.full(dims, fill.reshape(-1)[0], dtype=fill.dtype),)


@op("EyeLike", since=9)
def eye_like(input, *, dtype: int | None = None, k: int = 0):  # noqa: A002
    out = input.dtype if dtype is None else np_dtype(dtype)
    return (np.eye(input.shape[0], input.shape[1], k=k, dtype=out),)


@op("Range", since=11)
def range_(start, limit, delta):
    s, lim, d = start.reshape(()), limit.reshape(()), delta.reshape(())
    # Range-11: number_of_elements = max(ceil((limit - start) / delta), 0); x[i] = start + i * delta.
    n = max(int(np.ceil((float(lim) - float(s)) / float(d))), 0)
    return ((s + np.arange(n, dtype=start.dtype) * d).astype(start.dtype, copy=False),)


@op("Identity", since=1)
def identity(input):  # noqa: A002
    return (input,)


def _cast(x: np.ndarray, target: np.dtype, saturate: int = 1) -> np.ndarray:
    for dtype in (x.dtype, target):
        if is_float8(dtype) and dtype not in NARROW_FLOATS:
            raise UnsupportedOpError(f"Cast between {x.dtype} and {target}: {dtype} is not supported")
    if target in NARROW_FLOATS:
        return saturate_cast(x, target, saturate)
    if target == np.dtype(object) or x.dtype == np.dtype(object):
        raise UnsupportedOpError("Cast to or from string is not supported")
    # numpy's astype is Cast's rule for numbers: fixed point to narrower fixed point wraps,
    # floating point to integer truncates toward zero; ml_dtypes extends both to int4/int2.
    with np.errstate(invalid="ignore", over="ignore"):
        return x.astype(target)


@op("Cast", since=6)
def cast(input, *, to: int, saturate: int = 1, round_mode: str = "up"):  # noqa: A002
    return (_cast(input, np_dtype(to), saturate),)


@op("CastLike", since=15)
def cast_like(input, target_type, *, saturate: int = 1, round_mode: str = "up"):  # noqa: A002
    return (_cast(input, target_type.dtype, saturate),)


@op("Dropout", since=7)
def dropout_7(data, *, ratio: float = 0.5):
    return (data, np.ones(data.shape, dtype=np.bool_))


@op("Dropout", since=12)
def dropout(data, ratio=None, training_mode=None, *, seed: int | None = None):
    rate = 0.5 if ratio is None else float(ratio)
    if training_mode is not None and bool(training_mode) and rate != 0.0:
        raise UnsupportedOpError("Dropout in training mode draws random masks; q4c.interp runs inference only")
    return (data, np.ones(data.shape, dtype=np.bool_))


@op("Trilu", since=14)
def trilu(input, k=None, *, upper: int = 1):  # noqa: A002
    diagonal = 0 if k is None else int(k.reshape(-1)[0])
    return ((np.triu if upper else np.tril)(input, diagonal),)


@op("OneHot", since=9)
def one_hot(indices, depth, values, *, axis: int = -1):
    d = int(np.asarray(depth).reshape(-1)[0])
    idx = indices.astype(np.int64)
    idx = np.where(idx < 0, idx + d, idx)  # OneHot-11: negative indices count from the end
    rank = indices.ndim + 1
    axis = axis + rank if axis < 0 else axis
    classes = np.arange(d).reshape([d if i == axis else 1 for i in range(rank)])
    hot = np.expand_dims(idx, axis) == classes
    off, on = values.reshape(-1)[0], values.reshape(-1)[1]
    return (np.where(hot, on, off).astype(values.dtype),)


@op("NonZero", since=9)
def non_zero(x):
    return (np.array(np.nonzero(x), dtype=np.int64).reshape(x.ndim, -1),)


@op("Compress", since=11)
def compress(input, condition, *, axis: int | None = None):  # noqa: A002
    if axis is None:
        return (np.compress(condition, input.reshape(-1)),)
    return (np.compress(condition, input, axis=axis),)
