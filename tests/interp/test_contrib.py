"""com.microsoft ops against ONNX Runtime: MatMulNBits, GatherBlockQuantized, dynamic quantization."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
from onnx import TensorProto, helper

from q4c.interp import Interpreter
from q4c.interp.ops.contrib import unpack_bits

MS = "com.microsoft"


def pack_bits(values: np.ndarray, bits: int) -> np.ndarray:
    """[..., n] values < 2**bits -> uint8 [..., n * bits / 8], lowest bits first (ORT's layout)."""
    per = 8 // bits
    out = np.zeros(values.shape[:-1] + (values.shape[-1] // per,), np.uint8)
    for j in range(per):
        out |= (values[..., j::per].astype(np.uint8) << (j * bits)).astype(np.uint8)
    return out


def test_unpack_bits_inverts_pack_bits(rng):
    for bits in (2, 4, 8):
        values = rng.integers(0, 2**bits, size=(3, 16)).astype(np.uint8)
        np.testing.assert_array_equal(unpack_bits(pack_bits(values, bits), bits), values)


def mat_mul_n_bits_model(make_model, rng, *, k, n, block, zero_points, bits=4, m=3, bias=False):
    blocks = -(-k // block)
    q = rng.integers(0, 2**bits, size=(n, blocks * block))
    inits = {
        "B": pack_bits(q, bits).reshape(n, blocks, block * bits // 8),
        "scales": ((rng.random((n, blocks)) + 0.5) * 0.1).astype(np.float32).reshape(-1),
    }
    names = ["A", "B", "scales"]
    if zero_points == "packed":
        per = 8 // bits
        zq = rng.integers(0, 2**bits, size=(n, -(-blocks // per) * per))
        inits["zp"] = pack_bits(zq, bits).reshape(-1)
        names.append("zp")
    elif zero_points == "float":
        inits["zp"] = (rng.random((n, blocks)) * (2**bits - 1)).astype(np.float32).reshape(-1)
        names.append("zp")
    if bias:
        names += [""] * (5 - len(names)) + ["bias"]
        inits["bias"] = rng.standard_normal(n).astype(np.float32)
    node = helper.make_node("MatMulNBits", names, ["Y"], domain=MS, K=k, N=n, bits=bits, block_size=block)
    model = make_model([node], [helper.make_tensor_value_info("A", TensorProto.FLOAT, (m, k))], ["Y"], inits,
                       ms_opset=1)
    return model, {"A": rng.standard_normal((m, k)).astype(np.float32)}


@pytest.mark.parametrize("block", [16, 32, 128])
@pytest.mark.parametrize("k", [128, 200], ids=["k_multiple", "k_not_multiple"])
@pytest.mark.parametrize("zero_points", ["default", "packed", "float"])
def test_mat_mul_n_bits_4_bit_matches_ort(make_model, run_ort, rng, block, k, zero_points):
    model, feeds = mat_mul_n_bits_model(make_model, rng, k=k, n=8, block=block, zero_points=zero_points)
    np.testing.assert_allclose(Interpreter(model).run(feeds)["Y"], run_ort(model, feeds)["Y"], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bits, zero_points, bias", [(8, "packed", False), (2, "default", False), (4, "packed", True)])
def test_mat_mul_n_bits_other_widths_and_bias_match_ort(make_model, run_ort, rng, bits, zero_points, bias):
    model, feeds = mat_mul_n_bits_model(make_model, rng, k=64, n=8, block=32, zero_points=zero_points, bits=bits,
                                        bias=bias)
    np.testing.assert_allclose(Interpreter(model).run(feeds)["Y"], run_ort(model, feeds)["Y"], rtol=1e-5, atol=1e-5)


def gather_block_quantized_model(make_model, rng, *, data_type="uint8", bits=4, zero_points=True, vocab=10, dim=64,
                                 block=32):
    blocks = -(-dim // block)
    if data_type == "uint8":
        per = 8 // bits
        inits = {"data": pack_bits(rng.integers(0, 2**bits, size=(vocab, dim)), bits)}
        if zero_points:
            inits["zp"] = pack_bits(rng.integers(0, 2**bits, size=(vocab, -(-blocks // per) * per)), bits)
    else:
        dtype, lo, hi = (ml_dtypes.int4, -8, 8) if data_type == "int4" else (ml_dtypes.uint4, 0, 16)
        inits = {"data": rng.integers(lo, hi, size=(vocab, dim)).astype(dtype)}
        if zero_points:
            inits["zp"] = rng.integers(lo, hi, size=(vocab, blocks)).astype(dtype)
    inits["scales"] = ((rng.random((vocab, blocks)) + 0.5) * 0.1).astype(np.float32)
    names = ["data", "idx", "scales"] + (["zp"] if zero_points else [])
    node = helper.make_node("GatherBlockQuantized", names, ["Y"], domain=MS, bits=bits, block_size=block,
                            gather_axis=0, quantize_axis=1)
    model = make_model([node], [helper.make_tensor_value_info("idx", TensorProto.INT64, (2, 3))], ["Y"],
                       {k: inits[k] for k in ("data", "scales", "zp") if k in inits}, ms_opset=1)
    return model, {"idx": rng.integers(-vocab, vocab, size=(2, 3)).astype(np.int64)}


@pytest.mark.parametrize(
    "kwargs",
    [
        {"bits": 4, "zero_points": True},
        {"bits": 4, "zero_points": False},
        {"bits": 4, "zero_points": False, "dim": 48, "block": 16},
        {"bits": 8, "zero_points": True},
        {"bits": 2, "zero_points": True},
        {"data_type": "int4", "zero_points": True},
        {"data_type": "uint4", "zero_points": False},
    ],
    ids=["u8_4bit_zp", "u8_4bit", "u8_4bit_block16", "u8_8bit", "u8_2bit", "int4_zp", "uint4"],
)
def test_gather_block_quantized_matches_ort_exactly(make_model, run_ort, rng, kwargs):
    model, feeds = gather_block_quantized_model(make_model, rng, **kwargs)
    np.testing.assert_array_equal(Interpreter(model).run(feeds)["Y"], run_ort(model, feeds)["Y"])


def test_gather_block_quantized_out_of_range_index_gives_zeros(make_model, rng):
    model, _ = gather_block_quantized_model(make_model, rng)
    out = Interpreter(model).run({"idx": np.array([[0, 10, -11], [1, 2, 3]], np.int64)})["Y"]
    assert not out[0, 1].any() and not out[0, 2].any() and out[0, 0].any()


@pytest.mark.parametrize("b_type, per_column", [(np.int8, False), (np.uint8, True)])
def test_dynamic_quantize_mat_mul_matches_ort(make_model, run_ort, rng, b_type, per_column):
    k, n = 16, 5
    info = np.iinfo(b_type)
    shape = (n,) if per_column else ()
    inits = {
        "B": rng.integers(info.min, info.max + 1, size=(k, n)).astype(b_type),
        "b_scale": (rng.random(shape) * 0.05 + 0.01).astype(np.float32),
        "b_zp": rng.integers(info.min // 4, info.max // 4, size=shape).astype(b_type),
        "bias": rng.standard_normal(n).astype(np.float32),
    }
    node = helper.make_node("DynamicQuantizeMatMul", ["A", "B", "b_scale", "b_zp", "bias"], ["Y"], domain=MS)
    model = make_model([node], [helper.make_tensor_value_info("A", TensorProto.FLOAT, (4, k))], ["Y"], inits,
                       ms_opset=1)
    feeds = {"A": rng.standard_normal((4, k)).astype(np.float32)}
    np.testing.assert_allclose(Interpreter(model).run(feeds)["Y"], run_ort(model, feeds)["Y"], rtol=1e-5, atol=1e-5)


def _dynamic_lstm_model(make_model, rng, t, b, i, h, per_channel, direction="forward", extra=False):
    nd = 2 if direction == "bidirectional" else 1
    w = rng.integers(-127, 128, size=(nd, i, 4 * h)).astype(np.int8)
    r = rng.integers(-127, 128, size=(nd, h, 4 * h)).astype(np.int8)
    pshape = (nd, 4 * h) if per_channel else (nd,)
    ws = (rng.random(pshape) * 0.004 + 0.002).astype(np.float32)
    rs = (rng.random(pshape) * 0.005 + 0.002).astype(np.float32)
    zp = np.zeros(pshape, np.int8)
    inits = {"W": w, "R": r, "Ws": ws, "Wz": zp, "Rs": rs, "Rz": zp}
    names = ["X", "W", "R", "", "", "", "", "", "Ws", "Wz", "Rs", "Rz"]
    inputs = [helper.make_tensor_value_info("X", TensorProto.FLOAT, (t, b, i))]
    if extra:  # bias, sequence_lens and initial states
        inits["B"] = (rng.standard_normal((nd, 8 * h)) * 0.1).astype(np.float32)
        names[3:7] = ["B", "L", "H0", "C0"]
        inputs += [helper.make_tensor_value_info("L", TensorProto.INT32, (b,))]
        inputs += [helper.make_tensor_value_info(n, TensorProto.FLOAT, (nd, b, h)) for n in ("H0", "C0")]
    node = helper.make_node("DynamicQuantizeLSTM", names, ["Y", "Y_h", "Y_c"], domain=MS, hidden_size=h,
                            direction=direction)
    model = make_model([node], inputs, ["Y", "Y_h", "Y_c"], inits, ms_opset=1)
    return model, w, r, ws, rs, inits


@pytest.mark.parametrize("per_channel", [False, True])
def test_dynamic_quantize_lstm_quantizes_activations_like_ort(make_model, run_ort, rng, per_channel):
    # ORT quantizes X (all steps at once) and h (per step) to uint8; the reference does the same,
    # so at batch 1 the two agree to float noise, and both stay near the float LSTM of the
    # dequantized weights.
    t, b, i, h = 4, 1, 8, 5
    model, w, r, ws, rs, _ = _dynamic_lstm_model(make_model, rng, t, b, i, h, per_channel)
    feeds = {"X": rng.standard_normal((t, b, i)).astype(np.float32)}
    actual = Interpreter(model).run(feeds)
    expected = run_ort(model, feeds)
    for name in ("Y", "Y_h", "Y_c"):
        np.testing.assert_allclose(actual[name], expected[name], rtol=1e-5, atol=1e-5)

    float_node = helper.make_node("LSTM", ["X", "W", "R"], ["Y", "Y_h", "Y_c"], hidden_size=h)
    w_f = (w.astype(np.float32) * ws.reshape(1, 1, -1)).transpose(0, 2, 1)
    r_f = (r.astype(np.float32) * rs.reshape(1, 1, -1)).transpose(0, 2, 1)
    float_model = make_model([float_node], [helper.make_tensor_value_info("X", TensorProto.FLOAT, (t, b, i))],
                             ["Y", "Y_h", "Y_c"], {"W": w_f, "R": r_f}, opset=14)
    reference = Interpreter(float_model).run(feeds)["Y"]
    err = np.sqrt(np.mean((actual["Y"] - reference) ** 2)) / np.sqrt(np.mean(reference ** 2))
    assert 0 < err < 0.02  # uint8 activation rounding: measured ~5e-3


def test_dynamic_quantize_lstm_matches_ort_bidirectional_with_lengths_and_states(make_model, run_ort, rng):
    # Batch 3 with H > 256: ORT quantizes h over the whole batch (it splits the batch across
    # threads only when B > 4 or H <= 256), so the reference is exact here too.
    t, b, i, h = 5, 3, 16, 260
    model, *_ = _dynamic_lstm_model(make_model, rng, t, b, i, h, True, "bidirectional", extra=True)
    feeds = {"X": rng.standard_normal((t, b, i)).astype(np.float32), "L": np.array([5, 2, 4], np.int32),
             "H0": rng.standard_normal((2, b, h)).astype(np.float32) * 0.5,
             "C0": rng.standard_normal((2, b, h)).astype(np.float32) * 0.5}
    actual = Interpreter(model).run(feeds)
    expected = run_ort(model, feeds)
    for name in ("Y", "Y_h", "Y_c"):
        np.testing.assert_allclose(actual[name], expected[name], rtol=1e-5, atol=1e-5, err_msg=name)
    assert not np.any(actual["Y"][2:, :, 1])  # past sequence 1's length: zeros


def test_dynamic_quantize_lstm_probes_do_not_change_the_outputs(make_model, rng):
    t, b, i, h = 5, 3, 16, 8
    model, *_ = _dynamic_lstm_model(make_model, rng, t, b, i, h, True, "bidirectional", extra=True)
    feeds = {"X": rng.standard_normal((t, b, i)).astype(np.float32), "L": np.array([5, 2, 4], np.int32),
             "H0": np.zeros((2, b, h), np.float32), "C0": np.zeros((2, b, h), np.float32)}
    interp = Interpreter(model)
    plain, probed = interp.run(feeds), interp.run(feeds, probes=True)
    for name in ("Y", "Y_h", "Y_c"):
        np.testing.assert_array_equal(plain[name], probed[name])
    node = model.graph.node[0].name or "DynamicQuantizeLSTM_0"
    np.testing.assert_array_equal(probed[f"{node}::h"], probed["Y"])
    assert probed[f"{node}::c"].shape == (t, 2, b, h)
    np.testing.assert_array_equal(probed[f"{node}::c"][-1, 0, 0], probed["Y_c"][0, 0])  # full-length entry
