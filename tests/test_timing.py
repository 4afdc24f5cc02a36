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
