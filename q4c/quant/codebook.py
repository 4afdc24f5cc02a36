"""Non-uniform weight codebooks: each weight is an index into a small table of centroids.

Three schemes, chosen per tensor beside the uniform ones:

- ``kmeans``: centroids by 1-D k-means (Lloyd) of the weights, one table per group of output
  channels.
- ``mulaw``: the same k-means run in mu-law-companded space, y = sign(x) ln(1 + mu|x|) / ln(1 + mu)
  of the weights over their group's largest magnitude (the "General Quantizer": companding spends
  the centroids where heavy-tailed weights are dense, near zero, while keeping the tails);
  mu is taken from `MU_CHOICES` by least weight error.
- ``nf4`` (NF-k at other widths): fixed normal-quantile levels (QLoRA's NormalFloat) times a
  float16 absmax scale per block of `NF_BLOCK` weights along the reduction axis.

Where the layer has calibration inputs (a Hessian H = E[x x^T] per weight, q4c.quant.gptq),
indices are assigned GPTQ-style: column by column along the reduction axis, each column's error
pushed onto the columns not yet assigned; centroids stay as fitted.

Stored form (`emit_decoder`): the indices as one packed uint8 bitstream (`pack_indices`: eight
b-bit indices in b bytes, 1-4 bits, so 3-bit indices cost 3 bits), the float16 tables and scales.
A chain of standard ONNX ops (Reshape, Cast, Mul, ReduceSum, Div, Mod, Slice, Add, Gather, Cast,
Mul, Transpose) rebuilds the float weight from initializers only, so ONNX Runtime constant-folds
it at session load: a small file, FP32 speed. Its constant-only nodes carry the closed-form
generator prefix, so q4c's fold-constants never folds them back into a float weight.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs
from onnx import TensorProto

from q4c import graph as g
from q4c.config import CODEBOOK_BITS, CODEBOOK_SCHEMES
from q4c.errors import ConfigError
from q4c.quant.closed_form import GENERATOR_PREFIX

#: mu values mulaw tries per tensor (k-means in each companded space; least weight error wins).
MU_CHOICES = (8.0, 32.0, 128.0, 255.0)
#: Weights per absmax scale of the nf scheme (bitsandbytes' default block).
NF_BLOCK = 64
#: Table bytes per weight the automatic grouping allows: channels share a table until the
#: float16 centroids cost at most this many bits per weight (a quarter of uniform's scales).
TABLE_OVERHEAD_BITS = 0.25
#: Lloyd iterations of k-means (1-D converges in a few dozen from quantile starts).
KMEANS_ITERS = 40
#: Node-name prefix of decoder nodes: the closed-form generator prefix (fold-constants leaves
#: them alone) plus a tag that `q4c inspect` recognises.
DECODER_PREFIX = f"{GENERATOR_PREFIX}cb/"
#: Bytes of a decoder besides its indices, tables and scales (its ~15 nodes and small shape
#: constants; measured 1.1-1.4 KB, the weight's name stored twice included), counted in every
#: codebook candidate's cost.
DECODER_BYTES = 1200
#: Columns per lazy GPTQ update batch (codebooks without block scales).
LAZY = 64
#: Dampening of H's diagonal for GPTQ assignment, relative to its mean (as q4c.quant.gptq).
DAMP = 0.01


def is_codebook(scheme: str) -> bool:
    return scheme in CODEBOOK_SCHEMES


def scheme_bits(scheme: str) -> tuple[int, ...]:
    """Index widths a codebook scheme supports (1 = binary): NF needs a zero and both signs."""
    return (2, 3, 4) if scheme == "nf4" else CODEBOOK_BITS


def supports(scheme: str, bits: int) -> bool:
    """Whether `scheme` quantizes to `bits`: codebooks 1-4 (nf4 2-4), uniform schemes 2/3/4/8
    (gptq only below 8 bits, where it pays)."""
    if is_codebook(scheme):
        return bits in scheme_bits(scheme)
    return bits in (2, 3, 4, 8) and not (scheme == "gptq" and bits > 4)


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


# -- the quantized form -----------------------------------------------------------------------

@dataclass(frozen=True)
class CodebookWeight:
    """A weight as indices into float16 tables (times float16 block scales for nf4).

    The weight is handled in a moved layout [C, L, R]: C output channels (`channel_axis`), L the
    product of any other axes (LSTM directions), R the reduction axis (`reduce_axis`), padded to
    a multiple of `block_size` for nf4. `perm` takes the weight's axes to that order.
    `codes` [C, L, Rp] uint8; `table` [T, 2^bits] float16, channels c*T//C .. share table c*T//C
    (T divides C); `scale` [C, L, Rp / block_size] float16 or None.
    """

    codes: np.ndarray
    table: np.ndarray
    scale: np.ndarray | None
    bits: int
    shape: tuple[int, ...]
    perm: tuple[int, ...]
    block_size: int
    scheme: str
    mu: float = 0.0

    @property
    def moved_shape(self) -> tuple[int, ...]:
        return tuple(self.shape[a] for a in self.perm)

    @property
    def reduce_len(self) -> int:
        return int(self.shape[self.perm[-1]])

    def values(self) -> np.ndarray:
        """[C, L, Rp] float32, exactly as the decoder computes it (float16 tables and scales
        widened to float32, one float32 product)."""
        c = self.codes.shape[0]
        t = self.table.shape[0]
        tables = np.repeat(self.table.astype(np.float32), c // t, axis=0)  # [C, K]
        out = np.take_along_axis(tables[:, None, :], self.codes.reshape(c, 1, -1).astype(np.int64), axis=2)
        out = out.reshape(self.codes.shape)
        if self.scale is not None:
            s = np.repeat(self.scale.astype(np.float32), self.block_size, axis=2)
            out = (out * s).astype(np.float32)
        return out

    def dequantize(self) -> np.ndarray:
        moved = self.values()[:, :, : self.reduce_len].reshape(self.moved_shape)
        return np.ascontiguousarray(np.transpose(moved, np.argsort(self.perm))).astype(np.float32)

    @property
    def index_bytes(self) -> int:
        return packed_bytes(self.codes.size, self.bits)

    @property
    def table_bytes(self) -> int:
        return int(self.table.nbytes)

    @property
    def scale_bytes(self) -> int:
        return 0 if self.scale is None else int(self.scale.nbytes)

    @property
    def nbytes(self) -> int:
        return self.index_bytes + self.table_bytes + self.scale_bytes

    @property
    def granularity(self) -> str:
        if self.scale is not None:
            return f"block:{self.block_size}"
        return granularity_text(self.codes.shape[0], self.table.shape[0])


def granularity_text(channels: int, tables: int) -> str:
    if tables == 1:
        return "tensor"
    if tables == channels:
        return "channel"
    return f"channels:{channels // tables}"


def moved_layout(shape: tuple[int, ...], channel_axis: int, reduce_axis: int) -> tuple[tuple[int, ...], int, int, int]:
    """(perm, C, L, R): axes as [channel, others..., reduce] and their sizes."""
    nd = len(shape)
    channel_axis %= nd
    reduce_axis %= nd
    others = [a for a in range(nd) if a not in (channel_axis, reduce_axis)]
    perm = (channel_axis, *others, reduce_axis)
    return perm, int(shape[channel_axis]), int(math.prod(shape[a] for a in others)), int(shape[reduce_axis])


def channels_per_table(channels: int, per_channel: int, bits: int) -> int:
    """Smallest divisor g of `channels` such that one float16 table of 2^bits centroids per g
    channels costs at most TABLE_OVERHEAD_BITS per weight."""
    table_bits = 16 * 2**bits
    for d in range(1, channels + 1):
        if channels % d == 0 and table_bits <= TABLE_OVERHEAD_BITS * d * per_channel:
            return d
    return channels


def parse_granularity(text: str, scheme: str, channels: int, per_channel: int, bits: int) -> int:
    """Channels per table (mulaw/kmeans) or the block size (nf4) a plan's granularity names:
    'tensor', 'channel', 'channels:G', 'block:N' (nf4); anything else means automatic."""
    text = (text or "").strip()
    if scheme == "nf4":
        if text.startswith("block:") and text[6:].isdigit() and int(text[6:]) > 0:
            return int(text[6:])
        return NF_BLOCK
    if text == "tensor":
        return channels
    if text == "channel":
        return 1
    if text.startswith("channels:") and text[9:].isdigit():
        g_ = int(text[9:])
        if g_ < 1 or channels % g_:
            raise ConfigError(f"codebook granularity {text}: {g_} does not divide the {channels} output channels")
        return g_
    return channels_per_table(channels, per_channel, bits)


def validate_granularity(text: str) -> None:
    ok = text in ("tensor", "channel", "auto", "block:auto") or (text.startswith(("channels:", "block:")) and text.split(":")[1].isdigit())
    if not ok:
        raise ConfigError(f"codebook granularity must be tensor, channel, channels:G or block:N, not {text!r}")


def codebook_cost(shape: tuple[int, ...], bits: int, scheme: str, *, channel_axis: int, reduce_axis: int,
                  granularity: str = "auto") -> tuple[int, str]:
    """(bytes as stored: packed indices + float16 tables + scales + the decoder's nodes
    (DECODER_BYTES), granularity) of `quantize_codebook` with these arguments, without fitting."""
    _, c, l_, r = moved_layout(tuple(int(d) for d in shape), channel_axis, reduce_axis)
    k = 2**bits
    if scheme == "nf4":
        block = parse_granularity(granularity, scheme, c, l_ * r, bits)
        nb = -(-r // block)
        return packed_bytes(c * l_ * nb * block, bits) + 2 * k + 2 * c * l_ * nb + DECODER_BYTES, f"block:{block}"
    per = parse_granularity(granularity, scheme, c, l_ * r, bits)
    return packed_bytes(c * l_ * r, bits) + 2 * k * (c // per) + DECODER_BYTES, granularity_text(c, c // per)


def quantize_codebook(w: np.ndarray, bits: int, scheme: str, *, channel_axis: int, reduce_axis: int,
                      granularity: str = "auto", hessians: list[np.ndarray] | None = None) -> CodebookWeight:
    """Fit the scheme's centroids to `w` and assign every weight an index (GPTQ-style against
    `hessians` when given: one [R, R] matrix, or one per L slice)."""
    if scheme not in CODEBOOK_SCHEMES:
        raise ConfigError(f"{scheme!r} is not a codebook scheme ({', '.join(CODEBOOK_SCHEMES)})")
    if bits not in scheme_bits(scheme):
        raise ConfigError(f"the {scheme} scheme stores {', '.join(map(str, scheme_bits(scheme)))}-bit indices, not {bits}")
    w = np.asarray(w, dtype=np.float32)
    shape = tuple(int(d) for d in w.shape)
    perm, c, l_, r = moved_layout(shape, channel_axis, reduce_axis)
    moved = np.transpose(w, perm).reshape(c, l_, r).astype(np.float64)
    k = 2**bits
    if scheme == "nf4":
        block = parse_granularity(granularity, scheme, c, l_ * r, bits)
        rp = -(-r // block) * block
        padded = np.zeros((c, l_, rp))
        padded[:, :, :r] = moved
        levels = nf_levels(bits).astype(np.float16)
        table = levels[None, :]
        scale = _absmax_scales(padded, block)
        if hessians is not None:
            codes, scale = _gptq_assign(padded, r, hessians, lambda cols, s: np.broadcast_to(levels.astype(np.float64), (c, k)),
                                        block=block)
        else:
            codes = nearest((padded / np.repeat(scale.astype(np.float64), block, axis=2)).reshape(c, -1),
                            np.broadcast_to(levels.astype(np.float64), (c, k))).reshape(c, l_, rp)
        return CodebookWeight(codes, table, scale, bits, shape, perm, block, scheme)
    per = parse_granularity(granularity, scheme, c, l_ * r, bits)
    groups = moved.reshape(c // per, per * l_ * r)
    mu = 0.0
    if scheme == "kmeans":
        centroids, _ = kmeans_1d(groups, k)
    else:
        best = None
        for m in MU_CHOICES:
            cand = np.sort(kmeans_mulaw(groups, k, m).astype(np.float16).astype(np.float64), axis=1)
            err = float(np.sum(np.square(np.take_along_axis(cand, nearest(groups, cand).astype(np.int64), 1) - groups)))
            if best is None or err < best[0]:
                best = (err, m, cand)
        _, mu, centroids = best
    table = np.sort(centroids.astype(np.float16), axis=1)
    wide = table.astype(np.float64)
    if hessians is not None:
        row_tables = np.repeat(wide, per, axis=0)  # [C, K]
        codes, _ = _gptq_assign(moved, r, hessians, lambda cols, s: row_tables, block=0)
    else:
        codes = nearest(groups, wide).reshape(c, l_, r)
    return CodebookWeight(codes, table, None, bits, shape, perm, 0, scheme, mu)


def _absmax_scales(padded: np.ndarray, block: int) -> np.ndarray:
    c, l_, rp = padded.shape
    peak = np.max(np.abs(padded.reshape(c, l_, rp // block, block)), axis=3)
    tiny = float(np.finfo(np.float16).smallest_normal)
    return np.maximum(peak, tiny).astype(np.float16)


def _gptq_assign(moved: np.ndarray, r: int, hessians: list[np.ndarray], tables, *,
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
        h = np.array(hessians[i if len(hessians) > 1 else 0], dtype=np.float64)
        w = np.array(moved[:, i, :r], dtype=np.float64)
        dead = np.diag(h) <= 0
        h[dead, dead] = 1.0
        w[:, dead] = 0.0
        h[np.diag_indices(r)] += DAMP * float(np.mean(np.diag(h)))
        inv = np.linalg.inv(h)
        u = np.linalg.cholesky((inv + inv.T) / 2).T
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
                sc = _absmax_scales(seg, block)[:, 0, 0]
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


# -- index packing ----------------------------------------------------------------------------

def packed_bytes(count: int, bits: int) -> int:
    """Bytes of `count` b-bit indices packed eight to b bytes."""
    return -(-count // 8) * bits


def pack_indices(codes: np.ndarray, bits: int) -> np.ndarray:
    """Pack indices (< 2^bits, any shape, read flat) into uint8: every 8 indices form one
    8*b-bit little-endian word, index i at bits [b*i, b*i + b); the tail is padded with 0."""
    if bits not in CODEBOOK_BITS:
        raise ValueError(f"indices are packed at 1-4 bits, not {bits}")
    flat = np.asarray(codes, dtype=np.uint64).ravel()
    if flat.size and int(flat.max()) >= 2**bits:
        raise ValueError(f"an index is >= 2^{bits}")
    padded = np.zeros(-(-flat.size // 8) * 8, np.uint64)
    padded[: flat.size] = flat
    words = np.sum(padded.reshape(-1, 8) << (np.uint64(bits) * np.arange(8, dtype=np.uint64)), axis=1, dtype=np.uint64)
    parts = (words[:, None] >> (np.uint64(8) * np.arange(bits, dtype=np.uint64))) & np.uint64(0xFF)
    return parts.astype(np.uint8).ravel()


def unpack_indices(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    """Inverse of `pack_indices` (the arithmetic the ONNX decoder does): `count` uint8 indices."""
    b = np.asarray(packed, dtype=np.int64).reshape(-1, bits)
    words = np.sum(b * (256 ** np.arange(bits, dtype=np.int64)), axis=1, keepdims=True)
    codes = (words // (2 ** (bits * np.arange(8, dtype=np.int64)))) % (2**bits)
    return codes.reshape(-1)[:count].astype(np.uint8)


# -- the ONNX decoder -------------------------------------------------------------------------

def _fresh_tag(root: gs.Graph) -> str:
    """A short prefix ("cb3") no tensor or node name in `root` starts with: decoder tensors are
    named "<tag>.<i>" (names are stored, most of them twice)."""
    names = g._used_names(root)
    prefixes = {n.split(".", 1)[0] for n in names} | {n[len(DECODER_PREFIX):].split(".", 1)[0] for n in names
                                                      if n.startswith(DECODER_PREFIX)}
    i = 0
    while f"cb{i}" in prefixes:
        i += 1
    return f"cb{i}"


def emit_decoder(root: gs.Graph, graph: gs.Graph, name: str, cw: CodebookWeight) -> tuple[gs.Variable, str]:
    """Append to `graph` the nodes that rebuild `cw` as a float32 tensor of the weight's shape
    from initializers alone (see the module docstring); returns that tensor and the name of the
    packed-index initializer."""
    k = 2**cw.bits
    c, l_, rp = cw.codes.shape
    t = cw.table.shape[0]
    nodes: list[gs.Node] = []
    tag = _fresh_tag(root)

    # Short names (each is stored, most twice); only the nodes reading constants alone (the
    # first Reshape, nf4's scale Cast) and the table's Gather carry DECODER_PREFIX: fold-constants
    # can only start folding at the former, and `q4c inspect` finds the bytes through all three.
    consts: dict[str, gs.Constant] = {}

    def const(label: str, value: np.ndarray) -> gs.Constant:
        if label not in consts:
            consts[label] = gs.Constant(f"{tag}.{label}", np.asarray(value))
        assert np.array_equal(consts[label].values, value), label
        return consts[label]

    def node(op: str, inputs: list[gs.Tensor], dtype: type, shape: list[int] | None, **attrs: object) -> gs.Variable:
        # Intermediate tensors carry no type or shape (no value_info bytes; inference recovers them)
        out = gs.Variable(f"{tag}.{len(nodes)}", dtype=None, shape=None)
        marked = op == "Gather" or all(isinstance(t, gs.Constant) for t in inputs)
        label = f"{DECODER_PREFIX}{tag}.{len(nodes)}" if marked else ""
        nodes.append(gs.Node(op, label, attrs=dict(attrs), inputs=inputs, outputs=[out]))
        graph.nodes.append(nodes[-1])
        return out

    count = cw.codes.size
    words = -(-count // 8)
    packed = g.make_constant(g.unique_name(root, f"{name}.idx{cw.bits}"), pack_indices(cw.codes, cw.bits))
    x = node("Reshape", [packed, const("shape_w", np.array([words, cw.bits], np.int64))], np.uint8, [words, cw.bits])
    x = node("Cast", [x], np.int64, [words, cw.bits], to=TensorProto.INT64)
    x = node("Mul", [x, const("byte_w", 256 ** np.arange(cw.bits, dtype=np.int64))], np.int64, [words, cw.bits])
    x = node("ReduceSum", [x, const("axis1", np.array([1], np.int64))], np.int64, [words, 1], keepdims=1)
    x = node("Div", [x, const("bit_w", 2 ** (cw.bits * np.arange(8, dtype=np.int64)))], np.int64, [words, 8])
    x = node("Mod", [x, const("k", np.array(k, np.int64))], np.int64, [words, 8])
    x = node("Reshape", [x, const("flat", np.array([-1], np.int64))], np.int64, [words * 8])
    if words * 8 != count:
        x = node("Slice", [x, const("zero", np.array([0], np.int64)), const("count", np.array([count], np.int64))],
                 np.int64, [count])
    if t > 1:  # one row of indices per table  # table j's centroids start at j * 2^b; computed, not stored (8 bytes a table)
        offsets = node("Range", [const("zero_s", np.array(0, np.int64)), const("end", np.array(t * k, np.int64)),
                                 const("k", np.array(k, np.int64))], np.int64, [t])
        offsets = node("Unsqueeze", [offsets, const("axis1", np.array([1], np.int64))], np.int64, [t, 1])
        x = node("Reshape", [x, const("shape_t", np.array([t, count // t], np.int64))], np.int64, [t, count // t])
        x = node("Add", [x, offsets], np.int64, [t, count // t])
    table = gs.Constant(g.unique_name(root, f"{name}.table"), np.ascontiguousarray(cw.table.reshape(-1)))
    x = node("Gather", [table, x], np.float16, [t, count // t], axis=0)
    x = node("Cast", [x], np.float32, [t, count // t], to=TensorProto.FLOAT)
    if cw.scale is not None:
        nb = rp // cw.block_size
        x = node("Reshape", [x, const("shape_b", np.array([c, l_, nb, cw.block_size], np.int64))], np.float32,
                 [c, l_, nb, cw.block_size])
        scale = gs.Constant(g.unique_name(root, f"{name}.scale"), np.ascontiguousarray(cw.scale[..., None]))
        s = node("Cast", [scale], np.float32, [c, l_, nb, 1], to=TensorProto.FLOAT)
        x = node("Mul", [x, s], np.float32, [c, l_, nb, cw.block_size])
    r = cw.reduce_len
    if rp != r:
        x = node("Reshape", [x, const("shape_m", np.array([c, l_, rp], np.int64))], np.float32, [c, l_, rp])
        x = node("Slice", [x, const("zero_r", np.array([0], np.int64)), const("r", np.array([r], np.int64)),
                           const("axis2", np.array([2], np.int64))], np.float32, [c, l_, r])
    moved = list(cw.moved_shape)
    x = node("Reshape", [x, const("shape_o", np.array(moved, np.int64))], np.float32, moved)
    inverse = [int(a) for a in np.argsort(cw.perm)]
    if inverse != list(range(len(inverse))):
        x = node("Transpose", [x], np.float32, list(cw.shape), perm=inverse)
    x.dtype, x.shape = np.float32, list(cw.shape)  # what the consumer reads
    return x, packed.name
