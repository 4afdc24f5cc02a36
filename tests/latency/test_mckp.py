"""The two-resource planner against brute force on random small instances."""

from __future__ import annotations

import numpy as np
import pytest

from q4c.errors import ConfigError
from q4c.latency.mckp import Option2, brute_force2, solve2


def _instance(rng: np.random.Generator, items: int, options: int, integer: bool) -> list[list[Option2]]:
    out = []
    for _ in range(items):
        opts = []
        for _ in range(options):
            nbytes = int(rng.integers(1, 40))
            latency = float(rng.integers(1, 30)) if integer else float(rng.uniform(0.1, 3.0))
            opts.append(Option2(nbytes, latency, float(rng.exponential(1.0))))
        out.append(opts)
    return out


@pytest.mark.parametrize("seed", range(40))
def test_exact_with_integer_costs_and_unit_one(seed):
    rng = np.random.default_rng(seed)
    items = _instance(rng, int(rng.integers(1, 6)), int(rng.integers(1, 5)), integer=True)
    byte_budget = int(sum(min(o.nbytes for o in opts) + max(o.nbytes for o in opts) for opts in items) // 2)
    latency_budget = float(sum(min(o.latency for o in opts) + max(o.latency for o in opts) for opts in items) // 2)
    truth = brute_force2(items, byte_budget, latency_budget)
    if truth is None:
        with pytest.raises(ConfigError):
            solve2(items, byte_budget, latency_budget, byte_unit=1, latency_unit=1)
        return
    plan = solve2(items, byte_budget, latency_budget, byte_unit=1, latency_unit=1)
    assert plan.nbytes <= byte_budget and plan.latency <= latency_budget
    assert plan.damage == pytest.approx(truth.damage, abs=1e-9)
    assert plan.gap == pytest.approx(0.0, abs=1e-9)
    # the plan's reported totals are those of the options it names
    picked = [items[i][k] for i, k in enumerate(plan.choice)]
    assert plan.damage == pytest.approx(sum(o.damage for o in picked))
    assert plan.nbytes == sum(o.nbytes for o in picked)


@pytest.mark.parametrize("seed", range(40))
def test_coarse_units_stay_feasible_and_bound_the_optimum(seed):
    rng = np.random.default_rng(100 + seed)
    items = _instance(rng, int(rng.integers(2, 6)), int(rng.integers(2, 5)), integer=False)
    byte_budget = int(sum(np.mean([o.nbytes for o in opts]) for opts in items))
    latency_budget = float(sum(np.mean([o.latency for o in opts]) for opts in items))
    truth = brute_force2(items, byte_budget, latency_budget)
    if truth is None:
        with pytest.raises(ConfigError):
            solve2(items, byte_budget, latency_budget, byte_unit=7, latency_unit=0.37)
        return
    try:
        plan = solve2(items, byte_budget, latency_budget, byte_unit=7, latency_unit=0.37)
    except ConfigError:  # rounding up to coarse units may lose every plan; never a wrong one
        return
    assert plan.nbytes <= byte_budget and plan.latency <= latency_budget + 1e-9
    assert plan.lower_bound <= truth.damage + 1e-9 <= plan.damage + 2e-9
    assert plan.damage - plan.gap <= truth.damage + 1e-9


def test_default_resolution_is_exact_on_a_hand_instance():
    # two layers: a fast big option, a slow small one; only mixing them meets both budgets
    items = [[Option2(100, 1.0, 0.0), Option2(25, 3.0, 1.0)], [Option2(100, 1.0, 0.0), Option2(25, 3.0, 2.0)]]
    plan = solve2(items, 130, 4.5)
    assert plan.choice == (1, 0) and plan.damage == 1.0 and plan.gap == 0.0


def test_budget_below_the_fastest_plan_is_a_config_error():
    items = [[Option2(10, 2.0, 0.0), Option2(5, 1.0, 1.0)]]
    with pytest.raises(ConfigError, match="latency budget"):
        solve2(items, 100, 0.5)
    with pytest.raises(ConfigError, match="byte budget"):
        solve2(items, 4, 5.0)
