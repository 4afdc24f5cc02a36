"""Re-plan bits x lowering form per layer under the byte budget AND a latency budget (an analysis).

Runs after assign-precision (which chose bits under the byte budget alone) and before
choose-kernels (which keeps forms already in the plan). With `--latency-budget X` (X times the
FP32 model's time, or `Nms`), it measures each plannable layer's forms on the shape the sample
input calls it with (q4c.latency.costs, cached per machine and ONNX Runtime version), times the
FP32 model once, and solves the two-resource knapsack of q4c.latency.planner; every weight then
gets the candidate and form of that solution, basis `latency`. Without a latency budget it does
nothing.
"""

from __future__ import annotations

import logging
import math
from collections import defaultdict
from dataclasses import dataclass, replace

import onnx_graphsurgeon as gs

from q4c import graph as g
from q4c import ort as q4ort
from q4c.config import Granularity, Target
from q4c.errors import ConfigError, PreconditionError
from q4c.latency.costs import CostTable, costs
from q4c.latency.forms import Form as LatencyForm
from q4c.latency.layers import find_layers
from q4c.latency.measure import Calibration, corrected, materialise, time_against_fp32
from q4c.latency.planner import (
    FASTEST_SLACK,
    LatencyPlan,
    fp32_layer_seconds,
    latency_budget_seconds,
    layer_seconds,
    plan_latency,
    variants,
)
from q4c.pipeline import Pass, PassContext, PassResult
from q4c.quant.candidates import candidate, scheme_key
from q4c.quant.plan import FLOAT, Form, FormBasis, PrecisionPlan, TensorPrecision
from q4c.quant.weights import WeightSlot, find_weight_slots
from q4c.timing import interleaved

logger = logging.getLogger(__name__)

#: Wall-clock cap for timing the FP32 model (at least 5 runs).
FP32_TIMING_SECONDS = 2.0
#: When no plan meets the latency budget, a re-plan of the bits replaces assign-precision's only if
#: predicted this many times faster than the assigned bits in their fastest forms.
REPLAN_GAIN = 1.2
#: Forms of a tied output projection: those that read its (shared) codes without storing a copy.
TIED_FORMS = frozenset({LatencyForm.FP32_AT_LOAD, LatencyForm.INT8_AT_LOAD})
#: Plans built and timed at most (each measurement corrects the next prediction).
MEASURE_ROUNDS = 3


def plan_form(form: LatencyForm) -> Form:
    """The plan's Form of a planner form (same string values); ConfigError if the plan has none."""
    try:
        return Form(form.value)
    except ValueError:
        raise ConfigError(f"--latency-budget: form {form.value!r} has no lowering in this q4c") from None


def lowerable_forms() -> frozenset[LatencyForm]:
    """Planner forms the plan (and so the materialising passes) can express."""
    values = {f.value for f in Form}
    return frozenset(f for f in LatencyForm if f.value in values)


class ChooseFormsPass(Pass):
    """With a latency budget: bits x form per layer, least damage under bytes and predicted time.

    Requires: ctx.plan, ctx.sensitivity (measure-sensitivity), an input sample.
    Ensures: every planned layer's weights carry a form with basis `latency`.
    Stats: planned_layers, one count per chosen form, measured_costs, cached_costs.
    """

    name = "choose-forms"

    def __init__(self, latency_budget: str | None = None) -> None:
        self.latency_budget = latency_budget

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        budget = self.latency_budget or getattr(ctx.options, "latency_budget", None)
        if budget is None or ctx.options.target is not Target.ORT_CPU:
            return PassResult(False)
        plan = ctx.require_plan()
        table = ctx.sensitivity
        if (table is None or not table.candidates) and plan.defaults.get("mode") == "uniform":
            table = _uniform_table(graph, plan, ctx)  # --bits: one candidate per weight, only the form is free
        if table is None or not table.candidates:
            raise PreconditionError("--latency-budget needs the sensitivity measurement; run 'measure-sensitivity'")
        if not ctx.samples:
            raise PreconditionError("--latency-budget needs an input sample shaped like the deployment; pass --calib")
        names = [n for n in table.candidates if n in plan.tensors]
        tied = {n for group in plan.defaults.get("tied", []) for n in group}
        allowed = lowerable_forms()
        found = [layer for layer in find_layers(graph, ctx.samples[0]) if all(w in names for w in layer.weights)]
        # a tied output projection keeps its bits (its codes are shared, counted in `fixed` below):
        # only its form is planned
        tied_layers = {layer.weights[0] for layer in found if len(layer.weights) == 1 and layer.weights[0] in tied}
        layers = [layer for layer in found if all(w not in tied or w in tied_layers for w in layer.weights)]
        if not layers:
            ctx.warn(f"--latency-budget {budget}: no MatMul/LSTM/GRU with a constant weight in the main graph to plan "
                     f"(layers inside If/Loop/Scan bodies are not planned); forms left to choose-kernels")
            return PassResult(False, {"planned_layers": 0})
        in_layers = {w for layer in layers for w in layer.weights}
        candidates = {n: list(table.candidates[n]) for n in names}
        own = {n: [c for c in cs if c.key == _key(plan.tensors[n])] or cs for n, cs in candidates.items()}
        if plan.defaults.get("mode") == "uniform":  # --bits: only the form is free
            candidates = own
        wanted: dict = defaultdict(set)
        for layer in layers:
            wanted[layer.shape] |= {v for v in variants(layer, candidates) if v[0] in allowed}
        cost_table = costs(wanted)
        fp32_s = _fp32_seconds(graph, ctx)
        seconds = latency_budget_seconds(str(budget), fp32_s)
        shapes = {n: tuple(int(d) for d in table.slots[n].tensor.shape) for n in names}
        rest = [n for n in names if n not in in_layers and n not in tied]
        # tied tables keep assign-precision's choice (their shared codes are counted once there)
        fixed = _tied_bytes(plan, candidates, tied, table)
        byte_budget = _byte_budget(plan, candidates, tied, fixed)
        for name in tied_layers:
            candidates[name] = own[name] = [replace(c, nbytes=0) for c in own[name]]
        common = {"byte_budget": byte_budget - fixed, "fp32_s": fp32_s, "budget_s": seconds, "forms": allowed,
                  # forms that read the shared codes as they are (no second copy of the table)
                  "layer_forms": {layer.node: TIED_FORMS for layer in layers if layer.weights[0] in tied_layers}}
        solve = _Solver(layers, rest, own, candidates, table.scores, cost_table, shapes, common)
        lp, attempts = _plan_measured(graph, ctx, plan, solve, seconds / fp32_s if _is_ratio(budget) else None)
        lp.nbytes += fixed
        lp.byte_budget = byte_budget
        if not lp.met:
            ctx.warn(f"--latency-budget {budget}: no plan within {byte_budget} bytes met the budget "
                     f"({1e3 * seconds:.3f} ms); kept the fastest measured, {lp.measured_ratio:.2f}x FP32 "
                     f"(predicted {lp.predicted_s / fp32_s:.2f}x)")
        stats = _write(plan, lp, candidates)
        plan.defaults["latency"] = {**lp.report(), "budget": str(budget), "attempts": attempts,
                                    "costs": cost_table.report()}
        stats.update(planned_layers=len(layers), measured_costs=cost_table.measured, cached_costs=cost_table.cached,
                     kept_assigned_bits=int(lp.kept_bits), plans_measured=len(attempts))
        logger.info("choose-forms: predicted %.3f ms (%.3fx FP32 %.3f ms), budget %.3f ms, %d bytes",
                    1e3 * lp.predicted_s, lp.predicted_s / fp32_s, 1e3 * fp32_s, 1e3 * seconds, lp.nbytes)
        return PassResult(False, {k: v for k, v in stats.items() if v})


def _is_ratio(budget: str) -> bool:
    return not str(budget).strip().lower().endswith("ms")


@dataclass
class _Solver:
    """The planner with everything fixed but the calibration of predicted time."""

    layers: list
    rest: list[str]
    own: dict
    candidates: dict
    scores: dict
    costs: CostTable
    shapes: dict
    common: dict

    def __call__(self, calibration: Calibration | None) -> LatencyPlan:
        """assign-precision's bits (its guard may have preferred them to the knapsack's on held-out
        data) with their fastest forms if that meets the budget, else bits and forms re-planned."""
        args = (self.layers, self.rest)
        try:
            lp = plan_latency(*args, self.own, self.scores, self.costs, self.shapes, fastest=True,
                              calibration=calibration, **self.common)
        except ConfigError as e:  # e.g. INT8 codes do not fit the byte budget: re-plan below
            logger.debug("choose-forms: assigned bits cannot be kept: %s", e)
            lp = None
        if lp is not None and lp.met:
            lp.kept_bits = True
            return lp
        replanned = plan_latency(*args, self.candidates, self.scores, self.costs, self.shapes, calibration=calibration,
                                 **self.common)
        if not replanned.met and lp is not None and replanned.predicted_s * REPLAN_GAIN > lp.predicted_s:
            # The budget cannot be met either way: do not trade accuracy for a few per cent. Summed
            # per-tensor scores under-predict what many low-bit weights do together (transformer_lm: the
            # fastest re-plan measured held-out KL 1.76 against 0.17 for the assigned bits, ~7 % faster).
            # A re-plan predicted REPLAN_GAIN faster is taken (rnnt_encoder at 200 frames: codebook LSTM
            # weights, which only fold to FP32 at load, 1.00x FP32 against 0.73x for scannable bits).
            lp.kept_bits = True
            return lp
        return replanned


def _plan_measured(graph: gs.Graph, ctx: PassContext, plan: PrecisionPlan, solve: _Solver,
                   ratio: float | None) -> tuple[LatencyPlan, list[dict]]:
    """Solve, build the plan's model on a copy, time it against FP32, correct the prediction from
    the measurement (q4c.latency.measure.corrected) and solve again, MEASURE_ROUNDS times at most.
    Returns the least-damage plan that measured within budget, else the least-damage one of those
    measured within FASTEST_SLACK of the fastest (measurement noise cannot order them)."""
    fp32_model = g.export_model(graph.copy())
    fp32_layers = fp32_layer_seconds(solve.layers, solve.costs)
    calibration: Calibration | None = None
    tried: list[tuple[LatencyPlan, float, float]] = []
    attempts: list[dict] = []
    for _ in range(MEASURE_ROUNDS):
        lp = solve(calibration)
        if any(lp.keys == t[0].keys and lp.forms == t[0].forms for t in tried):
            break  # the corrected prediction chose a plan already measured
        scratch = PrecisionPlan(dict(plan.tensors), dict(plan.defaults), plan.opset)
        _write(scratch, lp, solve.candidates)
        t_fp32, t_plan = time_against_fp32(fp32_model, materialise(graph, scratch, ctx), ctx.samples[0])
        within = t_plan <= ratio * t_fp32 if ratio is not None else t_plan <= solve.common["budget_s"]
        tried.append((lp, t_plan / t_fp32, within))
        attempts.append({"kept_assigned_bits": lp.kept_bits, "predicted_ratio": round(lp.predicted_s / lp.fp32_s, 4), "measured_ratio": round(t_plan / t_fp32, 4),
                         "within_budget": within, "damage": lp.damage, "bytes": lp.nbytes,
                         "calibration": None if calibration is None else
                         {"factor": round(calibration.factor, 4), "rest_ms": round(1e3 * calibration.rest, 4)}})
        fallback = calibration or Calibration(1.0, max(t_fp32 - fp32_layers, 0.0))
        new = corrected(t_fp32, t_plan, fp32_layers, layer_seconds(lp), fallback)
        if calibration is not None and abs(new.factor - calibration.factor) < 0.02 * calibration.factor:
            break
        calibration = new
    good = [t for t in tried if t[2]]
    if not good:  # none within budget: the least damage among those measured as fast as the fastest
        fastest = min(t[1] for t in tried)
        good = [t for t in tried if t[1] <= fastest * FASTEST_SLACK]
    lp, measured, within = min(good, key=lambda t: t[0].damage)
    lp.met = within
    lp.measured_ratio = measured
    return lp, attempts


@dataclass
class _UniformTable:
    """What choose-forms reads of a sensitivity table, for a uniform (--bits) plan, which has none:
    each weight's one candidate (its plan), scored 0."""

    candidates: dict
    scores: dict
    slots: dict


def _uniform_table(graph: gs.Graph, plan: PrecisionPlan, ctx: PassContext) -> _UniformTable:
    slots = {}
    for slot in find_weight_slots(graph):
        if isinstance(slot, WeightSlot) and slot.tensor.name in plan.tensors and slot.tensor.name not in slots:
            slots[slot.tensor.name] = slot
    cands = {n: [candidate(slot, plan.tensors[n].bits, Granularity.parse(plan.tensors[n].granularity.partition("@")[0]),
                           ctx.opset, plan.tensors[n].scheme)] for n, slot in slots.items()}
    return _UniformTable(cands, {n: {c[0].key: 0.0} for n, c in cands.items()}, slots)


def _key(tp: TensorPrecision) -> str:
    return scheme_key(tp.bits, tp.scheme)


def _tied_bytes(plan: PrecisionPlan, candidates: dict, tied: set[str], table) -> int:
    """Bytes of the tied tables as planned, their shared codes counted once (as assign-precision does)."""
    total = 0
    for group in plan.defaults.get("tied", []):
        for i, name in enumerate(group):
            if name not in candidates:
                continue
            cand = next((c for c in candidates[name] if c.key == _key(plan.tensors[name])), None)
            if cand is None:
                continue
            total += cand.nbytes
            if i and cand.bits != FLOAT:
                total -= math.ceil(math.prod(table.slots[group[0]].tensor.shape) * cand.storage_bits / 8)
    return total


def _byte_budget(plan: PrecisionPlan, candidates: dict, tied: set[str], fixed: int) -> int:
    """The byte budget assign-precision planned under; a uniform plan's own bytes for --bits
    (`fixed`: the tied tables' bytes, counted by _tied_bytes)."""
    budget = plan.defaults.get("budget_bytes")
    if isinstance(budget, int):
        return budget
    total = fixed
    for name, cands in ((n, cs) for n, cs in candidates.items() if n not in tied):
        key = _key(plan.tensors[name])
        total += next((c.nbytes for c in cands if c.key == key), max(c.nbytes for c in cands))
    return total


def _fp32_seconds(graph: gs.Graph, ctx: PassContext) -> float:
    model = g.export_model(graph.copy())
    session = q4ort.make_session(model, threads=1, config={})
    feeds = ctx.samples[0]
    timing = interleaved({"fp32": lambda: q4ort.run(session, feeds)}, rounds=25, min_rounds=5,
                         max_seconds=FP32_TIMING_SECONDS)
    return timing.median("fp32")


def _write(plan: PrecisionPlan, lp: LatencyPlan, candidates: dict) -> dict[str, int]:
    stats: dict[str, int] = defaultdict(int)
    for name, key in lp.keys.items():
        cand = next(c for c in candidates[name] if c.key == key)
        form = lp.forms.get(name)
        if cand.bits == FLOAT or form is None:
            plan.tensors[name] = TensorPrecision(FLOAT, cand.granularity) if cand.bits == FLOAT else \
                TensorPrecision(cand.bits, cand.granularity, cand.scheme)
            continue
        granularity = "channel" if form is LatencyForm.INT8_DYNAMIC else cand.granularity
        plan.tensors[name] = TensorPrecision(cand.bits, granularity, cand.scheme, form=plan_form(form),
                                             chosen_for=FormBasis.LATENCY)
        stats[form.value] += 1
    _tie_embeddings(plan, set(lp.forms))
    return dict(stats)


def _tie_embeddings(plan: PrecisionPlan, planned: set[str]) -> None:
    """A tied output projection planned fp32-at-load / int8-at-load reads its codes through a
    DequantizeLinear with float16 scales; its embedding table then takes fp32-at-load (DequantizeLinear
    -> Gather, folded at load, no slower than FP32 Gather) so the two share one copy of the codes
    (q4c.quant.tying). With GatherBlockQuantized the table would be packed again: a second copy."""
    for group in plan.defaults.get("tied", []):
        if not any(n in planned and plan.tensors[n].form in (Form.FP32_AT_LOAD, Form.INT8_AT_LOAD) for n in group):
            continue
        for name in group:
            tp = plan.tensors.get(name)
            if name not in planned and tp is not None and tp.quantized and tp.form is None:
                plan.tensors[name] = tp.with_form(Form.FP32_AT_LOAD, FormBasis.LATENCY)


__all__ = ["ChooseFormsPass", "lowerable_forms", "plan_form"]
