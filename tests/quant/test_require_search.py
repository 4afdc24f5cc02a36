"""q4c.quant.require_search: the smallest plan a measurement accepts, when the predicted scores
mislead the knapsack near the limit."""

from q4c.quant.knapsack import Option
from q4c.quant.require_search import descend, smallest_meeting


def _items():
    # Two tensors, options (cost, predicted score): 0 = 2-bit, 1 = 4-bit, 2 = 8-bit, 3 = FP32.
    # The predictions say tensor 0 ("the LSTM") is the cheaper one to cut to 4 bits; the truth
    # (`meets`) is that only tensor 1 may be cut.
    return [[Option(20, 9.0), Option(40, 0.1), Option(80, 0.001), Option(160, 0.0)],
            [Option(10, 9.0), Option(20, 0.5), Option(40, 0.001), Option(80, 0.0)]]


def _meets(choice):
    return choice[0] >= 2 and choice[1] >= 1  # tensor 0 must stay 8-bit, tensor 1 may go to 4-bit


def test_descent_finds_the_downgrade_the_predictions_rank_second():
    seen = []

    def meets(choice):
        seen.append(choice)
        return _meets(choice)

    best = smallest_meeting(_items(), cap=239, uniform=(1, 1), meets=meets)
    assert best == (2, 1)  # 100 bytes; the knapsack's plans up to 119 bytes cut tensor 0 instead
    assert (1, 2) in seen  # the predicted-best 80-byte plan was measured and failed


def test_descent_stops_when_no_downgrade_meets_and_respects_its_budget():
    calls = []

    def never(choice):
        calls.append(choice)
        return False

    assert descend(_items(), (2, 2), never) == (2, 2)
    assert len(calls) == 2  # one single-tensor downgrade per tensor, then stop
    calls.clear()
    assert descend(_items(), (2, 2), never, budget=1) == (2, 2) and len(calls) == 1


def test_nothing_meets_and_a_cap_below_the_smallest_plan_give_none():
    assert smallest_meeting(_items(), cap=239, uniform=None, meets=lambda c: False) is None
    assert smallest_meeting(_items(), cap=29, uniform=None, meets=lambda c: True) is None
