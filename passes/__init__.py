"""q4c's built-in passes (installed as `q4c.passes`): one pass per module."""

from __future__ import annotations

from q4c.passes.assign_precision import AssignPrecisionPass
from q4c.passes.dedupe_weights import DedupeWeightsPass
from q4c.passes.fold_constants import FoldConstantsPass
from q4c.passes.fuse_lstm_gates import FuseLstmGatesPass
from q4c.passes.lower_gemm import LowerGemmPass
from q4c.passes.lower_ort_kernels import LowerOrtKernelsPass
from q4c.passes.lower_pointwise_conv import LowerPointwiseConvPass
from q4c.passes.lower_recurrent import LowerRecurrentPass
from q4c.passes.measure_sensitivity import MeasureSensitivityPass
from q4c.passes.quantize_weights import QuantizeWeightsPass

BUILTIN_PASSES = {
    cls.name: cls
    for cls in (
        FoldConstantsPass,
        FuseLstmGatesPass,
        LowerGemmPass,
        LowerPointwiseConvPass,
        DedupeWeightsPass,
        MeasureSensitivityPass,
        AssignPrecisionPass,
        QuantizeWeightsPass,
        LowerOrtKernelsPass,
        LowerRecurrentPass,
    )
}

#: canonicalize -> analyse -> materialise, in this order.
DEFAULT_PIPELINE = (
    "fold-constants",
    "fuse-lstm-gates",
    "lower-gemm",
    "lower-pointwise-conv",
    "dedupe-weights",
    "measure-sensitivity",
    "assign-precision",
    "quantize-weights",
    "lower-ort-kernels",
    "lower-recurrent",
)

__all__ = ["BUILTIN_PASSES", "DEFAULT_PIPELINE"]
