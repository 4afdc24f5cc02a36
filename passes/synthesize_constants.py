"""Replace float weights that are closed-form functions (DFT/STFT bases, windows) by small
in-graph generators that ONNX Runtime constant-folds at session load.

Silero VAD's STFT basis ([258, 1, 256], a hann-windowed DFT) is a quarter of its file; as a
generator it costs under 1 KiB and is exact to float32 rounding, and the quantizer never sees
it (a generator's output is not an initializer).
"""

from __future__ import annotations

import logging
from collections import defaultdict

import numpy as np
import onnx_graphsurgeon as gs
import onnxruntime as ort

from q4c import graph as g
from q4c.errors import Q4cError
from q4c.interp import Interpreter
from q4c.pipeline import Pass, PassContext, PassResult
from q4c.quant import closed_form
from q4c.quant.closed_form import ClosedForm, NearMiss

logger = logging.getLogger(__name__)


class SynthesizeConstantsPass(Pass):
    """Recognise closed-form float constants and compute them in the graph instead of storing them.

    Each candidate (every float constant read by a node, in every graph level, If branches
    included) is fitted against DFT bases (cos and +/-sin rows for k = 0..N/2, any window of
    `closed_form.WINDOWS` or a stored one, any scale, layouts [F, N], [N, F] and [F, 1, N]) and
    1-D windows. A fit is accepted only if the generator, evaluated at compile time by q4c's
    interpreter AND by ONNX Runtime, reproduces the tensor within `closed_form.TOLERANCE`
    (1e-6) and is smaller than it.

    Requires: nothing.  Ensures: each replaced tensor is computed by nodes whose constant-only
    nodes carry `closed_form.GENERATOR_PREFIX` (fold-constants leaves them alone).
    Stats: synthesized, bytes_saved, skipped_tolerance (shaped like a closed form, fit off by
    more than 1e-6), skipped_runtime_mismatch (formula fits, interpreter or ORT misses 1e-6),
    skipped_no_gain (generator not smaller), skipped_graph_output.
    """

    name = "synthesize-constants"

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        stats: dict[str, int] = defaultdict(int)
        used = _names(graph)
        for sub in list(g.iter_graphs(graph)):
            outputs = {t.name for t in sub.outputs}
            seen: set[str] = set()
            for node in list(sub.nodes):
                if node.op == "Constant" and isinstance(node.attrs.get("value"), gs.Constant):
                    # Real exports keep weights in Constant nodes; replacing the node keeps its
                    # output tensor, so readers at every graph level follow.
                    self._try(sub, node.attrs["value"], outputs, used, ctx, stats, constant_node=node)
                    continue
                for tensor in node.inputs:
                    if not g.is_float_constant(tensor) or tensor.name in seen:
                        continue
                    seen.add(tensor.name)
                    self._try(sub, tensor, outputs, used, ctx, stats)
        stats = {k: v for k, v in stats.items() if v}
        return PassResult(stats.get("synthesized", 0) > 0, stats)

    def _try(self, sub: gs.Graph, tensor: gs.Constant, outputs: set[str], used: set[str], ctx: PassContext,
             stats: dict[str, int], constant_node: gs.Node | None = None) -> None:
        if not g.is_float_constant(tensor):
            return
        values = np.asarray(tensor.values)
        found = closed_form.recognise(values)
        if found is None:
            return
        if isinstance(found, NearMiss):
            logger.debug("synthesize-constants: %s looks like %s but misses by %.3g", tensor.name,
                         found.description, found.error)
            stats["skipped_tolerance"] += 1
            return
        if (constant_node.outputs[0] if constant_node else tensor).name in outputs:
            stats["skipped_graph_output"] += 1
            return
        saved = values.nbytes - closed_form.generator_bytes(found)
        if saved <= 0:
            stats["skipped_no_gain"] += 1
            return
        error = _runtime_error(found, values, ctx.opset)
        if error is None or error > closed_form.TOLERANCE:
            logger.debug("synthesize-constants: %s: %s regenerated with error %s", tensor.name, found.describe(), error)
            stats["skipped_runtime_mismatch"] += 1
            return
        self._replace(sub, tensor, found, used, ctx.opset, constant_node)
        logger.debug("synthesize-constants: %s = %s (max error %.3g, %d bytes saved)", tensor.name,
                     found.describe(), error, saved)
        stats["synthesized"] += 1
        stats["bytes_saved"] += saved

    @staticmethod
    def _replace(sub: gs.Graph, tensor: gs.Constant, found: ClosedForm, used: set[str], opset: int,
                 constant_node: gs.Node | None) -> None:
        tag = _fresh_tag(used)
        imported = g.import_graph(closed_form.generator_model(found, opset, g.IR_VERSION, tag, f"{tag}.out"))
        out = imported.outputs[0]
        out.shape = list(found.shape)
        sub.nodes.extend(imported.nodes)
        used.update(imported.tensors().keys())
        used.update(n.name for n in imported.nodes if n.name)
        if constant_node is not None:
            target = constant_node.outputs[0]
            constant_node.outputs.clear()
            constant_node.inputs.clear()
            last = g.producer(out)
            last.outputs = [target]
            target.dtype, target.shape = out.dtype, out.shape
            return
        for consumer in g.consumers(tensor):
            if not any(consumer is n for n in sub.nodes):
                continue  # a reader in another graph level gets its own generator
            for i, t in enumerate(consumer.inputs):
                if t is tensor:
                    consumer.inputs[i] = out


def _names(root: gs.Graph) -> set[str]:
    names: set[str] = set()
    for sub in g.iter_graphs(root):
        names.update(sub.tensors().keys())
        names.update(n.name for n in sub.nodes if n.name)
    return names


def _fresh_tag(used: set[str]) -> str:
    i = 0
    while any(name.startswith(f"cf{i}.") for name in used):
        i += 1
    used.add(f"cf{i}.")
    return f"cf{i}"


def _runtime_error(found: ClosedForm, values: np.ndarray, opset: int) -> float | None:
    """Max |generated - values| over q4c's interpreter and ONNX Runtime, None if either fails."""
    model = closed_form.generator_model(found, opset, g.IR_VERSION)
    want = values.astype(np.float64)
    try:
        interp = Interpreter(model).run({})["y"]
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        via_ort = session.run(["y"], {})[0]
    except (Q4cError, ort.capi.onnxruntime_pybind11_state.Fail, RuntimeError) as e:  # an op one runtime lacks
        logger.debug("synthesize-constants: generator for %s does not run: %s", found.describe(), e)
        return None
    if interp.shape != values.shape or via_ort.shape != values.shape:
        return None
    return float(max(np.max(np.abs(interp - want)), np.max(np.abs(via_ort - want))))
