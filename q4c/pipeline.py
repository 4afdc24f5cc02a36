"""The pass contract (Pass, PassResult, PassContext) and the Pipeline that runs passes with
their chores: preconditions, cleanup, postconditions, timing, dumps, and honesty audits."""

from __future__ import annotations

import abc
import enum
import logging
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import onnx
import onnx_graphsurgeon as gs

from q4c import graph as g
from q4c.errors import PassError, PostconditionError, PreconditionError, Q4cError

if TYPE_CHECKING:
    from q4c.calib.readers import Feeds
    from q4c.calib.table import CalibrationTable
    from q4c.config import CompileOptions
    from q4c.quant.plan import Form, PrecisionPlan
    from q4c.quant.sensitivity import SensitivityTable
    from q4c.records import QuantizedTensor

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PassResult:
    modified: bool
    stats: Mapping[str, int] = field(default_factory=dict)


@dataclass
class PassRecord:
    """What the pipeline observed of one pass run (goes into the compile report)."""

    name: str
    modified: bool
    seconds: float
    stats: dict[str, int]


@dataclass
class PassContext:
    """State shared by the passes of one compile: options, analyses, and what was done.

    Analyses fill `calibration` and `plan`; transforms read them. `warnings` collects what made
    the result worse than asked (float fall-backs); `session_config` is what ONNX Runtime needs.
    """

    options: CompileOptions
    opset: int = g.TARGET_OPSET
    #: input samples (feed dicts) for analyses: --calib data, or synthetic from the signature
    samples: list[Feeds] = field(default_factory=list)
    #: the same calls grouped by sequence (a stateful model's consecutive calls; a stateless
    #: sample is a sequence of one), and the output -> input state pairs carried between them
    sequences: list[list[Feeds]] = field(default_factory=list)
    state_pairs: dict[str, str] = field(default_factory=dict)
    #: called by passes that loop over samples with (done, total or None): the CLI's progress bar
    sample_progress: Callable[[int, int | None], None] | None = None
    #: called by long analyses with (what, done, total): sensitivity tasks scored, plans the
    #: --require search measured (the CLI shows a bar labelled `what`)
    task_progress: Callable[[str, int, int], None] | None = None
    #: calibrate's activation ranges, read by insert-activation-qdq
    calibration: CalibrationTable | None = None
    #: measure-sensitivity's table, read by assign-precision
    sensitivity: SensitivityTable | None = None
    #: assign-precision's predicted damage-vs-bytes points (budgeted plans only)
    pareto: list[dict[str, Any]] = field(default_factory=list)
    plan: PrecisionPlan | None = None
    #: choose-kernels' timing of the two ONNX Runtime forms (--kernels auto), for the report
    kernel_choice: dict[str, Any] | None = None
    warnings: list[str] = field(default_factory=list)
    session_config: dict[str, str] = field(default_factory=dict)
    #: what quantize-weights / insert-activation-qdq stored, one record per weight
    quantized: list[QuantizedTensor] = field(default_factory=list)
    records: list[PassRecord] = field(default_factory=list)

    def require_calibration(self) -> CalibrationTable:
        if self.calibration is None:
            raise PreconditionError("no calibration table; run 'calibrate' first or pass --calib")
        return self.calibration

    def require_plan(self) -> PrecisionPlan:
        if self.plan is None:
            raise PreconditionError("no precision plan; run 'assign-precision' first or pass --plan")
        return self.plan

    def forms_by_codes(self) -> dict[str, Form]:
        """Codes initializer name -> the plan's form of that weight, for the quantized weights."""
        plan = self.plan
        if plan is None:
            return {}
        return {q.codes: plan.tensors[q.name].form for q in self.quantized
                if q.has_codes and q.name in plan.tensors and plan.tensors[q.name].form is not None}

    def require_forms(self, pass_name: str) -> None:
        """A lowering pass reads each quantized weight's form from the plan (choose-kernels writes them)."""
        plan = self.plan
        missing = [q.name for q in self.quantized
                   if plan is None or q.name not in plan.tensors or plan.tensors[q.name].form is None]
        if missing:
            raise PreconditionError(f"{pass_name}: the plan has no lowering form for {missing[0]}"
                                    f"{f' and {len(missing) - 1} more' if len(missing) > 1 else ''}; "
                                    f"run 'choose-kernels' after 'assign-precision'")

    def warn(self, message: str) -> None:
        if message not in self.warnings:
            self.warnings.append(message)
            logger.warning("%s", message)


class Artifact(enum.Enum):
    """What a pass leaves in the context for later passes (see Pass.provides / Pass.needs)."""

    CALIBRATION = "calibration"  # ctx.calibration: activation ranges
    PLAN = "plan"  # ctx.plan: bits, scheme, granularity per weight
    FORMS = "forms"  # the plan's lowering form per quantized weight
    INT8_ACTIVATIONS = "int8-activations"  # Q/DQ on activations, their weights int8 (before quantize-weights)
    QUANTIZED_WEIGHTS = "quantized-weights"  # ctx.quantized: the planned weights stored low-bit


class Pass(abc.ABC):
    """An in-place transformation (or analysis) of a graph-surgeon graph.

    `provides` and `needs(options)` declare what flows between passes through the context; the
    compiler completes a pipeline with the built-in providers of unmet needs
    (q4c.registry.complete_pipeline), so a pass runs once, where its inputs are ready."""

    name: ClassVar[str]
    provides: ClassVar[frozenset[Artifact]] = frozenset()
    #: an analysis fills the context (plan, tables) and never edits the graph: the audit holds it to that
    analysis: ClassVar[bool] = False

    def needs(self, options: CompileOptions) -> frozenset[Artifact]:
        """What must be in the context before this pass runs, with these options."""
        return frozenset()

    def requires(self, graph: gs.Graph, ctx: PassContext) -> None:  # noqa: B027 - optional hook
        """Raise PreconditionError if the pass cannot run on this graph/context."""

    @abc.abstractmethod
    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult: ...

    def ensures(self, graph: gs.Graph, ctx: PassContext) -> None:  # noqa: B027 - optional hook
        """Raise PostconditionError if the pass broke a promise."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class Repeat(Pass):
    """Run passes in turn until none modifies the graph (a fixed point), at most `max_iters` times."""

    def __init__(self, passes: Sequence[Pass], max_iters: int = 8) -> None:
        self.passes = list(passes)
        self.max_iters = max_iters
        self.name = "repeat(" + ",".join(p.name for p in self.passes) + ")"  # type: ignore[misc]

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        total: dict[str, int] = {}
        modified = False
        for _ in range(self.max_iters):
            changed = False
            for p in self.passes:
                result = run_one(p, graph, ctx)
                changed |= result.modified
                for k, v in result.stats.items():
                    total[f"{p.name}.{k}"] = total.get(f"{p.name}.{k}", 0) + v
            modified |= changed
            if not changed:
                return PassResult(modified, total)
        ctx.warn(f"{self.name} did not converge in {self.max_iters} iterations")
        return PassResult(modified, total)


def run_one(pass_: Pass, graph: gs.Graph, ctx: PassContext) -> PassResult:
    """requires -> run -> cleanup/toposort if modified -> ensures."""
    pass_.requires(graph, ctx)
    result = pass_.run(graph, ctx)
    if not isinstance(result, PassResult):
        raise PassError(f"pass '{pass_.name}' returned {type(result).__name__}, not PassResult")
    if result.modified:
        cleanup(graph)
    pass_.ensures(graph, ctx)
    return result


def cleanup(graph: gs.Graph) -> None:
    """Drop dead nodes/tensors and re-sort, in the graph and every subgraph."""
    for sub in list(g.iter_graphs(graph)):
        sub.cleanup(remove_unused_graph_inputs=False).toposort()


Instrument = Callable[[Pass, gs.Graph, PassContext, PassResult, int], None]


class Pipeline:
    """Runs passes in order with timing, optional dumps, per-pass checks and honesty audits.

    Any non-Q4cError exception inside a pass becomes PassError naming the pass and its
    predecessors, with the original traceback chained.
    """

    def __init__(
        self,
        passes: Iterable[Pass],
        *,
        dump_dir: Path | None = None,
        check_each: bool = False,
        audit: bool = False,
        like: onnx.ModelProto | None = None,
        progress: Callable[[str], None] | None = None,
        first_index: int = 1,
    ) -> None:
        self.passes = list(passes)
        self.first_index = first_index
        self.dump_dir = dump_dir
        self.check_each = check_each
        self.audit = audit
        self.like = like
        self.progress = progress

    def run(self, graph: gs.Graph, ctx: PassContext) -> list[PassRecord]:
        records: list[PassRecord] = []
        for index, pass_ in enumerate(self.passes, start=self.first_index):
            if self.progress is not None:
                self.progress(pass_.name)
            before = g.fingerprint(self._export(graph)) if self.audit else None
            start = time.perf_counter()
            try:
                result = run_one(pass_, graph, ctx)
            except Q4cError:
                raise
            except Exception as e:
                done = ", ".join(p.name for p in self.passes[: index - self.first_index]) or "none"
                raise PassError(f"pass '{pass_.name}' failed (passes before it: {done}): {e!r}") from e
            seconds = time.perf_counter() - start
            record = PassRecord(pass_.name, result.modified, seconds, dict(result.stats))
            records.append(record)
            ctx.records.append(record)
            logger.info("%s: %s%s (%.1f ms)", pass_.name, "modified" if result.modified else "unchanged",
                        "".join(f" {k}={v}" for k, v in sorted(result.stats.items())), seconds * 1e3)
            if self.audit or self.dump_dir is not None or self.check_each:
                model = self._export(graph)
                changed = self.audit and g.fingerprint(model) != before
                if self.audit and changed != result.modified:
                    raise PostconditionError(
                        f"pass '{pass_.name}' reported modified={result.modified} but the graph "
                        f"{'changed' if not result.modified else 'did not change'}"
                    )
                if changed and pass_.analysis:
                    raise PostconditionError(f"pass '{pass_.name}' is an analysis but edited the graph")
                if self.dump_dir is not None:
                    self.dump_dir.mkdir(parents=True, exist_ok=True)
                    g.save(model, self.dump_dir / f"{index:03d}_{pass_.name}.onnx")
                if self.check_each:
                    try:
                        g.check(model)
                    except onnx.checker.ValidationError as e:
                        raise PassError(f"pass '{pass_.name}' produced an invalid graph: {e}") from e
        return records

    def _export(self, graph: gs.Graph) -> onnx.ModelProto:
        return g.export_model(graph.copy(), like=self.like)
