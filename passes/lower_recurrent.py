"""Lower LSTM/GRU/RNN layers with quantized weights to the form ONNX Runtime runs fastest.

quantize-weights feeds LSTM/GRU/RNN W and R through DequantizeLinear, which ONNX Runtime either
re-runs on every call (1.3-36x slower than FP32) or, with session.disable_quant_qdq, folds to
FP32 at load (FP32 speed, FP32 weights in memory). This pass picks, per layer, one of:

- ``scan``: the input projection for all frames hoisted into one com.microsoft MatMulNBits, and
  a Scan whose body computes h·Rᵀ with MatMulNBits and the gates (q4c.recurrent_lowering.scan). Weights
  stay at their planned 2/3/4/8 bits in memory.
- ``dynamic_quantize_lstm``: com.microsoft DynamicQuantizeLSTM, for LSTMs whose W and R are both
  planned at 8 bits (block-wise INT8 codes are re-quantized per channel, what the op takes).
- ``kept_dq``: leave DequantizeLinear -> LSTM/GRU/RNN, folded to FP32 at load.
"""

from __future__ import annotations

import logging
import math
from collections import defaultdict

import numpy as np
import onnx_graphsurgeon as gs

from q4c import graph as g
from q4c.config import CompileOptions
from q4c.errors import PostconditionError
from q4c.forms import DYNAMIC_LSTM_MIN_HIDDEN, SCAN_MIN_HIDDEN, choose_form
from q4c.pipeline import Artifact, Pass, PassContext, PassResult
from q4c.quant.plan import Form
from q4c.recurrent_lowering import (
    Emitter,
    NoMatch,
    RecurrentLayer,
    kernel_block,
    lower_to_dynamic_lstm,
    lower_to_scan,
    match_layer,
)
from q4c.recurrent_lowering.dynamic import Requantized

logger = logging.getLogger(__name__)



class LowerRecurrentPass(Pass):
    """LSTM/GRU/RNN with DequantizeLinear weights -> the form the plan gives the layer (by default
    the fastest, by the rule below).

    The rule, from `python benchmarks/bench_recurrent.py` (ONNX Runtime 1.31, 1 thread, batch 1;
    time as a ratio of the FP32 op for one step / an 8-step chunk / a 100-step utterance per call;
    all figures in BENCHMARKS.md, section "recurrent"):

    - LSTM with W and R both 8-bit and hidden >= DYNAMIC_LSTM_MIN_HIDDEN: DynamicQuantizeLSTM.
      Measured 0.73-0.79 at H=256, 0.24-0.60 at H=384-1024; at H=128 1.03-1.13 and on the
      bidirectional H=80 model 1.15-1.40, where the folded form (1.0) is kept.
    - otherwise, hidden >= SCAN_MIN_HIDDEN and every quantized weight's blocks fit a MatMulNBits
      block (16-256, or one block spanning K <= 256): the Scan form. Measured 0.52-0.56 at H=384,
      0.36-0.39 at 512, 0.22-0.31 at 1024, GRU 0.40-0.42 at 512, in every call pattern; plain
      RNN 0.50-0.72 at 384, 0.44-0.57 at 512, 0.28-0.32 at 1024 but 0.66-0.97 at 256 (one-off
      measurement, same method, not in bench_recurrent.py), so the same threshold. Below, the
      Scan's per-step cost (~5-10 us) dominates: 0.82 / 1.02 / 1.37 at H=256, 1.6 / 2.0 / 2.8 at
      H=128, 3.2-4.9 on the H=80 BiLSTM.
    - otherwise keep DequantizeLinear -> LSTM/GRU, folded at load (0.95-1.02). Without folding
      ONNX Runtime dequantizes on every call: 14-32x FP32 for a step, 1.6-5x for an utterance.

    ONNX Runtime does not run LSTM/GRU with layout 1 at all, so those are lowered at any size; with
    `kernels="low-bit"` every quantized layer takes a low-bit form whatever its size (weights
    stay low-bit in memory, at the speeds above).

    MatMulNBits scales stay float16 in the file (what quantize-weights chose for recurrent
    weights: 4.5 bits a weight at block 32, 0.14 of FP32) behind a Cast that ONNX Runtime folds at
    load. Caveat, ONNX Runtime 1.31: MatMulNBits at accuracy_level 4 whose scales are not a
    constant initializer returns wrong results; at ORT_DISABLE_ALL nothing folds the Cast, so run
    these models at the default optimization level (or basic and above), as q4c's run/bench do.

    The rule is applied by choose-kernels (q4c.forms), which writes each layer's form into the
    plan before weights are quantized; this pass emits the planned form (a form it cannot emit
    is an error).

    Requires: quantize-weights ran (DQ-fed W/R), the plan's forms.  Ensures: lowered layers keep
    their output tensors.  Stats: scan, dynamic_quantize_lstm, kept_dq, skipped_<reason>.
    """

    name = "lower-recurrent"

    def needs(self, options: CompileOptions) -> frozenset[Artifact]:
        return frozenset({Artifact.FORMS})

    def requires(self, graph: gs.Graph, ctx: PassContext) -> None:
        ctx.require_forms(self.name)

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        forms = ctx.forms_by_codes()
        bits_of = {q.codes: q.bits for q in ctx.quantized if q.has_codes}
        stats: dict[str, int] = defaultdict(int)
        for sub in list(g.iter_graphs(graph)):
            for node in [n for n in sub.nodes if n.op in ("LSTM", "GRU", "RNN") and n.domain in ("", "ai.onnx", None)]:
                layer = match_layer(sub, node, bits_of)
                planned = _planned_form(layer, forms) if not isinstance(layer, NoMatch) else None
                if planned not in (Form.SCAN_MATMULNBITS, Form.SCAN_INT8_PROJECTION, Form.DYNAMIC_QUANTIZE_LSTM):
                    stats["kept_dq" if planned is not None else getattr(layer, "code", "skipped_float_weights")] += 1
                    continue
                assert not isinstance(layer, NoMatch)
                logger.debug("%s (%s, H=%d, bits %s): %s", node.name, layer.op, layer.hidden, sorted(layer.bits()), planned)
                if planned in (Form.SCAN_MATMULNBITS, Form.SCAN_INT8_PROJECTION):
                    int8 = planned is Form.SCAN_INT8_PROJECTION
                    if any(w.quantized and kernel_block(w) is None for w in (layer.r if int8 else layer.w + layer.r)):
                        raise PostconditionError(f"{node.name}: the plan's form {planned.value!r} needs weight blocks "
                                                 f"a MatMulNBits block (16-256) covers")
                    if int8 and not all(w.quantized and w.bits == 8 for w in layer.w):
                        raise PostconditionError(f"{node.name}: the plan's form 'scan-int8-projection' needs W at 8 bits")
                    lower_to_scan(layer, Emitter(graph, node.name or layer.op), int8_projection=int8)
                    stats["scan"] += 1
                else:
                    if layer.op != "LSTM" or not all(w.quantized and w.bits == 8 for w in layer.w + layer.r):
                        raise PostconditionError(f"{node.name}: the plan's form 'dynamic-quantize-lstm' takes an LSTM "
                                                 f"with 8-bit W and R")
                    for req in lower_to_dynamic_lstm(layer, Emitter(graph, node.name or layer.op)):
                        _record_requantized(ctx, req, layer)
                    stats["dynamic_quantize_lstm"] += 1
        modified = stats["scan"] + stats["dynamic_quantize_lstm"] > 0
        return PassResult(modified, {k: v for k, v in sorted(stats.items()) if v})


def _planned_form(layer: RecurrentLayer, forms: dict[str, Form]) -> Form | None:
    """The plan's form of a layer (its quantized weights all carry the same one)."""
    found = {forms.get(w.codes_name) for w in layer.w + layer.r if w.quantized}
    found.discard(None)
    if len(found) > 1:
        raise PostconditionError(f"{layer.node.name}: the plan gives its weights different forms "
                                 f"({', '.join(sorted(f.value for f in found))}); a layer has one form")
    return found.pop() if found else None


def _record_requantized(ctx: PassContext, req: Requantized, layer: RecurrentLayer) -> None:
    """Per-channel re-quantization adds error: fold it into the report's weight SQNR."""
    for entry in ctx.quantized:
        if entry.codes != req.codes_name:
            continue
        weights = layer.w if layer.w[0].codes_name == req.codes_name else layer.r
        power = float(sum(np.sum(np.square(w.dequantize(), dtype=np.float64)) for w in weights))
        sens = dict(entry.sensitivity)
        old = sens.get("weight_sqnr_db")
        noise = req.noise + (power / 10 ** (old / 10) if isinstance(old, (int, float)) and math.isfinite(old) else 0.0)
        if noise > 0:
            sens["weight_sqnr_db"] = round(10 * math.log10(power / noise), 2)
        entry.sensitivity = sens
        entry.granularity = "channel"


__all__ = ["DYNAMIC_LSTM_MIN_HIDDEN", "SCAN_MIN_HIDDEN", "LowerRecurrentPass", "choose_form"]
