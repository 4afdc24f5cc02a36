"""Compile's own checks: non-finite weights refused before compiling; afterwards the emitted-graph
guarantees (checker, ONNX Runtime, interpreter agreement) and the outputs' quality vs FP32,
judged against documented thresholds."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper

from q4c import external_data
from q4c import graph as g
from q4c import ort as q4ort
from q4c.calib.qdq import (
    activation_quantizers,
    check_activation_quantizers,
    strip_activation_qdq,
)
from q4c.calib.readers import Feeds
from q4c.errors import ModelLoadError, NonFiniteWeightError, NumericMismatchError
from q4c.interp import Interpreter
from q4c.metrics import sqnr_db
from q4c.objectives import Objective, Scorer
from q4c.recurrent_lowering.dynamic import dequantized_lstm_copy

#: interpreter vs ONNX Runtime on a whole model: float32 accumulation noise through deep
#: recurrent stacks stays well below this (relative to the output's magnitude).
VERIFY_RTOL = 1e-3
#: samples the quality measurements run on (ONNX Runtime only, FP32 and compiled: cheap);
#: the interpreter-vs-ORT check stays on the first sample (the interpreter is slow).
QUALITY_SAMPLES = 8


@dataclass(frozen=True)
class Threshold:
    """A bound a measured figure must keep: value >= `min` and/or value <= `max`."""

    min: float | None = None
    max: float | None = None

    def violated_by(self, value: float) -> float | None:
        """The bound `value` breaks, or None. NaN breaks nothing here: a NaN output is counted
        by the "nonfinite" metric instead."""
        if self.min is not None and value < self.min:
            return self.min
        if self.max is not None and value > self.max:
            return self.max
        return None

    def to_json(self) -> dict[str, float]:
        return {k: v for k, v in (("min", self.min), ("max", self.max)) if v is not None}


#: When compile's verification says quality was lost (a warning; exit 4 under --strict). Each
#: task output is judged by its objective (q4c.objectives): state outputs are not judged (their
#: error shows in the task outputs of later calls, which stateful models are measured on closed
#: loop), probabilities by decision flips, distributions by KL, other outputs by SQNR.
#: sqnr_db >= 20: output noise power at most 1 % of the signal's (noise RMS 10 %). Every bundled
#: model compiles with defaults at 24-54 dB on every output (measured 2026-12-06: transformer_lm
#: 24.1 lowest, lstm_lm 54.5 highest), uniform 8-bit far above; Silero VAD's 2.5 dB output and
#: 1.6 dB state (issue 12: 1.9-18.9 % flipped speech decisions) are what this must catch, and
#: 20 dB sits between with margin on both sides. A model whose output moved by more than a tenth
#: of its RMS has changed behaviour enough that a user should look before shipping it.
#: flips <= 1 %: decisions at 0.5 of a probability output (a VAD's speech / non-speech per chunk).
#: On Silero VAD 1.7 % flips moved speech-segment boundaries by 63 ms on average, 0.5 % by 3.5 ms
#: (measured 2026-12-06, benchmarks/bench_real.py): above 1 % the segments a user gets change.
#: kl <= 0.1 nats: mean KL between the FP32 and quantized output distributions per row. The
#: trained bundled models compile with defaults at 0.0001 (lstm_lm) to 0.012 (rnnt_joiner); 0.1
#: nats is where an LM's perplexity moves by about 10 %.
#: nonfinite <= 0: a NaN or infinity where the FP32 output is finite is never acceptable.
QUALITY_THRESHOLDS: Mapping[str, Threshold] = {
    "sqnr_db": Threshold(min=20.0),
    "flips": Threshold(max=0.01),
    "kl": Threshold(max=0.1),
    "nonfinite": Threshold(max=0),
}
#: how each metric reads in a warning
_UNITS = {"sqnr_db": "dB SQNR vs FP32", "nonfinite": "NaN/inf values where FP32 has none"}


@dataclass(frozen=True)
class Measurement:
    """One figure of one output: ("log_probs", "sqnr_db", 24.5)."""

    output: str
    metric: str
    value: float

    def to_json(self) -> dict[str, Any]:
        return {"output": self.output, "metric": self.metric, "value": self.value}


def judge_quality(measurements: Iterable[Measurement | Mapping[str, Any]],
                  thresholds: Mapping[str, Threshold] = QUALITY_THRESHOLDS) -> dict[str, Any]:
    """The report's `quality`: thresholds, each measurement that breaks one, and ok. Metrics
    without a threshold are kept in `measured` but never judged."""
    lost = []
    measured = []
    for m in measurements:
        m = m if isinstance(m, Measurement) else Measurement(m["output"], m["metric"], float(m["value"]))
        measured.append(m.to_json())
        bound = thresholds[m.metric].violated_by(m.value) if m.metric in thresholds else None
        if bound is not None:
            lost.append({**m.to_json(), "threshold": bound})
    return {"thresholds": {k: t.to_json() for k, t in thresholds.items()}, "lost": lost, "ok": not lost,
            "measured": measured}


def describe_loss(entry: Mapping[str, Any]) -> str:
    """One warning line: "output 'stateN': 1.6 dB SQNR vs FP32, below 20 dB"."""
    metric, value, bound = entry["metric"], entry["value"], entry["threshold"]
    if metric == "sqnr_db":
        return f"output {entry['output']!r}: {value:.1f} dB SQNR vs FP32, below {bound:g} dB"
    if metric == "nonfinite":
        return f"output {entry['output']!r}: {int(value)} {_UNITS[metric]}"
    if metric == "flips":
        return f"output {entry['output']!r}: {100 * value:.2f} % of decisions at 0.5 flipped vs FP32, above {100 * bound:g} %"
    if metric == "kl":
        return f"output {entry['output']!r}: KL {value:.4g} nats vs FP32, above {bound:g}"
    return f"output {entry['output']!r}: {metric} {value:.4g}, beyond the threshold {bound:g}"


def measure_outputs(compiled: ort.InferenceSession, reference: ort.InferenceSession,
                    units: list[list[Feeds]], objectives: Mapping[str, Objective] | None = None,
                    state_pairs: Mapping[str, str] | None = None) -> list[Measurement]:
    """Per output of `reference`, over every unit together, the figure its objective is judged by.

    A unit is a list of calls; with `state_pairs` (output -> input) each model gets its own state
    from its previous call (closed loop: the error compounds as in deployment), so the compiled
    model is compared with FP32 on whole sequences. `objectives` (q4c.objectives.detect_objectives;
    default: every float output scored by SNR): "kl" outputs get `kl`, "bce" outputs `flips` (and
    SQNR), "snr" outputs `sqnr_db`; "ignore" outputs (state) get only `nonfinite`: how many of
    their elements the compiled model made NaN or infinite where FP32 is finite."""
    pairs = dict(state_pairs or {})
    refs: dict[str, list[np.ndarray]] = {}
    outs: dict[str, list[np.ndarray]] = {}
    calls_ref: list[dict[str, np.ndarray]] = []
    calls_out: list[dict[str, np.ndarray]] = []
    for unit in units:
        carried_ref: Feeds = {}
        carried_out: Feeds = {}
        for feeds in unit:
            fp32 = q4ort.run(reference, {**feeds, **carried_ref})
            got = q4ort.run(compiled, {**feeds, **carried_out})
            carried_ref = {inp: fp32[o] for o, inp in pairs.items() if o in fp32}
            carried_out = {inp: got[o] for o, inp in pairs.items() if o in got}
            calls_ref.append(fp32)
            calls_out.append(got)
            for name, ref in fp32.items():
                if np.issubdtype(ref.dtype, np.floating) and name in got and got[name].size == ref.size:
                    refs.setdefault(name, []).append(ref.astype(np.float64).ravel())
                    outs.setdefault(name, []).append(got[name].astype(np.float64).ravel())
    result = []
    broken: dict[str, int] = {}
    for name, parts in refs.items():
        ref, out = np.concatenate(parts), np.concatenate(outs[name])
        finite = np.isfinite(ref)
        broken[name] = int(np.count_nonzero(~np.isfinite(out[finite])))
        result.append(Measurement(name, "nonfinite", broken[name]))
    if objectives is None:
        objectives = {n: Objective(n, "snr", "float output") for n in refs}
    judged = {n: o for n, o in objectives.items() if n in refs and o.kind != "ignore" and not broken[n]}
    scorer = Scorer(judged, keep=True)
    for fp32, got in zip(calls_ref, calls_out):
        scorer.add(fp32, got)
    for name, figures in scorer.metrics().items():
        kind = judged[name].kind
        if kind == "kl":
            result.append(Measurement(name, "kl", round(float(figures["damage"]), 6)))
        if kind == "bce" and "flips" in figures:
            result.append(Measurement(name, "flips", round(float(figures["flips"]), 6)))
        if kind in ("snr", "bce") and "sqnr_db" in figures and not math.isnan(figures["sqnr_db"]):
            ref = np.concatenate(refs[name])
            finite = np.isfinite(ref)
            result.append(Measurement(name, "sqnr_db", sqnr_db(ref[finite], np.concatenate(outs[name])[finite]))
                          if kind == "snr" else Measurement(name, "prob_sqnr_db", figures["sqnr_db"]))
    return result


def verify_model(model: onnx.ModelProto, samples: list[Feeds], reference: onnx.ModelProto | None = None,
                 *, quality_units: list[list[Feeds]] | None = None,
                 objectives: Mapping[str, Objective] | None = None,
                 state_pairs: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The emitted-graph guarantees: full checker, ORT loads and runs it, and the interpreter
    agrees with ORT. MatMulNBits runs int8 activations at accuracy_level 4, so the equivalence
    check runs ORT on a copy at accuracy_level 0 with optimizations off (no fusion hides a bug);
    the deviation int8 activations add is reported on its own. Activation Q/DQ (--activations
    int8) is checked code for code on ONNX Runtime's own inputs, and the rest of the graph with
    it taken out (see q4c.calib.qdq).

    With `reference` (the FP32 model), the outputs are measured against it on `quality_units`
    (lists of calls, closed loop through `state_pairs`; default: each of `samples` alone), each by
    its objective (see measure_outputs): `measurements` [{output, metric, value}] for
    judge_quality, and `output_sqnr_db` {output: dB} for the outputs judged by SQNR."""
    try:
        g.check(model)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
        first = " ".join(str(e).split())[:300]
        if reference is not None and not _passes_full_check(reference):
            # e.g. an input declared [-1, 4, 16] whose output is declared [1, 4, 16]: q4c's
            # output keeps the declared shapes, so the input is what needs fixing.
            raise ModelLoadError(f"the input model fails the full ONNX checker (strict shape inference): {first}; "
                                 f"fix the declared input/output shapes") from e
        raise NumericMismatchError(f"emitted graph fails onnx.checker: {first}") from e
    result: dict[str, Any] = {"checker": True}
    session = q4ort.make_session(model)
    result["ort_loads"] = True
    checked = model
    if activation_quantizers(model):
        result["activation_codes_exact"] = check_activation_quantizers(model, samples)
        checked = strip_activation_qdq(model)
    # ORT's int8-activation kernels (MatMulNBits at accuracy_level 4, DynamicQuantizeLSTM's uint8
    # X and h) round differently from numpy in the last bit, and recurrence amplifies that: the
    # float32-agreement check runs on a copy with those computed in float from the same codes.
    checked = dequantized_lstm_copy(float_accuracy_copy(checked))
    exact = q4ort.make_session(checked, level=ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    interp = Interpreter(checked)
    worst = 0.0
    deployed_dev = 0.0
    for feeds in samples:
        expected = q4ort.run(exact, feeds)
        actual = interp.run(feeds)
        for name, want in expected.items():
            got = actual[name]
            scale = max(float(np.max(np.abs(want))) if want.size else 0.0, 1.0)
            diff = float(np.max(np.abs(want.astype(np.float64) - got.astype(np.float64)))) if want.size else 0.0
            worst = max(worst, diff)
            if diff > VERIFY_RTOL * scale:
                raise NumericMismatchError(
                    f"interpreter and ONNX Runtime disagree on output {name!r}: max |diff| {diff:.3g} "
                    f"(tolerance {VERIFY_RTOL * scale:.3g}); this is a q4c bug, please report it")
        deployed = q4ort.run(session, feeds)
        for name, want in expected.items():
            deployed_dev = max(deployed_dev, float(np.max(np.abs(deployed[name] - want))) if want.size else 0.0)
    result["interp_vs_ort_max_abs"] = worst
    result["ort_int8_activation_max_abs"] = deployed_dev
    result["samples"] = len(samples)
    if reference is not None:
        units = [[f] for f in samples] if quality_units is None else quality_units
        measurements = measure_outputs(session, q4ort.make_session(reference), units, objectives, state_pairs)
        result["quality_samples"] = len(units)
        result["quality_calls"] = sum(len(u) for u in units)
        result["closed_loop"] = bool(state_pairs) and any(len(u) > 1 for u in units)
        result["measurements"] = [m.to_json() for m in measurements]
        sqnr = {m.output: m.value for m in measurements if m.metric == "sqnr_db"}
        if sqnr:
            result["output_sqnr_db"] = sqnr
    return result


# Ops whose inputs q4c treats as weights: an infinity reaching one of them through constant-only
# arithmetic is a broken export. Elsewhere an infinity is usually meant: -inf attention masks
# (Where, Add), Clip bounds.
_WEIGHT_OPS = frozenset({"MatMul", "Gemm", "Conv", "ConvTranspose", "LSTM", "GRU", "RNN", "Gather", "Einsum"})
_FLOAT_TYPES = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE, onnx.TensorProto.BFLOAT16)


@dataclass(frozen=True)
class NonFinite:
    """A float constant (initializer or Constant node output) holding NaN or infinite values."""

    name: str
    nan: int
    inf: int
    #: names of everything that stops being a finite weight because of it: the tensor, tensors
    #: computed from it by constant-only nodes, and the weight ops it reaches (for --keep-fp32)
    reaches: frozenset[str]
    feeds_weight: bool

    @property
    def refused(self) -> bool:
        """NaN anywhere; infinities only where they reach a weight input."""
        return self.nan > 0 or self.feeds_weight

    def describe(self) -> str:
        counts = " and ".join(f"{n} {what}" for n, what in ((self.nan, "NaN"), (self.inf, "infinite")) if n)
        return f"weight {self.name!r} holds {counts} value{'s' if self.nan + self.inf > 1 else ''}"


def find_nonfinite_weights(model: onnx.ModelProto, *, name_nodes: bool = False) -> list[NonFinite]:
    """Every float initializer and Constant node value (main graph and If/Loop/Scan bodies)
    holding NaN or infinite values, in graph order. `name_nodes`: give the unnamed weight ops
    they reach a name, in place, so that --keep-fp32 by node name holds them through rewrites
    that rename their weight (lower-gemm's W -> W_kn)."""
    found: dict[str, tuple[int, int]] = {}
    constants: set[str] = set()
    for graph in g.iter_graph_protos(model.graph):
        tensors = [(t.name, t) for t in graph.initializer]
        for node in graph.node:
            if node.op_type == "Constant" and node.output:
                constants.add(node.output[0])
                tensors += [(node.output[0], a.t) for a in node.attribute if a.type == onnx.AttributeProto.TENSOR]
                tensors += [(node.output[0], numpy_helper.from_array(np.asarray(a.f if a.type == onnx.AttributeProto.FLOAT
                                                                                    else a.floats, np.float32)))
                            for a in node.attribute if a.name in ("value_float", "value_floats")]
        constants.update(t.name for t in graph.initializer)
        for name, tensor in tensors:
            if tensor.data_type not in _FLOAT_TYPES:
                continue
            values = numpy_helper.to_array(tensor).astype(np.float32)
            finite = np.isfinite(values)
            if not finite.all():
                nan = int(np.count_nonzero(np.isnan(values)))
                found[name] = (nan, int(values.size - np.count_nonzero(finite)) - nan)
    if not found:
        return []
    # Follow each tensor through constant-only nodes (Transpose, Mul by a scale, ...) to the ops
    # that read it. Graph order is topological in every (sub)graph.
    taint: dict[str, set[str]] = {name: {name} for name in found}
    reaches: dict[str, set[str]] = {name: {name} for name in found}
    weight: set[str] = set()
    node_names = {n.name for graph in g.iter_graph_protos(model.graph) for n in graph.node}
    for graph in g.iter_graph_protos(model.graph):
        for node in graph.node:
            sources = set().union(*(taint.get(i, set()) for i in node.input))
            if not sources:
                continue
            if node.op_type in _WEIGHT_OPS:
                weight |= sources
                if name_nodes and not node.name:
                    node.name = next(n for k in range(len(node_names) + 1)
                                     if (n := f"q4c_nonfinite_{node.op_type}_{k}") not in node_names)
                    node_names.add(node.name)
                for s in sources:
                    reaches[s].update(n for n in (node.name,) if n)
            elif node.input and all(i in constants for i in node.input if i):
                constants.update(node.output)
                for out in node.output:
                    taint[out] = sources
                for s in sources:
                    reaches[s].update(node.output)
    return [NonFinite(name, nan, inf, frozenset(reaches[name]), name in weight) for name, (nan, inf) in found.items()]


def refuse_nonfinite_weights(model: onnx.ModelProto, allow: bool) -> tuple[onnx.ModelProto, list[NonFinite]]:
    """Raise NonFiniteWeightError naming the first refused tensor, unless `allow`. Returns the
    model (when allowed and something was refused, a copy whose weight ops reached by those
    tensors all have names: see find_nonfinite_weights) and the refused tensors, to keep in
    float (their `reaches` into --keep-fp32) and warn about."""
    refused = [f for f in find_nonfinite_weights(model) if f.refused]
    if not refused:
        return model, []
    if not allow:
        more = f" (and {len(refused) - 1} more: {', '.join(repr(f.name) for f in refused[1:4])}" \
               f"{', ...' if len(refused) > 4 else ''})" if len(refused) > 1 else ""
        raise NonFiniteWeightError(f"{refused[0].describe()}{more}; fix the export (or pass --allow-nonfinite)")
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    return copy, [f for f in find_nonfinite_weights(copy, name_nodes=True) if f.refused]


def float_accuracy_copy(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy whose MatMulNBits compute in float (accuracy_level 0): level 4 quantizes the
    activations to int8 inside ONNX Runtime, which the interpreter does not model."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    for graph in g.iter_graph_protos(copy.graph):
        for node in graph.node:
            if node.op_type == "MatMulNBits":
                for attr in node.attribute:
                    if attr.name == "accuracy_level":
                        attr.i = 0
    return copy


def _passes_full_check(model: onnx.ModelProto) -> bool:
    try:
        g.check(model)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError):
        return False
    return True


def refuse_inconsistent_model(model: onnx.ModelProto) -> None:
    """The input passes the full checker (strict shape inference): declared shapes that
    contradict the graph and attributes out of range (Softmax axis 2**40) are the model's fault,
    said in one line before any pass or the interpreter trips over them. Models over protobuf's
    2 GiB limit cannot be checked in memory and are left to the passes."""
    if external_data.approx_bytes(model) >= 2**31 - 1:  # ByteSize() would serialize it: see there
        return
    try:
        g.check(model)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
        first = " ".join(str(e).split())[:300]
        raise ModelLoadError(f"the model fails the full ONNX checker (strict shape inference): {first}") from e
