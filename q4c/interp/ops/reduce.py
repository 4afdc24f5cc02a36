"""Reductions (Reduce*, ArgMax/ArgMin), Softmax/LogSoftmax/Hardmax, CumSum and TopK."""

from __future__ import annotations

import numpy as np

from q4c.interp.registry import op


def _axes_tuple(axes, ndim: int) -> tuple[int, ...] | None:
    if axes is None:
        return None
    values = [int(a) for a in np.asarray(axes).reshape(-1)]
    return tuple(sorted(a + ndim if a < 0 else a for a in values))


def _reducer(kind: str):
    """One reduction's numpy computation, given the axes (None = all) and keepdims."""

    def compute(x: np.ndarray, axes: tuple[int, ...] | None, keepdims: bool) -> np.ndarray:
        empty = x.size == 0
        if kind == "sum":
            y = np.sum(x, axis=axes, keepdims=keepdims, dtype=x.dtype)
        elif kind == "mean":
            if x.dtype.kind == "f":
                with np.errstate(invalid="ignore", divide="ignore"):
                    y = np.mean(x, axis=axes, keepdims=keepdims, dtype=x.dtype)
            else:  # integer mean: C-style truncated division, as ONNX Runtime computes it
                n = x.size // max(np.sum(x, axis=axes, keepdims=keepdims).size, 1)
                total = np.sum(x, axis=axes, keepdims=keepdims, dtype=np.int64)
                y = np.trunc(total / n).astype(x.dtype)
        elif kind in ("max", "min"):
            fn = np.max if kind == "max" else np.min
            if empty:
                if x.dtype.kind == "f":
                    initial = -np.inf if kind == "max" else np.inf
                elif x.dtype == np.bool_:
                    initial = kind == "min"
                else:
                    info = np.iinfo(x.dtype)
                    initial = info.min if kind == "max" else info.max
                y = fn(x, axis=axes, keepdims=keepdims, initial=initial)
            else:
                y = fn(x, axis=axes, keepdims=keepdims)
        elif kind == "prod":
            y = np.prod(x, axis=axes, keepdims=keepdims, dtype=x.dtype)
        elif kind == "l1":
            y = np.sum(np.abs(x), axis=axes, keepdims=keepdims, dtype=x.dtype)
        elif kind == "l2":
            y = np.sqrt(np.sum(np.square(x), axis=axes, keepdims=keepdims, dtype=x.dtype))
            if x.dtype.kind in "iu":
                y = np.round(y)  # ONNX Runtime rounds sqrt of an integer sum back to an integer
        elif kind == "sum_square":
            y = np.sum(np.square(x), axis=axes, keepdims=keepdims, dtype=x.dtype)
        elif kind == "log_sum":
            with np.errstate(divide="ignore"):
                y = np.log(np.sum(x, axis=axes, keepdims=keepdims, dtype=x.dtype))
        elif kind == "log_sum_exp":
            if empty:
                with np.errstate(divide="ignore"):
                    y = np.log(np.sum(x, axis=axes, keepdims=keepdims, dtype=x.dtype))
            else:
                m = np.max(x, axis=axes, keepdims=True)
                m = np.where(np.isfinite(m), m, 0).astype(x.dtype)
                s = np.sum(np.exp(x - m), axis=axes, keepdims=True, dtype=x.dtype)
                with np.errstate(divide="ignore"):
                    y = np.log(s) + m
                if not keepdims:
                    y = np.squeeze(y, axis=axes) if axes is not None else y.reshape(())
        else:  # pragma: no cover - the table below is closed
            raise AssertionError(kind)
        return np.asarray(y).astype(x.dtype, copy=False)

    return compute


def _register_reduce(op_type: str, kind: str, input_axes_since: int) -> None:
    compute = _reducer(kind)
    snake = "reduce_" + kind

    def attribute_form(data, *, axes=None, keepdims: int = 1):
        return (compute(data, _axes_tuple(axes, data.ndim), bool(keepdims)),)

    def input_form(data, axes=None, *, keepdims: int = 1, noop_with_empty_axes: int = 0):
        if axes is None or axes.size == 0:
            if noop_with_empty_axes:
                return (data,)
            return (compute(data, None, bool(keepdims)),)
        return (compute(data, _axes_tuple(axes, data.ndim), bool(keepdims)),)

    for fn in (attribute_form, input_form):
        fn.__name__ = fn.__qualname__ = snake
        fn.__module__ = __name__
    op(op_type, since=1)(attribute_form)
    op(op_type, since=input_axes_since)(input_form)
    globals()[snake] = input_form


for _op_type, _kind in [
    ("ReduceMean", "mean"), ("ReduceMax", "max"), ("ReduceMin", "min"), ("ReduceProd", "prod"),
    ("ReduceL1", "l1"), ("ReduceL2", "l2"), ("ReduceSumSquare", "sum_square"),
    ("ReduceLogSum", "log_sum"), ("ReduceLogSumExp", "log_sum_exp"),
]:
    _register_reduce(_op_type, _kind, input_axes_since=18)
_register_reduce("ReduceSum", "sum", input_axes_since=13)  # ReduceSum took axes as an input first


def _arg_reduce(x: np.ndarray, axis: int, keepdims: int, select_last_index: int, fn) -> np.ndarray:
    axis = axis + x.ndim if axis < 0 else axis
    if select_last_index:
        flipped = np.flip(x, axis=axis)
        idx = x.shape[axis] - 1 - fn(flipped, axis=axis)
    else:
        idx = fn(x, axis=axis)
    idx = idx.astype(np.int64)
    return np.expand_dims(idx, axis) if keepdims else idx


@op("ArgMax", since=1)
def arg_max(data, *, axis: int = 0, keepdims: int = 1, select_last_index: int = 0):
    return (_arg_reduce(data, axis, keepdims, select_last_index, np.argmax),)


@op("ArgMin", since=1)
def arg_min(data, *, axis: int = 0, keepdims: int = 1, select_last_index: int = 0):
    return (_arg_reduce(data, axis, keepdims, select_last_index, np.argmin),)


def softmax_array(x: np.ndarray, axis: int) -> np.ndarray:
    m = np.max(x, axis=axis, keepdims=True)
    e = np.exp(x - m)
    e /= np.sum(e, axis=axis, keepdims=True)
    return e


def _log_softmax_array(x: np.ndarray, axis: int) -> np.ndarray:
    shifted = x - np.max(x, axis=axis, keepdims=True)
    return shifted - np.log(np.sum(np.exp(shifted), axis=axis, keepdims=True))


def _hardmax_array(x: np.ndarray, axis: int) -> np.ndarray:
    idx = np.expand_dims(np.argmax(x, axis=axis), axis)
    y = np.zeros_like(x)
    np.put_along_axis(y, idx, 1, axis=axis)
    return y


def _coerced_2d(x: np.ndarray, axis: int, fn) -> np.ndarray:
    """Opset < 13 semantics: flatten to [prod(dims[:axis]), prod(dims[axis:])], apply on dim 1."""
    axis = axis + x.ndim if axis < 0 else axis
    rows = int(np.prod(x.shape[:axis], dtype=np.int64))
    return fn(x.reshape(rows, -1), 1).reshape(x.shape)


@op("Softmax", since=1)
def softmax_1(input, *, axis: int = 1):  # noqa: A002
    return (_coerced_2d(input, axis, softmax_array),)


@op("Softmax", since=13)
def softmax(input, *, axis: int = -1):  # noqa: A002
    return (softmax_array(input, axis),)


@op("LogSoftmax", since=1)
def log_softmax_1(input, *, axis: int = 1):  # noqa: A002
    return (_coerced_2d(input, axis, _log_softmax_array),)


@op("LogSoftmax", since=13)
def log_softmax(input, *, axis: int = -1):  # noqa: A002
    return (_log_softmax_array(input, axis),)


@op("Hardmax", since=1)
def hardmax_1(input, *, axis: int = 1):  # noqa: A002
    return (_coerced_2d(input, axis, _hardmax_array),)


@op("Hardmax", since=13)
def hardmax(input, *, axis: int = -1):  # noqa: A002
    return (_hardmax_array(input, axis),)


@op("CumSum", since=11)
def cum_sum(x, axis, *, exclusive: int = 0, reverse: int = 0):
    ax = int(np.asarray(axis).reshape(-1)[0])
    ax = ax + x.ndim if ax < 0 else ax
    y = np.flip(x, axis=ax) if reverse else x
    out = np.cumsum(y, axis=ax, dtype=x.dtype)
    if exclusive:
        out = np.concatenate(
            [np.zeros_like(np.take(out, [0], axis=ax)), np.take(out, range(out.shape[ax] - 1), axis=ax)],
            axis=ax,
        )
    return (np.flip(out, axis=ax).copy() if reverse else out,)


@op("TopK", since=11)
def top_k(x, k, *, axis: int = -1, largest: int = 1, sorted: int = 1):  # noqa: A002
    n = int(np.asarray(k).reshape(-1)[0])
    axis = axis + x.ndim if axis < 0 else axis
    # Stable sort: among equal values the lower index comes first (TopK-11).
    keys = -x if largest and x.dtype.kind != "u" else x
    if largest and x.dtype.kind == "u":
        order = np.flip(np.argsort(np.flip(x, axis=axis), axis=axis, kind="stable"), axis=axis)
        order = x.shape[axis] - 1 - order
    else:
        order = np.argsort(keys, axis=axis, kind="stable")
    idx = np.take(order, np.arange(n), axis=axis)
    values = np.take_along_axis(x, idx, axis=axis)
    return values, idx.astype(np.int64)
