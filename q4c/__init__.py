"""q4c: compile FP32 ONNX speech models into 4-bit and mixed-precision ONNX models."""

from __future__ import annotations

from q4c.compiler import compile_file, compile_model, verify_model
from q4c.config import CompileOptions, Granularity, Target
from q4c.errors import (
    ConfigError,
    DataError,
    ModelLoadError,
    NumericMismatchError,
    PassError,
    PostconditionError,
    PreconditionError,
    Q4cError,
    UnsupportedOpError,
)
from q4c.graph import load, save
from q4c.pipeline import Pass, PassContext, PassResult, Pipeline, Repeat
from q4c.quant.plan import PrecisionPlan, TensorPrecision

__all__ = [
    "CompileOptions", "ConfigError", "DataError", "Granularity", "ModelLoadError", "NumericMismatchError", "Pass",
    "PassContext", "PassError", "PassResult", "Pipeline", "PostconditionError", "PrecisionPlan", "PreconditionError",
    "Q4cError", "Repeat", "Target", "TensorPrecision", "UnsupportedOpError", "compile_file", "compile_model", "load",
    "save", "verify_model",
]
