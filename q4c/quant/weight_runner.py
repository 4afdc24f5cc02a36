"""An ONNX Runtime session in which weight tensors are graph inputs: one session scores every
tensor and every candidate (sensitivity), and measures whole plans; plus the divergences and the
Hutchinson trace estimator built on it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
from onnx import helper

from q4c import external_data
from q4c import graph as g
from q4c import ort as q4ort
from q4c.objectives import Objective, Scorer, detect_objectives

Feeds = dict[str, np.ndarray]


def _log_softmax(x: np.ndarray) -> np.ndarray:
    m = np.max(x, axis=-1, keepdims=True)
    return x - m - np.log(np.sum(np.exp(x - m), axis=-1, keepdims=True))


def output_kind(y: np.ndarray) -> str:
    """'logprob' if rows are log-probabilities, 'prob' if probabilities, else 'real' (a value
    heuristic the benchmarks use; sensitivity itself reads the graph: q4c.objectives)."""
    if not np.issubdtype(y.dtype, np.floating) or y.ndim == 0 or y.shape[-1] < 2:
        return "real"
    if np.all(y <= 1e-4) and np.allclose(np.sum(np.exp(y.astype(np.float64)), axis=-1), 1.0, atol=1e-3):
        return "logprob"
    if np.all(y >= 0) and np.allclose(np.sum(y, axis=-1, dtype=np.float64), 1.0, atol=1e-3):
        return "prob"
    return "real"


def divergence(reference: np.ndarray, perturbed: np.ndarray, kind: str) -> float:
    """Mean KL(reference || perturbed) per row for distributions; otherwise the MSE normalized by
    the reference's variance (kept for the benchmarks; sensitivity scores use q4c.objectives)."""
    ref = reference.astype(np.float64)
    out = perturbed.astype(np.float64)
    if kind == "logprob":
        p_log, q_log = ref, _log_softmax(out)
    elif kind == "prob":
        p_log, q_log = np.log(np.clip(ref, 1e-30, None)), np.log(np.clip(out, 1e-30, None))
    else:
        return float(np.mean(np.square(out - ref)) / (np.var(ref) + 1e-12))
    kl = np.sum(np.exp(p_log) * (p_log - q_log), axis=-1)
    return float(np.mean(kl))


@dataclass
class WeightInputRunner:
    """An ORT session over `model` with `weights` turned into graph inputs.

    The samples are scored in *units*: `sequences` (lists of consecutive calls of a stateful
    model, each call's feeds holding the FP32 state the previous call produced), or, without
    them, each of `samples` on its own. Closed loop (`closed_loop`, with `state_pairs` output ->
    input), every call after a unit's first is fed the state the *same* weights produced on the
    call before, as in deployment; open loop, each call gets the FP32 state stored in its feeds.
    The FP32 reference is the same run with no weight changed.

    `divergence(changes, limit)` runs the first `limit` units (all by default) with the given
    weights replaced (all others FP32) and returns the damage of the task outputs (the sum over
    outputs of their objectives, q4c.objectives) against the FP32 outputs, over every call.
    Whole plans (`score(..., closed=plans_closed_loop)`) are measured closed loop whenever there
    is a loop to close, also when candidates are scored open loop.
    """

    model: onnx.ModelProto
    weights: Mapping[str, np.ndarray]
    samples: Sequence[Feeds]
    sequences: Sequence[Sequence[Feeds]] | None = None
    state_pairs: Mapping[str, str] = field(default_factory=dict)
    closed_loop: bool = False
    objectives: Mapping[str, Objective] | None = None
    #: at most this many calls of a unit are run (a long recording is cut, not skipped)
    max_calls: int | None = None
    runs: int = 0
    seconds: float = 0.0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _reference_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def __post_init__(self) -> None:
        self._session = q4ort.make_session(_weights_as_inputs(self.model, self.weights), threads=1)
        units = self.sequences if self.sequences is not None else [[s] for s in self.samples]
        self.units = [list(u)[: self.max_calls] for u in units if u]
        if not self.state_pairs:
            self.closed_loop = False
        if self.objectives is None:
            self.objectives = detect_objectives(self.model, self.state_pairs)
        #: whole plans are measured closed loop whenever there is a loop to close, even when
        #: candidates are scored open loop: that is what the user's deployment does
        self.plans_closed_loop = bool(self.state_pairs) and any(len(u) > 1 for u in self.units)
        self._references: dict[bool, list[list[dict[str, np.ndarray]]]] = {}

    def spec(self) -> dict[str, Any]:
        """The constructor arguments: another process builds the same runner from them (the
        session is not picklable; the Ray workers of q4c.distributed each open their own). The
        model goes with its measured weights already turned into inputs: they travel once, as
        `weights`, not a second time inside the model."""
        return {"model": _weights_as_inputs(self.model, self.weights), "weights": dict(self.weights),
                "samples": list(self.samples),
                "sequences": None if self.sequences is None else [list(u) for u in self.sequences],
                "state_pairs": dict(self.state_pairs), "closed_loop": self.closed_loop,
                "objectives": dict(self.objectives or {}), "max_calls": self.max_calls}

    def _reference(self, closed: bool) -> list[list[dict[str, np.ndarray]]]:
        # Computed once: threads asking at the same time wait for the first (else each would run
        # the FP32 reference again, and the forward-run count would depend on scheduling).
        with self._reference_lock:
            if closed not in self._references:
                self._references[closed] = [self._run_unit(u, {}, closed) for u in self.units]
            return self._references[closed]

    @property
    def kinds(self) -> dict[str, str]:
        return {n: o.kind for n, o in (self.objectives or {}).items()}

    def _run_unit(self, unit: Sequence[Feeds], changes: Mapping[str, np.ndarray],
                  closed: bool) -> list[dict[str, np.ndarray]]:
        start = time.perf_counter()
        outputs: list[dict[str, np.ndarray]] = []
        state: dict[str, np.ndarray] = {}
        for call in unit:
            feeds = {**call, **state, **self.weights, **changes}
            out = q4ort.run(self._session, feeds)  # ORT sessions take concurrent runs
            if closed:
                state = {inp: out[o] for o, inp in self.state_pairs.items()}
            outputs.append(out)
        with self._lock:
            self.runs += len(unit)
            self.seconds += time.perf_counter() - start
        return outputs

    def score(self, changes: Mapping[str, np.ndarray], limit: int | None = None, keep: bool = False,
              which: slice | None = None, closed: bool | None = None) -> Scorer:
        """The per-output tallies of one run with `changes` of the first `limit` units (or of
        the units `which` selects), closed loop if `closed` (default: as scoring is)."""
        assert self.objectives is not None
        closed = self.closed_loop if closed is None else closed and bool(self.state_pairs)
        scorer = Scorer(self.objectives, keep=keep)
        which = which if which is not None else slice(0, limit)
        for unit, reference in zip(self.units[which], self._reference(closed)[which], strict=True):
            for ref, out in zip(reference, self._run_unit(unit, changes, closed), strict=True):
                scorer.add(ref, out)
        return scorer

    def divergence(self, changes: Mapping[str, np.ndarray], limit: int | None = None,
                   which: slice | None = None) -> float:
        return self.score(changes, limit, which=which).damage()

    def describe(self) -> dict[str, Any]:
        calls = sum(len(u) for u in self.units)
        return {"scoring": "closed-loop" if self.closed_loop else "open-loop", "units": len(self.units),
                "calls": calls, "sequences": self.sequences is not None,
                "plans_measured": "closed-loop" if self.plans_closed_loop else "open-loop"}


def _weights_as_inputs(model: onnx.ModelProto, weights: Mapping[str, np.ndarray]) -> onnx.ModelProto:
    """A copy of `model` whose initializers named in `weights` are main-graph inputs instead (those
    that are main-graph inputs already stay as they are). A weight that lives in a subgraph (an If
    branch, a Loop body) moves out too: the main graph's inputs are visible in subgraphs, so its
    outer-scope references keep working."""
    # the weights leave as placeholders (q4c.external_data): not copied only to be dropped
    copy = external_data.skeleton(model, keep=lambda t: t.name not in weights)
    found: dict[str, onnx.TensorProto] = {}
    for graph in g.iter_graph_protos(copy.graph):
        if not any(t.name in weights for t in graph.initializer):
            continue
        kept = [t for t in graph.initializer if t.name not in weights]
        found.update({t.name: t for t in graph.initializer if t.name in weights})
        del graph.initializer[:]
        graph.initializer.extend(kept)
    missing = set(weights) - set(found) - {i.name for i in copy.graph.input}  # inputs already (a runner's spec)
    if missing:
        raise ValueError(f"not initializers: {sorted(missing)}")
    for name, tensor in found.items():
        copy.graph.input.append(helper.make_tensor_value_info(name, tensor.data_type, list(tensor.dims)))
    return copy


def movable_weights(model: onnx.ModelProto) -> set[str]:
    """Initializers `_weights_as_inputs` can turn into inputs: those of the main graph, and those
    of subgraphs whose name means one tensor in the whole model (every definition of it is an
    initializer with the same contents, as when both branches of an If hold the same weight)."""
    tensors: dict[str, list[bytes]] = {}
    others: set[str] = set()
    for graph in g.iter_graph_protos(model.graph):
        for t in graph.initializer:
            tensors.setdefault(t.name, []).append(t.SerializeToString())
        others.update(o for n in graph.node for o in n.output)
        others.update(i.name for i in graph.input)
    main = {t.name for t in model.graph.initializer}
    return {n for n, defs in tensors.items() if n in main or (n not in others and len(set(defs)) == 1)}


def hutchinson_trace(
    loss: Callable[[np.ndarray], float],
    w: np.ndarray,
    rng: np.random.Generator,
    *,
    step: float,
    min_probes: int = 2,
    max_probes: int = 8,
    rtol: float = 0.1,
) -> tuple[float, float, int]:
    """Estimate tr(H) of `loss` at `w`, where loss(w) = 0 and grad = 0 (a divergence from the
    FP32 output is minimal there), from forward evaluations only.

    For a Rademacher direction v (entries +-1), the second central difference
    (loss(w + e v) + loss(w - e v) - 2 loss(w)) / e^2 = v^T H v + O(e^2), and E[v^T H v] = tr(H)
    (Hutchinson). Probes stop once the standard error of the mean is within `rtol` of it.
    Returns (trace estimate, its standard error, probes used).
    """
    estimates: list[float] = []
    for _ in range(max_probes):
        v = rng.choice(np.array([-1.0, 1.0], np.float32), size=w.shape)
        plus = loss((w + step * v).astype(w.dtype))
        minus = loss((w - step * v).astype(w.dtype))
        estimates.append((plus + minus) / step**2)  # loss(w) = 0
        if len(estimates) >= min_probes:
            mean = float(np.mean(estimates))
            sem = float(np.std(estimates, ddof=1) / np.sqrt(len(estimates)))
            if mean > 0 and sem <= rtol * mean:
                break
    mean = float(np.mean(estimates))
    sem = float(np.std(estimates, ddof=1) / np.sqrt(len(estimates))) if len(estimates) > 1 else float("inf")
    return mean, sem, len(estimates)
