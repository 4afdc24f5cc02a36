"""Sensitivity and plan choice of a system (q4c.system_compile): per-tensor candidates scored on
the driver's outputs, one knapsack over all graphs, and a guard that judges whole plans on driver
samples nothing was scored or fitted on.

Samples are split once (`split_samples`): the per-tensor scores (and GPTQ / codebook fitting) run
on the scoring part, whole plans (the knapsack's, the same without codebook candidates, uniform
4-bit) are compared on the held-out part, and the least damage there wins (q4c.quant.holdout).
Scored on three samples, DeepFilterNet3's system plan measured 25.3 dB in one compile and 29.4 in
another on the test audio; the RNN-T's plan looked better than uniform 4-bit on the samples it
was scored on and decoded the test set worse (session 3).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from q4c import graph as g
from q4c.config import CompileOptions
from q4c.quant import holdout
from q4c.quant.candidates import Candidate, candidate_list
from q4c.quant.holdout import PlanKind
from q4c.quant.knapsack import Option, solve
from q4c.quant.plan import FLOAT, PrecisionPlan, TensorPrecision
from q4c.quant.sensitivity import SensitivityTable, gptq_eligible, main_constants
from q4c.quant.tying import tied_groups
from q4c.quant.weights import WeightSlot, quantize_slot
from q4c.system import CallLog, SystemRunner, score_outputs
from q4c.system_plan import smallest_meeting

logger = logging.getLogger(__name__)

#: most samples each (tensor, candidate) score runs the whole system on
MAX_SCORE_SAMPLES = 16
#: fewest held-out samples the guard judges on; a quarter of the samples are held out
MIN_HELD_OUT = 2
#: calls of one graph whose inputs GPTQ rounding is fitted on (from the scoring samples)
GPTQ_CALLS = 4


@dataclass
class Member:
    """One graph of the system, canonicalized (the non-quantizing passes), ready to score."""

    name: str
    path: Path
    model: onnx.ModelProto  # as loaded
    opset: int
    graph: gs.Graph  # canonical
    slots: dict[str, WeightSlot] = field(default_factory=dict)
    weights: dict[str, np.ndarray] = field(default_factory=dict)  # measured weights (graph inputs)
    table: SensitivityTable | None = None
    session: Any = None
    dequantized: dict[tuple[str, str], np.ndarray] = field(default_factory=dict)


@dataclass(frozen=True)
class SampleSplit:
    """Which driver samples score tensors and which judge whole plans (never scored)."""

    score: tuple[int, ...]
    held: tuple[int, ...]
    unseen: bool  # False: too few samples to hold any out; plans judged on all of them

    def describe(self) -> str:
        if not self.unseen:
            return f"all {len(self.held)} driver sample(s): too few to hold any out of the scoring"
        return f"held-out driver samples {list(self.held)} (never scored)"


def split_samples(count: int, seed: int = 0) -> SampleSplit:
    """The last quarter (at least MIN_HELD_OUT) held out, the first MAX_SCORE_SAMPLES of the rest
    scored; seed > 0 shuffles the samples first (another split, to see a plan's spread)."""
    order = list(range(count)) if seed == 0 else [int(i) for i in np.random.default_rng(seed).permutation(count)]
    if count < 2 * MIN_HELD_OUT:
        return SampleSplit(tuple(order[:MAX_SCORE_SAMPLES]), tuple(order), False)
    k = max(MIN_HELD_OUT, count // 4)
    return SampleSplit(tuple(order[:-k][:MAX_SCORE_SAMPLES]), tuple(order[-k:]), True)


@dataclass
class Scoring:
    """What scoring and the knapsack share: the members, the FP32 runs and how outputs are judged."""

    members: Mapping[str, Member]
    runner: SystemRunner
    samples: Sequence[Any]
    references: Sequence[Mapping[str, np.ndarray]]
    logs: Sequence[CallLog]
    objectives: Mapping[str, Any]
    split: SampleSplit

    def measure(self, changes: Mapping[str, Mapping[str, np.ndarray]], which: Sequence[int]) -> dict[str, Any]:
        """Per driver output, the damage (and figures) of the system with `changes` on samples `which`."""
        outs = [self.runner.run(self.samples[i], i, changes, cached=self.logs[i]) for i in which]
        return score_outputs(self.objectives, [self.references[i] for i in which], outs).metrics()


# ---------------------------------------------------------------- candidates and their scores


def candidates(m: Member, options: CompileOptions, logs: Sequence[CallLog], split: SampleSplit) -> SensitivityTable:
    """The member's candidate table (GPTQ fitted on its calls in the scoring samples)."""
    table = SensitivityTable(options.sensitivity if options.sensitivity != "hessian" else "kl", slots=m.slots)
    table.kernel_scales = options.kernel_scales
    if options.sensitivity != "mse" and options.granularity.kind == "block" and m.weights:
        from q4c.quant.gptq import input_hessians

        eligible = {n: s for n, s in gptq_eligible(m.graph, m.slots, main_constants(m.graph)).items() if n in m.weights}
        calls = [feeds for i in split.score for feeds, _ in logs[i].calls.get(m.name, [])]
        table.hessians = input_hessians(g.export_model(m.graph.copy()), eligible, calls[:GPTQ_CALLS]) if eligible else {}
    tied = {n for group in tied_groups(dict(m.slots)) if len(group) > 1 for n in group}
    opts = options if options.sensitivity != "hessian" else dataclasses.replace(options, sensitivity="kl")
    for name, slot in m.slots.items():
        table.candidates[name] = candidate_list(slot, opts, m.opset, gptq=name in table.hessians, tied=name in tied)
    return table


def dequantized(m: Member, name: str, cand: Candidate) -> np.ndarray:
    if (name, cand.key) not in m.dequantized:
        m.dequantized[name, cand.key] = _uncached(m, name, cand)
    return m.dequantized[name, cand.key]


def weight_errors(m: Member, name: str) -> dict[str, float]:
    w = np.asarray(m.slots[name].tensor.values, np.float32)
    return {c.key: float(np.sum(np.square(_uncached(m, name, c) - w, dtype=np.float64)))
            for c in m.table.candidates[name] if c.bits != FLOAT}


def _uncached(m: Member, name: str, cand: Candidate) -> np.ndarray:
    w = np.asarray(m.slots[name].tensor.values, np.float32)
    return quantize_slot(m.slots[name], w, cand.bits, cand.granularity, cand.scheme,
                         kernel_scales=m.table.kernel_scales, hessians=m.table.hessians.get(name)).dequantize()


def score(s: Scoring, options: CompileOptions) -> dict[str, Any]:
    """scores[tensor][candidate] = damage of the driver's outputs on the scoring samples with only
    that tensor of that graph quantized (weights without a session input: their weight error)."""
    start = time.perf_counter()
    runs_before = s.runner.runs

    def damage(changes: Mapping[str, Mapping[str, np.ndarray]]) -> float:
        return holdout.damage(s.measure(changes, s.split.score))

    jobs = [(m, name) for m in s.members.values() for name in m.slots]

    def one(job: tuple[Member, str]) -> dict[str, float]:
        m, name = job
        if name not in m.weights:
            return weight_errors(m, name)
        return {c.key: damage({m.name: {name: _uncached(m, name, c)}}) for c in m.table.candidates[name]
                if c.bits != FLOAT}

    with ThreadPoolExecutor(max_workers=max(1, options.resolved_workers)) as pool:
        for (m, name), scores in zip(jobs, pool.map(one, jobs), strict=True):
            m.table.scores[name] = scores
            logger.info("%s/%s: %s", m.name, name, {k: f"{v:.3g}" for k, v in scores.items()})
    return {"measure": "system-output damage", "tensors": len(jobs), "score_samples": len(s.split.score),
            "scored_on": list(s.split.score),
            "candidates": sum(len(m.table.candidates[t]) - 1 for m, t in jobs),
            "system_runs": s.runner.runs - runs_before, "seconds": round(time.perf_counter() - start, 2),
            "note": "each score: the whole system run through the driver with one tensor of one graph at a "
                    "candidate; damage summed over the driver's outputs (q4c.objectives, nats)"}


# ---------------------------------------------------------------- one knapsack over all graphs


@dataclass
class Items:
    """The knapsack's items (tied groups of every graph), the uniform 4-bit choice and the budget."""

    options: list[list[Option]]
    where: list[tuple[Member, list[str]]]
    uniform: tuple[int, ...] | None
    budget: int

    def cost(self, choice: Sequence[int]) -> int:
        return sum(self.options[i][k].cost for i, k in enumerate(choice))

    def keyed(self, choice: Sequence[int]) -> dict[str, dict[str, Candidate]]:
        out: dict[str, dict[str, Candidate]] = {}
        for (m, group), k in zip(self.where, choice, strict=True):
            for name in group:
                out.setdefault(m.name, {})[name] = m.table.candidates[name][k]
        return out


def _items(members: Mapping[str, Member], options: CompileOptions) -> Items:
    from q4c.passes.assign_precision import (
        _group_options,
        _uniform_choice,
        budget_bytes,
    )

    items = Items([], [], (), 0)
    uniform: list[int] | None = []
    for m in members.values():
        if not m.slots:
            continue
        groups = tied_groups(dict(m.slots))
        opts_m = [_group_options(group, m.table) for group in groups]
        items.options += opts_m
        items.where += [(m, group) for group in groups]
        u = _uniform_choice(groups, opts_m, m.table)
        uniform = None if uniform is None or u is None else uniform + list(u)
        items.budget += budget_bytes(dataclasses.replace(options, size_budget=None), m.slots, m.opset, groups)
    if options.size_budget is not None:
        items.budget = int(options.size_budget)
    items.uniform = tuple(uniform) if uniform is not None else None
    if items.uniform is not None and items.cost(items.uniform) > items.budget and not options.requirements:
        items.uniform = None
    return items


def knapsack(s: Scoring, options: CompileOptions, warnings: list[str]) -> tuple[dict[str, PrecisionPlan], dict, dict]:
    """One multiple-choice knapsack over all graphs' tensors under the system's budget; the
    knapsack's plan, the same without codebook candidates and uniform 4-bit are measured on the
    held-out samples and the least damage kept. Returns (per-graph plans, defaults, measured)."""
    items = _items(s.members, options)

    def measure(choice: Sequence[int], which: Sequence[int] = s.split.held) -> dict[str, Any]:
        changes = {gname: {t: dequantized(s.members[gname], t, c)
                           for t, c in cands.items() if c.bits != FLOAT and t in s.members[gname].weights}
                   for gname, cands in items.keyed(choice).items()}
        return s.measure(changes, which)

    if options.requirements:
        fp32 = sum(max(o.cost for o in opts) for opts in items.options)
        capped = any(b is not None for b in (options.avg_bits, options.size_budget, options.ratio))
        items.budget = min(items.budget, fp32 - 1) if capped else fp32 - 1
        solution, measured = smallest_meeting(items.options, items.budget, capped, items.uniform, measure,
                                              s.split.held, options)
        choice, kind = tuple(solution.choice), PlanKind.MIXED
    else:
        choice, kind, measured = _guarded(items, measure, warnings)
        measured["on"] = s.split.describe()
    return _plans(s.members, items, choice, kind, options), _defaults(s, items, choice, kind, options), measured


def _guarded(items: Items, measure: Callable[..., dict[str, Any]], warnings: list[str]
             ) -> tuple[tuple[int, ...], PlanKind, dict[str, Any]]:
    """The whole plan with the least held-out damage among the knapsack's, the knapsack's without
    codebook candidates and uniform 4-bit (ties to the simpler)."""
    plans = {PlanKind.MIXED: tuple(solve(items.options, items.budget, incumbent=items.uniform).choice)}
    cands = [[m.table.candidates[group[0]][k] for k in range(len(opts))]
             for (m, group), opts in zip(items.where, items.options, strict=True)]
    plain = holdout.without_codebooks(items.options, cands)
    if any(any(o.score == float("inf") for o in opts) for opts in plain):
        no_cb = solve(plain, items.budget, incumbent=items.uniform)
        if no_cb.score != float("inf"):
            plans[PlanKind.NO_CODEBOOKS] = tuple(no_cb.choice)
    if items.uniform is not None:
        plans[PlanKind.UNIFORM] = items.uniform
    metrics: dict[tuple[int, ...], dict[str, Any]] = {}
    for choice in plans.values():
        if choice not in metrics:
            metrics[choice] = measure(choice)
    measured = {kind: metrics[choice] for kind, choice in plans.items()}
    kind = holdout.pick(measured)
    if kind is not PlanKind.MIXED:
        warnings.append(f"the knapsack's system plan measured worse on the held-out driver samples than "
                        f"{kind.value} ({holdout.damage(measured[PlanKind.MIXED]):.4g} vs "
                        f"{holdout.damage(measured[kind]):.4g}); kept {kind.value}")
    report = {"plan": measured[kind], "kept": kind.value,
              "compared": {k.value: {"damage": round(holdout.damage(v), 6), "bytes": items.cost(plans[k])}
                           for k, v in measured.items()}}
    if PlanKind.UNIFORM in measured:
        report["uniform_4bit"] = measured[PlanKind.UNIFORM]
    return plans[kind], kind, report


def _plans(members: Mapping[str, Member], items: Items, choice: Sequence[int], kind: PlanKind,
           options: CompileOptions) -> dict[str, PrecisionPlan]:
    plans = {name: PrecisionPlan() for name in members}
    for gname, cands in items.keyed(choice).items():
        for t, c in cands.items():
            plans[gname].tensors[t] = TensorPrecision(c.bits, c.granularity, c.scheme)
    return plans


def _defaults(s: Scoring, items: Items, choice: Sequence[int], kind: PlanKind, options: CompileOptions) -> dict:
    first = next(iter(s.members.values()), None)
    return {"mode": "budgeted-system", "sensitivity": first.table.measure if first is not None else None,
            "budget_bytes": items.budget, "used_bytes": items.cost(choice),
            "kept": kind.value, "kept_uniform_4bit": kind is PlanKind.UNIFORM,
            "predicted_damage": sum(items.options[i][k].score for i, k in enumerate(choice)),
            "candidates": list(options.candidates), "granularity": str(options.granularity)}
