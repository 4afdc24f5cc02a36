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
from dataclasses import dataclass

import numpy as np

from q4c.config import CODEBOOK_BITS, CODEBOOK_SCHEMES
from q4c.errors import ConfigError
from q4c.quant.closed_form import GENERATOR_PREFIX
from q4c.quant.codebook_fit import (  # noqa: F401 - re-exported
    absmax_scales,
    gptq_assign,
    kmeans_1d,
    kmeans_mulaw,
    mulaw_compress,
    mulaw_expand,
    nearest,
    nf_levels,
)
from q4c.quant.codebook_pack import pack_indices, packed_bytes, unpack_indices  # noqa: F401 - re-exported

#: mu values mulaw tries per tensor (k-means in each companded space; least weight error wins).
MU_CHOICES = (8.0, 32.0, 128.0, 255.0)
#: Weights per absmax scale of the nf scheme (bitsandbytes' default block).
NF_BLOCK = 64
#: Table bytes per weight the automatic grouping allows: channels share a table until the
#: float16 centroids cost at most this many bits per weight (a quarter of uniform's scales).
TABLE_OVERHEAD_BITS = 0.25
#: Node-name prefix of decoder nodes: the closed-form generator prefix (fold-constants leaves
#: them alone) plus a tag that `q4c inspect` recognises.
DECODER_PREFIX = f"{GENERATOR_PREFIX}cb/"
#: Bytes of a decoder besides its indices, tables and scales (its ~15 nodes and small shape
#: constants; measured 1.1-1.4 KB, the weight's name stored twice included), counted in every
#: codebook candidate's cost.
DECODER_BYTES = 1200


def is_codebook(scheme: str) -> bool:
    return scheme in CODEBOOK_SCHEMES


def scheme_bits(scheme: str) -> tuple[int, ...]:
    """Index widths a codebook scheme supports (1 = binary): NF needs a zero and both signs."""
    return (2, 3, 4) if scheme == "nf4" else CODEBOOK_BITS


def supports(scheme: str, bits: int) -> bool:
    """Whether `scheme` quantizes to `bits`: codebooks 1-4 (nf4 2-4), uniform schemes 2/3/4/6/8
    (gptq only below 8 bits, where it pays)."""
    if is_codebook(scheme):
        return bits in scheme_bits(scheme)
    return bits in (2, 3, 4, 6, 8) and not (scheme == "gptq" and bits == 8)


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
        scale = absmax_scales(padded, block)
        if hessians is not None:
            codes, scale = gptq_assign(padded, r, hessians, lambda cols, s: np.broadcast_to(levels.astype(np.float64), (c, k)),
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
        codes, _ = gptq_assign(moved, r, hessians, lambda cols, s: row_tables, block=0)
    else:
        codes = nearest(groups, wide).reshape(c, l_, r)
    return CodebookWeight(codes, table, None, bits, shape, perm, 0, scheme, mu)


# Moved to q4c.quant.codebook_emit; importable from here as before (it imports this module).
from q4c.quant.codebook_emit import emit_decoder  # noqa: F401 - re-exported
