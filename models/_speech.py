"""Offline speech synthesis (espeak-ng + sox) and numpy log-mel features for the trained AM.

Needs the Debian packages espeak-ng and sox (``apt-get install espeak-ng sox``) when building;
nothing here is used by q4c or its tests (the test set is committed as features).

Each utterance: espeak-ng speaks the sentence with a voice (dialect + variant), speed (words per
minute) and pitch drawn at random; sox resamples to 16 kHz and perturbs it (tempo, pitch,
reverb, telephone band-limiting or low-pass, gain, leading/trailing silence); sox also draws
the noise (white, pink or brown) that is mixed in at a random SNR.
"""

from __future__ import annotations

import subprocess

import numpy as np

SR, N_FFT, WIN, HOP, N_MELS = 16000, 512, 400, 160, 80  # 25 ms window, 10 ms hop

TRAIN_DIALECTS = ["en-us", "en-gb", "en-gb-scotland", "en-gb-x-gbclan", "en-gb-x-gbcwmd", "en-gb-x-rp", "en-us-nyc"]
HELD_OUT_DIALECT = "en-029"  # Caribbean English: never heard in training
VARIANTS = ["", "m1", "m2", "m3", "m4", "m5", "m6", "m7", "f1", "f2", "f3", "f4", "klatt", "klatt2", "klatt3"]


def pick_voice(rng: np.random.Generator, *, held_out: bool = False) -> dict:
    dialect = HELD_OUT_DIALECT if held_out else str(rng.choice(TRAIN_DIALECTS))
    variant = str(rng.choice(VARIANTS))
    return {
        "voice": dialect + (f"+{variant}" if variant else ""),
        "speed": int(rng.integers(135, 200)),  # words per minute (espeak default 175)
        "pitch": int(rng.integers(25, 80)),  # 0-99 (default 50)
        "tempo": float(np.round(rng.uniform(0.9, 1.1), 3)) if rng.random() < 0.5 else None,
        "cents": int(rng.integers(-250, 250)) if rng.random() < 0.4 else None,
        "reverb": int(rng.integers(10, 60)) if rng.random() < 0.3 else None,
        "band": str(rng.choice(["phone", "lowpass"])) if rng.random() < 0.3 else None,
        "pad": [float(np.round(rng.uniform(0.05, 0.3), 3)), float(np.round(rng.uniform(0.05, 0.3), 3))],
        "gain_db": float(np.round(rng.uniform(-12, 0), 1)),
        "noise": str(rng.choice(["whitenoise", "pinknoise", "brownnoise"])) if rng.random() < 0.7 else None,
        "snr_db": float(np.round(rng.uniform(8, 30), 1)),
    }


def _sox_effects(spec: dict) -> list[str]:
    fx = []
    if spec["tempo"]:
        fx += ["tempo", "-s", str(spec["tempo"])]
    if spec["cents"]:
        fx += ["pitch", str(spec["cents"])]
    if spec["reverb"]:
        fx += ["reverb", str(spec["reverb"])]
    if spec["band"] == "phone":
        fx += ["sinc", "300-3400"]
    elif spec["band"] == "lowpass":
        fx += ["lowpass", "4000"]
    return fx + ["pad", str(spec["pad"][0]), str(spec["pad"][1]), "gain", "-n", str(spec["gain_db"]), "rate", str(SR)]


def synthesize(text: str, spec: dict, seed: int) -> np.ndarray:
    """16 kHz float32 audio of ``text`` spoken and perturbed as ``spec`` (from pick_voice) says."""
    speak = ["espeak-ng", "-v", spec["voice"], "-s", str(spec["speed"]), "-p", str(spec["pitch"]), "--stdout", text]
    wav = subprocess.run(speak, check=True, capture_output=True).stdout
    sox = ["sox", "-t", "wav", "-", "-t", "raw", "-e", "float", "-b", "32", "-c", "1", "-", *_sox_effects(spec)]
    audio = np.frombuffer(subprocess.run(sox, input=wav, check=True, capture_output=True).stdout, dtype=np.float32).copy()
    if spec["noise"]:
        dur = f"{audio.size / SR + 1.0:.4f}"
        # -R: sox's repeatable random numbers; a seeded offset into the noise varies it per utterance
        gen = ["sox", "-R", "-n", "-t", "raw", "-r", str(SR), "-e", "float", "-b", "32", "-c", "1", "-", "synth", dur, spec["noise"]]
        noise = np.frombuffer(subprocess.run(gen, check=True, capture_output=True).stdout, dtype=np.float32)
        start = int(np.random.default_rng(seed).integers(0, SR))
        noise = noise[start : start + audio.size].astype(np.float64)
        p_sig = float(np.mean(audio.astype(np.float64) ** 2)) + 1e-12
        p_noise = float(np.mean(noise**2)) + 1e-12
        audio = (audio + noise * np.sqrt(p_sig / p_noise / 10 ** (spec["snr_db"] / 10))).astype(np.float32)
    return audio


def mel_filterbank(sr: int = SR, n_fft: int = N_FFT, n_mels: int = N_MELS) -> np.ndarray:
    """[n_mels, n_fft // 2 + 1] triangular filters on the HTK mel scale."""
    def hz_to_mel(f):
        return 2595.0 * np.log10(1.0 + f / 700.0)

    def mel_to_hz(m):
        return 700.0 * (10.0 ** (m / 2595.0) - 1.0)

    edges = mel_to_hz(np.linspace(hz_to_mel(0.0), hz_to_mel(sr / 2), n_mels + 2))
    freqs = np.linspace(0.0, sr / 2, n_fft // 2 + 1)
    fb = np.zeros((n_mels, freqs.size))
    for m in range(n_mels):
        lo, mid, hi = edges[m], edges[m + 1], edges[m + 2]
        fb[m] = np.clip(np.minimum((freqs - lo) / (mid - lo), (hi - freqs) / (hi - mid)), 0.0, None)
    return fb


_FB = mel_filterbank()
_WINDOW = np.hanning(WIN)


def log_mel(audio: np.ndarray) -> np.ndarray:
    """[frames, 80] float32: 25 ms Hann window, 10 ms hop, power spectrum -> 80 mel bands -> log,
    then per-utterance, per-feature mean/variance normalization (NeMo's ``per_feature``)."""
    audio = np.asarray(audio, dtype=np.float64)
    audio = np.append(audio[0], audio[1:] - 0.97 * audio[:-1])  # pre-emphasis
    frames = 1 + max(0, (audio.size - WIN) // HOP)
    audio = np.pad(audio, (0, max(0, (frames - 1) * HOP + WIN - audio.size)))
    idx = np.arange(frames)[:, None] * HOP + np.arange(WIN)[None, :]
    spec = np.abs(np.fft.rfft(audio[idx] * _WINDOW, n=N_FFT)) ** 2
    feats = np.log(spec @ _FB.T + 1e-6)
    feats = (feats - feats.mean(0)) / (feats.std(0) + 1e-5)
    return feats.astype(np.float32)
