"""q4c.signature: the one state-pair rule that `compile --calib` and `bench --chunk` share.

The models here are ones the two old rules paired differently: `state`/`stateN` (the Silero VAD
exports; bench's suffix rule found no pair), and a frame in / frame out of one fixed shape
(bench's shape fallback carried the output into the input; calibration, rightly, did not).
"""

import onnx
from onnx import TensorProto, helper

from q4c.bench import state_pairs as bench_pairs
from q4c.calib.runner import resolve_state_pairs
from q4c.signature import state_pairs


def _model(inputs, outputs) -> onnx.ModelProto:
    """Outputs are Identity of the first input: only the signature matters to the rule."""
    ins = [helper.make_tensor_value_info(n, t, s) for n, t, s in inputs]
    outs = [helper.make_tensor_value_info(n, t, s) for n, t, s in outputs]
    nodes = [helper.make_node("Identity", [inputs[0][0]], [n]) for n, _, _ in outputs]
    return helper.make_model(helper.make_graph(nodes, "g", ins, outs), opset_imports=[helper.make_opsetid("", 17)],
                             ir_version=10)


F = TensorProto.FLOAT


def _both(model: onnx.ModelProto) -> tuple[dict[str, str], dict[str, str]]:
    calib = resolve_state_pairs(model, [], None)  # what `compile --calib` carries (output -> input)
    bench = {o: i for i, o in bench_pairs(model).items()}  # what `bench --chunk` carries
    return calib, bench


def test_silero_naming_pairs_in_both():
    model = _model([("input", F, ["batch", 512]), ("state", F, [2, "batch", 128]), ("sr", TensorProto.INT64, [])],
                   [("output", F, ["batch", 1]), ("stateN", F, [2, "batch", 128])])
    calib, bench = _both(model)
    assert calib == bench == {"stateN": "state"}


def test_one_shape_in_and_out_is_not_state_in_either():
    model = _model([("frame", F, [1, 480]), ("h_in", F, [1, 64])], [("enhanced", F, [1, 480]), ("h_out", F, [1, 64])])
    calib, bench = _both(model)
    assert calib == bench == {"h_out": "h_in"}


def test_an_ambiguous_stem_pairs_nothing():
    # two inputs share the stem "h"
    assert state_pairs(_model([("h_in", F, [1, 16]), ("h0", F, [1, 16])], [("h_out", F, [1, 16])])) == {}
    # case-insensitive, prefixes count, fixed dims must agree
    model = _model([("Cache_Prev", F, [4]), ("mem", F, [3])], [("new_cache_prev", F, [4]), ("mem_out", F, [5])])
    assert state_pairs(model) == {"new_cache_prev": "Cache_Prev"}


def test_data_input_with_a_time_axis_is_not_state():
    model = _model([("feats", F, ["batch", "time", 40])], [("out", F, ["batch", "time", 40])])
    assert state_pairs(model) == {}
