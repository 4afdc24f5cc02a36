"""Measure, per weight tensor and candidate precision, how much the output suffers.

An analysis: fills `ctx.sensitivity` for assign-precision and never edits the graph.
"""

from __future__ import annotations

import onnx_graphsurgeon as gs

from q4c.errors import PreconditionError
from q4c.pipeline import Pass, PassContext, PassResult
from q4c.quant.sensitivity import measure

class MeasureSensitivityPass(Pass):
    """Score every (weight tensor, candidate bits) pair with `--sensitivity`:

    - kl: the damage of the task outputs with only that tensor quantized: per output, its
      objective (q4c.objectives: KL for Softmax/LogSoftmax, Bernoulli KL for Sigmoid, relative
      noise power for other floats, state outputs not counted; `--objective` overrides), summed;
      for a stateful model's sequences closed loop by default (the quantized model's own state
      fed back call after call, every call's outputs scored; `--scoring open-loop`: FP32 state);
    - hessian: tr(H)/n * ||Q(w) - w||^2, tr(H) of the same divergence estimated by Hutchinson
      probes with second central differences (forward passes only);
    - mse: ||Q(w) - w||^2, data-free.

    Skipped for uniform `--bits` and replayed `--plan`. Requires: samples for kl/hessian.
    Ensures: ctx.sensitivity.  Stats: tensors, forward_runs, fallback_mse.
    """

    name = "measure-sensitivity"
    analysis = True

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        opts = ctx.options
        if opts.bits is not None or opts.plan_path is not None:
            return PassResult(False, {"skipped_uniform_or_plan": 1})
        if opts.sensitivity != "mse" and not ctx.samples:
            raise PreconditionError(f"--sensitivity {opts.sensitivity} needs input samples; pass --calib DATA")
        report = ctx.task_progress
        table = measure(graph, opts, ctx.opset, ctx.samples, sequences=ctx.sequences or None,
                        state_pairs=ctx.state_pairs,
                        progress=None if report is None else lambda done, total: report("scoring", done, total))
        ctx.sensitivity = table
        stats = {"tensors": len(table.scores), "fallback_mse": len(table.fallbacks)}
        if table.runner is not None:
            stats["forward_runs"] = table.runner.runs
            stats["closed_loop"] = int(table.runner.closed_loop)
        return PassResult(False, {k: v for k, v in stats.items() if v})
