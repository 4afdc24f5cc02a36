"""How much the model's output suffers when one weight tensor is perturbed: KL divergence of the
output distribution, Hessian-trace-weighted perturbation (Hutchinson, forward passes only),
and a data-free weight-MSE proxy.

All data-driven measures run one ONNX Runtime session in which the measured weights are graph
inputs instead of initializers, so a single session serves every tensor and every candidate.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from q4c import graph as g
from q4c.config import CODEBOOK_SCHEMES, CompileOptions, WorkerBackend
from q4c.errors import ConfigError
from q4c.objectives import Objective, detect_objectives
from q4c.quant.candidates import Candidate, candidate_list
from q4c.quant.gptq import MAX_SAMPLES as GPTQ_SAMPLES
from q4c.quant.gptq import activations_of, fitting_calls, input_hessians
from q4c.quant.lift import if_only
from q4c.quant.plan import FLOAT
from q4c.quant.score_job import HESSIAN_STEP, Rounding, ScoreJob, TaskResult, merge  # noqa: F401 (HESSIAN_STEP)
from q4c.quant.tying import tied_groups
from q4c.quant.weight_runner import (  # re-exported: their home was this module
    WeightInputRunner,
    _weights_as_inputs,  # noqa: F401
    divergence,  # noqa: F401
    hutchinson_trace,  # noqa: F401
    movable_weights,
    output_kind,  # noqa: F401
)
from q4c.quant.weights import (
    WeightSlot,
    element_count,
    find_weight_slots,
    quantize_slot,
)
from q4c.requirements import require_split

logger = logging.getLogger(__name__)

Feeds = dict[str, np.ndarray]


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
#: Rounded candidates SensitivityTable.plan_changes keeps across plans (beyond: only the last plan's)
PLAN_CACHE_BYTES = 2 * 2**30
#: Score closed-loop candidates in the context of uniform 4-bit (see measure)
CLOSED_LOOP_CONTEXT = True


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
    prepare_seconds: float = 0.0  # of `seconds`, before scoring (slots, gptq statistics, the runner)
    #: per tensor: wall seconds of its tasks (rounding + scoring its candidates), and of those in forward runs
    task_seconds: dict[str, dict[str, float]] = field(default_factory=dict)
    kernel_scales: bool = True  # see CompileOptions.kernel_scales
    workers: int = 1  # threads (or Ray workers) that scored tensors
    distributed: dict[str, Any] = field(default_factory=dict)  # Ray: workers, tasks, forward runs, seconds
    hessians: dict[str, list[np.ndarray]] = field(default_factory=dict)  # gptq's input statistics
    #: runner units scores and plan measurements use, and (with --require) the held-out ones
    fit: slice = field(default_factory=lambda: slice(0, None))
    held_out: slice | None = None
    #: the plan closed-loop kl scores are taken in (see measure), and its damage
    context: dict[str, Any] = field(default_factory=dict)
    #: measured per-output metrics of whole plans ("plan", "uniform_4bit"), filled by assign-precision
    measured: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)

    def plan_changes(self, choice: Mapping[str, str], granularity: Any) -> dict[str, np.ndarray]:
        """The dequantized weights of a plan (name -> candidate key), for the runner. Rounded
        candidates are cached across plans up to PLAN_CACHE_BYTES; past that, only this plan's
        are kept (a large model's plans are each the size of its weights)."""
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
        if sum(a.nbytes for a in cache.values()) > PLAN_CACHE_BYTES:
            for name_key in [k for k in cache if choice.get(k[0]) != k[1]]:
                del cache[name_key]
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
                               "workers": self.workers, "prepare_seconds": round(self.prepare_seconds, 3),
                               "pairs": sum(len(s) for s in self.scores.values()),
                               "task_seconds": round(sum(t["tasks"] for t in self.task_seconds.values()), 3),
                               "task_forward_seconds": round(sum(t["forward"] for t in self.task_seconds.values()), 3)}
        if self.distributed:
            out["distributed"] = dict(self.distributed)
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
    """The weights gptq can round: MatMul/Gemm/LSTM/GRU/RNN/Conv weights of the main graph or of
    If branches (their inputs are read through extra If outputs, q4c.quant.lift) whose inputs can
    be observed, not a tied output projection (it shares the embedding's codes: rounding it
    differently would not)."""
    main = main_constants(graph) if main is None else main
    tied = {n for group in tied_groups(dict(slots)) if len(group) > 1 for n in group}
    return {n: s for n, s in slots.items()
            if (n in main or if_only(graph, s.graph)) and n not in tied and activations_of(s)}


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
            state_pairs: Mapping[str, str] | None = None,
            progress: Callable[[int, int], None] | None = None) -> SensitivityTable:
    """Score every (weight tensor, candidate bits) pair with `opts.sensitivity` (see
    MeasureSensitivityPass); tensors that live only in subgraphs fall back to mse.

    `sequences` (the samples' calls grouped by sequence) and `state_pairs` make the scores
    closed loop (`closed_loop_wanted`); each output counts by its objective (q4c.objectives).
    Scored in threads, or on Ray workers with `opts.workers_backend` RAY (q4c.distributed):
    the same scores either way. `progress(done, total)` follows the tasks as they finish."""
    start = time.perf_counter()
    table, weights, measured, model = _prepare(graph, opts, opset, samples, sequences)
    roundings = {name: Rounding.of(table.slots[name], opts.granularity, opts.kernel_scales,
                                   {c.key: (c.bits, c.scheme) for c in table.candidates[name] if c.bits != FLOAT})
                 for name in weights}
    job = ScoreJob(opts.sensitivity, weights, frozenset(measured), roundings, table.hessians, seed=opts.seed)
    limit = _attach_runner(table, model, measured, opts, samples, sequences, state_pairs) if model else MAX_SAMPLES
    # Closed loop, errors compound: one tensor at 2 bits among FP32 ones says little about it
    # among 4-bit ones. So closed-loop kl scores also look at the context of uniform 4-bit (every
    # other measured tensor at its 4-bit candidate): score = the larger of the damage with only
    # this tensor quantized, and what quantizing it adds to that plan (its damage with this
    # tensor quantized minus with this tensor FP32). The first keeps scores clean and monotone
    # where the second is buried in the other tensors' noise; the second sees amplification.
    # That plan is the only set of candidates rounded here: every other is rounded in its task.
    context: dict[str, np.ndarray] = {}
    if table.runner is not None and table.runner.closed_loop and opts.sensitivity == "kl" and CLOSED_LOOP_CONTEXT:
        context = {n: job.dequantized(n, "4") for n in measured if "4" in roundings[n].candidates}
        table.context = {"plan": "uniform 4-bit", "damage": table.runner.divergence(context, limit)}
    job = dataclasses.replace(job, context=context, limit=limit, runner=table.runner)
    table.prepare_seconds = time.perf_counter() - start  # slots, statistics, runner: the part no worker shares
    names = list(weights)
    if opts.workers_backend is WorkerBackend.RAY and table.runner is not None and opts.sensitivity != "mse":
        from q4c.distributed import score_on_ray

        results, table.distributed = score_on_ray(job, job.tasks(names), opts, progress)
        table.workers = table.distributed["workers"]
    else:
        results = _score_in_threads(job, names, opts.resolved_workers, progress)
        table.workers = opts.resolved_workers
    for name in names:  # merged in candidate order: the same dict whichever backend scored
        table.scores[name] = {k: results[name].scores[k] for k in job.keys(name)}
        if results[name].trace is not None:
            table.trace[name] = results[name].trace
        table.task_seconds[name] = {"tasks": results[name].seconds, "forward": results[name].forward_seconds}
        logger.debug("%s: %s", name, {k: f"{v:.3g}" for k, v in table.scores[name].items()})
    table.seconds = time.perf_counter() - start
    return table


def _prepare(graph: gs.Graph, opts: CompileOptions, opset: int, samples: Sequence[Feeds],
             sequences: Sequence[Sequence[Feeds]] | None = None
             ) -> tuple[SensitivityTable, dict[str, np.ndarray], dict[str, np.ndarray], onnx.ModelProto | None]:
    """The table with its slots, candidates and gptq statistics; the weights; those the runner
    can measure; the model the runner runs (None without samples or measurable weights)."""
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
    if model is not None and opts.sensitivity == "kl" and opts.granularity.kind == "block" and uses_statistics(opts):
        table.hessians = input_hessians(model, gptq_eligible(graph, slots, main), samples,
                                        fitting_calls(sequences, MAX_SAMPLES))
    table.kernel_scales = opts.kernel_scales
    tied = {n for group in tied_groups(dict(slots)) if len(group) > 1 for n in group}
    for name, slot in slots.items():
        table.candidates[name] = candidate_list(slot, opts, opset, gptq=name in table.hessians, tied=name in tied)
    return table, weights, measured, model


def uses_statistics(opts: CompileOptions) -> bool:
    """gptq rounds against its weights' input statistics and the codebooks assign indices with
    them; with neither among `--schemes` they are not gathered (float64 x x^T per weight input:
    ~8 GB on a 600M-parameter encoder)."""
    return not opts.schemes or any(s == "gptq" or s in CODEBOOK_SCHEMES for s in opts.schemes)


def _attach_runner(table: SensitivityTable, model: onnx.ModelProto, measured: dict[str, np.ndarray],
                   opts: CompileOptions, samples: Sequence[Feeds], sequences: Sequence[Sequence[Feeds]] | None,
                   state_pairs: Mapping[str, str] | None) -> int:
    """Give the table its runner (mse scores without data, but the runner still measures whole
    plans: the uniform-4-bit guard in assign-precision, the report's measured Pareto curve) and
    its fit / held-out split; returns how many units each score runs."""
    closed = closed_loop_wanted(opts.scoring, sequences, state_pairs)
    if opts.scoring == "closed-loop" and not closed:
        logger.warning("--scoring closed-loop: the samples are not sequences of a stateful model; scored open loop")
    cap = None if opts.requirements else PLAN_SAMPLES  # --require: every sample given judges plans
    units = list(sequences)[:cap] if sequences else None
    table.runner = WeightInputRunner(model, measured, samples[:cap], sequences=units,
                                     state_pairs=dict(state_pairs or {}), closed_loop=closed,
                                     objectives=objectives_for(model, opts, state_pairs),
                                     max_calls=MAX_UNIT_CALLS)
    n = len(table.runner.units)
    if opts.requirements and n >= 2:  # units after those scored and fitted judge --require
        table.fit, table.held_out = require_split([len(u) for u in table.runner.units], MAX_SAMPLES,
                                                  GPTQ_SAMPLES if table.hessians else 0)
    elif opts.requirements:
        logger.warning("--require: a single calibration sample; the requirement is judged on it, "
                       "not on held-out data (give more samples)")
        table.held_out = slice(0, n)
    return min(MAX_SAMPLES, len(table.runner.units[table.fit]))


def _score_in_threads(job: ScoreJob, names: list[str], workers: int,
                      progress: Callable[[int, int], None] | None = None) -> dict[str, TaskResult]:
    """The job's tasks (those Ray would get) scored in parallel threads: ONNX Runtime (one
    intra-op thread per run) and numpy release the GIL, so `workers` threads keep that many
    cores busy on one session. `progress(done, total)` as tasks finish; results in task order."""
    tasks = job.tasks(names)
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        futures = [pool.submit(job.run, task) for task in tasks]
        if progress is not None:
            for done, _ in enumerate(as_completed(futures), start=1):
                progress(done, len(tasks))
        return merge(tasks, [f.result() for f in futures])
