"""The int8-at-load form (passes/lower_int8_dynamic.py): the file keeps a MatMul weight's low-bit codes
(or codebook indices); QuantizeLinear re-rounds the decoded weight to int8 per column, ONNX Runtime folds
it at session load (session.disable_quant_qdq=1) and DynamicQuantizeMatMul runs INT8's kernel."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import q4c
from q4c import ort as q4ort
from q4c.config import CompileOptions
from q4c.latency.forms import SESSION_CONFIG, LayerKind, LayerShape
from q4c.latency.forms import Form as LForm
from q4c.latency.micro import layer_feeds, layer_model
from q4c.metrics import sqnr_db
from q4c.passes.assign_precision import AssignPrecisionPass
from q4c.passes.choose_kernels import ChooseKernelsPass
from q4c.passes.lower_int8_dynamic import LowerInt8DynamicPass
from q4c.passes.quantize_weights import QuantizeWeightsPass
from q4c.pipeline import PassContext
from q4c.quant.plan import Form, FormBasis
from q4c.testing import heavy_tailed, make_model, op_histogram, run_interp, run_ort, run_pass

F = TensorProto.FLOAT
AT_LOAD = {"session.disable_quant_qdq": "1"}


def _two_matmuls(rng: np.random.Generator, m: int = 16) -> onnx.ModelProto:
    """x [m, 128] -> MatMul W1 [128, 96] -> Relu -> MatMul W2 [96, 40]."""
    return make_model([helper.make_node("MatMul", ["x", "W1"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
                       helper.make_node("MatMul", ["r", "W2"], ["y"])],
                      [helper.make_tensor_value_info("x", F, [m, 128])], [helper.make_tensor_value_info("y", F, [m, 40])],
                      {"W1": heavy_tailed(rng, (128, 96)), "W2": heavy_tailed(rng, (96, 40))})


def _lowered(model: onnx.ModelProto, **options) -> tuple[onnx.ModelProto, onnx.ModelProto, dict]:
    """(DQ model = the 4-bit weights in float, lowered model, the lowering's stats) with every
    weight's form set to int8-at-load by hand."""
    ctx = PassContext(options=CompileOptions(**options))
    m, _ = run_pass(AssignPrecisionPass(), model, ctx=ctx)
    for name, tp in ctx.plan.tensors.items():
        ctx.plan.tensors[name] = tp.with_form(Form.INT8_AT_LOAD, FormBasis.USER)
    m, _ = run_pass(ChooseKernelsPass(), m, ctx=ctx)
    assert {tp.form for tp in ctx.plan.tensors.values()} == {Form.INT8_AT_LOAD}  # kept, not overwritten
    dq, _ = run_pass(QuantizeWeightsPass(), m, ctx=ctx)
    lowered, result = run_pass(LowerInt8DynamicPass(), dq, ctx=ctx)
    return dq, lowered, result.stats


def _ort(model: onnx.ModelProto, feeds: dict, config: dict) -> np.ndarray:
    return q4ort.run(q4ort.make_session(model, threads=1, config=config), feeds)["y"]


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_low_bit_codes_run_in_the_int8_kernel(rng, bits):
    model = _two_matmuls(rng)
    dq, lowered, stats = _lowered(model, bits=bits)
    onnx.checker.check_model(lowered, full_check=True)
    assert stats == {"dynamic_quantize_matmul": 2, "int8_at_load": 2}
    hist = op_histogram(lowered)
    assert hist["com.microsoft::DynamicQuantizeMatMul"] == 2 and hist["QuantizeLinear"] == 2
    assert "MatMul" not in hist
    # the file holds the planned codes only: no second (int8) copy of a weight, a few bytes of shared constants
    assert {t.name for t in lowered.graph.initializer if t.data_type == TensorProto.INT8} == \
        {t.name for t in dq.graph.initializer if t.data_type == TensorProto.INT8}
    assert lowered.ByteSize() - dq.ByteSize() < 700
    feeds = {"x": rng.standard_normal((16, 128), dtype=np.float32)}
    ort_y, interp_y = _ort(lowered, feeds, AT_LOAD), run_interp(lowered, feeds)["y"]
    # the same uint8 activation codes and int8 weights in both runtimes: equal to float rounding
    np.testing.assert_allclose(ort_y, interp_y, rtol=1e-4, atol=1e-4 * float(np.abs(interp_y).max()))
    # without the session config ONNX Runtime runs the QuantizeLinear every call: same numbers
    np.testing.assert_allclose(_ort(lowered, feeds, {}), ort_y, rtol=1e-5, atol=1e-6)
    # against the low-bit weights in float (the plan's specification): only int8 re-rounding and
    # uint8 activations apart (measured 35-40 dB)
    assert sqnr_db(run_ort(dq, feeds)["y"], ort_y) > 28


def test_codebook_weights_are_decoded_then_rounded_to_int8(rng):
    model = _two_matmuls(rng)
    dq, lowered, stats = _lowered(model, bits=3, scheme="kmeans")
    onnx.checker.check_model(lowered, full_check=True)
    assert stats["int8_at_load"] == 2
    assert op_histogram(lowered)["com.microsoft::DynamicQuantizeMatMul"] == 2
    feeds = {"x": rng.standard_normal((16, 128), dtype=np.float32)}
    ort_y, interp_y = _ort(lowered, feeds, AT_LOAD), run_interp(lowered, feeds)["y"]
    np.testing.assert_allclose(ort_y, interp_y, rtol=1e-4, atol=1e-4 * float(np.abs(interp_y).max()))
    assert sqnr_db(run_ort(dq, feeds)["y"], ort_y) > 28


def test_int8_at_load_weights_hold_the_hand_rounded_values(rng):
    """The int8 weight ONNX Runtime folds is round(W / (max_k |W| / 127)) of the decoded weight."""
    model = _two_matmuls(rng)
    dq, lowered, _ = _lowered(model, bits=4)
    q = next(n for n in lowered.graph.node if n.op_type == "QuantizeLinear")
    probe = onnx.ModelProto()
    probe.CopyFrom(lowered)
    probe.graph.output.extend([helper.make_empty_tensor_value_info(q.input[0]),
                               helper.make_empty_tensor_value_info(q.output[0])])
    feeds = {"x": rng.standard_normal((16, 128), dtype=np.float32)}
    outs = q4ort.run(q4ort.make_session(probe, threads=1, config=AT_LOAD), feeds)
    w, w8 = outs[q.input[0]], outs[q.output[0]]
    step = np.abs(w).max(axis=0) / 127
    np.testing.assert_array_equal(w8, np.clip(np.rint(w / step), -128, 127).astype(np.int8))


def test_int8_at_load_form_is_refused_for_weights_not_read_by_matmul(rng):
    table = make_model([helper.make_node("Gather", ["E", "ids"], ["y"])],
                       [helper.make_tensor_value_info("ids", TensorProto.INT64, [5])],
                       [helper.make_tensor_value_info("y", F, [5, 64])], {"E": heavy_tailed(rng, (100, 64))})
    ctx = PassContext(options=CompileOptions(bits=4))
    m, _ = run_pass(AssignPrecisionPass(), table, ctx=ctx)
    for name, tp in ctx.plan.tensors.items():
        ctx.plan.tensors[name] = tp.with_form(Form.INT8_AT_LOAD, FormBasis.USER)
    with pytest.raises(Exception, match="int8-at-load"):
        run_pass(ChooseKernelsPass(), m, ctx=ctx)


@pytest.fixture
def fake_costs(monkeypatch):
    """Layer costs by form: FP32 100 us, MatMulNBits 90 / 150 (acc 0), INT8 dynamic and at load 30;
    the FP32 model 220 us and every built plan 80 us."""
    from q4c.latency.costs import CostTable
    from q4c.latency.forms import timed_bits
    from q4c.passes import choose_forms

    per_form = {LForm.FP32_AT_LOAD: 100e-6, LForm.NBITS_ACC4: 90e-6, LForm.NBITS_ACC0: 150e-6,
                LForm.INT8_DYNAMIC: 30e-6, LForm.INT8_AT_LOAD: 30e-6}

    def costs(wanted, cache=None):
        table = CostTable(cache_key="test", cache_path="-")
        for shape, variants in wanted.items():
            for form, b in list(variants) + [(LForm.FP32_AT_LOAD, 32)]:
                table.seconds[(shape, form, timed_bits(form, b))] = per_form[form]
        return table

    monkeypatch.setattr(choose_forms, "costs", costs)
    monkeypatch.setattr(choose_forms, "_fp32_seconds", lambda graph, ctx: 220e-6)
    monkeypatch.setattr(choose_forms, "time_against_fp32", lambda fp32, model, feeds: (220e-6, 80e-6))


def test_compiled_model_records_the_session_config(rng, fake_costs):
    """A compile whose plan has an int8-at-load weight writes session.disable_quant_qdq=1 (else the
    DequantizeLinear would run on every call, measured 28-61x slower)."""
    samples = [{"x": rng.standard_normal((16, 128), dtype=np.float32)} for _ in range(2)]
    out, report = q4c.compile_model(_two_matmuls(rng), CompileOptions(workers=1, ratio=0.15, latency_budget="0.5"),
                                    samples=samples, verify=False)
    assert "int8-at-load" in {tp["form"] for tp in report["plan"]["tensors"].values()}
    assert q4ort.session_config(out).get("session.disable_quant_qdq") == "1"
    onnx.checker.check_model(out, full_check=True)
    feeds = samples[0]
    np.testing.assert_allclose(q4ort.run(q4ort.make_session(out, threads=1), feeds)["y"], run_interp(out, feeds)["y"],
                               rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_micro_benchmark_model_matches_the_interpreter(bits):
    shape = LayerShape(LayerKind.MATMUL, 256, 128, 20)
    model = layer_model(shape, LForm.INT8_AT_LOAD, bits)
    onnx.checker.check_model(model, full_check=True)
    feeds = layer_feeds(shape)
    y = _ort(model, feeds, SESSION_CONFIG[LForm.INT8_AT_LOAD])
    np.testing.assert_allclose(y, run_interp(model, feeds)["y"], rtol=1e-4, atol=1e-4 * float(np.abs(y).max()))


def test_bias_add_is_taken_into_the_kernel(rng):
    """MatMul -> Add(float32 [N] constant) becomes one DynamicQuantizeMatMul with its bias input; an
    Add whose other input is not such a constant stays."""
    w1, b1, w2 = heavy_tailed(rng, (128, 96)), rng.standard_normal(96).astype(np.float32), heavy_tailed(rng, (96, 40))
    model = make_model([helper.make_node("MatMul", ["x", "W1"], ["h"]), helper.make_node("Add", ["b1", "h"], ["hb"]),
                        helper.make_node("Relu", ["hb"], ["r"]), helper.make_node("MatMul", ["r", "W2"], ["m"]),
                        helper.make_node("Add", ["m", "x40"], ["y"])],
                       [helper.make_tensor_value_info("x", F, [16, 128]), helper.make_tensor_value_info("x40", F, [16, 40])],
                       [helper.make_tensor_value_info("y", F, [16, 40])], {"W1": w1, "b1": b1, "W2": w2})
    dq, lowered, stats = _lowered(model, bits=4)
    onnx.checker.check_model(lowered, full_check=True)
    hist = op_histogram(lowered)
    assert hist["com.microsoft::DynamicQuantizeMatMul"] == 2 and hist["Add"] == 1  # the activation Add stays
    kernels = [n for n in lowered.graph.node if n.op_type == "DynamicQuantizeMatMul"]
    assert sorted(len(n.input) for n in kernels) == [3, 5]  # A, B, scale (, zero point, bias)
    feeds = {"x": rng.standard_normal((16, 128), dtype=np.float32), "x40": rng.standard_normal((16, 40), dtype=np.float32)}
    ort_y, interp_y = _ort(lowered, feeds, AT_LOAD), run_interp(lowered, feeds)["y"]
    np.testing.assert_allclose(ort_y, interp_y, rtol=1e-4, atol=1e-4 * float(np.abs(interp_y).max()))
    assert sqnr_db(run_ort(dq, feeds)["y"], ort_y) > 28


def test_tied_output_projection_runs_int8_at_load_from_the_embedding_codes(rng, fake_costs):
    """ids -> Gather(E [V, D]) -> MatMul(E^T [D, V]): the tied output projection takes int8-at-load, its
    embedding fp32-at-load, and the file holds one copy of the table's codes."""
    v, d = 300, 64
    table = heavy_tailed(rng, (v, d))
    model = make_model([helper.make_node("Gather", ["E", "ids"], ["h"]), helper.make_node("MatMul", ["h", "ET"], ["y"])],
                       [helper.make_tensor_value_info("ids", TensorProto.INT64, [12])],
                       [helper.make_tensor_value_info("y", F, [12, v])], {"E": table, "ET": np.ascontiguousarray(table.T)})
    samples = [{"ids": rng.integers(0, v, 12)} for _ in range(2)]
    out, report = q4c.compile_model(model, CompileOptions(workers=1, ratio=0.15, latency_budget="0.5"), samples=samples,
                                    verify=False)
    forms = {n: tp["form"] for n, tp in report["plan"]["tensors"].items()}
    assert forms == {"E": "fp32-at-load", "ET": "int8-at-load"}
    onnx.checker.check_model(out, full_check=True)
    copies = [t for t in out.graph.initializer if np.prod(t.dims) == v * d]
    assert len(copies) == 1, [t.name for t in copies]
    feeds = samples[0]
    got = q4ort.run(q4ort.make_session(out, threads=1), feeds)["y"]
    np.testing.assert_allclose(got, run_interp(out, feeds)["y"], rtol=1e-4, atol=1e-4 * float(np.abs(got).max()))
    assert sqnr_db(table[feeds["ids"]] @ table.T, got) > 15  # 4-bit weights, int8 re-rounding, uint8 activations


def test_uniform_bits_with_a_latency_budget_plans_forms_only(rng, fake_costs):
    """--bits 4 --latency-budget: no sensitivity table (uniform plans measure none); every weight keeps
    4 bits and takes the fastest form, and the compile verifies (the weight's load-time QuantizeLinear
    is not mistaken for an activation quantizer)."""
    samples = [{"x": rng.standard_normal((16, 128), dtype=np.float32)} for _ in range(2)]
    out, report = q4c.compile_model(_two_matmuls(rng), CompileOptions(workers=1, bits=4, latency_budget="0.5"),
                                    samples=samples, verify=True)
    tensors = report["plan"]["tensors"]
    assert {(tp["bits"], tp["form"]) for tp in tensors.values()} == {(4, "int8-at-load")}
    assert report["plan"]["defaults"]["latency"]["kept_assigned_bits"]
    onnx.checker.check_model(out, full_check=True)
    feeds = samples[1]
    got = q4ort.run(q4ort.make_session(out, threads=1), feeds)["y"]
    np.testing.assert_allclose(got, run_interp(out, feeds)["y"], rtol=1e-4, atol=1e-4 * float(np.abs(got).max()))
