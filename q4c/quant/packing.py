"""Storage of quantized codes: ONNX INT4/INT8 tensors, and ONNX Runtime's packed uint8 layouts
for com.microsoft MatMulNBits and GatherBlockQuantized."""

from __future__ import annotations

import ml_dtypes
import numpy as np

from q4c.quant.qparams import QuantizedWeight

#: First ONNX opset with INT2/UINT2 tensors (DequantizeLinear reads them from 25 on).
INT2_OPSET = 25
_ONNX_STORAGE = {2: ml_dtypes.int2, 4: ml_dtypes.int4, 8: np.int8}


def storage_bits(bits: int, opset: int) -> int:
    """Bits each code occupies on disk: ONNX has INT2 (opset >= 25), INT4 and INT8 and no
    3-bit type, so 3-bit codes ride in INT4 containers (reports count them as stored)."""
    if bits == 2 and opset >= INT2_OPSET:
        return 2
    if bits == 6 and opset >= INT2_OPSET:
        return 6  # q4c.quant.planes: a 4-bit and a 2-bit plane
    return 4 if bits <= 4 else 8


def onnx_codes(qw: QuantizedWeight, opset: int) -> np.ndarray:
    """Codes as the ONNX-typed array DequantizeLinear reads (onnx packs sub-byte types)."""
    return qw.q.astype(_ONNX_STORAGE[storage_bits(qw.bits, opset)])


def pack_nibbles(codes: np.ndarray, bits: int) -> np.ndarray:
    """Pack unsigned codes (last axis, length a multiple of 8 / bits) into bytes, low bits first."""
    per_byte = 8 // bits
    codes = codes.astype(np.uint8).reshape(codes.shape[:-1] + (-1, per_byte))
    out = np.zeros(codes.shape[:-1], np.uint8)
    for i in range(per_byte):
        out |= (codes[..., i] << np.uint8(i * bits)).astype(np.uint8)
    return out


def unpack_nibbles(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    """Inverse of pack_nibbles: unsigned codes, `count` along the last axis."""
    per_byte = 8 // bits
    mask = np.uint8((1 << bits) - 1)
    parts = [(packed >> np.uint8(i * bits)) & mask for i in range(per_byte)]
    codes = np.stack(parts, axis=-1).reshape(packed.shape[:-1] + (-1,))
    return codes[..., :count]


def kernel_bits(bits: int) -> int:
    """MatMulNBits / GatherBlockQuantized run 2, 4 and 8 bits; 3-bit codes ride in 4 bits."""
    return 4 if bits == 3 else bits


def matmulnbits_weights(qw: QuantizedWeight) -> tuple[np.ndarray, np.ndarray]:
    """B and scales for MatMulNBits from a [K, N] weight quantized in blocks along K (axis 0).

    MatMulNBits stores B transposed, [N, n_blocks, block_size * bits / 8], codes offset by the
    default zero point 2^(bits-1) so they are unsigned; scales are [N, n_blocks].
    """
    assert qw.axis == 0 and qw.block_size and qw.q.ndim == 2, "MatMulNBits needs [K, N] blocked along K"
    bits = kernel_bits(qw.bits)
    k, n = qw.q.shape
    nb = qw.scale.shape[0]
    padded = np.zeros((nb * qw.block_size, n), np.int16)
    padded[:k] = qw.q
    unsigned = (padded + 2 ** (bits - 1)).astype(np.uint8).T.reshape(n, nb, qw.block_size)
    return pack_nibbles(unsigned, bits), np.ascontiguousarray(qw.scale.T)


def gather_block_quantized_weights(qw: QuantizedWeight) -> tuple[np.ndarray, np.ndarray]:
    """Data and scales for GatherBlockQuantized from a [V, D] table blocked along D (D a multiple
    of the block), in MatMulNBits' layout: data [V, n_blocks, block * bits / 8] uint8 with
    `quantize_axis` 2, scales [V, n_blocks, 1], default zero point 2^(bits-1).

    The same bytes are MatMulNBits' B for the transposed table, so a tied output projection
    shares one packed initializer with the embedding.
    """
    assert qw.axis == 1 and qw.block_size and qw.q.ndim == 2, "GatherBlockQuantized needs [V, D] blocked along D"
    assert qw.q.shape[1] % qw.block_size == 0, "the table width must be a multiple of the block"
    data, scales = matmulnbits_weights(QuantizedWeight(qw.q.T, qw.scale.T, qw.bits, 0, qw.block_size))
    return data, scales[:, :, None]
