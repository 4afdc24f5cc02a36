"""The rnnt_sys driver's 'aligned' output: the joiner's logits at every decision of the FP32
decode, teacher-forced, so its shape is fixed by the FP32 path whatever the graphs decode."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import onnxruntime as ort

SYSTEM = Path(__file__).resolve().parents[2] / "models" / "rnnt_sys"


def _driver():
    spec = importlib.util.spec_from_file_location("rnnt_sys_driver_test", SYSTEM / "driver.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _graphs() -> dict:
    graphs = {}
    for name in ("encoder", "predictor", "joiner"):
        sess = ort.InferenceSession(str(SYSTEM / f"{name}.onnx"), providers=["CPUExecutionProvider"])
        outs = [o.name for o in sess.get_outputs()]
        graphs[name] = lambda feeds, s=sess, o=outs: dict(zip(o, s.run(o, dict(feeds)), strict=True))
    return graphs


def test_aligned_rows_follow_the_fp32_decisions():
    driver = _driver()
    sample = next(driver.samples(1))
    graphs = _graphs()
    out = driver.run(graphs, sample)
    path = sample["path"]
    decisions = []  # by hand from the path: per frame its units, then a blank unless MAX_SYMBOLS were emitted
    for row in path:
        units = [int(k) for k in row if k >= 0]
        decisions += units + ([driver.BLANK] if len(units) < driver.MAX_SYMBOLS else [])
    assert out["aligned"].shape == (len(decisions), driver.N_UNITS)
    assert [int(k) for k in np.argmax(out["aligned"], axis=1)] == decisions  # FP32 graphs retrace the path
    assert [k for k in decisions if k != driver.BLANK] == out["tokens"].tolist()


def test_aligned_keeps_its_shape_when_the_graphs_decode_differently():
    driver = _driver()
    sample = next(driver.samples(1))
    graphs = _graphs()
    joiner = graphs["joiner"]

    def biased(feeds):  # favours blank: fewer units decoded, the aligned rows still follow the FP32 path
        logits = joiner(feeds)["logits"].copy()
        logits[:, driver.BLANK] += 3.0
        return {"logits": logits}

    fp32 = driver.run(graphs, sample)
    out = driver.run({**graphs, "joiner": biased}, sample)
    assert len(out["tokens"]) < len(fp32["tokens"])
    assert out["aligned"].shape == fp32["aligned"].shape
    np.testing.assert_allclose(out["aligned"][:, driver.BLANK] - 3.0, fp32["aligned"][:, driver.BLANK], atol=1e-4)
