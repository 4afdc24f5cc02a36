"""Node emission for the recurrent lowerings: unique names, constants, and x·Wᵀ as MatMulNBits."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx_graphsurgeon as gs
from onnx import TensorProto

from q4c import graph as g
from q4c.names import NameGenerator
from q4c.quant.packing import kernel_bits, matmulnbits_weights
from q4c.quant.qparams import QuantizedWeight
from q4c.recurrent_lowering.layer import Weight

#: MLAS block sizes MatMulNBits runs.
KERNEL_BLOCKS = (16, 32, 64, 128, 256)
#: int8 activation compute: ORT-NOTES measures it fastest at every M, ~0.5 % extra error.
ACCURACY_LEVEL = 4


def kernel_block(weight: Weight) -> int | None:
    """The MatMulNBits block size that reproduces `weight`'s scales, or None if none does.

    A block spanning all K inputs (per channel) rides in the smallest kernel block >= K, the
    codes zero-padded.
    """
    if weight.block in KERNEL_BLOCKS:
        return weight.block
    if weight.scale is not None and weight.scale.shape[1] == 1:
        return next((b for b in KERNEL_BLOCKS if b >= weight.shape[1]), None)
    return None


class Emitter:
    """Appends nodes to graphs of one model, with tensor and node names unique in all of it."""

    def __init__(self, root: gs.Graph, prefix: str) -> None:
        self.name = NameGenerator(root, prefix)

    def const(self, base: str, values: np.ndarray) -> gs.Constant:
        values = np.asarray(values)  # (np.ascontiguousarray would turn a scalar into shape [1])
        return g.make_constant(self.name(base), values if values.flags.c_contiguous else values.copy(order="C"))

    def var(self, base: str, dtype: type = np.float32) -> gs.Variable:
        return gs.Variable(self.name(base), dtype=dtype)

    def node(self, graph: gs.Graph, op: str, inputs: Sequence[gs.Tensor | None], outputs: int | Sequence[gs.Variable] = 1,
             *, attrs: dict | None = None, domain: str | None = None, dtype: type = np.float32) -> list[gs.Variable]:
        outs = [self.var(f"{op}_out", dtype) for _ in range(outputs)] if isinstance(outputs, int) else list(outputs)
        ins = [gs.Variable.empty() if t is None else t for t in inputs]
        graph.nodes.append(gs.Node(op, self.name(op), attrs=dict(attrs or {}), inputs=ins, outputs=outs, domain=domain))
        return outs

    def one(self, graph: gs.Graph, op: str, inputs: Sequence[gs.Tensor | None], *, attrs: dict | None = None,
            domain: str | None = None, dtype: type = np.float32, out: gs.Variable | None = None) -> gs.Variable:
        return self.node(graph, op, inputs, [out] if out is not None else 1, attrs=attrs, domain=domain, dtype=dtype)[0]

    def ints(self, base: str, values: Sequence[int]) -> gs.Constant:
        return self.const(base, np.asarray(values, np.int64))

    def matmul(self, graph: gs.Graph, a: gs.Tensor, weight: Weight, bias: np.ndarray | None, base: str) -> gs.Variable:
        """a·weightᵀ (+ bias): MatMulNBits for a quantized weight (scales kept float16 in the
        file when they were, cast at load), else MatMul on a [K, N] float constant."""
        n, k = weight.shape
        if not weight.quantized:
            y = self.one(graph, "MatMul", [a, self.const(f"{base}_kn", weight.values.T.astype(np.float32))])
            if bias is not None and np.any(bias):
                y = self.one(graph, "Add", [y, self.const(f"{base}_bias", bias.astype(np.float32))])
            return y
        block = kernel_block(weight)
        assert block is not None, "callers check kernel_block() first"
        qw = QuantizedWeight(weight.codes.T, weight.scale.T, weight.bits, 0, block)
        packed, scales = matmulnbits_weights(qw)
        s: gs.Tensor = self.const(f"{base}_scale", scales.reshape(-1))
        if s.dtype != np.float32:
            # MatMulNBits takes scales of A's type; ONNX Runtime folds this Cast at load.
            s = self.one(graph, "Cast", [s], attrs={"to": TensorProto.FLOAT})
        inputs: list[gs.Tensor | None] = [a, self.const(f"{base}_nbits", packed), s]
        if bias is not None and np.any(bias):
            inputs += [None, None, self.const(f"{base}_bias", bias.astype(np.float32))]
        return self.one(graph, "MatMulNBits", inputs, domain=g.MS_DOMAIN, attrs={
            "K": k, "N": n, "bits": kernel_bits(weight.bits), "block_size": block, "accuracy_level": ACCURACY_LEVEL})
