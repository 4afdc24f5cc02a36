"""Quality requirements (`--require`): parse them, read their figure from a plan's measured
per-output metrics (q4c.objectives.Tally.metrics), and say whether it is met.

Grammar (spaces allowed, case-insensitive)::

    requirement := metric op number [unit]
    metric      := "flips" | "sqnr" | "kl"
    op          := "<=" | "<" | ">=" | ">"

- ``flips``: fraction of decision flips at 0.5 of the probability (bce) outputs, worst output;
  unit ``%`` or none (a fraction): ``flips<=0.5%`` = ``flips<=0.005``. Needs ``<=`` / ``<``.
- ``sqnr``: SQNR in dB of the task outputs whose objective reports one (snr and bce outputs),
  the lowest; unit ``dB`` or none. Needs ``>=`` / ``>``.
- ``kl``: KL divergence in nats of the kl outputs, Bernoulli KL of the bce outputs, the highest;
  no unit. Needs ``<=`` / ``<``.

Which calibration samples judge a requirement (`require_split`): every runner unit (one
calibration sample: a whole sequence of a stateful model) after those the per-tensor scores ran
on and those whose calls gave the data-fitted candidates (gptq, codebook assignment) their input
statistics; at least half of the units are held out. Nothing is fitted on the held-out units;
only the choice between whole plans is made on them.

A flip rate measured on a few dozen clips is noisy: with 12 held-out clips a plan measured at
0.5 % there flipped 0.6-0.8 % of the Silero test chunks. Where the measurement gives flips per
held-out unit (``flips_units``: [flipped, decisions] per unit), ``flips`` is judged by the
one-sided CONFIDENCE upper bound of the pooled rate when the units are resampled with replacement
(``flips_upper``); the point figure is reported beside it. Units whose scalar integer or boolean
inputs differ (Silero's ``sr``: 16 and 8 kHz run different branches) are judged group by group and
the worst group's bound counts (q4c.quant.holdout.flips_figures), so that one branch's flips do not
hide behind the other's in a pooled rate. The unit of resampling is the whole
calibration sample, not a block of calls inside it: a sequence's calls share one recording and
carry state from call to call, so they are not independent draws; distinct samples are (a
reader must not give the same recording twice, see models/real/silero.py).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from q4c.errors import Q4cError

METRICS = ("flips", "sqnr", "kl")
GRAMMAR = 'METRIC OP NUMBER[UNIT]: "flips<=0.5%", "sqnr>=25dB", "kl<=0.01"'
_PATTERN = re.compile(r"^\s*([a-z]+)\s*(<=|>=|<|>)\s*([-+]?(?:\d+\.?\d*|\.\d+)(?:e[-+]?\d+)?)\s*(%|db)?\s*$")
_LOWER = {"flips": True, "kl": True, "sqnr": False}  # is lower better?
#: flips are judged by this one-sided bootstrap upper bound over the held-out units
CONFIDENCE = 0.9
RESAMPLES = 2000


class RequirementError(Q4cError):
    """No plan smaller than the FP32 model meets a --require (exit 1, nothing written)."""


@dataclass(frozen=True)
class Requirement:
    metric: str
    op: str
    value: float  # flips as a fraction, sqnr in dB, kl in nats
    text: str

    def figure(self, metrics: Mapping[str, Mapping[str, Any]]) -> float | None:
        """The worst figure of this metric over the task outputs that have it (None: none has)."""
        if self.metric == "flips":
            values = [m.get("flips_upper", m["flips"]) for m in metrics.values() if "flips" in m]
        elif self.metric == "sqnr":
            values = [m["sqnr_db"] for m in metrics.values() if "sqnr_db" in m]
        else:
            values = [m["damage"] for m in metrics.values() if m.get("objective") in ("kl", "bce")]
        if not values:
            return None
        return max(values) if _LOWER[self.metric] else min(values)

    def met(self, figure: float | None) -> bool:
        if figure is None or math.isnan(figure):
            return False
        return {"<=": figure <= self.value, "<": figure < self.value,
                ">=": figure >= self.value, ">": figure > self.value}[self.op]

    def format(self, figure: float | None, metrics: Mapping[str, Mapping[str, Any]] | None = None) -> str:
        if figure is None:
            return f"no {self.metric}"
        if self.metric == "flips":
            bound = next((m for m in (metrics or {}).values() if m.get("flips_upper") == figure), None)
            if bound is not None and "flips_strata" in bound:  # the worst input group decides
                label, worst = max(bound["flips_strata"].items(), key=lambda kv: kv[1]["flips_upper"])
                return (f"flips {100 * figure:.3g}% ({100 * CONFIDENCE:.0f}% upper bound over the "
                        f"{worst['units']} held-out units with {label}, the worst of {len(bound['flips_strata'])} "
                        f"input groups; measured {100 * worst['flips']:.3g}% there, {100 * bound['flips']:.3g}% "
                        f"over all {len(bound['flips_units'])})")
            if bound is not None:
                return (f"flips {100 * figure:.3g}% ({100 * CONFIDENCE:.0f}% upper bound over "
                        f"{len(bound['flips_units'])} held-out units; measured {100 * bound['flips']:.3g}%)")
            return f"flips {100 * figure:.3g}%"
        if self.metric == "sqnr":
            return f"sqnr {figure:.1f}dB"
        return f"kl {figure:.3g}"


def parse_requirement(text: str) -> Requirement:
    """One requirement (see the module docstring); ValueError saying what is wrong."""
    match = _PATTERN.match(text.lower())
    if match is None:
        raise ValueError(f"cannot parse requirement {text!r}; expected {GRAMMAR}")
    metric, op, number, unit = match.groups()
    if metric not in METRICS:
        raise ValueError(f"requirement {text!r}: unknown metric {metric!r}; metrics: {', '.join(METRICS)}")
    if _LOWER[metric] != op.startswith("<"):
        want = "<= or <" if _LOWER[metric] else ">= or >"
        raise ValueError(f"requirement {text!r}: {metric} must be bounded with {want}")
    value = float(number)
    if metric == "flips":
        if unit == "db":
            raise ValueError(f"requirement {text!r}: flips take % or a fraction, not dB")
        value = value / 100 if unit == "%" else value
        if not 0 <= value <= 1:
            raise ValueError(f"requirement {text!r}: flips must be between 0 and 100%")
    elif metric == "sqnr":
        if unit == "%":
            raise ValueError(f"requirement {text!r}: sqnr takes dB, not %")
    else:
        if unit is not None:
            raise ValueError(f"requirement {text!r}: kl is in nats, without a unit")
        if value < 0:
            raise ValueError(f"requirement {text!r}: kl cannot be negative")
    return Requirement(metric, op, value, text.strip())


def check_all(requirements: list[Requirement], metrics: Mapping[str, Mapping[str, Any]]) -> tuple[bool, list[str]]:
    """(all met?, the figures as text)."""
    figures = [r.figure(metrics) for r in requirements]
    return all(r.met(f) for r, f in zip(requirements, figures, strict=True)), \
        [r.format(f, metrics) for r, f in zip(requirements, figures, strict=True)]


def require_split(unit_calls: Sequence[int], scored: int, fitted_calls: int) -> tuple[slice, slice]:
    """(fit, held-out) runner units for --require, given each unit's call count, how many units
    the per-tensor scores run (the first `scored`) and how many first calls the data-fitted
    candidates take their statistics from (`fitted_calls`, 0 if none): the held-out part starts
    after both, but never holds out fewer than half of the units (with two or more)."""
    n = len(unit_calls)
    covered = 0
    if fitted_calls > 0:
        calls = 0
        for covered, count in enumerate(unit_calls, start=1):
            calls += count
            if calls >= fitted_calls:
                break
    first_unseen = min(max(scored, covered), n - n // 2)
    return slice(0, first_unseen), slice(first_unseen, n)


def upper_bound(units: Sequence[Sequence[int]], confidence: float = CONFIDENCE, seed: int = 0) -> float:
    """One-sided `confidence` upper bound of the pooled rate sum(k) / sum(n) over `units` (each
    [k, n]: k events among n decisions) when the units are resampled with replacement (percentile
    bootstrap). With fewer than two units, the pooled rate itself."""
    k = np.array([u[0] for u in units], dtype=np.float64)
    n = np.array([u[1] for u in units], dtype=np.float64)
    pooled = float(k.sum() / n.sum()) if n.sum() else 0.0
    if len(units) < 2:
        return pooled
    idx = np.random.default_rng(seed).integers(0, len(units), size=(RESAMPLES, len(units)))
    rates = k[idx].sum(axis=1) / np.maximum(n[idx].sum(axis=1), 1)
    return max(pooled, float(np.quantile(rates, confidence)))


def shortfall(requirements: list[Requirement], metrics: Mapping[str, Mapping[str, Any]]) -> float:
    """How far a plan is from meeting the requirements, to pick the best of failing plans: the
    sum over unmet requirements of the relative gap (0 when all are met)."""
    total = 0.0
    for r in requirements:
        f = r.figure(metrics)
        if f is None or math.isnan(f):
            total += 1e9
        elif not r.met(f):
            if r.metric == "sqnr":
                total += (r.value - f) / 10
            else:
                total += (f - r.value) / max(r.value, 1e-9)
    return total
