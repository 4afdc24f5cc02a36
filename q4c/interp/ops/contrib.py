"""ONNX Runtime's com.microsoft quantized ops, following ContribOperators.md.

- MatMulNBits: Y = A @ dequantize(B)^T + bias, B packed [N, k_blocks, blob_size] (low bits first).
- GatherBlockQuantized: Gather of a block-quantized table, dequantized on the way out.
- DynamicQuantizeMatMul: A quantized to uint8 like DynamicQuantizeLinear, then an exact
  integer matmul scaled back to float.
- DynamicQuantizeLSTM: as ONNX Runtime's CPU kernel computes it (uni_directional_lstm.cc with
  rnn_helpers.cc ComputeGemm): X of all steps quantized to uint8 at once, h quantized per step
  over the whole batch, exact integer products scaled by a_scale * W_scale. ONNX Runtime splits
  the batch across threads when B > 4 or (B >= 2 and H <= 256), each split quantizing its own
  rows, so there the two agree only to uint8 rounding; at batch 1 they agree to float noise.
  Peepholes, input_forget or non-default activations take the float path (W and R dequantized).
"""

from __future__ import annotations

import numpy as np

from q4c.errors import UnsupportedOpError
from q4c.interp.ops.dtypes import INT4, UINT4, as_int, is_float8
from q4c.interp.ops.math import sigmoid_array
from q4c.interp.ops.quant import _matmul_int, dynamic_quantize_params, quantize_array
from q4c.interp.ops.rnn import lstm_forward
from q4c.interp.registry import op

MS = "com.microsoft"


def unpack_bits(packed: np.ndarray, bits: int) -> np.ndarray:
    """uint8 [..., n] holding 8/bits values per byte, lowest bits first -> [..., n * 8/bits]."""
    if bits == 8:
        return packed
    if bits not in (2, 4):
        raise UnsupportedOpError(f"{bits}-bit packing (q4c.interp unpacks 2, 4 and 8 bits)")
    per = 8 // bits
    shifts = (np.arange(per, dtype=np.uint8) * bits).astype(np.uint8)
    values = (packed[..., None] >> shifts) & np.uint8((1 << bits) - 1)
    return values.reshape(packed.shape[:-1] + (packed.shape[-1] * per,))


@op("MatMulNBits", since=1, domain=MS)
def mat_mul_n_bits(
    A, B, scales, zero_points=None, g_idx=None, bias=None, *, K: int, N: int, bits: int = 4,  # noqa: N803
    block_size: int, accuracy_level: int = 0, weight_prepacked: int = 0,
):
    # accuracy_level only lets ONNX Runtime lower A's precision; the reference computes in A's type.
    if weight_prepacked:
        raise UnsupportedOpError("MatMulNBits with prepacked weights (weight_prepacked != 0)")
    cached = _WEIGHTS.get(id(B)) if zero_points is None and g_idx is None else None
    if cached is not None and cached[0] is B and cached[2].dtype == A.dtype and np.array_equal(cached[1], scales):
        w = cached[2]  # same packed constant and scales as a previous call (a Scan/Loop body's step)
    else:
        w = _dequantize_n_bits(A.dtype, B, scales, zero_points, g_idx, K=K, N=N, bits=bits, block_size=block_size)
        if zero_points is None and g_idx is None:
            if len(_WEIGHTS) >= _WEIGHTS_KEPT:
                del _WEIGHTS[next(iter(_WEIGHTS))]
            w.setflags(write=False)
            _WEIGHTS[id(B)] = (B, scales.copy(), w)  # holding B keeps id(B) from being reused
    y = np.matmul(A, w.T)
    if bias is not None:
        y = y + bias
    return (y.astype(A.dtype, copy=False),)


#: Dequantized MatMulNBits weights of the last few calls, keyed by id of the packed input: a
#: body run once per time step would otherwise unpack the same constant at every step.
_WEIGHTS: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
_WEIGHTS_KEPT = 8


def _dequantize_n_bits(dtype: np.dtype, B, scales, zero_points, g_idx, *, K: int, N: int, bits: int,  # noqa: N803
                       block_size: int) -> np.ndarray:
    """B as a float [N, K] matrix of `dtype`, the type A is computed in."""
    n_blocks = -(-K // block_size)
    q = unpack_bits(B.reshape(N, n_blocks, -1), bits).reshape(N, -1)[:, :K].astype(np.int32)
    block_of_k = np.arange(K) // block_size if g_idx is None else g_idx.astype(np.int64)[:K]
    s = scales.reshape(N, n_blocks)[:, block_of_k]
    if zero_points is None:
        w = (q - (1 << (bits - 1))).astype(dtype) * s
    elif zero_points.dtype == np.uint8:
        zp = unpack_bits(zero_points.reshape(N, -1), bits)[:, :n_blocks].astype(np.int32)
        w = (q - zp[:, block_of_k]).astype(dtype) * s
    else:  # float zero points, same type as A, shape [N, k_blocks]
        zp = zero_points.reshape(N, n_blocks)[:, block_of_k]
        w = (q.astype(dtype) - zp) * s
    return w.astype(dtype, copy=False)


def _expand_blocks(p: np.ndarray, axis: int, block_size: int, length: int) -> np.ndarray:
    return np.repeat(p, block_size, axis=axis).take(np.arange(length), axis=axis)


@op("GatherBlockQuantized", since=1, domain=MS)
def gather_block_quantized(
    data, indices, scales, zero_points=None, *, bits: int = 4, block_size: int = 128,
    gather_axis: int = 0, quantize_axis: int = 1,
):
    rank = data.ndim
    ga = gather_axis + rank if gather_axis < 0 else gather_axis
    qa = quantize_axis + rank if quantize_axis < 0 else quantize_axis
    if data.dtype == np.uint8:
        # uint8 data: `bits`-wide values packed along the last axis; default zero point 2^(bits-1).
        q = unpack_bits(data, bits).astype(np.int32)
        zp = np.int32(1 << (bits - 1)) if zero_points is None else unpack_bits(zero_points, bits).astype(np.int32)
    elif data.dtype in (INT4, UINT4):
        q = data.astype(np.int32)
        zp = np.int32(0) if zero_points is None else zero_points.astype(np.int32)
    else:
        detail = " (float8/float4)" if is_float8(data.dtype) else ""
        raise UnsupportedOpError(f"GatherBlockQuantized on {data.dtype}{detail} data")
    if np.ndim(zp):
        zp = zp[tuple(slice(0, n) for n in scales.shape)]  # drop packing padding
    # Out-of-range indices yield zeros; negative ones count from the end.
    n = q.shape[ga]
    idx = indices.astype(np.int64)
    idx = np.where(idx < 0, idx + n, idx)
    valid = (idx >= 0) & (idx < n)
    idx = np.where(valid, idx, 0)
    length = q.shape[qa]
    if ga != qa:
        qg = np.take(q, idx, axis=ga)
        sg = np.take(scales, idx, axis=ga)
        zg = np.take(zp, idx, axis=ga) if np.ndim(zp) else zp
        qa_out = qa + idx.ndim - 1 if qa > ga else qa
        s = _expand_blocks(sg, qa_out, block_size, length)
        z = _expand_blocks(zg, qa_out, block_size, length) if np.ndim(zg) else zg
        out = (qg - z).astype(scales.dtype) * s
    else:
        s = _expand_blocks(scales, qa, block_size, length)
        z = _expand_blocks(zp, qa, block_size, length) if np.ndim(zp) else zp
        out = np.take((q - z).astype(scales.dtype) * s, idx, axis=ga)
    if not np.all(valid):
        mask = valid.reshape((1,) * ga + idx.shape + (1,) * (rank - ga - 1))
        out = np.where(mask, out, scales.dtype.type(0))
    return (out.astype(scales.dtype, copy=False),)


@op("DynamicQuantizeMatMul", since=1, domain=MS)
def dynamic_quantize_mat_mul(A, B, b_scale, b_zero_point=None, bias=None):  # noqa: N803
    a_scale, a_zp = dynamic_quantize_params(A)
    a_q = quantize_array(A, np.array(a_scale), np.array(a_zp), np.dtype(np.uint8))
    b = as_int(B)
    if b_zero_point is not None:
        zp = as_int(b_zero_point)
        b = b - (zp if zp.size > 1 else zp.reshape(()))
    acc = _matmul_int(as_int(a_q) - np.int32(a_zp), b)
    bs = b_scale.astype(np.float32)
    multiplier = a_scale * (bs if bs.size > 1 else bs.reshape(()))
    y = acc.astype(np.float32) * multiplier
    if bias is not None:
        y = y + bias
    return (y.astype(np.float32, copy=False),)


def _dequantize_recurrent(w: np.ndarray, scale: np.ndarray, zero_point: np.ndarray) -> np.ndarray:
    """[nd, in, 4H] int8/uint8 with per-direction or per-(direction, channel) params -> [nd, 4H, in]."""
    nd = w.shape[0]
    shape = (nd, 1, 1) if scale.size == nd else (nd, 1, -1)
    wf = (as_int(w) - as_int(zero_point).reshape(shape)).astype(np.float32) * scale.astype(np.float32).reshape(shape)
    return np.ascontiguousarray(wf.transpose(0, 2, 1))


@op("DynamicQuantizeLSTM", since=1, domain=MS)
def dynamic_quantize_lstm(
    X, W, R, B=None, sequence_lens=None, initial_h=None, initial_c=None, P=None,  # noqa: N803
    W_scale=None, W_zero_point=None, R_scale=None, R_zero_point=None, *,  # noqa: N803
    activation_alpha: list[float] | None = None, activation_beta: list[float] | None = None,
    activations: list[str] | None = None, clip: float | None = None, direction: str = "forward",
    hidden_size: int | None = None, input_forget: int = 0, _probe: dict | None = None,
):
    if W_scale is None or W_zero_point is None or R_scale is None or R_zero_point is None:
        raise UnsupportedOpError("DynamicQuantizeLSTM needs W_scale, W_zero_point, R_scale and R_zero_point")
    names = [a.lower() for a in activations or []]
    default = not names or all(n == d for n, d in zip(names, ["sigmoid", "tanh", "tanh"] * 2))
    if P is None and not input_forget and default:
        return _dynamic_lstm_as_ort(X, W, R, B, sequence_lens, initial_h, initial_c, W_scale, W_zero_point,
                                    R_scale, R_zero_point, clip=clip, direction=direction,
                                    hidden=hidden_size or R.shape[1], probe=_probe)
    w = _dequantize_recurrent(W, W_scale, W_zero_point)
    r = _dequantize_recurrent(R, R_scale, R_zero_point)
    return lstm_forward(
        X, w, r, B, sequence_lens, initial_h, initial_c, P, activation_alpha=activation_alpha,
        activation_beta=activation_beta, activations=activations, clip=clip, direction=direction,
        hidden_size=hidden_size, input_forget=input_forget, layout=0, probe=_probe,
    )


def _int_weight(w: np.ndarray, zero_point: np.ndarray, d: int) -> np.ndarray:
    """Direction d of [nd, K, 4H] int8/uint8 codes minus their zero point, as float64 (exact)."""
    zp = as_int(zero_point).reshape(zero_point.shape[0], -1)[d]
    return (as_int(w[d]) - zp.reshape(1, -1)).astype(np.float64)


def _quantized_gemm(a: np.ndarray, w: np.ndarray, w_scale: np.ndarray) -> np.ndarray:
    """ComputeGemm for uint8 weights: a quantized like DynamicQuantizeLinear over all its rows,
    exact integer product, scaled per column by a_scale * w_scale (float32)."""
    a_scale, a_zp = dynamic_quantize_params(a)
    q = quantize_array(a, np.array(a_scale), np.array(a_zp), np.dtype(np.uint8)).astype(np.float64) - float(a_zp)
    acc = np.rint(q @ w).astype(np.float32)  # exact: |acc| < 2**24 for K <= 512, float64 holds it anyway
    return acc * (np.float32(a_scale) * w_scale)


def _dynamic_lstm_as_ort(X, W, R, B, sequence_lens, initial_h, initial_c, W_scale, W_zero_point,  # noqa: N803
                         R_scale, R_zero_point, *, clip, direction, hidden, probe=None):
    T, batch, _ = X.shape  # noqa: N806
    H = int(hidden)  # noqa: N806
    nd = 2 if direction == "bidirectional" else 1
    lens = np.full(batch, T, np.int64) if sequence_lens is None else sequence_lens.astype(np.int64).reshape(-1)
    max_len = int(lens.max()) if batch else 0
    bound = np.float32(np.finfo(np.float32).max if clip is None else clip)
    y = np.zeros((T, nd, batch, H), np.float32)
    y_h = np.zeros((nd, batch, H), np.float32)
    y_c = np.zeros((nd, batch, H), np.float32)
    t_idx = np.arange(T)[:, None]
    # Probes, like LSTM's: [T, nd, B, H] in original time order, zero past each sequence's length.
    names = ("i", "o", "f", "c_tilde", "c", "h")
    traces = {n: np.zeros((T, nd, batch, H), np.float32) for n in names} if probe is not None else None
    for d in range(nd):
        reverse = direction == "reverse" or d == 1
        # ReverseSequence within each sequence's length; steps past it are copied as they are.
        order = np.where(t_idx < lens[None, :], lens[None, :] - 1 - t_idx, t_idx) if reverse else None
        x = X[order, np.arange(batch)[None, :]] if reverse else X
        ws = W_scale.astype(np.float32).reshape(nd, -1)[d]
        rs = R_scale.astype(np.float32).reshape(nd, -1)[d]
        w = _int_weight(W, W_zero_point, d)
        r = _int_weight(R, R_zero_point, d)
        iofc = _quantized_gemm(x[:max_len].reshape(max_len * batch, -1), w, ws).reshape(max_len, batch, 4 * H)
        bias = np.zeros(4 * H, np.float32) if B is None else (B[d, :4 * H] + B[d, 4 * H:]).astype(np.float32)
        h = np.zeros((batch, H), np.float32) if initial_h is None else initial_h[d].astype(np.float32).copy()
        c = np.zeros((batch, H), np.float32) if initial_c is None else initial_c[d].astype(np.float32).copy()
        outs = np.zeros((T, batch, H), np.float32)
        for t in range(max_len):
            g = iofc[t] + _quantized_gemm(h, r, rs)
            g = np.maximum(np.minimum(g + bias, bound), -bound)
            i, o, f = (sigmoid_array(g[:, k * H:(k + 1) * H]) for k in range(3))
            cand = np.tanh(g[:, 3 * H:])
            active = (t < lens)[:, None]
            c = np.where(active, c * f + i * cand, c)
            # Finished rows emit zeros, and their zeroed output is the next step's h (ORT).
            h = np.where(active, np.tanh(c) * o, np.float32(0))
            outs[t] = h
            if traces is not None:
                for name, value in zip(names, (i, o, f, cand, c, h)):
                    step = np.where(active, value, np.float32(0))
                    row = lens - 1 - t if reverse else np.full(batch, t)  # original time of this step
                    keep = row >= 0
                    traces[name][row[keep], d, np.arange(batch)[keep]] = step[keep]
            last = (t + 1 == lens)[:, None]
            y_h[d] = np.where(last, h, y_h[d])
            y_c[d] = np.where(last, c, y_c[d])
        y[:, d] = outs[order, np.arange(batch)[None, :]] if reverse else outs
    if traces is not None:
        probe.update(traces)
    return y, y_h, y_c
