"""Helpers for testing passes (ours and plugins'): tiny graph builders, run_pass, check_pass,
and the two executors (the interpreter and ONNX Runtime with optimizations off)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper, numpy_helper

from q4c import graph as g
from q4c.compiler import sqnr_db
from q4c.config import CompileOptions
from q4c.pipeline import Pass, PassContext, PassResult, Pipeline

__all__ = ["make_model", "matmul_model", "softmax_mlp", "write_two_graph_system", "run_pass", "check_pass", "run_interp", "run_ort", "sqnr_db", "op_histogram"]

op_histogram = g.op_histogram


def make_model(nodes: list[onnx.NodeProto], inputs: list[onnx.ValueInfoProto], outputs: list[onnx.ValueInfoProto],
               initializers: Mapping[str, np.ndarray] = (), opset: int = g.TARGET_OPSET) -> onnx.ModelProto:
    """A model at IR version 10 (what ONNX Runtime 1.31 reads) and the given opset."""
    graph = helper.make_graph(nodes, "test", inputs, outputs,
                              initializer=[numpy_helper.from_array(np.asarray(v), k) for k, v in dict(initializers).items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=g.IR_VERSION)


def heavy_tailed(rng: np.random.Generator, shape: tuple[int, ...], scale: float = 0.1) -> np.ndarray:
    """Student-t weights with a few outliers: what trained speech models look like."""
    w = rng.standard_t(4, shape) * scale
    flat = w.reshape(-1)
    flat[rng.choice(flat.size, max(1, flat.size // 500), replace=False)] *= 6
    return w.astype(np.float32)


def matmul_model(rng: np.random.Generator, m: int = 4, k: int = 64, n: int = 16) -> onnx.ModelProto:
    """y = x @ W with W an FP32 [k, n] initializer."""
    return make_model(
        [helper.make_node("MatMul", ["x", "W"], ["y"])],
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [m, k])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [m, n])],
        {"W": heavy_tailed(rng, (k, n))},
    )


def softmax_mlp(rng: np.random.Generator, k: int = 64) -> onnx.ModelProto:
    """x [1, 8, k] -> MatMul k x 128 -> Relu -> MatMul 128x64 -> MatMul 64x16 -> Softmax (a kl
    objective), weights N(0, 1/fan_in) drawn in that order."""
    shapes = {"w1": (k, 128), "w2": (128, 64), "w3": (64, 16)}
    weights = {n: (rng.standard_normal(s) / np.sqrt(s[0])).astype(np.float32) for n, s in shapes.items()}
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h1"]), helper.make_node("Relu", ["h1"], ["r1"]),
             helper.make_node("MatMul", ["r1", "w2"], ["h2"]), helper.make_node("MatMul", ["h2", "w3"], ["z"]),
             helper.make_node("Softmax", ["z"], ["p"], axis=-1)]
    return make_model(nodes, [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 8, k])],
                      [helper.make_tensor_value_info("p", onnx.TensorProto.FLOAT, [1, 8, 16])], weights, opset=21)


#: The driver of `write_two_graph_system`: y = b(a(x)), b's second output z is computed but unused.
TWO_GRAPH_DRIVER = '''
import numpy as np

def run(graphs, sample):
    h = graphs["a"]({"x": sample})["h"]
    return {"y": graphs["b"]({"h": h})["y"]}

def samples():
    rng = np.random.default_rng(7)
    return [rng.standard_normal((8, 64)).astype(np.float32) for _ in range(4)]
'''


def _matmuls(name: str, inputs: list[str], weights: Mapping[str, tuple[str, str, np.ndarray]]) -> onnx.ModelProto:
    """Graph `name` at opset 17: one MatMul per weight (src @ W -> out), every out a graph output."""
    nodes = [helper.make_node("MatMul", [src, w], [out], name=f"mm_{w}") for w, (src, out, _) in weights.items()]
    outputs = [helper.make_tensor_value_info(out, onnx.TensorProto.FLOAT, [8, value.shape[1]])
               for _, out, value in weights.values()]
    graph = helper.make_graph(nodes, name, [helper.make_tensor_value_info(i, onnx.TensorProto.FLOAT, [8, 64]) for i in inputs],
                              outputs, [numpy_helper.from_array(value, w) for w, (_, _, value) in weights.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)


def write_two_graph_system(directory: Path, rng: np.random.Generator) -> Path:
    """A `q4c compile --system` SPEC in `directory`: graph a: x [8, 64] -> MatMul W1 -> h; graph b:
    h -> MatMul W2 -> y and h -> MatMul W3 [64, 256] -> z; the driver (TWO_GRAPH_DRIVER) returns
    only y. Returns the SPEC's path."""
    w = lambda k, n: (rng.standard_normal((k, n)) / np.sqrt(k)).astype(np.float32)  # noqa: E731
    onnx.save(_matmuls("a", ["x"], {"W1": ("x", "h", w(64, 64))}), directory / "a.onnx")
    onnx.save(_matmuls("b", ["h"], {"W2": ("h", "y", w(64, 64)), "W3": ("h", "z", w(64, 256))}), directory / "b.onnx")
    (directory / "driver.py").write_text(TWO_GRAPH_DRIVER)
    spec = directory / "system.toml"
    spec.write_text('[graphs]\na = "a.onnx"\nb = "b.onnx"\n[driver]\nrun = "driver.py:run"\nsamples = "driver.py:samples"\n')
    return spec


def run_pass(pass_: Pass, model: onnx.ModelProto, options: CompileOptions | None = None,
             ctx: PassContext | None = None) -> tuple[onnx.ModelProto, PassResult]:
    """Run one pass with the pipeline's chores and an honesty audit; returns (new model, result)."""
    graph = g.import_graph(model)
    ctx = ctx or PassContext(options=options or CompileOptions(), opset=g.default_opset(model) or g.TARGET_OPSET)
    Pipeline([pass_], audit=True, like=model).run(graph, ctx)
    out = g.export_model(graph, like=model)
    return out, PassResult(ctx.records[-1].modified, ctx.records[-1].stats)


def run_interp(model: onnx.ModelProto, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    from q4c.interp import Interpreter

    return Interpreter(model).run(dict(feeds))


def run_ort(model: onnx.ModelProto, feeds: Mapping[str, np.ndarray], optimized: bool = False) -> dict[str, np.ndarray]:
    """ONNX Runtime CPU; optimizations off by default so its fusions cannot hide ours."""
    options = ort.SessionOptions()
    options.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimized
                                        else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, dict(feeds))))


def check_pass(pass_: Pass, model: onnx.ModelProto, feeds: Mapping[str, np.ndarray],
               options: CompileOptions | None = None, rtol: float = 1e-5, atol: float = 1e-5) -> onnx.ModelProto:
    """The harness for semantics-preserving passes: full checker, honest `modified` (audited),
    idempotence, and interpreter == ONNX Runtime == the original model on `feeds`."""
    out, result = run_pass(pass_, model, options)
    g.check(out)
    _, again = run_pass(pass_, out, options)
    assert not again.modified, f"{pass_.name} is not idempotent: second run reported {again.stats}"
    before = run_ort(model, feeds)
    after_ort = run_ort(out, feeds)
    after_interp = run_interp(out, feeds)
    for name, want in before.items():
        np.testing.assert_allclose(after_ort[name], want, rtol=rtol, atol=atol, err_msg=f"{name}: ORT before vs after")
        np.testing.assert_allclose(after_interp[name], after_ort[name], rtol=rtol, atol=atol,
                                   err_msg=f"{name}: interpreter vs ORT")
    return out


def gptq_column_by_column(w: np.ndarray, hessian: np.ndarray, bits: int, ranges: list[tuple[int, int]],
                          width: int) -> np.ndarray:
    """GPTQ as the paper states it, without lazy batches: after each column, its error times
    row j of the inverse Hessian's upper Cholesky factor is taken off every later column (the
    reference q4c.quant.gptq.gptq_ranges is checked against; no dead-column handling). Codes only."""
    from q4c.quant.gptq import DAMP
    from q4c.quant.qparams import CLIP_RATIOS, _quantize_groups, qrange

    w = np.array(w, np.float64)
    h = np.array(hessian, np.float64)
    h[np.diag_indices(len(h))] += DAMP * np.mean(np.diag(h))
    inv = np.linalg.inv(h)
    u = np.linalg.cholesky((inv + inv.T) / 2).T
    lo_q, hi_q = qrange(bits)
    codes = np.zeros(w.shape, np.int8)
    for lo, hi in ranges:
        group = np.zeros((w.shape[0], width), np.float32)
        group[:, : hi - lo] = w[:, lo:hi]
        s = _quantize_groups(group, bits, CLIP_RATIOS, np.float16)[1].astype(np.float64)
        for j in range(lo, hi):
            codes[:, j] = np.clip(np.rint(w[:, j] / s), lo_q, hi_q)
            w[:, j + 1:] -= np.outer((w[:, j] - codes[:, j] * s) / u[j, j], u[j, j + 1:])
    return codes
