"""q4c's built-in passes (installed as `q4c.passes`): one pass per module."""

from __future__ import annotations

from q4c.passes.assign_precision import AssignPrecisionPass
from q4c.passes.calibrate import CalibratePass
from q4c.passes.choose_forms import ChooseFormsPass
from q4c.passes.choose_kernels import ChooseKernelsPass
from q4c.passes.dedupe_weights import DedupeWeightsPass
from q4c.passes.fold_constants import FoldConstantsPass
from q4c.passes.fuse_lstm_gates import FuseLstmGatesPass
from q4c.passes.insert_qdq import InsertActivationQdqPass
from q4c.passes.lower_gemm import LowerGemmPass
from q4c.passes.lower_int8_dynamic import LowerInt8DynamicPass
from q4c.passes.lower_ort_kernels import LowerOrtKernelsPass
from q4c.passes.lower_pointwise_conv import LowerPointwiseConvPass
from q4c.passes.lower_recurrent import LowerRecurrentPass
from q4c.passes.measure_sensitivity import MeasureSensitivityPass
from q4c.passes.quantize_weights import QuantizeWeightsPass
from q4c.passes.synthesize_constants import SynthesizeConstantsPass

BUILTIN_PASSES = {
    cls.name: cls
    for cls in (
        FoldConstantsPass,
        FuseLstmGatesPass,
        SynthesizeConstantsPass,
        LowerGemmPass,
        LowerPointwiseConvPass,
        DedupeWeightsPass,
        CalibratePass,
        MeasureSensitivityPass,
        AssignPrecisionPass,
        ChooseFormsPass,
        ChooseKernelsPass,
        InsertActivationQdqPass,
        QuantizeWeightsPass,
        LowerInt8DynamicPass,
        LowerOrtKernelsPass,
        LowerRecurrentPass,
    )
}

#: canonicalize -> analyse (the plan: bits, scheme, granularity, then forms) -> materialise (what
#: the plan says, nothing decided), in this order. 'calibrate' and 'insert-activation-qdq' join
#: when a pass needs what they provide (--activations int8, --save-calib, --load-calib;
#: q4c.registry.complete_pipeline): calibration runs the model over every sample, too slow for
#: a default that must stay fast.
DEFAULT_PIPELINE = (
    "fold-constants",
    "fuse-lstm-gates",
    "synthesize-constants",
    "lower-gemm",
    "lower-pointwise-conv",
    "dedupe-weights",
    "measure-sensitivity",
    "assign-precision",
    "choose-forms",
    "choose-kernels",
    "quantize-weights",
    "lower-int8-dynamic",
    "lower-ort-kernels",
    "lower-recurrent",
)

__all__ = ["BUILTIN_PASSES", "DEFAULT_PIPELINE"]
