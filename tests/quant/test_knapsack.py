import numpy as np
import pytest

from q4c.errors import ConfigError
from q4c.quant.knapsack import Option, brute_force, solve


def _random_instance(rng, items=5, options=4):
    return [[Option(int(rng.integers(1, 40)), float(rng.random())) for _ in range(options)] for _ in range(items)]


@pytest.mark.parametrize("seed", range(25))
def test_dp_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    items = _random_instance(rng)
    budget = int(rng.integers(sum(min(o.cost for o in it) for it in items), 200))
    dp, bf = solve(items, budget, unit=1), brute_force(items, budget)
    assert dp.score == pytest.approx(bf.score, abs=1e-12)
    assert dp.cost <= budget


@pytest.mark.parametrize("seed", range(10))
def test_coarse_unit_never_exceeds_the_budget(seed):
    rng = np.random.default_rng(100 + seed)
    items = [[Option(int(rng.integers(1000, 100000)), float(rng.random())) for _ in range(4)] for _ in range(30)]
    budget = sum(min(o.cost for o in it) for it in items) + 200_000
    sol = solve(items, budget, unit=997)
    assert sol.cost <= budget
    assert sol.score >= solve(items, budget, unit=1).score - 1e-9  # coarser is never better than exact


def test_hand_computed_instance():
    # Budget 8 admits (a2, b6) = 0.5, (a4, b4) = 0.3, (a4, b2) = 0.6, (a2, b4) = 0.6, (a2, b2) = 0.9;
    # a8 leaves nothing for b. The optimum is (a4, b4) at 0.3.
    a = [Option(2, 0.5), Option(4, 0.2), Option(8, 0.0)]
    b = [Option(2, 0.4), Option(4, 0.1), Option(6, 0.0)]
    sol = solve([a, b], 8, unit=1)
    assert sol.choice == (1, 1) and sol.cost == 8 and sol.score == pytest.approx(0.3)


def test_infeasible_budget_is_a_clear_error():
    with pytest.raises(ConfigError, match="below the smallest possible size 4"):
        solve([[Option(2, 0.0)], [Option(2, 0.0)]], 3)


def test_coarse_unit_keeps_a_plan_that_fits_only_in_exact_bytes():
    # Every item at option 1 costs 1001 bytes: 3003 fits a budget of 3003 exactly, but rounded up
    # to 100-byte units each costs 11 units (33 > 30 columns). The slack repair must find it.
    items = [[Option(500, 1.0), Option(1001, 0.1)] for _ in range(3)]
    sol = solve(items, 3003, unit=100)
    assert sol.choice == (1, 1, 1) and sol.cost == 3003 and sol.score == pytest.approx(0.3)


def test_rounding_that_makes_every_plan_too_big_still_finds_the_cheapest():
    # Budget 9 at unit 5 leaves 1 column, but each item costs >= 1 unit: the DP alone finds
    # nothing, though cheapest (2 + 2 bytes) fits, and the slack then buys the 7-byte option.
    items = [[Option(2, 5.0), Option(7, 0.0)], [Option(2, 0.0), Option(3, 0.0)]]
    sol = solve(items, 9, unit=5)
    assert sol.choice == (1, 0) and sol.cost == 9 and sol.score == 0.0


@pytest.mark.parametrize("seed", range(10))
def test_a_feasible_incumbent_is_never_beaten_by_a_worse_coarse_solution(seed):
    rng = np.random.default_rng(200 + seed)
    items = _random_instance(rng, items=6, options=4)
    budget = int(rng.integers(sum(min(o.cost for o in it) for it in items), 150))
    exact = brute_force(items, budget)
    sol = solve(items, budget, unit=7, incumbent=exact.choice)
    assert sol.score == pytest.approx(exact.score, abs=1e-12) and sol.cost <= budget
    over = [max(range(4), key=lambda k, it=it: it[k].cost) for it in items]  # most expensive: over budget
    if sum(it[k].cost for it, k in zip(items, over)) > budget:
        assert solve(items, budget, unit=7, incumbent=over).cost <= budget


@pytest.mark.parametrize("seed", range(10))
def test_coarse_unit_with_slack_repair_is_close_to_exact(seed):
    rng = np.random.default_rng(300 + seed)
    items = [[Option(int(rng.integers(1000, 100000)), float(rng.random())) for _ in range(4)] for _ in range(12)]
    budget = sum(min(o.cost for o in it) for it in items) + 150_000
    coarse, exact = solve(items, budget, unit=997), solve(items, budget, unit=1)
    assert exact.score <= coarse.score + 1e-9 and coarse.cost <= budget
