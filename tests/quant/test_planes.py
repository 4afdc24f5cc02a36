"""6-bit codes stored as a 4-bit and a 2-bit plane (q4c.quant.planes)."""

import json

import ml_dtypes
import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

import q4c
from q4c.cli import main
from q4c.config import CompileOptions
from q4c.errors import ConfigError
from q4c.quant.candidates import candidate, candidate_list
from q4c.quant.planes import split
from q4c.quant.weights import find_weight_slots
from q4c.testing import heavy_tailed, make_model, run_ort

F = TensorProto.FLOAT


def test_every_6_bit_code_is_four_times_its_high_plane_plus_its_low_plane():
    q = np.arange(-32, 32)
    hi, lo = split(q)
    assert hi.dtype == ml_dtypes.int4 and lo.dtype == ml_dtypes.uint2
    np.testing.assert_array_equal(4 * hi.astype(np.int16) + lo.astype(np.int16), q)
    with pytest.raises(ValueError):
        split(np.array([32]))


def _conv_lstm_matmul(rng):
    """x -> Conv -> LSTM -> y, and x2 -> MatMul -> z (a weight a low-bit kernel reads)."""
    nodes = [helper.make_node("Conv", ["x", "CW"], ["c"], pads=[1, 1]),
             helper.make_node("Transpose", ["c"], ["ct"], perm=[2, 0, 1]),
             helper.make_node("LSTM", ["ct", "W", "R"], ["y"], hidden_size=8),
             helper.make_node("MatMul", ["x2", "M"], ["z"])]
    return make_model(nodes, [helper.make_tensor_value_info("x", F, [1, 8, "T"]),
                              helper.make_tensor_value_info("x2", F, [4, 64])],
                      [helper.make_tensor_value_info("y", F, ["T", 1, 1, 8]),
                       helper.make_tensor_value_info("z", F, [4, 16])],
                      {"CW": heavy_tailed(rng, (16, 8, 3)), "W": heavy_tailed(rng, (1, 32, 16)),
                       "R": heavy_tailed(rng, (1, 32, 8)), "M": heavy_tailed(rng, (64, 16))}, opset=21)


def _plan(path, names, scheme="symmetric-absmax"):
    doc = {"schema": "q4c.plan/1",
           "tensors": {n: {"bits": 6, "granularity": "block:32", "scheme": scheme} for n in names}}
    path.write_text(json.dumps(doc))
    return path


def _step(model, codes, scale, shape):
    """The scale of every code, as DequantizeLinear (the node reading `codes`) applies it."""
    node = next(n for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0] == codes)
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    axis, scale = attrs.get("axis", 1) % len(shape), scale.astype(np.float32)
    if "block_size" in attrs:
        return np.repeat(scale, attrs["block_size"], axis=axis)[tuple(slice(0, d) for d in shape)]
    return scale.reshape([-1 if i == axis else 1 for i in range(len(shape))]) * np.ones(shape, np.float32)


def test_a_6_bit_plan_stores_two_planes_that_decode_to_the_rounded_weight(rng, tmp_path):
    """Conv and LSTM weights at 6 bits: an INT4 and a UINT2 initializer per weight (6 bits a
    weight), verified (checker, ONNX Runtime, interpreter); decoding the stored planes by hand
    gives weights within half a scale step of FP32, and the FP32 model run with those weights
    gives the compiled model's outputs."""
    model = _conv_lstm_matmul(rng)
    src, out = tmp_path / "m.onnx", tmp_path / "o.onnx"
    onnx.save(model, src)
    report = q4c.compile_file(src, out, CompileOptions(plan_path=_plan(tmp_path / "p.json", ["CW", "W", "R"]),
                                                       min_elements=0), data=None)
    assert report["verification"]["ort_loads"]
    assert {t["name"]: (t["bits"], t["stored_bits"]) for t in report["tensors"]} == {
        "CW": (6, 6), "W": (6, 6), "R": (6, 6)}
    compiled = onnx.load(out)
    onnx.checker.check_model(compiled, full_check=True)
    stored = {t.name: t for t in compiled.graph.initializer}
    decoded = {}
    for name, w in (("CW", model.graph.initializer[0]), ("W", model.graph.initializer[1]), ("R", model.graph.initializer[2])):
        hi_t, lo_t = stored[f"{name}_int4hi"], stored[f"{name}_uint2lo"]
        assert (hi_t.data_type, lo_t.data_type) == (TensorProto.INT4, TensorProto.UINT2)
        assert len(hi_t.raw_data) + len(lo_t.raw_data) == -(-np.prod(hi_t.dims) // 2) + -(-np.prod(lo_t.dims) // 4)
        hi, lo = numpy_helper.to_array(hi_t).astype(np.float32), numpy_helper.to_array(lo_t).astype(np.float32)
        step = _step(compiled, f"{name}_int4hi", numpy_helper.to_array(stored[f"{name}_scale"]), hi.shape)
        decoded[name] = (4 * hi + lo) * step
        values = numpy_helper.to_array(w)
        assert np.all(np.abs(decoded[name] - values) <= np.abs(step) / 2 * 1.002)  # nearest level, absmax: no clipping
    float_model = _conv_lstm_matmul(np.random.default_rng(0))
    float_model.graph.ClearField("initializer")
    float_model.graph.initializer.extend([numpy_helper.from_array(v, n) for n, v in decoded.items()]
                                         + [stored["M"]])
    feeds = {"x": rng.standard_normal((1, 8, 12)).astype(np.float32), "x2": rng.standard_normal((4, 64)).astype(np.float32)}
    want, got = run_ort(float_model, feeds), run_ort(compiled, feeds, optimized=True)
    np.testing.assert_allclose(got["y"], want["y"], rtol=1e-3, atol=1e-3)


def test_6_bit_codes_on_a_matmul_weight_are_a_one_line_error_and_nothing_is_written(rng, tmp_path):
    src, out = tmp_path / "m.onnx", tmp_path / "o.onnx"
    onnx.save(_conv_lstm_matmul(rng), src)
    with pytest.raises(ConfigError, match="M: 6-bit codes are for Conv and LSTM/GRU/RNN weights"):
        q4c.compile_file(src, out, CompileOptions(plan_path=_plan(tmp_path / "p.json", ["M"]), min_elements=0), data=None)
    assert not out.exists()


def test_6_bit_candidates_are_offered_to_conv_and_recurrent_weights_at_6_bits_a_weight(rng):
    graph = gs.import_onnx(_conv_lstm_matmul(rng))
    slots = {s.tensor.name: s for s in find_weight_slots(graph) if not isinstance(s, tuple)}
    opts = CompileOptions(requirements=("sqnr>=20dB",))
    assert opts.candidates == (2, 3, 4, 6, 8) and CompileOptions().candidates == (2, 3, 4, 8)
    widths = {n: {c.bits for c in candidate_list(s, opts, 25, gptq=False, tied=False)} for n, s in slots.items()}
    assert widths == {"CW": {2, 3, 4, 6, 8, 32}, "W": {2, 3, 4, 6, 8, 32}, "R": {2, 3, 4, 6, 8, 32}, "M": {2, 3, 4, 8, 32}}
    # no UINT2 before opset 25: 6-bit codes would take 8 bits, so they are not offered
    assert 6 not in {c.bits for c in candidate_list(slots["CW"], opts, 21, gptq=False, tied=False)}
    six = candidate(slots["W"], 6, opts.granularity, 25)
    assert six.nbytes == 32 * 16 * 6 // 8 + 32 * 1 * 2  # codes + one float16 scale per row (16 < 32)


def test_candidates_6_is_accepted_and_bits_6_is_not(tmp_path, rng):
    src = tmp_path / "m.onnx"
    onnx.save(_conv_lstm_matmul(rng), src)
    bad = CliRunner().invoke(main, ["compile", str(src), "--bits", "6"])
    assert bad.exit_code == 2 and "Traceback" not in bad.output
    assert CompileOptions(candidates=(4, 6)).candidates == (4, 6)
    with pytest.raises(ConfigError, match="--candidates must be"):
        CompileOptions(candidates=(5,))


def test_a_saved_6_bit_plan_replays_to_the_same_bytes(rng, tmp_path):
    src = tmp_path / "m.onnx"
    onnx.save(_conv_lstm_matmul(rng), src)
    first, again, saved = tmp_path / "a.onnx", tmp_path / "b.onnx", tmp_path / "saved.json"
    q4c.compile_file(src, first, CompileOptions(plan_path=_plan(tmp_path / "p.json", ["CW", "R"]), min_elements=0),
                     data=None, save_plan=saved)
    q4c.compile_file(src, again, CompileOptions(plan_path=saved, min_elements=0), data=None)
    assert json.loads(saved.read_text())["tensors"]["R"]["bits"] == 6
    assert first.read_bytes() == again.read_bytes()


def test_inspect_counts_a_6_bit_weight_once_at_6_bits(rng, tmp_path):
    from q4c.inspect import PLANES, inspect_model

    src, out = tmp_path / "m.onnx", tmp_path / "o.onnx"
    onnx.save(_conv_lstm_matmul(rng), src)
    q4c.compile_file(src, out, CompileOptions(plan_path=_plan(tmp_path / "p.json", ["CW", "W", "R"]), min_elements=0),
                     data=None)
    weights = inspect_model(onnx.load(out))["weights"]
    params = 16 * 8 * 3 + 32 * 16 + 32 * 8  # CW, W, R
    assert weights[PLANES]["params"] == params and weights[PLANES]["tensors"] == 6
    # INT4 packs two codes a byte, UINT2 four (each tensor rounded up to whole bytes)
    assert weights[PLANES]["bytes"] == sum(-(-n // 2) + -(-n // 4) for n in (16 * 8 * 3, 32 * 16, 32 * 8))
    assert "int4" not in weights and "uint2" not in weights


def test_decoders_are_named_by_short_tags_and_the_weight_name_stays_on_its_codes(rng, tmp_path):
    """A weight's name is stored once per reference: the DequantizeLinear -> Cast (-> Mul -> Add)
    chain is named "<tag>.<i>", so a long weight name appears only on the codes and scale
    initializers (each referenced once), and the decoded weights are the same as before."""
    model = _conv_lstm_matmul(np.random.default_rng(0))
    long = {n: f"encoder/block.{i}/reparam_conv/{n}.weight" for i, n in enumerate(("CW", "W", "R"))}
    for t in model.graph.initializer:
        t.name = long.get(t.name, t.name)
    for node in model.graph.node:
        node.input[:] = [long.get(x, x) for x in node.input]
    src, out = tmp_path / "m.onnx", tmp_path / "o.onnx"
    onnx.save(model, src)
    q4c.compile_file(src, out, CompileOptions(plan_path=_plan(tmp_path / "p.json", [long["CW"], long["W"]]),
                                              min_elements=0), data=None)
    compiled = onnx.load(out)
    initializers = {t.name for t in compiled.graph.initializer}
    assert {f"{long['CW']}_int4hi", f"{long['CW']}_uint2lo", f"{long['CW']}_scale"} <= initializers
    added = [n for n in compiled.graph.node if n.op_type in ("DequantizeLinear", "Cast", "Mul", "Add")]
    assert len(added) == 2 * 6  # per 6-bit weight: two DequantizeLinear, two Casts, a Mul and an Add
    for node in added:
        assert all(len(x) <= 4 for x in node.output), node.output  # "q0.3"
        assert not any(w in node.name or any(w in x for x in node.output) for w in long.values())
    names = [n.name for n in compiled.graph.node if n.name]
    assert len(names) == len(set(names))  # ONNX Runtime rejects two nodes of one name
    # every reference to the weight's name is its codes' or scale's: R (left float) keeps its name
    readers = [x for n in compiled.graph.node for x in n.input if "CW" in x or "/W" in x]
    assert sorted(readers) == sorted([f"{long[w]}_{s}" for w in ("CW", "W") for s in ("int4hi", "uint2lo")]
                                     + [f"{long[w]}_scale" for w in ("CW", "W")] * 2)
    feeds = {"x": rng.standard_normal((1, 8, 12)).astype(np.float32), "x2": rng.standard_normal((4, 64)).astype(np.float32)}
    short = tmp_path / "short.onnx"
    q4c.compile_file(_save(_conv_lstm_matmul(np.random.default_rng(0)), tmp_path / "s.onnx"), short,
                     CompileOptions(plan_path=_plan(tmp_path / "q.json", ["CW", "W"]), min_elements=0), data=None)
    got, want = run_ort(compiled, feeds), run_ort(onnx.load(short), feeds)
    for name in ("y", "z"):
        np.testing.assert_array_equal(got[name], want[name])


def _save(model, path):
    onnx.save(model, path)
    return path
