"""PrecisionPlan: every decision about each weight, as a replayable JSON file.

Per weight tensor: bits, rounding scheme, granularity (and a Conv weight's block axis), and the
lowering FORM its layer takes in ONNX Runtime with the basis it was chosen on (`Form`,
`FormBasis`); per plan: the opset the
model is converted to. `q4c compile --plan` replays all of it: the same plan writes the same
bytes. Forms are filled by the choose-forms analysis (passes/choose_forms.py) before any weight
is quantized; materialising passes only read them. A layer with several weights (LSTM W and R)
has one form, written on each of its weights.
"""

from __future__ import annotations

import enum
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace

from q4c.config import (
    CODEBOOK_SCHEMES,
    PLANE_BITS,
    SUPPORTED_BITS,
    UNIFORM_SCHEMES,
    Granularity,
)
from q4c.errors import ConfigError

PLAN_SCHEMA = "q4c.plan/2"
#: schemas read: /1 has no forms and no opset (both are decided again, as they were then)
READ_SCHEMAS = ("q4c.plan/1", PLAN_SCHEMA)
#: bits value meaning "leave this tensor in float"
FLOAT = 32


class Scheme(enum.StrEnum):
    """Rounding schemes: "symmetric" picks each group's scale (and clipping) by least squared weight
    error; "symmetric-absmax" never clips (the group's largest weight is kept exactly), which
    protects outlier weights that matter more to the output than the weight error says; "gptq"
    keeps symmetric's scales but rounds with error compensation against the layer's calibration
    inputs (q4c.quant.gptq), so it needs calibration data. Codebook schemes ("mulaw", "kmeans",
    "nf4": q4c.quant.codebook) store an index into a float16 table of centroids instead; their
    granularity names the tables ("tensor", "channel", "channels:G") or nf4's scale blocks.
    A StrEnum: members equal their strings, so "gptq" == Scheme.GPTQ."""

    SYMMETRIC = "symmetric"
    SYMMETRIC_ABSMAX = "symmetric-absmax"
    GPTQ = "gptq"
    MULAW = "mulaw"
    KMEANS = "kmeans"
    NF4 = "nf4"


SCHEMES = tuple(s.value for s in Scheme)
assert SCHEMES == (*UNIFORM_SCHEMES, *CODEBOOK_SCHEMES)


class Form(enum.StrEnum):
    """How a quantized weight's layer runs in ONNX Runtime (what the lowering passes emit).
    Values match q4c.latency.forms.Form where both name the same form.

    Scale dtype follows the form: float32 for MatMul/Gemm/embedding weights that a kernel or a
    plain DequantizeLinear reads at activation type (every form but FP32_AT_LOAD), float16 behind
    a Cast where the weight is folded to FP32 at session load (FP32_AT_LOAD); LSTM/GRU/RNN/Conv
    weights always take float16 scales (q4c.quant.weights.float32_scales)."""

    #: com.microsoft MatMulNBits, accuracy_level 4 (int8 activation compute): weights stay
    #: low-bit in memory (MatMul weights)
    MATMULNBITS = "matmulnbits-acc4"
    #: the same with accuracy_level 0 (float activation compute)
    MATMULNBITS_ACC0 = "matmulnbits-acc0"
    #: com.microsoft GatherBlockQuantized (embedding tables read by Gather)
    GATHER_BLOCK_QUANTIZED = "gather-block-quantized"
    #: DequantizeLinear -> op, folded to FP32 at session load (session.disable_quant_qdq=1)
    FP32_AT_LOAD = "fp32-at-load"
    #: DequantizeLinear -> op, standard ONNX (--target onnx, or no kernel form for this weight)
    DEQUANTIZE_LINEAR = "dequantize-linear"
    #: LSTM/GRU/RNN as a hoisted MatMulNBits input projection plus a Scan of MatMulNBits steps
    SCAN_MATMULNBITS = "scan-matmulnbits"
    #: the Scan form with the hoisted input projection as com.microsoft DynamicQuantizeMatMul (W
    #: planned at 8 bits, int8 per channel; R any width, MatMulNBits in the Scan): chosen by --latency-budget
    SCAN_INT8_PROJECTION = "scan-int8-projection"
    #: com.microsoft DynamicQuantizeLSTM (LSTM with 8-bit W and R, re-quantized per channel)
    DYNAMIC_QUANTIZE_LSTM = "dynamic-quantize-lstm"
    #: uint8 activations with int8 per-channel weights in a QDQ group ORT fuses (--activations int8)
    INT8_ACTIVATIONS = "int8-activations"
    #: com.microsoft DynamicQuantizeMatMul: int8 per-channel [K, N] MatMul weights, activations
    #: quantized on the fly (passes/lower_int8_dynamic.py; chosen by --latency-budget)
    INT8_DYNAMIC = "int8-dynamic"
    #: the same kernel from 1-4-bit codes (or codebook indices) in the file: the decoded weight ->
    #: QuantizeLinear (int8 per output channel), folded at session load (session.disable_quant_qdq=1), feeding
    #: DynamicQuantizeMatMul (passes/lower_int8_dynamic.py; chosen by --latency-budget)
    INT8_AT_LOAD = "int8-at-load"


#: forms of LSTM/GRU/RNN layers
RECURRENT_FORMS = frozenset({Form.SCAN_MATMULNBITS, Form.SCAN_INT8_PROJECTION, Form.DYNAMIC_QUANTIZE_LSTM, Form.FP32_AT_LOAD,
                             Form.DEQUANTIZE_LINEAR})
#: forms of MatMul weights lowered by lower-ort-kernels, and their MatMulNBits accuracy_level
MATMULNBITS_FORMS = {Form.MATMULNBITS: 4, Form.MATMULNBITS_ACC0: 0}


class FormBasis(enum.StrEnum):
    """Why a form was chosen (the objective it serves)."""

    #: what the options asked for (--target, --kernels low-bit / fp32-at-load, --activations)
    OPTION = "option"
    #: the measured-once speed rule (lower-recurrent's hidden-size thresholds)
    SPEED_RULE = "speed-rule"
    #: timed on this machine for this model and input shape (--kernels auto)
    SPEED_MEASURED = "speed-measured"
    #: the only form ONNX Runtime runs (e.g. LSTM/GRU with layout 1), or no kernel fits the layout
    REQUIRED = "required"
    #: latency-aware planning (per-layer forms chosen against a latency budget)
    LATENCY = "latency"
    #: written by hand in a plan file
    USER = "user"


@dataclass(frozen=True)
class TensorPrecision:
    bits: int
    granularity: str = "block:32"
    scheme: str = "symmetric"
    #: lowering form of the weight's layer; None = not decided yet (choose-forms decides)
    form: Form | None = None
    #: the basis the form was chosen on
    chosen_for: FormBasis | None = None
    #: Conv weights with block granularity: the axis the blocks run along (1 = input channels,
    #: 2+ = a kernel axis); None = derived from the shape (q4c.quant.weights.conv_block_layout).
    #: choose-kernels writes the derived axis, so a hand-edited plan can change it.
    block_axis: int | None = None

    def __post_init__(self) -> None:
        # A hand-edited plan may hold any JSON value here: check types before using them.
        if isinstance(self.bits, bool) or not isinstance(self.bits, int):
            raise ConfigError(f"bits must be an integer, not {self.bits!r}")
        if not isinstance(self.granularity, str) or not isinstance(self.scheme, str):
            raise ConfigError(f"granularity and scheme must be strings, not {self.granularity!r}, {self.scheme!r}")
        if self.scheme not in SCHEMES:
            raise ConfigError(f"scheme {self.scheme!r} is not supported (one of {', '.join(SCHEMES)})")
        object.__setattr__(self, "scheme", Scheme(self.scheme))
        object.__setattr__(self, "form", _enum(Form, self.form, "form"))
        object.__setattr__(self, "chosen_for", _enum(FormBasis, self.chosen_for, "chosen_for"))
        if self.form is not None and self.bits == FLOAT:
            raise ConfigError(f"a float (bits {FLOAT}) weight has no lowering form, not {self.form.value!r}")
        if self.block_axis is not None:
            self._check_block_axis()
        if self.scheme in CODEBOOK_SCHEMES and self.bits != FLOAT:
            from q4c.quant.codebook import scheme_bits, validate_granularity

            if self.bits not in scheme_bits(self.scheme):
                raise ConfigError(f"the {self.scheme} scheme stores {', '.join(map(str, scheme_bits(self.scheme)))}-bit "
                                  f"indices, not {self.bits}")
            validate_granularity(self.granularity)
            return
        if self.bits not in (*SUPPORTED_BITS, *PLANE_BITS, FLOAT):
            raise ConfigError(f"bits must be one of {', '.join(map(str, sorted((*SUPPORTED_BITS, *PLANE_BITS))))} or "
                              f"{FLOAT} (float), not {self.bits}")
        Granularity.parse(self.granularity)

    def _check_block_axis(self) -> None:
        if isinstance(self.block_axis, bool) or not isinstance(self.block_axis, int) or self.block_axis < 1:
            raise ConfigError(f"block_axis must be an integer >= 1 (a Conv weight's input or kernel axis), "
                              f"not {self.block_axis!r}")
        if self.bits == FLOAT or self.scheme in CODEBOOK_SCHEMES or Granularity.parse(self.granularity).kind != "block":
            raise ConfigError(f"block_axis is for block-wise uniform scales, not {self.bits} bits {self.scheme} "
                              f"{self.granularity}")

    @property
    def quantized(self) -> bool:
        return self.bits != FLOAT

    @property
    def decoded_at_load(self) -> bool:
        """Codes no ONNX Runtime kernel reads (codebook tables, 6-bit planes): their decode is
        folded at session load."""
        return self.quantized and (self.scheme in CODEBOOK_SCHEMES or self.bits in PLANE_BITS)

    def with_form(self, form: Form, basis: FormBasis) -> TensorPrecision:
        return replace(self, form=form, chosen_for=basis)

    def to_json(self) -> dict[str, object]:
        doc: dict[str, object] = {"bits": self.bits, "granularity": self.granularity, "scheme": self.scheme.value}
        if self.form is not None:
            doc["form"] = self.form.value
        if self.chosen_for is not None:
            doc["chosen_for"] = self.chosen_for.value
        if self.block_axis is not None:
            doc["block_axis"] = self.block_axis
        return doc


def _enum(cls: type[enum.StrEnum], value: object, what: str):  # returns a member of cls
    if value is None or isinstance(value, cls):
        return value
    try:
        return cls(value)
    except ValueError:
        raise ConfigError(f"{what} must be one of {', '.join(m.value for m in cls)}, not {value!r}") from None


@dataclass
class PrecisionPlan:
    """Per weight tensor (by name): bits, granularity, scheme, form. Tensors absent stay float.
    `opset`: the opset the model is converted to (25 when INT2 codes may be stored), None =
    decided from the options as for a plan without one."""

    tensors: dict[str, TensorPrecision] = field(default_factory=dict)
    defaults: dict[str, object] = field(default_factory=dict)
    opset: int | None = None

    def to_json(self) -> dict[str, object]:
        doc: dict[str, object] = {
            "schema": PLAN_SCHEMA,
            "defaults": dict(self.defaults),
            "tensors": {name: tp.to_json() for name, tp in sorted(self.tensors.items())},
        }
        if self.opset is not None:
            doc["opset"] = self.opset
        return doc

    def restricted_to(self, names: Iterable[str]) -> PrecisionPlan:
        """The same plan for the tensors in `names` only (every other field kept)."""
        keep = set(names)
        return replace(self, tensors={n: tp for n, tp in self.tensors.items() if n in keep}, defaults=dict(self.defaults))

    def forms(self) -> dict[str, Form]:
        """Weight name -> form, for the quantized weights whose form is decided."""
        return {n: tp.form for n, tp in self.tensors.items() if tp.form is not None}

    @classmethod
    def from_json(cls, doc: Mapping[str, object], source: str = "plan") -> PrecisionPlan:
        if not isinstance(doc, Mapping) or doc.get("schema") not in READ_SCHEMAS:
            raise ConfigError(f"{source}: not a q4c plan (expected schema {PLAN_SCHEMA!r})")
        tensors = doc.get("tensors")
        if not isinstance(tensors, Mapping):
            raise ConfigError(f"{source}: 'tensors' must be an object of name -> {{bits, granularity, scheme}}")
        defaults = doc.get("defaults") or {}
        if not isinstance(defaults, Mapping):
            raise ConfigError(f"{source}: 'defaults' must be an object, not {type(defaults).__name__}")
        opset = doc.get("opset")
        if opset is not None and (isinstance(opset, bool) or not isinstance(opset, int) or not 21 <= opset <= 25):
            raise ConfigError(f"{source}: 'opset' must be an integer from 21 to 25, not {opset!r}")
        plan = cls(defaults=dict(defaults), opset=opset)
        for name, entry in tensors.items():
            if not isinstance(entry, Mapping):
                raise ConfigError(f"{source}: tensor {name!r}: must be an object of bits, granularity, scheme")
            try:
                plan.tensors[name] = TensorPrecision(**entry)
            except (TypeError, ConfigError) as e:
                raise ConfigError(f"{source}: tensor {name!r}: {e}") from e
        return plan

    def save(self, path: str | os.PathLike[str]) -> None:
        from q4c.graph import write_json

        write_json(path, self.to_json())

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> PrecisionPlan:
        from q4c.graph import read_json

        return cls.from_json(read_json(path, "plan"), source=str(path))
