"""choose-forms (--latency-budget) and the int8-dynamic lowering it can ask for."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper

import q4c
from q4c.config import CompileOptions, Granularity
from q4c.errors import ConfigError
from q4c.latency.costs import CostTable
from q4c.latency.forms import Form as LForm
from q4c.latency.forms import timed_bits
from q4c.latency.measure import Calibration, corrected
from q4c.metrics import sqnr_db
from q4c.passes import choose_forms
from q4c.passes.assign_precision import AssignPrecisionPass
from q4c.passes.choose_kernels import ChooseKernelsPass
from q4c.passes.lower_int8_dynamic import LowerInt8DynamicPass
from q4c.passes.quantize_weights import QuantizeWeightsPass
from q4c.pipeline import PassContext
from q4c.quant.plan import Form, FormBasis
from q4c.testing import heavy_tailed, make_model, matmul_model, op_histogram, run_ort, run_pass


def test_int8_dynamic_form_becomes_dynamic_quantize_matmul(rng):
    model = matmul_model(rng, m=16, k=128, n=64)
    ctx = PassContext(options=CompileOptions(bits=8, granularity=Granularity.parse("channel")))
    m, _ = run_pass(AssignPrecisionPass(), model, ctx=ctx)
    (name,) = ctx.plan.tensors
    ctx.plan.tensors[name] = ctx.plan.tensors[name].with_form(Form.INT8_DYNAMIC, FormBasis.USER)
    m, _ = run_pass(ChooseKernelsPass(), m, ctx=ctx)
    assert ctx.plan.tensors[name].form is Form.INT8_DYNAMIC  # kept, not overwritten by the rules
    dq, _ = run_pass(QuantizeWeightsPass(), m, ctx=ctx)
    lowered, result = run_pass(LowerInt8DynamicPass(), dq, ctx=ctx)
    assert result.stats == {"dynamic_quantize_matmul": 1}
    assert op_histogram(lowered) == {"com.microsoft::DynamicQuantizeMatMul": 1}
    assert not run_pass(LowerInt8DynamicPass(), lowered, ctx=ctx)[1].modified
    feeds = {"x": rng.standard_normal((16, 128), dtype=np.float32)}
    want = run_ort(dq, feeds)["y"]  # int8 weights, float activations: the specification
    # activations quantized to uint8 per call (one scale per tensor): ~40 dB measured
    assert sqnr_db(want, run_ort(lowered, feeds)["y"]) > 30


def test_int8_dynamic_form_needs_8_bits_per_channel(rng):
    model = matmul_model(rng, m=4, k=128, n=64)
    ctx = PassContext(options=CompileOptions(bits=4))
    m, _ = run_pass(AssignPrecisionPass(), model, ctx=ctx)
    (name,) = ctx.plan.tensors
    ctx.plan.tensors[name] = ctx.plan.tensors[name].with_form(Form.INT8_DYNAMIC, FormBasis.USER)
    with pytest.raises(Exception, match="int8-dynamic"):
        run_pass(ChooseKernelsPass(), m, ctx=ctx)


def _two_layer_model(rng):
    """x [32, 128] -> MatMul W1 [128, 256] -> Relu -> MatMul W2 [256, 64]."""
    return make_model(
        [helper.make_node("MatMul", ["x", "W1"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
         helper.make_node("MatMul", ["r", "W2"], ["y"])],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [32, 128])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [32, 64])],
        {"W1": heavy_tailed(rng, (128, 256)), "W2": heavy_tailed(rng, (256, 64))})


@pytest.fixture
def synthetic_costs(monkeypatch):
    """Layer costs by form (seconds per call): FP32 100 us, MatMulNBits 90, acc 0 150, INT8 dynamic 30,
    INT8 at load (low-bit file, int8 kernel) 30; the FP32 model 220 us (20 us outside the two layers)."""
    per_form = {LForm.FP32_AT_LOAD: 100e-6, LForm.NBITS_ACC4: 90e-6, LForm.NBITS_ACC0: 150e-6, LForm.INT8_DYNAMIC: 30e-6,
                LForm.INT8_AT_LOAD: 30e-6}

    def fake_costs(wanted, cache=None):
        table = CostTable(cache_key="test", cache_path="-")
        for shape, variants in wanted.items():
            for form, bits in variants:
                table.seconds[(shape, form, timed_bits(form, bits))] = per_form[form]
            table.seconds[(shape, LForm.FP32_AT_LOAD, 32)] = per_form[LForm.FP32_AT_LOAD]
        return table

    def fake_timing(fp32, model, feeds):
        """The built model's time from its ops: the same per-form costs, 20 us elsewhere."""
        ops = op_histogram(model)
        layers = (100e-6 * ops.get("MatMul", 0) + 90e-6 * ops.get("com.microsoft::MatMulNBits", 0)
                  + 30e-6 * ops.get("com.microsoft::DynamicQuantizeMatMul", 0))
        return 220e-6, 20e-6 + layers

    monkeypatch.setattr(choose_forms, "costs", fake_costs)
    monkeypatch.setattr(choose_forms, "_fp32_seconds", lambda graph, ctx: 220e-6)
    monkeypatch.setattr(choose_forms, "time_against_fp32", fake_timing)


def _compile(model, rng, **options):
    samples = [{"x": rng.standard_normal((32, 128), dtype=np.float32)} for _ in range(2)]
    return q4c.compile_model(model, CompileOptions(workers=1, **options), samples=samples, verify=False)


def test_tight_latency_budget_picks_int8_dynamic_within_the_byte_budget(rng, synthetic_costs):
    model = _two_layer_model(rng)
    # 0.6 x 220 us = 132 us: 20 us + both layers INT8 dynamic (60 us) fits; one FP32/MatMulNBits layer does not
    out, report = _compile(model, rng, latency_budget="0.6", ratio=0.3)
    latency = report["plan"]["defaults"]["latency"]
    hist = op_histogram(out)
    assert hist.get("com.microsoft::DynamicQuantizeMatMul") == 2, hist
    assert latency["budget_met"]
    assert latency["predicted_ms"] == pytest.approx(0.08)  # 20 us outside the layers + 2 x 30 us


def test_loose_latency_budget_keeps_the_assigned_bits_with_their_fastest_forms(rng, synthetic_costs):
    model = _two_layer_model(rng)
    seed = int(rng.integers(1 << 30))
    _, plain = _compile(model, np.random.default_rng(seed))
    out, report = _compile(model, np.random.default_rng(seed), latency_budget="1.0")
    latency = report["plan"]["defaults"]["latency"]
    assert latency["kept_assigned_bits"] and latency["budget_met"]
    for name, tp in report["plan"]["tensors"].items():
        before = plain["plan"]["tensors"][name]
        assert (tp["bits"], tp["scheme"]) == (before["bits"], before["scheme"])
        if tp["bits"] == 8 and tp["scheme"] == "symmetric":
            assert tp["form"] == "int8-dynamic"  # 30 us: the fastest
        elif tp["bits"] <= 4:  # any scheme, codebooks too: decoded and re-rounded to int8 at load
            assert tp["form"] == "int8-at-load"  # 30 us beats MatMulNBits' 90, FP32's 100 and acc 0's 150
        assert tp["chosen_for"] == "latency"


def test_calibration_solves_rest_and_factor_from_one_measured_plan():
    # FP32: rest + F x 100 = 300; plan: rest + F x 50 = 200  ->  F = 2, rest = 100
    cal = corrected(300.0, 200.0, 100.0, 50.0, fallback=Calibration(1.0, 0.0))
    assert cal.factor == pytest.approx(2.0) and cal.rest == pytest.approx(100.0)
    # layer costs too close to separate the two unknowns: the fallback
    assert corrected(300.0, 299.0, 100.0, 99.0, fallback=Calibration(1.0, 7.0)) == Calibration(1.0, 7.0)
    # no planned layer time at all: nothing to separate
    assert corrected(300.0, 290.0, 0.0, 0.0, fallback=Calibration(1.0, 3.0)) == Calibration(1.0, 3.0)
    # a negative rest is noise: no rest, one factor for both
    cal = corrected(100.0, 20.0, 100.0, 50.0, fallback=Calibration(1.0, 0.0))
    assert cal.rest == 0.0 and cal.factor == pytest.approx(120.0 / 150.0)


def test_latency_budget_is_validated():
    with pytest.raises(ConfigError, match="latency-budget"):
        CompileOptions(latency_budget="fast")
    with pytest.raises(ConfigError, match="latency-budget"):
        CompileOptions(latency_budget="-2")
    assert CompileOptions(latency_budget="12ms").latency_budget == "12ms"


def test_cli_latency_budget_reports_predicted_and_measured(rng, synthetic_costs, tmp_path):
    from click.testing import CliRunner

    from q4c.cli import main

    model_path, data = tmp_path / "m.onnx", tmp_path / "x.npz"
    onnx_model = _two_layer_model(rng)
    import onnx

    onnx.save(onnx_model, model_path)
    np.savez(data, x=rng.standard_normal((32, 128), dtype=np.float32))
    result = CliRunner().invoke(main, ["compile", str(model_path), "-o", str(tmp_path / "o.onnx"), "--calib", str(data),
                                       "--latency-budget", "0.6", "--ratio", "0.3", "--workers", "1", "--no-verify"])
    assert result.exit_code == 0, result.output
    line = next(x for x in result.stdout.splitlines() if x.startswith("latency budget 0.6"))
    # synthetic costs: 20 us + 2 x 30 us (INT8 dynamic) = 80 of 220 us predicted and "measured"
    assert "met" in line and "predicted 0.36x" in line and "measured 0.36x" in line
    bad = CliRunner().invoke(main, ["compile", str(model_path), "--latency-budget", "soon"])
    assert bad.exit_code == 1 and "Error: --latency-budget" in bad.output
