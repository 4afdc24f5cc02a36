"""The calibrate pass: an analysis that fills ctx.calibration and never edits the graph."""

from __future__ import annotations

import numpy as np
import pytest

from q4c.config import CompileOptions
from q4c.passes.calibrate import CalibratePass
from q4c.pipeline import PassContext
from q4c.testing import matmul_model, run_pass


def _ctx(samples, **options) -> PassContext:
    return PassContext(options=CompileOptions(**options), samples=samples)


def test_calibrate_fills_the_table_and_leaves_the_graph_alone(rng):
    model = matmul_model(rng)
    samples = [{"x": rng.standard_normal((4, 64)).astype(np.float32)} for _ in range(4)]
    ctx = _ctx(samples, observer="mse")
    progress = []
    ctx.sample_progress = lambda done, total: progress.append((done, total))
    out, result = run_pass(CalibratePass(), model, ctx=ctx)  # audited: modified=False must be true
    assert not result.modified and result.stats == {"tensors": 2, "samples": 4}
    assert out.graph == model.graph
    table = ctx.calibration
    assert table.observer == "mse" and set(table.tensors) == {"x", "y"}
    assert table["x"].min == pytest.approx(min(float(s["x"].min()) for s in samples))
    assert progress[-1] == (4, 4)


def test_load_calib_replays_a_saved_table(rng, tmp_path):
    model = matmul_model(rng)
    ctx = _ctx([{"x": rng.standard_normal((4, 64)).astype(np.float32)}])
    run_pass(CalibratePass(), model, ctx=ctx)
    ctx.calibration.save(tmp_path / "t.json")
    replay = _ctx([], calib_table=tmp_path / "t.json", observer="entropy")
    _, result = run_pass(CalibratePass(), model, ctx=replay)
    assert result.stats == {"loaded": 2}
    assert replay.calibration == ctx.calibration
    assert any("'percentile' observer" in w for w in replay.warnings)  # the table's own observer rules
    other = matmul_model(np.random.default_rng(7), k=32)
    elsewhere = _ctx([], calib_table=tmp_path / "t.json")
    _, result = run_pass(CalibratePass(), other, ctx=elsewhere)
    assert result.stats == {"loaded": 2} and any("different graph" in w for w in elsewhere.warnings)


def test_without_samples_it_calibrates_on_a_synthetic_one_and_says_so(rng):
    ctx = _ctx([])
    run_pass(CalibratePass(), matmul_model(rng), ctx=ctx)
    assert ctx.calibration.samples == 1 and any("synthetic" in w for w in ctx.warnings)
