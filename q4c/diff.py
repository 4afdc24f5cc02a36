"""Compare two models (typically FP32 and its q4c output) on the same inputs: per output, per
intermediate tensor in graph order, and per time step inside recurrent layers.

The result is a plain dict in the `q4c.diff/1` JSON schema (DESIGN.md "JSON documents"):

- `outputs` {name: {kind, sqnr_db, max_abs, mean_abs, cosine, [kl, argmax_agreement], [ctc]}}:
  `kind` is "prob" when every row along the last axis of the reference output sums to 1,
  "log_prob" when its exp does, else "other". Probability outputs also get the mean KL(ref || other)
  per row (nats) and the fraction of rows (frames) whose arg-max agrees. A rank-3 log-prob
  output of a model whose inputs are all float (an acoustic model, not a token LM) is read as
  CTC [batch, time, vocab] with blank 0: `ctc` compares greedy transcripts (arg-max per frame,
  repeats collapsed, blanks dropped).
- with `tensors=True`: `tensors` [{name, op, shape, sqnr_db, max_abs, mean_abs, cosine}] for every
  float node output present in both graphs, in the reference graph's (topological) node order,
  both graphs run by q4c's interpreter; `tensors_skipped` counts what could not be aligned;
  `first_error` is the first tensor that differs at all; `recurrent` {node: {op,
  per_step_max_abs, per_step_sqnr_db}} compares each LSTM/GRU/RNN hidden state per time step
  (interpreter probes `node::h`, [seq, dirs, batch, hidden]).

Metrics pool every sample (and every element): SQNR is 10 log10(sum ref^2 / sum (ref - other)^2),
inf when identical.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import onnx

from q4c.calib.readers import Feeds
from q4c.errors import ConfigError
from q4c.interp import Interpreter
from q4c.metrics import sqnr_db_from_energy
from q4c.signature import input_specs

SCHEMA = "q4c.diff/1"
#: a row sums to 1 within this (float32 softmax over a few thousand classes stays well inside)
_ROW_SUM_TOL = 1e-3
_RECURRENT_OPS = {"LSTM", "GRU", "RNN", "DynamicQuantizeLSTM"}
#: the probe compared per time step (q4c.interp module docstring)
_STEP_PROBE = "h"

Runner = Callable[[Feeds], dict[str, np.ndarray]]


class ErrorStats:
    """Error of `other` against `ref`, pooled over every `update` (samples of any shape)."""

    def __init__(self) -> None:
        self.power = self.noise = self.abs_sum = self.dot = self.ref_sq = self.other_sq = 0.0
        self.max_abs = 0.0
        self.count = 0

    def update(self, ref: np.ndarray, other: np.ndarray) -> None:
        """Non-finite values (a -inf attention mask) count as exact where both models agree on
        them; where only one is non-finite, the error is infinite."""
        r = np.asarray(ref, dtype=np.float64).reshape(-1)
        o = np.asarray(other, dtype=np.float64).reshape(-1)
        finite = np.isfinite(r) & np.isfinite(o)
        if not finite.all():
            agree = (r == o) | (np.isnan(r) & np.isnan(o))
            if not (agree | finite).all():
                self.noise = self.max_abs = math.inf
            r, o = r[finite], o[finite]
        err = np.abs(r - o)
        self.power += _dot(r, r)
        self.noise += _dot(err, err)
        self.abs_sum += float(err.sum())
        self.dot += _dot(r, o)
        self.ref_sq += _dot(r, r)
        self.other_sq += _dot(o, o)
        self.max_abs = max(self.max_abs, float(err.max()) if err.size else 0.0)
        self.count += r.size

    def metrics(self) -> dict[str, float]:
        return {"sqnr_db": sqnr_db_from_energy(self.power, self.noise), "max_abs": self.max_abs,
                "mean_abs": self.abs_sum / self.count if self.count else 0.0, "cosine": self._cosine()}

    def _cosine(self) -> float:
        if self.ref_sq == 0 or self.other_sq == 0:
            return 1.0 if self.ref_sq == self.other_sq else 0.0
        return round(min(1.0, self.dot / math.sqrt(self.ref_sq * self.other_sq)), 8)


def _dot(a: np.ndarray, b: np.ndarray) -> float:
    # einsum, not `a @ b`: a float64 BLAS dot is measured ~700x slower here (OpenBLAS thread start-up)
    return float(np.einsum("i,i->", a, b))


def diff_models(
    reference: onnx.ModelProto,
    other: onnx.ModelProto,
    samples: Sequence[Feeds],
    *,
    tensors: bool = False,
    run_reference: Runner | None = None,
    run_other: Runner | None = None,
) -> dict[str, Any]:
    """Compare `other` against `reference` on `samples` (validated feeds).

    Args:
        reference, other: the models; their graph inputs and outputs must have the same names.
        samples: feeds for both.
        tensors: also compare every intermediate tensor and recurrent layers per time step
            (both graphs run by the interpreter, keeping every node output).
        run_reference, run_other: how to compute the outputs (e.g. ONNX Runtime sessions);
            default the interpreter.

    Returns:
        A `q4c.diff/1` document (without `schema`-external fields such as paths).
    """
    _check_signatures(reference, other)
    if not samples:
        raise ConfigError("no samples to compare on")
    output_names = [o.name for o in reference.graph.output]
    acoustic = all(np.issubdtype(s.dtype, np.floating) for s in input_specs(reference))

    interp_ref, interp_other = _interpreters(reference, other, tensors or run_reference is None or run_other is None)
    keep = True if tensors else None

    out_stats = {name: ErrorStats() for name in output_names}
    out_refs: dict[str, list[np.ndarray]] = {name: [] for name in output_names}
    out_others: dict[str, list[np.ndarray]] = {name: [] for name in output_names}
    tensor_stats: dict[str, ErrorStats] = {}
    tensor_shapes: dict[str, list[int]] = {}
    step_stats: dict[str, _StepStats] = {}
    skipped = {"only_in_reference": 0, "only_in_other": 0, "shape_mismatch": 0, "not_float": 0}
    order, producers = _node_outputs(reference)

    for index, feeds in enumerate(samples):
        full_ref = full_other = None
        if interp_ref is not None and interp_other is not None:
            full_ref = interp_ref.run(feeds, keep=keep, probes=tensors)
            full_other = interp_other.run(feeds, keep=keep, probes=tensors)
        ref_out = full_ref if run_reference is None or run_other is None else run_reference(feeds)
        other_out = full_other if run_reference is None or run_other is None else run_other(feeds)
        assert ref_out is not None and other_out is not None
        for name in output_names:
            a, b = np.asarray(ref_out[name]), np.asarray(other_out[name])
            if a.shape != b.shape:
                raise ConfigError(f"output {name!r} has shape {list(b.shape)} in the second model, "
                                  f"{list(a.shape)} in the first; the models do not compute the same thing")
            out_stats[name].update(a, b)
            out_refs[name].append(a)
            out_others[name].append(b)
        if tensors:
            assert full_ref is not None and full_other is not None
            _update_tensors(order, full_ref, full_other, tensor_stats, tensor_shapes, skipped if index == 0 else None)
            _update_steps(reference, full_ref, full_other, step_stats)

    outputs = {name: _output_entry(out_stats[name], out_refs[name], out_others[name], acoustic)
               for name in output_names}
    doc: dict[str, Any] = {"schema": SCHEMA, "samples": len(samples), "outputs": outputs}
    if tensors:
        rows = [{"name": n, "op": producers[n], "shape": tensor_shapes[n], **tensor_stats[n].metrics()}
                for n in order if n in tensor_stats]
        doc["tensors"] = rows
        first = next((r for r in rows if r["max_abs"] > 0), None)
        doc["first_error"] = None if first is None else {k: first[k] for k in ("name", "op", "sqnr_db")}
        doc["tensors_skipped"] = {**skipped, "only_in_other": _only_in_other(other, set(order))}
        doc["recurrent"] = {node: s.summary() for node, s in step_stats.items()}
    return doc


def _output_entry(stats: ErrorStats, refs: list[np.ndarray], others: list[np.ndarray], acoustic: bool) -> dict[str, Any]:
    """One output's row: error statistics, and for probability-like outputs KL, argmax agreement
    and (log-probabilities over [T, B, V] of an acoustic model) greedy CTC agreement."""
    entry: dict[str, Any] = {"kind": _probability_kind(refs), **stats.metrics()}
    if entry["kind"] != "other":
        entry["kl"] = _kl(refs, others, entry["kind"])
        entry["argmax_agreement"] = _argmax_agreement(refs, others)
        if entry["kind"] == "log_prob" and acoustic and all(a.ndim == 3 for a in refs):
            entry["ctc"] = _ctc_agreement(refs, others)
    return entry


def _interpreters(reference: onnx.ModelProto, other: onnx.ModelProto, needed: bool
                  ) -> tuple[Interpreter, Interpreter] | tuple[None, None]:
    if not needed:
        return None, None
    # the interpreter trusts shapes; a graph that contradicts them is refused in one line
    from q4c.verify import refuse_inconsistent_model

    refuse_inconsistent_model(reference)
    refuse_inconsistent_model(other)
    return Interpreter(reference), Interpreter(other)


def below_tolerance(doc: Mapping[str, Any], tolerance_db: float) -> list[str]:
    """Output names whose SQNR is below `tolerance_db`."""
    return [name for name, m in doc["outputs"].items() if m["sqnr_db"] < tolerance_db]


# -- alignment ---------------------------------------------------------------------------------

def _check_signatures(reference: onnx.ModelProto, other: onnx.ModelProto) -> None:
    for what in ("input", "output"):
        a = _io_names(reference, what)
        b = _io_names(other, what)
        if a != b:
            raise ConfigError(f"the models' graph {what}s differ: {sorted(a)} vs {sorted(b)}; "
                              "diff compares a model with a compiled or edited copy of itself")


def _io_names(model: onnx.ModelProto, what: str) -> set[str]:
    if what == "output":
        return {o.name for o in model.graph.output}
    return {s.name for s in input_specs(model)}


def _node_outputs(model: onnx.ModelProto) -> tuple[list[str], dict[str, str]]:
    """Top-level node outputs in node order (ONNX requires graphs to be topologically sorted)."""
    order, producers = [], {}
    for node in model.graph.node:
        for name in node.output:
            if name and name not in producers:
                order.append(name)
                producers[name] = node.op_type
    return order, producers


def _only_in_other(other: onnx.ModelProto, reference_names: set[str]) -> int:
    return sum(1 for node in other.graph.node for name in node.output if name and name not in reference_names)


def _update_tensors(order: list[str], ref: Mapping[str, np.ndarray], other: Mapping[str, np.ndarray],
                    stats: dict[str, ErrorStats], shapes: dict[str, list[int]], skipped: dict[str, int] | None) -> None:
    """Pool the error of every float tensor both runs computed; count the rest in `skipped`."""
    skipped = Counter() if skipped is None else skipped
    for name in order:
        if name not in ref:  # not returned by the interpreter (e.g. an unused optional output)
            continue
        a = np.asarray(ref[name])
        if name not in other:
            skipped["only_in_reference"] += 1
            continue
        b = np.asarray(other[name])
        if not np.issubdtype(a.dtype, np.floating):
            skipped["not_float"] += 1
            continue
        if a.shape != b.shape:
            skipped["shape_mismatch"] += 1
            continue
        if name not in stats:
            stats[name] = ErrorStats()
            shapes[name] = list(a.shape)
        stats[name].update(a, b)


class _StepStats:
    """Error per time step pooled over samples (samples may differ in length)."""

    def __init__(self, op: str) -> None:
        self.op = op
        self.power: list[float] = []
        self.noise: list[float] = []
        self.max_abs: list[float] = []

    def update(self, ref: np.ndarray, other: np.ndarray) -> None:
        r = ref.astype(np.float64).reshape(ref.shape[0], -1)
        err = r - other.astype(np.float64).reshape(other.shape[0], -1)
        for t in range(r.shape[0]):
            if t == len(self.power):
                self.power.append(0.0), self.noise.append(0.0), self.max_abs.append(0.0)
            self.power[t] += _dot(r[t], r[t])
            self.noise[t] += _dot(err[t], err[t])
            self.max_abs[t] = max(self.max_abs[t], float(np.abs(err[t]).max()) if err[t].size else 0.0)

    def summary(self) -> dict[str, Any]:
        return {"op": self.op, "per_step_max_abs": self.max_abs,
                "per_step_sqnr_db": [sqnr_db_from_energy(p, n) for p, n in zip(self.power, self.noise)]}


def _update_steps(reference: onnx.ModelProto, ref: Mapping[str, np.ndarray], other: Mapping[str, np.ndarray],
                  stats: dict[str, _StepStats]) -> None:
    for index, node in enumerate(reference.graph.node):
        if node.op_type not in _RECURRENT_OPS:
            continue
        name = node.name or f"{node.op_type}_{index}"
        key = f"{name}::{_STEP_PROBE}"
        if key not in ref or key not in other or ref[key].shape != other[key].shape:
            continue
        stats.setdefault(name, _StepStats(node.op_type)).update(ref[key], other[key])


# -- output kinds and task-level metrics --------------------------------------------------------

def _probability_kind(refs: list[np.ndarray]) -> str:
    if not refs or not all(np.issubdtype(a.dtype, np.floating) and a.ndim >= 1 and a.shape[-1] > 1 for a in refs):
        return "other"
    if all(np.all(a >= 0) and np.allclose(a.sum(-1, dtype=np.float64), 1.0, atol=_ROW_SUM_TOL) for a in refs):
        return "prob"
    if all(np.all(a <= 1e-6) and np.allclose(np.exp(a.astype(np.float64)).sum(-1), 1.0, atol=_ROW_SUM_TOL) for a in refs):
        return "log_prob"
    return "other"


def _log_normalized(x: np.ndarray, kind: str) -> np.ndarray:
    """Log-probabilities along the last axis, renormalized (a quantized output may drift off 1)."""
    x = x.astype(np.float64)
    if kind == "prob":
        x = np.log(np.clip(x, 1e-12, None))
    m = x.max(-1, keepdims=True)
    return x - (m + np.log(np.exp(x - m).sum(-1, keepdims=True)))


def _kl(refs: list[np.ndarray], others: list[np.ndarray], kind: str) -> float:
    """Mean over rows of KL(ref || other), nats."""
    total, rows = 0.0, 0
    for a, b in zip(refs, others):
        log_p, log_q = _log_normalized(a, kind), _log_normalized(b, kind)
        kl = (np.exp(log_p) * (log_p - log_q)).sum(-1)
        total += float(kl.sum())
        rows += kl.size
    return max(0.0, total / rows) if rows else 0.0


def _argmax_agreement(refs: list[np.ndarray], others: list[np.ndarray]) -> float:
    same = sum(int(np.sum(a.argmax(-1) == b.argmax(-1))) for a, b in zip(refs, others))
    rows = sum(a[..., 0].size for a in refs)
    return same / rows if rows else 1.0


def greedy_ctc(log_probs: np.ndarray, blank: int = 0) -> list[int]:
    """Greedy CTC decoding of one [time, vocab] matrix: arg-max, collapse repeats, drop blanks."""
    best = log_probs.argmax(-1)
    keep = np.ones(best.shape, bool)
    keep[1:] = best[1:] != best[:-1]
    return [int(t) for t in best[keep] if t != blank]


def edit_distance(a: Sequence[int], b: Sequence[int]) -> int:
    """Levenshtein distance between token sequences."""
    prev = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        cur = [i]
        for j, y in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (x != y)))
        prev = cur
    return prev[-1]


def _ctc_agreement(refs: list[np.ndarray], others: list[np.ndarray]) -> dict[str, Any]:
    """Greedy transcripts of the reference vs the other model, per batch entry of every sample.

    `token_error_rate` = total edit distance / total reference tokens (the reference transcript
    plays the role of the label, as in a WER computed against the FP32 model's output).
    """
    sequences = matches = edits = ref_tokens = 0
    for a, b in zip(refs, others):
        for ra, rb in zip(a, b):  # batch entries: [time, vocab]
            ta, tb = greedy_ctc(ra), greedy_ctc(rb)
            sequences += 1
            matches += ta == tb
            edits += edit_distance(ta, tb)
            ref_tokens += len(ta)
    return {"sequences": sequences, "transcript_match": matches / sequences if sequences else 1.0,
            "token_error_rate": edits / max(ref_tokens, 1), "reference_tokens": ref_tokens}


__all__ = ["SCHEMA", "ErrorStats", "diff_models", "below_tolerance", "greedy_ctc", "edit_distance"]
