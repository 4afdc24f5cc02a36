"""Two-resource multiple-choice knapsack: one option per layer, least summed damage with summed
bytes <= B and summed latency <= L.

Dynamic programming over a two-dimensional table of (bytes, latency) sums, each resource
discretised into units. With costs rounded *up* to whole units the solution never exceeds
either budget (the plan returned); the same DP with costs rounded *down* is a relaxation (every
plan feasible in true costs stays feasible), so its optimum is a lower bound on the true
optimum. The report gives both: `gap` = damage(plan) - lower bound, 0 when the rounding lost
nothing (always with integer costs and unit 1, where the DP is exact).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from q4c.errors import ConfigError

#: Table size: bytes columns x latency columns (and one int8 pick per cell per item).
BYTE_COLUMNS, LATENCY_COLUMNS = 2000, 250
#: Finer tables tried in turn when rounding costs up to whole units loses every plan that fits.
GRIDS = ((BYTE_COLUMNS, LATENCY_COLUMNS), (2000, 1000), (1000, 4000))


@dataclass(frozen=True)
class Option2:
    nbytes: int
    latency: float  # seconds (or any unit; the budget uses the same)
    damage: float  # >= 0


@dataclass(frozen=True)
class Plan2:
    choice: tuple[int, ...]  # option index per item
    nbytes: int
    latency: float
    damage: float
    lower_bound: float  # no plan within both budgets has less damage
    byte_unit: float
    latency_unit: float

    @property
    def gap(self) -> float:
        return max(0.0, self.damage - self.lower_bound)


def _pareto(opts: Sequence[Option2]) -> list[int]:
    """Indices of the options not dominated in (bytes, latency, damage) by another one."""
    keep = []
    for i, a in enumerate(opts):
        dominated = any(
            (b.nbytes <= a.nbytes and b.latency <= a.latency and b.damage <= a.damage)
            and ((b.nbytes, b.latency, b.damage) != (a.nbytes, a.latency, a.damage) or j < i)
            for j, b in enumerate(opts) if j != i)
        if not dominated:
            keep.append(i)
    return keep


def _up(x: float) -> int:
    return max(math.ceil(x - 1e-9), 0)  # tolerate float noise: 3.0000000001 units is 3


def _down(x: float) -> int:
    return max(math.floor(x + 1e-9), 0)


def _dp(items: list[list[Option2]], bu: float, lu: float, cb: int, cl: int,
        rounding: Callable[[float], int]) -> tuple[float, tuple[int, ...] | None]:
    """Least damage over the table (cb x cl cells of units bu, lu) with costs rounded by
    `rounding` (_up or _down); the choice (indices into each item's list) or None."""
    best = np.full((cb + 1, cl + 1), np.inf)
    best[0, 0] = 0.0
    picks = []
    for opts in items:
        new = np.full_like(best, np.inf)
        pick = np.full(best.shape, -1, dtype=np.int8)
        for k, o in enumerate(opts):
            wb, wl = rounding(o.nbytes / bu), rounding(o.latency / lu)
            if wb > cb or wl > cl:
                continue
            cand = np.full_like(best, np.inf)
            cand[wb:, wl:] = best[: cb + 1 - wb, : cl + 1 - wl] + o.damage
            better = cand < new
            new[better] = cand[better]
            pick[better] = k
        best = new
        picks.append(pick)
    flat = int(np.argmin(best))
    value = float(best.flat[flat])
    if not math.isfinite(value):
        return math.inf, None
    b, lat = divmod(flat, cl + 1)
    choice = []
    for opts, pick in zip(reversed(items), reversed(picks), strict=True):
        k = int(pick[b, lat])
        choice.append(k)
        o = opts[k]
        b -= rounding(o.nbytes / bu)
        lat -= rounding(o.latency / lu)
    return value, tuple(reversed(choice))


def solve2(items: Sequence[Sequence[Option2]], byte_budget: int, latency_budget: float,
           byte_unit: float | None = None, latency_unit: float | None = None) -> Plan2:
    """The least-damage choice within both budgets (see the module docstring for exactness).

    Raises ConfigError naming the binding resource when no choice fits both budgets."""
    if any(not opts for opts in items):
        raise ValueError("every item needs at least one option")
    if not items:
        return Plan2((), 0, 0.0, 0.0, 0.0, 1.0, 1.0)
    least_bytes = sum(min(o.nbytes for o in opts) for opts in items)
    least_latency = sum(min(o.latency for o in opts) for opts in items)
    if least_bytes > byte_budget:
        raise ConfigError(f"byte budget {byte_budget} is below the smallest possible size {least_bytes} bytes")
    if least_latency > latency_budget:
        raise ConfigError(f"latency budget {latency_budget:.4g} is below the fastest possible {least_latency:.4g}")
    kept = [_pareto(opts) for opts in items]
    reduced = [[opts[k] for k in ks] for opts, ks in zip(items, kept, strict=True)]
    grids = [(byte_unit, latency_unit)] if byte_unit or latency_unit else [
        (max(1.0, byte_budget / cb), max(latency_budget / cl, 1e-12)) for cb, cl in GRIDS]
    plan = None
    for bu, lu in grids:
        bu, lu = bu or max(1.0, byte_budget / BYTE_COLUMNS), lu or max(latency_budget / LATENCY_COLUMNS, 1e-12)
        cb, cl = int(byte_budget / bu + 1e-9), int(latency_budget / lu + 1e-9)
        _, up = _dp(reduced, bu, lu, cb, cl, _up)
        lower, down = _dp(reduced, bu, lu, cb, cl, _down)
        if down is None:  # the relaxation has no solution: neither has the true problem
            raise ConfigError(f"no choice fits both {byte_budget} bytes and latency {latency_budget:.4g}")
        choice = tuple(ks[k] for ks, k in zip(kept, up or down, strict=True))
        plan = _plan(items, choice, lower, bu, lu)
        if plan.nbytes <= byte_budget and plan.latency <= latency_budget * (1 + 1e-12):
            return plan  # rounding up lost nothing needed, or the relaxation's plan fits in true costs
    raise ConfigError(f"no choice found within {byte_budget} bytes and latency {latency_budget:.4g} at the finest "
                      f"resolution (the best relaxed plan needs {plan.nbytes} bytes, latency {plan.latency:.4g})")


def _plan(items: Sequence[Sequence[Option2]], choice: tuple[int, ...], lower: float, bu: float, lu: float) -> Plan2:
    picked = [opts[k] for opts, k in zip(items, choice, strict=True)]
    return Plan2(choice, sum(o.nbytes for o in picked), float(sum(o.latency for o in picked)),
                 float(sum(o.damage for o in picked)), min(lower, float(sum(o.damage for o in picked))), bu, lu)


def brute_force2(items: Sequence[Sequence[Option2]], byte_budget: int, latency_budget: float) -> Plan2 | None:
    """Every combination (for tests on small instances); None when nothing fits."""
    best: Plan2 | None = None
    for choice in itertools.product(*(range(len(o)) for o in items)):
        picked = [items[i][k] for i, k in enumerate(choice)]
        nbytes, latency = sum(o.nbytes for o in picked), sum(o.latency for o in picked)
        if nbytes > byte_budget or latency > latency_budget:
            continue
        damage = sum(o.damage for o in picked)
        if best is None or damage < best.damage - 1e-12:
            best = Plan2(tuple(choice), nbytes, float(latency), float(damage), float(damage), 1.0, 1.0)
    return best


__all__ = ["BYTE_COLUMNS", "LATENCY_COLUMNS", "Option2", "Plan2", "brute_force2", "solve2"]
