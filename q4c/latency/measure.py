"""Measure what a latency plan really runs at: build the model a plan would produce (on a copy of the
graph) and time it interleaved with the FP32 model, so the planner's prediction can be checked and
corrected.

The planner predicts model time = rest + sum of the layers' micro-benchmarked costs. In a whole
model each layer runs with colder caches than in its one-layer benchmark, and the rest of the
graph is not free, so the prediction is off by a factor that depends on the model. One
measurement of a plan besides the FP32 model gives two equations (FP32: rest + F x sum of FP32
layer costs; the plan: rest + F x sum of its layer costs) for the two unknowns F and rest:
`corrected()` solves them, and the planner re-plans with them.
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx
import onnx_graphsurgeon as gs

from q4c import ort as q4ort
from q4c.pipeline import PassContext
from q4c.quant.plan import Form, PrecisionPlan
from q4c.timing import interleaved

#: the passes that turn a planned graph into what the compile writes (choose-kernels gives the
#: weights outside planned layers their rule forms)
MATERIALISE = ("choose-kernels", "quantize-weights", "lower-int8-dynamic", "lower-ort-kernels", "lower-recurrent")
#: wall-clock cap of one interleaved timing of a plan against FP32
TIMING_SECONDS = 3.0


def materialise(graph: gs.Graph, plan: PrecisionPlan, ctx: PassContext) -> onnx.ModelProto:
    """The model `plan` compiles to, built on a copy (ctx and graph untouched), with its session config."""
    from q4c.passes.choose_kernels import materialise_copy

    plan = PrecisionPlan(dict(plan.tensors), dict(plan.defaults), plan.opset)
    model = materialise_copy(graph, plan, ctx, MATERIALISE)
    config = q4ort.needed_session_config(model)[0]
    if {Form.FP32_AT_LOAD, Form.INT8_AT_LOAD} & set(plan.forms().values()):
        config["session.disable_quant_qdq"] = "1"
    q4ort.set_session_config(model, config)
    return model


def time_against_fp32(fp32: onnx.ModelProto, model: onnx.ModelProto, feeds: dict) -> tuple[float, float]:
    """(FP32 seconds, model seconds) per call: medians of process-CPU time, 1 thread, interleaved."""
    sessions = {"fp32": q4ort.make_session(fp32, threads=1, config={}), "plan": q4ort.make_session(model, threads=1)}
    timing = interleaved({k: (lambda s=s: q4ort.run(s, feeds)) for k, s in sessions.items()}, rounds=31, warmup=2,
                         min_rounds=7, max_seconds=TIMING_SECONDS)
    return timing.median("fp32"), timing.median("plan")


@dataclass(frozen=True)
class Calibration:
    """Model time = rest + factor x (sum of micro-benchmarked layer costs)."""

    factor: float
    rest: float


def corrected(fp32_s: float, plan_s: float, fp32_layers: float, plan_layers: float, fallback: Calibration) -> Calibration:
    """Solve rest + F x fp32_layers = fp32_s and rest + F x plan_layers = plan_s; `fallback` when the
    two plans' layer costs are too close to tell F apart, or the solution is not physical."""
    if fp32_layers <= 0 or abs(fp32_layers - plan_layers) < 0.05 * fp32_layers:
        return fallback
    factor = (fp32_s - plan_s) / (fp32_layers - plan_layers)
    rest = fp32_s - factor * fp32_layers
    if not (0.2 <= factor <= 5.0) or rest < 0:
        # not physical (noise): no time outside the layers, one factor fitting both in the mean
        factor = min(max((fp32_s + plan_s) / (fp32_layers + plan_layers), 0.2), 5.0)
        rest = 0.0
    return Calibration(factor, rest)


__all__ = ["MATERIALISE", "Calibration", "corrected", "materialise", "time_against_fp32"]
