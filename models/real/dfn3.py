"""DeepFilterNet3 driver: runs the three-graph ONNX export (enc, erb_dec, df_dec; 48 kHz) with
numpy + ONNX Runtime the way DeepFilterNet's `df.enhance.enhance` runs the model, and judges
enhanced audio (SQNR vs the FP32 system's output; STOI / PESQ when `pystoi` / `pesq` import).

The signal path, learned from DeepFilterNet's sources (libDF/src/lib.rs, df/enhance.py,
df/deepfilternet3.py, df/modules.py, df/multiframe.py) and re-written here in numpy:

- STFT (libDF `DFState`): vorbis window w[i] = sin(pi/2 sin^2(pi (i + 1/2) / N)), N = 960, hop
  480; frame k windows the samples [(k-1) hop, (k+1) hop) (zeros before the start); the forward
  FFT is scaled by 2 hop / N^2, the inverse is unscaled and windowed again, then overlap-added:
  analysis + synthesis reproduce the input delayed by N - hop = 480 samples.
- Features (`df_features`): ERB band powers (mean |X|^2 over each band's bins) in dB
  (10 log10(p + 1e-10)), exponentially mean-normalised per band (s = a s + (1 - a) x,
  x = (x - s) / 40, s0 = linspace(-60, -90, 32)); the first 96 bins divided by sqrt of an
  exponential mean of |X| (s0 = linspace(0.001, 0.0001, 96)); a = 0.99 (exp(-hop / sr / tau)
  rounded to 3 decimals).
- The model (`DfNet.forward`): both features shifted 2 frames earlier (conv look-ahead, zero
  frames appended), enc -> erb_dec gives an ERB gain mask expanded to bins band by band; df_dec
  gives, per frame and each of the first 96 bins, 5 complex taps over the *unmasked* spectrum's
  frames t-2 .. t+2 (order 5, look-ahead 2); those bins take the deep-filtered value, the others
  the masked one.
- `enhance` pads the audio with N zeros, synthesises, and drops the first N - hop samples, so the
  output is aligned with the input and has its length.

CLI: `python models/real/dfn3.py MODEL_DIR_OR_THREE_PATHS [--against FP32_DIR_OR_THREE_PATHS]`
prints the enhancer metrics on the test audio (FP32 default: the fetched export).
"""

from __future__ import annotations

import argparse
import functools
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from q4c.errors import ConfigError, Q4cError
from q4c.metrics import sqnr_db

Run = Callable[[Mapping[str, np.ndarray]], dict[str, np.ndarray]]

# DeepFilterNet3's config.ini ([df] and [deepfilternet] sections of the export)
SR = 48000
FFT_SIZE = 960
HOP = 480
NB_ERB = 32
NB_DF = 96
MIN_NB_ERB_FREQS = 2
NORM_TAU = 1.0
DF_ORDER = 5
DF_LOOKAHEAD = 2
CONV_LOOKAHEAD = 2
FREQ_BINS = FFT_SIZE // 2 + 1
#: samples by which synthesis(analysis(x)) lags x: the STFT loop's algorithmic delay
DELAY = FFT_SIZE - HOP
#: libDF MEAN_NORM_INIT and UNIT_NORM_INIT: first and last band's initial normalisation state
MEAN_NORM_INIT = (-60.0, -90.0)
UNIT_NORM_INIT = (0.001, 0.0001)

GRAPHS = ("enc", "erb_dec", "df_dec")
ENC_OUTPUTS = ("e0", "e1", "e2", "e3", "emb", "c0", "lsnr")


# ---------------------------------------------------------------- signal processing


def vorbis_window(size: int = FFT_SIZE) -> np.ndarray:
    n = np.arange(size, dtype=np.float64)
    inner = np.sin(np.pi * (n + 0.5) / size)
    return np.sin(0.5 * np.pi * inner * inner).astype(np.float32)


def norm_alpha(hop: int = HOP, sr: int = SR, tau: float = NORM_TAU) -> float:
    """exp(-hop / sr / tau), rounded to 3 decimals (more if that would round it to 1), as
    DeepFilterNet's get_norm_alpha: 0.99 for DeepFilterNet3."""
    alpha = float(np.exp(-hop / sr / tau))
    rounded, digits = 1.0, 3
    while rounded >= 1.0:
        rounded = round(alpha, digits)
        digits += 1
    return rounded


def erb_widths(sr: int = SR, fft_size: int = FFT_SIZE, nb_bands: int = NB_ERB,
               min_nb_freqs: int = MIN_NB_ERB_FREQS) -> np.ndarray:
    """Number of FFT bins in each ERB band (libDF erb_fb): band edges equally spaced on the ERB
    scale, rounded to bins, each band at least `min_nb_freqs` wide (bins taken from the next
    band), the last band absorbing the Nyquist bin; the widths sum to fft_size / 2 + 1."""
    f32 = np.float32

    def freq2erb(hz):
        return f32(9.265) * np.log1p(f32(hz) / (f32(24.7) * f32(9.265)))

    def erb2freq(erb):
        return f32(24.7) * f32(9.265) * (np.exp(f32(erb) / f32(9.265)) - f32(1))

    freq_width = f32(sr) / f32(fft_size)
    low, high = freq2erb(0), freq2erb(sr // 2)
    step = (high - low) / f32(nb_bands)
    widths = []
    prev_bin, borrowed = 0, 0
    for i in range(1, nb_bands + 1):
        edge = int(np.floor(erb2freq(low + f32(i) * step) / freq_width + 0.5))  # Rust round(): half up
        width = edge - prev_bin - borrowed
        borrowed = max(min_nb_freqs - width, 0)
        widths.append(max(width, min_nb_freqs))
        prev_bin = edge
    widths[-1] += 1
    widths[-1] -= sum(widths) - (fft_size // 2 + 1)
    return np.asarray(widths, dtype=np.int64)


def erb_filterbank(widths: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(forward [F, E], inverse [E, F]): forward averages the bins of each band (columns sum to
    1), inverse copies each band's value to its bins (entries 0 or 1, columns one-hot)."""
    widths = erb_widths() if widths is None else np.asarray(widths)
    band = np.repeat(np.arange(len(widths)), widths)
    inverse = (band[None, :] == np.arange(len(widths))[:, None]).astype(np.float32)
    forward = (inverse / widths[:, None].astype(np.float32)).T
    return np.ascontiguousarray(forward), inverse


def stft(audio: np.ndarray) -> np.ndarray:
    """Complex spectrum [len // HOP, FREQ_BINS] (libDF frame_analysis, frame after frame)."""
    x = np.asarray(audio, dtype=np.float32)
    frames = len(x) // HOP
    padded = np.concatenate([np.zeros(FFT_SIZE - HOP, np.float32), x[:frames * HOP]])
    idx = np.arange(frames)[:, None] * HOP + np.arange(FFT_SIZE)[None, :]
    spec = np.fft.rfft(padded[idx] * vorbis_window(), axis=-1) * (2 * HOP / FFT_SIZE ** 2)
    return spec.astype(np.complex64)


def istft(spec: np.ndarray) -> np.ndarray:
    """Samples [frames * HOP] (libDF frame_synthesis): unscaled inverse FFT, window, overlap-add;
    output block k = first half of frame k + second half of frame k - 1."""
    frames = np.fft.irfft(np.asarray(spec, np.complex128), n=FFT_SIZE, axis=-1) * FFT_SIZE
    frames = (frames * vorbis_window()).astype(np.float32)
    out = frames[:, :HOP].copy()
    out[1:] += frames[:-1, HOP:]
    return out.reshape(-1)


def band_mean_norm(x: np.ndarray, alpha: float, state: np.ndarray | None = None) -> np.ndarray:
    """libDF band_mean_norm_erb over frames [T, E]: s = x (1 - a) + s a; out = (x - s) / 40."""
    s = (np.linspace(*MEAN_NORM_INIT, x.shape[-1], dtype=np.float32) if state is None
         else np.array(state, np.float32))
    a = np.float32(alpha)
    out = np.empty(x.shape, np.float32)
    for t, frame in enumerate(np.asarray(x, np.float32)):
        s = frame * (np.float32(1) - a) + s * a
        out[t] = (frame - s) / np.float32(40)
    return out


def band_unit_norm(x: np.ndarray, alpha: float, state: np.ndarray | None = None) -> np.ndarray:
    """libDF band_unit_norm over frames [T, F] complex: s = |x| (1 - a) + s a; out = x / sqrt(s)."""
    s = (np.linspace(*UNIT_NORM_INIT, x.shape[-1], dtype=np.float32) if state is None
         else np.array(state, np.float32))
    a = np.float32(alpha)
    out = np.empty(x.shape, np.complex64)
    for t, frame in enumerate(np.asarray(x, np.complex64)):
        s = np.abs(frame) * (np.float32(1) - a) + s * a
        out[t] = frame / np.sqrt(s)
    return out


def features(audio48k: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """DeepFilterNet's df_features: (spec complex [S, 481], feat_erb [1, 1, S, 32], feat_spec
    [1, 2, S, 96] with real and imaginary parts as channels), S = len // 480."""
    spec = stft(audio48k)
    alpha = norm_alpha()
    forward, _ = erb_filterbank()
    power = (spec.real.astype(np.float32) ** 2 + spec.imag.astype(np.float32) ** 2) @ forward
    feat_erb = band_mean_norm(10 * np.log10(power + np.float32(1e-10)), alpha)
    unit = band_unit_norm(spec[:, :NB_DF], alpha)
    feat_spec = np.stack([unit.real, unit.imag]).astype(np.float32)[None]
    return spec, feat_erb[None, None], feat_spec


def _shift_lookahead(feat: np.ndarray) -> np.ndarray:
    """DfNet.pad_feat: drop the first CONV_LOOKAHEAD frames (axis 2), append as many zero frames."""
    pad = np.zeros(feat.shape[:2] + (CONV_LOOKAHEAD,) + feat.shape[3:], feat.dtype)
    return np.ascontiguousarray(np.concatenate([feat[:, :, CONV_LOOKAHEAD:], pad], axis=2))


def encoder_feeds(audio48k: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """(spec, enc feeds) of `enhance`: audio padded with FFT_SIZE zeros, features shifted by the
    convolutions' look-ahead."""
    padded = np.concatenate([np.asarray(audio48k, np.float32), np.zeros(FFT_SIZE, np.float32)])
    spec, feat_erb, feat_spec = features(padded)
    return spec, {"feat_erb": _shift_lookahead(feat_erb), "feat_spec": _shift_lookahead(feat_spec)}


def decoder_feeds(enc_out: Mapping[str, np.ndarray]) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    erb = {k: enc_out[k] for k in ("emb", "e3", "e2", "e1", "e0")}
    return erb, {"emb": enc_out["emb"], "c0": enc_out["c0"]}


def apply_mask(spec: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Mask [S, 32] ERB gains applied to spec [S, 481] via the inverse filterbank."""
    _, inverse = erb_filterbank()
    return (spec * (np.asarray(mask, np.float32) @ inverse)).astype(np.complex64)


def deep_filter(spec: np.ndarray, coefs: np.ndarray) -> np.ndarray:
    """MF.DF: coefs [S, NB_DF, 2 * DF_ORDER] (re, im of tap 0, re, im of tap 1, ...); out[t, f] =
    sum_n spec[t - (DF_ORDER - 1 - DF_LOOKAHEAD) + n, f] * tap_n[t, f] over the first NB_DF bins,
    frames outside the spectrum taken as zero."""
    c = np.asarray(coefs, np.float32).reshape(coefs.shape[0], NB_DF, DF_ORDER, 2)
    taps = c[..., 0] + 1j * c[..., 1]  # [S, F, N]
    frames = spec.shape[0]
    padded = np.concatenate([np.zeros((DF_ORDER - 1 - DF_LOOKAHEAD, NB_DF), spec.dtype), spec[:, :NB_DF],
                             np.zeros((DF_LOOKAHEAD, NB_DF), spec.dtype)])
    out = np.zeros((frames, NB_DF), np.complex128)
    for n in range(DF_ORDER):
        out += padded[n:n + frames] * taps[:, :, n]
    return out.astype(np.complex64)


def enhance(graphs: Mapping[str, Run], audio48k: np.ndarray) -> np.ndarray:
    """Enhanced audio, aligned with `audio48k` and of its length (df.enhance.enhance, pad=True)."""
    audio48k = np.asarray(audio48k, np.float32)
    spec, enc_feeds = encoder_feeds(audio48k)
    erb_feeds, df_feeds = decoder_feeds(graphs["enc"](enc_feeds))
    mask = graphs["erb_dec"](erb_feeds)["m"]
    coefs = graphs["df_dec"](df_feeds)["coefs"]
    enhanced = apply_mask(spec, mask[0, 0])
    enhanced[:, :NB_DF] = deep_filter(spec, coefs[0])
    return istft(enhanced)[DELAY:DELAY + len(audio48k)]


# ---------------------------------------------------------------- sessions


def session_runner(path: str | Path, threads: int = 1) -> Run:
    """run(feeds) -> {output: array} over an ORT session with the model's q4c session config."""
    import onnx

    from q4c import ort as q4c_ort

    proto = onnx.load(str(path))
    session = q4c_ort.make_session(proto, threads=threads, config=q4c_ort.session_config(proto))
    return functools.partial(q4c_ort.run, session)


def graph_runners(paths: Mapping[str, str | Path], threads: int = 1) -> dict[str, Run]:
    missing = [g for g in GRAPHS if g not in paths]
    if missing:
        raise ConfigError(f"DeepFilterNet3 needs graphs {', '.join(GRAPHS)}; missing {', '.join(missing)}")
    return {g: session_runner(paths[g], threads) for g in GRAPHS}


def resolve_paths(args: Sequence[str | Path]) -> dict[str, Path]:
    """A directory holding enc/erb_dec/df_dec (plain, `dfn3_`-prefixed, `.q4.onnx`), or three files
    in the order enc, erb_dec, df_dec."""
    paths = [Path(a) for a in args]
    if len(paths) == 1 and paths[0].is_dir():
        found = {}
        for g in GRAPHS:
            names = [f"{p}{g}{s}" for p in ("", "dfn3_") for s in (".onnx", ".q4.onnx")]
            hits = [paths[0] / n for n in names if (paths[0] / n).is_file()]
            if len(hits) != 1:
                raise ConfigError(f"{paths[0]}: expected exactly one of {', '.join(names)}, found {len(hits)}")
            found[g] = hits[0]
        return found
    if len(paths) != 3:
        raise ConfigError("give a directory of the three graphs or three files (enc, erb_dec, df_dec)")
    for p in paths:
        if not p.is_file():
            raise ConfigError(f"{p}: no such file")
    return dict(zip(GRAPHS, paths, strict=True))


def fp32_paths() -> dict[str, Path]:
    import fetch

    return {g: fetch.model_path(f"dfn3_{g}") for g in GRAPHS}


@functools.cache
def _fp32_graphs() -> dict[str, Run]:
    return graph_runners(fp32_paths())


# ---------------------------------------------------------------- calibration and system driver


@functools.cache
def _clips(split: str) -> tuple[tuple[str, np.ndarray], ...]:
    import audio

    return tuple(audio.load(split, SR))


@functools.cache
def _fp32_encoder(name: str) -> dict[str, np.ndarray]:
    """FP32 encoder outputs on calibration clip `name` (computed once per process)."""
    clip = dict(_clips("calib"))[name]
    return _fp32_graphs()["enc"](encoder_feeds(clip)[1])


def calib_enc() -> Iterator[dict[str, np.ndarray]]:
    """One enc feed dict per calibration clip."""
    for _, clip in _clips("calib"):
        yield encoder_feeds(clip)[1]


def calib_erb_dec() -> Iterator[dict[str, np.ndarray]]:
    """One erb_dec feed dict per calibration clip: the FP32 encoder's outputs."""
    for name, _ in _clips("calib"):
        yield decoder_feeds(_fp32_encoder(name))[0]


def calib_df_dec() -> Iterator[dict[str, np.ndarray]]:
    """One df_dec feed dict per calibration clip: the FP32 encoder's outputs."""
    for name, _ in _clips("calib"):
        yield decoder_feeds(_fp32_encoder(name))[1]


def run(graphs: Mapping[str, Run], sample: np.ndarray) -> dict[str, np.ndarray]:
    """System driver (issue 14): a sample is one 48 kHz clip."""
    return {"enhanced": enhance(graphs, sample)}


def samples() -> list[np.ndarray]:
    """System samples: the calibration clips."""
    return [clip for _, clip in _clips("calib")]


# ---------------------------------------------------------------- metrics


def _to_16k(x: np.ndarray) -> np.ndarray:
    from scipy.signal import resample_poly

    return resample_poly(np.asarray(x, np.float64), 1, 3)


def stoi(reference: np.ndarray, degraded: np.ndarray) -> float | None:
    """STOI of `degraded` against `reference` (48 kHz in, computed at 16 kHz); None without pystoi."""
    try:
        from pystoi import stoi as _stoi
    except ImportError:
        return None
    return float(_stoi(_to_16k(reference), _to_16k(degraded), 16000, extended=False))


def pesq_wb(reference: np.ndarray, degraded: np.ndarray) -> float | None:
    """Wideband PESQ (MOS-LQO) at 16 kHz; None without pesq, nan when PESQ finds no utterance."""
    try:
        from pesq import PesqError
        from pesq import pesq as _pesq
    except ImportError:
        return None
    try:
        return float(_pesq(16000, _to_16k(reference), _to_16k(degraded), "wb"))
    except PesqError:
        return float("nan")


def nonspeech(speech_mask: np.ndarray, margin: int = SR // 5) -> np.ndarray:
    """Samples at least `margin` (200 ms: reverb tails, filter look-ahead) away from any speech."""
    count = np.concatenate([[0], np.cumsum(np.asarray(speech_mask, np.int64))])
    i = np.arange(len(speech_mask))
    lo, hi = np.maximum(i - margin, 0), np.minimum(i + margin + 1, len(speech_mask))
    return count[hi] - count[lo] == 0  # no speech sample within i - margin .. i + margin


def noise_drop_db(noisy: np.ndarray, enhanced: np.ndarray, noise_only: np.ndarray) -> float | None:
    """Energy removed from the noise-only samples, 10 log10(E_noisy / E_enhanced) in dB; None when
    there is under 0.1 s of them or their level is below -90 dBFS (e.g. 16-bit dither)."""
    n = min(len(noisy), len(enhanced), len(noise_only))
    sel = noise_only[:n]
    e_in = float(np.sum(np.square(noisy[:n][sel], dtype=np.float64)))
    if sel.sum() < SR // 10 or e_in < 1e-9 * sel.sum():
        return None
    return round(10 * np.log10(e_in / max(float(np.sum(np.square(enhanced[:n][sel], dtype=np.float64))), 1e-30)), 2)


def clip_metrics(fp32_enhanced: np.ndarray, enhanced: np.ndarray, clean: np.ndarray | None = None,
                 noisy: np.ndarray | None = None, noise_only: np.ndarray | None = None) -> dict[str, float | None]:
    """sqnr_db of `enhanced` vs the FP32 system's output; STOI / PESQ of both against `clean`
    when given (keys stoi_fp32, stoi, pesq_fp32, pesq), else of `enhanced` against the FP32 output;
    with `noisy` and a `noise_only` sample mask, the noise energy each removed (noise_drop_fp32,
    noise_drop, dB)."""
    out: dict[str, float | None] = {"sqnr_db": sqnr_db(fp32_enhanced, enhanced)}
    if clean is None:
        out.update(stoi=stoi(fp32_enhanced, enhanced), pesq=pesq_wb(fp32_enhanced, enhanced))
    else:
        out.update(stoi_fp32=stoi(clean, fp32_enhanced), stoi=stoi(clean, enhanced),
                   pesq_fp32=pesq_wb(clean, fp32_enhanced), pesq=pesq_wb(clean, enhanced))
    if noisy is not None and noise_only is not None:
        out.update(noise_drop_fp32=noise_drop_db(noisy, fp32_enhanced, noise_only),
                   noise_drop=noise_drop_db(noisy, enhanced, noise_only))
    return out


def _clean_reference(split: str) -> dict[str, np.ndarray] | None:
    """Clean speech of each clip, if models/real/audio.py exposes it (`load_clean(split, sr)`)."""
    import audio

    load_clean = getattr(audio, "load_clean", None)
    return dict(load_clean(split, SR)) if load_clean is not None else None


def _speech_mask(name: str) -> np.ndarray:
    import audio

    return audio.speech_mask(name, SR)


def evaluate(graphs: Mapping[str, Run], fp32: Mapping[str, Run], split: str = "test") -> dict:
    """Per-clip and mean metrics of `graphs` against `fp32` on `split`, with seconds of compute per
    second of audio (`rtf`, `rtf_fp32`) for each."""
    clean = _clean_reference(split)
    rows, seconds, fp32_seconds, audio_seconds = [], 0.0, 0.0, 0.0
    for name, clip in _clips(split):
        t0 = time.perf_counter()
        ref = enhance(fp32, clip)
        t1 = time.perf_counter()
        out = enhance(graphs, clip)
        seconds += time.perf_counter() - t1
        fp32_seconds += t1 - t0
        audio_seconds += len(clip) / SR
        rows.append({"clip": name, **clip_metrics(ref, out, None if clean is None else clean.get(name),
                                                  clip, nonspeech(_speech_mask(name)))})
    mean = {}
    for key in (k for k in (rows[0] if rows else {}) if k != "clip"):
        values = [r[key] for r in rows if r[key] is not None]
        mean[key] = float(np.nanmean(values)) if values else None
    return {"reference": "clean speech" if clean is not None else "FP32-enhanced audio", "clips": rows,
            "mean": mean, "rtf": seconds / max(audio_seconds, 1e-9),
            "rtf_fp32": fp32_seconds / max(audio_seconds, 1e-9)}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="+", help="directory of enc/erb_dec/df_dec, or the three files in that order")
    parser.add_argument("--against", nargs="+", default=None, help="FP32 graphs (default: the fetched export)")
    parser.add_argument("--split", default="test", choices=("calib", "test"))
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    try:
        graphs = graph_runners(resolve_paths(args.model), args.threads)
        fp32 = graph_runners(resolve_paths(args.against) if args.against else fp32_paths(), args.threads)
        result = evaluate(graphs, fp32, args.split)
    except Q4cError as e:
        print(f"Error: {e}", file=sys.stderr)
        return 1
    keys = list(result["mean"])
    print(f"# STOI / PESQ against {result['reference']}")
    print("\t".join(["clip", *keys]))
    for row in result["clips"] + [{"clip": "mean", **result["mean"]}]:
        print("\t".join([row["clip"], *("-" if row[k] is None else f"{row[k]:.3f}" for k in keys)]))
    print(f"seconds per second of audio: {result['rtf']:.4f} (FP32 {result['rtf_fp32']:.4f}, {args.threads} thread)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
