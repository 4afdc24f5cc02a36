"""collect(): calibration of the bundled models over 32-sample directories with every observer,
state carried through stateful models, interpreter probes, and statistics checked against
ONNX Runtime run independently."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from q4c import graph as g
from q4c.calib.readers import SamplesReader, input_specs, open_reader, to_steps
from q4c.calib.runner import collect, float_tensors, materialize
from q4c.errors import DataError

MODELS = Path(__file__).resolve().parents[2] / "models"
BUNDLED = sorted(p.stem for p in MODELS.glob("*.onnx") if not p.name.endswith(".q4.onnx"))
OBSERVERS = ("minmax", "percentile", "entropy", "mse")


def _load(name: str) -> onnx.ModelProto:
    return g.convert_opset(g.load(MODELS / f"{name}.onnx"))


def _ort(model: onnx.ModelProto) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def _check_table(table, model, n_samples):
    names, _ = float_tensors(model)
    assert table.samples == n_samples
    assert set(names) <= set(table.tensors)
    for name, s in table.tensors.items():
        assert s.min <= s.lo <= s.hi <= s.max, name
        assert s.count > 0 or s.min == s.max, name
        scale, zp = s.qparams()
        assert scale > 0 and 0 <= zp <= 255


# Every bundled model with one observer each (rotating); all four on two of them below. The
# benchmark (benchmarks/bench_calib.py) times the full model x observer matrix.
@pytest.mark.parametrize("name", BUNDLED)
def test_bundled_model_calibrates_over_a_32_sample_directory(name, sample_dirs):
    model = _load(name)
    observer = OBSERVERS[BUNDLED.index(name) % len(OBSERVERS)]
    reader = open_reader(model, sample_dirs(name))
    table = collect(model, reader, observer=observer, probe_calls=1)
    assert table.observer == observer
    _check_table(table, model, 32)


@pytest.mark.parametrize("observer", OBSERVERS)
@pytest.mark.parametrize("name", ["conformer", "rnnt_predictor"])
def test_each_observer_on_a_32_sample_directory(name, observer, sample_dirs):
    model = _load(name)
    table = collect(model, open_reader(model, sample_dirs(name)), observer=observer, probe_calls=1)
    _check_table(table, model, 32)
    if observer == "minmax":  # min/max of the graph output, independently from ORT
        session = _ort(model)
        out = model.graph.output[0].name
        values = [session.run([out], s)[0] for s in materialize(model, open_reader(model, sample_dirs(name)))]
        assert table[out].min == pytest.approx(min(float(v.min()) for v in values), rel=1e-6)
        assert table[out].max == pytest.approx(max(float(v.max()) for v in values), rel=1e-6)


def test_stateful_model_is_calibrated_with_its_state_carried(sample_dirs):
    model = _load("rnnt_predictor")
    reader = open_reader(model, sample_dirs("rnnt_predictor"))
    carried = collect(model, reader, observer="minmax", probes=False)
    assert carried.state_pairs == {"h_out": "h_in", "c_out": "c_in"}
    assert carried["h_in"].state and carried.calls > carried.samples  # sequences of several calls
    # the same calls, each from a zero state
    specs = input_specs(model)
    zero_calls = [step for sample in reader for step in to_steps(
        {"tokens": sample["tokens"]}, specs, {"h_in", "c_in"})]
    zero = collect(model, zero_calls, observer="minmax", state_pairs={}, probes=False)
    assert zero["h_in"].min == zero["h_in"].max == 0.0
    assert carried["h_in"].max - carried["h_in"].min > 0.1
    assert carried.range("c_in") != zero.range("c_in")

    # independently: run the sequences by hand, feeding h_out/c_out back
    session = _ort(model)
    lows, highs = [], []
    for sample in reader:
        h = sample.get("h_in", np.zeros((1, 1, 128), np.float32))
        c = sample.get("c_in", np.zeros((1, 1, 128), np.float32))
        for t in range(sample["tokens"].shape[1]):
            lows.append(float(h.min()))
            highs.append(float(h.max()))
            _, h, c = session.run(["pred", "h_out", "c_out"], {"tokens": sample["tokens"][:, t:t + 1], "h_in": h, "c_in": c})
    assert carried["h_in"].min == pytest.approx(min(lows)) and carried["h_in"].max == pytest.approx(max(highs))
    assert carried.calls == len(lows)


def test_streaming_chunks_carry_state(sample_dirs):
    """lstm_unrolled_concat takes fixed 16-frame chunks: a 32-frame sample is two calls."""
    model = _load("lstm_unrolled_concat")
    table = collect(model, open_reader(model, sample_dirs("lstm_unrolled_concat")), tensors=["h0", "c0"])
    assert table.calls == 2 * table.samples and table["h0"].max > 0
    calls = materialize(model, open_reader(model, sample_dirs("lstm_unrolled_concat")))
    session = _ort(model)
    h_n, c_n = session.run(["h_n", "c_n"], calls[0])
    np.testing.assert_array_equal(calls[1]["h0"], h_n)  # call 2 starts where call 1 ended
    np.testing.assert_array_equal(calls[1]["c0"], c_n)


def test_a_reader_yielding_sequences(rng):
    model = _load("lstm_scan")
    chunks = [{"features": rng.standard_normal((1, 10, 80)).astype(np.float32),
               "h0": np.zeros((1, 128), np.float32), "c0": np.zeros((1, 128), np.float32)} for _ in range(3)]
    chunks[1:] = [{"features": c["features"]} for c in chunks[1:]]  # later calls get the carried state
    table = collect(model, [chunks], observer="minmax")
    assert (table.samples, table.calls) == (1, 3)
    assert table["h0"].max > 0  # carried, not zero
    with pytest.raises(DataError, match=r"sample 0\[1\]: missing input\(s\) features"):
        collect(model, [[chunks[0], {"h0": chunks[0]["h0"]}]])


def test_interpreter_probes_observe_lstm_gates_and_cell_state(sample_dirs):
    model = _load("bilstm_am")
    table = collect(model, open_reader(model, sample_dirs("bilstm_am")), observer="minmax", probe_calls=2)
    probes = {k: v for k, v in table.tensors.items() if v.source == "probe"}
    lstm = next(n.name for n in model.graph.node if n.op_type == "LSTM")
    assert {f"{lstm}::{w}" for w in ("i", "o", "f", "c_tilde", "c", "h")} <= set(probes)
    for gate in ("i", "o", "f"):
        assert 0.0 <= probes[f"{lstm}::{gate}"].min <= probes[f"{lstm}::{gate}"].max <= 1.0
    # h = o * tanh(c): the probe's range matches the LSTM's Y output range over the same calls
    assert probes[f"{lstm}::c"].max > probes[f"{lstm}::h"].max - 1e-6


def test_only_the_asked_tensors_are_observed(sample_dirs):
    model = _load("conformer")
    names, _ = float_tensors(model)
    table = collect(model, SamplesReader([dict(np.load(MODELS / "conformer.npz"))]), tensors=names[:3])
    assert set(table.tensors) == set(names[:3])
    with pytest.raises(DataError, match="cannot observe nope"):
        collect(model, [dict(np.load(MODELS / "conformer.npz"))], tensors=["nope"])


def test_progress_reports_every_sample(sample_dirs):
    model = _load("rnnt_joiner")
    seen = []
    collect(model, open_reader(model, sample_dirs("rnnt_joiner")), progress=lambda d, t: seen.append((d, t)))
    assert seen == [(i, 32) for i in range(1, 33)]


def test_no_samples_is_an_error():
    with pytest.raises(DataError, match="yielded nothing"):
        collect(_load("rnnt_joiner"), [])
