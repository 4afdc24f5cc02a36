"""Every quantizer a benchmark compares, each at its best documented settings, and why.

A contender is `build(src, dst, calib) -> None`: read the FP32 model at `src`, write the quantized
model to `dst`. `calib` says where calibration data comes from, in the two forms the tools take:
`calib.reader` (a `q4c compile --calib-reader` spec) or `calib.data` (a .npz directory) for q4c, and
`calib.feeds()` (complete feed dicts, one per call) for ONNX Runtime's static calibrator.

ONNX Runtime's settings, from its documentation:
- `quant_pre_process` (symbolic shape inference + ORT graph optimisation) first, for every tool: without
  it `quantize_dynamic` quantizes nothing on some exports (bilstm_am: size 1.004 of FP32) and
  MatMulNBits finds no MatMul in Conformer-style exports.
- `per_channel=True`: the per-tensor default is far less accurate on speech models.
- static QDQ calibrated on the same calls q4c calibrates on (MinMax, the default calibrator).
- MatMulNBits: `accuracy_level=4` (int8 activation compute, what q4c's own MatMulNBits use) with Gather
  (embeddings) included, block 32, symmetric.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import onnx

import q4c


@dataclass(frozen=True)
class Calibration:
    """Where a contender's calibration data comes from."""

    feeds: Callable[[], list[dict]]  # complete feed dicts, one per model call
    reader: str | None = None  # q4c --calib-reader spec
    data: Path | None = None  # q4c --calib directory of .npz
    options: dict = field(default_factory=dict)


Build = Callable[[Path, Path, Calibration], None]


def q4c_with(**options: object) -> Build:
    def build(src: Path, dst: Path, calib: Calibration) -> None:
        q4c.compile_file(src, dst, q4c.CompileOptions(**options), reader=calib.reader, data=calib.data, verify=False)
    return build


def pre_processed(src: Path, tmp: Path) -> Path:
    """ONNX Runtime's own pre-processing, which its documentation asks for before quantizing."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    out = tmp / f"{src.stem}.pre.onnx"
    quant_pre_process(str(src), str(out))
    return out


def ort_dynamic(src: Path, dst: Path, calib: Calibration) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with tempfile.TemporaryDirectory() as tmp:
        quantize_dynamic(str(pre_processed(src, Path(tmp))), str(dst), weight_type=QuantType.QInt8, per_channel=True)


def ort_static(src: Path, dst: Path, calib: Calibration) -> None:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._it = iter(calib.feeds())

        def get_next(self) -> dict | None:
            return next(self._it, None)

    with tempfile.TemporaryDirectory() as tmp:
        quantize_static(str(pre_processed(src, Path(tmp))), str(dst), Reader(), quant_format=QuantFormat.QDQ,
                        per_channel=True, weight_type=QuantType.QInt8, activation_type=QuantType.QUInt8)


def ort_matmul_nbits(src: Path, dst: Path, calib: Calibration) -> None:
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    with tempfile.TemporaryDirectory() as tmp:
        quantizer = MatMulNBitsQuantizer(onnx.load(pre_processed(src, Path(tmp))), bits=4, block_size=32,
                                         is_symmetric=True, accuracy_level=4, op_types_to_quantize=("MatMul", "Gather"))
        quantizer.process()
        quantizer.model.save_model_to_file(str(dst))


#: ONNX Runtime's quantizers at their best documented settings (see the module docstring)
ORT_CONTENDERS: list[tuple[str, Build]] = [
    ("ORT quantize_dynamic INT8 per-channel", ort_dynamic),
    ("ORT quantize_static QDQ INT8 per-channel", ort_static),
    ("ORT MatMulNBits INT4/32 acc4 +Gather", ort_matmul_nbits),
]

SETTINGS = ("ONNX Runtime rows: `quant_pre_process` first, as its documentation asks; `per_channel=True` (its "
            "per-tensor default is far less accurate); static QDQ calibrated on the same calibration calls q4c "
            "uses (MinMax); MatMulNBits at accuracy_level 4 with Gather included (what q4c's own MatMulNBits use). "
            "A row whose tool failed shows its error.")
