"""Pooling: MaxPool (with Indices), AveragePool and LpPool over strided windows."""

from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import as_strided

from q4c.errors import UnsupportedOpError
from q4c.interp.registry import op


class _Windows:
    """Output size, padding and window views of one pooling node (MaxPool-22 shape rules)."""

    def __init__(self, shape, kernel, strides, dilations, pads, auto_pad, ceil_mode) -> None:
        nd = len(kernel)
        self.kernel = list(kernel)
        self.strides = strides or [1] * nd
        self.dilations = dilations or [1] * nd
        self.in_sp = list(shape[2:])
        span = [(k - 1) * d + 1 for k, d in zip(self.kernel, self.dilations)]
        if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
            self.out = [-(-n // s) for n, s in zip(self.in_sp, self.strides)]
            total = [max(0, (o - 1) * s + e - n) for o, s, e, n in zip(self.out, self.strides, span, self.in_sp)]
            small = [t // 2 for t in total]
            self.begin = small if auto_pad == "SAME_UPPER" else [t - h for t, h in zip(total, small)]
            self.end = [t - b for t, b in zip(total, self.begin)]
        elif auto_pad in ("VALID", "NOTSET", ""):
            explicit = pads if (pads and auto_pad != "VALID") else [0] * (2 * nd)
            self.begin, self.end = list(explicit[:nd]), list(explicit[nd:])
            self.out = []
            for i in range(nd):
                room = self.in_sp[i] + self.begin[i] + self.end[i] - span[i]
                n = (-(-room // self.strides[i]) if ceil_mode else room // self.strides[i]) + 1
                if ceil_mode and (n - 1) * self.strides[i] >= self.in_sp[i] + self.begin[i]:
                    n -= 1  # a window starting in the right padding is dropped
                self.out.append(n)
        else:
            raise UnsupportedOpError(f"auto_pad '{auto_pad}'")
        # ceil_mode may need cells past the declared end padding; they never count as input.
        self.extra = [max(0, (o - 1) * s + e - (n + b + p))
                      for o, s, e, n, b, p in zip(self.out, self.strides, span, self.in_sp, self.begin, self.end)]

    def padded(self, x: np.ndarray, value) -> np.ndarray:
        widths = [(0, 0), (0, 0)] + [(b, e + x_) for b, e, x_ in zip(self.begin, self.end, self.extra)]
        return np.pad(x, widths, constant_values=value) if any(any(w) for w in widths) else x

    def view(self, xp: np.ndarray) -> np.ndarray:
        """[N, C, *out, *kernel] windows of the padded input."""
        nd = len(self.kernel)
        st = xp.strides
        return as_strided(
            xp, shape=xp.shape[:2] + tuple(self.out) + tuple(self.kernel),
            strides=st[:2] + tuple(st[2 + i] * self.strides[i] for i in range(nd))
            + tuple(st[2 + i] * self.dilations[i] for i in range(nd)),
            writeable=False,
        )

    def kernel_axes(self) -> tuple[int, ...]:
        nd = len(self.kernel)
        return tuple(range(2 + nd, 2 + 2 * nd))


@op("MaxPool", since=1)
def max_pool(
    X, *, auto_pad: str = "NOTSET", ceil_mode: int = 0, dilations: list[int] | None = None,  # noqa: N803
    kernel_shape: list[int], pads: list[int] | None = None, storage_order: int = 0,
    strides: list[int] | None = None,
):
    w = _Windows(X.shape, kernel_shape, strides, dilations, pads, auto_pad, ceil_mode)
    low = -np.inf if X.dtype.kind == "f" else np.iinfo(X.dtype).min
    windows = w.view(w.padded(X, low))
    nd = len(kernel_shape)
    flat = windows.reshape(windows.shape[:2 + nd] + (-1,))
    y = flat.max(axis=-1)
    # Indices: the argmax's position in the unpadded input, flattened over (N, C, *spatial).
    arg = flat.argmax(axis=-1)
    offsets = np.unravel_index(arg, kernel_shape)
    grids = np.meshgrid(*[np.arange(o) for o in w.out], indexing="ij")
    coords = [grids[i] * w.strides[i] - w.begin[i] + offsets[i] * w.dilations[i] for i in range(nd)]
    n, c = X.shape[:2]
    spatial = w.in_sp
    if storage_order:  # column-major numbering of the spatial position
        inner = np.zeros_like(coords[0])
        for i in reversed(range(nd)):
            inner = inner * spatial[i] + coords[i]
    else:
        inner = np.zeros_like(coords[0])
        for i in range(nd):
            inner = inner * spatial[i] + coords[i]
    base = (np.arange(n).reshape(-1, 1) * c + np.arange(c).reshape(1, -1)) * int(np.prod(spatial))
    indices = base.reshape((n, c) + (1,) * nd) + inner
    return y, indices.astype(np.int64)


@op("AveragePool", since=7)
def average_pool(
    X, *, auto_pad: str = "NOTSET", ceil_mode: int = 0, count_include_pad: int = 0,  # noqa: N803
    dilations: list[int] | None = None, kernel_shape: list[int], pads: list[int] | None = None,
    strides: list[int] | None = None,
):
    w = _Windows(X.shape, kernel_shape, strides, dilations, pads, auto_pad, ceil_mode)
    axes = w.kernel_axes()
    total = w.view(w.padded(X, 0)).sum(axis=axes, dtype=X.dtype)
    # Divisor: the window's input cells, plus its declared padding when count_include_pad=1;
    # the extra cells ceil_mode reaches past the padding never count.
    ones = np.ones((1, 1) + tuple(w.in_sp), dtype=X.dtype)
    if count_include_pad:
        region = np.pad(ones, [(0, 0), (0, 0)] + list(zip(w.begin, w.end)), constant_values=1)
        region = np.pad(region, [(0, 0), (0, 0)] + [(0, e) for e in w.extra])
    else:
        region = w.padded(ones, 0)
    count = w.view(region).sum(axis=axes, dtype=X.dtype)
    return ((total / count).astype(X.dtype, copy=False),)


@op("LpPool", since=11)
def lp_pool(
    X, *, auto_pad: str = "NOTSET", ceil_mode: int = 0, dilations: list[int] | None = None,  # noqa: N803
    kernel_shape: list[int], p: int = 2, pads: list[int] | None = None, strides: list[int] | None = None,
):
    w = _Windows(X.shape, kernel_shape, strides, dilations, pads, auto_pad, ceil_mode)
    powered = w.view(w.padded(np.abs(X) ** p, 0)).sum(axis=w.kernel_axes(), dtype=X.dtype)
    return ((powered ** (1.0 / p)).astype(X.dtype, copy=False),)
