"""Error-compensating rounding (GPTQ: Frantar et al., 2023) with q4c's scales and storage.

Rounding each weight to its nearest level (what the "symmetric" scheme does) minimizes the
weight error; what matters is the error of the layer's output, W x over the inputs the layer
actually sees. With H = E[x x^T] over calibration inputs (the "Hessian" of that squared output
error), GPTQ quantizes the reduction axis one column at a time and pushes each column's rounding
error onto the columns not yet quantized, in proportion to how the inputs correlate
(the rows of the inverse Hessian's Cholesky factor). Codes, scales and block layout are exactly
those of `qparams.quantize`, so the stored form and the ONNX graph do not change; each block's
scale is chosen (MSE clipping, signed scales) from the already-updated weights when the column
loop reaches the block.

Input statistics per weight role (`input_hessians`): MatMul B and Gemm B: the other operand;
LSTM/GRU/RNN W: the sequence input X; LSTM/GRU/RNN R: the layer's own hidden-state sequence Y
(read through a temporary output name where the graph leaves Y unread), one Hessian per direction; Conv (1-D and 2-D, group 1, explicit pads): the input patches each
output position reads (im2col), one row of C_in x kernel values per position, in the order of
W.reshape(C_out, -1) (`q4c.quant.gptq_conv`). Inputs inside If branches are read through extra
If outputs (`q4c.quant.lift`); a weight several nodes read (one LSTM in each branch of an If, as
Silero VAD exports have) gets one Hessian over all their inputs. Weights read inside Loop/Scan
bodies, other convolutions and embeddings get no Hessian and so no "gptq" candidate.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import numpy as np
import onnx

from q4c import graph as g
from q4c import ort as q4ort
from q4c.quant.conv_patches import ConvGeometry, conv_geometry, conv_patches
from q4c.quant.lift import lifted
from q4c.quant.qparams import QuantizedWeight, _quantize_groups, qrange

#: Dampening added to H's diagonal, relative to its mean: keeps the inverse well conditioned
#: where inputs are nearly collinear (the GPTQ paper's 1 %).
DAMP = 0.01
#: Calibration calls whose activations enter the Hessians: the first MAX_SAMPLES, then, while some
#: Hessian has fewer than MIN_ROWS_PER_COLUMN rows per column (a streaming model's call is one
#: LSTM step and a few Conv positions: 8 calls were 8 rows for a 128-wide LSTM state, a Hessian of
#: rank 8), calls spread evenly over the sequences already scored (`fitting_calls`), at most
#: MAX_CALLS in all.
MAX_SAMPLES = 8
#: Prefix of the name a recurrent node's unread Y output gets while the Hessians read it
UNREAD_Y = "q4c.gptq.Y/"
MIN_ROWS_PER_COLUMN = 4
MAX_CALLS = 1024
SPREAD = 16
#: Columns a lazy batch of `gptq_ranges` updates at once (the GPTQ paper's B = 128)
LAZY_COLUMNS = 128


def error_spread(hessian: np.ndarray, w: np.ndarray, *, zero_dead: bool = True) -> np.ndarray:
    """GPTQ's set-up for one weight w [rows, k] (float64, edited in place): inputs the layer never
    saw (zero Hessian diagonal: `dead_columns`) get a unit diagonal (and, with `zero_dead`, weight
    0), the diagonal is dampened by DAMP x its mean, and the result is the upper Cholesky factor
    of H^-1, whose row j holds how column j's rounding error spreads to the later columns (a dead
    column's row and column are zero off the diagonal: its error goes nowhere, none comes to it)."""
    h = np.array(hessian, dtype=np.float64)
    dead = dead_columns(h)
    h[dead, dead] = 1.0
    if zero_dead:
        w[:, dead] = 0.0
    h[np.diag_indices(len(h))] += DAMP * float(np.mean(np.diag(h)))
    inv = np.linalg.inv(h)
    return np.linalg.cholesky((inv + inv.T) / 2).T


def dead_columns(hessian: np.ndarray) -> np.ndarray:
    """Columns no calibration input reached (zero diagonal of H)."""
    return np.diag(hessian) <= 0


def gptq_rows(w: np.ndarray, hessian: np.ndarray, bits: int, block: int, clip_ratios: tuple[float, ...],
              scale_dtype: type) -> tuple[np.ndarray, np.ndarray]:
    """Quantize w [rows, k] along k (blocks of `block` columns, one scale per row and block).
    Returns (codes int8 [rows, k], scales [rows, ceil(k / block)] in `scale_dtype`)."""
    k = w.shape[1]
    return gptq_ranges(w, hessian, bits, [(lo, min(lo + block, k)) for lo in range(0, k, block)], block,
                       clip_ratios, scale_dtype)


def gptq_ranges(w: np.ndarray, hessian: np.ndarray, bits: int, ranges: Sequence[tuple[int, int]], width: int,
                clip_ratios: tuple[float, ...], scale_dtype: type) -> tuple[np.ndarray, np.ndarray]:
    """`gptq_rows` with one scale per row and column range (`ranges`: consecutive [lo, hi) covering
    the columns in order, each at most `width` long; a shorter one is scaled as if zero-padded to
    `width`, as qparams pads the last block). Returns (codes [rows, k], scales [rows, len(ranges)])."""
    w = np.array(w, dtype=np.float64)
    rows, k = w.shape
    dead = dead_columns(np.asarray(hessian))
    u = error_spread(hessian, w, zero_dead=False)
    qmin, qmax = qrange(bits)
    codes = np.zeros((rows, k), np.int8)
    scales = np.zeros((rows, len(ranges)), np.float32)
    errs = np.zeros_like(w)
    # Lazy batch updates (the GPTQ paper's): a column's error reaches the columns of its batch at
    # once and the columns beyond in one product when the batch ends, instead of one rank-1
    # update of every later column per column. A range starts a new batch when it would cross
    # the batch's end, so each scale is fitted to fully updated weights.
    start = end = 0
    for b, (lo, hi) in enumerate(ranges):
        if hi > end:
            w[:, end:] -= errs[:, start:lo] @ u[start:lo, end:]
            start, end = lo, min(k, max(lo + LAZY_COLUMNS, hi))
        # Each block's scale is fitted to the columns calibration reached; the others (dead ReLU
        # inputs, say) keep their nearest level in that range rather than zero: the output on the
        # calibration inputs is the same, and inputs that do reach them stay close to FP32.
        live = ~dead[lo:hi] if not dead[lo:hi].all() else np.ones(hi - lo, bool)
        group = np.zeros((rows, width), np.float32)
        group[:, : hi - lo] = w[:, lo:hi] * live
        _, scale = _quantize_groups(group, bits, clip_ratios, scale_dtype)
        s = scale.astype(np.float64)
        scales[:, b] = scale.astype(np.float32)
        for j in range(lo, hi):
            q = np.clip(np.rint(w[:, j] / s), qmin, qmax)
            codes[:, j] = q
            err = (w[:, j] - q * s) / u[j, j]
            errs[:, j] = err
            w[:, j + 1 : end] -= np.outer(err, u[j, j + 1 : end])
    return codes, scales.astype(scale_dtype)


def gptq_quantize(w: np.ndarray, hessians: Sequence[np.ndarray], bits: int, *, axis: int, block_size: int,
                  clip_ratios: tuple[float, ...], scale_dtype: type) -> QuantizedWeight:
    """Block-wise quantization of `w` along `axis` (the reduction axis) with GPTQ rounding.

    `hessians` holds one [k, k] matrix, or one per index of w's first axis (LSTM directions)."""
    w = np.asarray(w, dtype=np.float32)
    axis %= w.ndim
    moved = np.moveaxis(w, axis, -1)
    k = moved.shape[-1]
    lead = moved.reshape((moved.shape[0], -1, k)) if len(hessians) > 1 else moved.reshape((1, -1, k))
    if len(hessians) not in (1, lead.shape[0]):
        raise ValueError(f"{len(hessians)} Hessians for a weight with {lead.shape[0]} leading slices")
    codes, scales = [], []
    for i in range(lead.shape[0]):
        c, s = gptq_rows(lead[i], hessians[i if len(hessians) > 1 else 0], bits, block_size, clip_ratios, scale_dtype)
        codes.append(c)
        scales.append(s)
    q = np.moveaxis(np.stack(codes).reshape(moved.shape), -1, axis)
    nb = -(-k // block_size)
    scale = np.moveaxis(np.stack(scales).reshape(moved.shape[:-1] + (nb,)), -1, axis)
    return QuantizedWeight(np.ascontiguousarray(q), np.ascontiguousarray(scale), bits, axis, block_size)


# -- input statistics -------------------------------------------------------------------------

def activation_of(slot) -> tuple[str, str | ConvGeometry] | None:
    """(tensor name, how to read it) of the inputs `slot`'s weight multiplies, or None. How:
    "rows" (the last axis is the reduction axis), "directions" (LSTM/GRU/RNN Y, one Hessian per
    direction) or a Conv's geometry (its input patches)."""
    node = slot.node
    if slot.role == "conv":
        geom = conv_geometry(node.attrs, tuple(slot.tensor.shape))
        return None if geom is None else (node.inputs[0].name, geom)
    if slot.role in ("matmul_b", "gemm_b"):
        if slot.role == "gemm_b" and int(node.attrs.get("transA", 0)):
            return None
        return node.inputs[0].name, "rows"
    if slot.role in ("lstm_w", "gru_w", "rnn_w") and int(node.attrs.get("layout", 0)) == 0:
        return node.inputs[0].name, "rows"
    if slot.role in ("lstm_r", "gru_r", "rnn_r") and int(node.attrs.get("layout", 0)) == 0:
        if node.outputs and node.outputs[0].name:
            return node.outputs[0].name, "directions"  # Y [T, D, B, H]
        if node.name:  # Y unread (a streaming cell returning only Y_h/Y_c): named while it is read
            return UNREAD_Y + node.name, "directions"
    return None


def activations_of(slot) -> list[tuple[str, str | ConvGeometry]]:
    """`activation_of` for every node that reads `slot`'s weight in `slot`'s role (the weight's
    Hessian is taken over all of their inputs), or [] when one of them cannot be observed."""
    readers = [dataclasses.replace(slot, node=node) for node in slot.tensor.outputs
               if node.op == slot.node.op and len(node.inputs) > slot.index and node.inputs[slot.index] is slot.tensor]
    found = [activation_of(reader) for reader in readers or [slot]]
    return [] if any(a is None for a in found) else sorted(set(found), key=str)  # type: ignore[arg-type]


def _name_unread_outputs(model: onnx.ModelProto, tensors: set[str]) -> list[tuple[onnx.NodeProto, int]]:
    """Give the recurrent nodes whose unread Y is wanted (`UNREAD_Y` + node name) that output name,
    in place, in the main graph and its subgraphs; returns (node, outputs it had) to undo it with `_unname`."""
    named = []
    for graph in g.iter_graph_protos(model.graph):
        for node in graph.node:
            name = UNREAD_Y + node.name
            if node.op_type in ("LSTM", "GRU", "RNN") and name in tensors and not (node.output and node.output[0]):
                named.append((node, len(node.output)))
                if node.output:
                    node.output[0] = name
                else:
                    node.output.append(name)
    return named


def _unname(named: list[tuple[onnx.NodeProto, int]]) -> None:
    for node, count in named:
        if count:
            node.output[0] = ""
        else:
            del node.output[:]


def input_hessians(model: onnx.ModelProto, slots: Mapping[str, object],
                   samples: Sequence[Mapping[str, np.ndarray]],
                   extra: Sequence[Mapping[str, np.ndarray]] = ()) -> dict[str, list[np.ndarray]]:
    """H = mean of x x^T over the calibration inputs of each slot's weight (by weight name; over
    the inputs of every node reading it), from one ONNX Runtime session with the activations as
    extra outputs (those inside If branches lifted to the main graph). `slots`: see
    sensitivity.gptq_eligible; weights with an input that cannot be observed are left out, and so
    are those whose inputs no call computed (a branch never taken) or gave fewer rows than the
    Hessian has columns (it would be rank-deficient: error compensation would fit those few
    inputs and zero every direction they miss, as a single synthetic sample would make it).
    The first MAX_SAMPLES calls of `samples` are read, then calls of `extra` (those already read
    skipped; see `fitting_calls`) while some Hessian has too few rows (MIN_ROWS_PER_COLUMN)."""
    wanted = {name: found for name, slot in slots.items() if (found := activations_of(slot))}
    if not wanted or not samples:
        return {}
    # the activations become extra outputs of `model` itself while the session is made (a copy
    # of the model would be a copy of every weight), then the outputs are put back
    tensors = {t for found in wanted.values() for t, _ in found}
    named = _name_unread_outputs(model, tensors)
    try:
        with lifted(model, tensors) as names:
            session = q4ort.make_session(model, threads=1)
    finally:
        _unname(named)
    wanted = {name: found for name, found in wanted.items() if all(t in names for t, _ in found)}
    reads = {(t, h) for found in wanted.values() for t, h in found}
    sums: dict[str, list[np.ndarray]] = {}
    counts: dict[str, int] = {}
    for feeds, added in _calls(samples, extra, sums, counts):
        values = q4ort.run(session, feeds)
        for tensor, how in reads:
            key = f"{tensor}|{how}"
            if added and _full(key, sums, counts):
                continue  # each Hessian reads added calls only until it has its rows: the same
                # Hessian whichever other weights are wanted (a replayed plan asks for fewer)
            x = np.asarray(values[names[tensor]], dtype=np.float64)
            if x.size == 0:
                continue  # computed in an If branch this call did not take
            if isinstance(how, ConvGeometry):
                parts = [conv_patches(x, how)]
            elif how == "rows":
                parts = [x.reshape(-1, x.shape[-1])]
            else:
                parts = [np.moveaxis(x, 1, 0)[d].reshape(-1, x.shape[-1]) for d in range(x.shape[1])]
            acc = [p.T @ p for p in parts]
            sums[key] = acc if key not in sums else [a + b for a, b in zip(sums[key], acc, strict=True)]
            counts[key] = counts.get(key, 0) + parts[0].shape[0]
    for key in [k for k, acc in sums.items() if counts[k] < len(acc[0])]:
        del sums[key]  # fewer rows than columns: rank-deficient, rounding would fit those rows only
    keys = {name: [k for t, h in found if (k := f"{t}|{h}") in sums] for name, found in wanted.items()}
    # several readers: one Hessian over all their inputs (summed before the sums are divided)
    out = {name: [sum(parts) / sum(counts[k] for k in ks) for parts in zip(*(sums[k] for k in ks), strict=True)]
           for name, ks in keys.items() if len(ks) > 1}
    for key, acc in sums.items():  # divided in place: no second copy of every statistic
        for s in acc:
            s /= counts[key]
    out.update({name: sums[ks[0]] for name, ks in keys.items() if len(ks) == 1})  # readers of one input share it
    return out


def fitting_calls(sequences: Sequence[Sequence[Mapping[str, np.ndarray]]] | None,
                  scored_units: int) -> list[Mapping[str, np.ndarray]]:
    """The calls input_hessians may add (its `extra`): those of the sequences the per-tensor scores
    already run on (the first `scored_units`, at most the first half, which --require and the
    uniform-4-bit guard never judge on), so statistics never come from held-out units."""
    units = list(sequences or [])
    return [call for unit in units[: min(scored_units, len(units) - len(units) // 2)] for call in unit]


def _calls(samples: Sequence[Mapping[str, np.ndarray]], extra: Sequence[Mapping[str, np.ndarray]],
           sums: Mapping[str, list[np.ndarray]], counts: Mapping[str, int]):
    """(call, added) for each call input_hessians runs; reads `sums`/`counts` as they fill. The extra calls are
    every step-th of `extra`, visited coarse to fine (every SPREAD-th of them first), so stopping
    early still samples all of it."""
    first = samples[:MAX_SAMPLES]
    for call in first:
        yield call, False
    seen = {id(call) for call in first}
    rest = [call for call in extra if id(call) not in seen]
    chosen = rest[:: max(1, -(-len(rest) // (MAX_CALLS - len(first))))]
    for offset in range(SPREAD):
        for call in chosen[offset::SPREAD]:
            if all(_full(k, sums, counts) for k in counts):
                return
            yield call, True


def _full(key: str, sums: Mapping[str, list[np.ndarray]], counts: Mapping[str, int]) -> bool:
    return key in counts and counts[key] >= MIN_ROWS_PER_COLUMN * len(sums[key][0])
