"""Rewrite DequantizeLinear -> MatMul into com.microsoft DynamicQuantizeMatMul for the weights whose plan
form is `int8-dynamic` or `int8-at-load`.

DynamicQuantizeMatMul (ONNX Runtime ContribOperators.md) quantizes its activation input to uint8
on the fly and multiplies with int8 [K, N] weights whose scale (and zero point) is per column
[N]: ORT-NOTES measures 0.14-0.33x FP32 MatMul time at 16-256 rows per call, 2-3x faster than
MatMulNBits there.

- `int8-dynamic`: weights planned per output channel at 8 bits are used as they are; block-wise
  8-bit codes are re-quantized per channel (and the added error folded into the report).
- `int8-at-load`: the file keeps the weight's 2-4-bit codes and their DequantizeLinear; a
  QuantizeLinear (int8, per column, scale = the column's largest dequantized |w| / 127, itself
  computed by Abs/ReduceMax/Div/Max nodes: no bytes added) re-rounds them and feeds the kernel. With session.disable_quant_qdq=1 (the compiler writes it) ONNX Runtime
  folds both at session load, so the model runs INT8's kernel from a low-bit file: measured the same
  speed as `int8-dynamic` (q4c.latency cost table), 61x slower if the config is missing (the DQ
  then runs on every call). Re-rounding adds at most half an int8 step per weight, about 1/16 of
  a 4-bit block step.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs
from onnx import TensorProto, numpy_helper
from onnx_graphsurgeon.ir.tensor import LazyValues

from q4c import graph as g
from q4c.config import Target
from q4c.pipeline import Pass, PassContext, PassResult
from q4c.quant.plan import Form
from q4c.quant.qparams import QuantizedWeight, quantize

#: the plan's forms this pass materialises (their string values; absent from older plans)
INT8_DYNAMIC = "int8-dynamic"
INT8_AT_LOAD = "int8-at-load"
#: floor of an int8-at-load column scale (an all-zero column quantizes to zeros, not NaN)
EPS = 1e-30


def _form_of(ctx: PassContext) -> dict[str, Form]:
    return {codes: form for codes, form in ctx.forms_by_codes().items() if form.value in (INT8_DYNAMIC, INT8_AT_LOAD)}


class LowerInt8DynamicPass(Pass):
    """For `--target ort-cpu`: DQ -> MatMul of `int8-dynamic` (int8 codes) and `int8-at-load` (2-4-bit
    codes, DQ -> QuantizeLinear folded at load) weights to DynamicQuantizeMatMul.

    Requires: quantize-weights ran.  Ensures: no `int8-dynamic` / `int8-at-load` weight still feeds a
    MatMul through DequantizeLinear alone.  Stats: dynamic_quantize_matmul, requantized, int8_at_load,
    skipped_layout.
    """

    name = "lower-int8-dynamic"

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        if ctx.options.target is not Target.ORT_CPU:
            return PassResult(False)
        wanted = _form_of(ctx)
        if not wanted:
            return PassResult(False)
        stats = {"dynamic_quantize_matmul": 0, "requantized": 0, "int8_at_load": 0, "skipped_layout": 0}
        dynamic = {c for c, f in wanted.items() if f.value == INT8_DYNAMIC}
        at_load = {c for c, f in wanted.items() if f.value == INT8_AT_LOAD}
        shared: dict[str, gs.Constant] = {}
        for sub in list(g.iter_graphs(graph)):
            for dq in [n for n in sub.nodes if n.op == "DequantizeLinear" and n.inputs[0].name in dynamic]:
                users = g.consumers(dq.outputs[0])
                lowered = _per_channel_constants(graph, dq) if _all_matmul_b(users, dq.outputs[0]) else None
                if lowered is None:
                    stats["skipped_layout"] += 1
                    continue
                stats["requantized"] += lowered[2]
                n = int(dq.inputs[0].shape[-1])
                stats["dynamic_quantize_matmul"] += _replace_matmuls(sub, users, lowered[0], lowered[1], n)
            if at_load:
                _lower_at_load(graph, sub, at_load, shared, stats)
        if stats["skipped_layout"]:
            ctx.warn(f"lower-int8-dynamic: {stats['skipped_layout']} int8-dynamic/int8-at-load weight(s) not read by "
                     f"MatMul as [K, N] B: kept as they were")
        return PassResult(stats["dynamic_quantize_matmul"] > 0, {k: v for k, v in stats.items() if v})


def _all_matmul_b(users: list[gs.Node], tensor: gs.Tensor) -> bool:
    return bool(users) and all(u.op == "MatMul" and u.inputs[1] is tensor for u in users)


def _replace_matmuls(sub: gs.Graph, users: list[gs.Node], b: gs.Tensor, scale: gs.Tensor, n: int) -> int:
    """Each MatMul -> DynamicQuantizeMatMul, taking in the bias Add that alone reads its output
    (one op fewer per layer: ~1-2 us at these sizes)."""
    for mm in users:
        a, out = mm.inputs[0], mm.outputs[0]
        mm.inputs.clear()
        mm.outputs.clear()
        inputs = [a, b, scale]
        add = _bias_add(sub, out, n)
        if add is not None:
            bias = next(t for t in add.inputs if t is not out)
            inputs += [gs.Variable.empty(), bias]
            out = add.outputs[0]
            add.inputs.clear()
            add.outputs.clear()
        sub.nodes.append(gs.Node("DynamicQuantizeMatMul", mm.name, domain=g.MS_DOMAIN, inputs=inputs, outputs=[out]))
    return len(users)


def _bias_add(sub: gs.Graph, out: gs.Tensor, n: int) -> gs.Node | None:
    """The Add of a float32 [N] constant that is the only reader of a MatMul output (not a graph
    output), None otherwise."""
    users = g.consumers(out)
    if len(users) != 1 or users[0].op != "Add" or len(users[0].inputs) != 2 or any(o is out for o in sub.outputs):
        return None
    add = users[0]
    other = add.inputs[1] if add.inputs[0] is out else add.inputs[0]
    if other is out or not isinstance(other, gs.Constant):
        return None
    values = other.values
    if values.dtype != np.float32 or values.shape != (n,):
        return None
    return add


def _lower_at_load(graph: gs.Graph, sub: gs.Graph, codes: set[str], shared: dict[str, gs.Constant],
                   stats: dict[str, int]) -> None:
    """Every float [K, N] MatMul B of `sub` computed from initializers alone (DequantizeLinear, its
    float16 Cast, or a codebook decoder) out of an int8-at-load codes tensor: re-rounded to int8 at
    load and read by DynamicQuantizeMatMul, when every reader is a MatMul's B."""
    seen: set[str] = set()
    for mm in [n for n in sub.nodes if n.op == "MatMul"]:
        if len(mm.inputs) != 2:  # replaced above (its B was shared with an earlier MatMul)
            continue
        b = mm.inputs[1]
        if isinstance(b, gs.Constant) or b.name in seen:
            continue
        seen.add(b.name)
        leaves = _constant_leaves(b)
        if leaves is None or not leaves & codes:
            continue
        users = g.consumers(b)
        shape = _shape_of(b)
        if not _all_matmul_b(users, b) or shape is None:
            stats["skipped_layout"] += 1
            continue
        w8, scale = _at_load(graph, sub, b, shared)
        stats["int8_at_load"] += 1
        stats["dynamic_quantize_matmul"] += _replace_matmuls(sub, users, w8, scale, shape[-1])


def _constant_leaves(tensor: gs.Tensor, limit: int = 64) -> set[str] | None:
    """Names of the initializers `tensor` is computed from, None if it depends on a graph input or
    takes more than `limit` nodes (not a weight decoder)."""
    leaves: set[str] = set()
    stack, visited = [tensor], 0
    while stack:
        t = stack.pop()
        if isinstance(t, gs.Constant):
            leaves.add(t.name)
            continue
        if not t.inputs:  # a graph input (or an outer-scope value): not foldable
            return None
        visited += 1
        if visited > limit:
            return None
        stack.extend(x for x in t.inputs[0].inputs if not x.is_empty())
    return leaves


def _shape_of(tensor: gs.Tensor) -> list[int] | None:
    """[K, N] of a weight tensor: its recorded shape, or its DequantizeLinear codes' shape."""
    shape = tensor.shape
    if not shape and tensor.inputs:
        producer = tensor.inputs[0]
        if producer.op == "Cast" and producer.inputs[0].inputs:
            producer = producer.inputs[0].inputs[0]
        if producer.op == "DequantizeLinear" and isinstance(producer.inputs[0], gs.Constant):
            shape = producer.inputs[0].shape
    if shape is None or len(shape) != 2 or not all(isinstance(d, int) for d in shape):
        return None
    return [int(d) for d in shape]


def _per_channel_constants(graph: gs.Graph, dq: gs.Node) -> tuple[gs.Tensor, gs.Tensor, int] | None:
    """int8-dynamic: the kernel's int8 [K, N] codes and float32 [N] scales as constants."""
    qw = _per_channel(dq)
    if qw is None:
        return None
    codes, scale, requantized = qw
    base = dq.inputs[0].name
    return (g.make_constant(g.unique_name(graph, f"{base}_int8kn"), codes),
            g.make_constant(g.unique_name(graph, f"{base}_int8kn_scale"), scale), requantized)


def _at_load(graph: gs.Graph, sub: gs.Graph, source: gs.Tensor, shared: dict[str, gs.Constant]) -> tuple[gs.Tensor, gs.Tensor]:
    """int8-at-load: scale = max(ReduceMax(|W|, K) / 127, EPS) per column and QuantizeLinear(W, scale)
    to int8 [K, N], all of constant inputs, so ONNX Runtime folds them at session load: the file
    carries no int8 copy and no extra scale."""
    if not shared:
        shared.update(axes=g.make_constant(g.unique_name(graph, "i8l.axes"), np.array([0], np.int64)),
                      top=g.make_constant(g.unique_name(graph, "i8l.127"), np.array(127.0, np.float32)),
                      eps=g.make_constant(g.unique_name(graph, "i8l.eps"), np.array(EPS, np.float32)))
    # short names, untyped intermediates (no value_info): the nodes cost the file a few dozen bytes
    t = {k: gs.Variable(g.unique_name(graph, f"i8l.{k}"), dtype=None, shape=None) for k in "apsq"}
    sub.nodes += [gs.Node("Abs", inputs=[source], outputs=[t["a"]]),
                  gs.Node("ReduceMax", attrs={"keepdims": 0}, inputs=[t["a"], shared["axes"]], outputs=[t["p"]]),
                  gs.Node("Div", inputs=[t["p"], shared["top"]], outputs=[t["s"]]),
                  gs.Node("Max", inputs=[t["s"], shared["eps"]], outputs=[t["q"]]),
                  gs.Node("QuantizeLinear", attrs={"axis": 1, "output_dtype": TensorProto.INT8},
                          inputs=[source, t["q"]], outputs=[w8 := gs.Variable(g.unique_name(graph, "i8l.w"))])]
    return w8, t["q"]


def _array(t: gs.Constant) -> np.ndarray:
    return numpy_helper.to_array(t._values.tensor) if isinstance(t._values, LazyValues) else np.asarray(t.values)


def _per_channel(dq: gs.Node) -> tuple[np.ndarray, np.ndarray, int] | None:
    """int8 [K, N] codes, float32 [N] scales and 1 if they were re-quantized from block-wise codes."""
    codes_t, scale_t = dq.inputs[0], dq.inputs[1]
    if not isinstance(codes_t, gs.Constant) or not isinstance(scale_t, gs.Constant):
        return None
    if len(dq.inputs) > 2 and not dq.inputs[2].is_empty():
        return None
    codes = _array(codes_t)
    if codes.ndim != 2 or codes.dtype.name not in ("int8", "int4", "int2"):
        return None
    scale = np.asarray(_array(scale_t), np.float32)
    k, n = codes.shape
    axis = int(dq.attrs.get("axis", 1)) % 2
    block = int(dq.attrs.get("block_size", 0))
    if codes.dtype.name == "int8" and not block and axis == 1 and scale.shape == (n,):
        return np.ascontiguousarray(codes.astype(np.int8)), scale, 0
    if scale.size == 1 and not block:
        values = codes.astype(np.float32) * scale.reshape(())
    elif block and axis == 0 and scale.shape == (-(-k // block), n):
        values = QuantizedWeight(codes.astype(np.int8), scale, 8, 0, block).dequantize()
    else:
        return None
    qw = quantize(values, 8, granularity="channel", axis=1)
    return np.ascontiguousarray(qw.q.astype(np.int8)), np.asarray(qw.scale, np.float32).reshape(n), 1


__all__ = ["INT8_AT_LOAD", "INT8_DYNAMIC", "LowerInt8DynamicPass"]
