"""The planner's int8-at-load options: which candidates may take the form, at what bytes and cost."""

from __future__ import annotations

from q4c.latency.costs import CostTable
from q4c.latency.forms import Form, LayerKind, LayerShape, lut_gemm_reason, timed_bits
from q4c.latency.layers import Layer
from q4c.latency.planner import layer_picks
from q4c.quant.candidates import Candidate

SHAPE = LayerShape(LayerKind.MATMUL, 128, 256, 20)
#: seconds per call by form (any width): FP32 100, MatMulNBits 120 / 150, INT8 dynamic and at load 40
COST = {Form.FP32_AT_LOAD: 100e-6, Form.NBITS_ACC4: 120e-6, Form.NBITS_ACC0: 150e-6, Form.INT8_DYNAMIC: 40e-6,
        Form.INT8_AT_LOAD: 40e-6}


def _table() -> CostTable:
    table = CostTable()
    for form, seconds in COST.items():
        for bits in (1, 2, 3, 4, 8, 32):
            table.seconds[(SHAPE, form, timed_bits(form, bits))] = seconds
    return table


def _picks(cands: list[Candidate]) -> dict[tuple[str, Form | None], tuple[int, float]]:
    layer = Layer("mm", ("W",), SHAPE)
    picks = layer_picks(layer, {"W": cands}, {"W": {c.key: 0.1 for c in cands}}, _table(), {"W": (128, 256)})
    return {(p.keys[0], p.form): (p.option.nbytes, p.option.latency) for p in picks}


def test_low_bit_and_codebook_candidates_take_int8_at_load_at_their_own_bytes():
    uniform = Candidate(4, "block:64", "symmetric", 4, 17408)
    codebook = Candidate(3, "table:8", "kmeans", 3, 12400)
    picks = _picks([uniform, codebook])
    # the file keeps the candidate's codes: bytes as planned, time INT8's
    assert picks[("4", Form.INT8_AT_LOAD)] == (17408, 40e-6)
    assert picks[("3:kmeans", Form.INT8_AT_LOAD)] == (12400, 40e-6)
    # kernels that read scale x integer codes cannot take codebook indices; folding at load can
    assert ("3:kmeans", Form.NBITS_ACC4) not in picks and ("3:kmeans", Form.FP32_AT_LOAD) in picks
    assert ("4", Form.INT8_DYNAMIC) not in picks  # int8-dynamic takes 8-bit codes only


def test_eight_bit_codes_take_int8_dynamic_not_a_second_rounding():
    picks = _picks([Candidate(8, "block:64", "symmetric", 8, 34816)])
    assert ("8", Form.INT8_DYNAMIC) in picks
    assert ("8", Form.INT8_AT_LOAD) not in picks
    assert picks[("8", Form.INT8_DYNAMIC)][0] == 128 * 256 + 4 * 256  # int8 codes + a float32 scale per column


def test_lut_gemm_applicability_follows_onnx_runtime():
    assert lut_gemm_reason(128, 256, 2, 32) is None
    assert "N a multiple of 128" in lut_gemm_reason(128, 501, 2, 32)
    assert "2-bit only" in lut_gemm_reason(128, 256, 4, 32)
    assert "multiple of 32" in lut_gemm_reason(96 + 16, 256, 2, 32)


def test_cost_report_says_which_menu_forms_are_not_planned_and_why():
    report = CostTable().report()["forms_not_planned"]
    assert set(report) == {"matmulnbits-2bit-lut", "int8-static"}
    assert "N % 128" in report["matmulnbits-2bit-lut"] and "DynamicQuantizeMatMul" in report["int8-static"]


def test_unmet_budget_keeps_assigned_bits_unless_a_replan_is_clearly_faster(monkeypatch):
    from q4c.latency.planner import LatencyPlan
    from q4c.passes import choose_forms

    def solver(own_s: float, replan_s: float):
        plans = {True: LatencyPlan(predicted_s=own_s, fp32_s=1.0, met=False),
                 False: LatencyPlan(predicted_s=replan_s, fp32_s=1.0, met=False)}
        monkeypatch.setattr(choose_forms, "plan_latency", lambda *a, fastest=False, **k: plans[fastest])
        return choose_forms._Solver([], [], {}, {}, {}, CostTable(), {}, {})(None)

    kept = solver(0.93, 0.87)  # ~7 % faster re-plan: not worth its damage
    assert kept.kept_bits and kept.predicted_s == 0.93
    taken = solver(1.00, 0.73)  # codebook bits folded to FP32 vs scannable bits: taken
    assert not taken.kept_bits and taken.predicted_s == 0.73
