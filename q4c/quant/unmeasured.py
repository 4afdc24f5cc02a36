"""Weights whose damage the calibration never measured stay at the default width.

A data-driven score is the damage quantizing a weight does to the outputs on the calibration
samples. A weight those samples never run (the `If` branch of a sample rate the reader never
feeds, say Silero's 8 kHz encoder when only 16 kHz audio is given) scores exactly zero for every
candidate, so the knapsack would put it at its cheapest candidate (2 bits) for free: a plan that
looks perfect on the calibration data and breaks the first time the other branch runs. Weights
scored by the data-free mse proxy instead (`SensitivityTable.fallbacks`) have scores on another
scale than the measured ones. Neither is measured, so neither is left to the knapsack: each keeps
the default width (its 4-bit candidate, the bytes of the default budget), and the caller warns
naming them (`describe`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from q4c.quant.candidates import DEFAULT_BITS, default_width
from q4c.quant.knapsack import Option
from q4c.quant.plan import FLOAT
from q4c.quant.sensitivity import SensitivityTable


def unmeasured(table: SensitivityTable, names: Sequence[str]) -> dict[str, str]:
    """Of `names`, those whose output damage was not measured, with the reason. Only tables
    scored on data (a runner, measure kl or hessian) measure anything."""
    if table.runner is None or table.measure == "mse":
        return {}
    out = {}
    for name in names:
        if name in table.fallbacks:
            out[name] = f"scored by the mse proxy ({table.fallbacks[name]})"
            continue
        scores = [table.scores[name][c.key] for c in table.candidates[name]
                  if c.bits != FLOAT and c.key in table.scores.get(name, {})]
        if scores and all(s == 0.0 for s in scores):
            out[name] = "no calibration sample runs it (every candidate scored exactly 0)"
    return out


def default_index(table: SensitivityTable, name: str) -> int:
    """The candidate an unmeasured weight keeps: symmetric 4-bit if it has one (else another
    non-codebook 4-bit scheme), else its float candidate (the widest)."""
    cands = table.candidates[name]
    fours = default_width(cands)
    if fours:
        return min(fours, key=lambda k: cands[k].scheme != "symmetric")
    return max(range(len(cands)), key=lambda k: cands[k].nbytes)


def pin(items: Sequence[Sequence[Option]], groups: Sequence[Sequence[str]], table: SensitivityTable,
        names: Sequence[str]) -> list[list[Option]]:
    """The knapsack items with every group that holds one of `names` pinned to its default
    candidate: the other options cost at least as much and can never be chosen (infinite
    score), so the cheapest plan and every solve keep the default."""
    pinned = set(names)
    out = []
    for group, options in zip(groups, items, strict=True):
        if not pinned & set(group):
            out.append(list(options))
            continue
        keep = default_index(table, group[0])
        floor = options[keep].cost
        out.append([o if k == keep else Option(max(o.cost, floor), math.inf) for k, o in enumerate(options)])
    return out


def describe(reasons: dict[str, str]) -> str:
    """One warning line naming the pinned weights and why."""
    shown = "; ".join(f"{name}: {why}" for name, why in sorted(reasons.items()))
    return (f"assign-precision: {len(reasons)} weight(s) kept at the default {DEFAULT_BITS}-bit width because "
            f"their damage was not measured on the calibration samples (give samples that run them): {shown}")
