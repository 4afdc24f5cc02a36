"""Run a model over calibration samples and gather activation statistics (`collect`), carrying a
stateful model's state from each call to the next.

Graph tensors are fetched from ONNX Runtime (each one added as an extra graph output, optimizations
off so every tensor exists as in the graph); LSTM/GRU/RNN internals (gates, cell state per step),
which no runtime exposes, come from the interpreter's probes. Tensors inside subgraphs (If/Loop/
Scan bodies) are not observed. Only the observers' fixed-size state is kept, never activations.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort

from q4c import graph as g
from q4c import signature
from q4c.calib.observers import DEFAULT_BINS, DEFAULT_PERCENTILE, MinMaxObserver, make_observer
from q4c.calib.readers import (
    CalibrationReader,
    Feeds,
    Sample,
    SamplesReader,
    as_sequence,
    source_of,
)
from q4c.calib.table import CalibrationTable, TensorStats
from q4c.errors import DataError, ModelLoadError
from q4c.signature import check_state_pairs, input_specs

logger = logging.getLogger(__name__)

#: what onnx.shape_inference.infer_shapes raises on a model it rejects (the C++ checker's errors,
#: protobuf size limits)
SHAPE_INFERENCE_ERRORS = (onnx.shape_inference.InferenceError, onnx.checker.ValidationError, RuntimeError, ValueError)


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0][:300]}" if lines else type(error).__name__

#: called after each sample with (samples done, total or None when the reader has no length)
Progress = Callable[[int, int | None], None]
#: calls the interpreter probes by default (see collect)
PROBE_CALLS = 8
_RNN_OPS = frozenset({"LSTM", "GRU", "RNN"})
_FLOAT_TYPES = frozenset({onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE})


def collect(
    model: onnx.ModelProto,
    samples: CalibrationReader | Iterable[Sample],
    *,
    tensors: Iterable[str] | None = None,
    observer: str = "minmax",
    state_pairs: Mapping[str, str] | None = None,
    probes: bool | None = None,
    probe_calls: int | None = PROBE_CALLS,
    progress: Progress | None = None,
    bins: int = DEFAULT_BINS,
    percentile: float = DEFAULT_PERCENTILE,
    threads: int | None = None,
) -> CalibrationTable:
    """Statistics of `tensors` (default: every float tensor of the main graph that depends on an
    input; see `dynamic_tensors`) over `samples`, with the clipping range `observer` chooses.

    Args:
        samples: a reader or an iterable of samples (feed dicts, or lists of them for sequences).
        state_pairs: output -> input pairs to carry between the calls of one sequence; default the
            reader's declared pairs, else those inferred by name; `{}` carries nothing.
        probes: also observe LSTM/GRU/RNN internals (`node::i`, `node::c`, ...) with the
            interpreter; default: when the main graph has such ops and `tensors` asks for them
            (or is None).
        probe_calls: probe only the first this many calls (None: all); the interpreter is
            10-50x slower than ONNX Runtime, and gate statistics settle within a few utterances.
    """
    pairs = resolve_state_pairs(model, samples, state_pairs)
    specs = input_specs(model)
    fingerprint = g.fingerprint(model)  # before the session exists: one model copy at a time
    graph_names, probe_names, use_probes = _selection(model, tensors, probes)
    session = _session(model, graph_names, threads)
    fetch = list(dict.fromkeys([o.name for o in session.get_outputs()]))
    # fetched as long as their dtype is unknown; after the first call, only float tensors and state
    keep = {o.name for o in model.graph.output} | set(pairs)
    interp = None
    if use_probes:
        from q4c.interp import Interpreter

        interp = Interpreter(model)
    seen = _Observations(observer, bins, percentile, strict=set(graph_names) if tensors is not None else set())
    graph_set, probe_set = set(graph_names), set(probe_names)
    reader = samples if isinstance(samples, CalibrationReader) else SamplesReader(samples)
    total = len(reader) if hasattr(reader, "__len__") else None  # type: ignore[arg-type]
    n_samples = n_calls = 0
    for index, sample in enumerate(reader):
        where = source_of(sample, f"sample {index}")
        for outputs, step_feeds in run_sequence(session, fetch, as_sequence(sample, specs, pairs, where), pairs, where):
            for name, value in [*step_feeds.items(), *outputs.items()]:
                if name in graph_set:
                    seen.observe(name, value, "ort")
            if n_calls == 0:
                fetch[:] = [n for n in fetch if n in keep or _is_float(outputs[n])]
            if interp is not None and (probe_calls is None or n_calls < probe_calls):
                for key, value in interp.run(step_feeds, probes=True).items():
                    if "::" in key and (tensors is None or key in probe_set):
                        seen.observe(key, value, "probe")
            n_calls += 1
        n_samples += 1
        if progress is not None:
            progress(n_samples, total)
    if n_samples == 0:
        raise DataError("no calibration samples: the data or reader yielded nothing")
    table = CalibrationTable(observer=observer, samples=n_samples, calls=n_calls, state_pairs=dict(pairs),
                             model=fingerprint)
    seen.fill(table, set(pairs.values()))
    logger.debug("calibrated %d tensors over %d samples (%d calls), observer %s", len(table.tensors),
                 n_samples, n_calls, observer)
    return table


def _selection(model: onnx.ModelProto, tensors: Iterable[str] | None, probes: bool | None
               ) -> tuple[list[str], list[str], bool]:
    """(graph tensors to fetch, interpreter probes to keep, whether to run the interpreter)."""
    available = dynamic_tensors(model)
    wanted = list(available) if tensors is None else list(dict.fromkeys(tensors))
    probe_names = [n for n in wanted if "::" in n]
    graph_names = [n for n in wanted if "::" not in n]
    unknown = [n for n in graph_names if n not in set(available)]
    if unknown:
        raise DataError(f"cannot observe {', '.join(unknown[:5])}: not tensors of the main graph that depend on "
                        f"the inputs")
    has_rnn = any(n.op_type in _RNN_OPS for n in model.graph.node)
    use_probes = has_rnn and (tensors is None or bool(probe_names)) if probes is None else probes
    return graph_names, probe_names, use_probes


class _Observations:
    """One observer per float tensor seen (created on first sight) and the engine that saw it;
    a non-float tensor in `strict` (asked for by name) is an error, others are skipped."""

    def __init__(self, kind: str, bins: int, percentile: float, strict: set[str]) -> None:
        self.kind, self.bins, self.percentile, self.strict = kind, bins, percentile, strict
        self.observers: dict[str, MinMaxObserver] = {}
        self.sources: dict[str, str] = {}

    def observe(self, name: str, value: np.ndarray, source: str) -> None:
        if not _is_float(value):
            if name in self.strict:
                raise DataError(f"cannot observe {name!r}: a {value.dtype} tensor, not a float one")
            return
        if name not in self.observers:
            self.observers[name] = make_observer(self.kind, bins=self.bins, percentile=self.percentile)
            self.sources[name] = source
        self.observers[name].update(value)

    def fill(self, table: CalibrationTable, state_inputs: set[str]) -> None:
        for name, obs in self.observers.items():
            lo, hi = obs.range()
            table.tensors[name] = TensorStats(obs.min, obs.max, obs.mean, obs.std, obs.count, lo, hi,
                                              self.sources[name], name in state_inputs)


def run_sequence(session: ort.InferenceSession, fetch: list[str], steps: list[Feeds], pairs: Mapping[str, str],
                 where: str) -> Iterable[tuple[dict[str, np.ndarray], Feeds]]:
    """Run the calls of one sequence, each fed the state the previous one produced; yields
    (outputs, feeds actually used) per call."""
    state: dict[str, np.ndarray] = {}
    for t, step in enumerate(steps):
        feeds = {**step, **state}
        try:
            values = session.run(fetch, feeds)
        except Exception as e:  # onnxruntime's own error types
            raise DataError(f"{where}: call {t} failed in ONNX Runtime: {str(e).splitlines()[0]}") from e
        outputs = dict(zip(fetch, values))
        state = {inp: outputs[out] for out, inp in pairs.items()}
        yield outputs, feeds


def materialize(model: onnx.ModelProto, samples: CalibrationReader | Iterable[Sample],
                state_pairs: Mapping[str, str] | None = None) -> list[Feeds]:
    """Every call the samples make, as complete feed dicts: for a stateful model, each call's
    state inputs hold the state the previous call of its sequence produced (so that analyses
    that run single calls see realistic state)."""
    pairs = resolve_state_pairs(model, samples, state_pairs)
    specs = input_specs(model)
    reader = samples if isinstance(samples, CalibrationReader) else SamplesReader(samples)
    calls: list[Feeds] = []
    session = None
    for index, sample in enumerate(reader):
        where = source_of(sample, f"sample {index}")
        steps = as_sequence(sample, specs, pairs, where)
        if len(steps) == 1:
            calls.append(steps[0])
            continue
        if session is None:
            session = _session(model, [], None)
        fetch = [o.name for o in session.get_outputs()]
        calls.extend(feeds for _, feeds in run_sequence(session, fetch, steps, pairs, where))
    if not calls:
        raise DataError("no samples: the data or reader yielded nothing")
    return calls


def resolve_state_pairs(model: onnx.ModelProto, samples: Any, state_pairs: Mapping[str, str] | None) -> dict[str, str]:
    if state_pairs is None:
        state_pairs = getattr(samples, "state_pairs", None)
        source = f"{samples!r} state_pairs"
    else:
        source = "state_pairs"
    if state_pairs is None:
        pairs = signature.state_pairs(model)
        if pairs:
            logger.info("state carried between calls: %s", ", ".join(f"{o} -> {i}" for o, i in pairs.items()))
        return pairs
    return check_state_pairs(model, state_pairs, source)


def _is_float(value: Any) -> bool:
    return isinstance(value, np.ndarray) and value.dtype.kind == "f"


def dynamic_tensors(model: onnx.ModelProto) -> list[str]:
    """Tensors of the main graph that depend on a graph input (inputs first, then node outputs,
    in graph order): what calibration can observe. Constant-computed tensors are left out."""
    initializers = {t.name for t in model.graph.initializer}
    dynamic = {i.name for i in model.graph.input if i.name not in initializers}
    names = [i.name for i in model.graph.input if i.name in dynamic]
    for node in model.graph.node:
        if not (set(node.input) & dynamic) and not _captures(node, dynamic):
            continue
        for out in node.output:
            if out:
                dynamic.add(out)
                names.append(out)
    return list(dict.fromkeys(names))


def float_tensors(model: onnx.ModelProto) -> tuple[list[str], dict[str, onnx.TypeProto]]:
    """The dynamic tensors whose inferred type is float, with their types."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except SHAPE_INFERENCE_ERRORS as e:  # a model the checker's inference rejects may still run in ORT
        logger.warning("ONNX shape inference failed (%s): calibrating only the tensors whose type the model "
                       "declares", _first_line(e))
        inferred = model
    types = {vi.name: vi.type for vi in [*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output]}
    floats = [n for n in dynamic_tensors(model)
              if n in types and types[n].HasField("tensor_type") and types[n].tensor_type.elem_type in _FLOAT_TYPES]
    return floats, {n: types[n] for n in floats}


def _captures(node: onnx.NodeProto, dynamic: set[str]) -> bool:
    """A node with a subgraph that reads an outer dynamic tensor depends on the inputs too."""
    for attr in node.attribute:
        for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
            for inner in g.iter_graph_protos(sub):
                if any(set(n.input) & dynamic for n in inner.node):
                    return True
    return False


def _session(model: onnx.ModelProto, extra: list[str], threads: int | None) -> ort.InferenceSession:
    """A session (optimizations off) that also returns `extra` tensors. The outputs are added to
    `model` just long enough to serialize it: no copy of a large model is made."""
    outputs = model.graph.output
    known = {o.name for o in outputs} | {i.name for i in model.graph.input}
    added = [name for name in extra if name not in known]
    outputs.extend(onnx.ValueInfoProto(name=name) for name in added)  # ORT infers the types
    try:
        serialized = model.SerializeToString()
    finally:
        del outputs[len(outputs) - len(added):]
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    if threads is not None:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    try:
        return ort.InferenceSession(serialized, options, providers=["CPUExecutionProvider"])
    except Exception as e:
        raise ModelLoadError(f"ONNX Runtime cannot load the model to calibrate it: {str(e).splitlines()[0]}") from e
