"""Measure models the way they are deployed: ONNX Runtime latency (whole inputs or streamed in
chunks with state carried between them), real-time factor on audio features, and peak memory.

Rules (all documented in the `q4c bench` help and the README):

- A *call* is one `session.run`. Latency percentiles are over timed calls after warm-up; with
  two models, each iteration runs both, alternating which goes first, and the *ratio* of a pair is
  MODEL time / OTHER time for the same input (median and p90 over pairs; below 1 means MODEL is
  faster). In streaming mode the pair is one whole stream (all chunks of a sample). Process CPU
  time per input (`cpu_p50_ms`, ratio `cpu_p50`; q4c.timing) is reported beside wall time: on a shared
  machine it is the steadier of the two.
- *Audio features*: a float input shaped [batch, T, 80] is T frames of `hop_ms` each per batch
  entry, so the call covers batch * T * hop_ms / 1000 seconds of audio; RTF = latency / that
  (below 1 is faster than real time).
- *Streaming* (`chunk=N`): every non-state input of rank >= 2 is split along axis 1 into chunks of
  N (the last may be shorter) and the chunks run in order. State input/output pairs follow
  q4c.signature's one rule (the same pairs `compile --calib` carries), by name: `h_in`/`h_out`,
  `h0`/`h_n`, `state`/`stateN`, `cache_prev`/`cache_next`, ... Each chunk's state outputs feed the
  next chunk's state inputs; the first chunk takes the sample's values.
- *Peak memory*: a fresh Python subprocess imports ONNX Runtime, resets its peak RSS
  (/proc/self/clear_refs), then loads the model, creates the session and runs one call;
  `peak_rss_bytes` is its VmHWM and `rss_growth_bytes` the growth over the RSS after imports
  (resource.getrusage's ru_maxrss where /proc is missing). Both models are measured the same way.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx

from q4c import ort as q4ort
from q4c import signature
from q4c.calib.readers import Feeds
from q4c.errors import ConfigError, DataError
from q4c.signature import TensorSpec as InputSpec
from q4c.signature import input_specs, output_specs
from q4c.timing import round_order, timed

logger = logging.getLogger(__name__)

SCHEMA = "q4c.bench/1"
FEATURE_DIM = 80

Progress = Callable[[int], None]


# -- streaming --------------------------------------------------------------------------------

def state_pairs(model: onnx.ModelProto) -> dict[str, str]:
    """{state input name: state output name}: q4c.signature.state_pairs, keyed by input."""
    return {i: o for o, i in signature.state_pairs(model).items()}


def stream_specs(model: onnx.ModelProto, pairs: Mapping[str, str]) -> list[InputSpec]:
    """Input specs for validating a long sample to stream: the streamed axis 1 may be any length."""
    streamed = {s.name for s in streamed_inputs(model, pairs)}
    return [InputSpec(s.name, s.dtype, (s.shape[0], None, *s.shape[2:])) if s.name in streamed else s
            for s in input_specs(model)]


def streamed_inputs(model: onnx.ModelProto, pairs: Mapping[str, str]) -> list[InputSpec]:
    """The inputs split along axis 1: every non-state input of rank >= 2."""
    streamed = [s for s in input_specs(model) if s.name not in pairs and len(s.shape) >= 2]
    if not streamed:
        raise ConfigError("--chunk needs an input with a time axis (rank >= 2, axis 1) that is not a state input; "
                          f"the model's inputs are {'; '.join(s.describe() for s in input_specs(model))}")
    return streamed


def chunk_feeds(feeds: Feeds, streamed: Sequence[InputSpec], chunk: int) -> list[Feeds]:
    """Split the streamed inputs of one sample along axis 1; other inputs ride along unchanged."""
    if chunk < 1:
        raise ConfigError(f"--chunk must be >= 1, not {chunk}")
    lengths = {s.name: feeds[s.name].shape[1] for s in streamed}
    if len(set(lengths.values())) != 1:
        raise DataError(f"streamed inputs differ in length along axis 1: {lengths}; --chunk splits them together")
    total = next(iter(lengths.values()))
    for spec in streamed:
        fixed = spec.shape[1]
        if isinstance(fixed, int) and fixed > 0 and (chunk != fixed or total % chunk):
            raise ConfigError(f"input {spec.name!r} has a fixed time axis of {fixed}: use --chunk {fixed} "
                              f"(and a length divisible by it; the sample has {total})")
    pieces = []
    for start in range(0, total, chunk):
        pieces.append({k: (v[:, start:start + chunk] if k in lengths else v) for k, v in feeds.items()})
    return pieces


@dataclass
class StreamResult:
    """Outputs of every chunk in order, the state after the last chunk, and per-chunk seconds."""

    outputs: list[dict[str, np.ndarray]]
    final_state: dict[str, np.ndarray]
    seconds: list[float] = field(default_factory=list)


def run_stream(run: Callable[[Feeds], dict[str, np.ndarray]], chunks: Sequence[Feeds],
               pairs: Mapping[str, str]) -> StreamResult:
    """Run `chunks` in order, feeding each chunk's state outputs to the next chunk's state inputs."""
    state: dict[str, np.ndarray] = {}
    outputs, seconds = [], []
    for piece in chunks:
        feeds = {**piece, **state}
        out, wall, _ = timed(lambda feeds=feeds: run(feeds))
        seconds.append(wall)
        outputs.append(out)
        state = {name_in: out[name_out] for name_in, name_out in pairs.items()}
    final = {pairs[k]: v for k, v in state.items()}
    return StreamResult(outputs, final, seconds)


# -- audio ------------------------------------------------------------------------------------

def audio_seconds(model: onnx.ModelProto, feeds: Feeds, hop_ms: float) -> float | None:
    """Seconds of audio in `feeds`: the first float [batch, T, 80] input is batch * T frames."""
    if hop_ms <= 0:
        return None
    for spec in input_specs(model):
        value = feeds.get(spec.name)
        if value is not None and np.issubdtype(value.dtype, np.floating) and value.ndim == 3 \
                and value.shape[2] == FEATURE_DIM:
            return value.shape[0] * value.shape[1] * hop_ms / 1000.0
    return None


# -- latency ----------------------------------------------------------------------------------

@dataclass
class _Subject:
    path: str
    model: onnx.ModelProto
    session: Any
    pairs: dict[str, str]
    streamed: list[InputSpec]
    calls: list[float] = field(default_factory=list)  # seconds per session.run
    units: list[float] = field(default_factory=list)  # seconds per whole input (= calls unless streaming)
    cpu_units: list[float] = field(default_factory=list)  # process CPU seconds per whole input
    rtf: list[float] = field(default_factory=list)

    def run_once(self, feeds: Feeds, chunk: int | None, hop_ms: float, record: bool) -> float:
        cpu = [0.0]  # CPU seconds inside session.run only, like the wall-clock times

        def call(f: Feeds) -> dict[str, np.ndarray]:
            try:
                out, _, cpu_seconds = timed(lambda: q4ort.run(self.session, f))
            except Exception as e:  # onnxruntime raises its own Fail/InvalidArgument types
                shapes = ", ".join(f"{k} {list(v.shape)}" for k, v in f.items())
                raise DataError(f"{self.path}: ONNX Runtime cannot run the model on inputs {shapes}: "
                                f"{str(e).strip().splitlines()[0]}") from e
            cpu[0] += cpu_seconds
            return out

        if chunk is None:
            _, wall, _ = timed(lambda: call(feeds))
            seconds = [wall]
        else:
            seconds = run_stream(call, chunk_feeds(feeds, self.streamed, chunk), self.pairs).seconds
        total = sum(seconds)
        if record:
            self.cpu_units.append(cpu[0])
            self.calls.extend(seconds)
            self.units.append(total)
            audio = audio_seconds(self.model, feeds, hop_ms)
            if audio:
                self.rtf.append(total / audio)
        return total


def _percentile(values: Sequence[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if len(values) else None


def bench(
    model_path: str,
    samples: Sequence[Feeds],
    *,
    other_path: str | None = None,
    threads: int = 1,
    iters: int = 50,
    warmup: int = 5,
    chunk: int | None = None,
    hop_ms: float = 10.0,
    memory: bool = True,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Benchmark `model_path` (and `other_path` interleaved with it) on `samples`.

    Returns a `q4c.bench/1` document; `progress(n)` is called after every timed or warm-up
    iteration with the number of iterations just done.
    """
    if iters < 1 or warmup < 0:
        raise ConfigError(f"--iters must be >= 1 and --warmup >= 0 (got {iters}, {warmup})")
    if not samples:
        raise ConfigError("no samples to run")
    subjects = [_subject(model_path, threads, chunk)]
    if other_path is not None:
        subjects.append(_subject(other_path, threads, chunk))
        names = [sorted(s.name for s in input_specs(subject.model)) for subject in subjects]
        if names[0] != names[1]:
            raise ConfigError(f"{other_path} takes inputs {names[1]}, {model_path} takes {names[0]}: "
                              "--vs compares two versions of one model (same inputs)")
    for subject in subjects:
        if chunk is not None and not subject.pairs:
            logger.warning("%s: no state input/output pairs found: chunks run independently", subject.path)
    for i in range(warmup + iters):
        feeds = samples[i % len(samples)]
        for subject in round_order(subjects, i):
            subject.run_once(feeds, chunk, hop_ms, record=i >= warmup)
        if progress is not None:
            progress(1)
    probe_feeds = samples[0] if chunk is None else chunk_feeds(samples[0], subjects[0].streamed, chunk)[0]
    docs = [_describe(s, chunk, threads, probe_feeds if memory else None) for s in subjects]
    ratio = None
    if other_path is not None:
        pairs = [a / b for a, b in zip(subjects[0].units, subjects[1].units) if b > 0]
        cpu_pairs = [a / b for a, b in zip(subjects[0].cpu_units, subjects[1].cpu_units) if b > 0]
        ratio = {"p50": _percentile(pairs, 50), "p90": _percentile(pairs, 90), "pairs": len(pairs),
                 "cpu_p50": _percentile(cpu_pairs, 50)}
    return {"schema": SCHEMA, "threads": threads, "iters": iters, "warmup": warmup, "chunk": chunk,
            "hop_ms": hop_ms, "samples": len(samples), "model": docs[0],
            "vs": docs[1] if len(docs) > 1 else None, "ratio": ratio}


def _subject(path: str, threads: int, chunk: int | None) -> _Subject:
    from q4c import graph as g

    model = g.load(path)
    session = q4ort.make_session(model, threads=threads)
    pairs = state_pairs(model) if chunk is not None else {}
    streamed = streamed_inputs(model, pairs) if chunk is not None else []
    return _Subject(path, model, session, pairs, streamed)


def _describe(s: _Subject, chunk: int | None, threads: int, probe_feeds: Feeds | None) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "path": s.path,
        "p50_ms": _ms(_percentile(s.units, 50)), "p90_ms": _ms(_percentile(s.units, 90)),
        "mean_ms": _ms(float(np.mean(s.units))), "min_ms": _ms(float(np.min(s.units))),
        "cpu_p50_ms": _ms(_percentile(s.cpu_units, 50)),
        "rtf": _percentile(s.rtf, 50),
        "session_config": q4ort.session_config(s.model),
        "peak_rss_bytes": None, "rss_growth_bytes": None,
    }
    if chunk is not None:
        doc["chunks"] = {"size": chunk, "calls": len(s.calls), "p50_ms": _ms(_percentile(s.calls, 50)),
                         "p90_ms": _ms(_percentile(s.calls, 90)), "state_pairs": dict(s.pairs)}
    if probe_feeds is not None:
        doc.update(peak_memory(s.path, probe_feeds, threads))
    return doc


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000.0, 4)


# -- memory -----------------------------------------------------------------------------------

_PROBE = r"""
import json, os, resource, sys
import numpy as np
import onnx
import onnxruntime
from q4c import ort as q4ort

def status():
    try:
        with open("/proc/self/status") as f:
            fields = dict(line.split(":", 1) for line in f if ":" in line)
        return int(fields["VmRSS"].split()[0]) * 1024, int(fields["VmHWM"].split()[0]) * 1024
    except OSError:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        return peak, peak

path, feeds_path, threads = sys.argv[1], sys.argv[2], int(sys.argv[3])
with np.load(feeds_path) as npz:
    feeds = {k: npz[k] for k in npz.files}
try:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS (Linux >= 4.0)
except OSError:
    pass
base, _ = status()
session = q4ort.make_session(onnx.load(path), threads=threads)
q4ort.run(session, feeds)
_, peak = status()
print(json.dumps({"base": base, "peak": peak}))
"""


def peak_memory(path: str, feeds: Feeds, threads: int = 1) -> dict[str, int]:
    """Peak RSS of a fresh process that loads `path` and runs it once on `feeds` (module doc)."""
    with tempfile.TemporaryDirectory(prefix="q4c-bench-") as tmp:
        feeds_path = os.path.join(tmp, "feeds.npz")
        np.savez(feeds_path, **feeds)
        proc = subprocess.run([sys.executable, "-c", _PROBE, str(path), feeds_path, str(threads)],
                              capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise ConfigError(f"{path}: the memory probe subprocess failed: {last}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    return {"peak_rss_bytes": result["peak"], "rss_growth_bytes": max(0, result["peak"] - result["base"])}


__all__ = ["SCHEMA", "bench", "state_pairs", "streamed_inputs", "chunk_feeds", "run_stream", "StreamResult",
           "audio_seconds", "peak_memory", "output_specs", "stream_specs"]
