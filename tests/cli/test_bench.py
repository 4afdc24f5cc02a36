"""`q4c bench`: q4c.bench/1 keys, the interleaved ratio, RTF, peak memory, and streaming with state."""

import json
import math

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from q4c import ort as q4ort
from q4c.bench import audio_seconds, chunk_feeds, run_stream, state_pairs, streamed_inputs
from q4c.cli import main

MODEL_KEYS = {"path", "p50_ms", "p90_ms", "mean_ms", "min_ms", "cpu_p50_ms", "rtf", "session_config", "peak_rss_bytes",
              "rss_growth_bytes"}
TOP_KEYS = {"schema", "threads", "iters", "warmup", "chunk", "hop_ms", "samples", "model", "vs", "ratio", "data"}


@pytest.fixture
def runner():
    return CliRunner()


def _samples(bundled, name):
    return dict(np.load(bundled(name).with_suffix(".npz")))


def test_model_against_itself_has_a_finite_positive_ratio_and_memory(runner, bundled):
    path = str(bundled("lstm_scan"))
    result = runner.invoke(main, ["bench", path, "--vs", path, "--data", str(bundled("lstm_scan").with_suffix(".npz")),
                                  "--iters", "6", "--warmup", "1", "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert set(doc) == TOP_KEYS and doc["schema"] == "q4c.bench/1" and doc["threads"] == 1
    assert set(doc["model"]) == MODEL_KEYS and set(doc["vs"]) == MODEL_KEYS
    for subject in (doc["model"], doc["vs"]):
        assert 0 < subject["min_ms"] <= subject["p50_ms"] <= subject["p90_ms"]
        assert subject["peak_rss_bytes"] > subject["rss_growth_bytes"] > 0
    assert set(doc["ratio"]) == {"p50", "p90", "pairs", "cpu_p50"} and doc["ratio"]["pairs"] == 6
    assert math.isfinite(doc["ratio"]["p50"]) and doc["ratio"]["p50"] > 0
    assert math.isfinite(doc["ratio"]["cpu_p50"]) and doc["ratio"]["cpu_p50"] > 0
    assert doc["model"]["rtf"] > 0  # features [1, 40, 80]: 0.4 s of audio
    assert doc["data"].endswith("lstm_scan.npz")


def test_rtf_is_latency_over_audio_seconds(runner, bundled):
    result = runner.invoke(main, ["bench", str(bundled("bilstm_am")), "--data", str(bundled("bilstm_am").with_suffix(".npz")),
                                  "--iters", "3", "--warmup", "0", "--no-memory", "--json", "--hop-ms", "20"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    audio = 160 * 0.020  # [1, 160, 80] features at a 20 ms hop
    assert doc["model"]["rtf"] == pytest.approx(doc["model"]["p50_ms"] / 1000 / audio, rel=1e-3)
    assert doc["vs"] is None and doc["ratio"] is None and doc["model"]["peak_rss_bytes"] is None


def test_audio_seconds_counts_batch_and_frames(bundled):
    model = onnx.load(bundled("bilstm_am"))
    assert audio_seconds(model, {"features": np.zeros((2, 50, 80), np.float32)}, 10.0) == pytest.approx(1.0)
    assert audio_seconds(model, {"features": np.zeros((2, 50, 80), np.float32)}, 0) is None
    assert audio_seconds(onnx.load(bundled("lstm_lm")), {"tokens": np.zeros((1, 5), np.int64)}, 10.0) is None


def test_state_pairs_by_name_and_by_shape(bundled):
    assert state_pairs(onnx.load(bundled("rnnt_predictor"))) == {"h_in": "h_out", "c_in": "c_out"}
    assert state_pairs(onnx.load(bundled("lstm_scan"))) == {"h0": "h_n", "c0": "c_n"}
    assert state_pairs(onnx.load(bundled("bilstm_am"))) == {}
    # [batch, time, 80] -> [batch, time, 40] is data, not state, even though nothing else pairs
    assert [s.name for s in streamed_inputs(onnx.load(bundled("bilstm_am")), {})] == ["features"]


def test_chunked_predictor_carries_state_like_feeding_it_by_hand(bundled):
    model = onnx.load(bundled("rnnt_predictor"))
    sample = _samples(bundled, "rnnt_predictor")
    tokens = np.random.default_rng(0).integers(1, 501, (1, 9)).astype(np.int64)
    session = q4ort.make_session(model, threads=1)
    pairs = state_pairs(model)
    chunks = chunk_feeds({**sample, "tokens": tokens}, streamed_inputs(model, pairs), 1)
    result = run_stream(lambda f: q4ort.run(session, f), chunks, pairs)
    assert len(result.outputs) == 9 and len(result.seconds) == 9
    h, c = sample["h_in"], sample["c_in"]
    for t in range(9):  # the loop a user writes: one token per call, states fed back
        out = q4ort.run(session, {"tokens": tokens[:, t:t + 1], "h_in": h, "c_in": c})
        np.testing.assert_array_equal(result.outputs[t]["pred"], out["pred"])
        h, c = out["h_out"], out["c_out"]
    np.testing.assert_array_equal(result.final_state["h_out"], h)
    np.testing.assert_array_equal(result.final_state["c_out"], c)
    assert not np.allclose(h, sample["h_in"])


def test_chunked_scan_lstm_equals_one_full_length_run(bundled):
    """Chunks of 8 with state carried must compute what one call over all 40 frames computes."""
    model = onnx.load(bundled("lstm_scan"))
    sample = _samples(bundled, "lstm_scan")
    session = q4ort.make_session(model, threads=1)
    pairs = state_pairs(model)
    chunks = chunk_feeds(sample, streamed_inputs(model, pairs), 16)  # 16 + 16 + 8
    assert [c["features"].shape[1] for c in chunks] == [16, 16, 8]
    result = run_stream(lambda f: q4ort.run(session, f), chunks, pairs)
    full = q4ort.run(session, sample)
    np.testing.assert_allclose(np.concatenate([o["hs"] for o in result.outputs], axis=1), full["hs"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(result.final_state["h_n"], full["h_n"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(result.final_state["c_n"], full["c_n"], rtol=1e-5, atol=1e-6)


def test_cli_chunk_mode_streams_a_long_token_sequence(runner, bundled, tmp_path):
    sample = _samples(bundled, "rnnt_predictor")
    sample["tokens"] = np.arange(1, 13, dtype=np.int64)[None]  # 12 tokens; the model takes 1 per call
    data = tmp_path / "long.npz"
    np.savez(data, **sample)
    result = runner.invoke(main, ["bench", str(bundled("rnnt_predictor")), "--data", str(data), "--chunk", "1",
                                  "--iters", "2", "--warmup", "1", "--no-memory", "--json"])
    assert result.exit_code == 0, result.output
    chunks = json.loads(result.stdout)["model"]["chunks"]
    assert chunks["calls"] == 24 and chunks["size"] == 1
    assert chunks["state_pairs"] == {"h_in": "h_out", "c_in": "c_out"}
    assert 0 < chunks["p50_ms"] <= chunks["p90_ms"]
    wrong = runner.invoke(main, ["bench", str(bundled("rnnt_predictor")), "--data", str(data), "--chunk", "4"])
    assert wrong.exit_code == 1 and "use --chunk 1" in wrong.stderr


def test_synthetic_inputs_are_announced_on_stderr(runner, bundled):
    result = runner.invoke(main, ["bench", str(bundled("lstm_scan")), "--iters", "2", "--warmup", "0", "--no-memory"])
    assert result.exit_code == 0, result.output
    assert "synthetic" in result.stderr and "features [1, 100, 80]" in result.stderr
    assert "p50 ms/call" in result.stdout and "synthetic" not in result.stdout.splitlines()[1]


def test_vs_a_model_with_other_inputs_is_one_line_error(runner, bundled):
    result = runner.invoke(main, ["bench", str(bundled("lstm_scan")), "--vs", str(bundled("bilstm_am")), "--iters", "1"])
    assert result.exit_code == 1
    assert result.stderr.splitlines()[-1].startswith("Error: ") and "same inputs" in result.stderr
