"""Shape and layout ops: Shape, Reshape, Transpose, Slice, Gather*, Scatter*, Concat, Split, Pad..."""

from __future__ import annotations

import numpy as np

from q4c.errors import UnsupportedOpError
from q4c.interp.registry import op


def _ints(x) -> list[int]:
    return np.asarray(x, dtype=np.int64).reshape(-1).tolist()


def _axis(axis: int, ndim: int) -> int:
    return axis + ndim if axis < 0 else axis


@op("Shape", since=1)
def shape(data, *, start: int = 0, end: int | None = None):
    # Shape-15: start/end are clamped to [0, rank] after adding rank to negative values.
    dims = data.shape
    return (np.array(dims[slice(start, end)], dtype=np.int64),)


@op("Size", since=1)
def size(data):
    return (np.array(data.size, dtype=np.int64),)


@op("Reshape", since=5)
def reshape(data, shape, *, allowzero: int = 0):
    dims = _ints(shape)
    if not allowzero:
        dims = [data.shape[i] if d == 0 else d for i, d in enumerate(dims)]
    return (data.reshape(dims),)


@op("Flatten", since=1)
def flatten(input, *, axis: int = 1):  # noqa: A002
    axis = _axis(axis, input.ndim)
    rows = int(np.prod(input.shape[:axis], dtype=np.int64))
    cols = int(np.prod(input.shape[axis:], dtype=np.int64))
    return (input.reshape(rows, cols),)


@op("Transpose", since=1)
def transpose(data, *, perm: list[int] | None = None):
    return (np.transpose(data, perm),)


@op("Squeeze", since=1)
def squeeze_1(data, *, axes: list[int] | None = None):
    return squeeze(data, None if axes is None else np.array(axes))


@op("Squeeze", since=13)
def squeeze(data, axes=None):
    if axes is None:
        return (np.squeeze(data),)
    drop = {_axis(a, data.ndim) for a in _ints(axes)}
    if any(data.shape[a] != 1 for a in drop):
        raise ValueError(f"Squeeze of axes {sorted(drop)} with sizes other than 1 in {data.shape}")
    return (data.reshape([d for i, d in enumerate(data.shape) if i not in drop]),)


@op("Unsqueeze", since=1)
def unsqueeze_1(data, *, axes: list[int]):
    return unsqueeze(data, np.array(axes))


@op("Unsqueeze", since=13)
def unsqueeze(data, axes):
    inserted = _ints(axes)
    rank = data.ndim + len(inserted)
    shape = list(data.shape)
    for axis in sorted(_axis(a, rank) for a in inserted):
        shape.insert(axis, 1)
    return (data.reshape(shape),)


@op("Slice", since=1)
def slice_1(data, *, starts: list[int], ends: list[int], axes: list[int] | None = None):
    return slice_(data, np.array(starts), np.array(ends), None if axes is None else np.array(axes))


@op("Slice", since=10)
def slice_(data, starts, ends, axes=None, steps=None):
    starts, ends = _ints(starts), _ints(ends)
    axes = list(range(len(starts))) if axes is None else [_axis(a, data.ndim) for a in _ints(axes)]
    steps = [1] * len(starts) if steps is None else _ints(steps)
    index = [slice(None)] * data.ndim
    for start, end, axis, step in zip(starts, ends, axes, steps):
        # Python's slice clamping is exactly Slice-13's: negatives count from the end, then clamp
        # to [0, dim] (or [-1, dim-1] when stepping backwards).
        index[axis] = slice(start, end, step)
    return (data[tuple(index)],)


@op("Gather", since=1)
def gather(data, indices, *, axis: int = 0):
    return (np.take(data, indices.astype(np.int64, copy=False), axis=axis),)


@op("GatherElements", since=11)
def gather_elements(data, indices, *, axis: int = 0):
    axis = _axis(axis, data.ndim)
    idx = np.where(indices < 0, indices + data.shape[axis], indices)
    return (np.take_along_axis(data, idx, axis=axis),)


@op("GatherND", since=11)
def gather_nd(data, indices, *, batch_dims: int = 0):
    k = indices.shape[-1]
    batch_shape = data.shape[:batch_dims]
    nb = int(np.prod(batch_shape, dtype=np.int64))
    d = data.reshape((nb,) + data.shape[batch_dims:])
    idx = indices.reshape((nb, -1, k)).astype(np.int64)
    dims = np.array(data.shape[batch_dims:batch_dims + k])
    idx = np.where(idx < 0, idx + dims, idx)
    out = [d[b][tuple(idx[b].T)] for b in range(nb)]
    result = np.stack(out) if out else np.empty((0,) + data.shape[batch_dims + k:], data.dtype)
    return (result.reshape(indices.shape[:-1] + data.shape[batch_dims + k:]),)


_REDUCTIONS = {"add": np.add, "mul": np.multiply, "max": np.maximum, "min": np.minimum}


@op("ScatterND", since=11)
def scatter_nd(data, indices, updates, *, reduction: str = "none"):
    out = data.copy()
    k = indices.shape[-1]
    idx = indices.reshape(-1, k).astype(np.int64)
    idx = np.where(idx < 0, idx + np.array(data.shape[:k]), idx)
    upd = updates.reshape((idx.shape[0],) + data.shape[k:])
    if reduction == "none":
        out[tuple(idx.T)] = upd
    elif reduction in _REDUCTIONS:
        _REDUCTIONS[reduction].at(out, tuple(idx.T), upd)
    else:
        raise UnsupportedOpError(f"ScatterND reduction='{reduction}'")
    return (out,)


@op("ScatterElements", since=11)
def scatter_elements(data, indices, updates, *, axis: int = 0, reduction: str = "none"):
    axis = _axis(axis, data.ndim)
    out = data.copy()
    idx = np.where(indices < 0, indices + data.shape[axis], indices).astype(np.int64)
    grids = list(np.indices(idx.shape, sparse=True))
    grids[axis] = idx
    if reduction == "none":
        out[tuple(grids)] = updates
    elif reduction in _REDUCTIONS:
        full = tuple(np.broadcast_to(g, idx.shape) for g in grids)
        _REDUCTIONS[reduction].at(out, full, updates)
    else:
        raise UnsupportedOpError(f"ScatterElements reduction='{reduction}'")
    return (out,)


@op("Concat", since=4)
def concat(*inputs, axis: int):
    return (np.concatenate(inputs, axis=axis),)


def _split_sizes(dim: int, split, num_outputs: int | None, n_outputs: int) -> list[int]:
    if split is not None:
        return _ints(split)
    if num_outputs is not None:  # Split-18: ceil-sized chunks, the last one smaller
        chunk = -(-dim // num_outputs)
        return [min(chunk, max(dim - i * chunk, 0)) for i in range(num_outputs)]
    if dim % n_outputs:
        raise UnsupportedOpError(f"Split of a dimension of {dim} into {n_outputs} equal parts")
    return [dim // n_outputs] * n_outputs


def _split(x: np.ndarray, axis: int, sizes: list[int]) -> tuple[np.ndarray, ...]:
    bounds = np.cumsum(sizes)[:-1]
    return tuple(np.split(x, bounds, axis=axis))


@op("Split", since=2)
def split_2(input, *, axis: int = 0, split: list[int] | None = None, _n_outputs: int):  # noqa: A002
    return _split(input, axis, _split_sizes(input.shape[axis], split, None, _n_outputs))


@op("Split", since=13)
def split_13(input, split=None, *, axis: int = 0, _n_outputs: int):  # noqa: A002
    return _split(input, axis, _split_sizes(input.shape[axis], split, None, _n_outputs))


@op("Split", since=18)
def split(input, split=None, *, axis: int = 0, num_outputs: int | None = None, _n_outputs: int):  # noqa: A002
    return _split(input, axis, _split_sizes(input.shape[axis], split, num_outputs, _n_outputs))


@op("ReverseSequence", since=10)
def reverse_sequence(input, sequence_lens, *, batch_axis: int = 1, time_axis: int = 0):  # noqa: A002
    # Each batch entry's first sequence_lens[b] steps are reversed; the rest are copied as they are.
    x = np.moveaxis(input, (batch_axis, time_axis), (0, 1))
    out = x.copy()
    for b, n in enumerate(int(v) for v in sequence_lens.reshape(-1)):
        out[b, :n] = x[b, :n][::-1]
    return (np.moveaxis(out, (0, 1), (batch_axis, time_axis)),)


@op("Expand", since=8)
def expand(input, shape):  # noqa: A002
    target = np.broadcast_shapes(input.shape, tuple(_ints(shape)))
    return (np.array(np.broadcast_to(input, target)),)


@op("Tile", since=6)
def tile(input, repeats):  # noqa: A002
    return (np.tile(input, _ints(repeats)),)


def _pad(x: np.ndarray, pads: list[int], mode: str, value, axes: list[int] | None) -> np.ndarray:
    axes = list(range(x.ndim)) if axes is None else [_axis(a, x.ndim) for a in axes]
    n = len(axes)
    begin = [0] * x.ndim
    end = [0] * x.ndim
    for i, axis in enumerate(axes):
        begin[axis], end[axis] = pads[i], pads[i + n]
    # Negative pads crop; do that first, then pad with the non-negative remainder.
    crop = tuple(slice(max(-b, 0), x.shape[a] - max(-e, 0)) for a, (b, e) in enumerate(zip(begin, end)))
    x = x[crop]
    widths = [(max(b, 0), max(e, 0)) for b, e in zip(begin, end)]
    if mode == "constant":
        return np.pad(x, widths, mode="constant", constant_values=value)
    if mode in ("reflect", "edge", "wrap"):
        return np.pad(x, widths, mode=mode)
    raise UnsupportedOpError(f"Pad mode '{mode}' (expected constant, reflect, edge or wrap)")


@op("Pad", since=2)
def pad_2(data, *, pads: list[int], mode: str = "constant", value: float = 0.0):
    return (_pad(data, pads, mode, data.dtype.type(value), None),)


@op("Pad", since=11)
def pad(data, pads, constant_value=None, axes=None, *, mode: str = "constant"):
    value = data.dtype.type(0) if constant_value is None or constant_value.size == 0 else constant_value.reshape(-1)[0]
    return (_pad(data, _ints(pads), mode, value, None if axes is None else _ints(axes)),)


@op("DepthToSpace", since=1)
def depth_to_space(input, *, blocksize: int, mode: str = "DCR"):  # noqa: A002
    n, c, h, w = input.shape
    b = blocksize
    if mode == "DCR":
        y = input.reshape(n, b, b, c // (b * b), h, w).transpose(0, 3, 4, 1, 5, 2)
    else:
        y = input.reshape(n, c // (b * b), b, b, h, w).transpose(0, 1, 4, 2, 5, 3)
    return (y.reshape(n, c // (b * b), h * b, w * b),)


@op("SpaceToDepth", since=1)
def space_to_depth(input, *, blocksize: int, mode: str = "DCR"):  # noqa: A002
    n, c, h, w = input.shape
    b = blocksize
    order = (0, 3, 5, 1, 2, 4) if mode == "DCR" else (0, 1, 3, 5, 2, 4)
    y = input.reshape(n, c, h // b, b, w // b, b).transpose(order)
    return (y.reshape(n, c * b * b, h // b, w // b),)
