"""Convolutions, normalizations and global pooling."""

from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import as_strided

from q4c.errors import UnsupportedOpError
from q4c.interp.ops.dtypes import as_int
from q4c.interp.registry import op


def _conv_pads(
    in_shape: tuple[int, ...], kernel: list[int], strides: list[int], dilations: list[int],
    pads: list[int] | None, auto_pad: str,
) -> tuple[list[int], list[int]]:
    n = len(kernel)
    if auto_pad in ("NOTSET", ""):
        pads = pads or [0] * (2 * n)
        return list(pads[:n]), list(pads[n:])
    if auto_pad == "VALID":
        return [0] * n, [0] * n
    if auto_pad not in ("SAME_UPPER", "SAME_LOWER"):
        raise UnsupportedOpError(f"auto_pad '{auto_pad}'")
    begin, end = [], []
    for size, k, s, d in zip(in_shape, kernel, strides, dilations):
        out = -(-size // s)
        total = max(0, (out - 1) * s + (k - 1) * d + 1 - size)
        small, large = total // 2, total - total // 2
        # SAME_UPPER puts the extra padding at the end, SAME_LOWER at the beginning.
        begin.append(small if auto_pad == "SAME_UPPER" else large)
        end.append(large if auto_pad == "SAME_UPPER" else small)
    return begin, end


def conv_nd(
    x: np.ndarray, w: np.ndarray, group: int, strides: list[int], dilations: list[int],
    begin: list[int], end: list[int],
) -> np.ndarray:
    """N-d grouped convolution (cross-correlation) of x [N, C, *in] with w [M, C/group, *k]."""
    n, c = x.shape[:2]
    m = w.shape[0]
    kernel = list(w.shape[2:])
    nd = len(kernel)
    if any(begin) or any(end):
        x = np.pad(x, [(0, 0), (0, 0)] + list(zip(begin, end)))
    spatial = x.shape[2:]
    out = [(spatial[i] - ((kernel[i] - 1) * dilations[i] + 1)) // strides[i] + 1 for i in range(nd)]
    cg, mg = c // group, m // group
    positions = int(np.prod(out, dtype=np.int64))
    ksize = int(np.prod(kernel, dtype=np.int64))
    if cg == 1 and mg == 1:
        return _depthwise(x, w, strides, dilations, out)
    if ksize == 1 and all(s == 1 for s in strides) and group == 1:  # pointwise: one product per image
        w2 = w.reshape(m, c)
        return np.stack([np.dot(w2, x[b].reshape(c, positions)) for b in range(n)]).reshape(n, m, *out)
    st = x.strides
    view = as_strided(
        x,
        shape=(n, c, *kernel, *out),
        strides=(st[0], st[1], *(st[2 + i] * dilations[i] for i in range(nd)),
                 *(st[2 + i] * strides[i] for i in range(nd))),
        writeable=False,
    )
    # im2col as [N, group, cg * K, P], then per image and group one 2-D product (BLAS).
    cols = view.reshape(n, group, cg * ksize, positions)
    wmat = w.reshape(group, mg, cg * ksize)
    y = np.empty((n, group, mg, positions), dtype=np.result_type(x.dtype, w.dtype))
    for b in range(n):
        for g in range(group):
            np.dot(wmat[g], cols[b, g], out=y[b, g])
    return y.reshape(n, m, *out)


def _depthwise(x: np.ndarray, w: np.ndarray, strides: list[int], dilations: list[int], out: list[int]) -> np.ndarray:
    """One filter per channel: einsum over a strided window view (no im2col copy, no BLAS)."""
    nd = len(out)
    if x.dtype.itemsize < 4 or w.dtype.itemsize < 4:  # half precision: accumulate in float32
        x, w = x.astype(np.float32), w.astype(np.float32)
    kernel = w.shape[2:]
    st = x.strides
    view = as_strided(
        x,
        shape=x.shape[:2] + tuple(out) + tuple(kernel),
        strides=st[:2] + tuple(st[2 + i] * strides[i] for i in range(nd))
        + tuple(st[2 + i] * dilations[i] for i in range(nd)),
        writeable=False,
    )
    o, k = "defg"[:nd], "pqrs"[:nd]
    return np.einsum(f"nc{o}{k},c{k}->nc{o}", view, w.reshape((w.shape[0],) + tuple(kernel)))


@op("Conv", since=1)
def conv(
    X, W, B=None, *, auto_pad: str = "NOTSET", dilations: list[int] | None = None, group: int = 1,  # noqa: N803
    kernel_shape: list[int] | None = None, pads: list[int] | None = None, strides: list[int] | None = None,
):
    nd = X.ndim - 2
    kernel = kernel_shape or list(W.shape[2:])
    dilations = dilations or [1] * nd
    strides = strides or [1] * nd
    begin, end = _conv_pads(X.shape[2:], kernel, strides, dilations, pads, auto_pad)
    y = conv_nd(X, W, group, strides, dilations, begin, end)  # a fresh array: add the bias in place
    if B is not None:
        y += B.reshape((1, -1) + (1,) * nd)
    return (y.astype(X.dtype, copy=False),)


@op("ConvInteger", since=10)
def conv_integer(
    x, w, x_zero_point=None, w_zero_point=None, *, auto_pad: str = "NOTSET", dilations: list[int] | None = None,
    group: int = 1, kernel_shape: list[int] | None = None, pads: list[int] | None = None,
    strides: list[int] | None = None,
):
    nd = x.ndim - 2
    xi = as_int(x)
    if x_zero_point is not None:
        xi = xi - as_int(x_zero_point).reshape(())
    wi = as_int(w)
    if w_zero_point is not None:
        zp = as_int(w_zero_point)
        wi = wi - (zp.reshape((-1,) + (1,) * (w.ndim - 1)) if zp.size > 1 else zp.reshape(()))
    kernel = kernel_shape or list(w.shape[2:])
    dilations = dilations or [1] * nd
    strides = strides or [1] * nd
    begin, end = _conv_pads(x.shape[2:], kernel, strides, dilations, pads, auto_pad)
    # Padding inserts zeros *after* the zero point is removed, as ONNX Runtime pads with x_zero_point.
    y = conv_nd(xi.astype(np.float64), wi.astype(np.float64), group, strides, dilations, begin, end)
    return (np.rint(y).astype(np.int32),)


@op("ConvTranspose", since=1)
def conv_transpose(
    X, W, B=None, *, auto_pad: str = "NOTSET", dilations: list[int] | None = None, group: int = 1,  # noqa: N803
    kernel_shape: list[int] | None = None, output_padding: list[int] | None = None,
    output_shape: list[int] | None = None, pads: list[int] | None = None, strides: list[int] | None = None,
):
    n, c = X.shape[:2]
    nd = X.ndim - 2
    in_sp = X.shape[2:]
    kernel = kernel_shape or list(W.shape[2:])
    dilations = dilations or [1] * nd
    strides = strides or [1] * nd
    output_padding = output_padding or [0] * nd
    mg = W.shape[1]
    m = mg * group
    cg = c // group
    # Spatial sizes before cropping: every input position scatters a dilated kernel.
    full = [(in_sp[i] - 1) * strides[i] + (kernel[i] - 1) * dilations[i] + 1 for i in range(nd)]
    if output_shape is not None or auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        target = list(output_shape[-nd:]) if output_shape is not None else [in_sp[i] * strides[i] for i in range(nd)]
        begin, end = [], []
        for i in range(nd):
            total = full[i] + output_padding[i] - target[i]
            # ConvTranspose: SAME_UPPER puts total//2 at the start; otherwise the start gets the rest.
            if auto_pad == "SAME_UPPER":
                begin.append(total // 2)
                end.append(total - total // 2)
            else:
                begin.append(total - total // 2)
                end.append(total // 2)
    elif auto_pad == "VALID" or not pads:
        begin, end = [0] * nd, [0] * nd
    else:
        begin, end = list(pads[:nd]), list(pads[nd:])
    out = [full[i] + output_padding[i] - begin[i] - end[i] for i in range(nd)]

    positions = int(np.prod(in_sp, dtype=np.int64))
    ksize = int(np.prod(kernel, dtype=np.int64))
    cols = X.reshape(n, group, cg, positions).transpose(0, 1, 3, 2)  # [n, g, P, cg]
    wmat = W.reshape(group, cg, mg * ksize)
    contrib = np.matmul(cols, wmat).reshape(n, group, *in_sp, mg, *kernel)
    # Move mg next to group: [n, g, mg, *in_sp, *kernel] -> channels m = g * mg.
    order = [0, 1, 2 + nd, *range(2, 2 + nd), *range(3 + nd, 3 + 2 * nd)]
    contrib = contrib.transpose(order).reshape(n, m, *in_sp, *kernel)
    ext = [max(full[i] + output_padding[i], begin[i] + out[i]) for i in range(nd)]
    y = np.zeros((n, m, *ext), dtype=X.dtype)
    for offsets in np.ndindex(*kernel):
        index = (slice(None), slice(None)) + tuple(
            slice(offsets[i] * dilations[i], offsets[i] * dilations[i] + (in_sp[i] - 1) * strides[i] + 1, strides[i])
            for i in range(nd)
        )
        y[index] += contrib[(Ellipsis,) + offsets]
    crop = (slice(None), slice(None)) + tuple(slice(begin[i], begin[i] + out[i]) for i in range(nd))
    y = y[crop]
    if B is not None:
        y = y + B.reshape((1, -1) + (1,) * nd)
    return (np.ascontiguousarray(y, dtype=X.dtype),)


@op("BatchNormalization", since=7)
def batch_normalization(
    X, scale, B, input_mean, input_var, *, epsilon: float = 1e-5, momentum: float = 0.9,  # noqa: N803
    spatial: int = 1, training_mode: int = 0,
):
    shape = (1, -1) + (1,) * (X.ndim - 2)
    if training_mode:
        axes = (0,) + tuple(range(2, X.ndim))
        mean = X.mean(axis=axes, dtype=X.dtype)
        var = X.var(axis=axes, dtype=X.dtype)
        inv = 1 / np.sqrt(var.reshape(shape) + X.dtype.type(epsilon))
        y = (X - mean.reshape(shape)) * inv * scale.reshape(shape) + B.reshape(shape)
        mom = input_mean.dtype.type(momentum)
        running_mean = input_mean * mom + mean * (1 - mom)
        running_var = input_var * mom + var * (1 - mom)
        return y.astype(X.dtype, copy=False), running_mean, running_var
    if not spatial:
        raise UnsupportedOpError("BatchNormalization with spatial=0")
    inv = scale / np.sqrt(input_var + input_var.dtype.type(epsilon))
    y = X * inv.reshape(shape).astype(X.dtype) + (B - input_mean * inv).reshape(shape).astype(X.dtype)
    return (y,)


@op("InstanceNormalization", since=6)
def instance_normalization(input, scale, B, *, epsilon: float = 1e-5):  # noqa: A002, N803
    axes = tuple(range(2, input.ndim))
    mean = input.mean(axis=axes, keepdims=True, dtype=input.dtype)
    var = input.var(axis=axes, keepdims=True, dtype=input.dtype)
    shape = (1, -1) + (1,) * (input.ndim - 2)
    y = (input - mean) / np.sqrt(var + input.dtype.type(epsilon))
    return ((y * scale.reshape(shape) + B.reshape(shape)).astype(input.dtype, copy=False),)


@op("LayerNormalization", since=17)
def layer_normalization(X, Scale, B=None, *, axis: int = -1, epsilon: float = 1e-5, stash_type: int = 1):  # noqa: N803
    axis = axis + X.ndim if axis < 0 else axis
    axes = tuple(range(axis, X.ndim))
    # stash_type=1: mean and variance in float32 whatever X's type.
    x = X.astype(np.float32, copy=False) if stash_type == 1 else X
    inv_n = x.dtype.type(1.0 / max(int(np.prod(X.shape[axis:], dtype=np.int64)), 1))
    mean = np.add.reduce(x, axis=axes, keepdims=True, dtype=x.dtype)
    mean *= inv_n
    centered = x - mean
    var = np.add.reduce(np.square(centered), axis=axes, keepdims=True, dtype=x.dtype)
    var *= inv_n
    var += x.dtype.type(epsilon)
    inv_std = np.sqrt(var)
    np.reciprocal(inv_std, out=inv_std)
    centered *= inv_std
    y = centered.astype(X.dtype, copy=False)
    y *= Scale
    if B is not None:
        y += B
    return y, mean, inv_std


@op("RMSNormalization", since=23)
def rms_normalization(X, scale, *, axis: int = -1, epsilon: float = 1e-5, stash_type: int = 1):  # noqa: N803
    axis = axis + X.ndim if axis < 0 else axis
    x = X.astype(np.float32) if stash_type == 1 else X
    ms = np.mean(np.square(x), axis=tuple(range(axis, X.ndim)), keepdims=True, dtype=x.dtype)
    y = (x / np.sqrt(ms + x.dtype.type(epsilon))).astype(X.dtype, copy=False) * scale
    return (y.astype(X.dtype, copy=False),)


@op("GroupNormalization", since=21)
def group_normalization(X, scale, bias, *, epsilon: float = 1e-5, num_groups: int, stash_type: int = 1):  # noqa: N803
    n, c = X.shape[:2]
    x = (X.astype(np.float32) if stash_type == 1 else X).reshape(n, num_groups, -1)
    mean = x.mean(axis=2, keepdims=True, dtype=x.dtype)
    var = x.var(axis=2, keepdims=True, dtype=x.dtype)
    y = ((x - mean) / np.sqrt(var + x.dtype.type(epsilon))).reshape(X.shape).astype(X.dtype, copy=False)
    shape = (1, c) + (1,) * (X.ndim - 2)
    return ((y * scale.reshape(shape) + bias.reshape(shape)).astype(X.dtype, copy=False),)


@op("LpNormalization", since=1)
def lp_normalization(input, *, axis: int = -1, p: int = 2):  # noqa: A002
    if p == 1:
        norm = np.sum(np.abs(input), axis=axis, keepdims=True)
    else:
        norm = np.sqrt(np.sum(np.square(input), axis=axis, keepdims=True))
    with np.errstate(invalid="ignore", divide="ignore"):
        y = np.where(norm == 0, 0, input / norm)
    return (y.astype(input.dtype, copy=False),)


@op("GlobalAveragePool", since=1)
def global_average_pool(X):  # noqa: N803
    return (np.mean(X, axis=tuple(range(2, X.ndim)), keepdims=True, dtype=X.dtype),)


@op("GlobalMaxPool", since=1)
def global_max_pool(X):  # noqa: N803
    return (np.max(X, axis=tuple(range(2, X.ndim)), keepdims=True),)
