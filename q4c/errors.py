"""The q4c exception tree: `Q4cError` is fixable by the user, `PassError` is a bug in a pass."""

from __future__ import annotations


class Q4cError(Exception):
    """An error the user can fix; the CLI prints its message and exits 1."""


class ConfigError(Q4cError):
    """Bad options or bad plan/calibration files."""


class ModelLoadError(Q4cError):
    """The model file is missing, not ONNX, truncated, too old, or has nothing to quantize."""


class NonFiniteWeightError(ModelLoadError):
    """A weight holds NaN or infinite values (a broken export); --allow-nonfinite lets it through."""


class QualityLostError(Q4cError):
    """--strict and the compile's own verification measured an output below a quality threshold.
    The CLI exits 4 (not 1); `report` is the compile report, nothing was written."""

    exit_code = 4

    def __init__(self, message: str, report: dict | None = None) -> None:
        super().__init__(message)
        self.report = report


class DataError(Q4cError):
    """Input data (.npz samples, readers) does not match the model's input signature."""


class UnsupportedOpError(Q4cError):
    """An op (domain, type, opset) that q4c or its interpreter does not know."""


class PreconditionError(Q4cError):
    """A pass was asked to run on a graph or context it cannot handle."""


class PostconditionError(Q4cError):
    """A pass left the graph in a state it promised not to."""


class NumericMismatchError(Q4cError):
    """Two executions that must agree (interpreter vs ONNX Runtime, before vs after) did not."""


class PassError(RuntimeError):
    """An unexpected exception inside a pass: a bug, so it keeps its traceback."""
