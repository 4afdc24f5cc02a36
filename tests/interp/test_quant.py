"""QuantizeLinear / DequantizeLinear: bit-exact against ONNX Runtime, and the spec's properties."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from onnx import TensorProto, helper

from q4c.interp import Interpreter
from q4c.interp.ops.quant import dequantize_array, quantize_array

WIDTHS = {  # numpy dtype, ONNX type, (lo, hi)
    "int8": (np.dtype(np.int8), TensorProto.INT8, (-128, 127)),
    "uint8": (np.dtype(np.uint8), TensorProto.UINT8, (0, 255)),
    "int16": (np.dtype(np.int16), TensorProto.INT16, (-32768, 32767)),
    "uint16": (np.dtype(np.uint16), TensorProto.UINT16, (0, 65535)),
    "int4": (np.dtype(ml_dtypes.int4), TensorProto.INT4, (-8, 7)),
    "uint4": (np.dtype(ml_dtypes.uint4), TensorProto.UINT4, (0, 15)),
    "int2": (np.dtype(ml_dtypes.int2), TensorProto.INT2, (-2, 1)),
    "uint2": (np.dtype(ml_dtypes.uint2), TensorProto.UINT2, (0, 3)),
}


def qdq_model(make_model, x_shape, scale, zero_point, *, axis=1, block_size=0, opset=21):
    """x -> QuantizeLinear -> q -> DequantizeLinear -> y, parameters as initializers.

    `q` leaves the graph widened to int32 (`q32`): ORT's Python API cannot return int4 arrays.
    """
    attrs = {"axis": axis, "block_size": block_size}
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "s", "zp"], ["q"], **attrs),
        helper.make_node("DequantizeLinear", ["q", "s", "zp"], ["y"], **attrs),
        helper.make_node("Cast", ["q"], ["q32"], to=TensorProto.INT32),
    ]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)]
    return make_model(nodes, inputs, [("q32", TensorProto.INT32), "y"], {"s": scale, "zp": zero_point}, opset=opset)


def _params(rng, shape, width):
    dtype, _, (lo, hi) = WIDTHS[width]
    scale = (rng.random(shape) * 0.05 + 0.01).astype(np.float32)
    zero_point = rng.integers(lo, hi + 1, size=shape).astype(dtype)
    return scale, zero_point


@pytest.mark.parametrize("width", ["int8", "uint8", "int16", "uint16", "int4", "uint4"])
@pytest.mark.parametrize("granularity", ["tensor", "axis", "blocked"])
def test_qdq_matches_ort_bit_for_bit(make_model, run_ort, rng, width, granularity):
    x_shape = (6, 64)
    if granularity == "tensor":
        scale, zp = _params(rng, (), width)
        model = qdq_model(make_model, x_shape, scale, zp)
    elif granularity == "axis":
        scale, zp = _params(rng, (6,), width)
        model = qdq_model(make_model, x_shape, scale, zp, axis=0)
    else:
        scale, zp = _params(rng, (6, 4), width)
        model = qdq_model(make_model, x_shape, scale, zp, axis=1, block_size=16)
    x = (rng.standard_normal(x_shape) * 2).astype(np.float32)
    # Exact ties exercise round-half-to-even: x / scale = k + 0.5 for some elements.
    s_full = np.broadcast_to(np.repeat(scale, 16, axis=-1) if granularity == "blocked"
                             else scale.reshape(-1, 1) if granularity == "axis" else scale, x_shape)
    x[:, :8] = ((np.arange(8) - 4 + 0.5) * s_full[:, :8]).astype(np.float32)
    feeds = {"x": x}
    expected = run_ort(model, feeds)
    actual = Interpreter(model).run(feeds, keep=["q"])
    assert actual["q"].dtype == WIDTHS[width][0]
    np.testing.assert_array_equal(actual["q32"], expected["q32"])
    np.testing.assert_array_equal(actual["y"], expected["y"])


def test_blocked_last_block_may_be_partial(make_model, run_ort, rng):
    scale, zp = _params(rng, (3, 3), "int4")
    model = qdq_model(make_model, (3, 40), scale, zp, axis=1, block_size=16)  # blocks 16 + 16 + 8
    feeds = {"x": rng.standard_normal((3, 40)).astype(np.float32)}
    expected, actual = run_ort(model, feeds), Interpreter(model).run(feeds)
    np.testing.assert_array_equal(actual["q32"], expected["q32"])
    np.testing.assert_array_equal(actual["y"], expected["y"])


def test_output_dtype_without_zero_point(make_model, run_ort, rng):
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "s"], ["q"], output_dtype=TensorProto.INT4, axis=0),
        helper.make_node("Cast", ["q"], ["q32"], to=TensorProto.INT32),
    ]
    model = make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, (4, 8))],
                       [("q32", TensorProto.INT32)], {"s": np.full(4, 0.1, np.float32)})
    feeds = {"x": rng.standard_normal((4, 8)).astype(np.float32)}
    actual = Interpreter(model).run(feeds, keep=["q"])
    assert actual["q"].dtype == np.dtype(ml_dtypes.int4)
    np.testing.assert_array_equal(actual["q32"], run_ort(model, feeds)["q32"])


def test_default_output_is_uint8():
    q = quantize_array(np.array([-1.0, 0.4, 300.0], np.float32), np.array(1.0, np.float32), None,
                       np.dtype(np.uint8))
    assert q.dtype == np.uint8 and q.tolist() == [0, 0, 255]


def test_dynamic_quantize_linear_matches_ort(make_model, run_ort, rng):
    node = helper.make_node("DynamicQuantizeLinear", ["x"], ["y", "s", "zp"])
    model = make_model([node], [helper.make_tensor_value_info("x", TensorProto.FLOAT, (5, 7))],
                       [("y", TensorProto.UINT8), "s", ("zp", TensorProto.UINT8)])
    for x in (rng.standard_normal((5, 7)), rng.random((5, 7)) + 1, -rng.random((5, 7))):
        feeds = {"x": x.astype(np.float32)}
        expected, actual = run_ort(model, feeds), Interpreter(model).run(feeds)
        for name in ("y", "s", "zp"):
            np.testing.assert_array_equal(actual[name], expected[name], err_msg=name)


# --- properties -----------------------------------------------------------------------------

_floats = hnp.arrays(np.float32, st.integers(1, 64), elements=st.floats(-1e3, 1e3, width=32))


@settings(max_examples=60, deadline=None)
@given(x=_floats, width=st.sampled_from(sorted(WIDTHS)), scale=st.floats(1 / 1024, 10, width=32), data=st.data())
def test_round_trip_error_is_at_most_half_a_step_inside_the_range(x, width, scale, data):
    dtype, _, (lo, hi) = WIDTHS[width]
    zp = data.draw(st.integers(lo, hi))
    s = np.float32(scale)
    inside = (x / s + zp >= lo) & (x / s + zp <= hi)
    q = quantize_array(x, np.array(s), np.array(zp, dtype=dtype), dtype)
    y = dequantize_array(q, np.array(s), np.array(zp, dtype=dtype), np.dtype(np.float32))
    # Half a step, plus float32 rounding of x / s and of the product.
    bound = s / 2 + np.abs(x) * 4 * np.finfo(np.float32).eps + 1e-6
    assert np.all(np.abs(y - x)[inside] <= bound[inside])


@settings(max_examples=60, deadline=None)
@given(x=_floats, width=st.sampled_from(sorted(WIDTHS)), scale=st.floats(1 / 1024, 10, width=32))
def test_quantize_saturates_to_the_type_range(x, width, scale):
    dtype, _, (lo, hi) = WIDTHS[width]
    q = quantize_array(x * 1e4, np.array(np.float32(scale)), None, dtype).astype(np.int64)
    assert q.min() >= lo and q.max() <= hi
    big = np.array([np.float32(1e30), np.float32(-1e30)])
    assert quantize_array(big, np.array(np.float32(scale)), None, dtype).astype(np.int64).tolist() == [hi, lo]


@settings(max_examples=40, deadline=None)
@given(
    x=hnp.arrays(np.float32, st.tuples(st.integers(1, 5), st.integers(1, 40)), elements=st.floats(-100, 100, width=32)),
    width=st.sampled_from(sorted(WIDTHS)),
    data=st.data(),
)
def test_blocked_with_one_block_per_axis_equals_per_axis(x, width, data):
    dtype, _, (lo, hi) = WIDTHS[width]
    rows, cols = x.shape
    scale = np.array(data.draw(st.lists(st.floats(1 / 64, 5, width=32), min_size=rows, max_size=rows)), np.float32)
    zp = np.array(data.draw(st.lists(st.integers(lo, hi), min_size=rows, max_size=rows))).astype(dtype)
    per_axis = quantize_array(x, scale, zp, dtype, axis=0)
    # Blocked along axis 1 with block_size = cols: one block per row, i.e. per-axis on axis 0.
    blocked = quantize_array(x, scale.reshape(rows, 1), zp.reshape(rows, 1), dtype, axis=1, block_size=cols)
    np.testing.assert_array_equal(per_axis.astype(np.int64), blocked.astype(np.int64))
    np.testing.assert_array_equal(
        dequantize_array(per_axis, scale, zp, np.dtype(np.float32), axis=0),
        dequantize_array(blocked, scale.reshape(rows, 1), zp.reshape(rows, 1), np.dtype(np.float32), axis=1,
                         block_size=cols),
    )


@settings(max_examples=40, deadline=None)
@given(k=st.integers(-6, 5), width=st.sampled_from(sorted(WIDTHS)), scale=st.sampled_from([0.5, 0.25, 2.0, 0.125]))
def test_ties_round_half_to_even(k, width, scale):
    dtype, _, (lo, hi) = WIDTHS[width]
    x = np.array([(k + 0.5) * scale], np.float32)  # exactly representable: x / scale = k + 0.5
    q = int(quantize_array(x, np.array(np.float32(scale)), None, dtype).astype(np.int64)[0])
    even = k if k % 2 == 0 else k + 1
    assert q == min(max(even, lo), hi)
