"""The Conv block-axis rule: blocks along I when long enough, else along the longest kernel axis,
else one scale per output channel; never a block of 1."""

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper
from q4c.passes.assign_precision import AssignPrecisionPass
from q4c.passes.quantize_weights import QuantizeWeightsPass

from q4c.config import CompileOptions, Target
from q4c.pipeline import PassContext
from q4c.quant.weights import conv_block_layout
from q4c.testing import heavy_tailed, make_model, run_interp, run_ort, run_pass, sqnr_db

OPTIONS = CompileOptions(target=Target.ONNX, bits=4, min_elements=0)


@pytest.mark.parametrize(("shape", "want"), [
    ((258, 1, 256), ("block", 2, 32)),  # Silero's STFT basis: the kernel axis, not I = 1
    ((128, 129, 3), ("block", 1, 32)),  # ordinary Conv1d: I
    ((64, 1, 5), ("channel", 0, 0)),  # depthwise-like: per channel, same grouping as a block of 5
    ((64, 16, 3), ("channel", 0, 0)),  # I and K both short: per channel (48 weights a scale), not block:16
    ((8, 4, 3, 40), ("block", 3, 32)),  # Conv2d: the longest kernel axis
    ((8, 2, 33, 33), ("block", 2, 32)),  # a tie goes to the first kernel axis
])
def test_conv_block_layout_picks_axis(shape, want):
    assert conv_block_layout(shape, 32) == want


def _conv_model(weight, length=300):
    c_in = weight.shape[1]
    return make_model([helper.make_node("Conv", ["x", "W"], ["y"])],
                      [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, c_in, length])],
                      [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], {"W": weight})


def _quantize(model):
    ctx = PassContext(options=OPTIONS)
    planned, _ = run_pass(AssignPrecisionPass(), model, ctx=ctx)
    packed, result = run_pass(QuantizeWeightsPass(), planned, ctx=ctx)
    return packed, result, ctx.quantized


def _dq(model):
    node = next(n for n in model.graph.node if n.op_type == "DequantizeLinear")
    scale = next(t for t in model.graph.initializer if t.name == node.input[1])
    return {a.name: a.i for a in node.attribute}, numpy_helper.to_array(scale)


def test_c_1_k_weight_is_blocked_along_the_kernel_axis_and_runs_in_ort(rng):
    weight = heavy_tailed(rng, (16, 1, 128))
    model = _conv_model(weight)
    packed, result, report = _quantize(model)

    assert result.stats.get("quantized") == 1
    attrs, scale = _dq(packed)
    assert attrs == {"axis": 2, "block_size": 32}
    assert scale.shape == (16, 1, 4)  # 4 scales per row of 128, not one per weight
    assert report[0]["granularity"] == "block:32@axis2" and report[0]["block_axis"] == 2

    feeds = {"x": rng.standard_normal((1, 1, 300), dtype=np.float32)}
    via_ort = run_ort(packed, feeds)["y"]  # ORT accepts DQ opset 21, block_size on a kernel axis, into Conv
    np.testing.assert_allclose(run_interp(packed, feeds)["y"], via_ort, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(run_ort(packed, feeds, optimized=True)["y"], via_ort, rtol=1e-5, atol=1e-5)
    assert sqnr_db(run_ort(model, feeds)["y"], via_ort) > 15  # 4-bit, 32 weights a scale


def test_short_kernel_with_one_input_channel_gets_one_scale_per_channel(rng):
    weight = heavy_tailed(rng, (64, 1, 5))
    model = _conv_model(weight)
    packed, _, report = _quantize(model)

    attrs, scale = _dq(packed)
    assert attrs == {"axis": 0} and scale.shape == (64,)
    assert report[0]["granularity"] == "channel" and report[0]["block_axis"] is None
    feeds = {"x": rng.standard_normal((1, 1, 300), dtype=np.float32)}
    np.testing.assert_allclose(run_interp(packed, feeds)["y"], run_ort(packed, feeds)["y"], rtol=1e-5, atol=1e-5)


def test_long_input_axis_keeps_blocks_along_i(rng):
    weight = heavy_tailed(rng, (8, 64, 3))
    packed, _, report = _quantize(_conv_model(weight, length=20))

    attrs, scale = _dq(packed)
    assert attrs == {"axis": 1, "block_size": 32} and scale.shape == (8, 2, 3)
    assert report[0]["granularity"] == "block:32" and report[0]["block_axis"] == 1
