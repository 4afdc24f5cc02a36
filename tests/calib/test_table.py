"""CalibrationTable: JSON round trip (--save-calib / --load-calib) and clear errors."""

from __future__ import annotations

import json

import numpy as np
import pytest

from q4c.calib.runner import collect
from q4c.calib.table import CALIB_SCHEMA, CalibrationTable, TensorStats
from q4c.errors import ConfigError
from q4c.testing import matmul_model


def test_round_trip_keeps_every_statistic(tmp_path, rng):
    model = matmul_model(rng)
    samples = [{"x": rng.standard_normal((4, 64)).astype(np.float32)} for _ in range(3)]
    table = collect(model, samples, observer="percentile")
    path = tmp_path / "calib.json"
    table.save(path)
    doc = json.loads(path.read_text())
    assert doc["schema"] == CALIB_SCHEMA and doc["observer"] == "percentile" and doc["samples"] == 3
    loaded = CalibrationTable.load(path)
    assert loaded == table
    assert loaded.qparams("y") == table.qparams("y")


def test_a_never_observed_tensor_saves_as_finite_json(tmp_path):
    table = CalibrationTable("minmax", {"t": TensorStats(float("inf"), float("-inf"), 0.0, 0.0, 0, 0.0, 0.0)})
    table.save(tmp_path / "t.json")
    assert CalibrationTable.load(tmp_path / "t.json")["t"].min == 0.0


def test_bad_tables_are_config_errors(tmp_path):
    path = tmp_path / "t.json"
    path.write_text(json.dumps({"schema": "q4c.plan/1"}))
    with pytest.raises(ConfigError, match="not a q4c calibration table"):
        CalibrationTable.load(path)
    entry = {"min": 0, "max": 1, "mean": 0, "std": 0, "count": 1, "lo": 1.0, "hi": 0.0}
    path.write_text(json.dumps({"schema": CALIB_SCHEMA, "observer": "minmax", "tensors": {"x": entry}}))
    with pytest.raises(ConfigError, match=r"tensor 'x': range \[1.0, 0.0\] is not a finite interval"):
        CalibrationTable.load(path)
    path.write_text(json.dumps({"schema": CALIB_SCHEMA, "observer": "minmax", "tensors": {"x": {"min": 0}}}))
    with pytest.raises(ConfigError, match="tensor 'x'"):
        CalibrationTable.load(path)
    path.write_text("{")
    with pytest.raises(ConfigError, match="cannot read calibration table"):
        CalibrationTable.load(path)
