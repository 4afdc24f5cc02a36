"""--latency-budget's text (a ratio to FP32 or milliseconds) as seconds.

A leaf (it imports nothing of q4c), so q4c.config can check the option without importing the
planner, which imports q4c.quant and q4c.recurrent_lowering, which import q4c.config.
"""

from __future__ import annotations

import math


def latency_budget_seconds(budget: str, fp32_s: float) -> float:
    """'0.6' (x FP32) or '12ms' -> seconds; ValueError unless a positive finite number."""
    text = budget.strip().lower()
    if text.endswith("ms"):
        value, scale = float(text[:-2]), 1e-3
    else:
        value, scale = float(text.rstrip("x")), fp32_s
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"latency budget must be positive, not {budget!r}")
    return value * scale


__all__ = ["latency_budget_seconds"]
