"""Plans of a system (q4c.system_compile): one plan for all graphs, tensor names prefixed with
"<graph>/", split into per-graph plans and joined back; the smallest plan meeting --require.

A system plan file is a q4c plan (schema q4c.plan/2: every tensor's bits, scheme, granularity
and form) plus a "graphs" object recording the opset each graph was compiled at
({"enc": {"opset": 21}}), so `--plan` replays every graph at its own opset with its own forms
and writes the same bytes. A system plan without "graphs" still reads: each graph's opset is
then decided from its bits, as for a plan without an opset.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from q4c.config import CompileOptions
from q4c.errors import ConfigError
from q4c.quant.knapsack import Option, Solution, solve
from q4c.quant.plan import PrecisionPlan

logger = logging.getLogger(__name__)


def smallest_meeting(items: list[list[Option]], cap: int, capped: bool, uniform: tuple[int, ...] | None,
                     measure: Callable[..., dict[str, Any]], held: Sequence[int],
                     options: CompileOptions) -> tuple[Solution, dict]:
    """--require on the system's outputs: the smallest knapsack plan (bisection over the byte
    budget up to `cap`) whose measured figures on the `held` driver samples (held out, never
    scored, unless there were too few to hold any out) meet every requirement; uniform 4-bit is
    tried too. RequirementError if none."""
    from q4c.requirements import (
        RequirementError,
        check_all,
        parse_requirement,
        shortfall,
    )

    reqs = [parse_requirement(t) for t in options.requirements]
    held = list(held)
    tried: dict[tuple[int, ...], tuple[int, dict[str, Any], bool, list[str]]] = {}

    def evaluate(choice: tuple[int, ...]) -> tuple[int, dict[str, Any], bool, list[str]]:
        if choice not in tried:
            metrics = measure(choice, held)
            ok, figures = check_all(reqs, metrics)
            tried[choice] = (sum(items[i][k].cost for i, k in enumerate(choice)), metrics, ok, figures)
            logger.info("--require: %d bytes -> %s (%s)", tried[choice][0], ", ".join(figures), "met" if ok else "not met")
        return tried[choice]

    lowest = sum(min(o.cost for o in opts) for opts in items)
    best = None
    if cap >= lowest:
        top = tuple(solve(items, cap).choice)
        if evaluate(top)[2]:
            best, low, high = top, lowest, tried[top][0]
            for _ in range(12):
                if high - low <= max(64, high // 200):
                    break
                mid = (low + high) // 2
                choice = tuple(solve(items, mid).choice)
                if evaluate(choice)[2]:
                    best, high = choice, min(tried[choice][0], mid)
                else:
                    low = mid
    if uniform is not None and sum(items[i][k].cost for i, k in enumerate(uniform)) <= cap and evaluate(uniform)[2] \
            and (best is None or tried[uniform][0] < tried[best][0]):
        best = uniform
    if best is None:
        cost, _, _, figures = min(tried.values(), key=lambda v: (shortfall(reqs, v[1]), v[0])) if tried else (0, {}, False, [])
        limit = f"the cap of {cap} bytes" if capped else "the FP32 weights"
        raise RequirementError(f"no system plan smaller than {limit} meets {', '.join(options.requirements)} on the "
                               f"held-out driver samples {held}: the best reached {', '.join(figures)} at {cost} bytes "
                               f"({len(tried)} plans measured)")
    cost, metrics, _, figures = tried[best]
    solution = Solution(best, cost, sum(items[i][k].score for i, k in enumerate(best)), 1)
    return solution, {"samples": len(held), "plan": metrics, "require": {
        "requirements": list(options.requirements), "figures": figures, "bytes": cost, "cap_bytes": cap,
        "plans_measured": len(tried), "on": f"held-out driver samples {held} (never scored)"}}


@dataclass
class SystemPlan:
    """One plan for every graph ("<graph>/<tensor>" names) and the opset each graph was compiled at."""

    plan: PrecisionPlan
    opsets: dict[str, int] = field(default_factory=dict)

    def to_json(self) -> dict[str, object]:
        doc = self.plan.to_json()
        if self.opsets:
            doc["graphs"] = {name: {"opset": opset} for name, opset in sorted(self.opsets.items())}
        return doc

    @classmethod
    def from_json(cls, doc: Mapping[str, Any], source: str = "plan") -> SystemPlan:
        plan = PrecisionPlan.from_json(doc, source)
        graphs = doc.get("graphs") or {}
        if not isinstance(graphs, Mapping):
            raise ConfigError(f"{source}: 'graphs' must be an object of graph name -> {{opset}}")
        opsets = {}
        for name, entry in graphs.items():
            opset = entry.get("opset") if isinstance(entry, Mapping) else None
            if isinstance(opset, bool) or not isinstance(opset, int) or not 21 <= opset <= 25:
                raise ConfigError(f"{source}: graph {name!r}: expected {{\"opset\": an integer from 21 to 25}}, "
                                  f"not {entry!r}")
            opsets[str(name)] = opset
        return cls(plan, opsets)

    def save(self, path: str | os.PathLike[str]) -> None:
        from q4c.graph import write_json

        write_json(path, self.to_json())

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> SystemPlan:
        from q4c.graph import read_json

        return cls.from_json(read_json(path, "plan"), source=str(path))


def split_plan(system: SystemPlan, graphs: Iterable[str], warnings: list[str]) -> dict[str, PrecisionPlan]:
    """A system plan as one plan per graph, each at its recorded opset (None: decided from its bits)."""
    plans = {name: PrecisionPlan(defaults=dict(system.plan.defaults), opset=system.opsets.get(name)) for name in graphs}
    unknown = []
    for full, tp in system.plan.tensors.items():
        graph, sep, tensor = full.partition("/")
        if not sep or graph not in plans:
            unknown.append(full)
            continue
        plans[graph].tensors[tensor] = tp
    if unknown:
        warnings.append(f"plan names {len(unknown)} tensor(s) of no graph of the system, ignored: "
                        f"{', '.join(unknown[:5])}")
    stray = sorted(set(system.opsets) - set(plans))
    if stray:
        warnings.append(f"plan gives an opset to {len(stray)} graph(s) not in the system, ignored: {', '.join(stray[:5])}")
    return plans


def combined_plan(reports: Mapping[str, Mapping[str, Any]], defaults: Mapping[str, Any]) -> SystemPlan:
    """The system plan of the compiled graphs: their plans' tensors (with forms) and opsets."""
    system = SystemPlan(PrecisionPlan(defaults=dict(defaults)))
    for name, report in reports.items():
        sub = PrecisionPlan.from_json(report["plan"]) if "plan" in report else PrecisionPlan()
        for tensor, tp in sub.tensors.items():
            system.plan.tensors[f"{name}/{tensor}"] = tp
        if sub.opset is not None:
            system.opsets[name] = sub.opset
    return system
