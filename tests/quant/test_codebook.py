"""Codebooks: k-means in linear and mu-law space, NF levels, index packing, GPTQ-style assignment."""

import math

import numpy as np
import pytest

from q4c.errors import ConfigError
from q4c.quant.codebook import (
    DECODER_BYTES,
    codebook_cost,
    kmeans_1d,
    kmeans_mulaw,
    nf_levels,
    pack_indices,
    packed_bytes,
    quantize_codebook,
    unpack_indices,
)
from q4c.testing import heavy_tailed


def test_kmeans_in_mulaw_space_matches_a_hand_computed_1d_case():
    # x = [0, 0.3, 0.4, 1], mu = 255, k = 2. Companded: y = ln(1 + 255 x) / ln 256 =
    # [0, 0.7845, 0.8358, 1]. Quantile starts 0.588 / 0.877 (midpoint 0.733) put 0 alone and
    # 0.3, 0.4, 1 together, which is stable. Centroid of the upper cluster in y is the mean of the
    # three logs, so in x it is (cbrt(76.5+1 * 102+1 * 256) - 1) / 255 = 0.4937.
    x = np.array([[0.0, 0.3, 0.4, 1.0]])
    centroids = kmeans_mulaw(x, 2, 255.0)
    upper = ((1 + 255 * 0.3) * (1 + 255 * 0.4) * 256) ** (1 / 3)
    np.testing.assert_allclose(centroids, [[0.0, (upper - 1) / 255]], atol=1e-9)


def test_kmeans_in_linear_space_groups_the_same_values_differently():
    # Linear k-means on the same row: {0, 0.3, 0.4} and {1} (SSE 0.087 vs 0.225 for the split
    # mu-law space prefers), centroids 0.2333 and 1.
    centroids, codes = kmeans_1d(np.array([[0.0, 0.3, 0.4, 1.0]]), 2)
    np.testing.assert_allclose(centroids, [[0.7 / 3, 1.0]], atol=1e-12)
    np.testing.assert_array_equal(codes, [[0, 0, 0, 1]])


def test_mulaw_centroids_scale_with_the_rows_largest_magnitude():
    x = np.array([[0.0, 0.3, 0.4, 1.0]])
    np.testing.assert_allclose(kmeans_mulaw(3 * x, 2, 255.0), 3 * kmeans_mulaw(x, 2, 255.0), rtol=1e-12)


def test_nf4_levels_are_qlora_normalfloat():
    # The NF4 table as published with QLoRA (Dettmers et al., 2023, appendix E), 4 decimals.
    published = [-1.0, -0.6962, -0.5251, -0.3949, -0.2844, -0.1848, -0.0911, 0.0,
                 0.0796, 0.1609, 0.2461, 0.3379, 0.4407, 0.5626, 0.7230, 1.0]
    np.testing.assert_allclose(nf_levels(4), published, atol=6e-5)
    assert len(nf_levels(2)) == 4 and 0.0 in nf_levels(3)


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_index_packing_round_trips(rng, bits):
    codes = rng.integers(0, 2**bits, size=1001).astype(np.uint8)  # not a multiple of 8: padded tail
    packed = pack_indices(codes, bits)
    assert packed.dtype == np.uint8 and packed.size == packed_bytes(codes.size, bits) == math.ceil(1001 / 8) * bits
    np.testing.assert_array_equal(unpack_indices(packed, bits, codes.size), codes)
    # The bit stream is the codes' bits, lowest first: numpy's own unpackbits reads it back.
    bits_lsb = np.unpackbits(packed, bitorder="little")[: codes.size * bits].reshape(-1, bits)
    np.testing.assert_array_equal(bits_lsb @ (1 << np.arange(bits)), codes)


@pytest.mark.parametrize(("bits", "codes", "expected"), [
    (1, [1, 0, 1, 1, 0, 0, 0, 1], [0b10001101]),
    (2, [1, 2, 3, 0, 0, 0, 0, 0], [0b00111001, 0]),
    (3, [7, 0, 0, 0, 0, 0, 0, 1], [7, 0, 0b00100000]),  # code 7 at bit 21: byte 2, bit 5
    (4, [0xA, 0x5, 0, 0, 0, 0, 0, 0xF], [0x5A, 0, 0, 0xF0]),
])
def test_index_packing_matches_hand_packed_bytes(bits, codes, expected):
    np.testing.assert_array_equal(pack_indices(np.array(codes), bits), expected)


def test_packing_refuses_an_index_wider_than_its_bits():
    with pytest.raises(ValueError):
        pack_indices(np.array([4]), 2)


@pytest.mark.parametrize(("scheme", "bits"), [("mulaw", 1), ("mulaw", 2), ("kmeans", 3), ("nf4", 4), ("nf4", 2)])
def test_cost_without_fitting_equals_the_stored_bytes(rng, scheme, bits):
    w = heavy_tailed(rng, (2, 48, 40))  # LSTM-like [dirs, 4H, I]: channel axis 1, reduce axis 2
    cw = quantize_codebook(w, bits, scheme, channel_axis=1, reduce_axis=2)
    nbytes, gran = codebook_cost(w.shape, bits, scheme, channel_axis=1, reduce_axis=2)
    assert (nbytes, gran) == (cw.nbytes + DECODER_BYTES, cw.granularity)  # payload + the decoder's nodes
    assert cw.index_bytes == pack_indices(cw.codes, bits).size
    assert cw.dequantize().shape == w.shape and cw.codes.max() < 2**bits


def test_kmeans_codebook_uses_every_centroid_where_the_weight_has_few_levels(rng):
    # A weight made of four values (per 16-channel group) is stored exactly by a 2-bit codebook.
    levels = np.array([-0.9, -0.1, 0.05, 0.7], np.float16).astype(np.float32)
    w = levels[rng.integers(0, 4, size=(64, 32))]
    cw = quantize_codebook(w, 2, "kmeans", channel_axis=0, reduce_axis=1, granularity="tensor")
    np.testing.assert_array_equal(cw.dequantize(), w)


def test_mulaw_beats_uniform_levels_on_spike_and_slab_weights(rng):
    # Most weights tiny, a tenth large: two centroids near zero keep the small ones.
    w = (0.03 * rng.laplace(size=(64, 256)) + (rng.random((64, 256)) < 0.1) * rng.choice([-1, 1], (64, 256)))
    w = w.astype(np.float32)
    cw = quantize_codebook(w, 2, "mulaw", channel_axis=0, reduce_axis=1)
    from q4c.quant.qparams import quantize

    uniform = quantize(w, 2, granularity="block", axis=1, block_size=32, scale_dtype=np.float16).dequantize()
    assert np.sum((cw.dequantize() - w) ** 2) < 0.7 * np.sum((uniform - w) ** 2)  # measured 0.57
    assert cw.nbytes < w.size * 2.5 / 8  # and fewer bytes: 2 bits + tables vs 2 bits + 0.5 bit of scales


@pytest.mark.parametrize("scheme", ["mulaw", "kmeans", "nf4"])
def test_gptq_assignment_lowers_output_error_on_correlated_inputs(rng, scheme):
    k, rows = 96, 48
    mix = rng.standard_normal((8, k))
    x = rng.standard_normal((2000, 8)) @ mix + 0.3 * rng.standard_normal((2000, k))
    w = heavy_tailed(rng, (rows, k))  # [out, in]: channel axis 0, reduce axis 1
    h = x.T @ x / len(x)
    nearest = quantize_codebook(w, 3, scheme, channel_axis=0, reduce_axis=1)
    gptq = quantize_codebook(w, 3, scheme, channel_axis=0, reduce_axis=1, hessians=[h])
    np.testing.assert_array_equal(gptq.table, nearest.table)  # same centroids, other indices
    held_out = rng.standard_normal((500, 8)) @ mix + 0.3 * rng.standard_normal((500, k))
    err = {name: np.sum((held_out @ (cw.dequantize() - w).T) ** 2) for name, cw in (("n", nearest), ("g", gptq))}
    assert err["g"] < 0.8 * err["n"]


def test_nf4_refuses_one_bit():
    with pytest.raises(ConfigError):
        quantize_codebook(np.ones((8, 8), np.float32), 1, "nf4", channel_axis=0, reduce_axis=1)
