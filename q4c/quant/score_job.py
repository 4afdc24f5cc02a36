"""The scoring of (weight tensor, candidate) pairs, as one self-contained job: the same object
scores in this process's threads or, pickled, in Ray workers (q4c.distributed), with the same
results (every score depends only on the job's data and the task, not on who runs it).

The job holds the FP32 weights and how to round each candidate (a `Rounding` per tensor), not
the rounded candidates: each task rounds the candidates it scores and drops them after scoring,
so no process ever holds every candidate (for a 600M-parameter model that is ~50 GB), and the
rounding is spread over the workers with the scoring. Rounding is deterministic, so a candidate
rounded in a task is the one quantize-weights stores.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np

from q4c.config import Granularity
from q4c.quant.weight_runner import WeightInputRunner, hutchinson_trace
from q4c.quant.weights import WeightSlot, quantize_slot

#: Hessian probe step, relative to the tensor's RMS: the size of 4-bit rounding noise, so the
#: curvature is measured where quantization actually moves the weights.
HESSIAN_STEP = 0.1


@dataclass(frozen=True)
class Rounding:
    """How one tensor's candidates are rounded: the parts of its WeightSlot that `quantize_slot`
    reads (role and axes; no graph, so it pickles small), the compile's granularity and scale
    rule, and the candidates as key -> (bits, scheme), float excluded."""

    name: str
    role: str
    channel_axis: int
    reduce_axis: int
    granularity: Granularity
    kernel_scales: bool
    candidates: Mapping[str, tuple[int, str]]

    @classmethod
    def of(cls, slot: WeightSlot, granularity: Granularity, kernel_scales: bool,
           candidates: Mapping[str, tuple[int, str]]) -> Rounding:
        return cls(slot.tensor.name, slot.role, slot.channel_axis, slot.reduce_axis, granularity, kernel_scales,
                   dict(candidates))

    @property
    def tensor(self) -> Rounding:
        return self  # quantize_slot names `slot.tensor.name` in its errors

    def dequantized(self, w: np.ndarray, key: str, hessians: list[np.ndarray] | None) -> np.ndarray:
        """Candidate `key` of `w` rounded as quantize-weights rounds it, dequantized."""
        bits, scheme = self.candidates[key]
        return quantize_slot(self, w, bits, self.granularity, scheme,  # type: ignore[arg-type]
                             kernel_scales=self.kernel_scales, hessians=hessians).dequantize()


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
    seconds: float = 0.0  # wall time of the task: rounding its candidates and scoring them
    forward_seconds: float = 0.0  # of which in forward runs (exact where one task runs at a time per runner)


@dataclass
class ScoreJob:
    """Everything scoring needs. `roundings[name]` says how to round each candidate of `name`
    (against `hessians[name]` for gptq and codebooks); `context` (closed-loop kl) holds the
    uniform-4-bit plan each tensor is also scored inside."""

    sensitivity: str  # "kl" | "hessian" | "mse"
    weights: Mapping[str, np.ndarray]
    measured: frozenset[str]
    roundings: Mapping[str, Rounding]
    hessians: Mapping[str, list[np.ndarray]] = field(default_factory=dict)
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
            keys = self.keys(name)
            if per_pair and name in self.measured:
                out.extend(Task(index, name, (k,)) for k in keys)
            else:
                out.append(Task(index, name, keys))
        return out

    def keys(self, name: str) -> tuple[str, ...]:
        """The candidates scored for `name`, in candidate order (float excluded)."""
        return tuple(self.roundings[name].candidates)

    def dequantized(self, name: str, key: str) -> np.ndarray:
        """Candidate `key` of tensor `name`, rounded now (nothing is cached: the caller drops it)."""
        return self.roundings[name].dequantized(self.weights[name], key, self.hessians.get(name))

    def run(self, task: Task) -> TaskResult:
        start = time.perf_counter()
        runs, forward = (self.runner.runs, self.runner.seconds) if self.runner is not None else (0, 0.0)
        result = self._run(task)
        if self.runner is not None:
            result.runs, result.forward_seconds = self.runner.runs - runs, self.runner.seconds - forward
        result.seconds = time.perf_counter() - start
        return result

    def _run(self, task: Task) -> TaskResult:
        name, keys, runner = task.name, task.keys, self.runner
        if runner is None or name not in self.measured or self.sensitivity == "mse":
            return TaskResult({k: self._error(name, k) for k in keys})
        if self.sensitivity == "hessian":
            return self._hessian(task, {k: self._error(name, k) for k in keys})
        if self.context:
            # Closed loop, errors compound: score = the larger of the damage with only this tensor
            # quantized, and what quantizing it adds to uniform 4-bit (see sensitivity.measure).
            others = {n: d for n, d in self.context.items() if n != name}
            exact = runner.divergence(others, self.limit)
            scores = {}
            for k in keys:  # one candidate alive at a time
                d = self.dequantized(name, k)
                scores[k] = max(runner.divergence({name: d}, self.limit),
                                runner.divergence({**others, name: d}, self.limit) - exact)
            return TaskResult(scores)
        return TaskResult({k: runner.divergence({name: self.dequantized(name, k)}, self.limit) for k in keys})

    def _error(self, name: str, key: str) -> float:
        d = self.dequantized(name, key)
        return float(np.sum(np.square(d - self.weights[name], dtype=np.float64)))

    def _hessian(self, task: Task, errors: dict[str, float]) -> TaskResult:
        name, w, runner = task.name, self.weights[task.name], self.runner
        assert runner is not None
        rms = float(np.sqrt(np.mean(np.square(w)))) or 1.0
        step = HESSIAN_STEP * rms
        rng = np.random.default_rng([self.seed, task.index])  # per tensor: the same draws anywhere
        trace, sem, probes = hutchinson_trace(lambda x: runner.divergence({name: x}, self.limit), w, rng, step=step)
        return TaskResult({k: max(trace, 0.0) / w.size * e for k, e in errors.items()},
                          trace={"trace": trace, "stderr": sem, "probes": probes, "step": step})

    def for_workers(self) -> dict[str, Any]:
        """The job without its session, to ship to other processes (see WeightInputRunner.spec):
        the weights and how to round them, no rounded candidate."""
        return {"sensitivity": self.sensitivity, "weights": dict(self.weights), "measured": self.measured,
                "roundings": dict(self.roundings), "hessians": dict(self.hessians), "context": dict(self.context),
                "limit": self.limit, "seed": self.seed}


def merge(tasks: list[Task], results: list[TaskResult]) -> dict[str, TaskResult]:
    """Results of `tasks` merged per tensor, as one task covering all its candidates would give."""
    merged: dict[str, TaskResult] = {}
    for task, result in zip(tasks, results, strict=True):
        into = merged.setdefault(task.name, TaskResult({}, None, 0))
        into.scores.update(result.scores)
        into.trace = result.trace if result.trace is not None else into.trace
        into.runs += result.runs
        into.seconds += result.seconds
        into.forward_seconds += result.forward_seconds
    return merged
