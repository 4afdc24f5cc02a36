import numpy as np
import onnx
from onnx import TensorProto, helper

import q4c
from q4c.config import CompileOptions
from q4c.passes.assign_precision import AssignPrecisionPass
from q4c.passes.measure_sensitivity import MeasureSensitivityPass
from q4c.pipeline import PassContext
from q4c.testing import heavy_tailed, make_model, run_ort, run_pass, sqnr_db

F = TensorProto.FLOAT


def _two_branch_model(rng):
    """z = 8 * (x @ A) + x @ B + x @ C: A's errors reach the output 8x amplified. Opset 25, as
    compile uses when 2-bit (INT2) is a candidate."""
    return make_model(
        [helper.make_node("MatMul", ["x", "A"], ["a"]), helper.make_node("MatMul", ["x", "B"], ["b"]),
         helper.make_node("MatMul", ["x", "C"], ["c"]), helper.make_node("Mul", ["a", "eight"], ["a8"]),
         helper.make_node("Add", ["a8", "b"], ["ab"]), helper.make_node("Add", ["ab", "c"], ["z"])],
        [helper.make_tensor_value_info("x", F, ["n", 128])], [helper.make_tensor_value_info("z", F, ["n", 64])],
        {"A": heavy_tailed(rng, (128, 64)), "B": heavy_tailed(rng, (128, 64)), "C": heavy_tailed(rng, (128, 64)),
         "eight": np.float32(8.0)},
        opset=25,
    )


def _plan(model, samples, **options):
    ctx = PassContext(options=CompileOptions(**options), samples=samples, opset=25)
    m, _ = run_pass(MeasureSensitivityPass(), model, ctx=ctx)
    _, result = run_pass(AssignPrecisionPass(), m, ctx=ctx)
    return ctx, result


def test_more_sensitive_tensor_gets_more_bits_within_the_budget(rng):
    samples = [{"x": rng.standard_normal((16, 128)).astype(np.float32)}]
    ctx, result = _plan(_two_branch_model(rng), samples, avg_bits=4.0)
    bits = {n: tp.bits for n, tp in ctx.plan.tensors.items()}
    assert bits["A"] > bits["B"]
    assert result.stats["used_bytes"] <= result.stats["budget_bytes"]


def test_every_measure_respects_every_budget(rng):
    samples = [{"x": rng.standard_normal((8, 128)).astype(np.float32)}]
    for measure in ("kl", "hessian", "mse"):
        for avg in (2.5, 3.0, 4.0, 6.0):
            ctx, result = _plan(_two_branch_model(rng), samples, avg_bits=avg, sensitivity=measure)
            assert result.stats["used_bytes"] <= result.stats["budget_bytes"], (measure, avg)
            assert ctx.plan.defaults["sensitivity"] == measure


def test_mixed_plan_beats_uniform_int4_at_equal_bytes_on_held_out_inputs(rng, tmp_path):
    model = _two_branch_model(rng)
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    calib = tmp_path / "calib.npz"
    np.savez(calib, x=rng.standard_normal((16, 128)).astype(np.float32))
    uniform = q4c.compile_file(path, tmp_path / "u.onnx", CompileOptions(bits=4), data=calib)
    mixed = q4c.compile_file(path, tmp_path / "m4.onnx", CompileOptions(avg_bits=4.0), data=calib)
    assert mixed["output"]["bytes"] <= uniform["output"]["bytes"] * 1.01  # same budget (+ graph bytes)
    held_out = {"x": rng.standard_normal((64, 128)).astype(np.float32)}
    ref = run_ort(model, held_out)["z"]
    u = run_ort(onnx.load(tmp_path / "u.onnx"), held_out, optimized=True)["z"]
    m = run_ort(onnx.load(tmp_path / "m4.onnx"), held_out, optimized=True)["z"]
    assert sqnr_db(ref, m) > sqnr_db(ref, u)


def test_report_carries_scores_budget_and_a_measured_pareto_curve(rng, tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save(_two_branch_model(rng), path)
    report = q4c.compile_file(path, tmp_path / "o.onnx", CompileOptions(avg_bits=3.5, sensitivity="kl"))
    assert report["sensitivity"]["measure"] == "kl" and report["sensitivity"]["forward_runs"] > 0
    assert {t["name"] for t in report["tensors"]} == {"A", "B", "C"}
    # widths x rounding schemes; no gptq: it needs at least as many calibration input rows as
    # columns, and the one synthetic sample has 16 rows for 128 columns
    keys = {"2", "3", "4", "8", "2:absmax", "3:absmax", "4:absmax", "8:absmax"}
    keys |= {f"{b}:{s}" for b in (2, 3, 4) for s in ("mulaw", "kmeans", "nf4")}  # codebooks: 1-4 bit indices
    assert all(set(t["sensitivity"]["kl"]) == keys for t in report["tensors"])
    points = report["pareto"]
    assert [p["avg_bits"] for p in points] == sorted(p["avg_bits"] for p in points)
    predicted = [p["predicted"] for p in points]
    assert predicted == sorted(predicted, reverse=True)  # more bytes never predict more damage
    assert all(p["measured"] >= 0 for p in points)
    assert points[0]["measured"] > points[-1]["measured"]  # and measurably so end to end


def test_a_plan_that_measures_worse_than_uniform_int4_is_replaced_by_it(rng):
    # Mislead the knapsack: claim the 8x-amplified tensor A is harmless at 2 bits and B, C need
    # 8 bits. The guard measures both whole plans on the calibration data and keeps uniform 4-bit.
    model = _two_branch_model(rng)
    ctx = PassContext(options=CompileOptions(avg_bits=4.0), samples=[{"x": rng.standard_normal((16, 128)).astype(np.float32)}],
                      opset=25)
    m, _ = run_pass(MeasureSensitivityPass(), model, ctx=ctx)
    for name, scores in ctx.sensitivity.scores.items():
        for key in scores:
            bits = int(key.split(":")[0])
            scores[key] = (0.0 if bits == 2 else 1.0) if name == "A" else (0.0 if bits == 8 else 1.0)
    _, result = run_pass(AssignPrecisionPass(), m, ctx=ctx)
    assert result.stats["kept_uniform_4bit"] == 1
    assert {n: tp.bits for n, tp in ctx.plan.tensors.items()} == {"A": 4, "B": 4, "C": 4}
    assert any("kept uniform 4-bit" in w for w in ctx.warnings)


def test_tied_embedding_and_projection_get_one_precision_and_count_once(rng, tmp_path):
    table = heavy_tailed(rng, (512, 64))
    model = make_model([helper.make_node("Gather", ["E", "tok"], ["h"]), helper.make_node("MatMul", ["h", "W"], ["g"]),
                        helper.make_node("MatMul", ["g", "E_t"], ["y"])],
                       [helper.make_tensor_value_info("tok", TensorProto.INT64, [1, 12])],
                       [helper.make_tensor_value_info("y", F, [1, 12, 512])],
                       {"E": table, "W": heavy_tailed(rng, (64, 64)), "E_t": np.ascontiguousarray(table.T)}, opset=25)
    path = tmp_path / "lm.onnx"
    onnx.save(model, path)
    report = q4c.compile_file(path, tmp_path / "o.onnx", CompileOptions(kernels="low-bit"))
    plan = report["plan"]
    assert plan["defaults"]["tied"] == [["E", "E_t"]]
    precision = ("bits", "granularity", "scheme")  # (their forms differ: GatherBlockQuantized, MatMulNBits)
    assert [plan["tensors"]["E"][k] for k in precision] == [plan["tensors"]["E_t"][k] for k in precision]
    assert plan["defaults"]["used_bytes"] <= plan["defaults"]["budget_bytes"]
    out = onnx.load(tmp_path / "o.onnx")
    packed = [t for t in out.graph.initializer if t.data_type == TensorProto.UINT8 and t.dims[0] == 512]
    assert len(packed) == 1  # one table serves the Gather and the projection


def _tied_lm(rng):
    table = heavy_tailed(rng, (512, 64))
    return make_model([helper.make_node("Gather", ["E", "tok"], ["h"]), helper.make_node("MatMul", ["h", "W"], ["g"]),
                       helper.make_node("MatMul", ["g", "E_t"], ["y"])],
                      [helper.make_tensor_value_info("tok", TensorProto.INT64, [1, 12])],
                      [helper.make_tensor_value_info("y", F, [1, 12, 512])],
                      {"E": table, "W": heavy_tailed(rng, (64, 64)), "E_t": np.ascontiguousarray(table.T)}, opset=25)


def test_guard_counts_a_tied_tables_codes_once(rng):
    # Uniform 4-bit fits the 4-bit budget only with the tied table's codes counted once. Mislead
    # the knapsack (the table harmless at 2 bits, W needing 8): the guard must still compare
    # against uniform 4-bit, measure it better, and keep it.
    samples = [{"tok": rng.integers(0, 512, (1, 12))} for _ in range(4)]
    ctx = PassContext(options=CompileOptions(avg_bits=4.0), samples=samples, opset=25)
    m, _ = run_pass(MeasureSensitivityPass(), _tied_lm(rng), ctx=ctx)
    for name, scores in ctx.sensitivity.scores.items():
        for key in scores:
            bits = int(key.split(":")[0])
            scores[key] = (0.0 if bits == 2 else 1.0) if name in ("E", "E_t") else (0.0 if bits == 8 else 1.0)
    _, result = run_pass(AssignPrecisionPass(), m, ctx=ctx)
    assert {n: tp.bits for n, tp in ctx.plan.tensors.items()} == {"E": 4, "E_t": 4, "W": 4}
    assert result.stats["kept_uniform_4bit"] == 1
    assert any("kept uniform 4-bit" in w for w in ctx.warnings)


def test_plan_never_predicts_worse_than_uniform_int4_when_that_fits(rng):
    # mse scores are additive and exact here: whatever the DP's cost rounding, the chosen plan's
    # predicted damage is at most uniform 4-bit's (which fits the default budget exactly).
    ctx, _ = _plan(_tied_lm(rng), [], sensitivity="mse")
    uniform = sum(ctx.sensitivity.scores[n]["4"] for n in ("E", "E_t", "W"))
    assert ctx.plan.defaults["predicted_damage"] <= uniform + 1e-9
    assert ctx.plan.defaults["used_bytes"] <= ctx.plan.defaults["budget_bytes"]
