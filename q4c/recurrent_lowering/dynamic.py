"""LSTM with 8-bit weights as com.microsoft DynamicQuantizeLSTM (INT8 per-channel W and R).

DynamicQuantizeLSTM (ONNX Runtime ContribOperators.md) takes W [nd, I, 4H] and R [nd, H, 4H]
int8 (transposed from ONNX LSTM's [nd, 4H, I]) with scales and zero points of shape [nd, 4H]
(per output channel over the whole input axis) or [nd]; X and h are quantized to uint8 on the
fly. It has no `layout` attribute, so batch-first layers get Transposes around it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import numpy_helper

from q4c import graph as g
from q4c.quant.qparams import quantize
from q4c.recurrent_lowering.emit import Emitter
from q4c.recurrent_lowering.layer import RecurrentLayer, Weight


@dataclass(frozen=True)
class Requantized:
    """A weight whose block-wise INT8 codes were re-quantized per channel (what the op takes)."""

    codes_name: str
    noise: float  # squared error the re-quantization added (sum over elements)


def per_channel_int8(weights: list[Weight]) -> tuple[np.ndarray, np.ndarray, Requantized | None]:
    """[nd, K, N] int8 codes and [nd, N] float32 scales for the op, from per-direction [N, K]
    8-bit weights. Per-channel codes are reused exactly; block-wise ones are re-quantized from
    their dequantized values (per channel, MSE-clipped), and the added error is reported."""
    codes, scales = [], []
    noise = 0.0
    for w in weights:
        assert w.quantized and w.bits == 8
        if w.scale.shape[1] == 1:
            codes.append(w.codes)
            scales.append(w.scale[:, 0].astype(np.float32))
            continue
        values = w.dequantize()
        qw = quantize(values, 8, granularity="channel", axis=0)
        noise += float(np.sum(np.square(qw.dequantize() - values, dtype=np.float64)))
        codes.append(qw.q)
        scales.append(qw.scale.astype(np.float32))
    stacked = np.stack([c.T for c in codes]).astype(np.int8)
    requant = Requantized(weights[0].codes_name, noise) if any(w.scale.shape[1] != 1 for w in weights) else None
    return np.ascontiguousarray(stacked), np.stack(scales), requant


def lower_to_dynamic_lstm(layer: RecurrentLayer, e: Emitter) -> list[Requantized]:
    """Replace `layer.node` (an LSTM with 8-bit W and R) by DynamicQuantizeLSTM."""
    graph, node = layer.graph, layer.node
    w_codes, w_scale, w_req = per_channel_int8(layer.w)
    r_codes, r_scale, r_req = per_channel_int8(layer.r)
    zp = np.zeros_like(w_scale, dtype=np.int8)
    x = layer.x

    def batch_major(t: gs.Tensor | None) -> gs.Tensor | None:  # layout 1 state [B, nd, H] -> [nd, B, H]
        return None if t is None else e.one(graph, "Transpose", [t], attrs={"perm": [1, 0, 2]})

    h0, c0 = layer.initial_h, layer.initial_c
    if layer.layout:
        x = e.one(graph, "Transpose", [x], attrs={"perm": [1, 0, 2]})
        h0, c0 = batch_major(h0), batch_major(c0)
    bias = node.inputs[3] if layer.bias is not None else None
    outs = [e.var(f"out{i}") if (out is not None and layer.layout) else (out or gs.Variable.empty())
            for i, out in enumerate(layer.outputs)]
    e.node(graph, "DynamicQuantizeLSTM", [
        x, e.const("W_int8", w_codes), e.const("R_int8", r_codes), bias, layer.sequence_lens, h0, c0, None,
        e.const("W_scale", w_scale), e.const("W_zero_point", zp), e.const("R_scale", r_scale),
        e.const("R_zero_point", np.zeros_like(r_scale, dtype=np.int8)),
    ], outs, attrs={"hidden_size": layer.hidden, "direction": layer.direction}, domain=g.MS_DOMAIN)
    if layer.layout:
        perms = ([2, 0, 1, 3], [1, 0, 2], [1, 0, 2])  # Y [T, nd, B, H] -> [B, T, nd, H]; states [B, nd, H]
        for out, tmp, perm in zip(layer.outputs, outs, perms):
            if out is not None:
                e.one(graph, "Transpose", [tmp], attrs={"perm": perm}, out=out)
    node.inputs.clear()
    node.outputs.clear()
    return [r for r in (w_req, r_req) if r is not None]


def dequantized_lstm_copy(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of `model` with every DynamicQuantizeLSTM replaced by an ONNX LSTM on its
    dequantized weights, for equivalence checks.

    ONNX Runtime quantizes X and h to uint8 inside DynamicQuantizeLSTM; q4c.interp does the same,
    and the two agree exactly until a value lands within float rounding of a uint8 rounding
    boundary (MLAS's activation kernels differ from numpy's in the last bit), after which they
    drift apart by about one quantization step (measured: exact for 50 steps of rnnt_encoder at
    --bits 8, then 0.011). Checks that need float32 agreement (interpreter vs ONNX Runtime) run
    on this copy, as they run MatMulNBits at accuracy_level 0.
    """
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for graph in g.iter_graph_protos(out.graph):
        inits = {t.name: t for t in graph.initializer}
        for node in graph.node:
            if node.op_type != "DynamicQuantizeLSTM" or node.domain != g.MS_DOMAIN:
                continue
            args = list(node.input) + [""] * (12 - len(node.input))
            if any(args[k] not in inits for k in (1, 2, 8, 9, 10, 11)):
                continue  # weights computed at run time: nothing to fold
            for index, (w, scale, zp) in ((1, (1, 8, 9)), (2, (2, 10, 11))):
                codes = numpy_helper.to_array(inits[args[w]]).astype(np.float32)  # [nd, K, 4H]
                nd = codes.shape[0]
                s = numpy_helper.to_array(inits[args[scale]]).astype(np.float32).reshape(nd, 1, -1)
                z = numpy_helper.to_array(inits[args[zp]]).astype(np.float32).reshape(nd, 1, -1)
                name = f"{node.name or node.output[0]}/{'W' if index == 1 else 'R'}_dequantized"
                graph.initializer.append(numpy_helper.from_array(
                    np.ascontiguousarray(((codes - z) * s).transpose(0, 2, 1)), name))
                args[index] = name
            del node.input[:]
            node.input.extend(args[:8])
            while node.input and node.input[-1] == "":
                node.input.pop()
            node.op_type = "LSTM"
            node.domain = ""
    return out
