"""The plan guard judges whole plans on calibration samples nothing was fitted on
(q4c.quant.holdout): a codebook candidate whose GPTQ-style assignment overfits the samples it
was fitted on is rejected there."""

import numpy as np
import onnx
from onnx import TensorProto, helper

import q4c
from q4c.config import CODEBOOK_SCHEMES, CompileOptions
from q4c.testing import heavy_tailed, make_model, run_ort, sqnr_db


def _overfit_setup(rng, tmp_path):
    """z = x @ A. The first 8 calibration samples (the scores' and the assignment's) lie in a
    4-dimensional subspace of x; the other 8 and the test inputs span all 128 dimensions. Error
    compensation against the first 8 hides its error in the directions they never excite."""
    a = heavy_tailed(rng, (128, 64))
    model = make_model([helper.make_node("MatMul", ["x", "A"], ["z"])],
                       [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 128])],
                       [helper.make_tensor_value_info("z", TensorProto.FLOAT, ["n", 64])], {"A": a}, opset=25)
    onnx.save(model, tmp_path / "m.onnx")
    calib = tmp_path / "calib"
    calib.mkdir()
    basis = rng.standard_normal((4, 128))
    for i in range(16):
        x = rng.standard_normal((32, 4)) @ basis if i < 8 else rng.standard_normal((32, 128))
        np.savez(calib / f"{i:03d}.npz", x=x.astype(np.float32))
    return a, calib


def _sqnr(path, a, feeds):
    return sqnr_db(feeds["x"] @ a, run_ort(onnx.load(path), feeds)["z"])


def test_a_codebook_plan_that_overfits_its_fit_samples_is_rejected_on_unseen_ones(rng, tmp_path):
    a, calib = _overfit_setup(rng, tmp_path)
    fit = [dict(np.load(calib / f"{i:03d}.npz")) for i in range(8)]
    test = {"x": rng.standard_normal((256, 128)).astype(np.float32)}
    # The premise, measured with ONNX Runtime against numpy: the GPTQ-assigned codebook is far
    # better than plain 4-bit on the samples it was fitted on and worse on other inputs.
    q4c.compile_file(tmp_path / "m.onnx", tmp_path / "kmeans.onnx", CompileOptions(bits=4, scheme="kmeans"),
                     data=calib, verify=False)
    q4c.compile_file(tmp_path / "m.onnx", tmp_path / "sym.onnx", CompileOptions(bits=4), data=calib, verify=False)
    fit_kmeans = np.mean([_sqnr(tmp_path / "kmeans.onnx", a, f) for f in fit])
    fit_sym = np.mean([_sqnr(tmp_path / "sym.onnx", a, f) for f in fit])
    assert fit_kmeans > fit_sym + 5
    assert _sqnr(tmp_path / "kmeans.onnx", a, test) < _sqnr(tmp_path / "sym.onnx", a, test) - 1
    # The budgeted plan: the knapsack (scores on the fit samples) takes the codebook; the guard,
    # on samples 8..15, measures it worse and keeps a plan without codebooks.
    report = q4c.compile_file(tmp_path / "m.onnx", tmp_path / "out.onnx",
                              CompileOptions(schemes=("symmetric", "kmeans")), data=calib, verify=False)
    guard = report["sensitivity"]["measured"]["guard"]
    assert guard["unseen"] and guard["on"].startswith("calibration samples 8..15")
    assert guard["chosen"] != "mixed" and guard["damage"]["mixed"] > guard["damage"][guard["chosen"]]
    assert all(t["scheme"] not in CODEBOOK_SCHEMES for t in report["plan"]["tensors"].values())
    assert _sqnr(tmp_path / "out.onnx", a, test) > _sqnr(tmp_path / "kmeans.onnx", a, test) + 1
    assert any("measured worse" in w for w in report["warnings"])


def test_with_too_few_samples_the_guard_says_it_judged_on_the_fitted_ones(rng, tmp_path):
    _, calib = _overfit_setup(rng, tmp_path)
    for path in sorted(calib.glob("*.npz"))[4:]:
        path.unlink()
    report = q4c.compile_file(tmp_path / "m.onnx", tmp_path / "out.onnx", CompileOptions(), data=calib, verify=False)
    guard = report["sensitivity"]["measured"]["guard"]
    assert not guard["unseen"] and guard["on"].startswith("all 4 calibration sample(s)")
