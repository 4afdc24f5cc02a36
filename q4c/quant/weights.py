"""Where the quantizable weights are: which input of which op, and how its axes are laid out."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from q4c import graph as g
from q4c.config import CODEBOOK_SCHEMES, Granularity
from q4c.errors import ConfigError
from q4c.quant.codebook import CodebookWeight, quantize_codebook
from q4c.quant.gptq import gptq_quantize
from q4c.quant.gptq_conv import gptq_conv
from q4c.quant.qparams import CLIP_RATIOS, QuantizedWeight, quantize

#: Roles whose weights ONNX Runtime computes in low bits; its kernels need float32 scales.
FLOAT32_SCALE_ROLES = frozenset({"matmul_b", "matmul_a", "gemm_b", "embedding"})


@dataclass(frozen=True)
class WeightSlot:
    """A float constant feeding input `index` of `node` in `graph`.

    `channel_axis` indexes the output channels (one scale each per channel); `reduce_axis` is the
    axis summed over by the op, along which blocks of scales are taken. For LSTM/GRU/RNN the
    4H/3H/H axis is the channel axis, so no scale ever spans two gates, and leading direction
    axes keep their own scales.
    """

    graph: gs.Graph
    node: gs.Node
    index: int
    role: str  # "matmul_b", "matmul_a", "gemm_b", "conv", "conv_transpose", "lstm_w", ..., "embedding", "einsum"
    channel_axis: int
    reduce_axis: int

    @property
    def tensor(self) -> gs.Constant:
        return self.node.inputs[self.index]  # type: ignore[return-value]


def _const(node: gs.Node, index: int) -> gs.Constant | None:
    if index < len(node.inputs) and g.is_float_constant(node.inputs[index]):
        return node.inputs[index]  # type: ignore[return-value]
    return None


def find_weight_slots(root: gs.Graph) -> Iterator[WeightSlot | tuple[gs.Node, str]]:
    """Every quantizable weight input in the graph and its subgraphs, or (node, reason) for a
    weight-bearing node that is declined (reason is a stable stats key)."""
    for graph in g.iter_graphs(root):
        for node in graph.nodes:
            yield from _slots(graph, node)


def _slots(graph: gs.Graph, node: gs.Node) -> Iterator[WeightSlot | tuple[gs.Node, str]]:
    op = node.op
    if node.domain not in ("", "ai.onnx", None):
        return
    if op == "MatMul":
        b, a = _const(node, 1), _const(node, 0)
        if b is not None and a is None:
            if b.values.ndim != 2:
                yield node, "skipped_batched_weight"
            else:
                yield WeightSlot(graph, node, 1, "matmul_b", channel_axis=1, reduce_axis=0)
        elif a is not None and b is None and a.values.ndim == 2:
            yield WeightSlot(graph, node, 0, "matmul_a", channel_axis=0, reduce_axis=1)
    elif op == "Gemm":
        if _const(node, 1) is not None and _const(node, 0) is None:
            trans_b = int(node.attrs.get("transB", 0))
            yield WeightSlot(graph, node, 1, "gemm_b", channel_axis=0 if trans_b else 1, reduce_axis=1 if trans_b else 0)
    elif op == "Conv":
        w = _const(node, 1)
        if w is not None:
            group = int(node.attrs.get("group", 1))
            if group > 1 and w.values.shape[1] == 1:
                # Depthwise kernels are tiny and no runtime has a low-bit depthwise kernel.
                yield node, "skipped_depthwise"
            else:
                yield WeightSlot(graph, node, 1, "conv", channel_axis=0, reduce_axis=1)
    elif op == "ConvTranspose":
        if _const(node, 1) is not None:
            yield WeightSlot(graph, node, 1, "conv_transpose", channel_axis=1, reduce_axis=0)
    elif op in ("LSTM", "GRU", "RNN"):
        # W [dirs, gates*H, I], R [dirs, gates*H, H]: ONNX RNN is the one-gate case.
        prefix = op.lower()
        for index, part in ((1, "w"), (2, "r")):
            if _const(node, index) is not None:
                yield WeightSlot(graph, node, index, f"{prefix}_{part}", channel_axis=1, reduce_axis=2)
    elif op == "Gather":
        data = _const(node, 0)
        if data is not None and not isinstance(node.inputs[1], gs.Constant):
            if data.values.ndim == 2 and int(node.attrs.get("axis", 0)) == 0:
                yield WeightSlot(graph, node, 0, "embedding", channel_axis=0, reduce_axis=1)
            else:
                yield node, "skipped_gather_layout"
    elif op == "Einsum":
        yield from _einsum_slots(graph, node)


def _einsum_slots(graph: gs.Graph, node: gs.Node) -> Iterator[WeightSlot | tuple[gs.Node, str]]:
    equation = str(node.attrs.get("equation", "")).replace(" ", "")
    lhs, _, out = equation.partition("->")
    terms = lhs.split(",")
    if "..." in equation or not out or len(terms) != len(node.inputs):
        yield node, "skipped_einsum_equation"
        return
    for index, term in enumerate(terms):
        w = _const(node, index)
        if w is None or any(_const(node, i) is not None for i in range(len(terms)) if i != index):
            continue
        reduce = [i for i, label in enumerate(term) if label not in out]
        keep = [i for i, label in enumerate(term) if label in out]
        if not reduce or not keep:
            yield node, "skipped_einsum_layout"
            continue
        yield WeightSlot(graph, node, index, "einsum", channel_axis=keep[-1], reduce_axis=reduce[-1])


def scale_layout(slot_shape: tuple[int, ...], slot: WeightSlot, kind: str, block: int,
                 block_axis: int | None = None) -> tuple[str, int, int]:
    """The (granularity, axis, block_size) to quantize with, given the requested granularity.

    "channel" on a weight with leading axes before the channel axis (LSTM directions, Einsum)
    becomes blocks spanning the whole reduction axis, so each direction keeps its own scales.
    A Conv weight's blocks run along `block_axis` when the plan names one (no longer than that
    axis), else along the axis conv_block_layout derives from the shape.
    """
    if kind == "tensor":
        return "tensor", 0, 0
    if kind == "channel":
        if slot.channel_axis != 0 and len(slot_shape) > 2:
            return "block", slot.reduce_axis, int(slot_shape[slot.reduce_axis])
        return "channel", slot.channel_axis, 0
    if slot.role == "conv" and len(slot_shape) >= 3:
        if block_axis is not None:
            return "block", block_axis, min(block, int(slot_shape[block_axis]))
        return conv_block_layout(slot_shape, block)
    n = int(slot_shape[slot.reduce_axis])
    return "block", slot.reduce_axis, min(block, max(n, 1)) if n < block else block


def conv_block_layout(shape: tuple[int, ...], block: int) -> tuple[str, int, int]:
    """Block axis of a Conv weight [O, I, K...]: I when I >= block; else the longest kernel axis
    when it is >= block (DequantizeLinear blocks along one axis); else one scale per output channel.

    Never a block shorter than asked: a block of n < `block` along an axis costs block/n times the
    scale bytes the requested size budgets (n = 1, Silero's [258, 1, 256] STFT basis along I, was
    a float16 scale per weight), while per-channel never costs more, and for [C, 1, K] with
    K < block it is exactly the grouping a block of K would give (one scale per channel).
    """
    if int(shape[1]) >= block:
        return "block", 1, block
    kernel = max(range(2, len(shape)), key=lambda a: (int(shape[a]), -a))
    if int(shape[kernel]) >= block:
        return "block", kernel, block
    return "channel", 0, 0


#: float16's largest finite value: a DequantizeLinear with float16 scales outputs float16, so a
#: weight beyond it (an export with a 1e5 weight) would dequantize to inf
FLOAT16_MAX = float(np.finfo(np.float16).max)


def float32_scales(slot: WeightSlot, kernel_scales: bool = True, values: np.ndarray | None = None) -> bool:
    """Float32 scales for weights ONNX Runtime's low-bit kernels read (unless no kernel will:
    `kernel_scales` False, --kernels fp32-at-load); float16 where only DequantizeLinear does,
    unless the weight (`values`, default the slot's constant) holds values float16 cannot (then
    float32, or the layer would dequantize to inf)."""
    if kernel_scales and slot.role in FLOAT32_SCALE_ROLES:
        return True
    if values is None:
        try:
            tensor = slot.tensor
        except IndexError:  # a slot whose node was rewritten since: nothing to measure
            return False
        values = tensor.values if isinstance(tensor, gs.Constant) else None
    return values is not None and values.size > 0 and float(np.max(np.abs(values))) > FLOAT16_MAX / 2


def quantize_slot(slot: WeightSlot, values: np.ndarray, bits: int, granularity: Granularity | str,
                  scheme: str = "symmetric", *, kernel_scales: bool = True,
                  hessians: list[np.ndarray] | None = None,
                  block_axis: int | None = None) -> QuantizedWeight | CodebookWeight:
    """Quantize a slot's weight as quantize-weights stores it: the granularity resolved for the
    slot's role, float16 scales where only DequantizeLinear reads them, float32 for kernels (see
    `float32_scales`); `scheme` "symmetric-absmax" keeps every group's largest weight (no clipping),
    "gptq" rounds with error compensation against `hessians` (block-wise granularity only; Conv
    weights also per channel: q4c.quant.gptq_conv).

    Codebook schemes ("mulaw", "kmeans", "nf4") return a CodebookWeight: tables per group of output
    channels (or nf4's scale blocks) as the granularity text names them, indices assigned
    GPTQ-style when `hessians` are given (q4c.quant.codebook). `block_axis`: a Conv weight's block
    axis from the plan (see scale_layout)."""
    if scheme in CODEBOOK_SCHEMES:  # a Conv's Hessian (over its patches) is not one codebooks assign against
        return quantize_codebook(values, bits, scheme, channel_axis=slot.channel_axis, reduce_axis=slot.reduce_axis,
                                 granularity=str(granularity), hessians=None if slot.role == "conv" else hessians)
    if isinstance(granularity, str):
        granularity = Granularity.parse(granularity)
    wide = float32_scales(slot, kernel_scales, values)
    gran = granularity.resolve(float32_scales=wide)
    kind, axis, block = scale_layout(values.shape, slot, gran.kind, gran.block, block_axis)
    if scheme == "gptq" and slot.role == "conv" and hessians is not None and kind != "tensor":
        return gptq_conv(values, hessians[0], bits, kind=kind, axis=axis, block_size=block, clip_ratios=CLIP_RATIOS,
                         scale_dtype=np.float32 if wide else np.float16)
    if scheme == "gptq":
        if hessians is None or kind != "block":
            raise ConfigError(f"{slot.tensor.name}: the gptq scheme needs calibration inputs and block-wise scales")
        return gptq_quantize(values, hessians, bits, axis=axis, block_size=block, clip_ratios=CLIP_RATIOS,
                             scale_dtype=np.float32 if wide else np.float16)
    return quantize(values, bits, granularity=kind, axis=axis, block_size=block,
                    scale_dtype=np.float32 if wide else np.float16,
                    clip_ratios=(1.0,) if scheme == "symmetric-absmax" else CLIP_RATIOS)


def element_count(tensor: gs.Constant) -> int:
    return int(np.prod(tensor.shape))
