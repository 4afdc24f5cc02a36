"""How much the model's output suffers when one weight tensor is perturbed: KL divergence of the
output distribution, Hessian-trace-weighted perturbation (Hutchinson, forward passes only),
and a data-free weight-MSE proxy.

All data-driven measures run one ONNX Runtime session in which the measured weights are graph
inputs instead of initializers, so a single session serves every tensor and every candidate.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import helper

from q4c import graph as g
from q4c import ort as q4ort
from q4c.config import CompileOptions
from q4c.errors import ConfigError
from q4c.objectives import Objective, Scorer, detect_objectives
from q4c.quant.candidates import Candidate, candidate, candidate_list
from q4c.quant.gptq import activation_of, input_hessians
from q4c.quant.plan import FLOAT, SCHEMES
from q4c.quant.tying import tied_groups
from q4c.quant.weights import WeightSlot, element_count, find_weight_slots, quantize_slot

logger = logging.getLogger(__name__)

Feeds = dict[str, np.ndarray]


def _log_softmax(x: np.ndarray) -> np.ndarray:
    m = np.max(x, axis=-1, keepdims=True)
    return x - m - np.log(np.sum(np.exp(x - m), axis=-1, keepdims=True))


def output_kind(y: np.ndarray) -> str:
    """'logprob' if rows are log-probabilities, 'prob' if probabilities, else 'real' (a value
    heuristic the benchmarks use; sensitivity itself reads the graph: q4c.objectives)."""
    if not np.issubdtype(y.dtype, np.floating) or y.ndim == 0 or y.shape[-1] < 2:
        return "real"
    if np.all(y <= 1e-4) and np.allclose(np.sum(np.exp(y.astype(np.float64)), axis=-1), 1.0, atol=1e-3):
        return "logprob"
    if np.all(y >= 0) and np.allclose(np.sum(y, axis=-1, dtype=np.float64), 1.0, atol=1e-3):
        return "prob"
    return "real"


def divergence(reference: np.ndarray, perturbed: np.ndarray, kind: str) -> float:
    """Mean KL(reference || perturbed) per row for distributions; otherwise the MSE normalized by
    the reference's variance (kept for the benchmarks; sensitivity scores use q4c.objectives)."""
    ref = reference.astype(np.float64)
    out = perturbed.astype(np.float64)
    if kind == "logprob":
        p_log, q_log = ref, _log_softmax(out)
    elif kind == "prob":
        p_log, q_log = np.log(np.clip(ref, 1e-30, None)), np.log(np.clip(out, 1e-30, None))
    else:
        return float(np.mean(np.square(out - ref)) / (np.var(ref) + 1e-12))
    kl = np.sum(np.exp(p_log) * (p_log - q_log), axis=-1)
    return float(np.mean(kl))


@dataclass
class WeightInputRunner:
    """An ORT session over `model` with `weights` turned into graph inputs.

    The samples are scored in *units*: `sequences` (lists of consecutive calls of a stateful
    model, each call's feeds holding the FP32 state the previous call produced), or, without
    them, each of `samples` on its own. Closed loop (`closed_loop`, with `state_pairs` output ->
    input), every call after a unit's first is fed the state the *same* weights produced on the
    call before, as in deployment; open loop, each call gets the FP32 state stored in its feeds.
    The FP32 reference is the same run with no weight changed.

    `divergence(changes, limit)` runs the first `limit` units (all by default) with the given
    weights replaced (all others FP32) and returns the damage of the task outputs (the sum over
    outputs of their objectives, q4c.objectives) against the FP32 outputs, over every call.
    Whole plans (`score(..., closed=plans_closed_loop)`) are measured closed loop whenever there
    is a loop to close, also when candidates are scored open loop.
    """

    model: onnx.ModelProto
    weights: Mapping[str, np.ndarray]
    samples: Sequence[Feeds]
    sequences: Sequence[Sequence[Feeds]] | None = None
    state_pairs: Mapping[str, str] = field(default_factory=dict)
    closed_loop: bool = False
    objectives: Mapping[str, Objective] | None = None
    #: at most this many calls of a unit are run (a long recording is cut, not skipped)
    max_calls: int | None = None
    runs: int = 0
    seconds: float = 0.0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _reference_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def __post_init__(self) -> None:
        self._session = q4ort.make_session(_weights_as_inputs(self.model, self.weights), threads=1)
        units = self.sequences if self.sequences is not None else [[s] for s in self.samples]
        self.units = [list(u)[: self.max_calls] for u in units if u]
        if not self.state_pairs:
            self.closed_loop = False
        if self.objectives is None:
            self.objectives = detect_objectives(self.model, self.state_pairs)
        #: whole plans are measured closed loop whenever there is a loop to close, even when
        #: candidates are scored open loop: that is what the user's deployment does
        self.plans_closed_loop = bool(self.state_pairs) and any(len(u) > 1 for u in self.units)
        self._references: dict[bool, list[list[dict[str, np.ndarray]]]] = {}

    def _reference(self, closed: bool) -> list[list[dict[str, np.ndarray]]]:
        # Computed once: threads asking at the same time wait for the first (else each would run
        # the FP32 reference again, and the forward-run count would depend on scheduling).
        with self._reference_lock:
            if closed not in self._references:
                self._references[closed] = [self._run_unit(u, {}, closed) for u in self.units]
            return self._references[closed]

    @property
    def kinds(self) -> dict[str, str]:
        return {n: o.kind for n, o in (self.objectives or {}).items()}

    def _run_unit(self, unit: Sequence[Feeds], changes: Mapping[str, np.ndarray],
                  closed: bool) -> list[dict[str, np.ndarray]]:
        start = time.perf_counter()
        outputs: list[dict[str, np.ndarray]] = []
        state: dict[str, np.ndarray] = {}
        for call in unit:
            feeds = {**call, **state, **self.weights, **changes}
            out = q4ort.run(self._session, feeds)  # ORT sessions take concurrent runs
            if closed:
                state = {inp: out[o] for o, inp in self.state_pairs.items()}
            outputs.append(out)
        with self._lock:
            self.runs += len(unit)
            self.seconds += time.perf_counter() - start
        return outputs

    def score(self, changes: Mapping[str, np.ndarray], limit: int | None = None, keep: bool = False,
              which: slice | None = None, closed: bool | None = None) -> Scorer:
        """The per-output tallies of one run with `changes` of the first `limit` units (or of
        the units `which` selects), closed loop if `closed` (default: as scoring is)."""
        assert self.objectives is not None
        closed = self.closed_loop if closed is None else closed and bool(self.state_pairs)
        scorer = Scorer(self.objectives, keep=keep)
        which = which if which is not None else slice(0, limit)
        for unit, reference in zip(self.units[which], self._reference(closed)[which], strict=True):
            for ref, out in zip(reference, self._run_unit(unit, changes, closed), strict=True):
                scorer.add(ref, out)
        return scorer

    def divergence(self, changes: Mapping[str, np.ndarray], limit: int | None = None,
                   which: slice | None = None) -> float:
        return self.score(changes, limit, which=which).damage()

    def describe(self) -> dict[str, Any]:
        calls = sum(len(u) for u in self.units)
        return {"scoring": "closed-loop" if self.closed_loop else "open-loop", "units": len(self.units),
                "calls": calls, "sequences": self.sequences is not None,
                "plans_measured": "closed-loop" if self.plans_closed_loop else "open-loop"}


def _weights_as_inputs(model: onnx.ModelProto, weights: Mapping[str, np.ndarray]) -> onnx.ModelProto:
    """A copy of `model` whose initializers named in `weights` are main-graph inputs instead. A
    weight that lives in a subgraph (an If branch, a Loop body) moves out too: the main graph's
    inputs are visible in subgraphs, so its outer-scope references keep working."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    found: dict[str, onnx.TensorProto] = {}
    for graph in g.iter_graph_protos(copy.graph):
        if not any(t.name in weights for t in graph.initializer):
            continue
        kept = [t for t in graph.initializer if t.name not in weights]
        found.update({t.name: t for t in graph.initializer if t.name in weights})
        del graph.initializer[:]
        graph.initializer.extend(kept)
    missing = set(weights) - set(found)
    if missing:
        raise ValueError(f"not initializers: {sorted(missing)}")
    for name, tensor in found.items():
        copy.graph.input.append(helper.make_tensor_value_info(name, tensor.data_type, list(tensor.dims)))
    return copy


def movable_weights(model: onnx.ModelProto) -> set[str]:
    """Initializers `_weights_as_inputs` can turn into inputs: those of the main graph, and those
    of subgraphs whose name means one tensor in the whole model (every definition of it is an
    initializer with the same contents, as when both branches of an If hold the same weight)."""
    tensors: dict[str, list[bytes]] = {}
    others: set[str] = set()
    for graph in g.iter_graph_protos(model.graph):
        for t in graph.initializer:
            tensors.setdefault(t.name, []).append(t.SerializeToString())
        others.update(o for n in graph.node for o in n.output)
        others.update(i.name for i in graph.input)
    main = {t.name for t in model.graph.initializer}
    return {n for n, defs in tensors.items() if n in main or (n not in others and len(set(defs)) == 1)}


def hutchinson_trace(
    loss: Callable[[np.ndarray], float],
    w: np.ndarray,
    rng: np.random.Generator,
    *,
    step: float,
    min_probes: int = 2,
    max_probes: int = 8,
    rtol: float = 0.1,
) -> tuple[float, float, int]:
    """Estimate tr(H) of `loss` at `w`, where loss(w) = 0 and grad = 0 (a divergence from the
    FP32 output is minimal there), from forward evaluations only.

    For a Rademacher direction v (entries +-1), the second central difference
    (loss(w + e v) + loss(w - e v) - 2 loss(w)) / e^2 = v^T H v + O(e^2), and E[v^T H v] = tr(H)
    (Hutchinson). Probes stop once the standard error of the mean is within `rtol` of it.
    Returns (trace estimate, its standard error, probes used).
    """
    estimates: list[float] = []
    for _ in range(max_probes):
        v = rng.choice(np.array([-1.0, 1.0], np.float32), size=w.shape)
        plus = loss((w + step * v).astype(w.dtype))
        minus = loss((w - step * v).astype(w.dtype))
        estimates.append((plus + minus) / step**2)  # loss(w) = 0
        if len(estimates) >= min_probes:
            mean = float(np.mean(estimates))
            sem = float(np.std(estimates, ddof=1) / np.sqrt(len(estimates)))
            if mean > 0 and sem <= rtol * mean:
                break
    mean = float(np.mean(estimates))
    sem = float(np.std(estimates, ddof=1) / np.sqrt(len(estimates))) if len(estimates) > 1 else float("inf")
    return mean, sem, len(estimates)


#: Samples used for the per-tensor, per-candidate scores: more cost time linearly and rarely
#: change the ranking.
MAX_SAMPLES = 4
#: Samples used to measure whole plans (a handful of runs each: the uniform-4-bit guard, the
#: measured Pareto curve). Four samples were too few there: the guard kept plans that four
#: other inputs then found worse than uniform 4-bit.
PLAN_SAMPLES = 32
#: Calls of one sequence that scoring runs: a long recording is cut here (closed-loop error
#: compounds within a few hundred calls; more only costs time).
MAX_UNIT_CALLS = 1000
#: Score closed-loop candidates in the context of uniform 4-bit (see measure)
CLOSED_LOOP_CONTEXT = True
#: Hessian probe step, relative to the tensor's RMS: the size of 4-bit rounding noise, so the
#: curvature is measured where quantization actually moves the weights.
HESSIAN_STEP = 0.1


@dataclass
class SensitivityTable:
    """scores[name][candidate key] = predicted output damage of quantizing only `name` with that
    candidate (keys like "4", "4:absmax"; see Candidate.key)."""

    measure: str
    scores: dict[str, dict[str, float]] = field(default_factory=dict)
    candidates: dict[str, list[Candidate]] = field(default_factory=dict)
    slots: dict[str, WeightSlot] = field(default_factory=dict)
    trace: dict[str, dict[str, float]] = field(default_factory=dict)  # hessian: tr(H), its s.e., probes
    fallbacks: dict[str, str] = field(default_factory=dict)  # tensor -> why it fell back to mse
    runner: WeightInputRunner | None = None
    seconds: float = 0.0
    kernel_scales: bool = True  # see CompileOptions.kernel_scales
    workers: int = 1  # threads that scored tensors
    hessians: dict[str, list[np.ndarray]] = field(default_factory=dict)  # gptq's input statistics
    #: runner units scores and plan measurements use, and (with --require) the held-out ones
    fit: slice = field(default_factory=lambda: slice(0, None))
    held_out: slice | None = None
    #: the plan closed-loop kl scores are taken in (see measure), and its damage
    context: dict[str, Any] = field(default_factory=dict)
    #: measured per-output metrics of whole plans ("plan", "uniform_4bit"), filled by assign-precision
    measured: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)

    def plan_changes(self, choice: Mapping[str, str], granularity: Any) -> dict[str, np.ndarray]:
        """The dequantized weights of a plan (name -> candidate key), for the runner."""
        assert self.runner is not None
        cache = self.__dict__.setdefault("_dequantized", {})
        changes = {}
        for name, key in choice.items():
            cand = next(c for c in self.candidates[name] if c.key == key)
            if name not in self.runner.weights or cand.bits == FLOAT:
                continue
            if (name, key) not in cache:
                cache[name, key] = quantize_slot(self.slots[name], self.runner.weights[name], cand.bits, granularity,
                                                 cand.scheme, kernel_scales=self.kernel_scales,
                                                 hessians=self.hessians.get(name)).dequantize()
            changes[name] = cache[name, key]
        return changes

    def measure_plan(self, choice: Mapping[str, str], granularity: Any, held_out: bool = False) -> float | None:
        """Measured output damage with every tensor quantized as `choice` (name -> candidate
        key) at once, on the calibration samples (closed loop whenever they are sequences of a
        stateful model; the held-out ones if asked and there are); None without a data-driven runner."""
        if self.runner is None:
            return None
        which = self.held_out if held_out and self.held_out is not None else self.fit
        return self.runner.score(self.plan_changes(choice, granularity), which=which,
                                 closed=self.runner.plans_closed_loop).damage()

    def plan_metrics(self, choice: Mapping[str, str], granularity: Any,
                     held_out: bool = False) -> dict[str, dict[str, Any]] | None:
        """Per task output: objective, damage, and decision flips (bce) / SQNR of a whole plan."""
        if self.runner is None:
            return None
        which = self.held_out if held_out and self.held_out is not None else self.fit
        return self.runner.score(self.plan_changes(choice, granularity), keep=True, which=which,
                                 closed=self.runner.plans_closed_loop).metrics()

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {"measure": self.measure, "seconds": round(self.seconds, 3), "tensors": len(self.scores),
                               "workers": self.workers}
        if self.runner is not None:
            out["forward_runs"] = self.runner.runs
            out["output_kinds"] = dict(self.runner.kinds)
            out["objectives"] = {n: o.to_json() for n, o in (self.runner.objectives or {}).items()}
            out.update(self.runner.describe())
            out["note"] = ("damage = sum over task outputs of KL (kl), Bernoulli KL (bce) or half the relative noise "
                           "power 10^(-SNR/10)/2 (snr), all in nats; state outputs are not scored")
        if self.runner is not None and self.held_out is not None:
            units = list(range(len(self.runner.units)))
            out["held_out"] = {"samples": units[self.held_out], "fit_samples": units[self.fit],
                               "calls": sum(len(u) for u in self.runner.units[self.held_out]),
                               "note": "calibration samples by index (in reader order) held out from fitting; "
                                       "--require is judged on them"}
        if self.context:
            out["context"] = self.context
        if self.measured:
            out["measured"] = self.measured
        if self.fallbacks:
            out["fallbacks"] = dict(self.fallbacks)
        return out


def main_constants(graph: gs.Graph) -> set[str]:
    """Names of the main graph's constants (weights that live in subgraphs are not among them)."""
    return {t.name for t in graph.tensors().values() if isinstance(t, gs.Constant)}


def gptq_eligible(graph: gs.Graph, slots: Mapping[str, WeightSlot], main: set[str] | None = None) -> dict[str, WeightSlot]:
    """The weights gptq can round: main-graph MatMul/Gemm/LSTM/GRU/RNN weights whose inputs can be
    observed, not a tied output projection (it shares the embedding's codes: rounding it
    differently would not)."""
    main = main_constants(graph) if main is None else main
    tied = {n for group in tied_groups(dict(slots)) if len(group) > 1 for n in group}
    return {n: s for n, s in slots.items() if n in main and n not in tied and activation_of(s) is not None}


def candidate_slots(graph: gs.Graph, opts: CompileOptions) -> dict[str, WeightSlot]:
    """The weights a budgeted plan chooses for: one slot per tensor name, large enough and not
    kept in float by the user."""
    chosen: dict[str, WeightSlot] = {}
    for slot in find_weight_slots(graph):
        if not isinstance(slot, WeightSlot) or slot.tensor.name in chosen:
            continue
        if element_count(slot.tensor) < opts.min_elements:
            continue
        if slot.tensor.name in opts.keep_fp32 or slot.node.name in opts.keep_fp32:
            continue
        chosen[slot.tensor.name] = slot
    return chosen


def closed_loop_wanted(scoring: str, sequences: Sequence[Sequence[Feeds]] | None,
                       state_pairs: Mapping[str, str] | None) -> bool:
    """Score closed loop? "auto" (the default): when some sample is a sequence of several calls
    and the model has state pairs; "closed-loop" needs the same to mean anything."""
    has_sequences = bool(sequences) and any(len(s) > 1 for s in sequences)  # type: ignore[union-attr]
    return scoring != "open-loop" and has_sequences and bool(state_pairs)


def objectives_for(model: onnx.ModelProto, opts: CompileOptions,
                   state_pairs: Mapping[str, str] | None) -> dict[str, Objective]:
    """The graph's objectives with `--objective` overrides (an unknown output is a ConfigError)."""
    try:
        return detect_objectives(model, state_pairs or {}, dict(opts.objectives))
    except KeyError as e:
        raise ConfigError(str(e.args[0])) from None


def measure(graph: gs.Graph, opts: CompileOptions, opset: int, samples: Sequence[Feeds], *,
            sequences: Sequence[Sequence[Feeds]] | None = None,
            state_pairs: Mapping[str, str] | None = None) -> SensitivityTable:
    """Score every (weight tensor, candidate bits) pair with `opts.sensitivity` (see
    MeasureSensitivityPass); tensors that live only in subgraphs fall back to mse.

    `sequences` (the samples' calls grouped by sequence) and `state_pairs` make the scores
    closed loop (`closed_loop_wanted`); each output counts by its objective (q4c.objectives)."""
    start = time.perf_counter()
    slots = candidate_slots(graph, opts)
    table = SensitivityTable(opts.sensitivity, slots=slots)
    # Rounding schemes are candidates too when the output decides (kl): the knapsack then picks
    # each tensor's quantizer as well as its width. Weight-error measures always prefer "symmetric".
    # "gptq" needs the weight's calibration inputs, and only pays below 8 bits.
    weights = {name: np.asarray(s.tensor.values, dtype=np.float32) for name, s in slots.items()}
    main = main_constants(graph)
    model = g.export_model(graph.copy()) if weights and samples else None
    movable = movable_weights(model) if model is not None else main
    measured = {n: w for n, w in weights.items() if n in movable}
    for name in set(weights) - set(measured):
        table.fallbacks[name] = "weight lives in a subgraph under a name that means different tensors"
    if not measured:
        model = None
    if model is not None and opts.sensitivity == "kl" and opts.granularity.kind == "block":
        table.hessians = input_hessians(model, gptq_eligible(graph, slots, main), samples)
    table.kernel_scales = opts.kernel_scales
    tied = {n for group in tied_groups(dict(slots)) if len(group) > 1 for n in group}
    for name, slot in slots.items():
        table.candidates[name] = candidate_list(slot, opts, opset, gptq=name in table.hessians, tied=name in tied)
    quantized = {name: {c.key: quantize_slot(slots[name], w, c.bits, opts.granularity, c.scheme,
                                             kernel_scales=opts.kernel_scales,
                                             hessians=table.hessians.get(name)).dequantize()
                        for c in table.candidates[name] if c.bits != FLOAT} for name, w in weights.items()}
    limit = MAX_SAMPLES
    if model is not None:
        # mse scores without data, but the runner still measures whole plans (the uniform-4-bit
        # guard in assign-precision, the report's measured Pareto curve).
        closed = closed_loop_wanted(opts.scoring, sequences, state_pairs)
        if opts.scoring == "closed-loop" and not closed:
            logger.warning("--scoring closed-loop: the samples are not sequences of a stateful model; scored open loop")
        units = list(sequences)[:PLAN_SAMPLES] if sequences else None
        table.runner = WeightInputRunner(model, measured, samples[:PLAN_SAMPLES], sequences=units,
                                         state_pairs=dict(state_pairs or {}), closed_loop=closed,
                                         objectives=objectives_for(model, opts, state_pairs),
                                         max_calls=MAX_UNIT_CALLS)
        n = len(table.runner.units)
        if opts.requirements and n >= 2:  # the second half judges --require, unseen by the scores
            held = n // 2
            table.fit, table.held_out = slice(0, n - held), slice(n - held, n)
        elif opts.requirements:
            logger.warning("--require: a single calibration sample; the requirement is judged on it, "
                           "not on held-out data (give more samples)")
            table.held_out = slice(0, n)
        fit_n = len(table.runner.units[table.fit])
        limit = min(MAX_SAMPLES, fit_n)
    # Closed loop, errors compound: one tensor at 2 bits among FP32 ones says little about it
    # among 4-bit ones. So closed-loop kl scores also look at the context of uniform 4-bit (every
    # other measured tensor at its 4-bit candidate): score = the larger of the damage with only
    # this tensor quantized, and what quantizing it adds to that plan (its damage with this
    # tensor quantized minus with this tensor FP32). The first keeps scores clean and monotone
    # where the second is buried in the other tensors' noise; the second sees amplification.
    context: dict[str, np.ndarray] = {}
    if table.runner is not None and table.runner.closed_loop and opts.sensitivity == "kl" and CLOSED_LOOP_CONTEXT:
        context = {n: quantized[n]["4"] for n in measured if "4" in quantized[n]}
        table.context = {"plan": "uniform 4-bit", "damage": table.runner.divergence(context, limit)}

    def score(index: int, name: str) -> dict[str, float]:
        w = weights[name]
        errors = {k: float(np.sum(np.square(d - w, dtype=np.float64))) for k, d in quantized[name].items()}
        if table.runner is None or name not in measured or opts.sensitivity == "mse":
            return errors
        if opts.sensitivity == "kl" and context:
            others = {n: d for n, d in context.items() if n != name}
            exact = table.runner.divergence(others, limit)
            return {k: max(table.runner.divergence({name: d}, limit),
                           table.runner.divergence({**others, name: d}, limit) - exact)
                    for k, d in quantized[name].items()}
        if opts.sensitivity == "kl":
            return {k: table.runner.divergence({name: d}, limit) for k, d in quantized[name].items()}
        rms = float(np.sqrt(np.mean(np.square(w)))) or 1.0  # hessian
        step = HESSIAN_STEP * rms
        rng = np.random.default_rng([opts.seed, index])  # per tensor: the same draws in any thread
        trace, sem, probes = hutchinson_trace(lambda x: table.runner.divergence({name: x}, limit), w, rng,
                                              step=step)
        table.trace[name] = {"trace": trace, "stderr": sem, "probes": probes, "step": step}
        return {k: max(trace, 0.0) / w.size * e for k, e in errors.items()}

    # Tensors are scored in parallel threads: ONNX Runtime (one intra-op thread per run) and
    # numpy release the GIL, so `workers` threads keep that many cores busy on one session.
    names = list(weights)
    with ThreadPoolExecutor(max_workers=max(1, opts.resolved_workers)) as pool:
        for name, scores in zip(names, pool.map(score, range(len(names)), names), strict=True):
            table.scores[name] = scores
            logger.debug("%s: %s", name, {k: f"{s:.3g}" for k, s in scores.items()})
    table.workers = opts.resolved_workers
    table.seconds = time.perf_counter() - start
    return table
