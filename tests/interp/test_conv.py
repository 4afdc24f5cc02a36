"""Conv and ConvTranspose against ONNX Runtime: groups, dilations, strides, pads, auto_pad."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper

from q4c.interp import Interpreter


def conv_model(make_model, rng, op_type, x_shape, w_shape, bias=True, **attrs):
    names = ["X", "W"] + (["B"] if bias else [])
    out_channels = w_shape[0] if op_type == "Conv" else w_shape[1] * attrs.get("group", 1)
    inits = {"W": (rng.standard_normal(w_shape) * 0.3).astype(np.float32)}
    if bias:
        inits["B"] = rng.standard_normal(out_channels).astype(np.float32)
    node = helper.make_node(op_type, names, ["Y"], **attrs)
    model = make_model([node], [helper.make_tensor_value_info("X", TensorProto.FLOAT, x_shape)], ["Y"], inits,
                       opset=17)
    return model, {"X": rng.standard_normal(x_shape).astype(np.float32)}


CONV_CASES = {
    "1d_plain": ((2, 4, 20), (6, 4, 3), {}),
    "1d_stride_dilation_pads": ((1, 4, 23), (6, 4, 5), {"strides": [2], "dilations": [2], "pads": [3, 1]}),
    "1d_depthwise_same": ((1, 8, 31), (8, 1, 7), {"group": 8, "auto_pad": "SAME_UPPER"}),
    "1d_groups_same_lower_stride": ((2, 6, 17), (9, 2, 4), {"group": 3, "auto_pad": "SAME_LOWER", "strides": [2]}),
    "1d_valid_no_bias": ((1, 3, 12), (2, 3, 4), {"auto_pad": "VALID", "bias": False}),
    "2d_plain": ((2, 3, 9, 8), (5, 3, 3, 3), {}),
    "2d_strides_pads": ((1, 3, 11, 10), (4, 3, 3, 2), {"strides": [2, 3], "pads": [1, 0, 2, 1]}),
    "2d_dilations_groups": ((1, 4, 12, 12), (6, 2, 3, 3), {"group": 2, "dilations": [2, 1], "pads": [2, 1, 2, 1]}),
    "2d_same_upper_stride": ((1, 2, 10, 7), (3, 2, 4, 3), {"auto_pad": "SAME_UPPER", "strides": [2, 2]}),
    "2d_depthwise": ((1, 5, 8, 8), (5, 1, 3, 3), {"group": 5, "pads": [1, 1, 1, 1]}),
}


@pytest.mark.parametrize("case", sorted(CONV_CASES))
def test_conv_matches_ort(make_model, run_ort, rng, case):
    x_shape, w_shape, attrs = CONV_CASES[case]
    attrs = dict(attrs)
    bias = attrs.pop("bias", True)
    model, feeds = conv_model(make_model, rng, "Conv", x_shape, w_shape, bias=bias, **attrs)
    np.testing.assert_allclose(Interpreter(model).run(feeds)["Y"], run_ort(model, feeds)["Y"], rtol=1e-5, atol=1e-5)


CONV_TRANSPOSE_CASES = {
    "1d_plain": ((2, 4, 10), (4, 3, 3), {}),
    "1d_stride_pads": ((1, 4, 9), (4, 5, 4), {"strides": [2], "pads": [1, 2]}),
    "1d_output_padding": ((1, 3, 7), (3, 2, 3), {"strides": [3], "output_padding": [2]}),
    "1d_dilation_groups": ((1, 6, 8), (6, 2, 3), {"group": 3, "dilations": [2], "strides": [2]}),
    "1d_output_shape": ((1, 2, 6), (2, 3, 3), {"strides": [2], "output_shape": [12]}),
    "2d_plain": ((1, 3, 5, 4), (3, 2, 3, 3), {}),
    "2d_strides_pads_output_padding": ((2, 2, 4, 5), (2, 3, 3, 2), {"strides": [2, 3], "pads": [1, 0, 0, 1],
                                                                    "output_padding": [1, 2]}),
    "2d_groups_dilations": ((1, 4, 5, 5), (4, 1, 2, 3), {"group": 2, "dilations": [2, 2]}),
    "2d_valid_no_bias": ((1, 2, 4, 4), (2, 2, 3, 3), {"auto_pad": "VALID", "bias": False}),
}


@pytest.mark.parametrize("case", sorted(CONV_TRANSPOSE_CASES))
def test_conv_transpose_matches_ort(make_model, run_ort, rng, case):
    x_shape, w_shape, attrs = CONV_TRANSPOSE_CASES[case]
    attrs = dict(attrs)
    bias = attrs.pop("bias", True)
    model, feeds = conv_model(make_model, rng, "ConvTranspose", x_shape, w_shape, bias=bias, **attrs)
    np.testing.assert_allclose(Interpreter(model).run(feeds)["Y"], run_ort(model, feeds)["Y"], rtol=1e-5, atol=1e-5)


def test_conv_transpose_same_upper_follows_the_spec(make_model, rng):
    # ConvTranspose-11: output = input * stride; SAME_UPPER puts the smaller half of the padding first.
    model, feeds = conv_model(make_model, rng, "ConvTranspose", (1, 1, 4), (1, 1, 4), bias=False,
                              strides=[2], auto_pad="SAME_UPPER")
    full, _ = conv_model(make_model, np.random.default_rng(0), "ConvTranspose", (1, 1, 4), (1, 1, 4), bias=False,
                         strides=[2])
    full.graph.initializer[0].CopyFrom(model.graph.initializer[0])
    y = Interpreter(model).run(feeds)["Y"]
    y_full = Interpreter(full).run(feeds)["Y"]  # length (4 - 1) * 2 + 4 = 10; total padding 2
    assert y.shape == (1, 1, 8)
    np.testing.assert_array_equal(y, y_full[..., 1:9])


POOL_CASES = {
    "max_2d_pads_strides": ("MaxPool", (1, 2, 9, 8), {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1]}),
    "max_1d_ceil_dilation": ("MaxPool", (2, 3, 12), {"kernel_shape": [3], "strides": [2], "dilations": [2],
                                                      "ceil_mode": 1}),
    "avg_2d_exclude_pad": ("AveragePool", (1, 2, 7, 7), {"kernel_shape": [3, 3], "strides": [2, 2],
                                                          "pads": [1, 1, 1, 1]}),
    "avg_2d_include_pad_ceil": ("AveragePool", (1, 2, 8, 7), {"kernel_shape": [3, 2], "strides": [2, 2],
                                                               "pads": [1, 0, 1, 0], "count_include_pad": 1,
                                                               "ceil_mode": 1}),
    "avg_1d_same_upper": ("AveragePool", (1, 4, 10), {"kernel_shape": [4], "strides": [3], "auto_pad": "SAME_UPPER"}),
}


@pytest.mark.parametrize("case", sorted(POOL_CASES))
def test_pooling_matches_ort(make_model, run_ort, rng, case):
    op_type, x_shape, attrs = POOL_CASES[case]
    node = helper.make_node(op_type, ["X"], ["Y"], **attrs)
    model = make_model([node], [helper.make_tensor_value_info("X", TensorProto.FLOAT, x_shape)], ["Y"], opset=19)
    feeds = {"X": rng.standard_normal(x_shape).astype(np.float32)}
    np.testing.assert_allclose(Interpreter(model).run(feeds)["Y"], run_ort(model, feeds)["Y"], rtol=1e-5, atol=1e-6)
