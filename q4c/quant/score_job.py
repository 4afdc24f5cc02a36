"""The scoring of (weight tensor, candidate) pairs, as one self-contained job: the same object
scores in this process's threads or, pickled, in Ray workers (q4c.distributed), with the same
results (every score depends only on the job's data and the task, not on who runs it).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np

from q4c.quant.weight_runner import WeightInputRunner, hutchinson_trace

#: Hessian probe step, relative to the tensor's RMS: the size of 4-bit rounding noise, so the
#: curvature is measured where quantization actually moves the weights.
HESSIAN_STEP = 0.1


class Task(NamedTuple):
    """Score tensor `name` (its position `index` seeds the hessian probes) for candidates `keys`."""

    index: int
    name: str
    keys: tuple[str, ...]


@dataclass
class TaskResult:
    scores: dict[str, float]
    trace: dict[str, float] | None = None  # hessian: tr(H), its s.e., probes, step
    runs: int = 0  # forward runs the task cost


@dataclass
class ScoreJob:
    """Everything scoring needs. `quantized[name][key]` holds the dequantized candidate weights;
    `context` (closed-loop kl) the uniform-4-bit plan each tensor is also scored inside."""

    sensitivity: str  # "kl" | "hessian" | "mse"
    weights: Mapping[str, np.ndarray]
    measured: frozenset[str]
    quantized: Mapping[str, Mapping[str, np.ndarray]]
    context: Mapping[str, np.ndarray] = field(default_factory=dict)
    limit: int = 4
    seed: int = 0
    runner: WeightInputRunner | None = None

    def tasks(self, names: list[str]) -> list[Task]:
        """One task per tensor, except plain kl: one per (tensor, candidate) pair (each pair is
        an independent measurement there; context kl and hessian share work within a tensor)."""
        per_pair = self.sensitivity == "kl" and not self.context and self.runner is not None
        out = []
        for index, name in enumerate(names):
            keys = tuple(self.quantized[name])
            if per_pair and name in self.measured:
                out.extend(Task(index, name, (k,)) for k in keys)
            else:
                out.append(Task(index, name, keys))
        return out

    def run(self, task: Task) -> TaskResult:
        before = self.runner.runs if self.runner is not None else 0
        result = self._run(task)
        result.runs = (self.runner.runs if self.runner is not None else 0) - before
        return result

    def _run(self, task: Task) -> TaskResult:
        name, keys = task.name, task.keys
        w = self.weights[name]
        candidates = {k: self.quantized[name][k] for k in keys}
        errors = {k: float(np.sum(np.square(d - w, dtype=np.float64))) for k, d in candidates.items()}
        runner = self.runner
        if runner is None or name not in self.measured or self.sensitivity == "mse":
            return TaskResult(errors)
        if self.sensitivity == "kl" and self.context:
            # Closed loop, errors compound: score = the larger of the damage with only this tensor
            # quantized, and what quantizing it adds to uniform 4-bit (see sensitivity.measure).
            others = {n: d for n, d in self.context.items() if n != name}
            exact = runner.divergence(others, self.limit)
            return TaskResult({k: max(runner.divergence({name: d}, self.limit),
                                      runner.divergence({**others, name: d}, self.limit) - exact)
                               for k, d in candidates.items()})
        if self.sensitivity == "kl":
            return TaskResult({k: runner.divergence({name: d}, self.limit) for k, d in candidates.items()})
        rms = float(np.sqrt(np.mean(np.square(w)))) or 1.0  # hessian
        step = HESSIAN_STEP * rms
        rng = np.random.default_rng([self.seed, task.index])  # per tensor: the same draws anywhere
        trace, sem, probes = hutchinson_trace(lambda x: runner.divergence({name: x}, self.limit), w, rng, step=step)
        return TaskResult({k: max(trace, 0.0) / w.size * e for k, e in errors.items()},
                          trace={"trace": trace, "stderr": sem, "probes": probes, "step": step})

    def for_workers(self) -> dict[str, Any]:
        """The job without its session, to ship to other processes (see WeightInputRunner.spec)."""
        return {"sensitivity": self.sensitivity, "weights": dict(self.weights), "measured": self.measured,
                "quantized": {n: dict(c) for n, c in self.quantized.items()}, "context": dict(self.context),
                "limit": self.limit, "seed": self.seed}
