"""Drive the six Silero VAD ONNX exports as the silero-vad package (6.2.3) drives them, with numpy
and onnxruntime only.

Streaming exports: the audio is cut into chunks of 512 samples at 16 kHz (256 at 8 kHz), the last
one zero-padded; each call gets one chunk prefixed by the last 64 samples (32 at 8 kHz) of the
previous chunk (zeros before the first), as input [1, 576] ([1, 288]); the state [2, 1, 128]
starts at zero and is carried from `stateN` to `state`; `sr` (int64 scalar) is fed where the export
has that input. The sequence export gets the same [576]-sample rows stacked as one input
[N, 576] per block of at most 512 chunks, with h/c [1, 1, 128] carried between blocks.

    probs(run, audio, export, sr=16000)   speech probability per chunk
    session_runner(path)                  `run` over an ORT session (1 thread, q4c session config)
    calib_<export>()                      `q4c compile --calib-reader models/real/silero.py:calib_<export>`
    to_8k(audio16k)                       the 8 kHz version the readers and the judge use

    python models/real/silero.py EXPORT MODEL.onnx [--against FP32.onnx]

prints, on the test split, the speech/non-speech decision flips at threshold 0.5 and the shift of
the speech-segment boundaries (get_speech_timestamps defaults) of MODEL against the FP32 export.
"""

import argparse
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

Feeds = dict[str, np.ndarray]
Run = Callable[[Feeds], dict[str, np.ndarray]]

#: samples per chunk and context samples per sample rate
CHUNK = {16000: (512, 64), 8000: (256, 32)}
STATE_SHAPE = (2, 1, 128)
HC_SHAPE = (1, 1, 128)
#: chunks per call of the sequence export (the package's DEFAULT_MAX_FRAMES)
SEQUENCE_MAX_FRAMES = 512


@dataclass(frozen=True)
class Export:
    name: str
    kind: str  # "streaming": one chunk per call; "sequence": a block of chunks per call
    sr_input: bool  # the export has an int64 `sr` input
    rates: tuple[int, ...]  # sample rates it takes (the package allows 8000 unless "16k" is in the name)
    output: str  # the speech probability
    state_pairs: dict[str, str]  # output -> input, carried call to call


EXPORTS: dict[str, Export] = {e.name: e for e in (
    Export("silero_vad", "streaming", True, (16000, 8000), "output", {"stateN": "state"}),
    Export("silero_vad_16k_op15", "streaming", True, (16000,), "output", {"stateN": "state"}),
    Export("silero_vad_half", "streaming", False, (16000,), "output", {"stateN": "state"}),
    Export("silero_vad_op18_ifless", "streaming", True, (16000, 8000), "output", {"stateN": "state"}),
    Export("silero_vad_openvino_16k", "streaming", False, (16000,), "output", {"stateN": "state"}),
    Export("silero_vad_16k_sequence", "sequence", False, (16000,), "speech_probs", {"hn": "h", "cn": "c"}),
)}


def _export(export: str | Export) -> Export:
    if isinstance(export, Export):
        return export
    if export not in EXPORTS:
        raise ValueError(f"unknown Silero export {export!r}; known: {', '.join(EXPORTS)}")
    return EXPORTS[export]


def _rows(audio: np.ndarray, sr: int) -> np.ndarray:
    """[n_chunks, context + chunk]: each zero-padded chunk prefixed by the previous one's tail."""
    chunk, context = CHUNK[sr]
    audio = np.asarray(audio, dtype=np.float32).reshape(-1)
    n = -(-audio.size // chunk)
    frames = np.zeros((n, chunk), dtype=np.float32)
    frames.reshape(-1)[: audio.size] = audio
    contexts = np.zeros((n, context), dtype=np.float32)
    if n > 1:
        contexts[1:] = frames[:-1, -context:]
    return np.concatenate([contexts, frames], axis=1)


def calls(audio: np.ndarray, export: str | Export, sr: int = 16000) -> list[Feeds]:
    """The feeds of every call on one utterance, without the state inputs (which the caller
    carries: zeros first, then the previous call's outputs)."""
    ex = _export(export)
    if sr not in ex.rates:
        raise ValueError(f"{ex.name} takes sample rates {ex.rates}, not {sr}")
    rows = _rows(audio, sr)
    if ex.kind == "sequence":
        return [{"input": rows[i: i + SEQUENCE_MAX_FRAMES]} for i in range(0, len(rows), SEQUENCE_MAX_FRAMES)]
    extra = {"sr": np.array(sr, dtype=np.int64)} if ex.sr_input else {}
    return [{"input": rows[i: i + 1], **extra} for i in range(len(rows))]


def initial_state(export: str | Export) -> Feeds:
    ex = _export(export)
    shape = HC_SHAPE if ex.kind == "sequence" else STATE_SHAPE
    return {name: np.zeros(shape, dtype=np.float32) for name in ex.state_pairs.values()}


def probs(run: Run, audio: np.ndarray, export: str | Export, sr: int = 16000) -> np.ndarray:
    """Speech probability per chunk (512 samples at 16 kHz, 256 at 8 kHz), state carried."""
    ex = _export(export)
    state = initial_state(ex)
    out: list[np.ndarray] = []
    for feeds in calls(audio, ex, sr):
        result = run({**feeds, **state})
        out.append(np.asarray(result[ex.output], dtype=np.float32).reshape(-1))
        state = {inp: result[o] for o, inp in ex.state_pairs.items()}
    return np.concatenate(out) if out else np.zeros(0, dtype=np.float32)


def session_runner(path: str | Path, threads: int = 1) -> Run:
    """`run` over an ONNX Runtime session with the session config q4c records in the model."""
    import onnx

    from q4c.ort import make_session, run

    session = make_session(onnx.load(str(path)), threads=threads)

    def run_once(feeds: Feeds) -> dict[str, np.ndarray]:
        return run(session, feeds)

    return run_once


# --- calibration readers ------------------------------------------------------------------------

def to_8k(audio: np.ndarray) -> np.ndarray:
    """16 kHz -> 8 kHz: a 63-tap Hann-windowed sinc low-pass at 4 kHz, then every other sample."""
    n = np.arange(-31, 32)
    taps = 0.5 * np.sinc(n / 2) * np.hanning(65)[1:-1]
    taps /= taps.sum()
    return np.convolve(np.asarray(audio, dtype=np.float64), taps, mode="same")[::2].astype(np.float32)


#: exports that take 8 kHz get every EIGHT_K_EVERY-th calibration clip at 8 kHz (from the second on)
EIGHT_K_EVERY = 3


def calib_rate(index: int, export: str) -> int:
    """The sample rate calibration clip `index` is given at: 16 kHz, or 8 kHz for every third clip
    (1, 4, 7, ...) of the exports that take 8 kHz, so that any prefix of four or more samples
    (compile takes the first --calib-samples; the scores the first four) runs both branches."""
    return 8000 if 8000 in EXPORTS[export].rates and index % EIGHT_K_EVERY == 1 else 16000


def _calib_samples(export: str) -> list[list[Feeds]]:
    """One sample per calibration clip: the list of its calls, the first with a zero state, at
    the clip's rate (`calib_rate`). Each clip is given once, at one rate: --require resamples
    the held-out samples as independent units (q4c.requirements), which the same recording at two
    rates would not be."""
    import audio as audio_data

    ex = EXPORTS[export]
    samples: list[list[Feeds]] = []
    for i, (_, wave) in enumerate(audio_data.load("calib", 16000)):
        sr = calib_rate(i, export)
        steps = calls(wave if sr == 16000 else to_8k(wave), ex, sr)
        steps[0] = {**steps[0], **initial_state(ex)}
        samples.append(steps)
    return samples


def _reader(export: str) -> Callable[[], list[list[Feeds]]]:
    def read() -> list[list[Feeds]]:
        return _calib_samples(export)

    read.__name__ = f"calib_{export}"
    read.__doc__ = f"Calibration samples of {export}: one per utterance, the list of its calls."
    read.state_pairs = dict(EXPORTS[export].state_pairs)  # type: ignore[attr-defined]
    return read


calib_silero_vad = _reader("silero_vad")
calib_silero_vad_16k_op15 = _reader("silero_vad_16k_op15")
calib_silero_vad_half = _reader("silero_vad_half")
calib_silero_vad_op18_ifless = _reader("silero_vad_op18_ifless")
calib_silero_vad_openvino_16k = _reader("silero_vad_openvino_16k")
calib_silero_vad_16k_sequence = _reader("silero_vad_16k_sequence")


# --- task metrics on the test split -------------------------------------------------------------

def compare(model: str | Path, reference: str | Path, export: str, split: str = "test") -> Iterator[dict]:
    """Per sample rate the export takes: flips (fraction of chunks) and boundary shift (ms) of
    `model` against `reference` over every utterance of the split."""
    import audio as audio_data

    from q4c.metrics import boundary_shift_ms, decision_flips, speech_segments

    ex = EXPORTS[export]
    run_model, run_ref = session_runner(model), session_runner(reference)
    utterances = audio_data.load(split, 16000)
    for sr in ex.rates:
        ref_all, act_all, ref_segs, act_segs = [], [], [], []
        offset = 0
        for _, wave in utterances:
            x = wave if sr == 16000 else to_8k(wave)
            p_ref, p_act = probs(run_ref, x, ex, sr), probs(run_model, x, ex, sr)
            ref_all.append(p_ref)
            act_all.append(p_act)
            # segments of all utterances on one time line, so the shift averages over all of them
            ref_segs += [(s + offset, e + offset) for s, e in speech_segments(p_ref, sr=sr, audio_length=x.size)]
            act_segs += [(s + offset, e + offset) for s, e in speech_segments(p_act, sr=sr, audio_length=x.size)]
            offset += x.size + sr  # a second of gap: no segment is matched across utterances
        ref_p, act_p = np.concatenate(ref_all), np.concatenate(act_all)
        yield {"sr": sr, "utterances": len(utterances), "chunks": int(ref_p.size),
               "flips": decision_flips(ref_p, act_p), "boundary_shift_ms": boundary_shift_ms(ref_segs, act_segs, sr),
               "segments_ref": len(ref_segs), "segments_act": len(act_segs)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("export", choices=list(EXPORTS))
    parser.add_argument("model", help="the (compiled) model to judge")
    parser.add_argument("--against", help="FP32 reference (default: the fetched export)")
    parser.add_argument("--split", default="test", choices=("calib", "test"))
    args = parser.parse_args(argv)
    from q4c.errors import Q4cError

    try:
        if args.against is None:
            import fetch

            args.against = str(fetch.model_path(args.export))
        for row in compare(args.model, args.against, args.export, args.split):
            print(f"{args.export} @ {row['sr']} Hz, {row['utterances']} utterances, {row['chunks']} chunks: "
                  f"flips {100 * row['flips']:.2f} %, boundary shift {row['boundary_shift_ms']:.1f} ms "
                  f"(segments {row['segments_ref']} ref, {row['segments_act']} model)")
    except Q4cError as err:
        print(f"Error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
