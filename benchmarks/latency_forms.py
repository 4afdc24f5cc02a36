"""The `forms` part of bench_latency: every MatMul form of issue 18's menu timed at the layer shapes of
conformer, transformer_lm and rnnt_joiner (their sample inputs), planner forms or not.

Per shape, all variants are one-layer models timed interleaved (q4c.timing, median process-CPU time,
1 intra-op thread, each sample repeated to ~4 ms), as ratios to the FP32 MatMul of the same shape:
- fp32: MatMul with an FP32 [K, N] initializer
- nbits-acc4:{2,4,8}: com.microsoft MatMulNBits, block 64 (16 for K < 64), accuracy_level 4
- nbits2-lut: 2-bit MatMulNBits with session mlas.use_lut_gemm=1, block 32 (where ONNX Runtime's LUT
  GEMM applies; else the reason)
- int8-dynamic: DynamicQuantizeMatMul, int8 [K, N] per column
- int8-static: QuantizeLinear(x, fixed scale, uint8) -> MatMulIntegerToFloat (calibrated activation
  scale instead of the per-call range)
- int8-at-load: the 4-bit file form q4c emits (q4c.latency.micro), session.disable_quant_qdq=1
"""

from __future__ import annotations

import sys
import time

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from q4c import graph as g
from q4c import ort as q4ort
from q4c.latency.forms import SESSION_CONFIG, Form, LayerKind, LayerShape, lut_gemm_reason
from q4c.latency.layers import find_layers
from q4c.latency.micro import layer_feeds, layer_model
from q4c.quant.packing import matmulnbits_weights
from q4c.quant.qparams import QuantizedWeight
from q4c.timing import interleaved

COLUMNS = ("nbits-acc4:2", "nbits-acc4:4", "nbits-acc4:8", "nbits2-lut", "int8-dynamic", "int8-static", "int8-at-load")
LUT_BLOCK = 32
CANONICAL = "fold-constants,fuse-lstm-gates,synthesize-constants,lower-gemm,lower-pointwise-conv"


def _io(shape: LayerShape) -> tuple[onnx.ValueInfoProto, onnx.ValueInfoProto]:
    return (helper.make_tensor_value_info("x", TensorProto.FLOAT, [shape.rows, shape.k]),
            helper.make_tensor_value_info("y", TensorProto.FLOAT, [shape.rows, shape.n]))


def _model(nodes: list, shape: LayerShape, inits: list) -> onnx.ModelProto:
    x, y = _io(shape)
    graph = helper.make_graph(nodes, "form", [x], [y], initializer=inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", g.TARGET_OPSET), helper.make_opsetid(g.MS_DOMAIN, 1)],
                             ir_version=g.IR_VERSION)


def nbits_model(shape: LayerShape, bits: int, block: int) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    k, n = shape.k, shape.n
    codes = rng.integers(-(2 ** (bits - 1)), 2 ** (bits - 1), (k, n)).astype(np.int8)
    packed, scales = matmulnbits_weights(QuantizedWeight(codes, np.full((-(-k // block), n), 0.01, np.float32), bits, 0, block))
    node = helper.make_node("MatMulNBits", ["x", "B", "scales"], ["y"], domain=g.MS_DOMAIN, K=k, N=n, bits=bits,
                            block_size=block, accuracy_level=4)
    return _model([node], shape, [numpy_helper.from_array(packed, "B"), numpy_helper.from_array(scales.reshape(-1), "scales")])


def static_model(shape: LayerShape) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.integers(-128, 128, (shape.k, shape.n)).astype(np.int8), "B"),
             numpy_helper.from_array(np.full(shape.n, 0.01, np.float32), "b_scale"),
             numpy_helper.from_array(np.array(0.03, np.float32), "a_scale"),
             numpy_helper.from_array(np.array(128, np.uint8), "a_zp")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "a_scale", "a_zp"], ["xq"]),
             helper.make_node("MatMulIntegerToFloat", ["xq", "B", "a_scale", "b_scale", "a_zp"], ["y"], domain=g.MS_DOMAIN)]
    return _model(nodes, shape, inits)


def variants(shape: LayerShape) -> tuple[dict[str, tuple[onnx.ModelProto, dict]], dict[str, str]]:
    """{column: (model, session config)} and {column: why it does not run here}."""
    block = 64 if shape.k >= 64 else 16
    out = {"fp32": (layer_model(shape, Form.FP32_AT_LOAD, 32), {}),
           "int8-dynamic": (layer_model(shape, Form.INT8_DYNAMIC, 8), {}),
           "int8-static": (static_model(shape), {}),
           "int8-at-load": (layer_model(shape, Form.INT8_AT_LOAD, 4), SESSION_CONFIG[Form.INT8_AT_LOAD])}
    out.update({f"nbits-acc4:{b}": (nbits_model(shape, b, block), {}) for b in (2, 4, 8)})
    why = {}
    reason = lut_gemm_reason(shape.k, shape.n, 2, LUT_BLOCK)
    if reason is None:
        out["nbits2-lut"] = (nbits_model(shape, 2, LUT_BLOCK), {"mlas.use_lut_gemm": "1"})
    else:
        why["nbits2-lut"] = reason
    return out, why


def _repeats(call, target: float = 0.004) -> int:
    start = time.process_time()
    call()
    return max(1, min(2000, int(target / max(time.process_time() - start, 1e-6))))


def measure_shape(shape: LayerShape, rounds: int = 15) -> dict:
    models, why = variants(shape)
    feeds = layer_feeds(shape)
    sessions = {k: q4ort.make_session(m, threads=1, config=c) for k, (m, c) in models.items()}
    reps = {k: _repeats(lambda s=s: s.run(None, feeds)) for k, s in sessions.items()}
    timing = interleaved({k: (lambda s=s, r=reps[k]: [s.run(None, feeds) for _ in range(r)]) for k, s in sessions.items()},
                         rounds=rounds, warmup=1)
    fp32 = timing.median("fp32") / reps["fp32"]
    row = {"part": "forms", "shape": shape.label(), "fp32_us": round(1e6 * fp32, 2), "rounds": timing.rounds}
    row.update({k: round(timing.median(k) / reps[k] / fp32, 3) for k in sessions if k != "fp32"})
    row.update({f"{k} (not run)": v for k, v in why.items()})
    return row


def model_shapes(models_dir, names) -> dict[str, list[LayerShape]]:
    """The MatMul layer shapes each model calls on its sample input."""
    import onnx_graphsurgeon as gs

    import q4c

    out = {}
    for name in names:
        with np.load(models_dir / f"{name}.npz") as npz:
            feeds = {k: npz[k] for k in npz.files}
        # the graph choose-forms plans on: Gemm and pointwise Conv lowered to MatMul first
        model, _ = q4c.compile_model(onnx.load(models_dir / f"{name}.onnx"), passes=CANONICAL, samples=[feeds],
                                     verify=False)
        layers = find_layers(gs.import_onnx(model), feeds, like=model)
        out[name] = sorted({layer.shape for layer in layers if layer.shape.kind is LayerKind.MATMUL},
                           key=lambda s: (s.k, s.n, s.rows))
    return out


def measure_forms(models_dir, names) -> list[dict]:
    rows = []
    for name, shapes in model_shapes(models_dir, names).items():
        for shape in shapes:
            row = {"model": name, **measure_shape(shape)}
            print(f"  forms {name} {row}", file=sys.stderr)
            rows.append(row)
    return rows


def render_forms(rows: list[dict]) -> list[str]:
    forms = [r for r in rows if r.get("part") == "forms"]
    if not forms:
        return []
    out = ["", "Every MatMul form of the issue's menu at these models' layer shapes (`--parts forms`: one-layer models, "
           "time / the FP32 MatMul of the same shape, interleaved, 1 thread; `nbits-acc4:b` = MatMulNBits b-bit block 64 "
           "accuracy level 4, `nbits2-lut` = 2-bit block 32 with `mlas.use_lut_gemm=1`, `int8-static` = QuantizeLinear "
           "with a fixed activation scale -> MatMulIntegerToFloat, `int8-at-load` = q4c's 4-bit file folded to int8 at "
           "load; — = LUT GEMM does not apply to the shape):", "",
           "| model | layer shape | FP32 us | " + " | ".join(COLUMNS) + " |", "|---|---|---|" + "---|" * len(COLUMNS)]
    for r in forms:
        cells = [f"{r[c]:.2f}" if isinstance(r.get(c), float) else "—" for c in COLUMNS]
        out.append(f"| {r['model']} | {r['shape']} | {r['fp32_us']} | " + " | ".join(cells) + " |")
    return out


__all__ = ["COLUMNS", "measure_forms", "measure_shape", "model_shapes", "render_forms", "variants"]
