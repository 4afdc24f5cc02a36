"""GPTQ rounding for Conv weights: the layer's inputs are the patches each output position reads.

A Conv with group 1 is a matrix product per output position: y[o, p] = W[o, :] . patch_p, with
W reshaped to [C_out, C_in x kernel] and patch_p the C_in x kernel input values position p
multiplies (im2col, zero padding included). So GPTQ applies unchanged with H = E[patch patch^T]
(q4c.quant.conv_patches). Scales keep q4c's Conv layouts (weights.conv_block_layout): blocks along C_in
or along a kernel axis, or one scale per output channel. GPTQ runs over the columns with the
block axis innermost, so each block is a contiguous column range (`gptq_conv`).

Measured on silero_vad_16k_op15 (benchmarks/bench_quantizers.py, BENCHMARKS.md "quantizers"):
one encoder Conv at 4 bits per channel flips 0.44-0.77 % of the streaming decisions with GPTQ
rounding against 0.89-1.47 % with nearest rounding.
"""

from __future__ import annotations

import math

import numpy as np

from q4c.errors import ConfigError
from q4c.quant.gptq import gptq_ranges
from q4c.quant.qparams import QuantizedWeight


def gptq_conv(w: np.ndarray, hessian: np.ndarray, bits: int, *, kind: str, axis: int, block_size: int,
              clip_ratios: tuple[float, ...], scale_dtype: type) -> QuantizedWeight:
    """GPTQ-round a Conv weight w [O, C, *kernel] against `hessian` (conv_patches' order) with
    q4c's scale layout: `kind` "channel" (axis 0) or "block" (`block_size` along `axis` >= 1)."""
    w = np.asarray(w, dtype=np.float32)
    out, cols = w.shape[0], math.prod(w.shape[1:])
    if kind == "channel":
        codes, scales = gptq_ranges(w.reshape(out, cols), hessian, bits, [(0, cols)], cols, clip_ratios, scale_dtype)
        return QuantizedWeight(codes.reshape(w.shape), scales.reshape(-1), bits, 0, 0)
    if kind != "block" or not 1 <= axis < w.ndim:
        raise ConfigError(f"gptq on a Conv weight needs per-channel or block-wise scales, not {kind} along axis {axis}")
    perm = [0, *(d for d in range(1, w.ndim) if d != axis), axis]  # the block axis innermost
    order = np.arange(cols).reshape(w.shape[1:]).transpose([p - 1 for p in perm[1:]]).reshape(-1)
    moved = np.transpose(w, perm)
    n = w.shape[axis]
    nb = -(-n // block_size)
    ranges = [(o * n + lo, o * n + min(lo + block_size, n)) for o in range(cols // n) for lo in range(0, n, block_size)]
    codes, scales = gptq_ranges(moved.reshape(out, cols), np.asarray(hessian)[np.ix_(order, order)], bits, ranges,
                                block_size, clip_ratios, scale_dtype)
    inverse = np.argsort(perm)
    q = np.transpose(codes.reshape(moved.shape), inverse)
    scale = np.transpose(scales.reshape(moved.shape[:-1] + (nb,)), inverse)
    return QuantizedWeight(np.ascontiguousarray(q), np.ascontiguousarray(scale), bits, axis, block_size)
