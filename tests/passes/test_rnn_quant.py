"""ONNX RNN (the one-gate tanh/relu/... recurrence) through fuse-lstm-gates, quantize-weights, gptq
and lower-recurrent.

Quantized RNNs are checked against independent sources: ONNX Runtime and the interpreter on the
same graph (float32 noise), the FP32 model (an SQNR budget), and, for the Scan lowering, the
same RNN op on the codes x scales dequantized in float32.
"""

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from onnx import TensorProto, helper

from q4c import graph as g
from q4c import ort as q4ort
from q4c.compiler import compile_model
from q4c.config import CompileOptions, Granularity
from q4c.errors import ModelLoadError
from q4c.metrics import sqnr_db
from q4c.passes.assign_precision import AssignPrecisionPass
from q4c.passes.choose_kernels import ChooseKernelsPass
from q4c.passes.fuse_lstm_gates import FuseLstmGatesPass
from q4c.passes.lower_recurrent import LowerRecurrentPass, choose_form
from q4c.passes.quantize_weights import QuantizeWeightsPass
from q4c.pipeline import PassContext
from q4c.quant.gptq import input_hessians
from q4c.quant.sensitivity import gptq_eligible
from q4c.quant.weights import WeightSlot, find_weight_slots, quantize_slot
from q4c.recurrent_lowering import match_layer
from q4c.testing import make_model, op_histogram, run_interp, run_ort, run_pass

LOW_BIT = CompileOptions(bits=4, kernels="low-bit")  # lower whatever the hidden size


def _rnn_stack(rng, i=40, h=64, layers=3):
    """`layers` bidirectional RNNs (Y [T, 2, B, H] -> [T, B, 2H] between them), then MatMul + Sigmoid."""
    nodes, inits, x, width = [], {"shape": np.array([0, 0, 2 * h], np.int64)}, "X", i
    for k in range(layers):
        inits[f"W{k}"] = (rng.standard_normal((2, h, width)) / np.sqrt(width)).astype(np.float32)
        inits[f"R{k}"] = (rng.standard_normal((2, h, h)) * 0.8 / np.sqrt(h)).astype(np.float32)
        inits[f"B{k}"] = (rng.standard_normal((2, 2 * h)) * 0.1).astype(np.float32)
        nodes += [helper.make_node("RNN", [x, f"W{k}", f"R{k}", f"B{k}"], [f"Y{k}"], hidden_size=h,
                                   direction="bidirectional"),
                  helper.make_node("Transpose", [f"Y{k}"], [f"T{k}"], perm=[0, 2, 1, 3]),
                  helper.make_node("Reshape", [f"T{k}", "shape"], [f"X{k + 1}"])]
        x, width = f"X{k + 1}", 2 * h
    inits["Wo"] = (rng.standard_normal((width, 1)) / np.sqrt(width)).astype(np.float32)
    nodes += [helper.make_node("MatMul", [x, "Wo"], ["logit"]), helper.make_node("Sigmoid", ["logit"], ["prob"])]
    return make_model(nodes, [helper.make_tensor_value_info("X", TensorProto.FLOAT, [None, None, i])],
                      [helper.make_tensor_value_info("prob", TensorProto.FLOAT, [None, None, 1])], inits, opset=21)


def _rnn_model(rng, t=5, b=2, i=40, h=32, direction="forward", seq=False, init=False, layout=0, attrs=None,
               w_scale=None):
    nd = 2 if direction == "bidirectional" else 1
    w = rng.standard_normal((nd, h, i)) * 0.2
    if w_scale is not None:
        w *= np.asarray(w_scale).reshape(nd, 1, 1)
    inits = {"W": w.astype(np.float32), "R": (rng.standard_normal((nd, h, h)) * 0.2).astype(np.float32),
             "B": (rng.standard_normal((nd, 2 * h)) * 0.2).astype(np.float32)}
    x_shape = [t, b, i] if layout == 0 else [b, t, i]
    state_shape = [nd, b, h] if layout == 0 else [b, nd, h]
    inputs = [helper.make_tensor_value_info("X", TensorProto.FLOAT, x_shape)]
    names = ["X", "W", "R", "B", "", ""]
    feeds = {"X": rng.standard_normal(x_shape).astype(np.float32)}
    if seq:
        inputs.append(helper.make_tensor_value_info("lens", TensorProto.INT32, [b]))
        names[4] = "lens"
        feeds["lens"] = np.array([t] + [max(1, t - 2 - k) for k in range(b - 1)], np.int32)
    if init:
        inputs.append(helper.make_tensor_value_info("h0", TensorProto.FLOAT, state_shape))
        names[5] = "h0"
        feeds["h0"] = (rng.standard_normal(state_shape) * 0.5).astype(np.float32)
    while names[-1] == "":
        names.pop()
    node = helper.make_node("RNN", names, ["Y", "Y_h"], hidden_size=h, direction=direction, layout=layout,
                            **(attrs or {}))
    outputs = [helper.make_tensor_value_info(o, TensorProto.FLOAT, [None] * (4 if o == "Y" else 3)) for o in ("Y", "Y_h")]
    return make_model([node], inputs, outputs, inits, opset=21), feeds


def _quantize(model, options=LOW_BIT):
    ctx = PassContext(options=options, opset=g.default_opset(model))
    planned, _ = run_pass(AssignPrecisionPass(), model, ctx=ctx)
    planned, _ = run_pass(ChooseKernelsPass(), planned, ctx=ctx)  # the plan's forms
    dq, _ = run_pass(QuantizeWeightsPass(), planned, ctx=ctx)
    return dq, ctx


def _float32_dequantized(dq_model):
    """The DQ form with each RNN weight replaced by its codes x scales in float32."""
    graph = g.import_graph(dq_model)
    for node in [n for n in graph.nodes if n.op == "RNN"]:
        layer = match_layer(graph, node, {})
        node.inputs[1] = gs.Constant(g.unique_name(graph, "W_f32"), np.stack([w.dequantize() for w in layer.w]))
        node.inputs[2] = gs.Constant(g.unique_name(graph, "R_f32"), np.stack([r.dequantize() for r in layer.r]))
    graph.cleanup()
    return g.export_model(graph, like=dq_model)


def _exact_kernels(model):
    """A copy whose MatMulNBits compute in float32 (accuracy_level 0), not int8 activations."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    for graph in g.iter_graph_protos(copy.graph):
        for node in graph.node:
            for attr in node.attribute:
                if node.op_type == "MatMulNBits" and attr.name == "accuracy_level":
                    attr.i = 0
    return copy


# -- compile ---------------------------------------------------------------------------------

def test_bidirectional_rnn_stack_compiles_to_a_fifth_at_4_bits(rng):
    model = _rnn_stack(rng)
    samples = [{"X": rng.standard_normal((20, 2, 40)).astype(np.float32)} for _ in range(3)]
    out, report = compile_model(model, CompileOptions(bits=4), samples=samples)

    ratio = len(out.SerializeToString()) / len(model.SerializeToString())
    assert ratio <= 0.20  # measured 0.162 (4-bit codes, float16 scales per 32, float biases)
    roles = {q["name"]: (q["role"], q["bits"]) for q in report["tensors"]}
    assert {roles[f"{p}{k}"] for p in "WR" for k in range(3)} == {("rnn_w", 4), ("rnn_r", 4)}
    assert op_histogram(out)["RNN"] == 3
    onnx.checker.check_model(out, full_check=True)
    # RNN has no low-bit kernel: DQ is folded at load, which keeps FP32 speed
    assert report["session_config"] == {"session.disable_quant_qdq": "1"}

    feeds = {"X": rng.standard_normal((30, 1, 40)).astype(np.float32)}
    deployed = q4ort.run(q4ort.make_session(out), feeds)["prob"]
    np.testing.assert_allclose(run_interp(out, feeds)["prob"], deployed, rtol=1e-5, atol=1e-5)
    reference = run_interp(model, feeds)["prob"]
    assert sqnr_db(reference, deployed) > 20  # measured ~29 dB


def test_model_with_only_small_weights_names_them(rng):
    inits = {"W": rng.standard_normal((1, 25, 40)).astype(np.float32),
             "R": rng.standard_normal((1, 25, 25)).astype(np.float32),
             "Wo": rng.standard_normal((25, 1)).astype(np.float32)}
    nodes = [helper.make_node("RNN", ["X", "W", "R"], ["Y"], hidden_size=25),
             helper.make_node("MatMul", ["Y", "Wo"], ["logit"])]
    model = make_model(nodes, [helper.make_tensor_value_info("X", TensorProto.FLOAT, [7, 1, 40])],
                       [helper.make_tensor_value_info("logit", TensorProto.FLOAT, [7, 1, 1, 1])], inits, opset=21)
    with pytest.raises(ModelLoadError) as info:
        compile_model(model, CompileOptions(bits=4))
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("no weight has >= 1024 elements")
    assert "W [1,25,40] (1000), R [1,25,25] (625), Wo [25,1] (25)" in message


# -- per-direction scales --------------------------------------------------------------------

def _slot(model, name):
    graph = g.import_graph(model)
    return next(s for s in find_weight_slots(graph) if isinstance(s, WeightSlot) and s.tensor.name == name)


@pytest.mark.parametrize("granularity", ["channel", "block"])
@pytest.mark.parametrize("scheme", ["symmetric", "symmetric-absmax"])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_scales_never_span_two_directions(rng, granularity, scheme, bits):
    # direction 1 is 50x smaller: a scale shared with direction 0 would round it all to zero at 4 bits
    model, _ = _rnn_model(rng, h=32, i=64, direction="bidirectional", w_scale=[1.0, 0.02])
    slot = _slot(model, "W")
    assert slot.role == "rnn_w" and (slot.channel_axis, slot.reduce_axis) == (1, 2)
    w = slot.tensor.values
    got = quantize_slot(slot, w, bits, Granularity(granularity), scheme).dequantize()
    per_direction = [sqnr_db(w[d], got[d]) for d in range(2)]
    # measured per direction: 8-10 dB at 2 bits, 14-16 at 3, 20-22 at 4, 45-46 at 8, both alike;
    # scales shared by both directions leave the small one at 0 dB (2-4 bits) and 10 dB (8 bits)
    assert min(per_direction) > 6 * bits - 8
    assert abs(per_direction[0] - per_direction[1]) < 3


# -- gptq ------------------------------------------------------------------------------------

def test_gptq_rounds_rnn_weights_against_their_own_inputs(rng):
    model, _ = _rnn_model(rng, t=16, b=4, i=64, h=48, direction="bidirectional")
    # correlated input features (a decaying spectrum), as real features are: where gptq pays
    mix = rng.standard_normal((64, 64)) @ np.diag(np.exp(-np.arange(64) / 8)) @ rng.standard_normal((64, 64)) / 4

    def draw():
        return {"X": (rng.standard_normal((16, 4, 64)) @ mix).astype(np.float32)}

    graph = g.import_graph(model)
    slots = {s.tensor.name: s for s in find_weight_slots(graph) if isinstance(s, WeightSlot)}
    eligible = gptq_eligible(graph, slots)
    assert set(eligible) == {"W", "R"}
    samples = [draw() for _ in range(8)]
    hessians = input_hessians(model, eligible, samples)
    assert [h.shape for h in hessians["W"]] == [(64, 64)]  # X, shared by both directions
    assert [h.shape for h in hessians["R"]] == [(48, 48), (48, 48)]  # each direction's own hidden states
    y = np.concatenate([run_ort(model, s)["Y"] for s in samples], axis=0)  # [T, 2, B, H]
    for d in range(2):  # hand-computed: mean of h h^T over direction d's states
        states = y[:, d].reshape(-1, 48).astype(np.float64)
        np.testing.assert_allclose(hessians["R"][d], states.T @ states / len(states), rtol=1e-4, atol=1e-6)

    test = [draw() for _ in range(4)]
    reference = np.concatenate([run_ort(model, f)["Y"] for f in test])

    def output_sqnr(name, scheme):
        q = quantize_slot(slots[name], slots[name].tensor.values, 3, Granularity("block"), scheme,
                          hessians=hessians.get(name) if scheme == "gptq" else None).dequantize()
        changed = onnx.ModelProto()
        changed.CopyFrom(model)
        for init in changed.graph.initializer:
            if init.name == name:
                init.CopyFrom(onnx.numpy_helper.from_array(q, name))
        return sqnr_db(reference, np.concatenate([run_ort(changed, f)["Y"] for f in test]))

    for name in ("W", "R"):
        # measured at 3 bits, seeds 0-2: W 9.8-10.4 -> 17.6-18.1 dB, R 23.1-23.4 -> 25.7-26.4 dB
        assert output_sqnr(name, "gptq") > output_sqnr(name, "symmetric") + 1.0, name


# -- lowering --------------------------------------------------------------------------------

CASES = {
    "forward": {},
    "reverse": {"direction": "reverse"},
    "bidirectional_states": {"direction": "bidirectional", "init": True},
    "sequence_lens": {"seq": True, "b": 3},
    "bidirectional_sequence_lens_states": {"direction": "bidirectional", "seq": True, "init": True, "b": 3},
    "relu_tanh_pair": {"direction": "bidirectional", "attrs": {"activations": ["Relu", "Tanh"]}},
    "clip": {"attrs": {"clip": 0.5}},
    "alpha_beta_activations": {"direction": "bidirectional",
                               "attrs": {"activations": ["ScaledTanh", "LeakyRelu"], "activation_alpha": [1.5, 0.2],
                                         "activation_beta": [0.7]}},
    "affine_hardsigmoid": {"direction": "bidirectional",
                           "attrs": {"activations": ["Affine", "HardSigmoid"], "activation_alpha": [0.5, 0.3],
                                     "activation_beta": [0.1, 0.4]}},
    "elu_softsign_clip": {"direction": "bidirectional", "attrs": {"activations": ["Elu", "Softsign"], "clip": 1.0}},
    "layout1_bidirectional_states": {"layout": 1, "direction": "bidirectional", "init": True},
}


@pytest.mark.parametrize("case", CASES)
def test_scan_lowering_equals_the_rnn_it_replaces(rng, case):
    model, feeds = _rnn_model(rng, **CASES[case])
    dq, ctx = _quantize(model)
    lowered, result = run_pass(LowerRecurrentPass(), dq, ctx=ctx)

    assert result.modified and result.stats == {"scan": 1}
    hist = op_histogram(lowered)
    assert hist["Scan"] == 1 and "RNN" not in hist and "DequantizeLinear" not in hist
    g.check(lowered)
    assert not run_pass(LowerRecurrentPass(), lowered, ctx=PassContext(options=LOW_BIT))[1].modified

    reference = _float32_dequantized(dq)
    # ONNX Runtime runs no layout-1 RNN: there the reference is the interpreter.
    want = run_interp(reference, feeds) if CASES[case].get("layout") else run_ort(reference, feeds)
    exact = run_ort(_exact_kernels(lowered), feeds)  # MatMulNBits at accuracy_level 0
    interp = run_interp(lowered, feeds)
    for name, value in want.items():
        np.testing.assert_allclose(exact[name], value, rtol=1e-5, atol=1e-5, err_msg=f"{name}: lowered vs replaced")
        np.testing.assert_allclose(interp[name], exact[name], rtol=1e-5, atol=1e-5, err_msg=f"{name}: interp vs ORT")


def test_rule_lowers_large_rnns_and_keeps_small_ones_folded(rng):
    def form(h, **kwargs):
        model, _ = _rnn_model(rng, h=h, i=32, t=1, b=1, **kwargs)
        dq, _ = _quantize(model, CompileOptions(bits=4))
        graph = g.import_graph(dq)
        return choose_form(match_layer(graph, next(n for n in graph.nodes if n.op == "RNN"), {}), "auto")

    assert form(256) == "kept_dq"
    assert form(384) == "scan"
    assert form(32, layout=1) == "scan"  # ONNX Runtime cannot run a layout-1 RNN at all

    large, feeds = _rnn_model(rng, h=384, i=64, t=3, b=1, direction="bidirectional")
    dq, ctx = _quantize(large, CompileOptions(bits=4))
    lowered, result = run_pass(LowerRecurrentPass(), dq, ctx=ctx)
    assert result.stats == {"scan": 1}
    assert q4ort.needed_session_config(lowered) == ({}, [])  # nothing left to fold at load
    deployed = q4ort.run(q4ort.make_session(lowered), feeds)  # accuracy_level 4: int8 activations
    want = run_ort(_float32_dequantized(dq), feeds)
    for name, value in want.items():
        assert sqnr_db(value, deployed[name]) > 30, name  # measured ~40 dB


def test_declines_unknown_activation(rng):
    model, _ = _rnn_model(rng, attrs={"activations": ["Gelu"]})
    graph = g.import_graph(model)
    layer = match_layer(graph, graph.nodes[0], {})
    assert layer.code == "skipped_activations"


# -- fusion of decomposed cells ---------------------------------------------------------------

def _numpy_rnn(x, w, r, b, h0, act=np.tanh):
    """The reference: h_t = act(x_t W^T + h_{t-1} R^T + b), x [T, B, I]."""
    h, hs = h0, []
    for t in range(x.shape[0]):
        h = act(x[t] @ w.T + h @ r.T + b)
        hs.append(h)
    return np.stack(hs), h


def _unrolled_layer(rng, nodes, inits, x_steps, h0, prefix, i, h, act="Tanh"):
    """torch RNNCell unrolled: Gemm(x_t, W_ih^T, b_ih) + Gemm(h, W_hh^T, b_hh) -> Tanh per step;
    h0 None: the first step has no recurrent term (a zero state, folded away)."""
    for name, shape in ((f"{prefix}_wih", (h, i)), (f"{prefix}_whh", (h, h))):
        inits[name] = (rng.standard_normal(shape) * 0.3).astype(np.float32)
    for name in (f"{prefix}_bih", f"{prefix}_bhh"):
        inits[name] = (rng.standard_normal(h) * 0.1).astype(np.float32)
    hs, state = [], h0
    for t, x_t in enumerate(x_steps):
        pre_x = f"{prefix}_px{t}"
        nodes.append(helper.make_node("Gemm", [x_t, f"{prefix}_wih", f"{prefix}_bih"], [pre_x], transB=1))
        if state is None:  # Gemm(zeros, W_hh, b_hh) folded to b_hh
            nodes.append(helper.make_node("Add", [pre_x, f"{prefix}_bhh"], [f"{prefix}_pre{t}"]))
            pre = f"{prefix}_pre{t}"
        else:
            nodes.append(helper.make_node("Gemm", [state, f"{prefix}_whh", f"{prefix}_bhh"], [f"{prefix}_ph{t}"], transB=1))
            nodes.append(helper.make_node("Add", [pre_x, f"{prefix}_ph{t}"], [f"{prefix}_pre{t}"]))
            pre = f"{prefix}_pre{t}"
        state = f"{prefix}_h{t}"
        nodes.append(helper.make_node(act, [pre], [state]))
        hs.append(state)
    return hs


def _steps_of(nodes, inits, x, steps):
    out = []
    for t in range(steps):
        inits[f"t{t}"] = np.array(t, np.int64)
        nodes.append(helper.make_node("Gather", [x, f"t{t}"], [f"x{t}"], axis=0))
        out.append(f"x{t}")
    return out


def _stack(nodes, inits, hs, name):
    inits["axis0"] = np.array([0], np.int64)
    for k, h in enumerate(hs):
        nodes.append(helper.make_node("Unsqueeze", [h, "axis0"], [f"{name}_u{k}"]))
    nodes.append(helper.make_node("Concat", [f"{name}_u{k}" for k in range(len(hs))], [name], axis=0))


@pytest.mark.parametrize("act", ["Tanh", "Relu"])
def test_fuses_unrolled_rnn_cells_into_one_rnn(rng, act):
    steps, b, i, h = 6, 2, 5, 8
    nodes, inits = [], {}
    xs = _steps_of(nodes, inits, "X", steps)
    hs = _unrolled_layer(rng, nodes, inits, xs, "h0", "l0", i, h, act)
    _stack(nodes, inits, hs, "Y")
    model = make_model(nodes, [_info("X", steps, b, i), _info("h0", b, h)], [_info("Y", steps, b, h), _info(hs[-1], b, h)],
                       inits, opset=21)
    feeds = {"X": rng.standard_normal((steps, b, i)).astype(np.float32),
             "h0": rng.standard_normal((b, h)).astype(np.float32)}
    out, result = run_pass(FuseLstmGatesPass(), model)
    assert result.stats == {"fused": 1, "fused_rnn": 1, "fused_cells": steps}
    assert op_histogram(out).get("RNN") == 1 and act not in op_histogram(out)
    _check_semantics(model, out, feeds)
    act_fn = np.tanh if act == "Tanh" else (lambda v: np.maximum(v, 0))
    y, _ = _numpy_rnn(feeds["X"], inits["l0_wih"], inits["l0_whh"], inits["l0_bih"] + inits["l0_bhh"], feeds["h0"], act_fn)
    np.testing.assert_allclose(run_ort(out, feeds)["Y"], y, rtol=1e-5, atol=1e-5)


def test_fuses_each_layer_of_a_stacked_unrolled_rnn(rng):
    # layer 1 reads layer 0's h_t and its own h_{t-1}, both Tanh outputs of the same width:
    # the shared weights tell which one is its own previous step.
    steps, b, h = 5, 1, 8
    nodes, inits = [], {}
    xs = _steps_of(nodes, inits, "X", steps)
    h0 = _unrolled_layer(rng, nodes, inits, xs, None, "l0", h, h)
    h1 = _unrolled_layer(rng, nodes, inits, h0, None, "l1", h, h)
    _stack(nodes, inits, h1, "Y")
    model = make_model(nodes, [_info("X", steps, b, h)], [_info("Y", steps, b, h)], inits, opset=21)
    feeds = {"X": rng.standard_normal((steps, b, h)).astype(np.float32)}
    out, result = run_pass(FuseLstmGatesPass(), model)
    assert result.stats == {"fused": 2, "fused_rnn": 2, "fused_cells": 2 * steps}
    assert op_histogram(out).get("RNN") == 2 and "Tanh" not in op_histogram(out)
    _check_semantics(model, out, feeds)


def test_fuses_scan_whose_body_is_an_rnn_cell(rng):
    b, i, h = 2, 5, 8
    w, r = (rng.standard_normal((i, h)) * 0.3).astype(np.float32), (rng.standard_normal((h, h)) * 0.3).astype(np.float32)
    bias = (rng.standard_normal(h) * 0.1).astype(np.float32)
    body = helper.make_graph(
        [helper.make_node("MatMul", ["x_t", "w"], ["px"]), helper.make_node("MatMul", ["h", "r"], ["ph"]),
         helper.make_node("Add", ["px", "ph"], ["s"]), helper.make_node("Add", ["s", "bias"], ["pre"]),
         helper.make_node("Tanh", ["pre"], ["h_new"]), helper.make_node("Identity", ["h_new"], ["y_t"])],
        "body", [_info("h", b, h), _info("x_t", b, i)], [_info("h_new", b, h), _info("y_t", b, h)],
        [onnx.numpy_helper.from_array(v, n) for n, v in (("w", w), ("r", r), ("bias", bias))])
    scan = helper.make_node("Scan", ["h0", "X"], ["h_last", "Y"], body=body, num_scan_inputs=1)
    model = make_model([scan], [_info("h0", b, h), _info("X", 7, b, i)], [_info("h_last", b, h), _info("Y", 7, b, h)],
                       {}, opset=21)
    feeds = {"X": rng.standard_normal((7, b, i)).astype(np.float32), "h0": rng.standard_normal((b, h)).astype(np.float32)}
    out, result = run_pass(FuseLstmGatesPass(), model)
    assert result.stats == {"fused": 1, "fused_rnn": 1, "fused_cells": 1, "fused_loops": 1}
    assert op_histogram(out).get("RNN") == 1 and "Scan" not in op_histogram(out)
    _check_semantics(model, out, feeds)
    y, h_last = _numpy_rnn(feeds["X"], w.T, r.T, bias, feeds["h0"])
    got = run_ort(out, feeds)
    np.testing.assert_allclose(got["Y"], y, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got["h_last"], h_last, rtol=1e-5, atol=1e-5)


def test_fuses_loop_whose_body_is_a_relu_rnn_cell(rng):
    b, i, h = 2, 5, 8
    w, r = (rng.standard_normal((h, i)) * 0.3).astype(np.float32), (rng.standard_normal((h, h)) * 0.3).astype(np.float32)
    body = helper.make_graph(
        [helper.make_node("Gather", ["x", "iter"], ["x_t"], axis=1),  # x [B, T, I], batch first
         helper.make_node("Gemm", ["x_t", "w"], ["px"], transB=1), helper.make_node("Gemm", ["h", "r"], ["ph"], transB=1),
         helper.make_node("Add", ["px", "ph"], ["pre"]), helper.make_node("Relu", ["pre"], ["h_new"]),
         helper.make_node("Identity", ["h_new"], ["y_t"]), helper.make_node("Identity", ["cond_in"], ["cond_out"])],
        "body", [helper.make_tensor_value_info("iter", TensorProto.INT64, []),
                 helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []), _info("h", b, h)],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []), _info("h_new", b, h), _info("y_t", b, h)],
        [onnx.numpy_helper.from_array(w, "w"), onnx.numpy_helper.from_array(r, "r")])
    loop = helper.make_node("Loop", ["trips", "", "h0"], ["h_last", "Y"], body=body)
    model = make_model([loop], [_info("x", b, 6, i), helper.make_tensor_value_info("trips", TensorProto.INT64, []),
                                _info("h0", b, h)], [_info("h_last", b, h), _info("Y", None, b, h)], {}, opset=21)
    feeds = {"x": rng.standard_normal((b, 6, i)).astype(np.float32), "h0": rng.standard_normal((b, h)).astype(np.float32),
             "trips": np.array(4, np.int64)}  # the first 4 of 6 frames
    out, result = run_pass(FuseLstmGatesPass(), model)
    assert result.stats == {"fused": 1, "fused_rnn": 1, "fused_cells": 1, "fused_loops": 1}
    assert op_histogram(out).get("RNN") == 1 and "Loop" not in op_histogram(out)
    _check_semantics(model, out, feeds)
    y, _ = _numpy_rnn(feeds["x"][:, :4].transpose(1, 0, 2), w, r, 0, feeds["h0"], lambda v: np.maximum(v, 0))
    np.testing.assert_allclose(run_ort(out, feeds)["Y"], y, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dims", [(2, 8), (1, 2, 8)])
def test_leaves_a_tanh_mlp_alone(rng, dims):
    # Tanh(x W1 + b) -> Tanh(. W2 + x W3): one- and two-operand Tanh layers that are no recurrence
    # (nor declined cells: rank-3 operands are not counted as skipped_rank)
    inits = {n: (rng.standard_normal(s) * 0.3).astype(np.float32)
             for n, s in (("w1", (8, 8)), ("b1", (8,)), ("w2", (8, 8)), ("w3", (8, 8)))}
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["p1"]), helper.make_node("Add", ["p1", "b1"], ["q1"]),
             helper.make_node("Tanh", ["q1"], ["a1"]), helper.make_node("MatMul", ["a1", "w2"], ["p2"]),
             helper.make_node("MatMul", ["x", "w3"], ["p3"]), helper.make_node("Add", ["p2", "p3"], ["q2"]),
             helper.make_node("Tanh", ["q2"], ["y"])]
    model = make_model(nodes, [_info("x", *dims)], [_info("y", *dims)], inits, opset=21)
    _, result = run_pass(FuseLstmGatesPass(), model)
    assert not result.modified and result.stats == {}


def test_decomposed_rnn_compiles_to_a_quantized_rnn(rng):
    steps, b, i, h = 6, 1, 64, 64
    nodes, inits = [], {}
    xs = _steps_of(nodes, inits, "X", steps)
    hs = _unrolled_layer(rng, nodes, inits, xs, None, "l0", i, h)
    _stack(nodes, inits, hs, "Y")
    model = make_model(nodes, [_info("X", steps, b, i)], [_info("Y", steps, b, h)], inits, opset=21)
    out, report = compile_model(model, CompileOptions(bits=4), samples=[{"X": rng.standard_normal((steps, b, i)).astype(np.float32)}])
    assert op_histogram(out).get("RNN") == 1
    assert {q["role"] for q in report["tensors"]} == {"rnn_w", "rnn_r"}


def _info(name, *dims):
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, list(dims))


def _check_semantics(model, out, feeds):
    """Checker, idempotence, ORT before == ORT after == interpreter (float32 noise)."""
    g.check(out)
    assert not run_pass(FuseLstmGatesPass(), out)[1].modified
    before, after = run_ort(model, feeds), run_ort(out, feeds)
    interp = run_interp(out, feeds)
    for name, want in before.items():
        np.testing.assert_allclose(after[name], want, rtol=1e-5, atol=1e-5, err_msg=name)
        np.testing.assert_allclose(interp[name], after[name], rtol=1e-5, atol=1e-5, err_msg=name)
