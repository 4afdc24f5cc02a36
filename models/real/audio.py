"""Offline test audio for judging real speech models: synthetic VAD / speech-enhancement scenes.

Real recordings are not reachable offline, so every clip is a scene built from espeak-ng speech:
leading and trailing non-speech, 2-4 utterances separated by pauses of 0.2-2 s, mixed at an exact
SNR (over the speech-active samples, `mix_at_snr`) with one noise kind -- white, pink, brown (numpy,
FFT-shaped), mains hum (50/60 Hz + harmonics, numpy), babble (3-6 quiet overlapped espeak-ng voices),
music-like tones (chords / arpeggios from `sox synth`) or silence (digital near-silence: TPDF dither
of 1 LSB at 16 bits) -- and, on about 30 % of the clips, `sox reverb` applied to the speech. Each
clip is normalised to a peak drawn in 0.3-0.9. espeak-ng speaks at 22.05 kHz, so the speech itself has
no content above 11 kHz even at 48 kHz (noise and music do).

Everything is deterministic from the committed manifest `audio_manifest.json` (per clip: split,
voices, rate, pitch, texts, noise kind and parameters, SNR, layout, peak and seed). Splits:
"calib" (96 clips, 4-6 s: 24, then 72 drawn in a second batch, `EXTRA`) and "test" (64 clips, 5-8 s)
share no espeak-ng voice variant (so no voice) and no sentence, babble included. Ground truth for VAD: `speech_segments` / `speech_mask`
(each utterance's dry extent, espeak-ng output trimmed at -40 dB re its peak; reverb tails are not speech).

Rendering: each clip is rendered once at 48 kHz; the 16 kHz version is the same mixture resampled
by `sox rate -v`. Files go to ~/.cache/q4c/audio/<sr>/<clip id>-<key>.npz (float32 `audio` in [-1, 1],
int64 `segments` [n, 2] = speech regions in samples), <key> = a hash of the manifest entry, so an
edited entry is re-rendered and processes holding different manifest versions do not overwrite each
other. The whole set renders in about 10 s (2 threads). Generating audio needs the `espeak-ng` and
`sox` programs (Debian: `apt-get install -y espeak-ng sox`); running q4c does not, nor do the tests.

    python models/real/audio.py                   # render missing clips (both rates), print a summary
    python models/real/audio.py --write-manifest  # rewrite audio_manifest.json (needs espeak-ng)

API: `load(split, sr) -> [(clip_id, audio)]`, `speech_segments(clip_id, sr)`, `speech_mask(clip_id, sr)`,
`mix_at_snr(speech, noise, snr_db, active=None)`, `colored_noise`, `mains_hum`, `dither`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
MANIFEST = HERE / "audio_manifest.json"
CACHE = Path.home() / ".cache" / "q4c" / "audio"
BASE_SR = 48000
RATES = (16000, 48000)
SPLITS = ("calib", "test")
RENDER_VERSION = 2  # bump when rendering changes in a way the manifest does not show
NOISE_KINDS = ("white", "pink", "brown", "hum", "babble", "music", "silence")
SNR_RANGE = {
    "white": (-5, 30),
    "pink": (-5, 30),
    "brown": (-5, 30),
    "hum": (0, 30),
    "babble": (5, 25),
    "music": (0, 25),
}  # babble stays quiet; silence has no SNR
LSB16 = 1.0 / 32768.0

# --------------------------------------------------------------------------------------------- text
# Plain sentences written for this file. calib and test pools share no sentence.
# fmt: off
TEXTS = {
    "calib": {
        "en": [
            "Please close the window before you leave.", "The train to the city leaves at nine.",
            "Could you pass me the salt?", "We planted tomatoes along the fence last spring.",
            "Turn left at the second traffic light.", "My brother fixed the old bicycle yesterday.",
            "The meeting has been moved to Thursday afternoon.", "Yes, that sounds fine.",
            "Bring an umbrella, it might rain later.", "She read the letter twice and smiled.",
            "The soup needs a little more pepper.", "How long does the battery last?",
            "Our neighbours are painting their house blue.", "I will call you back in ten minutes.",
            "The children built a castle out of sand.", "Thank you very much.",
            "Okay.", "Hello?", "Not yet.", "Right, let's go.",
            "When the rain finally stopped, we packed the tent, loaded the car and drove home slowly.",
        ],
        "de": [
            "Guten Morgen, wie geht es dir?", "Der Zug hat heute zehn Minuten Verspätung.",
            "Ich habe meinen Schlüssel vergessen.", "Das Wetter ist schön, wir gehen spazieren.",
            "Kannst du mir bitte helfen?", "Die Bäckerei an der Ecke öffnet um sieben.",
            "Ja, genau.", "Danke schön.", "Moment mal.",
        ],
        "es": [
            "¿Dónde está la estación de tren?", "Mañana vamos a la playa con mis primos.",
            "Me gusta mucho este libro.", "La cena estará lista en media hora.",
            "Por favor, cierra la puerta.", "El perro duerme debajo de la mesa.",
            "Sí, claro.", "Hola.", "Vale, vamos.",
        ],
    },
    "test": {
        "en": [
            "Where did you put the car keys?", "The library closes early on Sundays.",
            "Nobody expected the river to flood so quickly.", "Add two eggs and stir the mixture gently.",
            "Let me check the schedule first.", "The printer on the third floor is out of paper.",
            "A cold wind blew across the empty parking lot.", "Can you hear me now?",
            "He forgot his wallet at the restaurant.", "The concert starts at half past seven.",
            "Please speak a little slower.", "Those mountains are covered with snow all year.",
            "I think the kettle is boiling.", "The package should arrive by Friday morning.",
            "Open the door, please.", "We walked along the beach until sunset.",
            "The doctor will see you in a moment.", "Her garden is full of roses and lavender.",
            "That was the best pizza I have ever had.", "Remember to water the plants while I am away.",
            "The bus was late again this morning.", "Could you repeat the last number?",
            "Seven hundred people attended the festival.", "The cat is sleeping on the warm windowsill.",
            "Good morning, how are you today?", "He plays the violin in a small orchestra.",
            "The bridge will be closed for repairs next week.", "Write your name at the top of the page.",
            "No, I have not seen it.", "The lights went out during the storm.",
            "She ordered a cup of tea with lemon.", "We need more chairs for the guests.",
            "The museum has a new exhibition about ancient ships.", "Is this seat taken?",
            "Keep the receipt in case you need to return it.", "The alarm rang twice before anyone woke up.",
            "Sure.", "Wait a second.", "Maybe later.", "Hi there.", "Excuse me?", "All right.",
            "If you follow the path past the old mill, you will find the lake on your left after an hour.",
            "The engineers tested the new pump for three days before they were happy with the results.",
        ],
        "fr": [
            "Bonjour, je voudrais un café, s'il vous plaît.", "Le musée est fermé le lundi.",
            "Nous partons en vacances la semaine prochaine.", "Il fait très froid ce matin.",
            "Où se trouve la pharmacie la plus proche?", "Elle a acheté des fleurs au marché.",
            "Oui, merci.", "Pas encore.", "Allons-y.",
        ],
        "it": [
            "Buongiorno, come stai?", "Il treno per Roma parte alle otto.",
            "Abbiamo mangiato una pizza deliziosa.", "Domani pioverà tutto il giorno.",
            "Puoi chiudere la finestra, per favore?", "La biblioteca è vicino alla piazza.",
            "Sì, grazie.", "Va bene.", "Andiamo.",
        ],
        "nl": [
            "Goedemorgen, hoe gaat het met je?", "De fiets staat achter het huis.",
            "Wij gaan morgen naar de markt.", "Het regent al de hele dag.",
            "Kun je mij het zout geven?", "De winkel sluit om zes uur.",
            "Ja, prima.", "Dank je.", "Kom op.",
        ],
        "pt": [
            "Bom dia, tudo bem?", "O autocarro chega daqui a cinco minutos.",
            "Gosto muito de café com leite.", "A praia estava cheia de gente.",
            "Podes abrir a janela, por favor?", "O jantar está pronto.",
            "Sim, obrigado.", "Olá.", "Vamos lá.",
        ],
    },
}

# espeak-ng voice = language + "+" + variant. The splits share no variant, hence no voice.
LANGUAGES = {  # espeak-ng language -> text language
    "calib": {"en-us": "en", "en-gb": "en", "de": "de", "es": "es"},
    "test": {"en-us": "en", "en-gb-scotland": "en", "en-029": "en", "en-gb-x-rp": "en", "en-us-nyc": "en",
             "fr-fr": "fr", "it": "it", "nl": "nl", "pt": "pt"},
}
VARIANTS = {
    "calib": ("m1", "m2", "f1", "f2", "klatt", "max", "Annie"),
    "test": ("m3", "m4", "m5", "m6", "m7", "f3", "f4", "f5", "klatt3", "klatt4", "edward", "belinda",
             "steph", "john", "grandma"),
}
PLAN = {"calib": (24, (4.0, 6.0)), "test": (64, (5.0, 8.0))}  # clip count, duration range (s)
#: more clips drawn after a split's first PLAN batch, each batch from its own seeded generator, so
#: the clips drawn before stay byte-identical: (clip count, generator seed). 72 more calibration
#: clips (96 in all) give --require 92 held-out units on top of the 4 its scores run on.
EXTRA = {"calib": ((72, 1100),), "test": ()}
# fmt: on


# ------------------------------------------------------------------------------------ numpy noise
def mix_at_snr(
    speech: np.ndarray,
    noise: np.ndarray,
    snr_db: float,
    active: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Return (speech + g * noise, g * noise) with 10 log10(P_speech / P_gnoise) == snr_db.

    Powers are mean squares over the `active` samples (the speech regions; all samples if None).
    """
    speech = np.asarray(speech, dtype=np.float64)
    noise = np.asarray(noise, dtype=np.float64)
    if speech.shape != noise.shape:
        raise ValueError(f"speech {speech.shape} and noise {noise.shape} differ in shape")
    sel = np.ones(speech.shape, bool) if active is None else np.asarray(active, bool)
    p_speech = np.mean(speech[sel] ** 2)
    p_noise = np.mean(noise[sel] ** 2)
    if p_speech <= 0 or p_noise <= 0:
        raise ValueError("mix_at_snr needs non-zero speech and noise power over the active samples")
    gain = np.sqrt(p_speech / (p_noise * 10.0 ** (snr_db / 10.0)))
    scaled = gain * noise
    return speech + scaled, scaled


def colored_noise(
    n: int,
    alpha: float,
    rng: np.random.Generator,
    sr: int = BASE_SR,
    f_lo: float = 20.0,
) -> np.ndarray:
    """Gaussian noise with power spectral density ~ 1 / f**alpha above f_lo (0 white, 1 pink, 2 brown).

    Shaped in the frequency domain: below f_lo the density is held flat (no DC drift); unit RMS.
    """
    spec = np.fft.rfft(rng.standard_normal(n))
    f = np.fft.rfftfreq(n, 1.0 / sr)
    shape = np.maximum(f, f_lo) ** (-alpha / 2.0)
    shape[0] = 0.0
    x = np.fft.irfft(spec * shape, n)
    return x / np.sqrt(np.mean(x**2))


def mains_hum(n: int, f0: float, n_harmonics: int, rng: np.random.Generator, sr: int = BASE_SR) -> np.ndarray:
    """Mains hum: f0 and its harmonics up to n_harmonics (odd ones stronger, random phases), unit RMS."""
    t = np.arange(n) / sr
    x = np.zeros(n)
    for k in range(1, n_harmonics + 1):
        amp = (1.0 if k % 2 else 0.5) / k**0.7 * rng.uniform(0.5, 1.0)
        x += amp * np.sin(2 * np.pi * k * f0 * t + rng.uniform(0, 2 * np.pi))
    return x / np.sqrt(np.mean(x**2))


def dither(n: int, rng: np.random.Generator, lsb: float = LSB16) -> np.ndarray:
    """TPDF dither: the sum of two uniform(-lsb/2, lsb/2) draws (peak below one LSB)."""
    return (rng.uniform(-0.5, 0.5, n) + rng.uniform(-0.5, 0.5, n)) * lsb


# ------------------------------------------------------------------------------------- tools
def _need_tools() -> None:
    missing = [t for t in ("espeak-ng", "sox") if shutil.which(t) is None]
    if missing:
        from q4c.errors import DataError

        raise DataError(
            f"generating test audio needs {' and '.join(missing)} (Debian: apt-get install -y "
            f"espeak-ng sox); or copy a rendered ~/.cache/q4c/audio from another machine"
        )


_RAW = ["-t", "raw", "-e", "floating-point", "-b", "32", "-c", "1"]


def _sox(args_in: list[str], effects: list[str], data: bytes | None, sr_out: int) -> np.ndarray:
    cmd = ["sox", "-R", "-V1", *args_in, *_RAW, "-r", str(sr_out), "-", *effects]
    p = subprocess.run(cmd, input=data, capture_output=True, check=False)
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed: {p.stderr.decode(errors='replace').strip()}")
    return np.frombuffer(p.stdout, np.float32).astype(np.float64)


def _sox_float(x: np.ndarray, sr_in: int, sr_out: int, effects: list[str]) -> np.ndarray:
    return _sox(
        [*_RAW, "-r", str(sr_in), "-"],
        effects,
        np.asarray(x, np.float32).tobytes(),
        sr_out,
    )


@lru_cache(maxsize=2048)
def _espeak(voice: str, rate: int, pitch: int, text: str) -> np.ndarray:
    """espeak-ng speech at 48 kHz, leading/trailing silence trimmed (10 ms margin), peak 1."""
    cmd = [
        "espeak-ng",
        "--stdout",
        "-v",
        voice,
        "-s",
        str(rate),
        "-p",
        str(pitch),
        "-a",
        "100",
        text,
    ]
    p = subprocess.run(cmd, capture_output=True, check=False)
    if p.returncode != 0 or len(p.stdout) < 100:
        raise RuntimeError(f"espeak-ng {voice!r} failed: {p.stderr.decode(errors='replace').strip()}")
    x = _sox(["-t", "wav", "-"], ["rate", "-v"], p.stdout, BASE_SR)
    x = x / np.max(np.abs(x))
    loud = np.flatnonzero(np.abs(x) > 10 ** (-40 / 20))
    margin = BASE_SR // 100
    x = x[max(loud[0] - margin, 0) : loud[-1] + margin]
    x.setflags(write=False)
    return x


# ---------------------------------------------------------------------------------- manifest
def _voices(split: str) -> list[tuple[str, str]]:
    return [(f"{lang}+{var}", tl) for lang, tl in LANGUAGES[split].items() for var in VARIANTS[split]]


def _pick_text(rng: np.random.Generator, split: str, text_lang: str) -> str:
    pool = TEXTS[split]
    lang = text_lang if text_lang == "en" or rng.random() < 0.75 else "en"  # some accented English
    return str(rng.choice(pool[lang]))


def _stratified(rng: np.random.Generator, n: int, lo: float, hi: float) -> list[float]:
    pos = (rng.permutation(n) + rng.uniform(0.1, 0.9, n)) / n
    return [round(float(lo + (hi - lo) * p), 1) for p in pos]


def _layout(
    rng: np.random.Generator, speech_s: float, n_utt: int, lo: float, hi: float
) -> tuple[float, float, list[float]] | None:
    """(total, lead, pauses) for a clip of lo..hi s, about 38-68 % speech; pauses 0.2-2 s, lead/trail 0.15-2.5 s.

    None when the utterances cannot fit.
    """
    p_lo, p_hi, e_lo, e_hi = 0.2, 2.0, 0.15, 2.5
    t_min = max(lo, speech_s + (n_utt - 1) * p_lo + 2 * e_lo)
    t_max = min(hi, speech_s + (n_utt - 1) * p_hi + 2 * e_hi)
    if t_min > t_max:
        return None
    total = speech_s / rng.uniform(0.38, 0.68)
    if total > t_max:  # too much speech for the clip: draw other utterances
        return None
    total = round(max(total, t_min), 2)
    pauses = rng.uniform(p_lo, p_hi, n_utt - 1)
    edges = rng.uniform(e_lo, 1.5, 2)
    excess = float(np.sum(pauses - p_lo) + np.sum(edges - e_lo))
    want = total - speech_s - (n_utt - 1) * p_lo - 2 * e_lo
    if want < 0:
        return None
    factor = want / excess
    pauses = np.minimum(p_lo + (pauses - p_lo) * factor, p_hi)
    rest = total - speech_s - float(np.sum(pauses))  # lead + trail
    lead = e_lo + (rest - 2 * e_lo) * (edges[0] - e_lo) / float(np.sum(edges - e_lo))
    if not (e_lo <= lead <= e_hi and e_lo <= rest - lead <= e_hi):
        return None
    return total, round(float(lead), 3), [round(float(x), 3) for x in pauses]


def _make_clip(
    rng: np.random.Generator, split: str, cid: str, seed: int, kind: str, snr: float | None, n_utt: int, lang: str
) -> dict:
    lo, hi = PLAN[split][1]
    voices = _voices(split)
    for _ in range(5000):
        first = f"{lang}+{rng.choice(VARIANTS[split])}"  # the clip's language is fixed, the variant drawn
        speakers = [(first, LANGUAGES[split][lang])]
        if rng.random() < 0.5:  # a second speaker, any voice of the split
            speakers.append(voices[int(rng.integers(len(voices)))])
        utts = []
        for u in range(n_utt):
            voice, tl = speakers[u % len(speakers)]
            text = _pick_text(rng, split, tl)
            utt = {
                "voice": voice,
                "rate": int(rng.integers(130, 211)),
                "pitch": int(rng.integers(25, 76)),
                "text": text,
                "gain_db": round(float(rng.uniform(-6, 0)), 1),
            }
            utt["dur_s"] = round(len(_espeak(utt["voice"], utt["rate"], utt["pitch"], text)) / BASE_SR, 3)
            utts.append(utt)
            if sum(x["dur_s"] for x in utts) > 0.68 * hi:  # cannot fit: stop measuring, draw again
                break
        if len(utts) < n_utt:
            continue
        fit = _layout(rng, sum(u["dur_s"] for u in utts), n_utt, lo, hi)
        if fit is None:
            continue
        total, lead, pauses = fit
        t = lead
        for u, pause in zip(utts, [*pauses, 0.0], strict=True):
            u["start_s"] = round(t, 3)
            t += u["dur_s"] + pause
        break
    else:
        raise RuntimeError(f"{cid}: could not fit {n_utt} utterances into {lo}-{hi} s")
    noise: dict = {"kind": kind, "snr_db": snr}
    if kind == "hum":
        noise.update(f0=int(rng.choice([50, 60])), n_harmonics=int(rng.integers(3, 13)))
    elif kind == "babble":
        talkers = [voices[i] for i in rng.choice(len(voices), size=int(rng.integers(3, 7)), replace=False)]
        noise["talkers"] = [
            {
                "voice": v,
                "rate": int(rng.integers(140, 201)),
                "pitch": int(rng.integers(30, 71)),
                "texts": [str(rng.choice(TEXTS[split][tl])) for _ in range(2)],
            }
            for v, tl in talkers
        ]
    elif kind == "music":
        noise.update(
            style=str(rng.choice(["chords", "arpeggio"])),
            wave=str(rng.choice(["pluck", "sine", "triangle"])),
            tempo_bpm=int(rng.integers(70, 141)),
            root_midi=int(rng.integers(45, 61)),
        )
    reverb = None
    if rng.random() < 0.33:
        reverb = {
            "reverberance": int(rng.integers(30, 91)),
            "hf_damping": int(rng.integers(20, 81)),
            "room_scale": int(rng.integers(40, 101)),
            "pre_delay_ms": int(rng.integers(0, 31)),
            "wet_gain_db": round(float(rng.uniform(-6, 0)), 1),
        }
    return {
        "id": cid,
        "split": split,
        "seed": seed,
        "duration_s": total,
        "layout": {"lead_s": lead, "pauses_s": pauses, "n_utterances": n_utt},
        "utterances": utts,
        "noise": noise,
        "reverb": reverb,
        "peak": round(float(rng.uniform(0.3, 0.9)), 2),
    }


def _draw_batch(split: str, s: int, n: int, rng: np.random.Generator, first: int) -> list[dict]:
    """`n` clips of the split numbered from `first`: noise kinds, utterance counts and languages
    balanced within the batch, SNRs stratified per kind; each clip drawn from its own seed."""
    kinds = [NOISE_KINDS[i % len(NOISE_KINDS)] for i in rng.permutation(n)]
    n_utts = [(2, 3, 3, 4, 2)[i % 5] for i in rng.permutation(n)]  # 2: 40 %, 3: 40 %, 4: 20 %
    langs = [list(LANGUAGES[split])[i % len(LANGUAGES[split])] for i in rng.permutation(n)]  # balanced
    snrs = {k: iter(_stratified(rng, kinds.count(k), *SNR_RANGE[k])) for k in SNR_RANGE}
    clips = []
    for j, kind in enumerate(kinds):
        i = first + j
        seed = 100000 * (s + 1) + i
        snr = next(snrs[kind]) if kind in snrs else None
        cid = f"{split}_{i:03d}"
        clips.append(_make_clip(np.random.default_rng(seed), split, cid, seed, kind, snr, n_utts[j], langs[j]))
    return clips


def write_manifest(path: Path = MANIFEST) -> dict:
    """Draw every clip (seeded) and write the manifest. Needs espeak-ng to measure utterance lengths."""
    _need_tools()
    for split in SPLITS:  # an unknown variant silently falls back to the default voice: refuse it
        for var in VARIANTS[split]:
            lang = next(iter(LANGUAGES[split]))
            if np.array_equal(
                _espeak(f"{lang}+{var}", 175, 50, "one two"),
                _espeak(lang, 175, 50, "one two"),
            ):
                raise RuntimeError(f"espeak-ng has no variant {var!r}")
    clips = []
    for s, split in enumerate(SPLITS):
        first = 0
        for n, batch_seed in ((PLAN[split][0], 1000 + s), *EXTRA[split]):
            clips += _draw_batch(split, s, n, np.random.default_rng(batch_seed), first)
            first += n
    manifest = {
        "version": 1,
        "base_sr": BASE_SR,
        "rates": list(RATES),
        "note": "generated by models/real/audio.py --write-manifest; render with python models/real/audio.py",
        "clips": clips,
    }
    path.write_text(json.dumps(manifest, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    return manifest


def manifest() -> dict:
    """The committed manifest (re-read when the file changes)."""
    return _read_manifest(MANIFEST.stat().st_mtime_ns)


@lru_cache(maxsize=1)
def _read_manifest(mtime_ns: int) -> dict:
    return json.loads(MANIFEST.read_text(encoding="utf-8"))


def clips(split: str) -> list[dict]:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, not {split!r}")
    return sorted((c for c in manifest()["clips"] if c["split"] == split), key=lambda c: c["id"])


def _entry(clip_id: str) -> dict:
    for c in manifest()["clips"]:
        if c["id"] == clip_id:
            return c
    raise KeyError(f"no clip {clip_id!r} in {MANIFEST.name}")


def _key(entry: dict) -> str:
    blob = json.dumps(entry, sort_keys=True, ensure_ascii=False) + f"|render{RENDER_VERSION}"
    return hashlib.sha1(blob.encode()).hexdigest()[:16]


# ------------------------------------------------------------------------------------ render
def _babble(entry: dict, n: int, rng: np.random.Generator) -> np.ndarray:
    out = np.zeros(n)
    for talker in entry["noise"]["talkers"]:
        parts = []
        for text in talker["texts"]:
            parts += [
                _espeak(talker["voice"], talker["rate"], talker["pitch"], text),
                np.zeros(int(rng.uniform(0.05, 0.4) * BASE_SR)),
            ]
        one = np.concatenate(parts)
        loop = np.tile(one, n // len(one) + 2)
        start = int(rng.integers(0, len(one)))
        out += loop[start : start + n] * 10 ** (rng.uniform(-8, 0) / 20)
    return out


def _music(entry: dict, n: int, rng: np.random.Generator) -> np.ndarray:
    p = entry["noise"]
    beat = 60.0 / p["tempo_bpm"]
    progression = [
        [0, 4, 7],
        [5, 9, 12],
        [7, 11, 14],
        [-3, 0, 4],
    ]  # I IV V vi, in semitones
    out = np.zeros(n)
    t, step = 0.0, 0
    while t * BASE_SR < n:
        chord = [p["root_midi"] + s for s in progression[(step // 4) % 4]]
        if p["style"] == "chords":
            notes, dur = chord + [chord[0] - 12], beat * 2
        else:
            notes, dur = [chord[step % 3] + 12 * int(rng.integers(0, 2))], beat / 2
        tones = []
        for m in notes:
            tones += [p["wave"], f"{440.0 * 2 ** ((m - 69) / 12):.3f}"]
        x = _sox(
            ["-n"],
            [
                "synth",
                f"{dur:.4f}",
                *tones,
                "remix",
                "-",
                "fade",
                "q",
                "0.01",
                f"{dur:.4f}",
                "0.05",
            ],
            None,
            BASE_SR,
        )
        i = int(t * BASE_SR)
        seg = x[: max(n - i, 0)] * rng.uniform(0.6, 1.0)
        out[i : i + len(seg)] += seg
        t += dur
        step += 1
    return out


def _noise(entry: dict, n: int, rng: np.random.Generator) -> np.ndarray:
    kind = entry["noise"]["kind"]
    if kind in ("white", "pink", "brown"):
        return colored_noise(n, {"white": 0.0, "pink": 1.0, "brown": 2.0}[kind], rng)
    if kind == "hum":
        x = mains_hum(n, entry["noise"]["f0"], entry["noise"]["n_harmonics"], rng)
        return x + 0.01 * rng.standard_normal(n)  # a faint broadband floor (-40 dB)
    if kind == "babble":
        return _babble(entry, n, rng)
    if kind == "music":
        return _music(entry, n, rng)
    raise ValueError(f"unknown noise kind {kind!r}")


def render_clip(entry: dict) -> dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Render one manifest entry: {sr: (audio float32, segments int64 [n, 2], clean float32)} for
    every rate; `clean` is the speech (reverberant where the clip has reverb) exactly as it is
    contained in `audio`, before noise: the reference for an enhancer's STOI / PESQ."""
    rng = np.random.default_rng(entry["seed"])
    n = round(entry["duration_s"] * 16000) * 3  # 48 kHz length divisible by 3
    speech = np.zeros(n)
    segments = []
    for u in entry["utterances"]:
        x = _espeak(u["voice"], u["rate"], u["pitch"], u["text"]) * 10 ** (u["gain_db"] / 20)
        i = round(u["start_s"] * BASE_SR)
        x = x[: max(n - i, 0)]
        speech[i : i + len(x)] += x
        segments.append((i, i + len(x)))
    if entry["reverb"]:
        r = entry["reverb"]
        speech = _sox_float(
            speech,
            BASE_SR,
            BASE_SR,
            [
                "reverb",
                str(r["reverberance"]),
                str(r["hf_damping"]),
                str(r["room_scale"]),
                "100",
                str(r["pre_delay_ms"]),
                str(r["wet_gain_db"]),
            ],
        )[:n]
    active = np.zeros(n, bool)
    for a, b in segments:
        active[a:b] = True
    if entry["noise"]["kind"] == "silence":
        gain = entry["peak"] / np.max(np.abs(speech))
        mix = speech * gain + dither(n, rng)
    else:
        mix, _ = mix_at_snr(speech, _noise(entry, n, rng), entry["noise"]["snr_db"], active)
        gain = entry["peak"] / np.max(np.abs(mix))
        mix *= gain
    clean = speech * gain
    seg = np.asarray(segments, np.int64).reshape(-1, 2)
    out = {BASE_SR: (np.clip(mix, -1, 1).astype(np.float32), seg, clean.astype(np.float32))}
    for sr in RATES:
        if sr != BASE_SR:
            m = n * sr // BASE_SR
            y, c = (_sox_float(v, BASE_SR, sr, ["rate", "-v"]) for v in (mix, clean))
            y, c = (np.pad(v[:m], (0, max(m - len(v), 0))) for v in (y, c))
            out[sr] = (
                np.clip(y, -1, 1).astype(np.float32),
                (seg * sr + BASE_SR // 2) // BASE_SR,
                c.astype(np.float32),
            )
    return out


def _path(entry: dict, sr: int) -> Path:
    """Cache file of a manifest entry: the entry's hash is in the name, so processes holding different
    manifest versions never overwrite each other's files."""
    return CACHE / str(sr) / f"{entry['id']}-{_key(entry)}.npz"


def _cached(entry: dict, sr: int) -> bool:
    return _path(entry, sr).exists()


def _render_and_save(entry: dict) -> None:
    for sr, (audio, seg, clean) in render_clip(entry).items():
        path = _path(entry, sr)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}-{threading.get_ident()}.npz")
        np.savez(tmp, audio=audio, segments=seg, clean=clean, sr=np.array(sr))
        os.replace(tmp, path)


def prune() -> int:
    """Delete cache files that belong to no entry of the current manifest; return how many."""
    keep = {_path(e, sr).name for e in manifest()["clips"] for sr in RATES}
    stale = [p for sr in RATES for p in (CACHE / str(sr)).glob("*.npz") if p.name not in keep]
    for p in stale:
        p.unlink(missing_ok=True)
    return len(stale)


def render(entries: list[dict] | None = None, jobs: int = 2, force: bool = False) -> int:
    """Render the entries (default: every clip) whose cache files are missing or stale; return how many."""
    entries = manifest()["clips"] if entries is None else entries
    todo = [e for e in entries if force or not all(_cached(e, sr) for sr in RATES)]
    if todo:
        _need_tools()
        with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
            list(pool.map(_render_and_save, todo))
    return len(todo)


def _check_sr(sr: int) -> None:
    if sr not in RATES:
        raise ValueError(f"sr must be one of {RATES}, not {sr}")


def load(split: str, sr: int) -> list[tuple[str, np.ndarray]]:
    """Every clip of the split as (clip id, float32 mono audio in [-1, 1] at sr), sorted by id."""
    _check_sr(sr)
    entries = clips(split)
    render([e for e in entries if not _cached(e, sr)])
    out = []
    for e in entries:
        with np.load(_path(e, sr)) as z:
            out.append((e["id"], z["audio"]))
    return out


def speech_segments(clip_id: str, sr: int) -> np.ndarray:
    """Ground-truth speech regions of a clip as int64 [n, 2] (start, end) sample indices at sr."""
    return _rendered(clip_id, sr, "segments")


def clean(clip_id: str, sr: int) -> np.ndarray:
    """The clip's speech without its noise, as contained in the rendered clip (same gain and
    reverb): float32 at sr, the same length as the clip."""
    return _rendered(clip_id, sr, "clean")


def _rendered(clip_id: str, sr: int, key: str) -> np.ndarray:
    """One array of a clip's rendered file at sr ('audio', 'clean', 'segments'), rendering it first
    if it is not cached."""
    _check_sr(sr)
    entry = _entry(clip_id)
    if not _cached(entry, sr):
        render([entry])
    with np.load(_path(entry, sr)) as z:
        return z[key]


def speech_mask(clip_id: str, sr: int) -> np.ndarray:
    """Boolean per sample at sr: True inside an utterance (dry speech extent; reverb tails excluded)."""
    _check_sr(sr)
    entry = _entry(clip_id)
    mask = np.zeros(round(entry["duration_s"] * 16000) * sr // 16000, bool)
    for a, b in speech_segments(clip_id, sr):
        mask[a:b] = True
    return mask


# ----------------------------------------------------------------------------------- summary
def summary() -> str:
    lines = []
    for split in SPLITS:
        cs = clips(split)
        secs = sum(c["duration_s"] for c in cs)
        speech = sum(u["dur_s"] for c in cs for u in c["utterances"])
        lines.append(
            f"{split}: {len(cs)} clips, {secs:.1f} s ({speech / secs:.0%} speech), "
            f"{len({u['voice'] for c in cs for u in c['utterances']})} voices, "
            f"{len({u['text'] for c in cs for u in c['utterances']})} sentences, "
            f"{sum(c['reverb'] is not None for c in cs)} with reverb"
        )
        for kind in NOISE_KINDS:
            snrs = [c["noise"]["snr_db"] for c in cs if c["noise"]["kind"] == kind]
            rng_txt = f" SNR {min(snrs):.1f}..{max(snrs):.1f} dB" if snrs and snrs[0] is not None else ""
            lines.append(f"  {kind:8s} {len(snrs):3d}{rng_txt}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--write-manifest",
        action="store_true",
        help="rewrite audio_manifest.json (needs espeak-ng)",
    )
    ap.add_argument("--jobs", type=int, default=2, help="clips rendered in parallel")
    ap.add_argument("--force", action="store_true", help="re-render clips already in the cache")
    args = ap.parse_args(argv)
    if args.write_manifest:
        write_manifest()
        print(f"wrote {MANIFEST}")
    t0 = time.perf_counter()
    n = render(jobs=args.jobs, force=args.force)
    took = time.perf_counter() - t0
    pruned = prune()
    print(
        f"rendered {n} clips in {took:.1f} s into {CACHE}/{{{','.join(map(str, RATES))}}}/ ({pruned} stale files removed)"
    )
    print(summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())
