"""Helpers for testing passes (ours and plugins'): tiny graph builders, run_pass, check_pass,
and the two executors (the interpreter and ONNX Runtime with optimizations off)."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper, numpy_helper

from q4c import graph as g
from q4c.compiler import sqnr_db
from q4c.config import CompileOptions
from q4c.pipeline import Pass, PassContext, PassResult, Pipeline

__all__ = ["make_model", "matmul_model", "run_pass", "check_pass", "run_interp", "run_ort", "sqnr_db", "op_histogram"]

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
