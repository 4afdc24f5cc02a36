"""The codebook form quantize-weights emits: packed indices -> Gather into a float16 table -> the
weight, from initializers only; exact in both runtimes, folded by ONNX Runtime at load, never
folded back by q4c, chosen by budgeted plans where it measures better."""

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper
from q4c.passes.assign_precision import AssignPrecisionPass
from q4c.passes.fold_constants import FoldConstantsPass
from q4c.passes.quantize_weights import QuantizeWeightsPass

import q4c
from q4c.cli import main
from q4c.config import CompileOptions, Target
from q4c.metrics import kl_divergence
from q4c.pipeline import PassContext
from q4c.testing import (
    heavy_tailed,
    make_model,
    op_histogram,
    run_interp,
    run_ort,
    run_pass,
)

F = TensorProto.FLOAT


def _matmul(w: np.ndarray, m: int = 3) -> onnx.ModelProto:
    k, n = w.shape
    return make_model([helper.make_node("MatMul", ["x", "W"], ["y"])],
                      [helper.make_tensor_value_info("x", F, [m, k])],
                      [helper.make_tensor_value_info("y", F, [m, n])], {"W": w})


def _lstm(rng: np.random.Generator) -> onnx.ModelProto:
    w = heavy_tailed(rng, (2, 4 * 24, 16))
    r = heavy_tailed(rng, (2, 4 * 24, 24))
    return make_model([helper.make_node("LSTM", ["x", "W", "R"], ["y"], hidden_size=24, direction="bidirectional")],
                      [helper.make_tensor_value_info("x", F, [5, 1, 16])],
                      [helper.make_tensor_value_info("y", F, [5, 2, 1, 24])], {"W": w, "R": r})


def _quantize(model, bits, scheme, granularity="block"):
    from q4c.config import Granularity

    options = CompileOptions(bits=bits, scheme=scheme, target=Target.ONNX, min_elements=0,
                             granularity=Granularity.parse(granularity))
    ctx = PassContext(options=options)
    planned, _ = run_pass(AssignPrecisionPass(), model, ctx=ctx)
    out, result = run_pass(QuantizeWeightsPass(), planned, ctx=ctx)
    return out, result, ctx


def _with_output(model: onnx.ModelProto, name: str) -> onnx.ModelProto:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    copy.graph.output.append(helper.make_empty_tensor_value_info(name))
    return copy


def _init(model, name):
    return numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == name))


def _decode_by_hand(model, weight_shape, bits, per_table):
    """Independent decoding of a [K, N] MatMul weight: numpy's unpackbits on the packed indices
    (lowest bit first), the float16 table per group of `per_table` output channels, transposed
    back from the stored [N, K] order."""
    k, n = weight_shape
    packed = next(t for t in model.graph.initializer if t.data_type == TensorProto.UINT8)
    table = next(t for t in model.graph.initializer if t.data_type == TensorProto.FLOAT16)
    bits_lsb = np.unpackbits(numpy_helper.to_array(packed), bitorder="little")[: n * k * bits].reshape(-1, bits)
    codes = (bits_lsb @ (1 << np.arange(bits))).reshape(n, k)
    tables = numpy_helper.to_array(table).reshape(n // per_table, 2**bits).astype(np.float32)
    return tables[np.arange(n)[:, None] // per_table, codes].T


@pytest.mark.parametrize(("scheme", "bits", "granularity", "per_table"),
                         [("mulaw", 1, "channel", 1), ("mulaw", 2, "tensor", 24), ("kmeans", 3, "channel", 1),
                          ("kmeans", 4, "tensor", 24)])
def test_gather_form_equals_the_hand_decoded_weight_in_ort_and_interpreter(rng, scheme, bits, granularity, per_table):
    w = heavy_tailed(rng, (40, 24))  # K = 40, N = 24: 960 indices
    out, result, ctx = _quantize(_matmul(w), bits, scheme, granularity)
    assert result.stats == {"quantized": 1}
    assert set(op_histogram(out)) >= {"Gather", "MatMul"} and "DequantizeLinear" not in op_histogram(out)
    q4c.graph.check(out)
    decoded = next(n.input[1] for n in out.graph.node if n.op_type == "MatMul")
    probe = _with_output(out, decoded)
    feeds = {"x": rng.standard_normal((3, 40), dtype=np.float32)}
    want = _decode_by_hand(out, w.shape, bits, per_table)
    np.testing.assert_array_equal(run_ort(probe, feeds)[decoded], want)
    np.testing.assert_array_equal(run_interp(probe, feeds)[decoded], want)
    entry = ctx.quantized[0]
    assert entry["scheme"] == scheme and entry["stored_bits"] == bits
    assert entry["codebook"]["index_bytes"] == -(-960 // 8) * bits  # packed at the index width
    assert entry["codebook"]["table_bytes"] == 2 * 2**bits * (24 // per_table)


def test_nf4_form_equals_levels_times_block_scales(rng):
    w = heavy_tailed(rng, (100, 8))  # K = 100: blocks of 64 along K, the second one padded
    out, _, _ = _quantize(_matmul(w), 4, "nf4")
    decoded = next(n.input[1] for n in out.graph.node if n.op_type == "MatMul")
    probe = _with_output(out, decoded)
    feeds = {"x": np.zeros((3, 100), np.float32)}
    packed = next(t for t in out.graph.initializer if t.data_type == TensorProto.UINT8)
    codes = np.unpackbits(numpy_helper.to_array(packed), bitorder="little").reshape(-1, 4) @ (1 << np.arange(4))
    codes = codes[: 8 * 128].reshape(8, 2, 64)  # [N, blocks, 64], K padded to 128
    levels = next(numpy_helper.to_array(t) for t in out.graph.initializer if t.data_type == TensorProto.FLOAT16
                  and t.dims == [16])
    scales = next(numpy_helper.to_array(t) for t in out.graph.initializer if t.data_type == TensorProto.FLOAT16
                  and list(t.dims) == [8, 1, 2, 1])
    want = (levels.astype(np.float32)[codes] * scales[:, 0].astype(np.float32)).reshape(8, 128)[:, :100].T
    np.testing.assert_array_equal(run_ort(probe, feeds)[decoded], want)
    np.testing.assert_array_equal(run_interp(probe, feeds)[decoded], want)
    assert np.max(np.abs(want)) == pytest.approx(np.max(np.abs(w)), rel=1e-3)  # absmax kept (float16 scale)


@pytest.mark.parametrize(("scheme", "bits"), [("mulaw", 2), ("nf4", 3)])
def test_lstm_weights_decode_in_both_runtimes_and_ort_folds_them_at_load(rng, tmp_path, scheme, bits):
    model = _lstm(rng)
    out, result, _ = _quantize(model, bits, scheme)
    assert result.stats == {"quantized": 2}
    q4c.graph.check(out)
    feeds = {"x": rng.standard_normal((5, 1, 16), dtype=np.float32)}
    np.testing.assert_allclose(run_interp(out, feeds)["y"], run_ort(out, feeds)["y"], rtol=1e-5, atol=1e-5)
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "opt.onnx")
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    ort.InferenceSession(out.SerializeToString(), options, providers=["CPUExecutionProvider"])
    assert op_histogram(onnx.load(tmp_path / "opt.onnx")) == {"LSTM": 1}  # the decoders folded to weights


def test_fold_constants_leaves_the_decoder_alone(rng):
    out, _, _ = _quantize(_matmul(heavy_tailed(rng, (40, 24))), 2, "kmeans")
    folded, result = run_pass(FoldConstantsPass(), out)
    assert not result.modified
    assert op_histogram(folded) == op_histogram(out)


def test_second_run_is_a_no_op(rng):
    out, _, _ = _quantize(_matmul(heavy_tailed(rng, (40, 24))), 2, "mulaw")
    ctx = PassContext(options=CompileOptions(bits=2, scheme="mulaw", target=Target.ONNX, min_elements=0))
    run_pass(AssignPrecisionPass(), out, ctx=ctx)
    assert not run_pass(QuantizeWeightsPass(), out, ctx=ctx)[1].modified


def _classifier(rng, w):
    k, n = w.shape
    return make_model([helper.make_node("MatMul", ["x", "W"], ["z"]), helper.make_node("LogSoftmax", ["z"], ["y"])],
                      [helper.make_tensor_value_info("x", F, [8, k])],
                      [helper.make_tensor_value_info("y", F, [8, n])], {"W": w})


def test_cli_compile_two_bit_mulaw_verifies_and_inspect_reports_codebook_bytes(rng, tmp_path):
    src, out = tmp_path / "m.onnx", tmp_path / "m.q.onnx"
    onnx.save(_classifier(rng, heavy_tailed(rng, (128, 64), scale=1.0)), src)
    result = CliRunner().invoke(main, ["compile", str(src), "-o", str(out), "--bits", "2", "--scheme", "mulaw",
                                       "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["verification"]["checker"] and report["verification"]["ort_loads"]
    assert report["verification"]["interp_vs_ort_max_abs"] < 1e-4
    [entry] = report["tensors"]
    assert (entry["bits"], entry["scheme"]) == (2, "mulaw")
    inspected = json.loads(CliRunner().invoke(main, ["inspect", str(out), "--json"]).stdout)
    books = inspected["codebooks"]
    assert books["tensors"] == 1
    assert books["index_bytes"] == 128 * 64 * 2 // 8 == entry["codebook"]["index_bytes"]
    assert books["table_bytes"] == entry["codebook"]["table_bytes"]


def test_budgeted_plan_picks_a_codebook_on_spike_and_slab_weights_where_it_measures_better(rng, tmp_path):
    # Heavy tails: most weights Laplace-small, a tenth +-1. Uniform 2-bit levels must reach the
    # large ones and round the small ones to zero; a 2-bit codebook keeps two centroids for them.
    # (Large enough that the decoder's ~1.2 KB of nodes is small beside the 0.5 bit/weight of scales.)
    k, n = 512, 128
    w = (0.05 * rng.laplace(size=(k, n)) + (rng.random((k, n)) < 0.1) * rng.choice([-1.0, 1.0], (k, n)))
    src = tmp_path / "m.onnx"
    onnx.save(_classifier(rng, w.astype(np.float32)), src)
    calib = tmp_path / "calib"
    calib.mkdir()
    for i in range(8):
        np.savez(calib / f"{i}.npz", x=rng.standard_normal((8, k), dtype=np.float32))
    outs, budgets = {}, {}
    for label, schemes in (("with", ()), ("without", ("symmetric", "symmetric-absmax", "gptq"))):
        outs[label] = tmp_path / f"{label}.onnx"
        report = q4c.compile_file(src, outs[label], CompileOptions(avg_bits=2.0, candidates=(2,), schemes=schemes,
                                                                   kernels="fp32-at-load"),
                                  data=calib, verify=False)
        plan = report["plan"]
        budgets[label] = plan["defaults"]["budget_bytes"]
        assert plan["defaults"]["used_bytes"] <= budgets[label]  # equal bytes: the same budget, met by both
        if label == "with":
            assert plan["tensors"]["W"]["scheme"] in ("mulaw", "kmeans", "nf4")
    assert budgets["with"] == budgets["without"]
    held_out = [rng.standard_normal((8, k), dtype=np.float32) for _ in range(4)]
    ref = [run_ort(onnx.load(src), {"x": x})["y"] for x in held_out]
    kl = {label: np.mean([kl_divergence(r, run_ort(onnx.load(p), {"x": x})["y"]) for r, x in zip(ref, held_out)])
          for label, p in outs.items()}
    assert kl["with"] < kl["without"]


def test_a_saved_codebook_plan_replays_to_the_same_bytes(rng, tmp_path):
    src = tmp_path / "m.onnx"
    onnx.save(_classifier(rng, heavy_tailed(rng, (128, 64), scale=1.0)), src)
    plan = tmp_path / "plan.json"
    first = q4c.compile_file(src, tmp_path / "a.onnx", CompileOptions(bits=3, scheme="kmeans", granularity=
                             q4c.config.Granularity("channel")), save_plan=plan, verify=False)
    assert json.loads(plan.read_text())["tensors"]["W"] == {"bits": 3, "granularity": "channel", "scheme": "kmeans",
                                                            "form": "dequantize-linear", "chosen_for": "required"}
    q4c.compile_file(src, tmp_path / "b.onnx", CompileOptions(plan_path=plan), verify=False)
    assert (tmp_path / "a.onnx").read_bytes() == (tmp_path / "b.onnx").read_bytes()
    assert first["tensors"][0]["codebook"]["tables"] == 64


def test_candidates_one_gives_binary_codebooks(rng, tmp_path):
    src = tmp_path / "m.onnx"
    onnx.save(_classifier(rng, heavy_tailed(rng, (512, 128), scale=1.0)), src)
    report = q4c.compile_file(src, tmp_path / "o.onnx", CompileOptions(avg_bits=1.5, candidates=(1,)))
    entry = report["plan"]["tensors"]["W"]
    assert entry["bits"] == 1 and entry["scheme"] in ("mulaw", "kmeans")  # nf4 needs 2 bits, uniform ones 2
    assert report["verification"]["interp_vs_ort_max_abs"] < 1e-4
    assert set(report["tensors"][0]["sensitivity"]["kl"]) == {"1:mulaw", "1:kmeans"}  # float scores only in context


@pytest.mark.parametrize(("args", "message"), [
    (["--bits", "8", "--scheme", "mulaw"], "stores 1-4 bit indices"),
    (["--bits", "1"], "1-4 with a codebook --scheme"),
    (["--candidates", "1", "--schemes", "gptq"], "1 when --schemes allows a codebook"),
])
def test_cli_refuses_widths_a_scheme_cannot_store(rng, tmp_path, args, message):
    src = tmp_path / "m.onnx"
    onnx.save(_classifier(rng, heavy_tailed(rng, (64, 32))), src)
    result = CliRunner().invoke(main, ["compile", str(src), "-o", str(tmp_path / "o.onnx"), *args])
    assert result.exit_code == 1 and message in result.output and "Traceback" not in result.output
    assert not (tmp_path / "o.onnx").exists()


def _if_branches_sharing(w: np.ndarray) -> onnx.ModelProto:
    """y = (x @ W) * s in both branches of an If (s differs): real exports that switch on the
    sample rate hold their LSTM weights this way."""
    def branch(name: str, scale: float) -> onnx.GraphProto:
        return helper.make_graph(
            [helper.make_node("MatMul", ["x", "W"], [f"{name}_mm"]),
             helper.make_node("Mul", [f"{name}_mm", f"{name}_s"], [f"{name}_y"])],
            name, [], [helper.make_tensor_value_info(f"{name}_y", F, [2, w.shape[1]])],
            [numpy_helper.from_array(w, "W"), numpy_helper.from_array(np.float32(scale), f"{name}_s")])
    node = helper.make_node("If", ["c"], ["y"], then_branch=branch("then", 1.0), else_branch=branch("else", 2.0))
    return make_model([node], [helper.make_tensor_value_info("x", F, [2, w.shape[0]]),
                               helper.make_tensor_value_info("c", TensorProto.BOOL, [])],
                      [helper.make_tensor_value_info("y", F, [2, w.shape[1]])])


@pytest.mark.parametrize("scheme", ["mulaw", "nf4"])
def test_a_weight_read_by_both_if_branches_stores_its_codebook_once(rng, tmp_path, scheme):
    # Each branch decodes with its own nodes, but the indices, table and scales are one set of
    # initializers: the file holds the weight's codebook bytes once, not once per branch.
    w = heavy_tailed(rng, (128, 64), scale=1.0)
    src, out = tmp_path / "m.onnx", tmp_path / "m.q.onnx"
    onnx.save(_if_branches_sharing(w), src)
    result = CliRunner().invoke(main, ["compile", str(src), "-o", str(out), "--bits", "2", "--scheme", scheme, "--json"])
    assert result.exit_code == 0, result.output
    [entry] = json.loads(result.stdout)["tensors"]
    model = onnx.load(out)
    stored = [t for sub in q4c.graph.iter_graph_protos(model.graph) for t in sub.initializer]
    indices = [t for t in stored if t.raw_data and len(t.raw_data) == entry["codebook"]["index_bytes"]]
    assert len(indices) == 1
    onnx.checker.check_model(model, full_check=True)
    x = rng.standard_normal((2, 128)).astype(np.float32)
    for c, scale in ((True, 1.0), (False, 2.0)):
        feeds = {"x": x, "c": np.array(c)}
        got = run_ort(model, feeds)["y"]
        np.testing.assert_allclose(got, run_interp(model, feeds)["y"], rtol=1e-5, atol=1e-5)
        # the decoded weight is within 2-bit error of W, scaled per branch
        assert np.abs(got - scale * (x @ w)).mean() < 0.6 * np.abs(scale * (x @ w)).mean()
