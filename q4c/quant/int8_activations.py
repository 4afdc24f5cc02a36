"""Which MatMul/Gemm/Conv activations `--activations int8` quantizes, from the graph's structure and
the calibration table: the decision choose-kernels writes into the plan (form int8-activations)
and insert-activation-qdq materialises."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable

import onnx_graphsurgeon as gs

from q4c import graph as g
from q4c.calib.table import CalibrationTable
from q4c.quant.plan import PrecisionPlan
from q4c.quant.weights import WeightSlot, find_weight_slots

#: ops a value passes through unchanged in meaning (layout, selection, concatenation)
PASS_THROUGH = frozenset({"Identity", "Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten", "Concat", "Slice",
                           "Split", "Gather", "Cast", "Expand", "Tile"})
#: between a projection and its gate nonlinearities in a decomposed LSTM/GRU cell
GATE_PATH = PASS_THROUGH | {"Add", "Sub", "Mul"}
RNN_OPS = frozenset({"LSTM", "GRU", "RNN", "Scan", "Loop"})
FRONT_END = frozenset({"STFT", "DFT", "MelWeightMatrix"})
COMPUTE = frozenset({"MatMul", "Gemm", "Conv", "ConvTranspose", "MatMulInteger", "QLinearMatMul", "QLinearConv"})
#: where quantized activations are known to hurt: a Conv/Gemm output feeding these keeps float
KEEP_FLOAT_INPUTS = frozenset({"Softmax", "LogSoftmax", "LayerNormalization", "BatchNormalization",
                                "InstanceNormalization", "GroupNormalization", "RMSNormalization",
                                "SimplifiedLayerNormalization", "SkipLayerNormalization", "ReduceMean"})
SEARCH_DEPTH = 6

REASONS = {
    "weight": "op(s) whose weight the plan keeps float",
    "recurrent": "op(s) fed recurrent state",
    "cell": "LSTM/GRU cell projection(s)",
    "front_end": "op(s) on an STFT/DFT front end",
    "output_to_norm": "Conv/Gemm whose output feeds Softmax/normalization",
    "uncalibrated": "op(s) with an uncalibrated or constant input",
    "subgraph": "op(s) inside Scan/Loop/If bodies",
    "activation_matmul": "MatMul(s) of two activations (attention)",
    "recurrent_op": "LSTM/GRU/RNN/Scan/Loop op(s) with their gates and state",
    "layout": "op(s) in a layout ONNX Runtime does not fuse",
    "plan": "op(s) whose plan form is not int8-activations",
}


class Analysis:
    """Why an op's activation should stay float, from the graph's structure."""

    def __init__(self, graph: gs.Graph, table: CalibrationTable) -> None:
        self.graph = graph
        self.table = table
        self.state_inputs = {name for name, s in table.tensors.items() if s.state} | set(table.state_pairs.values())

    def keep_float(self, slot: WeightSlot) -> str | None:
        node = slot.node
        if node.op == "Gemm" and (int(node.attrs.get("transA", 0)) or float(node.attrs.get("alpha", 1.0)) != 1.0):
            return "kept_float_layout"
        if node.op == "Conv" and len(node.inputs[1].shape) not in (3, 4):
            return "kept_float_layout"
        x = node.inputs[0]
        if x.name not in self.table or isinstance(x, gs.Constant):
            return "kept_float_uncalibrated"
        if self._recurrent(x):
            return "kept_float_recurrent"
        if self._feeds_gates(node.outputs[0]):
            return "kept_float_cell"
        if self._front_end(x):
            return "kept_float_front_end"
        if node.op in ("Conv", "Gemm"):
            y = node.outputs[0]
            if y.name not in self.table:
                return "kept_float_uncalibrated"
            if any(c.op in KEEP_FLOAT_INPUTS for c in _through(y, PASS_THROUGH)):
                return "kept_float_output_to_norm"
        return None

    def _recurrent(self, tensor: gs.Tensor) -> bool:
        """Reached backwards through layout ops: a state input, an RNN state output, or the
        hidden state h = o * tanh(c) of a decomposed LSTM cell."""
        for t in _back(tensor, PASS_THROUGH):
            if t.name in self.state_inputs:
                return True
            prod = g.producer(t)
            if prod is None:
                continue
            if prod.op in RNN_OPS and any(o is t for o in prod.outputs[1:]):
                return True
            if prod.op == "Mul" and {_op(i) for i in prod.inputs} == {"Sigmoid", "Tanh"}:
                return True
        return False

    @staticmethod
    def _feeds_gates(out: gs.Tensor) -> bool:
        """A projection whose output reaches both Sigmoid and Tanh through adds and splits: the
        gate pre-activations of a decomposed LSTM/GRU cell."""
        reached = {c.op for c in _through(out, GATE_PATH)}
        return "Sigmoid" in reached and "Tanh" in reached

    @staticmethod
    def _front_end(tensor: gs.Tensor) -> bool:
        """Computed from STFT/DFT without a MatMul/Conv in between."""
        seen: set[str] = set()
        stack = [tensor]
        while stack:
            t = stack.pop()
            if t.name in seen:
                continue
            seen.add(t.name)
            prod = g.producer(t)
            if prod is None:
                continue
            if prod.op in FRONT_END:
                return True
            if prod.op in COMPUTE:
                continue
            stack.extend(i for i in prod.inputs if not isinstance(i, gs.Constant))
        return False

    def activation_matmuls(self) -> int:
        return sum(1 for n in self.graph.nodes if n.op == "MatMul"
                   and not any(isinstance(i, gs.Constant) for i in n.inputs)
                   and not any(_op(i) == "DequantizeLinear" for i in n.inputs))


def _op(tensor: gs.Tensor) -> str | None:
    prod = g.producer(tensor)
    return prod.op if prod is not None else None


def _back(tensor: gs.Tensor, through: frozenset[str]) -> Iterable[gs.Tensor]:
    """`tensor` and the tensors it is computed from through `through` ops (data inputs only)."""
    seen: set[str] = set()
    stack = [(tensor, 0)]
    while stack:
        t, depth = stack.pop()
        if t.name in seen or isinstance(t, gs.Constant):
            continue
        seen.add(t.name)
        yield t
        prod = g.producer(t)
        if prod is not None and prod.op in through and depth < SEARCH_DEPTH:
            data = prod.inputs[:1] if prod.op in ("Reshape", "Slice", "Gather", "Expand", "Tile") else prod.inputs
            stack.extend((i, depth + 1) for i in data)


def _through(tensor: gs.Tensor, through: frozenset[str]) -> Iterable[gs.Node]:
    """Consumers of `tensor`, following `through` ops forward a few levels."""
    seen: set[str] = set()
    stack = [(tensor, 0)]
    while stack:
        t, depth = stack.pop()
        if t.name in seen:
            continue
        seen.add(t.name)
        for consumer in g.consumers(t):
            yield consumer
            if consumer.op in through and depth < SEARCH_DEPTH:
                stack.extend((o, depth + 1) for o in consumer.outputs)


def int8_slots(graph: gs.Graph, table: CalibrationTable, plan: PrecisionPlan) -> tuple[list[WeightSlot], dict[str, int]]:
    """The main-graph MatMul/Gemm/Conv weight slots whose activation gets uint8 Q/DQ (planned
    quantized, calibrated, not recurrent state, cell gates, front ends or feeding a normalization),
    and the count of ops kept float by reason (stats keys kept_float_*)."""
    analysis = Analysis(graph, table)
    stats: dict[str, int] = defaultdict(int)
    chosen: list[WeightSlot] = []
    for slot in find_weight_slots(graph):
        if not isinstance(slot, WeightSlot) or slot.role not in ("matmul_b", "gemm_b", "conv"):
            continue
        if slot.graph is not graph:
            stats["kept_float_subgraph"] += 1
            continue
        precision = plan.tensors.get(slot.tensor.name)
        reason = "kept_float_weight" if precision is None or not precision.quantized else analysis.keep_float(slot)
        if reason is not None:
            stats[reason] += 1
            continue
        chosen.append(slot)
    stats["kept_float_activation_matmul"] = analysis.activation_matmuls()
    stats["kept_float_recurrent_op"] = sum(1 for sub in g.iter_graphs(graph) for n in sub.nodes if n.op in RNN_OPS)
    return chosen, dict(stats)


def kept_float_warning(stats: dict[str, int]) -> str | None:
    kept = {k[len("kept_float_"):]: v for k, v in stats.items() if k.startswith("kept_float_") and v}
    if not kept:
        return None
    return ("--activations int8: kept float " + ", ".join(f"{v} {REASONS[k]}" for k, v in sorted(kept.items()))
            + "; Softmax and normalization inputs always stay float")
