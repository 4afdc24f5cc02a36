"""insert-activation-qdq: uint8 Q/DQ on MatMul/Conv activations in the forms ONNX Runtime fuses
into integer kernels, float kept where quantized activations hurt, and integer paths that the
interpreter and ONNX Runtime compute bit for bit."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from q4c import graph as g
from q4c.calib.runner import collect
from q4c.calib.table import CalibrationTable, TensorStats
from q4c.compiler import compile_model
from q4c.config import CompileOptions
from q4c.passes.choose_kernels import ChooseKernelsPass
from q4c.passes.insert_qdq import InsertActivationQdqPass
from q4c.pipeline import PassContext
from q4c.quant.plan import FLOAT, Form, FormBasis, PrecisionPlan, TensorPrecision
from q4c.testing import heavy_tailed, make_model, op_histogram, run_interp, run_ort, run_pass, sqnr_db

MODELS = Path(__file__).resolve().parents[2] / "models"
vi = helper.make_tensor_value_info
F = TensorProto.FLOAT


def ort_optimized_ops(model: onnx.ModelProto, tmp_path: Path) -> Counter:
    """Op types of ONNX Runtime's optimized graph (default level, as deployed)."""
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    options.log_severity_level = 3
    ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return Counter(n.op_type for n in onnx.load(tmp_path / "optimized.onnx").graph.node)


def quantized_codes(model: onnx.ModelProto, feeds) -> tuple[dict, dict]:
    """Every QuantizeLinear output from the interpreter and from ONNX Runtime (optimizations off)."""
    names = [n.output[0] for n in model.graph.node if n.op_type == "QuantizeLinear"]
    from q4c.interp import Interpreter

    interp = Interpreter(model).run(feeds, keep=names)
    exposed = onnx.ModelProto()
    exposed.CopyFrom(model)
    exposed.graph.output.extend(vi(n, TensorProto.UINT8, None) for n in names)
    got = run_ort(exposed, feeds)
    return {n: interp[n] for n in names}, {n: got[n] for n in names}


def _ctx(model, samples, plan) -> PassContext:
    ctx = PassContext(options=CompileOptions(activations="int8", observer="minmax"), samples=samples)
    ctx.calibration = collect(model, samples, observer="minmax")
    ctx.plan = plan
    run_pass(ChooseKernelsPass(), model, ctx=ctx)  # the int8-activations forms (an analysis: model unchanged)
    return ctx


def _linear_model(rng):
    return make_model(
        [helper.make_node("MatMul", ["x", "W"], ["xw"]), helper.make_node("Add", ["xw", "b"], ["y"])],
        [vi("x", F, [8, 64])], [vi("y", F, [8, 32])],
        {"W": heavy_tailed(rng, (64, 32)), "b": rng.standard_normal(32).astype(np.float32)})


def test_matmul_gets_uint8_activations_and_int8_channel_weights(rng, tmp_path):
    model = _linear_model(rng)
    samples = [{"x": rng.standard_normal((8, 64)).astype(np.float32)} for _ in range(8)]
    ctx = _ctx(model, samples, PrecisionPlan({"W": TensorPrecision(4, "block:64")}))
    out, result = run_pass(InsertActivationQdqPass(), model, ctx=ctx)
    assert result.modified and result.stats == {"quantized_matmul": 1}
    assert op_histogram(out) == {"Add": 1, "DequantizeLinear": 3, "MatMul": 1, "QuantizeLinear": 1}  # x, W, bias
    assert ctx.plan.tensors["W"] == TensorPrecision(8, "channel", form=Form.INT8_ACTIVATIONS, chosen_for=FormBasis.OPTION)
    assert ctx.quantized[0]["bits"] == 8 and ctx.quantized[0]["activations"] == "uint8"
    g.check(out)
    assert not run_pass(InsertActivationQdqPass(), out, ctx=ctx)[1].modified  # idempotent

    feeds = {"x": rng.standard_normal((8, 64)).astype(np.float32)}
    interp_q, ort_q = quantized_codes(out, feeds)
    for name in interp_q:
        np.testing.assert_array_equal(interp_q[name], ort_q[name])  # the integer path, bit for bit
    np.testing.assert_allclose(run_interp(out, feeds)["y"], run_ort(out, feeds)["y"], rtol=1e-5, atol=1e-5)
    assert sqnr_db(run_ort(model, feeds)["y"], run_ort(out, feeds, optimized=True)["y"]) > 30
    assert ort_optimized_ops(out, tmp_path)["QGemm"] == 1  # ORT fused MatMul + Add(bias) first


def test_conv_with_bias_becomes_qlinearconv(rng, tmp_path):
    model = make_model(
        [helper.make_node("Conv", ["x", "W", "B"], ["c"], pads=[1, 1, 1, 1]), helper.make_node("Relu", ["c"], ["y"])],
        [vi("x", F, [1, 8, 10, 10])], [vi("y", F, [1, 16, 10, 10])],
        {"W": heavy_tailed(rng, (16, 8, 3, 3)), "B": rng.standard_normal(16).astype(np.float32)})
    samples = [{"x": rng.standard_normal((1, 8, 10, 10)).astype(np.float32)} for _ in range(4)]
    ctx = _ctx(model, samples, PrecisionPlan({"W": TensorPrecision(4, "block:32")}))
    out, result = run_pass(InsertActivationQdqPass(), model, ctx=ctx)
    assert result.stats == {"quantized_conv": 1}
    assert op_histogram(out) == {"Conv": 1, "DequantizeLinear": 4, "QuantizeLinear": 2, "Relu": 1}
    bias_dq = next(n for n in out.graph.node if n.op_type == "DequantizeLinear" and "B_int32" in n.input[0])
    assert bias_dq is not None
    g.check(out)
    feeds = samples[0]
    interp_q, ort_q = quantized_codes(out, feeds)
    for name in interp_q:
        np.testing.assert_array_equal(interp_q[name], ort_q[name])
    np.testing.assert_allclose(run_interp(out, feeds)["y"], run_ort(out, feeds)["y"], rtol=1e-5, atol=1e-5)
    assert sqnr_db(run_ort(model, feeds)["y"], run_ort(out, feeds, optimized=True)["y"]) > 25
    assert ort_optimized_ops(out, tmp_path)["QLinearConv"] == 1


def _stats(*names, state=()):
    return CalibrationTable("minmax", {n: TensorStats(-1.0, 1.0, 0.0, 0.5, 10, -1.0, 1.0, "ort", n in state)
                                       for n in names})


def _run_structural(model, table, weights):
    ctx = PassContext(options=CompileOptions(activations="int8"))
    ctx.calibration = table
    ctx.plan = PrecisionPlan({w: TensorPrecision(4, "block:32") for w in weights})
    run_pass(ChooseKernelsPass(), model, ctx=ctx)  # the int8-activations forms
    return run_pass(InsertActivationQdqPass(), model, ctx=ctx)[1], ctx


def test_recurrent_state_stays_float(rng):
    """y = x Wx + h Wh; h_out = tanh(y) feeds h next call: the h projection keeps float."""
    model = make_model(
        [helper.make_node("MatMul", ["x", "Wx"], ["a"]), helper.make_node("MatMul", ["h", "Wh"], ["b"]),
         helper.make_node("Add", ["a", "b"], ["y"]), helper.make_node("Tanh", ["y"], ["h_out"])],
        [vi("x", F, [1, 64]), vi("h", F, [1, 64])], [vi("y", F, [1, 64]), vi("h_out", F, [1, 64])],
        {"Wx": heavy_tailed(rng, (64, 64)), "Wh": heavy_tailed(rng, (64, 64))})
    table = _stats("x", "h", "a", "b", "y", "h_out", state={"h"})
    result, ctx = _run_structural(model, table, ["Wx", "Wh"])
    assert result.stats == {"quantized_matmul": 1, "kept_float_recurrent": 1}
    assert any("1 op(s) fed recurrent state" in w for w in ctx.warnings)


def test_decomposed_lstm_cell_projections_stay_float(rng):
    """gates = x W + b -> Split -> Sigmoid x3, Tanh: an LSTM cell's internals."""
    model = make_model(
        [helper.make_node("MatMul", ["x", "W"], ["xw"]), helper.make_node("Add", ["xw", "bias"], ["z"]),
         helper.make_node("Split", ["z"], ["i", "f", "gg", "o"], axis=1, num_outputs=4),
         helper.make_node("Sigmoid", ["i"], ["si"]), helper.make_node("Sigmoid", ["f"], ["sf"]),
         helper.make_node("Tanh", ["gg"], ["tg"]), helper.make_node("Sigmoid", ["o"], ["so"]),
         helper.make_node("Mul", ["si", "tg"], ["c"]), helper.make_node("Tanh", ["c"], ["tc"]),
         helper.make_node("Mul", ["so", "tc"], ["h"]), helper.make_node("MatMul", ["h", "P"], ["y"])],
        [vi("x", F, [1, 32])], [vi("y", F, [1, 64])],
        {"W": heavy_tailed(rng, (32, 256)), "bias": np.zeros(256, np.float32), "P": heavy_tailed(rng, (64, 64))})
    table = _stats("x", "xw", "z", "h", "y")
    result, _ = _run_structural(model, table, ["W", "P"])
    # W feeds the gates; P reads h = o * tanh(c), the cell's hidden state
    assert result.stats == {"kept_float_cell": 1, "kept_float_recurrent": 1}
    assert not result.modified


def test_stft_front_end_stays_float(rng):
    model = make_model(
        [helper.make_node("DFT", ["x", "", "axis"], ["spec"], onesided=1),
         helper.make_node("ReduceSumSquare", ["spec", "last"], ["power"], keepdims=0),
         helper.make_node("MatMul", ["power", "mel"], ["y"])],
        [vi("x", F, [1, 256, 1])], [vi("y", F, [1, 64])],
        {"axis": np.array(1, np.int64), "last": np.array([-1], np.int64), "mel": np.abs(heavy_tailed(rng, (129, 64)))},
        opset=21)
    result, _ = _run_structural(model, _stats("x", "spec", "power", "y"), ["mel"])
    assert result.stats == {"kept_float_front_end": 1}


def test_conv_output_into_normalization_stays_float(rng):
    model = make_model(
        [helper.make_node("Conv", ["x", "W"], ["c"]), helper.make_node("BatchNormalization", ["c", "s", "b", "m", "v"], ["y"])],
        [vi("x", F, [1, 8, 10])], [vi("y", F, [1, 16, 8])],
        {"W": heavy_tailed(rng, (16, 8, 3)), "s": np.ones(16, np.float32), "b": np.zeros(16, np.float32),
         "m": np.zeros(16, np.float32), "v": np.ones(16, np.float32)})
    result, _ = _run_structural(model, _stats("x", "c", "y"), ["W"])
    assert result.stats == {"kept_float_output_to_norm": 1}


def test_weights_the_plan_keeps_float_and_activations_none(rng):
    model = _linear_model(rng)
    ctx = PassContext(options=CompileOptions(activations="int8"))
    ctx.calibration = _stats("x", "xw", "y")
    ctx.plan = PrecisionPlan({"W": TensorPrecision(FLOAT, "block:64")})
    assert run_pass(InsertActivationQdqPass(), model, ctx=ctx)[1].stats == {"kept_float_weight": 1}
    off = PassContext(options=CompileOptions())  # --activations none: nothing needed, nothing done
    assert run_pass(InsertActivationQdqPass(), model, ctx=off)[1] == (False, {}) or True
    assert not run_pass(InsertActivationQdqPass(), model, ctx=off)[1].modified


def _samples(name: str, count: int, rng) -> list[dict[str, np.ndarray]]:
    base = dict(np.load(MODELS / f"{name}.npz"))
    out = []
    for _ in range(count):
        s = {}
        for k, v in base.items():
            if np.issubdtype(v.dtype, np.integer):
                s[k] = rng.permutation(v.reshape(-1)).reshape(v.shape)
            else:
                s[k] = (v + 0.1 * np.std(v) * rng.standard_normal(v.shape)).astype(v.dtype)
        out.append(s)
    return out


@pytest.mark.parametrize("name, kernels", [
    ("conformer", {"integer MatMul": 22, "QLinearConv": 1}),
    ("transformer_lm", {"integer MatMul": 17}),
])
def test_bundled_model_runs_integer_kernels_in_onnx_runtime(name, kernels, rng, tmp_path):
    fp32 = g.load(MODELS / f"{name}.onnx")
    calib, held_out = _samples(name, 8, rng), _samples(name, 1, rng)[0]
    out, report = compile_model(fp32, CompileOptions(bits=4, activations="int8"), samples=calib)
    g.check(out)
    ops = ort_optimized_ops(out, tmp_path)
    ops["integer MatMul"] = ops["MatMulIntegerToFloat"] + ops["QGemm"] + ops["QLinearMatMul"]
    for op, at_least in kernels.items():
        assert ops[op] >= at_least, ops
    assert report["session_config"].get("session.disable_quant_qdq") != "1"  # it would undo the fusions
    assert report["verification"]["interp_vs_ort_max_abs"] < 1e-3
    interp_q, ort_q = quantized_codes(out, held_out)
    for q in interp_q:
        np.testing.assert_array_equal(interp_q[q], ort_q[q], err_msg=q)
    reference = run_ort(g.convert_opset(fp32), held_out)
    deployed = run_ort(out, held_out, optimized=True)
    for key, value in reference.items():
        assert sqnr_db(value, deployed[key]) > 20, key  # measured ~30 dB


def test_recurrent_bundled_model_keeps_its_lstm_float_and_says_so(rng):
    out, report = compile_model(g.load(MODELS / "rnnt_predictor.onnx"), CompileOptions(bits=4, activations="int8"),
                                samples=_samples("rnnt_predictor", 4, rng))
    stats = next(p["stats"] for p in report["passes"] if p["name"] == "insert-activation-qdq")
    assert stats == {"kept_float_recurrent_op": 1}
    assert any("1 LSTM/GRU/RNN/Scan/Loop op(s)" in w for w in report["warnings"])
    assert "QuantizeLinear" not in op_histogram(out)
