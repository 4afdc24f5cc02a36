"""A weight no calibration sample runs (an If branch never taken) keeps the default 4-bit width,
with a warning naming it, instead of the knapsack's free 2 bits (q4c.quant.unmeasured)."""

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper

from q4c.cli import main
from q4c.metrics import sqnr_db
from q4c.testing import heavy_tailed, make_model

N = 64


def _if_model(tmp_path):
    """h = x @ A; y = h @ T if cond else h @ E @ F (T, E, F main-graph weights read from the
    branches)."""
    rng = np.random.default_rng(0)
    weights = {name: heavy_tailed(rng, (N, N)) for name in ("A", "T", "E", "F")}

    def branch(*chain: str) -> onnx.GraphProto:
        names = ["h", *(f"{w}_out" for w in chain)]
        nodes = [helper.make_node("MatMul", [a, w], [b]) for a, w, b in zip(names, chain, names[1:])]
        return helper.make_graph(nodes, f"b{chain[0]}", [],
                                 [helper.make_tensor_value_info(names[-1], TensorProto.FLOAT, [8, N])])

    nodes = [helper.make_node("MatMul", ["x", "A"], ["h"]),
             helper.make_node("If", ["cond"], ["y"], then_branch=branch("T"), else_branch=branch("E", "F"))]
    model = make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [8, N]),
                               helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
                       [helper.make_tensor_value_info("y", TensorProto.FLOAT, [8, N])], weights)
    path = tmp_path / "if.onnx"
    path.write_bytes(model.SerializeToString())
    data = tmp_path / "calib"
    data.mkdir()
    for i in range(12):  # every calibration sample takes the then branch
        np.savez(data / f"s{i}.npz", x=rng.standard_normal((8, N)).astype(np.float32), cond=np.array(True))
    return path, data


def _compile(path, data, out):
    result = CliRunner().invoke(main, ["compile", str(path), "-o", str(out), "--calib", str(data), "--json",
                                       "--kernels", "fp32-at-load", "--schemes", "symmetric"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    return {t["name"]: t["bits"] for t in report["tensors"]}, report


def _else_sqnr(src, out):
    """SQNR of the compiled model's output on the branch calibration never ran (cond False)."""
    x = np.random.default_rng(1).standard_normal((8, N)).astype(np.float32)
    feeds = {"x": x, "cond": np.array(False)}
    ref = ort.InferenceSession(str(src), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    got = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    return sqnr_db(ref, got)


def test_unrun_branch_weight_keeps_4_bits_and_is_named_in_a_warning(tmp_path, monkeypatch):
    path, data = _if_model(tmp_path)
    bits, report = _compile(path, data, tmp_path / "pinned.onnx")
    assert bits["E"] == bits["F"] == 4
    warning = next(w for w in report["warnings"] if "default 4-bit width" in w)
    assert "E: no calibration sample runs it" in warning and "F: no calibration sample runs it" in warning
    assert "A:" not in warning and "T:" not in warning
    assert report["tensors"][[t["name"] for t in report["tensors"]].index("E")]["sensitivity"]  # it was scored: 0

    # what the knapsack did before: E "free" at its cheapest width, its bytes given to A and T
    import q4c.passes.assign_precision as ap

    monkeypatch.setattr(ap, "unmeasured", lambda table, names: {})
    free, _ = _compile(path, data, tmp_path / "free.onnx")
    assert free["E"] < 4 and free["F"] < 4 and max(free["A"], free["T"]) > 4
    # ONNX Runtime on the branch calibration never ran: the pinned plan is far better there
    assert _else_sqnr(path, tmp_path / "pinned.onnx") > _else_sqnr(path, tmp_path / "free.onnx") + 6


@pytest.mark.parametrize("scores, expected", [({"2": 0.0, "4": 0.0, "8": 0.0}, True),
                                              ({"2": 1e-9, "4": 0.0, "8": 0.0}, False)])
def test_only_all_zero_scores_count_as_unmeasured(scores, expected):
    from types import SimpleNamespace

    from q4c.quant.unmeasured import unmeasured

    cands = [SimpleNamespace(key=k, bits=int(k)) for k in scores]
    table = SimpleNamespace(runner=object(), measure="kl", fallbacks={}, scores={"w": scores},
                            candidates={"w": cands})
    assert ("w" in unmeasured(table, ["w"])) is expected
    assert unmeasured(SimpleNamespace(**{**vars(table), "measure": "mse"}), ["w"]) == {}
