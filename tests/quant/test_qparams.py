import ml_dtypes
import numpy as np
import pytest
from onnx import numpy_helper

from q4c.quant.packing import matmulnbits_weights, onnx_codes, pack_nibbles, unpack_nibbles
from q4c.quant.qparams import quantize, qrange


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_codes_stay_in_signed_range(rng, bits):
    w = rng.standard_t(3, (64, 48)).astype(np.float32)
    qw = quantize(w, bits, granularity="block", axis=0, block_size=32)
    lo, hi = qrange(bits)
    assert qw.q.min() >= lo and qw.q.max() <= hi
    assert qw.scale.shape == (2, 48)


def test_block_scales_follow_the_reduction_axis_and_pad_the_last_block(rng):
    w = rng.standard_normal((3, 8, 80)).astype(np.float32)  # LSTM W: [D, 4H, I], blocks along I
    qw = quantize(w, 4, granularity="block", axis=2, block_size=32)
    assert qw.scale.shape == (3, 8, 3)  # ceil(80 / 32)
    # Each block's scale is derived from that block only: zeroing block 2 cannot change block 0.
    w2 = w.copy()
    w2[..., 64:] = 0
    qw2 = quantize(w2, 4, granularity="block", axis=2, block_size=32)
    np.testing.assert_array_equal(qw.scale[..., 0], qw2.scale[..., 0])


def test_hand_computed_block_is_exact():
    # amax 0.7, qmax 7: ratio 1.0 gives scale 0.1 and every value on the grid, zero error.
    w = np.array([[0.7], [-0.3], [0.1], [0.0]], np.float32)
    qw = quantize(w, 4, granularity="block", axis=0, block_size=4)
    np.testing.assert_allclose(qw.scale, [[0.1]], rtol=1e-6)
    np.testing.assert_array_equal(qw.q[:, 0], [7, -3, 1, 0])
    np.testing.assert_allclose(qw.dequantize(), w, atol=1e-7)


def test_mse_clipping_beats_plain_absmax_on_an_outlier(rng):
    w = rng.standard_normal((256, 1)).astype(np.float32) * 0.05
    w[0, 0] = 0.4  # one 8-sigma outlier stretches the absmax grid
    clipped = quantize(w, 4, granularity="block", axis=0, block_size=256)
    absmax = quantize(w, 4, granularity="block", axis=0, block_size=256, clip_ratios=(1.0,))
    err = lambda qw: float(np.sum((qw.dequantize() - w) ** 2))  # noqa: E731
    assert err(clipped) < err(absmax)


def test_channel_granularity_gives_one_scale_per_output_channel(rng):
    w = rng.standard_normal((16, 64)).astype(np.float32)  # MatMul B [K, N]: channels on axis 1
    w[:, 3] *= 100
    qw = quantize(w, 8, granularity="channel", axis=1)
    assert qw.scale.shape == (64,)
    assert abs(qw.scale[3]) > 50 * np.median(np.abs(qw.scale))
    rel = np.abs(qw.dequantize() - w).max(axis=0) / np.abs(w).max(axis=0)
    assert rel.max() < 0.01  # 8 bits: within one half step of 1/127


def test_onnx_int4_codes_round_trip_through_numpy_helper(rng):
    qw = quantize(rng.standard_normal((5, 7)).astype(np.float32), 4, granularity="tensor", axis=0)
    proto = numpy_helper.from_array(onnx_codes(qw, 21), "w")
    assert len(proto.raw_data) == 18  # 35 values, two per byte, rounded up
    back = numpy_helper.to_array(proto)
    assert back.dtype == ml_dtypes.int4
    np.testing.assert_array_equal(back.astype(np.int8), qw.q)


@pytest.mark.parametrize("bits", [2, 4])
def test_pack_unpack_nibbles_round_trip(rng, bits):
    codes = rng.integers(0, 2**bits, size=(3, 32)).astype(np.uint8)
    packed = pack_nibbles(codes, bits)
    assert packed.shape == (3, 32 * bits // 8)
    np.testing.assert_array_equal(unpack_nibbles(packed, bits, 32), codes)


def test_pack_nibbles_puts_the_first_value_in_the_low_bits():
    assert pack_nibbles(np.array([[0x3, 0xA]], np.uint8), 4).tolist() == [[0xA3]]


def test_matmulnbits_layout_is_transposed_blocks_with_offset_codes():
    # K=32, N=1: all codes 1 -> unsigned 9 -> bytes 0x99; scale [N, n_blocks].
    w = np.full((32, 1), 0.5, np.float32)
    qw = quantize(w, 4, granularity="block", axis=0, block_size=32)
    packed, scales = matmulnbits_weights(qw)
    assert packed.shape == (1, 1, 16) and scales.shape == (1, 1)
    assert qw.q[0, 0] == 7 and packed[0, 0, 0] == 0xFF  # 7 + 8 = 15 in both nibbles


def test_two_bit_codes_use_int2_from_opset_25(rng):
    qw = quantize(rng.standard_normal((8, 8)).astype(np.float32), 2, granularity="tensor", axis=0)
    assert onnx_codes(qw, 21).dtype == ml_dtypes.int4 and onnx_codes(qw, 25).dtype == ml_dtypes.int2
    proto = numpy_helper.from_array(onnx_codes(qw, 25), "w")
    assert len(proto.raw_data) == 16  # 64 codes, four per byte
    np.testing.assert_array_equal(numpy_helper.to_array(proto).astype(np.int8), qw.q)


def test_signed_scale_keeps_the_largest_weight_exact():
    # 16 levels: the peak -0.8 maps to code -8 with scale +0.1 (or +0.8 to -8 with scale -0.1),
    # which the 15-level amax/7 grid cannot represent; every value here sits on that grid.
    w = np.array([[0.8, -0.7, 0.3, 0.0, -0.1, 0.5, 0.2, -0.4]], np.float32).T
    qw = quantize(w, 4, granularity="block", axis=0, block_size=8, clip_ratios=(1.0,))
    np.testing.assert_allclose(qw.scale, [[-0.1]], rtol=1e-6)
    assert qw.q[0, 0] == -8
    np.testing.assert_allclose(qw.dequantize(), w, atol=1e-6)
