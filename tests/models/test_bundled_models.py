"""The committed FP32 models under models/ load, pass the full checker and reproduce torch.

Every ``<name>.onnx`` with a ``<name>.ref.npz`` is checked: onnxruntime (no graph optimizations,
so its fusions cannot hide a broken graph) on ``<name>.npz`` must match the outputs torch
computed when the model was generated (models/make_models.py).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

MODELS = Path(__file__).resolve().parents[2] / "models"
EXPECTED = [
    "bilstm_am", "rnnt_encoder", "rnnt_predictor", "rnnt_joiner", "conformer", "lstm_lm",
    "transformer_lm", "gru_am", "lstm_unrolled", "lstm_unrolled_concat", "lstm_scan",
]  # fmt: skip
SIZE_LIMIT = 54 * 2**20  # what `du -sh models` shows as 54M (48M + the 6 MB trained RNN-T in rnnt_sys/)
NAMES = sorted({p.name.removesuffix(".ref.npz") for p in MODELS.glob("*.ref.npz")} | set(EXPECTED))


def _session(path: Path) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.intra_op_num_threads = so.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("name", NAMES)
def test_bundled_model_is_valid_and_matches_torch_reference(name):
    path = MODELS / f"{name}.onnx"
    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)
    assert model.ir_version <= 10  # onnxruntime 1.31 refuses newer IR versions

    with np.load(MODELS / f"{name}.npz") as f:
        feeds = dict(f)
    with np.load(MODELS / f"{name}.ref.npz") as f:
        ref = dict(f)
    assert list(feeds) == [i.name for i in model.graph.input]
    assert list(ref) == [o.name for o in model.graph.output]

    got = _session(path).run(list(ref), feeds)
    for key, value in zip(ref, got):
        assert value.shape == ref[key].shape, key
        np.testing.assert_allclose(value, ref[key], rtol=1e-4, atol=1e-5, err_msg=f"{name}:{key}")


def test_models_folder_stays_under_48_mb():
    files = [p for p in MODELS.rglob("*") if p.is_file() and "__pycache__" not in p.parts and not p.name.endswith(".q4.onnx")]
    total = sum(p.stat().st_size for p in files)
    assert total < SIZE_LIMIT, f"models/ holds {total / 2**20:.1f} MiB; the limit is 48 MiB"


# --------------------------------------------------------------------------- trained models' task metrics
def _models_module(name: str):
    """models/<name>.py imported by path (models/ is not a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"q4c_models_{name}", MODELS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


#: measured FP32 figures (models/README.md, "Trained models") plus a margin: a model or test set
#: that no longer matches the other fails here.
ASR_WER_BOUND, ASR_CER_BOUND = 0.63, 0.225  # FP32: WER 0.6074, CER 0.2130
LM_PPL_BOUND = 86.0  # FP32: 82.81


def test_asr_test_set_shape():
    eval_asr = _models_module("eval_asr")
    doc, feats = eval_asr.load_test_set()
    assert len(feats) == len(doc["utterances"]) >= 100
    assert doc["units"][0] == "<blank>" and len(doc["units"]) == 29
    assert {u["held_out_voice"] for u in doc["utterances"]} == {True, False}
    for f, u in zip(feats, doc["utterances"]):
        assert f.dtype == np.float16 and f.shape == (u["frames"], 80)
        assert set(u["text"]) <= set(doc["units"][1:])
        assert len(u["text"]) <= u["frames"]  # CTC can emit it


def test_asr_fp32_wer_on_the_committed_test_set():
    r = _models_module("eval_asr").evaluate(MODELS / "bilstm_am.onnx", threads=1)
    assert r["utterances"] >= 100
    assert r["wer"] < ASR_WER_BOUND and r["cer"] < ASR_CER_BOUND, r


def test_asr_decoding_agrees_with_the_interpreter():
    """eval_asr's hypotheses (ONNX Runtime) equal a greedy decode of the interpreter's output."""
    from q4c.interp import Interpreter

    eval_asr = _models_module("eval_asr")
    doc, feats = eval_asr.load_test_set()
    got = eval_asr.evaluate(MODELS / "bilstm_am.onnx", limit=2)
    interp = Interpreter(onnx.load(str(MODELS / "bilstm_am.onnx")))
    hyps = [eval_asr.greedy_decode(interp.run({"features": f.astype(np.float32)[None]})["log_probs"][0], doc["units"]) for f in feats[:2]]
    assert [e["hyp"] for e in got["examples"][:2]] == hyps
    refs = [u["text"] for u in doc["utterances"][:2]]
    assert got["wer"] == pytest.approx(eval_asr.error_rates(refs, hyps)["wer"])


def test_error_rates_by_hand():
    eval_asr = _models_module("eval_asr")
    assert eval_asr.edit_distance("kitten", "sitting") == 3
    assert eval_asr.edit_distance([], ["a", "b"]) == 2
    r = eval_asr.error_rates(["the cat sat", "a dog"], ["the bat sat down", "a dog"])
    assert r["wer"] == pytest.approx(2 / 5)  # one substitution + one insertion over 5 words
    assert r["cer"] == pytest.approx(6 / 16)  # c->b, " down" inserted: 1 + 5 over 11 + 5 chars
    units = ["<blank>", " ", "'", *"abcdefghijklmnopqrstuvwxyz"]
    ids = [0, 5, 5, 0, 5, 3, 3, 0, 1, 0]  # c c _ c a a _ ' ' _  -> "cca "
    assert eval_asr.greedy_decode(np.eye(29)[ids], units) == "cca "


def test_lm_fp32_perplexity_on_the_committed_test_text():
    r = _models_module("eval_lm").evaluate(MODELS / "lstm_lm.onnx", threads=1)
    assert r["tokens"] >= 10_000
    assert r["perplexity"] < LM_PPL_BOUND, r


def test_lm_perplexity_agrees_with_the_interpreter():
    from q4c.interp import Interpreter

    eval_lm = _models_module("eval_lm")
    windows = eval_lm.test_windows()[:2]
    lp = Interpreter(onnx.load(str(MODELS / "lstm_lm.onnx"))).run({"tokens": windows})["log_probs"]
    nll = -np.take_along_axis(lp[:, :-1].astype(np.float64), windows[:, 1:, None], axis=-1).mean()
    got = eval_lm.evaluate(MODELS / "lstm_lm.onnx", limit=2)
    assert got["tokens"] == windows[:, 1:].size
    assert got["perplexity"] == pytest.approx(np.exp(nll), rel=1e-4)


def test_log_mel_features_by_hand():
    """models/_speech.py's features: frame count, normalization, a tone lands in its mel band."""
    speech = _models_module("_speech")
    t = np.arange(16000) / 16000
    f = speech.log_mel(np.sin(2 * np.pi * 1000 * t) + 1e-3 * np.random.default_rng(0).standard_normal(t.size))
    assert f.shape == (1 + (16000 - 400) // 160, 80) and f.dtype == np.float32
    np.testing.assert_allclose(f.mean(0), 0, atol=1e-4)
    fb = speech.mel_filterbank()
    band = int(np.argmax(fb[:, round(1000 / 16000 * 512)]))  # the filter that peaks nearest 1 kHz
    raw = np.log(np.abs(np.fft.rfft(np.sin(2 * np.pi * 1000 * t[:400]) * np.hanning(400), 512)) ** 2 @ fb.T + 1e-6)
    assert abs(int(np.argmax(raw)) - band) <= 1


def _asr_leaks(calib: list[np.ndarray], test: list[np.ndarray]) -> list[int]:
    """Indices of calibration feature arrays ([time, 80], any float dtype) that are test utterances.

    Compared in one dtype (both cast to float16, what the committed files store, so a float32 copy
    of a test utterance is caught too), keyed by shape and bytes.
    """
    seen = {(f.shape, f.astype(np.float16).tobytes()) for f in test}
    return [i for i, f in enumerate(calib) if (f.shape, f.astype(np.float16).tobytes()) in seen]


def _lm_leaks(windows: list[np.ndarray], text: np.ndarray, n: int = 12) -> int:
    """How many n-token runs (every n-th offset) of the calibration windows occur in the test text."""
    text = np.asarray(text, dtype=np.int64)
    grams = {tuple(text[i : i + n]) for i in range(len(text) - n + 1)}
    return sum(tuple(np.asarray(w, dtype=np.int64)[i : i + n]) in grams
               for w in windows for i in range(0, len(w) - n + 1, n + 1))


@pytest.mark.parametrize("name", ["bilstm_am", "lstm_lm"])
def test_trained_models_calibration_sets_are_valid_inputs_and_not_test_data(name):
    """models/data/<name>_calib feeds `q4c compile --calib` as-is, and none of it is test data."""
    from q4c.calib.readers import open_reader

    model = onnx.load(str(MODELS / f"{name}.onnx"))
    samples = list(open_reader(model, MODELS / "data" / f"{name}_calib"))  # validates keys, ranks, dtypes, finiteness
    assert len(samples) >= 8
    if name == "bilstm_am":
        _, feats = _models_module("eval_asr").load_test_set()
        assert all(s["features"].ndim == 3 for s in samples)
        assert _asr_leaks([s["features"][0] for s in samples], feats) == []
    else:
        with np.load(MODELS / "data" / "lstm_lm_test.npz") as z:
            text = z["tokens"].astype(np.int64)
        windows = [w for s in samples for w in s["tokens"]]
        assert all(w.min() >= 0 and w.max() <= 2000 for w in windows)
        # training windows, not test text: no 12-token run of a window occurs in the test text
        assert _lm_leaks(windows, text) == 0


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_asr_leak_check_catches_a_planted_test_utterance(tmp_path, dtype):
    """A test utterance copied into a calibration directory (as stored, or as float32) is caught."""
    from q4c.calib.readers import open_reader

    model = onnx.load(str(MODELS / "bilstm_am.onnx"))
    _, feats = _models_module("eval_asr").load_test_set()
    for i, path in enumerate(sorted((MODELS / "data" / "bilstm_am_calib").glob("*.npz"))[:3]):
        with np.load(path) as z:
            np.savez(tmp_path / f"{i:03d}.npz", features=z["features"])
    np.savez(tmp_path / "003.npz", features=feats[7].astype(dtype)[None])
    samples = list(open_reader(model, tmp_path))
    assert _asr_leaks([s["features"][0] for s in samples], feats) == [3]


def test_lm_leak_check_catches_a_planted_test_window():
    with np.load(MODELS / "data" / "lstm_lm_test.npz") as z:
        text = z["tokens"].astype(np.int64)
    clean = [np.arange(64) % 5]  # not English: no 12-token run of it is in the test text
    assert _lm_leaks(clean, text) == 0
    assert _lm_leaks([*clean, text[1000:1064].astype(np.int16)], text) > 0
