"""models/real/audio.py: exact-SNR mixing, numpy noise spectra and the committed manifest's splits.

Nothing here runs espeak-ng or sox (CI may not have them): rendering is checked by hand
(`python models/real/audio.py`), these tests check the numpy parts and the manifest.
"""

from __future__ import annotations

import hashlib
import importlib.util
import itertools
import json
from pathlib import Path

import numpy as np
import pytest

REAL = Path(__file__).resolve().parents[2] / "models" / "real"
_spec = importlib.util.spec_from_file_location("q4c_real_audio", REAL / "audio.py")
audio = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(audio)

MANIFEST = json.loads((REAL / "audio_manifest.json").read_text(encoding="utf-8"))
CLIPS = MANIFEST["clips"]


def _snr_db(s: np.ndarray, n: np.ndarray) -> float:
    return 10 * np.log10(np.sum(s**2) / np.sum(n**2))


@pytest.mark.parametrize("snr", [-5.0, 0.0, 12.5, 30.0])
def test_mix_at_snr_hits_the_requested_snr_over_the_speech_samples(rng, snr):
    n = 16000
    active = np.zeros(n, bool)
    active[3000:7000] = active[9000:14000] = True
    speech = np.where(active, np.sin(2 * np.pi * 220 * np.arange(n) / 16000) * 0.3, 0.0)
    noise = rng.standard_normal(n) * np.linspace(0.5, 2.0, n)  # non-stationary: the mask matters

    mix, scaled = audio.mix_at_snr(speech, noise, snr, active)

    assert _snr_db(speech[active], scaled[active]) == pytest.approx(snr, abs=1e-9)
    assert abs(_snr_db(speech, scaled) - snr) > 0.1  # not the same as the whole-clip figure
    np.testing.assert_allclose(mix, speech + scaled, rtol=0, atol=1e-15)
    ratio = scaled / noise
    np.testing.assert_allclose(ratio, ratio[0], rtol=1e-12)  # one gain, shape of the noise kept


def test_mix_at_snr_without_mask_uses_every_sample(rng):
    speech, noise = rng.standard_normal(4000), rng.uniform(-1, 1, 4000)
    mix, scaled = audio.mix_at_snr(speech, noise, 7.0)
    assert _snr_db(speech, scaled) == pytest.approx(7.0, abs=1e-9)
    np.testing.assert_allclose(mix - scaled, speech, atol=1e-15)


def _octave_psd_db(x: np.ndarray, sr: int, lows: list[float]) -> np.ndarray:
    """Mean power spectral density (dB) in each octave [f, 2f)."""
    p = np.abs(np.fft.rfft(x)) ** 2
    f = np.fft.rfftfreq(len(x), 1 / sr)
    return np.array([10 * np.log10(p[(f >= lo) & (f < 2 * lo)].mean()) for lo in lows])


@pytest.mark.parametrize("alpha,slope", [(0.0, 0.0), (1.0, -3.0103), (2.0, -6.0206)])
def test_colored_noise_has_the_expected_slope_per_octave(alpha, slope):
    # PSD ~ 1/f**alpha: the mean density of [2f, 4f) is 2**-alpha times that of [f, 2f),
    # i.e. -10*log10(2)*alpha dB per octave (white 0, pink -3.01, brown -6.02).
    x = audio.colored_noise(2**20, alpha, np.random.default_rng(1), sr=48000)
    lows = [125.0 * 2**k for k in range(7)]  # 125 Hz .. 16 kHz
    steps = np.diff(_octave_psd_db(x, 48000, lows))
    np.testing.assert_allclose(steps, slope, atol=0.3)
    assert np.sqrt(np.mean(x**2)) == pytest.approx(1.0, rel=1e-9)


@pytest.mark.parametrize("f0", [50, 60])
def test_mains_hum_puts_its_power_on_multiples_of_the_mains_frequency(f0):
    sr, n = 16000, 16000 * 4  # 0.25 Hz bins
    x = audio.mains_hum(n, f0, 8, np.random.default_rng(2), sr=sr)
    p = np.abs(np.fft.rfft(x)) ** 2
    f = np.fft.rfftfreq(n, 1 / sr)
    near = np.abs(f - f0 * np.round(f / f0)) <= 1.0
    on = (f >= f0 / 2) & (f <= f0 * 8.5)
    assert p[near & on].sum() / p.sum() > 0.999
    assert p[np.argmin(np.abs(f - f0))] > 1e3 * p[np.argmin(np.abs(f - 1.5 * f0))]
    assert p[f > f0 * 9].sum() / p.sum() < 1e-6  # nothing above the last harmonic


def test_dither_is_triangular_within_one_lsb():
    lsb = 1 / 32768
    x = audio.dither(200_000, np.random.default_rng(3))
    assert np.abs(x).max() < lsb
    assert np.var(x) == pytest.approx(lsb**2 / 6, rel=0.02)  # two uniform(-lsb/2, lsb/2): 2 * lsb**2/12
    assert np.mean(np.abs(x) < lsb / 2) == pytest.approx(0.75, abs=0.01)  # triangle: 3/4 of mass inside


def _voices_and_texts(split: str) -> tuple[set[str], set[str]]:
    voices, texts = set(), set()
    for c in CLIPS:
        if c["split"] != split:
            continue
        for u in c["utterances"]:
            voices.add(u["voice"])
            texts.add(u["text"])
        for t in c["noise"].get("talkers", []):
            voices.add(t["voice"])
            texts.update(t["texts"])
    return voices, texts


def test_manifest_splits_share_no_voice_and_no_sentence():
    calib_voices, calib_texts = _voices_and_texts("calib")
    test_voices, test_texts = _voices_and_texts("test")
    assert calib_voices and test_voices and calib_texts and test_texts
    assert not calib_voices & test_voices
    assert not {v.split("+")[1] for v in calib_voices} & {v.split("+")[1] for v in test_voices}
    assert not calib_texts & test_texts


def test_manifest_clips_are_scenes_as_specified():
    durations = {"calib": (4.0, 6.0), "test": (5.0, 8.0)}
    counts = {"calib": 0, "test": 0}
    kinds = set()
    for c in CLIPS:
        counts[c["split"]] += 1
        lo, hi = durations[c["split"]]
        assert lo <= c["duration_s"] <= hi, c["id"]
        utts = c["utterances"]
        assert 2 <= len(utts) <= 4 and c["layout"]["n_utterances"] == len(utts)
        assert utts[0]["start_s"] == c["layout"]["lead_s"] > 0.1
        gaps = [b["start_s"] - (a["start_s"] + a["dur_s"]) for a, b in itertools.pairwise(utts)]
        np.testing.assert_allclose(gaps, c["layout"]["pauses_s"], atol=2e-3)
        assert all(0.2 - 2e-3 <= g <= 2.0 + 2e-3 for g in gaps), c["id"]
        assert c["duration_s"] - (utts[-1]["start_s"] + utts[-1]["dur_s"]) > 0.1  # trailing non-speech
        kind, snr = c["noise"]["kind"], c["noise"]["snr_db"]
        kinds.add(kind)
        assert (snr is None) == (kind == "silence")
        assert snr is None or -5 <= snr <= 30
        assert 0.2 <= c["peak"] <= 0.95
    assert counts == {"calib": 96, "test": 64}
    assert kinds == {"white", "pink", "brown", "hum", "babble", "music", "silence"}
    assert len({c["id"] for c in CLIPS}) == len(CLIPS) and len({c["seed"] for c in CLIPS}) == len(CLIPS)


@pytest.mark.parametrize("n_utt", [2, 3, 4])
def test_layout_fits_the_utterances_with_pauses_and_edges_in_range(n_utt):
    rng = np.random.default_rng(n_utt)
    fitted = 0
    for speech_s in np.linspace(0.8, 7.0, 60):
        fit = audio._layout(rng, float(speech_s), n_utt, 5.0, 8.0)
        if fit is None:
            continue
        fitted += 1
        total, lead, pauses = fit
        trail = total - speech_s - lead - sum(pauses)
        assert 5.0 <= total <= 8.0 and len(pauses) == n_utt - 1
        assert all(0.2 - 1e-3 <= p <= 2.0 + 1e-3 for p in pauses)
        assert 0.15 - 1e-3 <= lead <= 2.5 + 1e-3 and 0.15 - 2e-3 <= trail <= 2.5 + 2e-3
        assert speech_s / total <= 0.68 + 1e-2
    assert fitted >= 10
    assert audio._layout(rng, 7.9, n_utt, 5.0, 8.0) is None  # no room for the pauses and edges


#: sha256 of the manifest entries (json, sorted keys) of the 64 test clips and of the first 24
#: calibration clips as committed before the calibration split grew to 96 (session 5): results
#: measured on the test split before and after stay comparable only while these hold.
PINNED = {("test", 64): "424a462dafeb87dca14fce9ebe6aa83edfcfaef46d1651430baa770e2a5b0496",
          ("calib", 24): "9052fdcfa3980041b27c1ded752738b84dd7a0105de8d4e3c5ea1f79a95bec35"}


@pytest.mark.parametrize(("split", "n"), list(PINNED))
def test_earlier_clips_are_unchanged_when_the_manifest_grows(split, n):
    entries = sorted((c for c in CLIPS if c["split"] == split), key=lambda c: c["id"])[:n]
    blob = json.dumps(entries, sort_keys=True, ensure_ascii=False).encode()
    assert hashlib.sha256(blob).hexdigest() == PINNED[split, n]


def test_extra_batches_follow_the_first_with_their_own_ids_and_seeds():
    calib = sorted((c for c in CLIPS if c["split"] == "calib"), key=lambda c: c["id"])
    assert [c["id"] for c in calib] == [f"calib_{i:03d}" for i in range(96)]
    assert [c["seed"] for c in calib] == [100000 + i for i in range(96)]
    assert audio.PLAN["calib"][0] + sum(n for n, _ in audio.EXTRA["calib"]) == 96
