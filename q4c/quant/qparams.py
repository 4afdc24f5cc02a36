"""Symmetric weight quantization with MSE-chosen clipping, per tensor, channel or block."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

#: Clipping ratios tried per scale group; the one with the least squared error wins.
CLIP_RATIOS = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.65, 0.6, 0.55, 0.5)


@dataclass(frozen=True)
class QuantizedWeight:
    """Integer codes plus the scales that DequantizeLinear (opset 21) needs.

    `q` has the weight's shape (int8 holding values in [qmin, qmax]); `scale` is scalar
    (per tensor), 1-D along `axis` (per channel), or the weight's shape with `axis` divided
    into ceil(n / block_size) blocks (block-wise, `block_size` > 0).
    """

    q: np.ndarray
    scale: np.ndarray
    bits: int
    axis: int
    block_size: int

    def _expand(self, param: np.ndarray) -> np.ndarray:
        if self.block_size:
            param = np.repeat(param, self.block_size, axis=self.axis)
            return np.take(param, np.arange(self.q.shape[self.axis]), axis=self.axis)
        if param.ndim == 1:
            shape = [1] * self.q.ndim
            shape[self.axis] = -1
            return param.reshape(shape)
        return param

    def dequantize(self) -> np.ndarray:
        return (self.q.astype(np.float32) * self._expand(self.scale).astype(np.float32)).astype(np.float32)


def qrange(bits: int) -> tuple[int, int]:
    return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1


def quantize(
    w: np.ndarray,
    bits: int,
    *,
    granularity: str,
    axis: int,
    block_size: int = 0,
    clip_ratios: tuple[float, ...] = CLIP_RATIOS,
    scale_dtype: type = np.float32,
) -> QuantizedWeight:
    """Quantize `w` symmetrically to `bits`.

    Args:
        granularity: "tensor", "channel" (one scale per index of `axis`), or "block" (blocks of
            `block_size` consecutive elements along `axis`, one scale each).
        axis: the channel axis for "channel", the reduction axis for "block".
        scale_dtype: how scales are stored (float16 halves their bytes); codes are computed
            against the stored, rounded scale so DequantizeLinear reproduces them exactly.
    """
    w = np.asarray(w, dtype=np.float32)
    axis = axis % w.ndim if w.ndim else 0
    if granularity == "block":
        n = w.shape[axis]
        nb = -(-n // block_size)
        moved = np.moveaxis(w, axis, -1)
        padded = np.zeros(moved.shape[:-1] + (nb * block_size,), np.float32)
        padded[..., :n] = moved
        groups = padded.reshape(-1, block_size)
        q, scale = _quantize_groups(groups, bits, clip_ratios, scale_dtype)
        q = np.moveaxis(q.reshape(padded.shape)[..., :n], -1, axis)
        scale = np.moveaxis(scale.reshape(moved.shape[:-1] + (nb,)), -1, axis)
        return QuantizedWeight(np.ascontiguousarray(q), np.ascontiguousarray(scale), bits, axis, block_size)
    if granularity == "channel":
        moved = np.moveaxis(w, axis, 0)
        q, scale = _quantize_groups(moved.reshape(moved.shape[0], -1), bits, clip_ratios, scale_dtype)
        q = np.moveaxis(q.reshape(moved.shape), 0, axis)
        return QuantizedWeight(np.ascontiguousarray(q), scale.reshape(-1), bits, axis, 0)
    if granularity == "tensor":
        q, scale = _quantize_groups(w.reshape(1, -1), bits, clip_ratios, scale_dtype)
        return QuantizedWeight(q.reshape(w.shape), scale.reshape(()), bits, 0, 0)
    raise ValueError(f"unknown granularity {granularity!r}")


def _quantize_groups(groups: np.ndarray, bits: int, clip_ratios: tuple[float, ...],
                     scale_dtype: type) -> tuple[np.ndarray, np.ndarray]:
    """Per row of `groups`: the scale minimizing squared error, its codes and the scale (in
    `scale_dtype`).

    Two families of scales are tried at every clipping ratio r: r * amax / qmax (codes within
    [-qmax, qmax]) and the signed -r * m / 2^(bits-1), m the largest-magnitude value, which maps
    m onto the otherwise unused code -2^(bits-1): 16 levels instead of 15 at 4 bits, so the
    largest weight of each group is kept exactly at r = 1.
    """
    qmin, qmax = qrange(bits)
    tiny = np.float32(np.finfo(scale_dtype).smallest_normal)
    peak = groups[np.arange(groups.shape[0]), np.argmax(np.abs(groups), axis=1)]
    peak = np.where(peak != 0, peak, 1.0).astype(np.float32)
    best_err = np.full(groups.shape[0], np.inf, np.float32)
    best_scale = np.ones(groups.shape[0], np.float32)
    for ratio in clip_ratios:
        for scale in (np.abs(peak) * np.float32(ratio / qmax), -peak * np.float32(ratio / -qmin)):
            magnitude = np.maximum(np.abs(scale), tiny)
            scale = (np.sign(scale) * magnitude).astype(scale_dtype).astype(np.float32)
            q = np.clip(np.rint(groups / scale[:, None]), qmin, qmax)
            err = np.sum(np.square(q * scale[:, None] - groups), axis=1)
            better = err < best_err
            best_err = np.where(better, err, best_err)
            best_scale = np.where(better, scale, best_scale)
    q = np.clip(np.rint(groups / best_scale[:, None]), qmin, qmax).astype(np.int8)
    return q, best_scale.astype(scale_dtype)
