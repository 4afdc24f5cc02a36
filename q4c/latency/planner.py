"""Choose bits x form per layer under a byte budget and a latency budget, least measured damage.

Items of the two-resource knapsack (q4c.latency.mckp):
- every plannable layer (q4c.latency.layers): one option per (candidate of its weights, form
  that can run it); LSTM/GRU W and R take the same candidate key. Latency = the measured cost of
  that form at that width on the layer's shape (q4c.latency.costs); bytes and damage = the
  candidates' (damage summed over the layer's weights, from the sensitivity table).
- every other quantizable weight (Conv, Gather, tied tables, weights inside subgraphs): its
  candidates, at no latency (they run as they would without a latency budget).
- a tied output projection is a layer with one zero-byte candidate (its bits are assign-precision's,
  its shared codes counted outside the knapsack) and only the forms that read those codes
  (`layer_forms`: FP32_AT_LOAD, INT8_AT_LOAD).

INT8_AT_LOAD decouples bytes from speed for MatMul layers: the candidate's codes (any uniform width
or codebook) are what the file stores, the time is INT8 dynamic's.

Predicted model latency = FP32 model time - sum of the planned layers' FP32 costs + sum of their
chosen costs (the rest of the graph is taken to run as in FP32). The latency budget applies to
that prediction.

Modelling limits, said as they are: a form's extra error is not scored (MatMulNBits at accuracy
level 4 and DynamicQuantizeMatMul quantize activations to int8 on the fly, ~0.5 % relative
error; the INT8 dynamic form re-uses the 8-bit block-wise candidate's score and counts per-channel
bytes; INT8_AT_LOAD re-uses the low-bit candidate's score, not the ~1/16-step re-rounding to int8
per column at load); FP32-at-load weights are counted at the candidate's bytes (their scales are float16 in
the file, a few bytes fewer).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from q4c.config import CODEBOOK_SCHEMES
from q4c.latency.budget import latency_budget_seconds  # re-exported: choose-forms reads it here
from q4c.latency.costs import CostTable
from q4c.latency.forms import FORMS, Form, LayerKind, allows, timed_bits
from q4c.latency.layers import Layer
from q4c.latency.mckp import Option2, Plan2, solve2
from q4c.latency.measure import Calibration
from q4c.quant.candidates import Candidate
from q4c.quant.plan import FLOAT

#: When no plan meets the latency budget: the least-damage plan predicted within this factor of the
#: fastest. Plans 5 % apart are not told apart by measurement on these machines (identical models
#: measure 0.85-1.2x of each other), and insisting on the very fastest bought ~7 % of speed for 10x
#: the held-out KL on transformer_lm.
FASTEST_SLACK = 1.05


@dataclass(frozen=True)
class Pick:
    """One option of a knapsack item: a candidate per weight and the layer's form (None: not a layer)."""

    keys: tuple[str, ...]
    form: Form | None
    option: Option2


@dataclass
class LatencyPlan:
    """The chosen candidate key and form per weight tensor, and what the planner predicted."""

    keys: dict[str, str] = field(default_factory=dict)
    forms: dict[str, Form] = field(default_factory=dict)
    predicted_s: float = 0.0
    fp32_s: float = 0.0
    budget_s: float = 0.0
    nbytes: int = 0
    byte_budget: int = 0
    damage: float = 0.0
    gap: float = 0.0
    layers: list[dict[str, Any]] = field(default_factory=list)
    #: False: no plan within the byte budget is predicted to meet the latency budget; this is the
    #: fastest one (least damage among the fastest)
    met: bool = True
    #: set by callers that built and timed the plan: measured time / FP32 time
    measured_ratio: float | None = None
    #: the candidates were the byte plan's own (only the forms chosen here)
    kept_bits: bool = False

    def report(self) -> dict[str, Any]:
        return {"predicted_ms": round(1e3 * self.predicted_s, 4), "fp32_ms": round(1e3 * self.fp32_s, 4),
                "budget_ms": round(1e3 * self.budget_s, 4),
                "predicted_ratio": round(self.predicted_s / self.fp32_s, 4) if self.fp32_s > 0 else None,
                "bytes": self.nbytes, "byte_budget": self.byte_budget, "predicted_damage": self.damage,
                "optimality_gap": self.gap, "budget_met": self.met, "kept_assigned_bits": self.kept_bits,
                "measured_ratio": None if self.measured_ratio is None else round(self.measured_ratio, 4),
                "layers": self.layers}


def _uniform(c: Candidate) -> bool:
    return c.scheme not in CODEBOOK_SCHEMES


def _form_ok(form: Form, kind: LayerKind, cands: Sequence[Candidate]) -> bool:
    """Can weights planned as `cands` (a layer's W, R; or one candidate, for timing) run in `form`?"""
    if form is Form.SCAN_INT8_PROJECTION:  # W at 8 bits, R any width MatMulNBits runs
        if len(cands) > 1 and cands[0].bits != 8:
            return False
        return allows(form, cands[-1].bits) and all(_uniform(c) for c in cands)
    if not all(allows(form, c.bits) for c in cands):
        return False
    if form in (Form.FP32_AT_LOAD, Form.INT8_AT_LOAD):  # decoded at load: codebooks too
        return True
    if not all(_uniform(c) for c in cands):
        return False  # kernels read scale x integer codes, not codebook indices
    return form is not Form.DYNAMIC_QUANTIZE_LSTM or kind is LayerKind.LSTM


def _int8_channel_bytes(cand: Candidate, shape: tuple[int, ...]) -> int:
    k, n = shape
    return k * n + 4 * n  # int8 codes + float32 scale per output channel


def variants(layer: Layer, candidates: Mapping[str, Sequence[Candidate]]) -> list[tuple[Form, int]]:
    """The (form, timed bits) a layer's options need costs for."""
    out = {(Form.FP32_AT_LOAD, FLOAT)}
    for c in (c for w in layer.weights for c in candidates[w]):
        for form in FORMS[layer.shape.kind]:
            if _form_ok(form, layer.shape.kind, [c]):
                out.add((form, timed_bits(form, c.bits)))
    return sorted(out, key=lambda v: (v[0].value, v[1]))


def layer_picks(layer: Layer, candidates: Mapping[str, Sequence[Candidate]], scores: Mapping[str, Mapping[str, float]],
                costs: CostTable, weight_shapes: Mapping[str, tuple[int, ...]],
                forms: frozenset[Form] | None = None, factor: float = 1.0) -> list[Pick]:
    """Every (candidate key shared by the layer's weights, form) option of one layer (`forms`:
    the forms allowed, None = all; latencies are the measured costs x `factor`)."""
    per_weight = [{c.key: c for c in candidates[w]} for w in layer.weights]
    if all(len(pw) == 1 for pw in per_weight):  # one candidate each (a given plan): that combination
        combos = [tuple(next(iter(pw)) for pw in per_weight)]
    else:  # LSTM/GRU W and R take the same candidate key, or W 8-bit beside any R (scan-int8-projection)
        combos = [(k,) * len(per_weight) for k in per_weight[0] if all(k in pw for pw in per_weight[1:])]
        if len(per_weight) == 2 and "8" in per_weight[0]:
            combos += [("8", k) for k in per_weight[1] if k != "8"]
    picks = []
    for keys in combos:
        cands = [pw[k] for pw, k in zip(per_weight, keys, strict=True)]
        damage = sum(max(scores[w].get(k, 0.0), 0.0) for w, k in zip(layer.weights, keys, strict=True))
        if any(c.bits == FLOAT for c in cands):
            # one layer, one form: beside a float weight the quantized one is folded to FP32 at load
            form = None if all(c.bits == FLOAT for c in cands) else Form.FP32_AT_LOAD
            latency = factor * costs.cost(layer.shape, Form.FP32_AT_LOAD, FLOAT)
            picks.append(Pick(keys, form, Option2(sum(c.nbytes for c in cands), latency, damage)))
            continue
        for form in FORMS[layer.shape.kind]:
            if not _form_ok(form, layer.shape.kind, cands) or (forms is not None and form not in forms):
                continue
            if form is Form.INT8_AT_LOAD and all(c.bits == 8 for c in cands) and \
                    (forms is None or Form.INT8_DYNAMIC in forms) and _form_ok(Form.INT8_DYNAMIC, layer.shape.kind, cands):
                continue  # 8-bit codes: int8-dynamic rounds once per column, int8-at-load twice (block, then column)
            nbytes = sum(c.nbytes for c in cands)
            if form is Form.INT8_DYNAMIC:
                nbytes = sum(_int8_channel_bytes(c, weight_shapes[w]) for c, w in zip(cands, layer.weights, strict=True))
            timed = cands[-1].bits if form is Form.SCAN_INT8_PROJECTION else max(c.bits for c in cands)
            latency = factor * costs.cost(layer.shape, form, timed)
            picks.append(Pick(keys, form, Option2(nbytes, latency, damage)))
    return picks


def plan_latency(layers: Iterable[Layer], others: Iterable[str], candidates: Mapping[str, Sequence[Candidate]],
                 scores: Mapping[str, Mapping[str, float]], costs: CostTable, weight_shapes: Mapping[str, tuple[int, ...]],
                 *, byte_budget: int, fp32_s: float, budget_s: float, forms: frozenset[Form] | None = None,
                 fastest: bool = False, calibration: Calibration | None = None,
                 layer_forms: Mapping[str, frozenset[Form]] | None = None) -> LatencyPlan:
    """Least summed damage with bytes <= byte_budget and predicted model time <= budget_s (`forms`:
    the forms layers may take, None = all). With `fastest`, the least predicted time within the
    byte budget instead (for candidates fixed per weight: the fastest forms of a given plan);
    `met` then says whether it is within budget_s. `calibration`: model time = rest + factor x
    layer costs, from a measured plan (q4c.latency.measure); default: factor 1, rest = FP32 model
    time - FP32 layer costs. `layer_forms`: node name -> the only forms that layer may take."""
    layers, others = list(layers), list(others)
    factor = calibration.factor if calibration is not None else 1.0
    only = layer_forms or {}
    items: list[list[Pick]] = [layer_picks(layer, candidates, scores, costs, weight_shapes,
                                           forms if layer.node not in only else only[layer.node] & (forms or only[layer.node]),
                                           factor) for layer in layers]
    for name in others:
        items.append([Pick((c.key,), None, Option2(c.nbytes, 0.0, max(scores[name].get(c.key, 0.0), 0.0)))
                      for c in candidates[name]])
    rest = calibration.rest if calibration is not None else max(fp32_s - fp32_layer_seconds(layers, costs), 0.0)
    options = [[p.option for p in picks] for picks in items]
    if fastest:  # latency as the knapsack's damage (ties: less damage), latency budget unbounded
        top = max((o.damage for opts in options for o in opts), default=0.0) or 1.0
        swapped = [[Option2(o.nbytes, 0.0, o.latency + 1e-9 * o.damage / top) for o in opts] for opts in options]
        choice = solve2(swapped, byte_budget, 1.0).choice
        solved = Plan2(choice, sum(options[i][k].nbytes for i, k in enumerate(choice)),
                       sum(options[i][k].latency for i, k in enumerate(choice)),
                       sum(options[i][k].damage for i, k in enumerate(choice)), 0.0, 1.0, 1.0)
        met = rest + solved.latency <= budget_s
    else:
        least = fastest_latency(options, byte_budget)
        met = least <= budget_s - rest
        solved = solve2(options, byte_budget, max(budget_s - rest, 0.0) if met else least * FASTEST_SLACK)
    out = LatencyPlan(met=met, fp32_s=fp32_s, budget_s=budget_s, byte_budget=byte_budget, nbytes=solved.nbytes,
                      damage=solved.damage, gap=solved.gap, predicted_s=rest + solved.latency)
    _record(out, layers, others, items, solved.choice, costs, factor)
    return out


def _record(out: LatencyPlan, layers: list[Layer], others: list[str], items: list[list[Pick]],
            choice: tuple[int, ...], costs: CostTable, factor: float) -> None:
    for i, (picks, k) in enumerate(zip(items, choice, strict=True)):
        pick = picks[k]
        names = layers[i].weights if i < len(layers) else (others[i - len(layers)],)
        for name, key in zip(names, pick.keys, strict=True):
            out.keys[name] = key
            if pick.form is not None:
                out.forms[name] = pick.form
        if i < len(layers):
            fp32 = costs.cost(layers[i].shape, Form.FP32_AT_LOAD, FLOAT)
            out.layers.append({"node": layers[i].node, "shape": layers[i].shape.label(), "key": pick.keys[0],
                               "form": pick.form.value if pick.form else "float", "us": round(1e6 * pick.option.latency, 2),
                               "raw_us": 1e6 * pick.option.latency / factor,
                               "fp32_us": round(1e6 * fp32, 2), "bytes": pick.option.nbytes,
                               "damage": pick.option.damage})


def fp32_layer_seconds(layers: Iterable[Layer], costs: CostTable) -> float:
    return sum(costs.cost(layer.shape, Form.FP32_AT_LOAD, FLOAT) for layer in layers)


def layer_seconds(plan: LatencyPlan) -> float:
    """The micro-benchmarked seconds of the plan's layers (before any calibration factor)."""
    return sum(row["raw_us"] for row in plan.layers) / 1e6


def fastest_latency(options: Sequence[Sequence[Option2]], byte_budget: int) -> float:
    """Least summed latency of one option per item within the byte budget (the latency as the
    knapsack's damage: same exact DP, latency budget unbounded)."""
    swapped = [[Option2(o.nbytes, 0.0, o.latency) for o in opts] for opts in options]
    return solve2(swapped, byte_budget, 1.0).damage


__all__ = ["LatencyPlan", "Pick", "fastest_latency", "fp32_layer_seconds", "layer_seconds", "latency_budget_seconds", "layer_picks", "plan_latency", "variants"]
