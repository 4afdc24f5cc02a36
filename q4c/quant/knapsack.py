"""Exact multiple-choice knapsack: pick one option per item, minimizing total score, with the
total cost within a budget. Dynamic programming over integer costs."""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from q4c.errors import ConfigError

#: Cost resolution: costs are divided by a unit so the DP table has at most this many columns.
#: Costs are rounded *up* to whole units, so a solution never exceeds the true budget.
MAX_COLUMNS = 20_000


@dataclass(frozen=True)
class Option:
    cost: int  # bytes
    score: float  # predicted damage, >= 0


@dataclass(frozen=True)
class Solution:
    choice: tuple[int, ...]  # option index per item
    cost: int
    score: float
    unit: int  # bytes per DP column (1 = exact in bytes)


def solve(items: Sequence[Sequence[Option]], budget: int, unit: int | None = None,
          incumbent: Sequence[int] | None = None) -> Solution:
    """Minimize the summed score with summed cost <= budget, one option per item.

    Exact for integer costs when `unit` is 1; with a coarser unit (chosen automatically so the
    table stays small) it is exact for the costs rounded up to the unit, which never overruns
    the budget but can leave up to one unit per item unused and so miss a plan that fits in
    exact bytes (uniform 4-bit under a 4-bit budget, typically). Two repairs close that gap:
    the slack left in exact bytes is spent greedily on the upgrades that lower the score most,
    and a known feasible `incumbent` (one option index per item) is returned instead whenever
    it scores lower. Raises ConfigError when even the cheapest options exceed the budget.
    """
    if not items:
        return Solution((), 0, 0.0, 1)
    if any(not opts for opts in items):
        raise ValueError("every item needs at least one option")
    cheapest = sum(min(o.cost for o in opts) for opts in items)
    if cheapest > budget:
        raise ConfigError(f"budget {budget} bytes is below the smallest possible size {cheapest} bytes")
    if unit is None:
        unit = max(1, math.ceil(budget / MAX_COLUMNS))
    columns = budget // unit
    inf = np.inf
    # best[c] = least score with total (rounded) cost exactly c, over the items seen so far
    best = np.full(columns + 1, inf)
    best[0] = 0.0
    picks: list[np.ndarray] = []
    for opts in items:
        new = np.full(columns + 1, inf)
        pick = np.full(columns + 1, -1, dtype=np.int16)
        for k, opt in enumerate(opts):
            w = -(-opt.cost // unit)  # round up: never overrun the budget
            if w > columns:
                continue
            shifted = np.full(columns + 1, inf)
            shifted[w:] = best[: columns + 1 - w] + opt.score
            better = shifted < new
            new[better] = shifted[better]
            pick[better] = k
        best = new
        picks.append(pick)
    end = int(np.argmin(best))
    if np.isfinite(best[end]):
        choice = []
        col = end
        for opts, pick in zip(reversed(items), reversed(picks), strict=True):
            k = int(pick[col])
            choice.append(k)
            col -= -(-opts[k].cost // unit)
        choice.reverse()
    else:  # rounding up made every plan too big, though the cheapest fits in bytes: start there
        choice = [min(range(len(opts)), key=lambda k, o=opts: (o[k].cost, o[k].score)) for opts in items]
    if unit > 1:
        choice = _spend_slack(items, choice, budget)
    found = _solution(items, choice, unit)
    if incumbent is not None:
        other = _solution(items, list(incumbent), 1)
        if other.cost <= budget and other.score < found.score:
            return other
    return found


def _solution(items: Sequence[Sequence[Option]], choice: Sequence[int], unit: int) -> Solution:
    cost = sum(opts[k].cost for opts, k in zip(items, choice, strict=True))
    score = sum(opts[k].score for opts, k in zip(items, choice, strict=True))
    return Solution(tuple(choice), cost, float(score), unit)


def _spend_slack(items: Sequence[Sequence[Option]], choice: list[int], budget: int) -> list[int]:
    """Repeatedly take the single-item change that lowers the score most per extra byte and still
    fits the budget in exact bytes (rounding costs up to DP units leaves such slack)."""
    choice = list(choice)
    left = budget - sum(opts[k].cost for opts, k in zip(items, choice, strict=True))
    while True:
        best, move = 0.0, None
        for i, opts in enumerate(items):
            now = opts[choice[i]]
            for k, opt in enumerate(opts):
                gain, extra = now.score - opt.score, opt.cost - now.cost
                if gain <= 0 or extra > left:
                    continue
                rate = gain / max(extra, 1)
                if rate > best:
                    best, move = rate, (i, k, extra)
        if move is None:
            return choice
        i, k, extra = move
        choice[i] = k
        left -= extra


def brute_force(items: Sequence[Sequence[Option]], budget: int) -> Solution:
    """Every combination; for testing the DP on small instances."""
    best: Solution | None = None
    for choice in itertools.product(*(range(len(o)) for o in items)):
        cost = sum(items[i][k].cost for i, k in enumerate(choice))
        if cost > budget:
            continue
        score = sum(items[i][k].score for i, k in enumerate(choice))
        if best is None or score < best.score - 1e-12:
            best = Solution(tuple(choice), cost, score, 1)
    if best is None:
        raise ConfigError("infeasible")
    return best


def frontier(items: Sequence[Sequence[Option]], budgets: Sequence[int]) -> list[Solution]:
    """Solutions at several budgets (the predicted Pareto curve)."""
    return [solve(items, b) for b in budgets]
