"""Decide the precision of every quantizable weight: an analysis that fills `ctx.plan`."""

from __future__ import annotations

import logging

import onnx_graphsurgeon as gs

from q4c.errors import ConfigError
from q4c.pipeline import Pass, PassContext, PassResult
from q4c.quant.plan import FLOAT, PrecisionPlan, TensorPrecision
from q4c.quant.weights import FLOAT32_SCALE_ROLES, WeightSlot, element_count, find_weight_slots

logger = logging.getLogger(__name__)

#: Precision of the default plan until sensitivity-guided allocation lands (issue 5).
DEFAULT_BITS = 4


class AssignPrecisionPass(Pass):
    """Build the PrecisionPlan: replayed from `--plan` if given, else uniform `--bits`.

    Weights with fewer than `min_elements` elements, or named in `keep_fp32`, stay float.
    Requires: nothing.  Ensures: ctx.plan is set.  Stats: planned, skipped_small, kept_fp32.
    """

    name = "assign-precision"

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        opts = ctx.options
        slots = [s for s in find_weight_slots(graph) if isinstance(s, WeightSlot)]
        if opts.plan_path is not None:
            ctx.plan = self._replay(PrecisionPlan.load(opts.plan_path), slots, ctx)
            planned = sum(1 for tp in ctx.plan.tensors.values() if tp.bits != FLOAT)
            return PassResult(False, {"planned": planned, "replayed": 1})
        if opts.avg_bits is not None:
            raise ConfigError("--avg-bits needs sensitivity-guided allocation, which this q4c version lacks; use --bits")
        bits = opts.bits or DEFAULT_BITS
        plan = PrecisionPlan(defaults={"bits": bits, "granularity": str(opts.granularity), "mode": "uniform"})
        stats = {"planned": 0, "skipped_small": 0, "kept_fp32": 0}
        for slot in slots:
            name = slot.tensor.name
            if name in plan.tensors:
                continue
            granularity = str(opts.granularity.resolve(float32_scales=slot.role in FLOAT32_SCALE_ROLES))
            if element_count(slot.tensor) < opts.min_elements:
                stats["skipped_small"] += 1
                plan.tensors[name] = TensorPrecision(FLOAT, granularity)
            elif name in opts.keep_fp32 or slot.node.name in opts.keep_fp32:
                stats["kept_fp32"] += 1
                plan.tensors[name] = TensorPrecision(FLOAT, granularity)
            else:
                stats["planned"] += 1
                plan.tensors[name] = TensorPrecision(bits, granularity)
        ctx.plan = plan
        return PassResult(False, {k: v for k, v in stats.items() if v})

    @staticmethod
    def _replay(plan: PrecisionPlan, slots: list[WeightSlot], ctx: PassContext) -> PrecisionPlan:
        known = {s.tensor.name for s in slots}
        unknown = sorted(set(plan.tensors) - known)
        if unknown:
            ctx.warn(f"plan names {len(unknown)} tensor(s) not in this model, ignored: {', '.join(unknown[:5])}")
        return PrecisionPlan({n: tp for n, tp in plan.tensors.items() if n in known}, dict(plan.defaults))
