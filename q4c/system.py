"""Systems of several ONNX graphs that call each other (an encoder and decoders, a transducer's
encoder, predictor and joiner), described by a SPEC and run by a user's driver: loading the SPEC,
running the driver over FP32 or compiled graphs, recording what it feeds each graph, and scoring
the system's outputs.

A SPEC is a TOML file::

    [graphs]                      # name = FP32 ONNX file (relative to the SPEC; ~ expanded)
    enc = "enc.onnx"
    dec = "dec.onnx"
    [driver]
    run = "driver.py:run"         # run(graphs, sample) -> {name: array}; graphs[name](feeds) -> {output: array}
    samples = "driver.py:samples" # samples() -> iterable of whatever run() takes
    [objectives]                  # optional: driver output = kind, as --objective (which wins)
    aligned = "kl"

Compiling a system (one budget, sensitivity on the system's outputs) is q4c.system_compile.
"""

from __future__ import annotations

import re
import time
import tomllib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from q4c import ort as q4ort
from q4c.calib.readers import import_function
from q4c.errors import ConfigError, ModelLoadError, Q4cError
from q4c.objectives import Objective, Scorer

Feeds = dict[str, np.ndarray]
GraphRun = Callable[[Mapping[str, np.ndarray]], dict[str, np.ndarray]]


class DriverError(Q4cError):
    """The system's driver raised, returned something that is not {name: array}, or never
    called a graph of the SPEC."""


@dataclass(frozen=True)
class SystemSpec:
    """A loaded SPEC: graph name -> FP32 ONNX path, and the driver's two functions."""

    path: Path
    graphs: dict[str, Path]
    run: Callable[[Mapping[str, GraphRun], Any], Mapping[str, Any]]
    samples: Callable[[], Iterable[Any]]
    run_name: str
    samples_name: str
    #: [objectives]: (driver output, kind) pairs, the SPEC's defaults for --objective
    objectives: tuple[tuple[str, str], ...] = ()

    def load_samples(self, limit: int | None = None) -> list[Any]:
        """The driver's samples (at most `limit`); its exceptions become one-line DriverErrors."""
        try:
            out = []
            for sample in self.samples():
                out.append(sample)
                if limit is not None and len(out) >= limit:
                    break
        except Q4cError:
            raise
        except Exception as e:
            raise DriverError(f"driver {self.samples_name} raised: {_one_line(e)}") from e
        if not out:
            raise DriverError(f"driver {self.samples_name} returned no samples")
        return out


def load_spec(path: str | Path) -> SystemSpec:
    """Parse and check a SPEC: every graph file exists, both driver functions import."""
    path = Path(path)
    try:
        doc = tomllib.loads(path.read_text())
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the system SPEC: {e.strerror or e}") from e
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from e
    graphs_doc, driver = doc.get("graphs"), doc.get("driver")
    if not isinstance(graphs_doc, dict) or not graphs_doc:
        raise ConfigError(f"{path}: needs a [graphs] table of name = \"file.onnx\"")
    if not isinstance(driver, dict) or not isinstance(driver.get("run"), str) or not isinstance(driver.get("samples"), str):
        raise ConfigError(f"{path}: needs a [driver] table with run = \"file.py:function\" and samples = \"file.py:function\"")
    base = path.resolve().parent
    graphs: dict[str, Path] = {}
    for name, file in graphs_doc.items():
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
            raise ConfigError(f"{path}: graph name {name!r}: use letters, digits, '_', '-', '.' (it names {name}.onnx)")
        if not isinstance(file, str):
            raise ConfigError(f"{path}: graph {name!r}: expected a file path string")
        full = Path(file).expanduser()
        full = full if full.is_absolute() else base / full
        if not full.is_file():
            raise ModelLoadError(f"{path}: graph {name!r}: no such file {full}")
        graphs[name] = full
    objectives = _objectives(path, doc.get("objectives", {}))
    run = _load_function(path, base, "run", driver["run"])
    samples = _load_function(path, base, "samples", driver["samples"])
    return SystemSpec(path, graphs, run, samples, driver["run"], driver["samples"], objectives)


def _objectives(path: Path, table: Any) -> tuple[tuple[str, str], ...]:
    from q4c.objectives import parse_objective

    if not isinstance(table, dict):
        raise ConfigError(f"{path}: [objectives] must be a table of output = \"kind\"")
    pairs = []
    for name, kind in table.items():
        try:
            pairs.append(parse_objective(f"{name}={kind}" if isinstance(kind, str) else f"{name}=?"))
        except ValueError as e:
            raise ConfigError(f"{path}: [objectives]: {e}") from None
    return tuple(pairs)


def _load_function(spec: Path, base: Path, key: str, text: str) -> Callable[..., Any]:
    try:
        return import_function(text, base)
    except ConfigError as e:
        raise ConfigError(f"{spec}: driver {key} = {text!r}: {e}") from e.__cause__


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:300]}" if text else type(e).__name__


# ---------------------------------------------------------------- running the driver


@dataclass
class CallLog:
    """Per graph, the feeds and outputs of every call one driver run made, in order."""

    calls: dict[str, list[tuple[Feeds, dict[str, np.ndarray]]]] = field(default_factory=dict)


class SystemRunner:
    """Runs the driver with one callable per graph; each graph is `run_graph(name, feeds,
    changes)`. `keep_calls` records every call's feeds (and outputs) per sample."""

    def __init__(self, spec: SystemSpec, run_graph: Callable[[str, Feeds, Mapping[str, np.ndarray]], dict[str, np.ndarray]]):
        self.spec = spec
        self.run_graph = run_graph
        self.runs = 0
        self.seconds = 0.0

    def run(self, sample: Any, index: int, changes: Mapping[str, Mapping[str, np.ndarray]] | None = None,
            log: CallLog | None = None, cached: CallLog | None = None) -> dict[str, np.ndarray]:
        """The driver's outputs on `sample` with `changes` (graph -> weight -> values). With
        `cached` (the FP32 run's log of this sample), a graph whose weights are unchanged and whose
        k-th call gets the FP32 run's k-th feeds returns the FP32 outputs without running."""
        changes = changes or {}
        counters: dict[str, int] = {}
        start = time.perf_counter()

        def make(name: str) -> GraphRun:
            def call(feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
                k = counters.get(name, 0)
                counters[name] = k + 1
                feeds = {key: np.asarray(v) for key, v in feeds.items()}
                if cached is not None and not changes.get(name):
                    previous = cached.calls.get(name, [])
                    if k < len(previous) and _same_feeds(previous[k][0], feeds):
                        return dict(previous[k][1])
                try:
                    out = self.run_graph(name, feeds, changes.get(name, {}))
                except Q4cError as e:
                    raise DriverError(f"graph {name!r} failed on call {k + 1} of sample {index} of driver "
                                      f"{self.spec.run_name}: {e}") from e
                if log is not None:
                    log.calls.setdefault(name, []).append((feeds, out))
                return dict(out)
            return call

        graphs = {name: make(name) for name in self.spec.graphs}
        try:
            result = self.spec.run(graphs, sample)
        except DriverError:
            raise
        except Exception as e:
            raise DriverError(f"driver {self.spec.run_name} raised on sample {index}: {_one_line(e)}") from e
        self.runs += 1
        self.seconds += time.perf_counter() - start
        return _check_outputs(result, self.spec.run_name, index)


def _same_feeds(a: Mapping[str, np.ndarray], b: Mapping[str, np.ndarray]) -> bool:
    return a.keys() == b.keys() and all(a[k].shape == b[k].shape and a[k].dtype == b[k].dtype
                                        and np.array_equal(a[k], b[k]) for k in a)


def _check_outputs(result: Any, run_name: str, index: int) -> dict[str, np.ndarray]:
    if not isinstance(result, Mapping) or not result:
        raise DriverError(f"driver {run_name} returned {type(result).__name__} on sample {index}; "
                          f"expected a non-empty {{name: array}} dict")
    try:
        return {str(k): np.asarray(v) for k, v in result.items()}
    except Exception as e:
        raise DriverError(f"driver {run_name}: output of sample {index} is not an array: {_one_line(e)}") from e


def session_graph_runner(models: Mapping[str, onnx.ModelProto], threads: int = 1
                         ) -> Callable[[str, Feeds, Mapping[str, np.ndarray]], dict[str, np.ndarray]]:
    """run_graph for SystemRunner over one ORT session per graph (each with its recorded q4c
    session config); weight changes are not supported here."""
    sessions = {name: q4ort.make_session(m, threads=threads) for name, m in models.items()}

    def run_graph(name: str, feeds: Feeds, changes: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        assert not changes
        return q4ort.run(sessions[name], feeds)
    return run_graph


def check_all_called(spec: SystemSpec, logs: Sequence[CallLog]) -> None:
    never = [name for name in spec.graphs if not any(log.calls.get(name) for log in logs)]
    if never:
        raise DriverError(f"graph {', '.join(map(repr, never))} of {spec.path} is never called by driver "
                          f"{spec.run_name} on {len(logs)} sample(s); remove it from [graphs] or call it")


# ---------------------------------------------------------------- scoring the system's outputs


def system_objectives(outputs: Mapping[str, np.ndarray], overrides: Sequence[tuple[str, str]] = (),
                      spec: Sequence[tuple[str, str]] = ()) -> dict[str, Objective]:
    """Per driver output: snr for float arrays, ignore for others; the SPEC's [objectives] win over
    that and `--objective NAME=KIND` over both (kl takes the output as logits over its last axis).
    An objective naming no output is an error."""
    found = {}
    for name, value in outputs.items():
        if np.issubdtype(value.dtype, np.floating) or np.issubdtype(value.dtype, np.complexfloating):
            found[name] = Objective(name, "snr", "float system output")
        else:
            found[name] = Objective(name, "ignore", "not a float output")
    for where, pairs in (("[objectives] of the SPEC", spec), ("--objective", overrides)):
        for name, kind in pairs:
            if name not in found:
                raise ConfigError(f"{where} names {name!r}, not an output of the system's driver "
                                  f"(outputs: {', '.join(found)})")
            found[name] = Objective(name, kind, where, "logits" if kind == "kl" else "real")
    return found


def score_outputs(objectives: Mapping[str, Objective], references: Sequence[Mapping[str, np.ndarray]],
                  actuals: Sequence[Mapping[str, np.ndarray]], keep: bool = False) -> Scorer:
    scorer = Scorer(objectives, keep=keep)
    for ref, out in zip(references, actuals, strict=True):
        scorer.add(_real(ref), _real(out))
    return scorer


def _real(outputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Complex outputs scored as their real and imaginary parts side by side."""
    return {k: (np.stack([v.real, v.imag], axis=-1) if np.iscomplexobj(v) else v) for k, v in outputs.items()}


def graph_paths(directory: str | Path, names: Iterable[str]) -> dict[str, Path]:
    """OUTDIR/<name>.onnx for every graph name; a missing one is an error naming it."""
    directory = Path(directory)
    if not directory.is_dir():
        raise ConfigError(f"{directory}: not a directory of compiled graphs (q4c compile --system SPEC -o DIR)")
    paths = {}
    for name in names:
        p = directory / f"{name}.onnx"
        if not p.is_file():
            raise ModelLoadError(f"{directory}: graph {name!r}: no such file {p}")
        paths[name] = p
    return paths
