"""ReverseSequence (emitted by lower-recurrent for reverse directions with sequence_lens) vs ORT."""

import numpy as np
import pytest
from onnx import TensorProto, helper

from q4c.interp import Interpreter


@pytest.mark.parametrize(("batch_axis", "time_axis"), [(1, 0), (0, 1)])
def test_reverse_sequence_reverses_each_entry_within_its_length(make_model, run_ort, rng, batch_axis, time_axis):
    t, b, d = 6, 4, 3
    shape = [0, 0, d]
    shape[batch_axis], shape[time_axis] = b, t
    node = helper.make_node("ReverseSequence", ["x", "lens"], ["y"], batch_axis=batch_axis, time_axis=time_axis)
    model = make_model([node], [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape),
                                helper.make_tensor_value_info("lens", TensorProto.INT64, [b])], ["y"])
    feeds = {"x": rng.standard_normal(shape).astype(np.float32), "lens": np.array([6, 1, 3, 5], np.int64)}
    actual = Interpreter(model).run(feeds)["y"]
    np.testing.assert_array_equal(actual, run_ort(model, feeds)["y"])
    entry = np.take(actual, 2, axis=batch_axis)  # length 3: steps 0..2 reversed, 3..5 untouched
    original = np.take(feeds["x"], 2, axis=batch_axis)
    np.testing.assert_array_equal(entry[:3], original[2::-1])
    np.testing.assert_array_equal(entry[3:], original[3:])
