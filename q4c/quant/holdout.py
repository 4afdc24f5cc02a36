"""Whole plans judged on calibration samples they were not fitted on.

A budgeted plan is built from per-tensor scores measured on the first calibration samples, and
the data-fitted candidates (gptq, and codebooks with GPTQ-style assignment) are rounded against
input statistics of the first calls. Measured on those same samples, such a plan looks better
than it is: on transformer_lm the default plan with codebook candidates measured KL 0.080 on the
eight calls its assignment was fitted on, 0.23 on the other calibration calls and 0.38 on
held-out inputs, against 0.17 for the plan without codebooks (session 3). So the choice between
whole plans (the knapsack's, the knapsack's without codebook candidates, uniform 4-bit) is made
on the units nothing was fitted on (`unseen_units`), and the smallest held-out damage wins.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any

import numpy as np

from q4c.config import CODEBOOK_SCHEMES
from q4c.metrics import decision_flips
from q4c.objectives import Scorer
from q4c.quant import gptq
from q4c.quant import sensitivity as sens
from q4c.quant.knapsack import Option
from q4c.quant.sensitivity import SensitivityTable
from q4c.requirements import upper_bound

#: Fewest unseen units the guard judges on; with fewer, it judges on every unit and says so.
MIN_UNSEEN_UNITS = 2
#: Fewest held-out units of every input group for flips to be judged group by group (`strata`)
MIN_STRATUM_UNITS = 5


class PlanKind(Enum):
    """The whole plans the guard compares, simplest first (a tie keeps the simpler)."""

    UNIFORM = "uniform 4-bit"
    NO_CODEBOOKS = "mixed without codebook candidates"
    MIXED = "mixed"


@dataclass(frozen=True)
class Judged:
    """Which units a plan comparison ran on, and why."""

    units: slice
    text: str
    unseen: bool  # False: too few samples to hold any out, judged on the fitted ones


def unseen_units(table: SensitivityTable) -> Judged:
    """The runner units neither the scores nor the data-fitted candidates saw: the --require
    held-out part when there is one; else the units after those the per-tensor scores ran on
    (sensitivity.MAX_SAMPLES) and those whose calls gave gptq/codebooks their input statistics
    (the first gptq.MAX_SAMPLES calls); else all units (flagged `unseen=False`)."""
    assert table.runner is not None
    units = table.runner.units
    n = len(units)
    if table.held_out is not None and table.held_out != table.fit:
        held = table.held_out
        return Judged(held, f"held-out calibration samples {held.start}..{held.stop - 1}", True)
    start = min(sens.MAX_SAMPLES, n)
    if table.hessians:
        calls = 0
        for index, unit in enumerate(units):
            if calls >= gptq.MAX_SAMPLES:
                break
            calls += len(unit)
            start = max(start, index + 1)
    if n - start >= MIN_UNSEEN_UNITS:
        return Judged(slice(start, n), f"calibration samples {start}..{n - 1} (not used for scores or fitting)", True)
    return Judged(slice(0, n), f"all {n} calibration sample(s): too few to hold any out of the fitting", False)


def without_codebooks(items: Sequence[Sequence[Option]], candidates: Sequence[Sequence[Any]]) -> list[list[Option]]:
    """The knapsack items with every codebook option made unchoosable (infinite score)."""
    return [[Option(o.cost, math.inf) if c.scheme in CODEBOOK_SCHEMES else o for o, c in zip(opts, cands, strict=True)]
            for opts, cands in zip(items, candidates, strict=True)]


def damage(metrics: Mapping[str, Mapping[str, Any]]) -> float:
    return float(sum(m["damage"] for m in metrics.values()))


def pick(measured: Mapping[PlanKind, Mapping[str, Mapping[str, Any]]]) -> PlanKind:
    """The plan with the least measured damage; ties go to the simpler (PlanKind order)."""
    order = list(PlanKind)
    return min(measured, key=lambda kind: (damage(measured[kind]), order.index(kind)))


def stratum(unit: Sequence[Mapping[str, np.ndarray]]) -> str:
    """A unit's input group: its first call's scalar integer and boolean feeds (a sample rate, a
    mode flag: the inputs that choose which branch of the model runs), e.g. "sr=8000"."""
    parts = []
    for name, value in sorted(unit[0].items()):
        arr = np.asarray(value)
        if arr.size == 1 and arr.dtype.kind in "iub":
            parts.append(f"{name}={arr.reshape(-1)[0].item()}")
    return ", ".join(parts)


def interleaved(units: Sequence[Sequence[Mapping[str, np.ndarray]]]) -> list[Sequence[Mapping[str, np.ndarray]]]:
    """`units` round-robin over their input groups (`stratum`; groups in order of first appearance,
    each keeping its own order), when there are several: the first units, which the per-tensor
    scores and the data-fitted candidates use, then cover every group evenly. Silero's reader
    gives every third clip at 8 kHz, so its 8 kHz network was scored on one clip of the first four."""
    groups: dict[str, list[Sequence[Mapping[str, np.ndarray]]]] = {}
    for unit in units:
        groups.setdefault(stratum(unit), []).append(unit)
    if len(groups) < 2:
        return list(units)
    return [unit for row in itertools.zip_longest(*groups.values()) for unit in row if unit is not None]


def strata(labels: Sequence[str]) -> dict[str, list[int]]:
    """Positions of the units per input group, when there are several groups and each has at
    least MIN_STRATUM_UNITS units; else one group of all (label "")."""
    groups: dict[str, list[int]] = {}
    for i, label in enumerate(labels):
        groups.setdefault(label, []).append(i)
    if len(groups) < 2 or min(len(v) for v in groups.values()) < MIN_STRATUM_UNITS:
        return {"": list(range(len(labels)))}
    return groups


def flips_figures(units: Sequence[Sequence[int]], labels: Sequence[str]) -> dict[str, Any]:
    """`flips_units` and the bound the flips requirement is judged by (`flips_upper`): over all
    units, or, where the units fall into input groups (`strata`: Silero's 16 and 8 kHz calls run
    different branches), the highest of the groups' bounds, each group's figures in
    `flips_strata` (a pooled rate could hide one sample rate's flips behind the other's)."""
    out: dict[str, Any] = {"flips_units": [list(u) for u in units]}
    groups = strata(labels)
    if len(groups) == 1:
        out["flips_upper"] = upper_bound(units)
        return out
    out["flips_strata"] = {}
    for label, where in groups.items():
        part = [units[i] for i in where]
        total = sum(n for _, n in part)
        out["flips_strata"][label] = {"flips": sum(k for k, _ in part) / total if total else 0.0,
                                      "flips_upper": upper_bound(part), "units": len(part)}
    out["flips_upper"] = max(g["flips_upper"] for g in out["flips_strata"].values())
    return out


def plan_metrics(table: SensitivityTable, keys: Mapping[str, str], granularity: Any,
                 which: slice) -> dict[str, dict[str, Any]]:
    """Per task output, a whole plan's figures on the units `which` selects (closed loop where
    plans are), as one run over all of them would give, plus for decision outputs the flips per
    unit (`flips_units`: [flipped, decisions]) and their bootstrap upper bound (`flips_upper`,
    q4c.requirements.upper_bound; per input group, see `flips_figures`): the units are scored
    one by one and the tallies pooled."""
    runner = table.runner
    assert runner is not None and runner.objectives is not None
    changes = table.plan_changes(dict(keys), granularity)
    indices = range(*which.indices(len(runner.units)))
    scorers = [runner.score(changes, keep=True, which=slice(i, i + 1), closed=runner.plans_closed_loop)
               for i in indices]
    pooled = Scorer(runner.objectives, keep=True)
    for name, tally in pooled.tallies.items():
        for part in (s.tallies[name] for s in scorers):
            tally.total += part.total
            tally.calls += part.calls
            tally.noise += part.noise
            tally.power += part.power
            tally.refs += part.refs
            tally.outs += part.outs
    metrics = pooled.metrics()
    for name, m in metrics.items():
        if "flips" not in m:
            continue
        units = []
        for s in scorers:
            part = s.tallies[name]
            ref, act = np.concatenate(part.refs), np.concatenate(part.outs)
            units.append([round(decision_flips(ref, act) * ref.size), int(ref.size)])
        m.update(flips_figures(units, [stratum(runner.units[i]) for i in indices]))
    return metrics
