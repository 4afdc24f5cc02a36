"""One way to time things in q4c and its benchmarks: interleaved runs, process-CPU time, medians, ratios.

Why process-CPU time (`time.process_time`) and not wall time or thread-CPU time:

- Wall time counts the periods the OS gives the core to someone else; on a shared 2-core machine
  identical models measured 0.85-1.2x of each other by wall time. CPU time counts only the
  cycles the measured code used, so it is far steadier under load.
- Thread-CPU time (`time.thread_time`) misses work done on other threads: ONNX Runtime at more
  than one intra-op thread computes on pool threads, and numpy/BLAS may too. Process-CPU time
  counts every thread of this process, so one clock serves 1 and N threads alike. Its cost: work
  by unrelated threads of the same process is counted too (benchmarks run nothing else), and
  waiting (I/O, sleeps) is not counted (nothing timed here waits).

Interleaving: every round runs each subject once, alternating the order from round to round, so
slow drifts of the machine (thermal, other jobs) hit all subjects alike; medians, not means, so
a round disturbed by a page fault or a context switch storm does not move the result. A ratio is
the median of one subject over the median of the other.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np

T = TypeVar("T")

CLOCK = "process-CPU time (time.process_time: every thread of this process, not wall time)"


def cpu_clock() -> float:
    """The clock every q4c timing uses: process-CPU seconds (module docstring says why)."""
    return time.process_time()


def timed(fn: Callable[[], Any]) -> tuple[Any, float, float]:
    """Run `fn` once: (its result, wall seconds, process-CPU seconds)."""
    wall, cpu = time.perf_counter(), cpu_clock()
    result = fn()
    return result, time.perf_counter() - wall, cpu_clock() - cpu


@dataclass
class Timing:
    """Per-subject process-CPU seconds (and wall seconds) of every timed round."""

    cpu: dict[str, list[float]] = field(default_factory=dict)
    wall: dict[str, list[float]] = field(default_factory=dict)

    @property
    def rounds(self) -> int:
        return min((len(v) for v in self.cpu.values()), default=0)

    def median(self, key: str, *, wall: bool = False) -> float:
        return statistics.median((self.wall if wall else self.cpu)[key])

    def ratio(self, num: str, den: str, *, wall: bool = False) -> float:
        """Median time of `num` over median time of `den` (below 1: `num` is faster)."""
        bottom = self.median(den, wall=wall)
        return self.median(num, wall=wall) / bottom if bottom > 0 else float("inf")

    def medians_ms(self) -> dict[str, float]:
        return {k: round(1e3 * self.median(k), 4) for k in self.cpu}

    def sides(self, names: Sequence[str], sessions: int) -> Timing:
        """One subject per side: each round's mean process-CPU time over the side's `sessions`
        subjects "<side>#0" ... (identical models in separate sessions differ by a few percent,
        so a side is timed as several and pooled)."""
        return Timing({side: list(np.mean([self.cpu[f"{side}#{i}"] for i in range(sessions)], axis=0))
                       for side in names})

    def ratio_interval(self, num: str, den: str, *, resamples: int = 2000, seed: int = 0,
                       level: float = 0.95) -> tuple[float, float]:
        """Bootstrap interval of `ratio(num, den)`: rounds resampled with replacement, the same
        rounds for both subjects (they ran interleaved, so a disturbed round hits both)."""
        a, b = np.asarray(self.cpu[num]), np.asarray(self.cpu[den])
        rounds = min(len(a), len(b))
        if rounds < 2:
            raise ValueError(f"a bootstrap needs at least 2 rounds, not {rounds}")
        pick = np.random.default_rng(seed).integers(0, rounds, size=(resamples, rounds))
        boots = np.median(a[:rounds][pick], axis=1) / np.median(b[:rounds][pick], axis=1)
        tail = 100 * (1 - level) / 2
        return float(np.percentile(boots, tail)), float(np.percentile(boots, 100 - tail))


def round_order(names: Sequence[T], index: int) -> Sequence[T]:
    """The order subjects run in round `index` of an interleaved measurement: as given in even
    rounds, reversed in odd ones (every interleaved timing in q4c uses this)."""
    return names if index % 2 == 0 else names[::-1]


def calls_per_sample(fn: Callable[[], Any], seconds: float, *, probe: int = 5) -> int:
    """How many back-to-back calls of `fn` take about `seconds` of process-CPU time (at least 1):
    a 15 us model call timed one at a time is mostly clock and scheduler noise."""
    start = cpu_clock()
    for _ in range(probe):
        fn()
    each = (cpu_clock() - start) / probe
    return max(1, int(seconds / each)) if each > 0 else 1


def interleaved(subjects: Mapping[str, Callable[[], Any]], *, rounds: int = 7, warmup: int = 1,
                min_rounds: int | None = None, max_seconds: float | None = None, repeat: int = 1) -> Timing:
    """Time each subject `rounds` times, interleaved (order alternating per round), after `warmup`
    untimed rounds. Each timed sample is `repeat` back-to-back calls; the time recorded is per
    call (the sample's time / `repeat`).

    With `max_seconds`, stop early once `min_rounds` (default: `rounds`) are done and the wall
    time spent timing exceeds `max_seconds`; `rounds` is then the cap.
    """
    if rounds < 1 or warmup < 0 or repeat < 1:
        raise ValueError(f"rounds and repeat must be >= 1 and warmup >= 0, not {rounds}, {repeat}, {warmup}")
    names = list(subjects)
    for _ in range(warmup):
        for name in names:
            subjects[name]()
    timing = Timing({n: [] for n in names}, {n: [] for n in names})
    floor = rounds if min_rounds is None else min(min_rounds, rounds)
    deadline = None if max_seconds is None else time.perf_counter() + max_seconds
    for i in range(rounds):
        if deadline is not None and i >= floor and time.perf_counter() > deadline:
            break
        for name in round_order(names, i):
            _, wall, cpu = timed(subjects[name] if repeat == 1 else _repeated(subjects[name], repeat))
            timing.cpu[name].append(cpu / repeat)
            timing.wall[name].append(wall / repeat)
    return timing


def _repeated(fn: Callable[[], Any], times: int) -> Callable[[], None]:
    def run() -> None:
        for _ in range(times):
            fn()
    return run


def ratio(subject: Callable[[], Any], baseline: Callable[[], Any], *, rounds: int = 7, warmup: int = 1) -> float:
    """Median process-CPU time of `subject` over that of `baseline`, run interleaved."""
    return interleaved({"subject": subject, "baseline": baseline}, rounds=rounds, warmup=warmup).ratio("subject", "baseline")


__all__ = ["CLOCK", "cpu_clock", "timed", "Timing", "round_order", "calls_per_sample", "interleaved", "ratio"]
