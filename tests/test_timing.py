"""q4c.timing: interleaved process-CPU medians and their ratios."""

from __future__ import annotations

import pytest

from q4c.timing import interleaved, ratio, timed


def _spin(n: int) -> int:
    total = 0
    for i in range(n):  # pure-Python CPU work: time scales with n
        total += i * i % 7
    return total


def test_ratio_of_twice_the_work_is_about_two():
    r = ratio(lambda: _spin(400_000), lambda: _spin(200_000), rounds=7)
    assert 1.3 < r < 3.0


def test_interleaved_alternates_order_and_counts_rounds():
    calls: list[str] = []
    timing = interleaved({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, rounds=4, warmup=1)
    assert calls == ["a", "b", "a", "b", "b", "a", "a", "b", "b", "a"]  # warm-up, then alternating rounds
    assert timing.rounds == 4 and set(timing.cpu) == {"a", "b"}


def test_max_seconds_stops_after_min_rounds():
    timing = interleaved({"a": lambda: _spin(1000)}, rounds=1000, warmup=0, min_rounds=3, max_seconds=0.0)
    assert timing.rounds == 3


def test_timed_returns_the_result_and_cpu_close_to_wall_for_cpu_work():
    result, wall, cpu = timed(lambda: _spin(200_000))
    assert result == _spin(200_000)
    assert cpu > 0 and wall > 0


def test_rejects_zero_rounds():
    with pytest.raises(ValueError):
        interleaved({"a": lambda: None}, rounds=0)


def test_round_order_alternates():
    from q4c.timing import round_order

    assert [list(round_order(["a", "b", "c"], i)) for i in range(3)] == [["a", "b", "c"], ["c", "b", "a"], ["a", "b", "c"]]


def test_repeat_records_time_per_call():
    calls: list[str] = []
    timing = interleaved({"a": lambda: (calls.append("a"), _spin(20_000))}, rounds=3, warmup=0, repeat=4)
    assert len(calls) == 12 and timing.rounds == 3
    one = interleaved({"a": lambda: _spin(20_000)}, rounds=3, warmup=0)
    assert 0.4 < timing.median("a") / one.median("a") < 2.5  # per call, not per 4 calls


def test_calls_per_sample_fills_the_requested_time():
    from q4c.timing import calls_per_sample

    n = calls_per_sample(lambda: _spin(10_000), 0.05)
    _, _, cpu = timed(lambda: [_spin(10_000) for _ in range(n)])
    assert n > 1 and 0.015 < cpu < 0.2


def test_ratio_interval_brackets_the_ratio_and_narrows_with_rounds():
    from q4c.timing import Timing

    rng = __import__("numpy").random.default_rng(0)
    few = Timing({"a": list(2 + 0.2 * rng.random(5)), "b": list(1 + 0.1 * rng.random(5))})
    many = Timing({"a": list(2 + 0.2 * rng.random(400)), "b": list(1 + 0.1 * rng.random(400))})
    for t in (few, many):
        low, high = t.ratio_interval("a", "b")
        assert low <= t.ratio("a", "b") <= high
    assert many.ratio_interval("a", "b")[1] - many.ratio_interval("a", "b")[0] < few.ratio_interval("a", "b")[1] - few.ratio_interval("a", "b")[0]
    assert 1.8 < many.ratio_interval("a", "b")[0] and many.ratio_interval("a", "b")[1] < 2.2  # 2.1 / 1.05 = 2.0


def test_sides_pool_each_rounds_sessions_by_their_mean():
    from q4c.timing import Timing

    timing = Timing({"a#0": [1.0, 2.0, 3.0], "a#1": [3.0, 4.0, 5.0], "b#0": [2.0, 2.0, 2.0], "b#1": [4.0, 6.0, 8.0]})
    pooled = timing.sides(("a", "b"), 2)
    assert pooled.cpu == {"a": [2.0, 3.0, 4.0], "b": [3.0, 4.0, 5.0]}
    assert pooled.ratio("a", "b") == 3.0 / 4.0
