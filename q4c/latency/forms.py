"""The lowering forms a layer can take in ONNX Runtime, and the shape of a layer as it is called.

A form is how a weight-bearing layer runs (which kernel, which bits); a `LayerShape` is what its
speed depends on: the weight's dimensions and the rows per call (M = batch x frames, 1 when
streaming). Both are plain, hashable values: cost-cache keys and planner options are built from them.
"""

from __future__ import annotations

import enum
from dataclasses import asdict, dataclass

from q4c.quant.plan import FLOAT


class LayerKind(enum.Enum):
    MATMUL = "matmul"  # y = x @ W, W a constant [K, N]
    LSTM = "lstm"
    GRU = "gru"


class Form(enum.Enum):
    """A lowering form (what the materialising passes emit for one layer)."""

    FP32_AT_LOAD = "fp32-at-load"  # DequantizeLinear folded at session load: FP32 op, small file
    NBITS_ACC4 = "matmulnbits-acc4"  # com.microsoft MatMulNBits, int8 activation compute
    NBITS_ACC0 = "matmulnbits-acc0"  # same, float compute
    INT8_DYNAMIC = "int8-dynamic"  # com.microsoft DynamicQuantizeMatMul, int8 per-channel [K, N]
    #: DynamicQuantizeMatMul fed by DequantizeLinear(1-4-bit codes, or a codebook decoder) ->
    #: QuantizeLinear(int8 per column), folded at session load: the file holds the low-bit codes,
    #: the kernel is INT8's
    INT8_AT_LOAD = "int8-at-load"
    SCAN_NBITS = "scan-matmulnbits"  # LSTM/GRU: hoisted MatMulNBits + Scan (q4c.recurrent_lowering.scan)
    #: the same with the hoisted projection as DynamicQuantizeMatMul (W 8-bit; R any width)
    SCAN_INT8_PROJECTION = "scan-int8-projection"
    DYNAMIC_QUANTIZE_LSTM = "dynamic-quantize-lstm"  # LSTM: com.microsoft DynamicQuantizeLSTM (INT8)


#: Forms each layer kind can take, and the weight bits each form stores (FLOAT: the plan's bits
#: are kept in the file but the op runs in float; any planned width is allowed there).
FORMS: dict[LayerKind, tuple[Form, ...]] = {
    LayerKind.MATMUL: (Form.FP32_AT_LOAD, Form.NBITS_ACC4, Form.NBITS_ACC0, Form.INT8_DYNAMIC, Form.INT8_AT_LOAD),
    LayerKind.LSTM: (Form.FP32_AT_LOAD, Form.SCAN_NBITS, Form.SCAN_INT8_PROJECTION, Form.DYNAMIC_QUANTIZE_LSTM),
    LayerKind.GRU: (Form.FP32_AT_LOAD, Form.SCAN_NBITS, Form.SCAN_INT8_PROJECTION),
}
#: Bit widths a form computes with; None = any (the weight is dequantized to FP32 at load).
FORM_BITS: dict[Form, tuple[int, ...] | None] = {
    Form.FP32_AT_LOAD: None,
    Form.NBITS_ACC4: (2, 3, 4, 8),
    Form.NBITS_ACC0: (2, 3, 4, 8),
    Form.INT8_DYNAMIC: (8,),
    Form.INT8_AT_LOAD: (1, 2, 3, 4, 8),
    Form.SCAN_NBITS: (2, 3, 4, 8),
    Form.SCAN_INT8_PROJECTION: (2, 3, 4, 8),  # R's width (W is 8-bit)
    Form.DYNAMIC_QUANTIZE_LSTM: (8,),
}


#: ONNX Runtime session config a form needs (in the compiled model's metadata, and for its timing).
SESSION_CONFIG: dict[Form, dict[str, str]] = {
    Form.INT8_AT_LOAD: {"session.disable_quant_qdq": "1"},
}


#: Forms of the issue's menu that are not planner forms on ONNX Runtime 1.32 CPU, and why (measured by
#: `python benchmarks/bench_latency.py --parts forms`, 1 thread, at the 6-200 activation rows per call of
#: conformer / transformer_lm / rnnt_joiner; the table is in BENCHMARKS.md, section latency).
NOT_PLANNED: dict[str, str] = {
    "matmulnbits-2bit-lut": "ONNX Runtime's LUT GEMM (session mlas.use_lut_gemm=1) runs only 2-bit MatMulNBits with "
                            "K % 32 == 0, N % 128 == 0 and a block a multiple of 32 (MlasIsLutGemmAvailable); where it "
                            "applies it measured 0.96-1.8x the plain 2-bit kernel and 1.5-2.8x FP32 MatMul, never faster",
    "int8-static": "QuantizeLinear(x, calibrated scale) -> MatMulIntegerToFloat (or a QDQ group ORT fuses) measured "
                   "0.95-1.05x DynamicQuantizeMatMul's time at every shape: the per-call activation range is not what "
                   "costs; int8 (not uint8) activations run 3-15x slower (no kernel)",
}


def lut_gemm_reason(k: int, n: int, bits: int, block: int) -> str | None:
    """Why ONNX Runtime's LUT GEMM does not apply to a MatMulNBits of this shape (None: it applies,
    given an AVX2 CPU)."""
    if bits != 2:
        return "LUT GEMM is 2-bit only"
    if block % 32 or k % 32:
        return "LUT GEMM needs K and the block a multiple of 32"
    if n % 128:
        return "LUT GEMM needs N a multiple of 128"
    return None


def allows(form: Form, bits: int) -> bool:
    """Can a weight planned at `bits` (FLOAT: kept float) run in `form`?"""
    if bits == FLOAT:
        return form is Form.FP32_AT_LOAD
    widths = FORM_BITS[form]
    return widths is None or bits in widths


def timed_bits(form: Form, bits: int) -> int:
    """The bit width a micro-benchmark of (form, bits) times: forms that run in float time the
    FP32 op whatever the stored bits; 3-bit codes run in 4-bit kernels; INT8_AT_LOAD runs the
    int8 kernel whatever the stored width (timed with 4-bit codes)."""
    if form is Form.FP32_AT_LOAD or bits == FLOAT:
        return FLOAT
    if form is Form.INT8_AT_LOAD:
        return 4
    return 4 if bits == 3 else bits


@dataclass(frozen=True)
class LayerShape:
    """What a layer's speed depends on.

    MATMUL: `k`, `n` the weight's [K, N], `rows` = M, activation rows per call.
    LSTM/GRU: `k` input width, `n` hidden size, `rows` = batch, `steps` frames per call,
    `directions` 1 or 2.
    """

    kind: LayerKind
    k: int
    n: int
    rows: int
    steps: int = 1
    directions: int = 1

    def to_json(self) -> dict[str, object]:
        doc = asdict(self)
        doc["kind"] = self.kind.value
        return doc

    def label(self) -> str:
        if self.kind is LayerKind.MATMUL:
            return f"matmul K={self.k} N={self.n} M={self.rows}"
        return f"{self.kind.value} I={self.k} H={self.n} B={self.rows} T={self.steps} D={self.directions}"


__all__ = ["FORMS", "FORM_BITS", "NOT_PLANNED", "SESSION_CONFIG", "lut_gemm_reason", "Form", "LayerKind", "LayerShape", "allows", "timed_bits"]
