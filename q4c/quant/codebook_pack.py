"""Codebook indices packed as a uint8 bitstream: eight b-bit indices in b bytes (1-4 bits)."""

from __future__ import annotations

import numpy as np

from q4c.config import CODEBOOK_BITS


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


