"""Where every weight is folded to FP32 at session load, ONNX Runtime must optimize q4c's output
into the FP32 model's graph: the same ops, nothing added (issue 18: the default compile is never
slower than FP32). The reference is ONNX Runtime's own optimized graph of the FP32 input."""

from __future__ import annotations

import collections
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper

import q4c
from q4c.ort import session_config
from q4c.testing import heavy_tailed, make_model

D = 64


def _optimized_ops(model: onnx.ModelProto, path: Path) -> collections.Counter:
    """Op multiset of ONNX Runtime's optimized graph (ORT_ENABLE_ALL, the model's session config)."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = 1
    options.optimized_model_filepath = str(path)
    for key, value in session_config(model).items():
        options.add_session_config_entry(key, value)
    ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return collections.Counter(f"{n.domain}::{n.op_type}" for n in onnx.load(path).graph.node)


def _residual_block(rng: np.random.Generator) -> onnx.ModelProto:
    """a = Reshape(x, Shape(x)) @ W0; a @ W1 + bias + a -> LayerNormalization -> MatMul: a
    transformer block's residual norm behind a reshape of computed shape (ONNX Runtime cannot
    name a's leading dims; ONNX's shape inference calls them unk__0, unk__1), exported at opset 17
    without value_info (as PyTorch writes it)."""
    nodes = [helper.make_node("Shape", ["x"], ["xs"]), helper.make_node("Reshape", ["x", "xs"], ["z"]),
             helper.make_node("MatMul", ["z", "W0"], ["a"]),
             helper.make_node("MatMul", ["a", "W1"], ["h"]), helper.make_node("Add", ["h", "b1"], ["hb"]),
             helper.make_node("Add", ["hb", "a"], ["r"]),
             helper.make_node("LayerNormalization", ["r", "gamma", "beta"], ["n"], axis=-1, epsilon=1e-5),
             helper.make_node("MatMul", ["n", "W2"], ["y"])]
    inits = {"W0": heavy_tailed(rng, (D, D)), "W1": heavy_tailed(rng, (D, D)), "b1": np.full(D, 0.1, np.float32), "gamma": np.ones(D, np.float32),
             "beta": np.zeros(D, np.float32), "W2": heavy_tailed(rng, (D, D))}
    return make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, "T", D])],
                      [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, "T", D])], inits, opset=17)


def test_weights_folded_at_load_optimize_to_the_fp32_graph(rng, tmp_path):
    model = _residual_block(rng)
    feeds = {"x": rng.standard_normal((1, 12, D)).astype(np.float32)}
    out, _ = q4c.compile_model(model, q4c.CompileOptions(bits=4, kernels="fp32-at-load", workers=1), samples=[feeds],
                               verify=False)
    assert any(n.op_type == "DequantizeLinear" for n in out.graph.node)  # the file holds 4-bit weights
    fp32_ops = _optimized_ops(model, tmp_path / "fp32.onnx")
    assert fp32_ops["::LayerNormalization"] == 1  # ONNX Runtime leaves the FP32 block's Add + LayerNorm apart
    # Inferred shapes in value_info made ONNX Runtime fuse Add + LayerNormalization into the
    # slower SkipLayerNormalization in q4c's output only (conformer 1.07-1.10x FP32).
    assert _optimized_ops(out, tmp_path / "q4c.onnx") == fp32_ops
    assert not out.graph.value_info  # the FP32 input declares none


def test_declared_value_info_is_kept(rng):
    model = _residual_block(rng)
    model.graph.value_info.append(helper.make_tensor_value_info("r", TensorProto.FLOAT, [1, "T", D]))
    out, _ = q4c.compile_model(model, q4c.CompileOptions(bits=4, kernels="fp32-at-load", workers=1),
                               samples=[{"x": rng.standard_normal((1, 5, D)).astype(np.float32)}], verify=False)
    assert [v.name for v in out.graph.value_info] == ["r"]


def test_opset_conversion_adds_no_value_info(rng, tmp_path):
    """The converted model is what passes time (--kernels auto, --latency-budget's FP32 reference):
    it must optimize like the input, not with the converter's inferred shapes."""
    from q4c import graph as g

    model = _residual_block(rng)
    converted = g.convert_opset(model)
    assert g.default_opset(converted) > g.default_opset(model)
    assert not converted.graph.value_info
    assert _optimized_ops(converted, tmp_path / "c.onnx") == _optimized_ops(model, tmp_path / "m.onnx")


def test_6_bit_planes_fold_at_load_into_the_fp32_graph(rng, tmp_path):
    """6-bit Conv and LSTM weights (two planes each, decoded by DequantizeLinear, Cast, Mul, Add)
    must fold at session load like any decode: ONNX Runtime's optimized graph is FP32's."""
    import json

    nodes = [helper.make_node("Conv", ["x", "CW"], ["c"], pads=[1, 1]),
             helper.make_node("Transpose", ["c"], ["ct"], perm=[2, 0, 1]),
             helper.make_node("LSTM", ["ct", "W", "R"], ["y"], hidden_size=16)]
    model = make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, 20])],
                       [helper.make_tensor_value_info("y", TensorProto.FLOAT, [20, 1, 1, 16])],
                       {"CW": heavy_tailed(rng, (32, 8, 3)), "W": heavy_tailed(rng, (1, 64, 32)),
                        "R": heavy_tailed(rng, (1, 64, 16))}, opset=21)
    plan = tmp_path / "p.json"
    plan.write_text(json.dumps({"schema": "q4c.plan/1", "tensors": {
        n: {"bits": 6, "granularity": "block:32", "scheme": "symmetric"} for n in ("CW", "W", "R")}}))
    out, _ = q4c.compile_model(model, q4c.CompileOptions(plan_path=plan, min_elements=0, workers=1), verify=False)
    assert sum(n.op_type == "DequantizeLinear" for n in out.graph.node) == 6  # two planes a weight in the file
    assert _optimized_ops(out, tmp_path / "q4c.onnx") == _optimized_ops(model, tmp_path / "fp32.onnx")
