"""The cost cache: keyed by machine and ONNX Runtime version, shape, form and bits."""

from __future__ import annotations

import onnxruntime
import pytest

from q4c.latency import costs as costs_mod
from q4c.latency.costs import CostCache, costs, machine_key
from q4c.latency.forms import Form, LayerKind, LayerShape
from q4c.quant.plan import FLOAT

SHAPE = LayerShape(LayerKind.MATMUL, k=64, n=32, rows=4)


@pytest.fixture
def fake_timer(monkeypatch):
    """measure_shape replaced by a counter: seconds = 1e-6 x (1 + variant index)."""
    calls = []

    def fake(shape, variants):
        variants = list(variants)
        calls.append((shape, variants))
        return {v: (1e-6 * (1 + i), 5) for i, v in enumerate(variants)}

    monkeypatch.setattr(costs_mod, "measure_shape", fake)
    return calls


def test_second_lookup_reads_the_cache(tmp_path, fake_timer):
    first = costs({SHAPE: [(Form.NBITS_ACC4, 4)]}, CostCache.open(tmp_path))
    second = costs({SHAPE: [(Form.NBITS_ACC4, 4)]}, CostCache.open(tmp_path))
    assert len(fake_timer) == 1
    assert (first.measured, second.measured, second.cached) == (2, 0, 2)  # FP32 is always timed beside
    assert second.cost(SHAPE, Form.NBITS_ACC4, 4) == first.cost(SHAPE, Form.NBITS_ACC4, 4)
    # FP32-at-load costs the FP32 op whatever bits the file stores
    assert second.cost(SHAPE, Form.FP32_AT_LOAD, 4) == second.cost(SHAPE, Form.FP32_AT_LOAD, FLOAT)
    assert second.report()["cache_key"] == machine_key() and second.report()["oldest_entry_age_s"] >= 0


def test_cache_invalidated_when_onnxruntime_version_changes(tmp_path, fake_timer, monkeypatch):
    costs({SHAPE: [(Form.NBITS_ACC4, 4)]}, CostCache.open(tmp_path))
    old_key = machine_key()
    monkeypatch.setattr(onnxruntime, "__version__", onnxruntime.__version__ + ".post-test")
    assert machine_key() != old_key
    table = costs({SHAPE: [(Form.NBITS_ACC4, 4)]}, CostCache.open(tmp_path))
    assert len(fake_timer) == 2 and table.measured == 2 and table.cached == 0
    assert table.cache_key != old_key and len(list(tmp_path.glob("*.json"))) == 2


def test_new_form_for_a_cached_shape_is_measured(tmp_path, fake_timer):
    costs({SHAPE: [(Form.NBITS_ACC4, 4)]}, CostCache.open(tmp_path))
    table = costs({SHAPE: [(Form.NBITS_ACC4, 4), (Form.INT8_DYNAMIC, 8)]}, CostCache.open(tmp_path))
    assert len(fake_timer) == 2 and table.measured == 3


def test_unreadable_cache_file_is_measured_afresh(tmp_path, fake_timer):
    (tmp_path / f"{machine_key()}.json").write_text("{not json")
    table = costs({SHAPE: [(Form.NBITS_ACC4, 4)]}, CostCache.open(tmp_path))
    assert table.measured == 2 and len(fake_timer) == 1


def test_measured_int8_dynamic_beats_float_compute_nbits_on_many_rows():
    # ORT-NOTES: at M >= 16 the INT8 dynamic kernel is 0.14-0.33x FP32 and MatMulNBits at
    # accuracy level 0 1.0-1.8x (measured here 2.8x apart); a 2x margin survives a loaded machine
    shape = LayerShape(LayerKind.MATMUL, k=256, n=512, rows=64)
    measured = costs_mod.measure_shape(shape, [(Form.INT8_DYNAMIC, 8), (Form.NBITS_ACC0, 4)])
    assert measured[(Form.INT8_DYNAMIC, 8)][0] * 2 < measured[(Form.NBITS_ACC0, 4)][0]
