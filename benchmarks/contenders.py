"""Every quantizer a benchmark compares, each at its best documented settings, and why.

A contender is `build(src, dst, calib) -> None`: read the FP32 model at `src`, write the quantized
model to `dst`. `calib` says where calibration data comes from, in the two forms the tools take:
`calib.reader` (a `q4c compile --calib-reader` spec) or `calib.data` (a .npz directory) for q4c, and
`calib.feeds()` (complete feed dicts, one per call) for ONNX Runtime's static calibrator.

ONNX Runtime's settings, from its documentation:
- `quant_pre_process` (symbolic shape inference + ORT graph optimisation) first, for every tool
  (again with `skip_symbolic_shape=True` where its symbolic shape inference fails): without
  it `quantize_dynamic` quantizes nothing on some exports (bilstm_am: size 1.004 of FP32) and
  MatMulNBits finds no MatMul in Conformer-style exports.
- `per_channel=True`: the per-tensor default is far less accurate on speech models.
- static QDQ calibrated on the same calls q4c calibrates on (MinMax, the default calibrator).
- MatMulNBits: `accuracy_level=4` (int8 activation compute, what q4c's own MatMulNBits use) with Gather
  (embeddings) included, block 32, symmetric.

The wider field (`ORT_EXTRA`, `NNCF_CONTENDERS`, `FUSED_FP32`; `ALL_CONTENDERS` is everything):
- INT4 needs opset 21, and ONNX Runtime's quantizers only *relabel* `opset_import` to 21 (models
  ONNX Runtime then refuses): every INT4 row converts the pre-processed model with onnx's version
  converter first (`q4c.graph.convert_opset`), the step their documentation leaves to the user.
- `quantize_static` QDQ with INT4 weights, per channel (weights INT4, activations UINT8, MinMax);
  QOperator INT8 per channel (the integer-op format, for CPUs without QDQ fusions).
- Every algorithm `MatMulNBitsQuantizer` offers that runs here without extra packages: DEFAULT
  (above), RTN and k-quant (`rtn_quantize`; k-quant picks per-block scales/minima by a weighted
  search), HQQ (half-quadratic, calibration-free; asymmetric, its published setting) and GPTQ
  (error-compensating, calibrated on the same calls as static QDQ). All at block 32 and 4 bits;
  `accuracy_level=4` is set on every MatMulNBits they write (HQQ's config has no such option, and
  level 0 runs 4-bit weights with float compute, slower: an attribute of the op, not of the
  algorithm's accuracy). RTN/k-quant/GPTQ quantize MatMul only (their code path has no Gather).
  NVIDIA AWQ needs CUDA and modelopt: not a contender here.
- NNCF `compress_weights` on the ONNX model (pre-processed, opset 21): INT4 symmetric and
  asymmetric, group 32 and 128, NNCF's default (embeddings and the last layer at INT8, its backup
  mode) and one row with all layers INT4, ratio-based mixed precision (80 % of weights INT4 by
  its Hessian-input sensitivity, the rest INT8), and data-aware AWQ + scale estimation where its ONNX backend accepts them; layers whose
  width the group size does not divide get the largest group that does, down to 16 (NNCF's
  `GroupSizeFallbackMode.ADJUST`), instead of failing the model.
- Fused FP32: q4c's graph rewrites (the default pipeline's passes before any analysis or
  quantization) and nothing else, so speed that comes from fusion is not credited to 4-bit weights.
"""

from __future__ import annotations

import contextlib
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import onnx
from q4c.passes import DEFAULT_PIPELINE

import q4c

#: the first pass of the default pipeline that analyses or quantizes; those before it only rewrite
_FIRST_ANALYSIS = "measure-sensitivity"
REWRITE_PASSES: tuple[str, ...] = DEFAULT_PIPELINE[: DEFAULT_PIPELINE.index(_FIRST_ANALYSIS)]
BLOCK = 32


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

    out = (tmp / f"{src.stem}.pre.onnx").resolve()
    src = src.resolve()
    # It leaves scratch files (sym_shape_infer_temp.onnx, <uuid>.data) in the working directory.
    with contextlib.chdir(tmp):
        try:
            quant_pre_process(str(src), str(out))
        except Exception as e:  # noqa: BLE001 - its symbolic shape inference fails on some dynamic shapes
            # (conformer's floor(time/4): AssertionError; DeepFilterNet3: "Incomplete symbolic shape inference")
            print(f"  quant_pre_process: symbolic shape inference failed ({e}); again with skip_symbolic_shape=True "
                  "(ONNX shape inference and graph optimisation still run)", file=sys.stderr)
            quant_pre_process(str(src), str(out), skip_symbolic_shape=True)
    return out


def q4c_fused_fp32(src: Path, dst: Path, calib: Calibration) -> None:
    """q4c's non-quantizing rewrites only (REWRITE_PASSES)."""
    q4c.compile_file(src, dst, passes=",".join(REWRITE_PASSES), verify=False)


def _opset21(src: Path, tmp: Path) -> Path:
    """Pre-processed, then converted to opset 21 (INT4 types; see the module docstring)."""
    pre = pre_processed(src, tmp)
    out = tmp / f"{src.stem}.opset21.onnx"
    onnx.save(q4c.graph.convert_opset(onnx.load(pre)), out)
    return out


class _Reader:
    """ONNX Runtime's CalibrationDataReader protocol over a list (deep-copyable: GPTQ copies it)."""

    def __init__(self, feeds: list[dict]) -> None:
        self.feeds, self.i = feeds, 0

    def get_next(self) -> dict | None:
        self.i += 1
        return self.feeds[self.i - 1] if self.i <= len(self.feeds) else None

    def rewind(self) -> None:
        self.i = 0

    def __iter__(self):
        return iter(self.feeds)


def _save(model: object, dst: Path) -> None:
    """Save what a quantizer produced (an ONNXModel wrapper or a ModelProto), MatMulNBits at level 4."""
    proto = getattr(model, "model", model)
    for graph in q4c.graph.iter_graph_protos(proto.graph):
        for node in graph.node:
            if node.op_type == "MatMulNBits":
                kept = [a for a in node.attribute if a.name != "accuracy_level"]
                del node.attribute[:]
                node.attribute.extend([*kept, onnx.helper.make_attribute("accuracy_level", 4)])
    onnx.save(proto, dst)


def ort_dynamic(src: Path, dst: Path, calib: Calibration) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with tempfile.TemporaryDirectory() as tmp:
        quantize_dynamic(str(pre_processed(src, Path(tmp))), str(dst), weight_type=QuantType.QInt8, per_channel=True)


def ort_static(src: Path, dst: Path, calib: Calibration) -> None:
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )

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
        quantizer = MatMulNBitsQuantizer(onnx.load(_opset21(src, Path(tmp))), bits=4, block_size=BLOCK,
                                         is_symmetric=True, accuracy_level=4, op_types_to_quantize=("MatMul", "Gather"))
        quantizer.process()
        _save(quantizer.model, dst)


def ort_static_int4(src: Path, dst: Path, calib: Calibration) -> None:
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    with tempfile.TemporaryDirectory() as tmp:
        quantize_static(str(_opset21(src, Path(tmp))), str(dst), _Reader(calib.feeds()), quant_format=QuantFormat.QDQ,
                        per_channel=True, weight_type=QuantType.QInt4, activation_type=QuantType.QUInt8)


def ort_static_qoperator(src: Path, dst: Path, calib: Calibration) -> None:
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    with tempfile.TemporaryDirectory() as tmp:
        quantize_static(str(pre_processed(src, Path(tmp))), str(dst), _Reader(calib.feeds()),
                        quant_format=QuantFormat.QOperator, per_channel=True, weight_type=QuantType.QInt8,
                        activation_type=QuantType.QUInt8)


def ort_nbits_algo(algorithm: str) -> Build:
    """MatMulNBitsQuantizer with one of its algorithm configs (module docstring)."""
    def build(src: Path, dst: Path, calib: Calibration) -> None:
        from onnxruntime.quantization import matmul_nbits_quantizer as mnq

        configs = {
            "RTN": lambda: mnq.RTNWeightOnlyQuantConfig(),
            "k_quant": lambda: mnq.KQuantWeightOnlyQuantConfig(),
            "HQQ": lambda: mnq.HQQWeightOnlyQuantConfig(block_size=BLOCK, bits=4),
            "GPTQ": lambda: mnq.GPTQWeightOnlyQuantConfig(calibration_data_reader=_Reader(calib.feeds()),
                                                          block_size=BLOCK),
        }
        with tempfile.TemporaryDirectory() as tmp:
            path = _opset21(src, Path(tmp))
            quantizer = mnq.MatMulNBitsQuantizer(str(path), bits=4, block_size=BLOCK, is_symmetric=True,
                                                 accuracy_level=4, algo_config=configs[algorithm]())
            quantizer.process()
            _save(quantizer.model, dst)
    return build


def nncf_weights(mode: str, group_size: int, *, ratio: float = 1.0, all_layers: bool = True, awq: bool = False,
                 scale_estimation: bool = False, data: bool = False) -> Build:
    """NNCF `compress_weights` on the ONNX model (module docstring); `data`: calibrated (dataset given)."""
    def build(src: Path, dst: Path, calib: Calibration) -> None:
        import nncf

        with tempfile.TemporaryDirectory() as tmp:
            model = onnx.load(_opset21(src, Path(tmp)))
            dataset = nncf.Dataset(calib.feeds()) if (data or awq or scale_estimation or ratio < 1.0) else None
            from nncf.quantization.advanced_parameters import (
                AdvancedCompressionParameters,
                GroupSizeFallbackMode,
            )

            # a layer whose input width the group does not divide (80 features, a 48-wide projection) gets the
            # largest group that divides it, down to 16, as NNCF documents, instead of failing the whole model
            advanced = AdvancedCompressionParameters(group_size_fallback_mode=GroupSizeFallbackMode.ADJUST,
                                                     min_adjusted_group_size=16)
            out = nncf.compress_weights(model, mode=getattr(nncf.CompressWeightsMode, mode), group_size=group_size,
                                        ratio=ratio, all_layers=all_layers, dataset=dataset,
                                        awq=awq or None, scale_estimation=scale_estimation or None,
                                        advanced_parameters=advanced)
            onnx.save(out, dst)
    return build


#: ONNX Runtime's quantizers at their best documented settings (see the module docstring)
ORT_CONTENDERS: list[tuple[str, Build]] = [
    ("ORT quantize_dynamic INT8 per-channel", ort_dynamic),
    ("ORT quantize_static QDQ INT8 per-channel", ort_static),
    ("ORT MatMulNBits INT4/32 acc4 +Gather", ort_matmul_nbits),
]

#: the rest of ONNX Runtime's field (module docstring)
ORT_EXTRA: list[tuple[str, Build]] = [
    ("ORT quantize_static QDQ INT4 per-channel", ort_static_int4),
    ("ORT quantize_static QOperator INT8 per-channel", ort_static_qoperator),
    ("ORT MatMulNBits RTN INT4/32 acc4", ort_nbits_algo("RTN")),
    ("ORT MatMulNBits k-quant INT4/32 acc4", ort_nbits_algo("k_quant")),
    ("ORT MatMulNBits HQQ INT4/32 acc4", ort_nbits_algo("HQQ")),
    ("ORT MatMulNBits GPTQ INT4/32 acc4", ort_nbits_algo("GPTQ")),
]

NNCF_CONTENDERS: list[tuple[str, Build]] = [  # NNCF's default keeps embeddings and the last layer at INT8
    ("NNCF INT4 sym g32", nncf_weights("INT4_SYM", 32, all_layers=False)),
    ("NNCF INT4 asym g32", nncf_weights("INT4_ASYM", 32, all_layers=False)),
    ("NNCF INT4 asym g128", nncf_weights("INT4_ASYM", 128, all_layers=False)),
    ("NNCF INT4 sym g32 all layers", nncf_weights("INT4_SYM", 32)),
    ("NNCF INT4 asym g32 ratio 0.8 (rest INT8)", nncf_weights("INT4_ASYM", 32, ratio=0.8, all_layers=False)),
    ("NNCF INT4 asym g32 AWQ + scale estimation", nncf_weights("INT4_ASYM", 32, awq=True, scale_estimation=True,
                                                                all_layers=False)),
]

FUSED_FP32: tuple[str, Build] = ("q4c fused FP32 (rewrites only)", q4c_fused_fp32)

#: every contender not from q4c, in the order a table shows them
ALL_CONTENDERS: list[tuple[str, Build]] = [*ORT_CONTENDERS, *ORT_EXTRA, *NNCF_CONTENDERS]

SETTINGS = ("ONNX Runtime rows: `quant_pre_process` first, as its documentation asks; `per_channel=True` (its "
            "per-tensor default is far less accurate); static QDQ calibrated on the same calibration calls q4c "
            "uses (MinMax); MatMulNBits at accuracy_level 4 with Gather included (what q4c's own MatMulNBits use). "
            "A row whose tool failed shows its error.")

SETTINGS_ALL = (SETTINGS + " INT4 rows (static QDQ INT4, every MatMulNBits algorithm, NNCF) convert the pre-processed "
                "model to opset 21 with onnx's version converter first (the tools only relabel the opset). "
                "MatMulNBits algorithms DEFAULT, RTN, k-quant, HQQ, GPTQ at block 32, 4 bits, accuracy_level 4 set on "
                "every MatMulNBits node; GPTQ calibrated on the same calls. NNCF compress_weights (ONNX backend): "
                "INT4 sym/asym, group 32/128, its default (embeddings and last layer INT8) and once all layers INT4, "
                "ratio 0.8 with the "
                "rest INT8, AWQ + scale estimation, group-size fallback ADJUST (min 16); calibrated rows use the same "
                "calibration calls. `q4c fused "
                "FP32`: q4c's rewrite passes (" + ", ".join(REWRITE_PASSES) + ") without quantization, the speed "
                "baseline for fusion.")
