"""Fitting codebooks (q4c.quant.codebook): mu-law companding, 1-D k-means, NormalFloat levels,
block absmax scales and GPTQ-style index assignment against input Hessians."""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable

import numpy as np

from q4c.errors import ConfigError
from q4c.quant.gptq import error_spread

#: Lloyd iterations of k-means (1-D converges in a few dozen from quantile starts).
KMEANS_ITERS = 40
#: Columns per lazy GPTQ update batch (codebooks without block scales).
LAZY = 64


# -- companding and k-means -------------------------------------------------------------------

def mulaw_compress(x: np.ndarray, mu: float) -> np.ndarray:
    """y = sign(x) ln(1 + mu |x|) / ln(1 + mu), for x in [-1, 1]."""
    x = np.asarray(x, dtype=np.float64)
    return np.sign(x) * np.log1p(mu * np.abs(x)) / math.log1p(mu)


def mulaw_expand(y: np.ndarray, mu: float) -> np.ndarray:
    """Inverse of `mulaw_compress`: x = sign(y) ((1 + mu)^|y| - 1) / mu."""
    y = np.asarray(y, dtype=np.float64)
    return np.sign(y) * np.expm1(np.abs(y) * math.log1p(mu)) / mu


def kmeans_1d(x: np.ndarray, k: int, iters: int = KMEANS_ITERS) -> tuple[np.ndarray, np.ndarray]:
    """Lloyd's k-means of each row of x [rows, n] into k sorted centroids.

    Starts from the row's quantiles at (i + 0.5) / k; a centroid left without members keeps its
    place. In 1-D the clusters are runs of the sorted row, so each iteration finds the run
    boundaries (binary search for the midpoints between centroids) and takes the means from
    prefix sums: O(k log n) per row instead of O(k n).
    Returns (centroids [rows, k] float64, codes [rows, n] uint8 of the nearest centroid)."""
    x = np.asarray(x, dtype=np.float64)
    rows, n = x.shape
    xs = np.sort(x, axis=1)
    csum = np.concatenate([np.zeros((rows, 1)), np.cumsum(xs, axis=1)], axis=1)  # [rows, n + 1]
    c = np.quantile(xs, (np.arange(k) + 0.5) / k, axis=1).T.copy()  # [rows, k]
    # All rows in one sorted array: row r's values shifted into [r * stride, r * stride + span].
    lo = xs[:, :1]
    stride = float(np.max(xs[:, -1] - xs[:, 0])) * 2 + 1.0
    shift = np.arange(rows, dtype=np.float64)[:, None] * stride - lo
    flat = (xs + shift).ravel()
    first = np.arange(rows)[:, None] * n
    for _ in range(iters):
        mids = (c[:, 1:] + c[:, :-1]) / 2
        inner = np.searchsorted(flat, (mids + shift).ravel(), side="right").reshape(rows, k - 1) - first
        bounds = np.concatenate([np.zeros((rows, 1), np.int64), np.clip(inner, 0, n), np.full((rows, 1), n)], axis=1)
        counts = np.diff(bounds, axis=1)
        sums = np.take_along_axis(csum, bounds[:, 1:], 1) - np.take_along_axis(csum, bounds[:, :-1], 1)
        new = np.sort(np.where(counts > 0, sums / np.maximum(counts, 1), c), axis=1)
        if np.allclose(new, c, rtol=0, atol=1e-12):
            c = new
            break
        c = new
    return c, nearest(x, c)


def nearest(x: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """Index of the nearest of each row's sorted centroids [rows, k] for x [rows, n] (ties go
    to the lower centroid)."""
    mids = (centroids[:, 1:] + centroids[:, :-1]) / 2  # [rows, k-1]
    codes = np.zeros(x.shape, np.uint8)
    for j in range(mids.shape[1]):
        codes += (x > mids[:, j : j + 1]).astype(np.uint8)
    return codes


def kmeans_mulaw(x: np.ndarray, k: int, mu: float) -> np.ndarray:
    """Centroids (linear space, [rows, k] sorted) of k-means run on each row's mu-law-companded
    values, the row normalized by its largest magnitude."""
    x = np.asarray(x, dtype=np.float64)
    peak = np.max(np.abs(x), axis=1, keepdims=True)
    peak = np.where(peak > 0, peak, 1.0)
    cy, _ = kmeans_1d(mulaw_compress(x / peak, mu), k)
    return mulaw_expand(cy, mu) * peak


def nf_levels(bits: int) -> np.ndarray:
    """NormalFloat levels in [-1, 1]: 2^(b-1) positive and 2^(b-1) - 1 negative normal quantiles
    plus an exact zero (QLoRA's construction; bits=4 gives NF4)."""
    if bits not in (2, 3, 4):
        raise ConfigError(f"the nf4 scheme stores 2-4 bit indices, not {bits}")
    offset = 0.5 * (1 / 32 + 1 / 30)  # QLoRA: the mean of 1 - 1/(2*15) and 1 - 1/(2*16), mirrored
    top = 1 - offset
    normal = statistics.NormalDist()
    half = 2 ** (bits - 1)
    pos = [normal.inv_cdf(p) for p in np.linspace(top, 0.5, half + 1)[:-1]]
    neg = [-normal.inv_cdf(p) for p in np.linspace(top, 0.5, half)[:-1]]
    levels = np.sort(np.array(pos + [0.0] + neg))
    return levels / np.max(np.abs(levels))



def absmax_scales(padded: np.ndarray, block: int) -> np.ndarray:
    c, l_, rp = padded.shape
    peak = np.max(np.abs(padded.reshape(c, l_, rp // block, block)), axis=3)
    tiny = float(np.finfo(np.float16).smallest_normal)
    return np.maximum(peak, tiny).astype(np.float16)


def gptq_assign(moved: np.ndarray, r: int, hessians: list[np.ndarray],
                tables: Callable[[int, np.ndarray], np.ndarray], *,
                 block: int) -> tuple[np.ndarray, np.ndarray | None]:
    """Codes [C, L, Rp] by GPTQ's column loop over each L slice [C, R]: the nearest of the row's
    centroids (times the block's scale when `block`), the error spread to later columns by the
    upper Cholesky factor of H^-1. With `block`, each block's absmax scale is taken from the
    already-updated weights when the loop reaches it. Returns (codes, scales or None)."""
    c, l_, rp = moved.shape
    if len(hessians) not in (1, l_):
        raise ValueError(f"{len(hessians)} Hessians for a weight with {l_} slices")
    codes = np.zeros((c, l_, rp), np.uint8)
    scales = np.zeros((c, l_, rp // block), np.float16) if block else None
    for i in range(l_):
        w = np.array(moved[:, i, :r], dtype=np.float64)
        u = error_spread(hessians[i if len(hessians) > 1 else 0], w)
        s = np.ones(c)
        rows = np.arange(c)
        # Columns in batches of LAZY: inside a batch each column's error updates the batch's later
        # columns; the rest of the row gets the whole batch's errors in one product (GPTQ's lazy
        # batch update: the same arithmetic, far less memory traffic). nf4 blocks start batches.
        step = block or LAZY
        for b0 in range(0, r, step):
            b1 = min(b0 + step, r)
            if block:
                seg = np.zeros((c, 1, block))
                seg[:, 0, : b1 - b0] = w[:, b0:b1]
                sc = absmax_scales(seg, block)[:, 0, 0]
                scales[:, i, b0 // block] = sc
                s = sc.astype(np.float64)
            levels = tables(b0, s) * (s[:, None] if block else 1.0)  # [C, K] sorted
            errs = np.zeros((c, b1 - b0))
            for j in range(b0, b1):
                q = np.argmin(np.abs(w[:, j : j + 1] - levels), axis=1)
                codes[:, i, j] = q
                err = (w[:, j] - levels[rows, q]) / u[j, j]
                errs[:, j - b0] = err
                w[:, j + 1 : b1] -= np.outer(err, u[j, j + 1 : b1])
            w[:, b1:] -= errs @ u[b0:b1, b1:]
        if block:
            zero = int(np.argmin(np.abs(tables(0, np.ones(c))[0])))  # pad positions decode to 0
            codes[:, i, r:] = zero
    return codes, scales


