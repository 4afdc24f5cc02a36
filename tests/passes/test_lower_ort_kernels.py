import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from q4c.config import CompileOptions, Granularity
from q4c.passes.assign_precision import AssignPrecisionPass
from q4c.passes.lower_ort_kernels import LowerOrtKernelsPass
from q4c.passes.choose_kernels import ChooseKernelsPass
from q4c.passes.quantize_weights import QuantizeWeightsPass
from q4c.pipeline import PassContext
from q4c.quant.plan import Form, FormBasis
from q4c.testing import heavy_tailed, make_model, matmul_model, op_histogram, run_interp, run_ort, run_pass


def _lower(model, options):
    ctx = PassContext(options=options)
    m, _ = run_pass(AssignPrecisionPass(), model, ctx=ctx)
    m, _ = run_pass(ChooseKernelsPass(), m, ctx=ctx)  # the plan's forms
    dq, _ = run_pass(QuantizeWeightsPass(), m, ctx=ctx)
    lowered, result = run_pass(LowerOrtKernelsPass(), dq, ctx=ctx)
    return dq, lowered, result, ctx


def _at_float_accuracy(model):
    for node in model.graph.node:
        for attr in node.attribute:
            if attr.name == "accuracy_level":
                attr.i = 0
    return model


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("granularity", ["block:32", "block:128", "channel"])
def test_dq_matmul_becomes_matmulnbits_with_identical_numerics(rng, bits, granularity):
    model = matmul_model(rng, m=5, k=128, n=48)
    dq, lowered, result, ctx = _lower(model, CompileOptions(bits=bits, granularity=Granularity.parse(granularity)))
    assert result.stats == {"matmulnbits": 1}
    assert op_histogram(lowered) == {"com.microsoft::MatMulNBits": 1}
    node = lowered.graph.node[0]
    attrs = {a.name: a.i for a in node.attribute}
    assert attrs["bits"] == bits and attrs["accuracy_level"] == 4 and attrs["K"] == 128 and attrs["N"] == 48
    feeds = {"x": rng.standard_normal((5, 128), dtype=np.float32)}
    want = run_ort(dq, feeds)["y"]  # the DQ -> MatMul form is the specification
    exact = _at_float_accuracy(lowered)
    np.testing.assert_allclose(run_ort(exact, feeds)["y"], want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(run_interp(exact, feeds)["y"], want, rtol=1e-5, atol=1e-5)
    assert not run_pass(LowerOrtKernelsPass(), lowered, ctx=ctx)[1].modified


def test_embedding_gather_becomes_gather_block_quantized(rng):
    model = make_model([helper.make_node("Gather", ["E", "tok"], ["y"])],
                       [helper.make_tensor_value_info("tok", TensorProto.INT64, [2, 5])],
                       [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 5, 64])],
                       {"E": heavy_tailed(rng, (300, 64))})
    dq, lowered, result, _ = _lower(model, CompileOptions(kernels="low-bit"))
    assert result.stats == {"gather_block_quantized": 1}
    # a table of its own: the 2-D layout, whose rows come out as Gather's (no Shape/Concat/Reshape per call)
    assert op_histogram(lowered) == {"com.microsoft::GatherBlockQuantized": 1}
    packed = [t for t in lowered.graph.initializer if t.data_type == TensorProto.UINT8]
    assert len(packed) == 1 and list(packed[0].dims) == [300, 32]  # 64 nibbles a row
    feeds = {"tok": rng.integers(0, 300, (2, 5))}
    want = run_ort(dq, feeds)["y"]
    np.testing.assert_array_equal(run_ort(lowered, feeds)["y"], want)
    np.testing.assert_array_equal(run_interp(lowered, feeds)["y"], want)


def test_auto_folds_an_embedding_at_load_when_no_weight_takes_matmulnbits(rng):
    # GatherBlockQuantized is never faster than Gather; alone it only saves memory (--kernels low-bit)
    model = make_model([helper.make_node("Gather", ["E", "tok"], ["y"])],
                       [helper.make_tensor_value_info("tok", TensorProto.INT64, [2, 5])],
                       [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 5, 64])],
                       {"E": heavy_tailed(rng, (300, 64))})
    _, lowered, result, ctx = _lower(model, CompileOptions())
    (tp,) = [tp for tp in ctx.plan.tensors.values() if tp.bits != 32]
    assert (tp.form, tp.chosen_for) == (Form.FP32_AT_LOAD, FormBasis.SPEED_RULE)
    # float16 scales: DequantizeLinear -> Cast -> Gather, all folded at session load
    assert result.stats == {} and op_histogram(lowered) == {"Cast": 1, "DequantizeLinear": 1, "Gather": 1}


def test_block_sizes_without_a_kernel_keep_dequantize(rng):
    # K=40 < block 32*2 with channel granularity works (block 64); K=300 per channel has no kernel block.
    model = matmul_model(rng, m=2, k=300, n=8)
    _, lowered, result, ctx = _lower(model, CompileOptions(granularity=Granularity("channel")))
    # choose-kernels saw that no kernel block fits and planned plain DequantizeLinear
    (tp,) = [tp for tp in ctx.plan.tensors.values() if tp.bits != 32]
    assert (tp.form, tp.chosen_for) == (Form.DEQUANTIZE_LINEAR, FormBasis.REQUIRED)
    assert result.stats == {}
    assert op_histogram(lowered) == {"DequantizeLinear": 1, "MatMul": 1}


def test_tied_embedding_and_output_projection_share_one_packed_table(rng):
    table = heavy_tailed(rng, (300, 64))
    model = make_model([helper.make_node("Gather", ["E", "tok"], ["h"]), helper.make_node("MatMul", ["h", "E_t"], ["y"])],
                       [helper.make_tensor_value_info("tok", TensorProto.INT64, [2, 5])],
                       [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 5, 300])],
                       {"E": table, "E_t": np.ascontiguousarray(table.T)})
    dq, lowered, result, _ = _lower(model, CompileOptions())
    assert result.stats == {"gather_block_quantized": 1, "matmulnbits": 1}
    packed = [t for t in lowered.graph.initializer if t.data_type == TensorProto.UINT8]
    assert len(packed) == 1 and list(packed[0].dims) == [300, 1, 32]  # one table: 300 rows, one block of 64 nibbles
    # the shared table keeps MatMulNBits' 3-D layout: the gathered blocks are reshaped to rows
    assert op_histogram(lowered) == {"com.microsoft::GatherBlockQuantized": 1, "com.microsoft::MatMulNBits": 1,
                                     "Concat": 1, "Reshape": 1, "Shape": 1}
    feeds = {"tok": rng.integers(0, 300, (2, 5))}
    np.testing.assert_allclose(run_ort(_at_float_accuracy(lowered), feeds)["y"], run_ort(dq, feeds)["y"], rtol=1e-5, atol=1e-5)


def test_tied_tables_share_codes_in_dequantize_form_too(rng):
    from q4c.quant.tying import share_transposed_tables

    table = heavy_tailed(rng, (300, 64))
    model = make_model([helper.make_node("Gather", ["E", "tok"], ["h"]), helper.make_node("MatMul", ["h", "E_t"], ["y"])],
                       [helper.make_tensor_value_info("tok", TensorProto.INT64, [2, 5])],
                       [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 5, 300])],
                       {"E": table, "E_t": np.ascontiguousarray(table.T)})
    ctx = PassContext(options=CompileOptions(bits=4))
    m, _ = run_pass(AssignPrecisionPass(), model, ctx=ctx)
    m, _ = run_pass(ChooseKernelsPass(), m, ctx=ctx)  # the plan's forms
    dq, _ = run_pass(QuantizeWeightsPass(), m, ctx=ctx)
    shared = onnx.ModelProto()
    shared.CopyFrom(dq)
    assert share_transposed_tables(shared) == 1
    assert shared.ByteSize() < dq.ByteSize() - 300 * 64 // 2 + 100  # one table of int4 codes fewer
    onnx.checker.check_model(shared, full_check=True)
    feeds = {"tok": rng.integers(0, 300, (2, 5))}
    np.testing.assert_array_equal(run_ort(shared, feeds)["y"], run_ort(dq, feeds)["y"])
    np.testing.assert_array_equal(run_interp(shared, feeds)["y"], run_interp(dq, feeds)["y"])
