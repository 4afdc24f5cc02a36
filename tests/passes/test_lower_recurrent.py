"""lower-recurrent: DQ -> LSTM/GRU becomes Scan + MatMulNBits or DynamicQuantizeLSTM.

Each lowering is checked against the form it replaces: the same LSTM/GRU on the same codes and
scales dequantized in float32. (The DequantizeLinear in the graph has float16 scales and so
rounds every dequantized weight to float16, ~2^-11 relative; MatMulNBits computes codes x scale
in float32. That rounding is the only difference, checked separately below.)
"""

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from onnx import TensorProto, helper

from q4c import graph as g
from q4c import ort as q4ort
from q4c.config import CompileOptions, Target
from q4c.passes.assign_precision import AssignPrecisionPass
from q4c.passes.choose_kernels import ChooseKernelsPass
from q4c.passes.lower_recurrent import LowerRecurrentPass, choose_form
from q4c.passes.quantize_weights import QuantizeWeightsPass
from q4c.pipeline import PassContext
from q4c.recurrent_lowering import dequantized_lstm_copy, match_layer
from q4c.testing import make_model, op_histogram, run_interp, run_ort, run_pass, sqnr_db
from q4c.verify import float_accuracy_copy

LOW_BIT = CompileOptions(bits=4, kernels="low-bit")  # lower whatever the hidden size


def _recurrent_model(rng, op="LSTM", t=5, b=2, i=40, h=32, direction="forward", seq=False, init=False, layout=0,
                     lbr=0, opset=21):
    nd = 2 if direction == "bidirectional" else 1
    gates = 4 if op == "LSTM" else 3
    inits = {"W": (rng.standard_normal((nd, gates * h, i)) * 0.2).astype(np.float32),
             "R": (rng.standard_normal((nd, gates * h, h)) * 0.2).astype(np.float32),
             "B": (rng.standard_normal((nd, 2 * gates * h)) * 0.2).astype(np.float32)}
    x_shape = [t, b, i] if layout == 0 else [b, t, i]
    state_shape = [nd, b, h] if layout == 0 else [b, nd, h]
    inputs = [helper.make_tensor_value_info("X", TensorProto.FLOAT, x_shape)]
    names = ["X", "W", "R", "B", "", "", ""][: 7 if op == "LSTM" else 6]
    feeds = {"X": rng.standard_normal(x_shape).astype(np.float32)}
    if seq:
        inputs.append(helper.make_tensor_value_info("lens", TensorProto.INT32, [b]))
        names[4] = "lens"
        feeds["lens"] = np.array([t] + [max(1, t - 2 - k) for k in range(b - 1)], np.int32)
    if init:
        for k, state in enumerate(["h0", "c0"][: 2 if op == "LSTM" else 1]):
            inputs.append(helper.make_tensor_value_info(state, TensorProto.FLOAT, state_shape))
            names[5 + k] = state
            feeds[state] = (rng.standard_normal(state_shape) * 0.5).astype(np.float32)
    while names[-1] == "":
        names.pop()
    outs = ["Y", "Y_h", "Y_c"][: 3 if op == "LSTM" else 2]
    attrs = {"hidden_size": h, "direction": direction, "layout": layout}
    if op == "GRU":
        attrs["linear_before_reset"] = lbr
    node = helper.make_node(op, names, outs, **attrs)
    outputs = [helper.make_tensor_value_info(o, TensorProto.FLOAT, [None] * (4 if o == "Y" else 3)) for o in outs]
    return make_model([node], inputs, outputs, inits, opset=opset), feeds


def _quantize(model, options=LOW_BIT):
    ctx = PassContext(options=options, opset=g.default_opset(model))
    planned, _ = run_pass(AssignPrecisionPass(), model, ctx=ctx)
    planned, _ = run_pass(ChooseKernelsPass(), planned, ctx=ctx)  # the plan's forms
    dq, _ = run_pass(QuantizeWeightsPass(), planned, ctx=ctx)
    return dq, ctx


def _float32_dequantized(dq_model):
    """The DQ form with each LSTM/GRU weight replaced by its codes x scales in float32."""
    graph = g.import_graph(dq_model)
    for node in [n for n in graph.nodes if n.op in ("LSTM", "GRU")]:
        layer = match_layer(graph, node, {})
        node.inputs[1] = gs.Constant("W_f32", np.stack([w.dequantize() for w in layer.w]))
        node.inputs[2] = gs.Constant("R_f32", np.stack([r.dequantize() for r in layer.r]))
    graph.cleanup()
    return g.export_model(graph, like=dq_model)


def _lower(model, options=LOW_BIT):
    dq, ctx = _quantize(model, options)
    lowered, result = run_pass(LowerRecurrentPass(), dq, ctx=ctx)
    return dq, lowered, result, ctx


CASES = {
    "lstm_forward": {},
    "lstm_reverse": {"direction": "reverse"},
    "lstm_bidirectional_states": {"direction": "bidirectional", "init": True},
    "lstm_sequence_lens": {"seq": True, "b": 3},
    "lstm_bidirectional_sequence_lens_states": {"direction": "bidirectional", "seq": True, "init": True, "b": 3},
    "lstm_layout1_bidirectional_states": {"layout": 1, "direction": "bidirectional", "init": True},
    "gru_forward_lbr1": {"op": "GRU", "lbr": 1},
    "gru_bidirectional_lbr0_states": {"op": "GRU", "direction": "bidirectional", "init": True},
    "gru_reverse_sequence_lens_lbr1": {"op": "GRU", "direction": "reverse", "seq": True, "lbr": 1, "b": 3},
}


@pytest.mark.parametrize("case", CASES)
def test_scan_lowering_equals_the_layer_it_replaces(rng, case):
    model, feeds = _recurrent_model(rng, **CASES[case])
    dq, lowered, result, _ = _lower(model)

    assert result.modified and result.stats == {"scan": 1}
    hist = op_histogram(lowered)
    assert hist["Scan"] == 1 and "LSTM" not in hist and "GRU" not in hist and "DequantizeLinear" not in hist
    g.check(lowered)
    ctx = PassContext(options=LOW_BIT)
    assert not run_pass(LowerRecurrentPass(), lowered, ctx=ctx)[1].modified  # idempotent

    reference = _float32_dequantized(dq)
    # ONNX Runtime refuses layout 1 LSTM/GRU (it runs only after lowering): there the reference
    # is the interpreter.
    want = run_interp(reference, feeds) if CASES[case].get("layout") else run_ort(reference, feeds)
    exact = run_ort(float_accuracy_copy(lowered), feeds)  # MatMulNBits at accuracy_level 0
    interp = run_interp(lowered, feeds)
    for name, value in want.items():
        np.testing.assert_allclose(exact[name], value, rtol=1e-5, atol=1e-5, err_msg=f"{name}: lowered vs replaced")
        np.testing.assert_allclose(interp[name], exact[name], rtol=1e-5, atol=1e-5, err_msg=f"{name}: interp vs ORT")
    if CASES[case].get("seq"):
        lens = feeds["lens"]
        y = exact["Y"] if not CASES[case].get("layout") else exact["Y"].transpose(1, 2, 0, 3)
        assert not np.any(y[lens[-1]:, :, -1])  # past the last entry's length: zeros


def test_dequantize_linear_differs_from_the_lowering_by_float16_rounding_only(rng):
    model, feeds = _recurrent_model(rng, direction="bidirectional", init=True)
    dq, lowered, _, _ = _lower(model)
    exact = run_ort(float_accuracy_copy(lowered), feeds)
    with_dq = run_ort(dq, feeds)
    for name, value in with_dq.items():
        assert 0 < np.max(np.abs(exact[name] - value)) < 2e-3, name  # measured ~5e-4


def test_deployed_form_uses_int8_activations_and_stays_close(rng):
    model, feeds = _recurrent_model(rng, t=8, i=64, h=64)
    dq, lowered, _, _ = _lower(model)
    deployed = q4ort.run(q4ort.make_session(lowered), feeds)  # accuracy_level 4, all optimizations
    reference = run_ort(_float32_dequantized(dq), feeds)
    for name, value in reference.items():
        assert sqnr_db(value, deployed[name]) > 30, name  # int8 activation rounding: measured ~40 dB


@pytest.mark.parametrize("bits", [2, 3, 8])
def test_scan_lowering_runs_other_bit_widths(rng, bits):
    # 2 bits as INT2 needs opset 25; 3 bits ride in 4-bit MatMulNBits; 8-bit GRUs have no
    # dynamic-quantized op, so they take the Scan form with 8-bit MatMulNBits.
    model, feeds = _recurrent_model(rng, op="GRU", lbr=1, opset=25 if bits == 2 else 21)
    dq, lowered, result, _ = _lower(model, CompileOptions(bits=bits, kernels="low-bit"))
    assert result.stats == {"scan": 1}
    nbits = {a.i for gp in g.iter_graph_protos(lowered.graph) for n in gp.node if n.op_type == "MatMulNBits"
             for a in n.attribute if a.name == "bits"}
    assert nbits == {4 if bits == 3 else bits}
    exact = run_ort(float_accuracy_copy(lowered), feeds)
    want = run_ort(_float32_dequantized(dq), feeds)
    for name, value in want.items():
        np.testing.assert_allclose(exact[name], value, rtol=1e-5, atol=1e-5, err_msg=name)
        np.testing.assert_allclose(run_interp(lowered, feeds)[name], exact[name], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", ["lstm_forward", "lstm_bidirectional_sequence_lens_states",
                                  "lstm_layout1_bidirectional_states"])
def test_8_bit_lstm_becomes_dynamic_quantize_lstm(rng, case):
    kwargs = {**CASES[case], "b": 1}  # batch 1: ORT quantizes h exactly as the interpreter does
    model, feeds = _recurrent_model(rng, **kwargs)
    dq, lowered, result, ctx = _lower(model, CompileOptions(bits=8, kernels="low-bit"))

    assert result.stats == {"dynamic_quantize_lstm": 1}
    assert {k: v for k, v in op_histogram(lowered).items() if k != "Transpose"} == {
        "com.microsoft::DynamicQuantizeLSTM": 1}
    g.check(lowered)
    assert not run_pass(LowerRecurrentPass(), lowered, ctx=PassContext(options=LOW_BIT))[1].modified
    # Block-wise INT8 codes are re-quantized per channel (what the op takes), and reported so.
    # (W: K=40 in two blocks of 32; R: K=32 is one block already, reused as is).
    assert {q["role"]: q["granularity"] for q in ctx.quantized} == {"lstm_w": "channel", "lstm_r": "block:32"}
    assert all(q["sensitivity"]["weight_sqnr_db"] > 35 for q in ctx.quantized)

    actual = run_ort(lowered, feeds)
    interp = run_interp(lowered, feeds)
    reference = (run_interp if kwargs.get("layout") else run_ort)(_float32_dequantized(dq), feeds)
    for name, value in reference.items():
        np.testing.assert_allclose(interp[name], actual[name], rtol=1e-5, atol=1e-5, err_msg=name)
        assert sqnr_db(value, actual[name]) > 25, name  # uint8 activations: measured ~35 dB


def test_dequantized_lstm_copy_is_the_float_lstm_of_the_int8_weights(rng):
    # What equivalence checks run instead of DynamicQuantizeLSTM (whose uint8 activations make
    # ORT and the interpreter drift apart after a rounding flip on long inputs).
    model, feeds = _recurrent_model(rng, direction="bidirectional", seq=True, init=True, b=3, t=12)
    dq, lowered, _, _ = _lower(model, CompileOptions(bits=8, kernels="low-bit"))
    copy = dequantized_lstm_copy(lowered)
    g.check(copy)
    assert op_histogram(copy) == {"LSTM": 1}
    exact, interp = run_ort(copy, feeds), run_interp(copy, feeds)
    reference = run_ort(_float32_dequantized(dq), feeds)
    for name, value in reference.items():
        np.testing.assert_allclose(interp[name], exact[name], rtol=1e-5, atol=1e-5, err_msg=name)
        assert sqnr_db(value, exact[name]) > 40, name  # only the per-channel re-quantization differs


def test_rule_keeps_small_layers_folded_and_lowers_large_ones(rng):
    small, _ = _recurrent_model(rng, h=64, i=64)
    _, kept, result, _ = _lower(small, CompileOptions(bits=4))
    assert result.stats == {"kept_dq": 1} and not result.modified
    config, ops = q4ort.needed_session_config(kept)
    assert config == {"session.disable_quant_qdq": "1"} and ops == ["LSTM"]

    large, feeds = _recurrent_model(rng, h=512, i=64, t=2, b=1)
    _, lowered, result, _ = _lower(large, CompileOptions(bits=4))
    assert result.stats == {"scan": 1}
    assert q4ort.needed_session_config(lowered) == ({}, [])  # nothing left to fold at load
    assert np.all(np.isfinite(q4ort.run(q4ort.make_session(lowered), feeds)["Y"]))


def test_rule_per_precision_and_layout(rng):
    def form(bits, **kwargs):
        model, _ = _recurrent_model(rng, **kwargs)
        dq, _ = _quantize(model, CompileOptions(bits=bits))
        graph = g.import_graph(dq)
        node = next(n for n in graph.nodes if n.op in ("LSTM", "GRU"))
        return choose_form(match_layer(graph, node, {}), "auto")

    assert form(8, h=256, i=32, t=1, b=1) == "dynamic_quantize_lstm"
    assert form(8, h=128, i=32, t=1, b=1) == "kept_dq"
    assert form(8, op="GRU", h=512, i=32, t=1, b=1) == "scan"
    assert form(4, h=256, i=32, t=1, b=1) == "kept_dq"
    assert form(4, h=384, i=32, t=1, b=1) == "scan"
    assert form(4, h=32, layout=1) == "scan"  # ONNX Runtime cannot run layout 1 LSTM at all


def test_onnx_target_keeps_the_standard_op(rng):
    model, _ = _recurrent_model(rng, h=512, i=64, t=2, b=1)
    options = CompileOptions(bits=4, target=Target.ONNX)
    _, lowered, result, _ = _lower(model, options)
    assert not result.modified
    assert op_histogram(lowered)["LSTM"] == 1


def test_declines_peepholes_and_float_weights(rng):
    model, _ = _recurrent_model(rng, h=32)
    model.graph.node[0].input.extend(["", "", "", "P"])
    model.graph.initializer.append(onnx.numpy_helper.from_array(np.zeros((1, 96), np.float32), "P"))
    _, _, result, _ = _lower(model)
    assert result.stats == {"skipped_peephole": 1} and not result.modified

    floats, _ = _recurrent_model(rng, h=8, i=8)  # below min_elements: the plan keeps it float
    _, _, result, _ = _lower(floats)
    assert result.stats == {"skipped_float_weights": 1}
