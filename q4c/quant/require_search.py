"""The smallest plan meeting a quality requirement (--require), every plan judged by measurement.

`smallest_meeting` searches in two stages, each plan measured by `meets` (assign-precision
measures it on the held-out calibration units and checks the requirements):

1. Bisection over the byte budget between the cheapest plan and the cap, each step the exact
   knapsack plan (least predicted damage) at that budget; uniform 4-bit is tried too.
2. Descent from the smallest plan found: the per-tensor predictions add up poorly near the
   limit (on Silero the knapsack's plans jump from all 8-bit straight to the LSTM at 4-bit,
   which fails, while 4-bit elsewhere would pass), so single-tensor downgrades are measured,
   the one saving most bytes that still meets is taken, until none does or DESCENT_PLANS
   plans were measured. Each tensor moves to its cheaper option with the least predicted damage.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

from q4c.quant.knapsack import Option, solve

#: Bisection steps (each: one knapsack solve and one plan measured).
BISECTION_STEPS = 12
#: Plans the descent may measure.
DESCENT_PLANS = 24
#: Most plans one search measures: the bisection's, its two ends and uniform 4-bit, the descent's
MAX_PLANS = BISECTION_STEPS + 3 + DESCENT_PLANS

Choice = tuple[int, ...]


def cost(items: Sequence[Sequence[Option]], choice: Choice) -> int:
    return sum(items[i][k].cost for i, k in enumerate(choice))


def smallest_meeting(items: Sequence[Sequence[Option]], cap: int, uniform: Choice | None,
                     meets: Callable[[Choice], bool]) -> Choice | None:
    """The smallest plan (one option per item, cost <= cap) that `meets` accepts, or None."""
    lowest = sum(min(o.cost for o in options) for options in items)
    if cap < lowest:
        return None
    best = _bisect(items, cap, lowest, meets)
    if uniform is not None and cost(items, uniform) <= cap and meets(uniform) and (
            best is None or cost(items, uniform) < cost(items, best)):
        best = uniform
    return None if best is None else descend(items, best, meets)


def _bisect(items: Sequence[Sequence[Option]], cap: int, lowest: int, meets: Callable[[Choice], bool]) -> Choice | None:
    top = solve(items, cap).choice
    if not meets(top):
        return None
    best, low, high = top, lowest, cost(items, top)
    bottom = solve(items, lowest).choice
    if meets(bottom):
        return bottom
    for _ in range(BISECTION_STEPS):
        if high - low <= max(64, high // 200):
            break
        mid = (low + high) // 2
        choice = solve(items, mid).choice
        if meets(choice):
            best, high = choice, min(cost(items, choice), mid)
        else:
            low = mid
    return best


def descend(items: Sequence[Sequence[Option]], choice: Choice, meets: Callable[[Choice], bool],
            budget: int = DESCENT_PLANS) -> Choice:
    """From `choice` (which meets), take single-item downgrades while one still meets (see the
    module docstring); at most `budget` plans measured."""
    current = tuple(choice)
    measured = 0
    while measured < budget:
        moves = []
        for i, options in enumerate(items):
            now = options[current[i]].cost
            cheaper = [k for k, o in enumerate(options) if o.cost < now and math.isfinite(o.score)]
            if cheaper:
                k = min(cheaper, key=lambda k, o=options: (o[k].score, o[k].cost))
                moves.append((now - options[k].cost, i, k))
        for _, i, k in sorted(moves, reverse=True):
            if measured >= budget:
                return current
            trial = current[:i] + (k,) + current[i + 1:]
            measured += 1
            if meets(trial):
                current = trial
                break
        else:
            return current
    return current
