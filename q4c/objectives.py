"""What "damage" means for each model output: the objective sensitivity scores minimise.

Chosen from the graph (`detect_objectives`), overridable per output (`--objective OUT=KIND`):

- ``kl``: the output is a distribution (a Softmax or LogSoftmax, possibly behind Reshape /
  Squeeze / Identity / ...): mean KL(P_fp32 || P_quant) over its rows, in nats. An overridden
  output that is neither is taken as logits (log_softmax along the last axis first).
- ``bce``: the output is a probability per element (a Sigmoid, or a mean of them): mean
  Bernoulli KL (`q4c.metrics.bernoulli_kl`), in nats; decision flips at 0.5 are reported beside.
- ``snr``: any other float output: relative noise power 10^(-SNR/10) = |ref - out|^2 / |ref|^2,
  pooled over every call scored, halved: that is the KL in nats between two Gaussians centred on
  the FP32 and quantized values whose variance is the FP32 output's power, so it adds to the
  other objectives in the same unit (SNR 20 dB -> 0.005).
- ``ignore``: not part of the objective. State outputs (they feed an input on the next call) are
  ignored by default: their error shows in the task outputs of later calls (closed loop).

The overall damage is the plain sum over the task outputs: all objectives are in nats.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx

from q4c.metrics import bernoulli_kl, decision_flips, kl_divergence, log_softmax, sqnr_db, sqnr_db_from_energy

OBJECTIVES = ("kl", "bce", "snr", "ignore")

#: Ops whose output values are values (or means) of their first input's: a probability stays
#: one through them, a distribution along its axis through the shape-only ones.
_PASS_THROUGH = frozenset({"Identity", "Reshape", "Squeeze", "Unsqueeze", "Flatten", "Transpose", "Cast",
                           "Slice", "Gather", "Expand", "Tile", "ReduceMean", "ReduceMax", "ReduceMin",
                           "Dropout"})
#: Of those, the ones that keep every axis where it was (a Softmax axis still means the same).
_AXIS_KEEPING = frozenset({"Identity", "Cast", "Dropout"})


@dataclass(frozen=True)
class Objective:
    """How one output is scored. `form` says what its values are: "prob" or "logprob"
    (distribution / probability), "logits"; `axis` is the class axis for kl."""

    output: str
    kind: str
    reason: str
    form: str = "real"
    axis: int = -1

    def to_json(self) -> dict[str, Any]:
        return {"objective": self.kind, "reason": self.reason}


def detect_objectives(model: onnx.ModelProto, state_outputs: Iterable[str] = (),
                      overrides: Mapping[str, str] | None = None) -> dict[str, Objective]:
    """One Objective per graph output (see the module docstring); `overrides` (output -> kind)
    win. Raises KeyError naming the outputs when an override names none of them."""
    overrides = dict(overrides or {})
    outputs = [o.name for o in model.graph.output]
    unknown = sorted(set(overrides) - set(outputs))
    if unknown:
        raise KeyError(f"--objective names {', '.join(unknown)}, not an output of the model "
                       f"(outputs: {', '.join(outputs)})")
    state = set(state_outputs)
    floats = {o.name for o in model.graph.output
              if o.type.tensor_type.elem_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16,
                                                  onnx.TensorProto.DOUBLE, onnx.TensorProto.BFLOAT16)}
    producers = _producers(model.graph)
    found: dict[str, Objective] = {}
    for name in outputs:
        source = _source(name, producers)
        form, axis = "real", -1
        if source is not None:
            op, axis = source
            form = {"Sigmoid": "prob", "Softmax": "prob", "LogSoftmax": "logprob"}[op]
        if name in state:
            found[name] = Objective(name, "ignore", "state: feeds an input on the next call", form, axis)
        elif name not in floats:
            found[name] = Objective(name, "ignore", "not a float output", form, axis)
        elif source is not None and source[0] == "Sigmoid":
            found[name] = Objective(name, "bce", "Sigmoid probability", "prob", axis)
        elif source is not None:
            found[name] = Objective(name, "kl", f"{source[0]} distribution", form, axis)
        else:
            found[name] = Objective(name, "snr", "float output", form, axis)
        if name in overrides:
            kind = overrides[name]
            form = found[name].form
            if kind == "kl" and form == "real":
                form = "logits"
            found[name] = Objective(name, kind, "--objective", form, found[name].axis)
    return found


def _producers(graph: onnx.GraphProto) -> dict[str, onnx.NodeProto]:
    return {o: n for n in graph.node for o in n.output if o}


def _source(name: str, producers: Mapping[str, onnx.NodeProto], depth: int = 0) -> tuple[str, int] | None:
    """(op, class axis) when `name` is a Sigmoid / Softmax / LogSoftmax output, traced back
    through value-keeping ops and into every branch of an If (all must agree); else None."""
    axis_kept = True
    for _ in range(64):
        node = producers.get(name)
        if node is None:
            return None
        if node.op_type in ("Sigmoid", "Softmax", "LogSoftmax"):
            attr = next((a.i for a in node.attribute if a.name == "axis"), -1)
            return node.op_type, (attr if axis_kept else -1)
        if node.op_type == "If" and depth < 4:
            index = list(node.output).index(name)
            found = set()
            for attr in node.attribute:
                if attr.name in ("then_branch", "else_branch"):
                    branch = attr.g
                    inner = {**producers, **_producers(branch)}
                    found.add(_source(branch.output[index].name, inner, depth + 1))
            if len(found) != 1:
                return None
            result = found.pop()
            return None if result is None else (result[0], result[1] if axis_kept else -1)
        if node.op_type not in _PASS_THROUGH or not node.input:
            return None
        axis_kept = axis_kept and node.op_type in _AXIS_KEEPING
        name = node.input[0]
    return None


@dataclass
class Tally:
    """Accumulates one output's damage over calls: mean per call for kl / bce, pooled noise and
    power for snr; keeps bce probabilities for decision flips."""

    objective: Objective
    total: float = 0.0
    calls: int = 0
    noise: float = 0.0
    power: float = 0.0
    refs: list[np.ndarray] = field(default_factory=list)
    outs: list[np.ndarray] = field(default_factory=list)
    keep: bool = False

    def add(self, reference: np.ndarray, actual: np.ndarray) -> None:
        kind, form = self.objective.kind, self.objective.form
        ref = np.asarray(reference, dtype=np.float64)
        act = np.asarray(actual, dtype=np.float64)
        self.calls += 1
        if kind == "kl":
            if form == "logprob":
                self.total += kl_divergence(ref, log_softmax(act, self.objective.axis), self.objective.axis)
            elif form == "prob":
                axis = self.objective.axis
                self.total += kl_divergence(np.log(np.clip(ref, 1e-30, None)),
                                            np.log(np.clip(act, 1e-30, None)), axis)
            else:
                self.total += kl_divergence(log_softmax(ref), log_softmax(act))
        elif kind == "bce":
            if form != "prob":
                ref, act = 1 / (1 + np.exp(-ref)), 1 / (1 + np.exp(-act))
            self.total += bernoulli_kl(ref, act)
            if self.keep:
                self.refs.append(ref.ravel())
                self.outs.append(act.ravel())
        elif kind == "snr":
            self.noise += float(np.sum(np.square(ref - act)))
            self.power += float(np.sum(np.square(ref)))
            if self.keep:
                self.refs.append(ref.ravel())
                self.outs.append(act.ravel())

    def damage(self) -> float:
        if self.objective.kind == "snr":
            if self.noise == 0:
                return 0.0
            return 0.5 * self.noise / max(self.power, 1e-30)
        return self.total / self.calls if self.calls else 0.0

    def metrics(self) -> dict[str, Any]:
        """The damage and the figures a user reads: flips (bce), SQNR (snr, bce)."""
        out: dict[str, Any] = {"objective": self.objective.kind, "damage": self.damage()}
        if self.refs:
            ref, act = np.concatenate(self.refs), np.concatenate(self.outs)
            if self.objective.kind == "bce":
                out["flips"] = decision_flips(ref, act)
                out["values"] = int(ref.size)
            out["sqnr_db"] = sqnr_db(ref, act)
        elif self.objective.kind == "snr":
            out["sqnr_db"] = sqnr_db_from_energy(self.power, self.noise)
        return out


class Scorer:
    """Damage of quantized outputs against FP32 ones over many calls, per task output."""

    def __init__(self, objectives: Mapping[str, Objective], keep: bool = False) -> None:
        self.tallies = {n: Tally(o, keep=keep) for n, o in objectives.items() if o.kind != "ignore"}

    def add(self, reference: Mapping[str, np.ndarray], actual: Mapping[str, np.ndarray]) -> None:
        for name, tally in self.tallies.items():
            tally.add(reference[name], actual[name])

    def damage(self) -> float:
        return float(sum(t.damage() for t in self.tallies.values()))

    def metrics(self) -> dict[str, dict[str, Any]]:
        return {n: t.metrics() for n, t in self.tallies.items()}


def parse_objective(text: str) -> tuple[str, str]:
    """'OUTPUT=kind' -> (OUTPUT, kind); ValueError with the reason otherwise."""
    name, sep, kind = text.rpartition("=")
    kind = kind.strip().lower()
    if not sep or not name:
        raise ValueError(f"expected OUTPUT=KIND (KIND one of {', '.join(OBJECTIVES)}), not {text!r}")
    if kind not in OBJECTIVES:
        raise ValueError(f"objective of {name!r} must be one of {', '.join(OBJECTIVES)}, not {kind!r}")
    return name, kind


def group_sequences(model: onnx.ModelProto, samples: Any, calls: list[dict[str, np.ndarray]]
                    ) -> tuple[dict[str, str], list[list[dict[str, np.ndarray]]]]:
    """(state pairs, `calls` grouped by the sample they came from), where `calls` is what
    `q4c.calib.runner.materialize` made of `samples` (one feed dict per call, in order)."""
    from q4c.calib.readers import SamplesReader, as_sequence, source_of
    from q4c.calib.runner import resolve_state_pairs
    from q4c.signature import input_specs

    pairs = resolve_state_pairs(model, samples, None)
    specs = input_specs(model)
    reader = samples if hasattr(samples, "state_pairs") else SamplesReader(samples)
    groups: list[list[dict[str, np.ndarray]]] = []
    start = 0
    for index, sample in enumerate(reader):
        n = len(as_sequence(sample, specs, pairs, source_of(sample, f"sample {index}")))
        groups.append(calls[start:start + n])
        start += n
    if start != len(calls):  # not the samples materialize saw: one call per sequence, no loop
        return pairs, [[c] for c in calls]
    return pairs, groups
