"""fuse-lstm-gates: decomposed LSTM cells (every common export layout, unrolled or in a
Scan/Loop body) become one ONNX LSTM; declined candidates are counted with their reason.

Numerics: check_pass (checker, honest `modified`, idempotence, ORT before == ORT after ==
interpreter at rtol = atol = 1e-5), plus a numpy LSTM written here for the gate-order tests and
the torch outputs committed with the bundled models."""

from __future__ import annotations

import numpy as np
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from q4c import graph as g
from q4c.config import CompileOptions
from q4c.passes.fold_constants import FoldConstantsPass
from q4c.passes.fuse_lstm_gates import FuseLstmGatesPass
from q4c.pipeline import PassContext, Pipeline
from q4c.testing import check_pass, make_model, op_histogram, run_interp, run_ort, run_pass

F = TensorProto.FLOAT
INP, HID, BATCH = 5, 4, 2


def _sigmoid(x):
    return 1 / (1 + np.exp(-x))


def numpy_lstm(x, w_ih, w_hh, b, order, h0, c0):
    """The reference cell, gates laid out in `order` (a permutation of 'ifgo')."""
    h, c, hs = h0, c0, []
    for t in range(x.shape[1]):
        z = x[:, t] @ w_ih.T + h @ w_hh.T + b
        gate = {k: z[:, j * HID:(j + 1) * HID] for j, k in enumerate(order)}
        c = _sigmoid(gate["f"]) * c + _sigmoid(gate["i"]) * np.tanh(gate["g"])
        h = _sigmoid(gate["o"]) * np.tanh(c)
        hs.append(h)
    return np.stack(hs, 1), h, c


class Cells:
    """An LSTM unrolled over `steps` as separate ops, in one of the export layouts:

    split     MatMul(x) + MatMul(h) + Add bias, Split into 4 (torch Linear without bias + split)
    slice     same, four Slice nodes with constant bounds (torch.chunk)
    concat    Gemm(Concat(x, h), transB=1) with the bias as C, Split
    separate  per gate Gemm(x, transB=1, bias C) + MatMul(h): four separate gate projections
    each      x and h projections each Split into 4, added gate by gate
    """

    def __init__(self, rng, *, layout="split", order="ifgo", bias=True, steps=3, states="inputs",
                 peephole=False, g_act="Tanh", identity_weights=False, stack_axis=1, untied=False):
        self.rng, self.layout, self.order, self.bias, self.steps = rng, layout, order, bias, steps
        self.states, self.peephole, self.g_act, self.identity_weights = states, peephole, g_act, identity_weights
        self.stack_axis, self.untied = stack_axis, untied
        self.nodes, self.inits = [], {}
        self.w_ih = (rng.standard_normal((4 * HID, INP)) * 0.5).astype(np.float32)
        self.w_hh = (rng.standard_normal((4 * HID, HID)) * 0.5).astype(np.float32)
        self.b = (rng.standard_normal(4 * HID) * 0.5 if bias else np.zeros(4 * HID)).astype(np.float32)
        self.n = 0

    def _name(self, base):
        self.n += 1
        return f"{base}_{self.n}"

    def node(self, op, inputs, outputs=None, **attrs):
        outputs = outputs or [self._name(op.lower())]
        self.nodes.append(helper.make_node(op, inputs, outputs, name=self._name(f"/{op}"), **attrs))
        return outputs[0] if len(outputs) == 1 else outputs

    def const(self, value, base="c"):
        name = self._name(base)
        self.inits[name] = np.asarray(value)
        return name

    def weight(self, value, base):
        """A weight initializer, read through an exporter-style Identity when asked."""
        name = self.const(np.ascontiguousarray(value, dtype=np.float32), base)
        return self.node("Identity", [name]) if self.identity_weights else name

    def pieces(self, x, h, t):
        """The four gate pre-activations, keyed by gate letter."""
        w_ih, w_hh = self.w_ih, self.w_hh
        if self.untied and t % 2:
            w_ih, w_hh = w_ih * 0.5, w_hh * 0.5
        if self.layout == "separate":
            out = {}
            for j, k in enumerate(self.order):
                rows = slice(j * HID, (j + 1) * HID)
                xg = self.node("Gemm", [x, self.weight(w_ih[rows], "w_x"), self.const(self.b[rows], "b")], transB=1) \
                    if self.bias else self.node("Gemm", [x, self.weight(w_ih[rows], "w_x")], transB=1)
                out[k] = self.node("Add", [xg, self.node("MatMul", [h, self.weight(w_hh[rows].T, "w_h")])])
            return out
        if self.layout == "each":
            xg = self.node("MatMul", [x, self.weight(w_ih.T, "w_x")])
            if self.bias:
                xg = self.node("Add", [xg, self.const(self.b, "b")])
            xs = self.node("Split", [xg, self.const([HID] * 4, "split")], [self._name("piece") for _ in range(4)], axis=1)
            hs = self.node("Split", [self.node("MatMul", [h, self.weight(w_hh.T, "w_h")]), self.const([HID] * 4, "split")],
                           [self._name("piece") for _ in range(4)], axis=1)
            return {k: self.node("Add", [xs[j], hs[j]]) for j, k in enumerate(self.order)}
        if self.layout == "concat":
            cat = self.node("Concat", [x, h], axis=1)
            w = np.concatenate([w_ih, w_hh], axis=1)
            z = self.node("Gemm", [cat, self.weight(w, "w_cat"), *([self.const(self.b, "b")] if self.bias else [])], transB=1)
        else:
            z = self.node("Add", [self.node("MatMul", [x, self.weight(w_ih.T, "w_x")]),
                                  self.node("MatMul", [h, self.weight(w_hh.T, "w_h")])])
            if self.bias:
                z = self.node("Add", [z, self.const(self.b, "b")])
        if self.layout == "slice":
            return {k: self.node("Slice", [z, self.const([j * HID], "s"), self.const([(j + 1) * HID], "e"),
                                           self.const([1], "ax")]) for j, k in enumerate(self.order)}
        parts = self.node("Split", [z, self.const([HID] * 4, "split")], [self._name("piece") for _ in range(4)], axis=1)
        return dict(zip(self.order, parts))

    def cell(self, x, h, c, t, h_name=None, c_name=None):
        pre = self.pieces(x, h, t)
        if self.peephole:
            pre["f"] = self.node("Add", [pre["f"], self.node("Mul", [c, self.const(np.full(HID, 0.3, np.float32), "p")])])
        act = {"i": "Sigmoid", "f": "Sigmoid", "g": self.g_act, "o": "Sigmoid"}
        gate = {k: self.node(act[k], [pre[k]]) for k in "ifgo"}
        c_new = self.node("Add", [self.node("Mul", [gate["f"], c]), self.node("Mul", [gate["i"], gate["g"]])],
                          [c_name] if c_name else None)
        h_new = self.node("Mul", [gate["o"], self.node("Tanh", [c_new])], [h_name] if h_name else None)
        return h_new, c_new

    def initial_states(self):
        if self.states == "inputs":
            return "h0", "c0"
        # what torch writes for zeros(batch, H) with a dynamic batch
        batch = self.node("Gather", [self.node("Shape", ["x"]), self.const(np.array(0, np.int64), "i")], axis=0)
        shape = self.node("Concat", [self.node("Unsqueeze", [batch, self.const([0], "ax")]), self.const([HID], "h")], axis=0)
        zeros = self.node("ConstantOfShape", [shape], value=numpy_helper.from_array(np.zeros(1, np.float32)))
        return zeros, zeros

    def model(self, stack=True):
        h, c = self.initial_states()
        hs = []
        for t in range(self.steps):
            x_t = self.node("Gather", ["x", self.const(np.array(t, np.int64), "t")], axis=1)
            last = t == self.steps - 1
            h, c = self.cell(x_t, h, c, t, "h_n" if last else None, "c_n" if last else None)
            hs.append(h)
        outputs = [_info("h_n", BATCH, HID), _info("c_n", BATCH, HID)]
        if stack:
            self.node("Concat", [self.node("Unsqueeze", [h_t, self.const([self.stack_axis], "ax")]) for h_t in hs],
                      ["hs"], axis=self.stack_axis)
            dims = [BATCH, HID]
            dims.insert(self.stack_axis, self.steps)
            outputs.insert(0, _info("hs", *dims))
        inputs = [helper.make_tensor_value_info("x", F, [BATCH, self.steps, INP])]
        if self.states == "inputs":
            inputs += [helper.make_tensor_value_info(n, F, [BATCH, HID]) for n in ("h0", "c0")]
        return make_model(self.nodes, inputs, outputs, self.inits)

    def feeds(self):
        feeds = {"x": self.rng.standard_normal((BATCH, self.steps, INP)).astype(np.float32)}
        if self.states == "inputs":
            feeds["h0"] = self.rng.standard_normal((BATCH, HID)).astype(np.float32) * 0.5
            feeds["c0"] = self.rng.standard_normal((BATCH, HID)).astype(np.float32)
        return feeds


def _info(name, *dims):
    return helper.make_tensor_value_info(name, F, list(dims))


def _fuse(model, feeds):
    out = check_pass(FuseLstmGatesPass(), model, feeds)
    return out, run_pass(FuseLstmGatesPass(), model)[1]


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("order", ["ifgo", "iofg", "gfio"])
@pytest.mark.parametrize("layout", ["split", "slice", "concat", "separate", "each"])
def test_fuses_unrolled_layouts_into_one_lstm(rng, layout, order, bias):
    cells = Cells(rng, layout=layout, order=order, bias=bias)
    feeds = cells.feeds()
    out, result = _fuse(cells.model(), feeds)

    assert result.stats == {"fused": 1, "fused_cells": 3}
    hist = op_histogram(out)
    assert hist["LSTM"] == 1 and "Sigmoid" not in hist and "Split" not in hist and "Gemm" not in hist
    want = numpy_lstm(feeds["x"], cells.w_ih, cells.w_hh, cells.b, order, feeds["h0"], feeds["c0"])
    got = run_ort(out, feeds)
    for name, ref in zip(("hs", "h_n", "c_n"), want):
        np.testing.assert_allclose(got[name], ref, rtol=1e-5, atol=1e-5, err_msg=name)


def test_lstm_weights_are_in_onnx_gate_order(rng):
    cells = Cells(rng, order="ifgo")
    out, _ = _fuse(cells.model(), cells.feeds())
    inits = {t.name: numpy_helper.to_array(t) for t in out.graph.initializer}
    lstm = next(n for n in out.graph.node if n.op_type == "LSTM")
    w, r, b = (inits[name] for name in lstm.input[1:4])
    blocks = {k: slice(j * HID, (j + 1) * HID) for j, k in enumerate("ifgo")}
    onnx_rows = np.concatenate([np.arange(4 * HID)[blocks[k]] for k in "iofg"])  # LSTM stacks i, o, f, c
    np.testing.assert_array_equal(w[0], cells.w_ih[onnx_rows])
    np.testing.assert_array_equal(r[0], cells.w_hh[onnx_rows])
    np.testing.assert_allclose(b[0, :4 * HID] + b[0, 4 * HID:], cells.b[onnx_rows])
    assert w.shape == (1, 4 * HID, INP) and r.shape == (1, 4 * HID, HID) and b.shape == (1, 8 * HID)


def test_single_step_cell_becomes_lstm_with_one_step(rng):
    cells = Cells(rng, steps=1)
    out, result = _fuse(cells.model(), cells.feeds())
    assert result.stats == {"fused": 1, "fused_cells": 1}
    assert op_histogram(out)["LSTM"] == 1


def test_zero_initial_state_from_constant_of_shape_is_omitted(rng):
    cells = Cells(rng, states="zeros", steps=4, identity_weights=True)  # like models/lstm_unrolled
    out, result = _fuse(cells.model(), cells.feeds())
    assert result.stats == {"fused": 1, "fused_cells": 4}
    lstm = next(n for n in out.graph.node if n.op_type == "LSTM")
    assert len(lstm.input) == 4  # X, W, R, B: no initial_h / initial_c (zeros by default)
    assert "ConstantOfShape" not in op_histogram(out)


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_stacked_outputs_on_any_axis_come_from_y(rng, axis):
    cells = Cells(rng, stack_axis=axis)
    out, _ = _fuse(cells.model(), cells.feeds())
    hist = op_histogram(out)
    assert "Concat" not in hist and "Unsqueeze" in hist  # only the initial state's Unsqueeze remains
    assert hist.get("Transpose", 0) == (1 if axis else 0) + 1  # Y re-laid out (+ X time-major)


def test_step_inputs_that_are_graph_inputs_are_stacked(rng):
    cells = Cells(rng, steps=2)
    model = cells.model()
    for node in [n for n in model.graph.node if n.op_type == "Gather"]:  # x_t become graph inputs
        model.graph.node.remove(node)
        model.graph.input.append(helper.make_tensor_value_info(node.output[0], F, [BATCH, INP]))
    feeds = cells.feeds()
    feeds.update({name: feeds["x"][:, t] for t, name in enumerate(i.name for i in model.graph.input[3:])})
    del feeds["x"]
    model.graph.input.remove(model.graph.input[0])
    out, result = _fuse(model, feeds)
    assert result.stats["fused"] == 1 and op_histogram(out)["Concat"] == 1


def test_intermediate_hidden_state_read_elsewhere_is_sliced_from_y(rng):
    cells = Cells(rng, steps=3)
    model = cells.model()
    h_mid = next(n for n in model.graph.node if n.op_type == "Concat" and "hs" in n.output).input[1]
    mid = next(n for n in model.graph.node if h_mid in n.output).input[0]  # h_1, before its Unsqueeze
    model.graph.node.append(helper.make_node("Relu", [mid], ["h1_relu"]))
    model.graph.output.append(_info("h1_relu", BATCH, HID))
    out, result = _fuse(model, cells.feeds())
    assert result.stats == {"fused": 1, "fused_cells": 3}
    assert op_histogram(out)["Gather"] == 1  # Y[1]


def test_intermediate_cell_state_read_elsewhere_cuts_the_chain(rng):
    cells = Cells(rng, steps=4)
    model = cells.model()
    c_mid = [n for n in model.graph.node if n.op_type == "Add" and any(
        m.op_type == "Tanh" and m.input[0] == n.output[0] for m in model.graph.node)][1].output[0]  # c_1
    model.graph.output.append(_info(c_mid, BATCH, HID))
    out, result = _fuse(model, cells.feeds())
    assert result.stats == {"fused": 2, "fused_cells": 4}  # steps 0-1 and 2-3: an LSTM exposes only its last c
    assert op_histogram(out)["LSTM"] == 2


def test_weights_that_change_between_steps_give_one_lstm_per_run(rng):
    cells = Cells(rng, steps=3, untied=True)  # step 1 has different weights
    _, result = _fuse(cells.model(), cells.feeds())
    assert result.stats == {"fused": 3, "fused_cells": 3}


def test_step_input_fed_back_from_the_previous_output_is_not_stacked(rng):
    # x_{t+1} = h_t @ P (autoregressive): stacking the inputs up front would make a cycle
    cells = Cells(rng, steps=3)
    h, c = cells.initial_states()
    x_t = cells.node("Gather", ["x", cells.const(np.array(0, np.int64), "t")], axis=1)
    proj = cells.const((rng.standard_normal((HID, INP)) * 0.5).astype(np.float32), "p")
    for t in range(3):
        last = t == 2
        h, c = cells.cell(x_t, h, c, t, "h_n" if last else None, "c_n" if last else None)
        x_t = cells.node("MatMul", [h, proj])
    model = make_model(cells.nodes, [helper.make_tensor_value_info(n, F, s) for n, s in
                                     (("x", [BATCH, 3, INP]), ("h0", [BATCH, HID]), ("c0", [BATCH, HID]))],
                       [_info(n, BATCH, HID) for n in ("h_n", "c_n")], cells.inits)
    _, result = _fuse(model, cells.feeds())
    assert result.stats == {"fused": 3, "fused_cells": 3}


def test_skips_lstm_with_peepholes(rng):
    cells = Cells(rng, peephole=True)
    model = cells.model()
    out, result = run_pass(FuseLstmGatesPass(), model)
    assert not result.modified
    assert result.stats == {"skipped_peephole": 3}
    assert op_histogram(out) == op_histogram(model)


def test_skips_nonstandard_activation(rng):
    cells = Cells(rng, g_act="Relu")
    _, result = run_pass(FuseLstmGatesPass(), cells.model())
    assert not result.modified and result.stats == {"skipped_nonstandard_activation": 3}


def test_skips_cell_whose_gate_activation_is_read_elsewhere(rng):
    cells = Cells(rng, steps=1)
    model = cells.model()
    sig = next(n for n in model.graph.node if n.op_type == "Sigmoid")
    model.graph.output.append(_info(sig.output[0], BATCH, HID))
    _, result = run_pass(FuseLstmGatesPass(), model)
    assert not result.modified and result.stats == {"skipped_intermediate_used": 1}


def test_leaves_graphs_without_cells_alone(rng):
    model = make_model([helper.make_node("Mul", ["a", "b"], ["m"]), helper.make_node("Sigmoid", ["m"], ["y"])],
                       [helper.make_tensor_value_info(n, F, [2, 3]) for n in "ab"],
                       [helper.make_tensor_value_info("y", F, [2, 3])])
    _, result = run_pass(FuseLstmGatesPass(), model)
    assert not result.modified and result.stats == {}


# -- Scan / Loop bodies ----------------------------------------------------------------------

def _body_cell(rng, x_name):
    """The body nodes of a cell (split layout), reading W/R/B from the outer scope."""
    nodes = [
        helper.make_node("MatMul", [x_name, "W_x"], ["xg"]),
        helper.make_node("MatMul", ["h_prev", "W_h"], ["hg"]),
        helper.make_node("Add", ["xg", "hg"], ["z0"]),
        helper.make_node("Add", ["z0", "B"], ["z"]),
        helper.make_node("Split", ["z", "sizes"], ["pi", "pf", "pg", "po"], axis=1),
        helper.make_node("Sigmoid", ["pi"], ["i"]), helper.make_node("Sigmoid", ["pf"], ["f"]),
        helper.make_node("Tanh", ["pg"], ["gg"]), helper.make_node("Sigmoid", ["po"], ["o"]),
        helper.make_node("Mul", ["f", "c_prev"], ["fc"]), helper.make_node("Mul", ["i", "gg"], ["ig"]),
        helper.make_node("Add", ["fc", "ig"], ["c_next"]), helper.make_node("Tanh", ["c_next"], ["tc"]),
        helper.make_node("Mul", ["o", "tc"], ["h_next"]), helper.make_node("Identity", ["h_next"], ["h_t"]),
    ]
    inits = {"W_x": (rng.standard_normal((INP, 4 * HID)) * 0.5).astype(np.float32),
             "W_h": (rng.standard_normal((HID, 4 * HID)) * 0.5).astype(np.float32),
             "B": (rng.standard_normal(4 * HID) * 0.5).astype(np.float32), "sizes": np.full(4, HID, np.int64)}
    return nodes, inits


def _state_infos(*names):
    return [helper.make_tensor_value_info(n, F, ["batch", HID]) for n in names]


def _scan_model(rng, reverse=False):
    nodes, inits = _body_cell(rng, "x_t")
    body = helper.make_graph(nodes, "cell", [*_state_infos("h_prev", "c_prev"),
                                             helper.make_tensor_value_info("x_t", F, ["batch", INP])],
                             _state_infos("h_next", "c_next", "h_t"))
    scan = helper.make_node("Scan", ["h0", "c0", "x"], ["h_n", "c_n", "hs"], body=body, num_scan_inputs=1,
                            scan_input_axes=[1], scan_output_axes=[1],
                            **({"scan_input_directions": [1]} if reverse else {}))
    return make_model([scan], [helper.make_tensor_value_info("x", F, ["batch", "time", INP]), *_state_infos("h0", "c0")],
                      [helper.make_tensor_value_info("hs", F, ["batch", "time", HID]), *_state_infos("h_n", "c_n")], inits)


def _scan_feeds(rng, steps=6):
    return {"x": rng.standard_normal((BATCH, steps, INP)).astype(np.float32),
            "h0": rng.standard_normal((BATCH, HID)).astype(np.float32) * 0.5,
            "c0": rng.standard_normal((BATCH, HID)).astype(np.float32)}


def test_fuses_scan_whose_body_is_a_cell(rng):
    model = _scan_model(rng)
    out, result = _fuse(model, _scan_feeds(rng))
    assert result.stats == {"fused": 1, "fused_cells": 1, "fused_loops": 1}
    assert "Scan" not in op_histogram(out) and op_histogram(out)["LSTM"] == 1


def test_skips_reverse_scan(rng):
    _, result = run_pass(FuseLstmGatesPass(), _scan_model(rng, reverse=True))
    assert not result.modified and result.stats == {"skipped_loop_direction": 1}


def test_fuses_loop_whose_body_indexes_the_sequence(rng):
    nodes, inits = _body_cell(rng, "x_t")
    nodes.insert(0, helper.make_node("Gather", ["x", "iter"], ["x_t"], axis=1))
    nodes.append(helper.make_node("Identity", ["cond_in"], ["cond_out"]))
    body = helper.make_graph(
        nodes, "cell",
        [helper.make_tensor_value_info("iter", TensorProto.INT64, []), helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
         *_state_infos("h_prev", "c_prev")],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []), *_state_infos("h_next", "c_next", "h_t")])
    loop = helper.make_node("Loop", ["trips", "", "h0", "c0"], ["h_n", "c_n", "hs"], body=body)
    model = make_model([loop], [helper.make_tensor_value_info("x", F, ["batch", "time", INP]),
                                helper.make_tensor_value_info("trips", TensorProto.INT64, []), *_state_infos("h0", "c0")],
                       [helper.make_tensor_value_info("hs", F, ["batch", "time", HID]), *_state_infos("h_n", "c_n")], inits)
    feeds = {**_scan_feeds(rng, steps=6), "trips": np.array(4, np.int64)}  # the first 4 of 6 frames
    out, result = _fuse(model, feeds)
    assert result.stats == {"fused": 1, "fused_cells": 1, "fused_loops": 1}
    assert "Loop" not in op_histogram(out)


# -- bundled models ----------------------------------------------------------------------------

def _fold_and_fuse(path):
    model = g.convert_opset(g.load(path))
    graph = g.import_graph(model)
    ctx = PassContext(options=CompileOptions())
    Pipeline([FoldConstantsPass(), FuseLstmGatesPass()], audit=True, like=model).run(graph, ctx)
    out = g.export_model(graph, like=model)
    g.check(out)
    return model, out, ctx.records[-1].stats


@pytest.mark.parametrize("name, min_ratio", [("lstm_unrolled", 5), ("lstm_unrolled_concat", 5),
                                             ("lstm_scan", 2)])  # Scan: 17 nodes (with body) -> 8, see README
def test_bundled_decomposed_lstms_fuse_to_one_lstm(bundled, name, min_ratio):
    path = bundled(name)
    model, out, stats = _fold_and_fuse(path)
    assert stats["fused"] == 1 and op_histogram(out)["LSTM"] == 1
    assert not {"Sigmoid", "Split", "Slice", "Scan", "MatMul", "Gemm"} & set(op_histogram(out))
    before, after = sum(op_histogram(model).values()), sum(op_histogram(out).values())
    assert before >= min_ratio * after, f"{before} -> {after} nodes"
    feeds = dict(np.load(path.with_suffix(".npz")))
    torch_ref = dict(np.load(path.with_name(f"{name}.ref.npz")))
    original, fused_ort, fused_interp = run_ort(model, feeds), run_ort(out, feeds), run_interp(out, feeds)
    for key, want in original.items():
        np.testing.assert_allclose(fused_ort[key], want, rtol=1e-5, atol=1e-5, err_msg=f"{key}: ORT original vs fused")
        np.testing.assert_allclose(fused_interp[key], fused_ort[key], rtol=1e-5, atol=1e-5, err_msg=f"{key}: interp vs ORT")
        np.testing.assert_allclose(fused_ort[key], torch_ref[key], rtol=1e-5, atol=1e-5, err_msg=f"{key}: vs torch")


def test_cli_runs_the_fusion_alone(bundled, tmp_path):
    from q4c.cli import main

    out = tmp_path / "fused.onnx"
    result = CliRunner().invoke(main, ["compile", str(bundled("lstm_scan")), "-o", str(out),
                                       "--passes", "fold-constants,fuse-lstm-gates", "--json"])
    assert result.exit_code == 0, result.output
    fused = g.load(out)
    assert op_histogram(fused) == {"LSTM": 1, "Squeeze": 3, "Transpose": 2, "Unsqueeze": 2}  # no quantization
    assert {t.data_type for t in fused.graph.initializer} == {TensorProto.FLOAT, TensorProto.INT64}  # axes, perms


# -- GRU cells ---------------------------------------------------------------------------------

def numpy_gru(x, w_ih, w_hh, b_ih, b_hh, h0, *, reset_after=True, flipped=False):
    """PyTorch's GRU (gates r, z, n); reset_after=False applies r to h before U_n; flipped
    writes h' = z * n + (1 - z) * h."""
    h, hs = h0, []
    for t in range(x.shape[1]):
        gi = x[:, t] @ w_ih.T + b_ih
        r = _sigmoid(gi[:, :HID] + h @ w_hh[:HID].T + b_hh[:HID])
        z = _sigmoid(gi[:, HID:2 * HID] + h @ w_hh[HID:2 * HID].T + b_hh[HID:2 * HID])
        if reset_after:
            n = np.tanh(gi[:, 2 * HID:] + r * (h @ w_hh[2 * HID:].T + b_hh[2 * HID:]))
        else:
            n = np.tanh(gi[:, 2 * HID:] + (r * h) @ w_hh[2 * HID:].T + b_hh[2 * HID:])
        h = z * n + (1 - z) * h if flipped else (1 - z) * n + z * h
        hs.append(h)
    return np.stack(hs, 1), h


class Grus(Cells):
    """A GRU unrolled as separate ops: gi = x W_ih^T + b_ih and gh = h W_hh^T + b_hh each Split
    into r, z, n (PyTorch's GRUCell); `update` is how h' is written."""

    def __init__(self, rng, *, update="torch", reset_after=True, **kwargs):
        super().__init__(rng, **kwargs)
        self.update, self.reset_after = update, reset_after
        self.w_ih = (rng.standard_normal((3 * HID, INP)) * 0.5).astype(np.float32)
        self.w_hh = (rng.standard_normal((3 * HID, HID)) * 0.5).astype(np.float32)
        self.b_ih = (rng.standard_normal(3 * HID) * 0.5).astype(np.float32)
        self.b_hh = (rng.standard_normal(3 * HID) * 0.5).astype(np.float32)

    def cell(self, x, h, c, t, h_name=None, c_name=None):
        gi = self.node("Add", [self.node("MatMul", [x, self.weight(self.w_ih.T, "w_x")]), self.const(self.b_ih, "b")])
        split = self.const([HID] * 3, "split")
        xr, xz, xn = self.node("Split", [gi, split], [self._name("piece") for _ in range(3)], axis=1)
        if self.reset_after:
            gh = self.node("Add", [self.node("MatMul", [h, self.weight(self.w_hh.T, "w_h")]), self.const(self.b_hh, "b")])
            hr, hz, hn = self.node("Split", [gh, split], [self._name("piece") for _ in range(3)], axis=1)
        else:
            gh = self.node("MatMul", [h, self.weight(self.w_hh[:2 * HID].T, "w_h")])
            gh = self.node("Add", [gh, self.const(self.b_hh[:2 * HID], "b")])
            hr, hz = self.node("Split", [gh, self.const([HID] * 2, "split")], [self._name("piece") for _ in range(2)], axis=1)
        r = self.node("Sigmoid", [self.node("Add", [xr, hr])])
        z = self.node("Sigmoid", [self.node("Add", [xz, hz])])
        if self.reset_after:
            n = self.node("Tanh", [self.node("Add", [xn, self.node("Mul", [r, hn])])])
        else:
            rh = self.node("MatMul", [self.node("Mul", [r, h]), self.weight(self.w_hh[2 * HID:].T, "w_n")])
            n = self.node("Tanh", [self.node("Add", [self.node("Add", [xn, rh]), self.const(self.b_hh[2 * HID:], "b")])])
        out = [h_name] if h_name else None
        if self.update == "torch":  # (1 - z) * n + z * h
            one_minus = self.node("Sub", [self.const(np.ones(1, np.float32), "one"), z])
            h_new = self.node("Add", [self.node("Mul", [one_minus, n]), self.node("Mul", [z, h])], out)
        elif self.update == "difference":  # n + z * (h - n)
            h_new = self.node("Add", [n, self.node("Mul", [z, self.node("Sub", [h, n])])], out)
        else:  # flipped: z * n + (1 - z) * h
            one_minus = self.node("Sub", [self.const(np.ones(1, np.float32), "one"), z])
            h_new = self.node("Add", [self.node("Mul", [h, one_minus]), self.node("Mul", [n, z])], out)
        return h_new, None

    def model(self, stack=True):
        h, _ = self.initial_states()
        hs = []
        for t in range(self.steps):
            x_t = self.node("Gather", ["x", self.const(np.array(t, np.int64), "t")], axis=1)
            h, _ = self.cell(x_t, h, None, t, "h_n" if t == self.steps - 1 else None)
            hs.append(h)
        self.node("Concat", [self.node("Unsqueeze", [h_t, self.const([1], "ax")]) for h_t in hs], ["hs"], axis=1)
        inputs = [helper.make_tensor_value_info("x", F, [BATCH, self.steps, INP])]
        if self.states == "inputs":
            inputs.append(_info("h0", BATCH, HID))
        return make_model(self.nodes, inputs, [_info("hs", BATCH, self.steps, HID), _info("h_n", BATCH, HID)], self.inits)

    def feeds(self):
        feeds = super().feeds()
        feeds.pop("c0", None)
        return feeds


@pytest.mark.parametrize("update", ["torch", "difference", "flipped"])
@pytest.mark.parametrize("reset_after", [True, False])
def test_fuses_unrolled_gru_into_one_gru(rng, update, reset_after):
    grus = Grus(rng, update=update, reset_after=reset_after, steps=4)
    feeds = grus.feeds()
    out, result = _fuse(grus.model(), feeds)
    assert result.stats == {"fused": 1, "fused_cells": 4, "fused_gru": 1}
    hist = op_histogram(out)
    assert hist["GRU"] == 1 and "Sigmoid" not in hist and "MatMul" not in hist
    gru = next(n for n in out.graph.node if n.op_type == "GRU")
    assert helper.get_attribute_value(next(a for a in gru.attribute if a.name == "linear_before_reset")) == int(reset_after)
    hs, h_n = numpy_gru(feeds["x"], grus.w_ih, grus.w_hh, grus.b_ih, grus.b_hh, feeds["h0"],
                        reset_after=reset_after, flipped=update == "flipped")
    got = run_ort(out, feeds)
    np.testing.assert_allclose(got["hs"], hs, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got["h_n"], h_n, rtol=1e-5, atol=1e-5)


def test_skips_gru_with_nonstandard_candidate_activation(rng):
    grus = Grus(rng, steps=2)
    model = grus.model()
    for node in model.graph.node:
        if node.op_type == "Tanh":
            node.op_type = "Relu"
    _, result = run_pass(FuseLstmGatesPass(), model)
    assert not result.modified and result.stats == {"skipped_nonstandard_activation": 2}


def test_fuses_gru_with_zero_initial_state(rng):
    grus = Grus(rng, states="zeros", steps=3)
    out, result = _fuse(grus.model(), grus.feeds())
    assert result.stats["fused_gru"] == 1
    assert len(next(n for n in out.graph.node if n.op_type == "GRU").input) == 4  # no initial_h


def test_fuses_scan_whose_body_is_a_gru_cell(rng):
    grus = Grus(rng, steps=1)
    x_t, h = "x_t", "h_prev"
    grus.cell(x_t, h, None, 0, "h_next")
    body_nodes = [*grus.nodes, helper.make_node("Identity", ["h_next"], ["h_t"])]
    body = helper.make_graph(body_nodes, "gru", [_state_infos("h_prev")[0], helper.make_tensor_value_info("x_t", F, ["batch", INP])],
                             _state_infos("h_next", "h_t"))
    scan = helper.make_node("Scan", ["h0", "x"], ["h_n", "hs"], body=body, num_scan_inputs=1, scan_input_axes=[1],
                            scan_output_axes=[1])
    model = make_model([scan], [helper.make_tensor_value_info("x", F, ["batch", "time", INP]), *_state_infos("h0")],
                       [helper.make_tensor_value_info("hs", F, ["batch", "time", HID]), *_state_infos("h_n")], grus.inits)
    feeds = _scan_feeds(rng)
    del feeds["c0"]
    out, result = _fuse(model, feeds)
    assert result.stats == {"fused": 1, "fused_cells": 1, "fused_gru": 1, "fused_loops": 1}
    assert "Scan" not in op_histogram(out)
