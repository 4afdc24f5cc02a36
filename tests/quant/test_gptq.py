"""GPTQ rounding: same storage as nearest rounding, less output error on correlated inputs."""

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import q4c
from q4c.config import CompileOptions
from q4c.quant.gptq import gptq_quantize, gptq_rows, input_hessians
from q4c.quant.qparams import CLIP_RATIOS, qrange, quantize
from q4c.quant.weights import find_weight_slots
from q4c.testing import heavy_tailed, make_model, run_ort

F = TensorProto.FLOAT


def _correlated_inputs(rng, n, k, mix=None):
    """Inputs whose features are strongly correlated (a low-rank mix plus noise); pass the same
    `mix` to draw more inputs from the same distribution."""
    mix = rng.standard_normal((8, k)) if mix is None else mix
    return rng.standard_normal((n, 8)) @ mix + 0.3 * rng.standard_normal((n, k))


def test_identity_hessian_gives_nearest_rounding_with_the_same_scales(rng):
    # With uncorrelated inputs there is nothing to compensate: codes and scales equal quantize()'s.
    w = heavy_tailed(rng, (24, 64))
    codes, scales = gptq_rows(w, np.eye(64), 4, 32, CLIP_RATIOS, np.float16)
    ref = quantize(w, 4, granularity="block", axis=1, block_size=32, scale_dtype=np.float16)
    np.testing.assert_array_equal(scales, ref.scale)
    np.testing.assert_array_equal(codes, ref.q)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_output_error_on_correlated_inputs_is_lower_than_nearest_rounding(rng, bits):
    k, rows = 96, 40
    mix = rng.standard_normal((8, k))
    x = _correlated_inputs(rng, 2000, k, mix)
    w = heavy_tailed(rng, (rows, k))
    h = x.T @ x / len(x)
    qw = gptq_quantize(w, [h], bits, axis=1, block_size=32, clip_ratios=CLIP_RATIOS, scale_dtype=np.float32)
    rtn = quantize(w, bits, granularity="block", axis=1, block_size=32)
    lo, hi = qrange(bits)
    assert qw.q.shape == w.shape and qw.q.min() >= lo and qw.q.max() <= hi
    assert qw.scale.shape == rtn.scale.shape
    held_out = _correlated_inputs(rng, 500, k, mix)  # other inputs than the Hessian's, same distribution
    err_gptq = np.sum((held_out @ (qw.dequantize() - w).T) ** 2)
    err_rtn = np.sum((held_out @ (rtn.dequantize() - w).T) ** 2)
    assert err_gptq < 0.8 * err_rtn


def test_per_direction_hessians_are_applied_to_their_own_slice(rng):
    # Two "directions" [2, rows, k]: quantizing them together with one Hessian each equals
    # quantizing each alone.
    w = heavy_tailed(rng, (2, 16, 64))
    xs = [_correlated_inputs(rng, 300, 64) for _ in range(2)]
    hs = [x.T @ x / len(x) for x in xs]
    both = gptq_quantize(w, hs, 3, axis=2, block_size=32, clip_ratios=CLIP_RATIOS, scale_dtype=np.float16)
    for d in range(2):
        codes, scales = gptq_rows(w[d], hs[d], 3, 32, CLIP_RATIOS, np.float16)
        np.testing.assert_array_equal(both.q[d], codes)
        np.testing.assert_array_equal(both.scale[d], scales)


def _matmul_lstm_model(rng):
    """x [T, 1, 48] -> MatMul W [48, 32] -> LSTM(hidden 16) -> Y."""
    w = heavy_tailed(rng, (1, 64, 32))
    r = heavy_tailed(rng, (1, 64, 16))
    return make_model(
        [helper.make_node("MatMul", ["x", "M"], ["m"]),
         helper.make_node("LSTM", ["m", "W", "R"], ["y"], hidden_size=16)],
        [helper.make_tensor_value_info("x", F, ["T", 1, 48])],
        [helper.make_tensor_value_info("y", F, ["T", 1, 1, 16])],
        {"M": heavy_tailed(rng, (48, 32)), "W": w, "R": r}, opset=21)


def test_input_hessians_are_the_mean_outer_products_of_what_each_weight_multiplies(rng):
    import onnx_graphsurgeon as gs

    model = _matmul_lstm_model(rng)
    graph = gs.import_onnx(model)
    slots = {s.tensor.name: s for s in find_weight_slots(graph) if not isinstance(s, tuple)}
    samples = [{"x": rng.standard_normal((20, 1, 48)).astype(np.float32)} for _ in range(3)]
    hs = input_hessians(model, slots, samples)
    xs = np.concatenate([s["x"].reshape(-1, 48) for s in samples]).astype(np.float64)
    np.testing.assert_allclose(hs["M"][0], xs.T @ xs / len(xs), rtol=1e-5)
    m = np.concatenate([(s["x"] @ model_weight(model, "M")).reshape(-1, 32) for s in samples]).astype(np.float64)
    np.testing.assert_allclose(hs["W"][0], m.T @ m / len(m), rtol=1e-4, atol=1e-6)
    ys = np.concatenate([run_ort(model, s)["y"].reshape(-1, 16) for s in samples]).astype(np.float64)
    np.testing.assert_allclose(hs["R"][0], ys.T @ ys / len(ys), rtol=1e-4, atol=1e-7)


def test_an_unread_lstm_y_is_read_for_the_recurrent_hessian_and_the_model_is_left_as_it_was(rng):
    """A streaming cell returns only Y_h (Silero's decoder): R's Hessian still comes from the hidden
    states, read through a temporary Y output; the model given is unchanged afterwards."""
    import onnx_graphsurgeon as gs

    w, r = heavy_tailed(rng, (1, 64, 32)), heavy_tailed(rng, (1, 64, 16))
    unread = make_model(
        [helper.make_node("LSTM", ["x", "W", "R"], ["", "yh"], hidden_size=16, name="cell")],
        [helper.make_tensor_value_info("x", F, ["T", 1, 32])],
        [helper.make_tensor_value_info("yh", F, [1, 1, 16])], {"W": w, "R": r}, opset=21)
    read = make_model(  # the same cell with Y as an output: the independent source of the states
        [helper.make_node("LSTM", ["x", "W", "R"], ["y", "yh"], hidden_size=16, name="cell")],
        [helper.make_tensor_value_info("x", F, ["T", 1, 32])],
        [helper.make_tensor_value_info("y", F, ["T", 1, 1, 16])], {"W": w, "R": r}, opset=21)
    before = unread.SerializeToString()
    graph = gs.import_onnx(unread)
    slots = {s.tensor.name: s for s in find_weight_slots(graph) if not isinstance(s, tuple)}
    samples = [{"x": rng.standard_normal((10, 1, 32)).astype(np.float32)} for _ in range(3)]
    hs = input_hessians(unread, slots, samples)
    ys = np.concatenate([run_ort(read, s)["y"].reshape(-1, 16) for s in samples]).astype(np.float64)
    np.testing.assert_allclose(hs["R"][0], ys.T @ ys / len(ys), rtol=1e-4, atol=1e-7)
    assert unread.SerializeToString() == before


def model_weight(model, name):
    return next(onnx.numpy_helper.to_array(t) for t in model.graph.initializer if t.name == name)


def test_uniform_gptq_compile_is_verified_and_more_accurate_than_nearest(rng, tmp_path):
    model = _matmul_lstm_model(rng)
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    calib = tmp_path / "calib"
    calib.mkdir()
    mix = rng.standard_normal((4, 48))
    for i in range(6):  # correlated features: where error compensation pays
        np.savez(calib / f"{i}.npz", x=(rng.standard_normal((20, 1, 4)) @ mix + 0.2 * rng.standard_normal((20, 1, 48))).astype(np.float32))
    errors = {}
    for scheme in ("symmetric", "gptq"):
        out = tmp_path / f"{scheme}.onnx"
        report = q4c.compile_file(path, out, CompileOptions(bits=2, scheme=scheme, min_elements=0), data=calib)
        assert report["verification"]["ort_loads"]  # compile verified checker + ORT + interpreter
        assert {t["scheme"] for t in report["tensors"]} == {scheme}
        x = (rng.standard_normal((20, 1, 4)) @ mix + 0.2 * rng.standard_normal((20, 1, 48))).astype(np.float32)
        ref, got = run_ort(model, {"x": x})["y"], run_ort(onnx.load(out), {"x": x}, optimized=True)["y"]
        errors[scheme] = float(np.mean((ref - got) ** 2))
    assert errors["gptq"] < errors["symmetric"]


def test_a_replayed_gptq_plan_without_data_is_a_clear_error(rng, tmp_path):
    model = _matmul_lstm_model(rng)
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    plan = {"schema": "q4c.plan/1", "tensors": {"M": {"bits": 4, "granularity": "block:32", "scheme": "gptq"}}}
    (tmp_path / "p.json").write_text(json.dumps(plan))
    # no --calib: one synthetic sample, 32 rows for M's 48 columns: too few for a Hessian
    with pytest.raises(q4c.errors.ConfigError, match="M: gptq needs at least as many calibration input rows"):
        q4c.compile_file(path, tmp_path / "o.onnx", CompileOptions(plan_path=tmp_path / "p.json", min_elements=0),
                         data=None)
    assert not (tmp_path / "o.onnx").exists()


def _branchy_model(rng):
    """y = If(a): Relu(x) @ W, else If(b): Sigmoid(x) @ W, else Tanh(x) @ V, with W a main-graph
    weight read in two branches and V a weight of the innermost branch (Silero VAD's layout:
    one LSTM weight read by a cell in each branch of an If, a whole network per sample rate)."""
    def branch(name, nodes, out, inits=()):
        return helper.make_graph(nodes, name, [], [helper.make_tensor_value_info(out, F, None)],
                                 initializer=[onnx.numpy_helper.from_array(v, k) for k, v in inits])

    v = heavy_tailed(rng, (16, 8))
    inner = helper.make_node("If", ["b"], ["inner_y"], name="inner",
                             then_branch=branch("sig", [helper.make_node("Sigmoid", ["x"], ["s"]),
                                                        helper.make_node("MatMul", ["s", "W"], ["ys"])], "ys"),
                             else_branch=branch("tanh", [helper.make_node("Tanh", ["x"], ["t"]),
                                                         helper.make_node("MatMul", ["t", "V"], ["yt"])], "yt",
                                                [("V", v)]))
    outer = helper.make_node("If", ["a"], ["y"], name="outer",
                             then_branch=branch("relu", [helper.make_node("Relu", ["x"], ["r"]),
                                                         helper.make_node("MatMul", ["r", "W"], ["yr"])], "yr"),
                             else_branch=branch("nested", [inner], "inner_y"))
    model = make_model([outer], [helper.make_tensor_value_info("x", F, ["N", 16]),
                                 helper.make_tensor_value_info("a", TensorProto.BOOL, []),
                                 helper.make_tensor_value_info("b", TensorProto.BOOL, [])],
                       [helper.make_tensor_value_info("y", F, ["N", 8])], {"W": heavy_tailed(rng, (16, 8))}, opset=21)
    return model, v


def test_weights_read_inside_if_branches_get_hessians_over_every_branch_that_reads_them(rng):
    """W is read in the outer then-branch and the inner then-branch: its Hessian is the mean x x^T
    over both (rows pooled); V, inside the inner else-branch, over the calls that took it. Calls
    that skip a branch add nothing; the model given is unchanged afterwards."""
    import onnx_graphsurgeon as gs

    from q4c.quant.sensitivity import gptq_eligible

    model, _ = _branchy_model(rng)
    before = model.SerializeToString()
    graph = gs.import_onnx(model)
    slots = {s.tensor.name: s for s in find_weight_slots(graph) if not isinstance(s, tuple)}
    assert set(gptq_eligible(graph, slots)) == {"W", "V"}
    flags = [(True, True), (False, True), (False, False), (True, False), (False, True)]
    samples = [{"x": rng.standard_normal((16 + i, 16)).astype(np.float32), "a": np.array(a), "b": np.array(b)}
               for i, (a, b) in enumerate(flags)]
    hs = input_hessians(model, slots, samples)
    sig = lambda z: 1 / (1 + np.exp(-z))  # noqa: E731
    w_in = np.concatenate([np.maximum(s["x"], 0) if s["a"] else sig(s["x"]) for s in samples if s["a"] or s["b"]])
    v_in = np.concatenate([np.tanh(s["x"]) for s in samples if not (s["a"] or s["b"])]).astype(np.float64)
    w_in = w_in.astype(np.float64)
    np.testing.assert_allclose(hs["W"][0], w_in.T @ w_in / len(w_in), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(hs["V"][0], v_in.T @ v_in / len(v_in), rtol=1e-5, atol=1e-7)
    assert model.SerializeToString() == before


def test_a_branch_no_call_takes_gives_its_weight_no_hessian(rng):
    import onnx_graphsurgeon as gs

    model, _ = _branchy_model(rng)
    graph = gs.import_onnx(model)
    slots = {s.tensor.name: s for s in find_weight_slots(graph) if not isinstance(s, tuple)}
    samples = [{"x": rng.standard_normal((20, 16)).astype(np.float32), "a": np.array(True), "b": np.array(False)}]
    assert set(input_hessians(model, slots, samples)) == {"W"}


def test_a_weight_read_in_a_loop_body_is_not_gptq_eligible(rng):
    """A Loop body's values differ per iteration and leave the loop only as scan outputs: not lifted."""
    import onnx_graphsurgeon as gs

    from q4c.quant.sensitivity import gptq_eligible

    body = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["m"]), helper.make_node("Identity", ["c"], ["c_out"])], "body",
        [helper.make_tensor_value_info("i", TensorProto.INT64, []), helper.make_tensor_value_info("c", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("c_out", TensorProto.BOOL, []), helper.make_tensor_value_info("m", F, None)])
    model = make_model([helper.make_node("Loop", ["n", ""], ["ms"], body=body)],
                       [helper.make_tensor_value_info("x", F, [4, 16]), helper.make_tensor_value_info("n", TensorProto.INT64, [])],
                       [helper.make_tensor_value_info("ms", F, None)], {"W": heavy_tailed(rng, (16, 8))}, opset=21)
    graph = gs.import_onnx(model)
    slots = {s.tensor.name: s for s in find_weight_slots(graph) if not isinstance(s, tuple)}
    assert set(slots) == {"W"}
    assert gptq_eligible(graph, slots) == {}


def test_uniform_gptq_compile_of_branch_weights_is_verified_and_more_accurate_than_nearest(rng, tmp_path):
    """Weights inside If branches are rounded with their own Hessians: the compiled model is
    verified (checker, ONNX Runtime, interpreter) and its output error beats nearest rounding."""
    model, _ = _branchy_model(rng)
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    calib = tmp_path / "calib"
    calib.mkdir()
    mix = rng.standard_normal((3, 16))

    def draw(a, b):
        x = (rng.standard_normal((24, 3)) @ mix + 0.1 * rng.standard_normal((24, 16))).astype(np.float32)
        return {"x": x, "a": np.array(a), "b": np.array(b)}

    for i, (a, b) in enumerate([(True, True), (False, True), (False, False)] * 2):
        np.savez(calib / f"{i}.npz", **draw(a, b))
    errors = {}
    tests = [draw(a, b) for a, b in [(True, True), (False, True), (False, False)] * 3]
    for scheme in ("symmetric", "gptq"):
        out = tmp_path / f"{scheme}.onnx"
        report = q4c.compile_file(path, out, CompileOptions(bits=2, scheme=scheme, min_elements=0), data=calib)
        assert report["verification"]["ort_loads"]
        assert {t["name"]: t["scheme"] for t in report["tensors"]} == {"W": scheme, "V": scheme}
        errors[scheme] = float(np.mean([(run_ort(model, s)["y"] - run_ort(onnx.load(out), s, optimized=True)["y"]) ** 2
                                        for s in tests]))
    assert errors["gptq"] < errors["symmetric"]


def test_a_hessian_with_fewer_rows_than_columns_is_not_used(rng):
    """36 input rows for M's 48 columns: H would be rank 36, and error compensation would fit those
    rows and zero the rest, so M gets no Hessian; W and R (32 and 16 columns) do."""
    import onnx_graphsurgeon as gs

    model = _matmul_lstm_model(rng)
    graph = gs.import_onnx(model)
    slots = {s.tensor.name: s for s in find_weight_slots(graph) if not isinstance(s, tuple)}
    samples = [{"x": rng.standard_normal((12, 1, 48)).astype(np.float32)} for _ in range(3)]
    assert set(input_hessians(model, slots, samples)) == {"W", "R"}
    samples.append({"x": rng.standard_normal((12, 1, 48)).astype(np.float32)})  # 48 rows: full rank possible
    assert set(input_hessians(model, slots, samples)) == {"M", "W", "R"}


def test_an_unread_lstm_y_inside_an_if_branch_is_read_for_the_recurrent_hessian(rng):
    """Silero's streaming cell sits in an If branch and returns only Y_h: R's Hessian still comes
    from its hidden states (Y named while read, then lifted out of the branch); the model given is
    unchanged afterwards."""
    import onnx_graphsurgeon as gs

    w, r = heavy_tailed(rng, (1, 64, 32)), heavy_tailed(rng, (1, 64, 16))

    def model(outputs, returned):
        cell = helper.make_graph([helper.make_node("LSTM", ["x", "W", "R"], outputs, hidden_size=16, name="cell")],
                                 "cell", [], [helper.make_tensor_value_info(returned, F, None)])
        other = helper.make_graph([helper.make_node("Constant", [], ["zero"], value=onnx.numpy_helper.from_array(
            np.zeros((1, 1, 16), np.float32), "zero"))], "zero", [], [helper.make_tensor_value_info("zero", F, None)])
        return make_model([helper.make_node("If", ["go"], ["out"], then_branch=cell, else_branch=other)],
                          [helper.make_tensor_value_info("x", F, ["T", 1, 32]),
                           helper.make_tensor_value_info("go", TensorProto.BOOL, [])],
                          [helper.make_tensor_value_info("out", F, None)], {"W": w, "R": r}, opset=21)

    unread, read = model(["", "yh"], "yh"), model(["y", "yh"], "y")  # the twin returns Y: the independent source
    before = unread.SerializeToString()
    graph = gs.import_onnx(unread)
    slots = {s.tensor.name: s for s in find_weight_slots(graph) if not isinstance(s, tuple)}
    samples = [{"x": rng.standard_normal((12, 1, 32)).astype(np.float32), "go": np.array(True)} for _ in range(3)]
    hs = input_hessians(unread, slots, samples)
    ys = np.concatenate([run_ort(read, s)["out"].reshape(-1, 16) for s in samples]).astype(np.float64)
    np.testing.assert_allclose(hs["R"][0], ys.T @ ys / len(ys), rtol=1e-4, atol=1e-7)
    assert unread.SerializeToString() == before


def test_columns_no_input_reached_keep_their_nearest_level_and_leave_the_rest_unchanged(rng):
    """Inputs 3 and 10 are zero on every calibration row (a dead ReLU): their weights cannot change
    the calibration output, so GPTQ fits each block's scale to the other columns, and rounds these
    to their nearest level in that range instead of zeroing them (an input that does reach them
    later stays close to FP32). The other columns get exactly the codes they get when the dead
    columns are zero."""
    w = heavy_tailed(rng, (6, 32), scale=1.0)
    x = _correlated_inputs(rng, 200, 32)
    x[:, [3, 10]] = 0.0
    h = x.T @ x / len(x)
    codes, scales = gptq_rows(w, h, 4, 16, CLIP_RATIOS, np.float16)
    zeroed = w.copy()
    zeroed[:, [3, 10]] = 0.0
    want, want_scales = gptq_rows(zeroed, h, 4, 16, CLIP_RATIOS, np.float16)
    live = np.setdiff1d(np.arange(32), [3, 10])
    np.testing.assert_array_equal(codes[:, live], want[:, live])
    np.testing.assert_array_equal(scales, want_scales)
    s = scales.astype(np.float64)[:, [0, 0]]  # both dead columns sit in the first block of 16
    lo, hi = qrange(4)
    np.testing.assert_array_equal(codes[:, [3, 10]], np.clip(np.rint(w[:, [3, 10]] / s), lo, hi))
    assert np.any(codes[:, [3, 10]] != 0)


@pytest.mark.parametrize("k, width", [(300, 48), (387, 387), (256, 32)])
def test_lazy_batches_give_the_column_by_column_codes(k, width):
    """Blocks of 48 cross the 128-column batches (a range starts a new batch), one range of 387
    columns is wider than a batch (per-channel Conv), blocks of 32 tile them."""
    from q4c.quant.gptq import gptq_ranges
    from q4c.testing import gptq_column_by_column

    rng = np.random.default_rng(k)
    x = rng.standard_normal((3 * k, k)) @ rng.standard_normal((k, k)) * 0.1 + rng.standard_normal((3 * k, k))
    hessian = x.T @ x / len(x)
    w = rng.standard_normal((96, k)).astype(np.float32)
    ranges = [(lo, min(lo + width, k)) for lo in range(0, k, width)]
    codes, _ = gptq_ranges(w, hessian, 4, ranges, width, CLIP_RATIOS, np.float16)
    np.testing.assert_array_equal(codes, gptq_column_by_column(w, hessian, 4, ranges, width))
