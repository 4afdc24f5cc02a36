"""If, Loop and Scan against ONNX Runtime, with subgraphs that read outer-scope tensors."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper

from q4c.interp import Interpreter

F = TensorProto.FLOAT


def _vi(name, elem=F, shape=None):
    return helper.make_tensor_value_info(name, elem, shape)


def if_model(make_model):
    # Both branches read `x` and `w` from the enclosing graph.
    then_g = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["t"])], "then", [], [_vi("t")])
    else_g = helper.make_graph([helper.make_node("Sub", ["x", "bias"], ["e"])], "else", [], [_vi("e")])
    nodes = [
        helper.make_node("ReduceSum", ["x"], ["s"], keepdims=0),
        helper.make_node("Greater", ["s", "zero"], ["c"]),
        helper.make_node("If", ["c"], ["y"], then_branch=then_g, else_branch=else_g),
    ]
    inits = {"w": np.eye(3, dtype=np.float32) * 2, "bias": np.ones(3, np.float32), "zero": np.array(0, np.float32)}
    return make_model(nodes, [_vi("x", F, (2, 3))], ["y"], inits, opset=17)


@pytest.mark.parametrize("sign", [1.0, -1.0], ids=["then", "else"])
def test_if_branches_see_outer_scope(make_model, run_ort, rng, sign):
    model = if_model(make_model)
    feeds = {"x": (np.abs(rng.standard_normal((2, 3))) * sign).astype(np.float32)}
    np.testing.assert_allclose(Interpreter(model).run(feeds)["y"], run_ort(model, feeds)["y"], rtol=1e-6)


def loop_model(make_model):
    """acc_{i+1} = acc_i * decay + x[i] (x and decay from the outer scope); scan out acc each step."""
    body = helper.make_graph(
        [
            helper.make_node("Gather", ["x", "i"], ["row"], axis=0),
            helper.make_node("Mul", ["acc_in", "decay"], ["scaled"]),
            helper.make_node("Add", ["scaled", "row"], ["acc_out"]),
            helper.make_node("ReduceMax", ["acc_out"], ["peak"], keepdims=0),
            helper.make_node("Less", ["peak", "limit"], ["cond_out"]),
            helper.make_node("Identity", ["acc_out"], ["trace"]),
        ],
        "body",
        [_vi("i", TensorProto.INT64, ()), _vi("cond_in", TensorProto.BOOL, ()), _vi("acc_in", F, (4,))],
        [_vi("cond_out", TensorProto.BOOL, ()), _vi("acc_out", F, (4,)), _vi("trace", F, (4,))],
    )
    nodes = [helper.make_node("Loop", ["n", "cond", "acc0"], ["acc", "traces"], body=body)]
    inputs = [_vi("x", F, (6, 4)), _vi("n", TensorProto.INT64, ()), _vi("cond", TensorProto.BOOL, ()),
              _vi("acc0", F, (4,)), _vi("limit", F, ())]
    return make_model(nodes, inputs, ["acc", "traces"], {"decay": np.array(0.5, np.float32)}, opset=17)


@pytest.mark.parametrize("limit", [100.0, 1.5], ids=["runs_all_trips", "stops_on_cond"])
def test_loop_with_outer_scope_and_scan_outputs(make_model, run_ort, rng, limit):
    model = loop_model(make_model)
    feeds = {"x": np.abs(rng.standard_normal((6, 4))).astype(np.float32), "n": np.array(6, np.int64),
             "cond": np.array(True), "acc0": np.zeros(4, np.float32), "limit": np.array(limit, np.float32)}
    expected, actual = run_ort(model, feeds), Interpreter(model).run(feeds)
    assert actual["traces"].shape == expected["traces"].shape
    for name in ("acc", "traces"):
        np.testing.assert_allclose(actual[name], expected[name], rtol=1e-6, err_msg=name)


def test_loop_with_nested_if_reads_two_scopes_up(make_model, run_ort, rng):
    then_g = helper.make_graph([helper.make_node("Add", ["v_in", "step"], ["v_then"])], "then", [], [_vi("v_then")])
    else_g = helper.make_graph([helper.make_node("Sub", ["v_in", "step"], ["v_else"])], "else", [], [_vi("v_else")])
    body = helper.make_graph(
        [
            helper.make_node("Mod", ["i", "two"], ["parity"]),
            helper.make_node("Equal", ["parity", "zero_i"], ["even"]),
            helper.make_node("If", ["even"], ["v_out"], then_branch=then_g, else_branch=else_g),
            helper.make_node("Identity", ["cond_in"], ["cond_out"]),
        ],
        "body",
        [_vi("i", TensorProto.INT64, ()), _vi("cond_in", TensorProto.BOOL, ()), _vi("v_in", F, (3,))],
        [_vi("cond_out", TensorProto.BOOL, ()), _vi("v_out", F, (3,))],
    )
    node = helper.make_node("Loop", ["n", "", "v0"], ["v"], body=body)
    inits = {"two": np.array(2, np.int64), "zero_i": np.array(0, np.int64)}
    model = make_model([node], [_vi("n", TensorProto.INT64, ()), _vi("v0", F, (3,)), _vi("step", F, (3,))], ["v"],
                       inits, opset=17)
    feeds = {"n": np.array(5, np.int64), "v0": np.zeros(3, np.float32),
             "step": rng.standard_normal(3).astype(np.float32)}
    np.testing.assert_allclose(Interpreter(model).run(feeds)["v"], run_ort(model, feeds)["v"], rtol=1e-6)


def scan_model(make_model, directions):
    """Running sum over rows, each row scaled by an outer-scope gain; forward or reverse."""
    body = helper.make_graph(
        [
            helper.make_node("Mul", ["row", "gain"], ["scaled"]),
            helper.make_node("Add", ["sum_in", "scaled"], ["sum_out"]),
            helper.make_node("Identity", ["sum_out"], ["partial"]),
        ],
        "body",
        [_vi("sum_in", F, (3,)), _vi("row", F, (3,))],
        [_vi("sum_out", F, (3,)), _vi("partial", F, (3,))],
    )
    node = helper.make_node("Scan", ["s0", "xs"], ["total", "partials"], body=body, num_scan_inputs=1,
                            scan_input_directions=[directions[0]], scan_output_directions=[directions[1]],
                            scan_input_axes=[1], scan_output_axes=[1])
    return make_model([node], [_vi("s0", F, (3,)), _vi("xs", F, (3, 5)), _vi("gain", F, (3,))],
                      ["total", "partials"], opset=17)


@pytest.mark.parametrize("directions", [(0, 0), (1, 0), (0, 1)], ids=["forward", "reverse_in", "reverse_out"])
def test_scan_with_outer_scope_axes_and_directions(make_model, run_ort, rng, directions):
    model = scan_model(make_model, directions)
    feeds = {"s0": np.zeros(3, np.float32), "xs": rng.standard_normal((3, 5)).astype(np.float32),
             "gain": rng.standard_normal(3).astype(np.float32)}
    expected, actual = run_ort(model, feeds), Interpreter(model).run(feeds)
    for name in ("total", "partials"):
        np.testing.assert_allclose(actual[name], expected[name], rtol=1e-6, atol=1e-6, err_msg=name)
