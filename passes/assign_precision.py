"""Decide the precision of every quantizable weight: an analysis that fills `ctx.plan`."""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import Any

import onnx_graphsurgeon as gs

from q4c.config import CODEBOOK_SCHEMES, CompileOptions
from q4c.pipeline import Artifact, Pass, PassContext, PassResult
from q4c.quant.candidates import Candidate, candidate, default_width
from q4c.quant.holdout import (
    PlanKind,
    damage,
    pick,
    plan_metrics,
    unseen_units,
    without_codebooks,
)
from q4c.quant.knapsack import Option, Solution, solve
from q4c.quant.plan import FLOAT, PrecisionPlan, TensorPrecision
from q4c.quant.require_search import MAX_PLANS, smallest_meeting
from q4c.quant.sensitivity import SensitivityTable, gptq_eligible, measure
from q4c.quant.tying import tied_groups
from q4c.quant.unmeasured import describe, pin, unmeasured
from q4c.quant.weights import (
    WeightSlot,
    element_count,
    find_weight_slots,
    float32_scales,
)
from q4c.requirements import RequirementError, check_all, parse_requirement, shortfall

logger = logging.getLogger(__name__)

#: Average code bits of the default budget: the bytes of a uniform 4-bit plan.
DEFAULT_AVG_BITS = 4.0
#: Budgets (average code bits) of the predicted Pareto curve in the report.
PARETO_AVG_BITS = (2.5, 3.0, 3.5, 4.0, 5.0, 6.0, 8.0)


class AssignPrecisionPass(Pass):
    """Build the PrecisionPlan: replayed from `--plan`; uniform with `--bits`; otherwise the
    exact minimum of summed sensitivity under the byte budget (a multiple-choice knapsack over
    each tensor's candidates, costs counting codes as stored plus scales).

    Weights with fewer than `min_elements` elements, or named in `keep_fp32`, stay float.
    Requires: nothing (without measure-sensitivity, the data-free mse scores are used).
    Ensures: ctx.plan is set.  Stats: planned, skipped_small, kept_fp32, budget_bytes, used_bytes.
    """

    name = "assign-precision"
    analysis = True
    provides = frozenset({Artifact.PLAN})

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        opts = ctx.options
        slots = [s for s in find_weight_slots(graph) if isinstance(s, WeightSlot)]
        if opts.plan_path is not None:
            ctx.plan = self._replay(PrecisionPlan.load(opts.plan_path), slots, ctx)
            planned = sum(1 for tp in ctx.plan.tensors.values() if tp.bits != FLOAT)
            return PassResult(False, {"planned": planned, "replayed": 1})
        plan = PrecisionPlan()
        stats = {"planned": 0, "skipped_small": 0, "kept_fp32": 0}
        chosen: dict[str, WeightSlot] = {}
        for slot in slots:
            name = slot.tensor.name
            if name in plan.tensors or name in chosen:
                continue
            granularity = str(opts.granularity.resolve(float32_scales=float32_scales(slot, opts.kernel_scales)))
            if element_count(slot.tensor) < opts.min_elements:
                stats["skipped_small"] += 1
                plan.tensors[name] = TensorPrecision(FLOAT, granularity)
            elif name in opts.keep_fp32 or slot.node.name in opts.keep_fp32:
                stats["kept_fp32"] += 1
                plan.tensors[name] = TensorPrecision(FLOAT, granularity)
            else:
                chosen[name] = slot
        if opts.bits is not None:
            gptq_ok = set(gptq_eligible(graph, chosen)) if opts.scheme == "gptq" else set()
            for name, slot in chosen.items():
                gran = str(opts.granularity.resolve(float32_scales=float32_scales(slot, opts.kernel_scales)))
                scheme = opts.scheme if opts.scheme != "gptq" or name in gptq_ok else "symmetric"
                if scheme in CODEBOOK_SCHEMES:  # tables per channel group (nf4: scale blocks), auto by default
                    gran = str(opts.granularity)
                plan.tensors[name] = TensorPrecision(opts.bits, gran, scheme)
            plan.defaults = {"mode": "uniform", "bits": opts.bits, "granularity": str(opts.granularity),
                             "scheme": opts.scheme}
            stats["planned"] = len(chosen)
        elif chosen:
            stats.update(self._budgeted(graph, plan, chosen, ctx))
        ctx.plan = plan
        return PassResult(False, {k: v for k, v in stats.items() if v})

    def _budgeted(self, graph: gs.Graph, plan: PrecisionPlan, chosen: dict[str, WeightSlot],
                  ctx: PassContext) -> dict[str, int]:
        opts = ctx.options
        table = ctx.sensitivity
        if table is None or set(chosen) - set(table.scores):
            # No (complete) measurement: fall back to the data-free weight-error proxy.
            table = measure(graph, dataclasses.replace(opts, sensitivity="mse"), ctx.opset, ctx.samples,
                            sequences=ctx.sequences or None, state_pairs=ctx.state_pairs)
            ctx.warn("assign-precision: no sensitivity measurement for every tensor; used the data-free mse proxy")
        names = sorted(chosen)
        groups = tied_groups(chosen)
        items = [_group_options(group, table) for group in groups]
        reasons = unmeasured(table, names)
        if reasons:  # never measured: not left to the knapsack's free 2 bits (q4c.quant.unmeasured)
            items = pin(items, groups, table, list(reasons))
            ctx.warn(describe(reasons))
        budget = budget_bytes(opts, chosen, ctx.opset, groups)
        uniform = _uniform_choice(groups, items, table)
        if uniform is not None and _cost(items, uniform) > budget and not opts.requirements:
            uniform = None
        if opts.requirements:
            solution, kept_uniform = self._smallest_meeting(groups, items, chosen, uniform, table, ctx)
        else:
            solution = solve(items, budget, incumbent=uniform)
            choice, _ = self._guard(groups, items, solution, uniform, budget, table, ctx)
            kept_uniform = choice == uniform
            solution = Solution(choice, _cost(items, choice), sum(items[i][k].score for i, k in enumerate(choice)), 1)
        picks = _expand(groups, solution.choice)
        choice = [table.candidates[n][picks[n]] for n in names]
        used = solution.cost
        for name, cand in zip(names, choice, strict=True):
            plan.tensors[name] = TensorPrecision(cand.bits, cand.granularity, cand.scheme)
        if opts.requirements:
            budget = solution.cost  # the budget the search settled on
        plan.defaults = {"mode": "budgeted", "sensitivity": table.measure, "budget_bytes": budget,
                         "used_bytes": used, "predicted_damage": solution.score,
                         "kept_uniform_4bit": kept_uniform,
                         "tied": [list(grp) for grp in groups if len(grp) > 1],
                         "candidates": list(opts.candidates), "granularity": str(opts.granularity)}
        ctx.pareto = _pareto(groups, items, chosen, table, ctx)
        return {"planned": sum(1 for n in names if plan.tensors[n].bits != FLOAT), "budget_bytes": budget,
                "used_bytes": used, "kept_uniform_4bit": int(kept_uniform)}

    @staticmethod
    def _smallest_meeting(groups: list[list[str]], items: list[list[Option]], chosen: dict[str, WeightSlot],
                          uniform: tuple[int, ...] | None, table: SensitivityTable,
                          ctx: PassContext) -> tuple[Solution, bool]:
        """--require: the smallest plan whose measured figures on the held-out calibration samples
        meet every requirement, below the cap (--avg-bits/--size-budget/--ratio if given, else one
        byte under FP32): q4c.quant.require_search (bisection over the budget, then single-tensor
        downgrades), every plan measured (closed loop for a stateful model's sequences, whatever
        --scoring says). Raises RequirementError (best figure and its size) when none meets it."""
        opts = ctx.options
        reqs = [parse_requirement(t) for t in opts.requirements]
        if table.runner is None:
            raise RequirementError("--require needs input samples to measure plans on; pass --calib DATA")
        kinds = set(table.runner.kinds.values())
        needs = {"flips": {"bce"}, "sqnr": {"snr", "bce"}, "kl": {"kl", "bce"}}
        for req in reqs:
            if not kinds & needs[req.metric]:
                raise RequirementError(f"--require {req.text}: no task output has a {req.metric} figure (objectives: "
                                       f"{', '.join(f'{n} {k}' for n, k in table.runner.kinds.items())}; "
                                       f"see --objective)")
        fp32 = sum(max(o.cost for o in options) for options in items)
        capped = any(b is not None for b in (opts.avg_bits, opts.size_budget, opts.ratio))
        cap = min(budget_bytes(opts, chosen, ctx.opset, groups), fp32 - 1) if capped else fp32 - 1
        tried: dict[tuple[int, ...], tuple[int, dict[str, Any], bool, list[str]]] = {}
        judged = table.held_out if table.held_out is not None else table.fit

        def evaluate(choice: tuple[int, ...]) -> tuple[int, dict[str, Any], bool, list[str]]:
            if choice not in tried:
                keys = {n: table.candidates[n][k].key for n, k in _expand(groups, choice).items()}
                metrics = plan_metrics(table, keys, opts.granularity, judged)
                ok, figures = check_all(reqs, metrics)
                tried[choice] = (_cost(items, choice), metrics, ok, figures)
                logger.info("--require: %d bytes -> %s (%s)", tried[choice][0], ", ".join(figures),
                            "met" if ok else "not met")
                if ctx.task_progress is not None:  # at most MAX_PLANS; the search usually stops sooner
                    ctx.task_progress("measuring plans", len(tried), MAX_PLANS)
            return tried[choice]

        lowest = sum(min(o.cost for o in options) for options in items)
        best = smallest_meeting(items, cap, uniform, lambda choice: evaluate(choice)[2])
        if best is None and not tried:
            raise RequirementError(f"--require: the size cap ({cap} bytes) is below the smallest plan ({lowest} bytes)")
        if best is None:
            closest = min(tried.items(), key=lambda kv: (shortfall(reqs, kv[1][1]), kv[1][0]))
            cost, _, _, figures = closest[1]
            limit = f"the cap of {cap} bytes" if capped else f"the FP32 weights ({fp32} bytes)"
            raise RequirementError(
                f"no plan smaller than {limit} meets {', '.join(opts.requirements)} on the held-out calibration "
                f"samples: the best reached {', '.join(figures)} at {cost} bytes ({len(tried)} plans measured)")
        cost, metrics, _, figures = tried[best]
        table.measured["plan"] = metrics
        table.measured["require"] = {"requirements": list(opts.requirements), "figures": figures, "bytes": cost,
                                     "fp32_bytes": fp32, "cap_bytes": cap, "plans_measured": len(tried),
                                     "on": "held-out calibration samples"}
        return Solution(best, cost, sum(items[i][k].score for i, k in enumerate(best)), 1), best == uniform

    @staticmethod
    def _guard(groups: list[list[str]], items: list[list[Option]], solution: Solution, uniform: tuple[int, ...] | None,
               budget: int, table: SensitivityTable, ctx: PassContext) -> tuple[tuple[int, ...], PlanKind]:
        """The per-tensor scores add up to a prediction, measured on the samples the data-fitted
        candidates were fitted on. With a data-driven runner, measure the knapsack's plan, the
        knapsack's plan without codebook candidates and uniform 4-bit (those that fit) on the
        calibration units nothing was fitted on (q4c.quant.holdout; a stateful model's
        sequences closed loop) and keep the least damage."""
        plans = {PlanKind.MIXED: solution.choice}
        if table.runner is None:
            return solution.choice, PlanKind.MIXED
        names = [grp[0] for grp in groups]
        if any(table.candidates[n][k].scheme in CODEBOOK_SCHEMES for n, k in zip(names, solution.choice, strict=True)):
            plain = without_codebooks(items, [table.candidates[n] for n in names])
            plans[PlanKind.NO_CODEBOOKS] = solve(plain, budget, incumbent=uniform).choice
        if uniform is not None:
            plans[PlanKind.UNIFORM] = uniform
        judged = unseen_units(table)
        granularity = ctx.options.granularity
        measured: dict[PlanKind, dict[str, dict[str, Any]]] = {}
        for kind, choice in plans.items():
            same = next((k for k in measured if plans[k] == choice), None)
            keys = {n: table.candidates[n][k].key for n, k in _expand(groups, choice).items()}
            measured[kind] = measured[same] if same is not None else table.runner.score(
                table.plan_changes(keys, granularity), keep=True, which=judged.units,
                closed=table.runner.plans_closed_loop).metrics()
        best = pick(measured)
        table.measured = {"plan": measured[best], **({"uniform_4bit": measured[PlanKind.UNIFORM]} if uniform else {}),
                          "guard": {"on": judged.text, "unseen": judged.unseen, "chosen": best.value,
                                    "damage": {k.value: round(damage(m), 6) for k, m in measured.items()}}}
        scoring = "closed loop" if table.runner.plans_closed_loop else "open loop"
        figures = ", ".join(f"{k.value} {damage(m):.4g}" for k, m in measured.items())
        if best is PlanKind.UNIFORM and plans[best] != solution.choice:
            ctx.warn(f"assign-precision: the mixed plan measured worse than uniform 4-bit on {judged.text}, {scoring} "
                     f"({figures}); kept uniform 4-bit")
        elif best is PlanKind.NO_CODEBOOKS and plans[best] != solution.choice:
            ctx.warn(f"assign-precision: the plan with codebook candidates measured worse on {judged.text}, {scoring} "
                     f"({figures}); kept the plan without them")
        return plans[best], best

    @staticmethod
    def _replay(plan: PrecisionPlan, slots: list[WeightSlot], ctx: PassContext) -> PrecisionPlan:
        known = {s.tensor.name for s in slots}
        unknown = sorted(set(plan.tensors) - known)
        if unknown:
            ctx.warn(f"plan names {len(unknown)} tensor(s) not in this model, ignored: {', '.join(unknown[:5])}")
        return PrecisionPlan({n: tp for n, tp in plan.tensors.items() if n in known}, dict(plan.defaults))


def _uniform_choice(groups: list[list[str]], items: list[list[Option]],
                    table: SensitivityTable) -> tuple[int, ...] | None:
    """Per knapsack item, the index of its 4-bit candidate with the least predicted damage (every
    4-bit scheme costs the same bytes), None if some item has no 4-bit candidate."""
    picks = []
    for group, options in zip(groups, items, strict=True):
        fours = default_width(table.candidates[group[0]])
        if not fours:
            return None
        picks.append(min(fours, key=lambda i: (options[i].score, table.candidates[group[0]][i].scheme != "symmetric")))
    return tuple(picks)


def _cost(items: list[list[Option]], picks: tuple[int, ...]) -> int:
    """Bytes of one option per item (a tied group's shared codes counted once, as in `items`)."""
    return sum(items[i][k].cost for i, k in enumerate(picks))


def _options(cands: list[Candidate], scores: dict[str, float]) -> list[Option]:
    # FP32 scores 0 unless measured (closed-loop scores in context give it the context's damage)
    return [Option(c.nbytes, max(scores.get(c.key, 0.0) if c.bits == FLOAT else scores[c.key], 0.0)) for c in cands]


def _group_options(group: list[str], table: SensitivityTable) -> list[Option]:
    if len(group) == 1:
        return _options(table.candidates[group[0]], table.scores[group[0]])
    first, second = group
    options = []
    for a, b in zip(table.candidates[first], table.candidates[second], strict=True):
        assert a.key == b.key, "tied tensors have the same candidate list"
        shared = 0 if a.bits == FLOAT else math.ceil(math.prod(table.slots[first].tensor.shape) * a.storage_bits / 8)
        score = (max(table.scores[first].get(a.key, 0.0), 0.0) + max(table.scores[second].get(b.key, 0.0), 0.0)
                 if a.bits == FLOAT else max(table.scores[first][a.key], 0.0) + max(table.scores[second][b.key], 0.0))
        options.append(Option(a.nbytes + b.nbytes - shared, score))
    return options


def _expand(groups: list[list[str]], choice: tuple[int, ...]) -> dict[str, int]:
    return {name: k for group, k in zip(groups, choice, strict=True) for name in group}


def budget_bytes(opts: CompileOptions, chosen: dict[str, WeightSlot], opset: int,
                 groups: list[list[str]] | None = None) -> int:
    """The byte budget for the chosen tensors: --size-budget as given; --ratio of their FP32
    bytes; --avg-bits B as B bits per weight plus the scales of the default granularity, a tied
    table's codes counted once."""
    if opts.size_budget is not None:
        return int(opts.size_budget)
    if opts.ratio is not None:
        return int(opts.ratio * sum(4 * element_count(s.tensor) for s in chosen.values()))
    avg = opts.avg_bits if opts.avg_bits is not None else DEFAULT_AVG_BITS
    return avg_bits_budget(avg, chosen, opts, opset, groups)


def avg_bits_budget(avg: float, chosen: dict[str, WeightSlot], opts: CompileOptions, opset: int,
                    groups: list[list[str]] | None = None) -> int:
    total = 0
    for slot in chosen.values():
        n = element_count(slot.tensor)
        four = candidate(slot, 4, opts.granularity, opset, kernel_scales=opts.kernel_scales)
        scale_bytes = four.nbytes - math.ceil(n * 4 / 8)
        total += math.floor(n * avg / 8) + scale_bytes
    for group in groups or []:
        if len(group) > 1:  # tied: the second copy of the codes is not stored
            total -= math.floor(element_count(chosen[group[0]].tensor) * avg / 8)
    return total


def _pareto(groups: list[list[str]], items: list[list[Option]], chosen: dict[str, WeightSlot], table: SensitivityTable,
            ctx: PassContext) -> list[dict[str, Any]]:
    """Predicted damage vs bytes at several budgets (cheap: one DP each); the measured column
    is filled in by the compiler when a sensitivity runner is available."""
    points = []
    cheapest = sum(min(o.cost for o in options) for options in items)
    budgets = {avg: avg_bits_budget(avg, chosen, ctx.options, ctx.opset, groups) for avg in PARETO_AVG_BITS}
    below = [avg for avg, budget in budgets.items() if budget < cheapest]
    if below:  # no plan fits those budgets (the cheapest candidates cost more): no point to draw
        logger.info("pareto: no plan fits %s average bits (the smallest plan is %d bytes)",
                    ", ".join(map(str, below)), cheapest)
    for avg, budget in budgets.items():
        if avg in below:
            continue
        sol = solve(items, budget)
        picks = _expand(groups, sol.choice)
        points.append({"avg_bits": avg, "budget_bytes": budget, "used_bytes": sol.cost, "predicted": sol.score,
                       "choice": {n: table.candidates[n][k].key for n, k in sorted(picks.items())}})
    return points

