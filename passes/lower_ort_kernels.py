"""Rewrite DequantizeLinear-fed MatMul and Gather into ONNX Runtime's low-bit kernels.

DQ(INT4) -> MatMul becomes com.microsoft MatMulNBits (weights stay 4-bit in memory and are
computed with int8 activations, 0.13-0.75x FP32 time); DQ -> Gather on an embedding table
becomes GatherBlockQuantized on uint8 data (DQ -> Gather dequantizes the whole table per call).

GatherBlockQuantized reads a 2-D table [V, D * bits / 8] (quantize_axis 1) and returns the rows
as Gather does. Only a table shared with a tied output projection's MatMulNBits takes that
kernel's 3-D layout [V, n_blocks, block * bits / 8], whose rows come out as [..., n_blocks,
block] and need Shape + Concat + Reshape: three nodes more per call, which made the 16 us RNN-T
prediction network 6-8 % slower than FP32.
"""

from __future__ import annotations

import hashlib

import numpy as np
import onnx_graphsurgeon as gs
from onnx import numpy_helper
from onnx_graphsurgeon.ir.tensor import LazyValues

from q4c import graph as g
from q4c.config import CompileOptions
from q4c.errors import PostconditionError
from q4c.pipeline import Artifact, Pass, PassContext, PassResult
from q4c.quant.packing import (
    gather_block_quantized_weights,
    kernel_bits,
    matmulnbits_weights,
)
from q4c.quant.plan import MATMULNBITS_FORMS, Form
from q4c.quant.qparams import QuantizedWeight

#: MLAS block sizes for MatMulNBits / GatherBlockQuantized.
_KERNEL_BLOCKS = (16, 32, 64, 128, 256)
#: int8 activation compute: ORT-NOTES measures it fastest at every M, ~0.5 % extra error.
ACCURACY_LEVEL = 4


class LowerOrtKernelsPass(Pass):
    """DQ -> MatMul to MatMulNBits, DQ -> Gather to GatherBlockQuantized, for the weights whose
    plan form says so (Form.MATMULNBITS / MATMULNBITS_ACC0 / GATHER_BLOCK_QUANTIZED, decided by
    choose-kernels); a form that cannot be emitted is an error, never a silent DQ.

    Requires: the plan's forms for the quantized weights.  Stats: matmulnbits, gather_block_quantized.
    """

    name = "lower-ort-kernels"

    def needs(self, options: CompileOptions) -> frozenset[Artifact]:
        return frozenset({Artifact.FORMS})

    def requires(self, graph: gs.Graph, ctx: PassContext) -> None:
        ctx.require_forms(self.name)

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        forms = ctx.forms_by_codes()
        bits_of = {q.codes: q.bits for q in ctx.quantized if q.has_codes}
        self._packed: dict[str, gs.Constant] = {}  # content hash -> packed initializer, shared
        stats = {"matmulnbits": 0, "gather_block_quantized": 0}
        dqs = [(sub, n) for sub in g.iter_graphs(graph) for n in sub.nodes if n.op == "DequantizeLinear"]
        # MatMulNBits first: an embedding whose packed table one of them holds (tied) shares it
        for wanted in (set(MATMULNBITS_FORMS), {Form.GATHER_BLOCK_QUANTIZED}):
            for sub, dq in dqs:
                form = forms.get(dq.inputs[0].name)
                if form in wanted:
                    stats[self._lower(graph, sub, dq, form, bits_of, stats)] += 1
        changed = stats["matmulnbits"] + stats["gather_block_quantized"]
        return PassResult(changed > 0, {k: v for k, v in stats.items() if v})

    def _lower(self, graph: gs.Graph, sub: gs.Graph, dq: gs.Node, form: Form, bits_of: dict[str, int],
               stats: dict[str, int]) -> str:
        """Emit the plan's kernel for one DQ: the stats key done, or PostconditionError."""
        qw = _quantized_weight(dq, bits_of)
        users = g.consumers(dq.outputs[0])
        if qw is None or not users:
            raise PostconditionError(f"{dq.inputs[0].name}: the plan's form {form.value!r} needs a constant "
                                     f"DequantizeLinear without zero point feeding the op")
        if form in MATMULNBITS_FORMS and all(u.op == "MatMul" and u.inputs[1] is dq.outputs[0] for u in users):
            done = self._to_matmulnbits(graph, sub, dq, qw, users, MATMULNBITS_FORMS[form])
        elif form is Form.GATHER_BLOCK_QUANTIZED and all(
                u.op == "Gather" and u.inputs[0] is dq.outputs[0] and int(u.attrs.get("axis", 0)) == 0 for u in users):
            done = self._to_gather(graph, dq, qw, users)
        else:
            done = "skipped_consumers"
        if done not in stats:
            raise PostconditionError(f"{dq.inputs[0].name}: the plan's form {form.value!r} cannot be emitted ({done})")
        return done

    @staticmethod
    def _key(packed: np.ndarray) -> str:
        return hashlib.sha1(packed.tobytes() + str(packed.shape).encode()).hexdigest()

    def _shared(self, root: gs.Graph, name: str, packed: np.ndarray) -> gs.Constant:
        """One initializer per distinct packed table: a tied embedding and output projection
        quantize to identical codes, so they share the bytes."""
        key = self._key(packed)
        if key not in self._packed:
            self._packed[key] = g.make_constant(g.unique_name(root, name), packed)
        return self._packed[key]

    def _to_matmulnbits(self, root: gs.Graph, sub: gs.Graph, dq: gs.Node, qw: QuantizedWeight, users: list[gs.Node],
                        accuracy_level: int = ACCURACY_LEVEL) -> str:
        if qw.q.ndim != 2:
            return "skipped_layout"
        k, n = qw.q.shape
        if qw.block_size == 0 and qw.scale.ndim == 1 and qw.axis == 1:
            # Per output channel = one block spanning K, if a kernel block size covers K.
            block = next((b for b in _KERNEL_BLOCKS if b >= k), None)
            if block is None:
                return "skipped_block_size"
            qw = QuantizedWeight(qw.q, qw.scale.reshape(1, n), qw.bits, 0, block)
        elif qw.axis != 0 or qw.block_size not in _KERNEL_BLOCKS:
            return "skipped_block_size"
        packed, scales = matmulnbits_weights(qw)
        base = dq.inputs[0].name
        b = self._shared(root, f"{base}_nbits", packed)
        s = gs.Constant(g.unique_name(root, f"{base}_nbits_scale"), scales.reshape(-1).astype(np.float32))
        for mm in users:
            a, out = mm.inputs[0], mm.outputs[0]
            mm.inputs.clear()
            mm.outputs.clear()
            mm_graph = _graph_of(root, mm) or sub
            mm_graph.nodes.append(gs.Node(
                "MatMulNBits", mm.name, domain=g.MS_DOMAIN, inputs=[a, b, s], outputs=[out],
                attrs={"K": k, "N": n, "bits": kernel_bits(qw.bits), "block_size": qw.block_size,
                       "accuracy_level": accuracy_level},
            ))
        return "matmulnbits"

    def _to_gather(self, root: gs.Graph, dq: gs.Node, qw: QuantizedWeight, users: list[gs.Node]) -> str:
        if qw.q.ndim != 2 or qw.axis != 1 or qw.block_size not in _KERNEL_BLOCKS:
            return "skipped_block_size"
        width = qw.q.shape[1]
        if width % qw.block_size:
            return "skipped_layout"
        data, scales = gather_block_quantized_weights(qw)
        base = dq.inputs[0].name
        if self._key(data) not in self._packed:  # not a MatMulNBits table: the 2-D layout, rows out as Gather's
            d = self._shared(root, f"{base}_nbits", data.reshape(data.shape[0], -1))
            s = gs.Constant(g.unique_name(root, f"{base}_gbq_scale"), scales.reshape(scales.shape[0], -1).astype(np.float32))
            for gather in users:
                indices, out = gather.inputs[1], gather.outputs[0]
                gather.inputs.clear()
                gather.outputs.clear()
                _graph_of(root, gather).nodes.append(gs.Node(
                    "GatherBlockQuantized", gather.name, domain=g.MS_DOMAIN, inputs=[d, indices, s], outputs=[out],
                    attrs={"bits": kernel_bits(qw.bits), "block_size": qw.block_size, "gather_axis": 0, "quantize_axis": 1},
                ))
            return "gather_block_quantized"
        d = self._shared(root, f"{base}_nbits", data)
        s = gs.Constant(g.unique_name(root, f"{base}_gbq_scale"), scales.astype(np.float32))
        width_c = gs.Constant(g.unique_name(root, f"{base}_width"), np.array([width], np.int64))
        for gather in users:
            sub = _graph_of(root, gather)
            indices, out = gather.inputs[1], gather.outputs[0]
            gather.inputs.clear()
            gather.outputs.clear()
            # Gathered rows come out as [..., n_blocks, block]; Reshape restores [..., D].
            blocks = gs.Variable(g.unique_name(root, f"{out.name}_blocks"), dtype=np.float32)
            idx_shape = gs.Variable(g.unique_name(root, f"{out.name}_idx_shape"), dtype=np.int64)
            new_shape = gs.Variable(g.unique_name(root, f"{out.name}_shape"), dtype=np.int64)
            sub.nodes.append(gs.Node(
                "GatherBlockQuantized", gather.name, domain=g.MS_DOMAIN, inputs=[d, indices, s], outputs=[blocks],
                attrs={"bits": kernel_bits(qw.bits), "block_size": qw.block_size, "gather_axis": 0, "quantize_axis": 2},
            ))
            sub.nodes.append(gs.Node("Shape", g.unique_name(root, f"{gather.name}_idx_shape"), inputs=[indices],
                                     outputs=[idx_shape]))
            sub.nodes.append(gs.Node("Concat", g.unique_name(root, f"{gather.name}_shape"), attrs={"axis": 0},
                                     inputs=[idx_shape, width_c], outputs=[new_shape]))
            sub.nodes.append(gs.Node("Reshape", g.unique_name(root, f"{gather.name}_rows"), inputs=[blocks, new_shape],
                                     outputs=[out]))
        return "gather_block_quantized"


def _graph_of(root: gs.Graph, node: gs.Node) -> gs.Graph | None:
    for sub in g.iter_graphs(root):
        if any(n is node for n in sub.nodes):
            return sub
    return None


def _quantized_weight(dq: gs.Node, bits_of: dict[str, int]) -> QuantizedWeight | None:
    """The codes and scales of a DQ with constant INT4/INT8 input and no zero point, else None."""
    if len(dq.inputs) > 2 and not dq.inputs[2].is_empty():
        return None
    codes, scale = dq.inputs[0], dq.inputs[1]
    if not isinstance(codes, gs.Constant) or not isinstance(scale, gs.Constant):
        return None
    raw = numpy_helper.to_array(codes._values.tensor) if isinstance(codes._values, LazyValues) else np.asarray(codes.values)
    if raw.dtype.name not in ("int2", "int4", "int8"):
        return None
    bits = bits_of.get(codes.name, {"int2": 2, "int4": 4, "int8": 8}[raw.dtype.name])
    rank = raw.ndim
    axis = int(dq.attrs.get("axis", 1)) % max(rank, 1)
    return QuantizedWeight(raw.astype(np.int8), np.asarray(scale.values, np.float32), bits, axis,
                           int(dq.attrs.get("block_size", 0)))
