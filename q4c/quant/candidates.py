"""Precision candidates per weight tensor and what each costs in stored bytes."""

from __future__ import annotations

import math
from dataclasses import dataclass

from q4c.config import CODEBOOK_SCHEMES, PLANE_BITS, UNIFORM_SCHEMES, CompileOptions, Granularity
from q4c.quant import planes
from q4c.quant.codebook import codebook_cost, supports
from q4c.quant.packing import storage_bits
from q4c.quant.plan import FLOAT
from q4c.quant.weights import WeightSlot, float32_scales, scale_layout


@dataclass(frozen=True)
class Candidate:
    bits: int  # nominal code bits; FLOAT (32) keeps the tensor float
    granularity: str
    scheme: str
    storage_bits: int  # bits each code occupies on disk (3-bit codes ride in 4-bit containers)
    nbytes: int  # codes + scales, as written


    @property
    def key(self) -> str:
        """Stable name in reports: "4", "4:absmax", "32" (float)."""
        return scheme_key(self.bits, self.scheme)


def scheme_key(bits: int, scheme: str) -> str:
    """"4", "4:absmax", "4:gptq", "2:mulaw", "4:nf4", ... ("32": float)."""
    suffix = {"symmetric-absmax": ":absmax", "gptq": ":gptq"}.get(scheme, f":{scheme}" if scheme in CODEBOOK_SCHEMES else "")
    return f"{bits}{suffix}"


def candidate(slot: WeightSlot, bits: int, granularity: Granularity, opset: int,
              scheme: str = "symmetric", *, kernel_scales: bool = True) -> Candidate:
    shape = tuple(int(d) for d in slot.tensor.shape)
    n = math.prod(shape)
    if bits == FLOAT:
        return Candidate(FLOAT, str(granularity), "symmetric", 32, 4 * n)
    if scheme in CODEBOOK_SCHEMES:  # packed indices + float16 tables (+ nf4's block scales)
        nbytes, gran_text = codebook_cost(shape, bits, scheme, channel_axis=slot.channel_axis,
                                          reduce_axis=slot.reduce_axis, granularity=str(granularity))
        return Candidate(bits, gran_text, scheme, bits, nbytes)
    wide = float32_scales(slot, kernel_scales)
    gran = granularity.resolve(float32_scales=wide)
    kind, axis, block = scale_layout(shape, slot, gran.kind, gran.block)
    if kind == "tensor":
        groups = 1
    elif kind == "channel":
        groups = shape[axis]
    else:
        groups = n // shape[axis] * math.ceil(shape[axis] / block)
    stored = storage_bits(bits, opset)
    code_bytes = math.ceil(n * stored / 8)
    return Candidate(bits, str(gran), scheme, stored, code_bytes + groups * (4 if wide else 2))


def candidate_list(slot: WeightSlot, opts: CompileOptions, opset: int, *, gptq: bool, tied: bool) -> list[Candidate]:
    """What a budgeted plan may choose for one weight, float last: every width of
    `opts.candidates` under each scheme that supports it. With output-driven scores (kl) the
    rounding schemes compete too: symmetric-absmax, gptq where the weight has calibration inputs
    (`gptq`), and the codebooks (mulaw, kmeans, nf4; not for tied tables, which share one set of
    codes); weight-error measures get symmetric only. `opts.schemes` restricts the choice
    (symmetric always stays). 6-bit candidates (q4c.quant.planes) only for the weights ONNX
    Runtime decodes at load (Conv, LSTM/GRU/RNN), at an opset with UINT2."""
    kl = opts.sensitivity == "kl"
    schemes = [s for s in UNIFORM_SCHEMES if s != "gptq"] if kl else ["symmetric"]
    later = (["gptq"] if gptq else []) + (list(CODEBOOK_SCHEMES) if kl and not tied else [])
    if opts.schemes:
        schemes = [s for s in schemes if s in opts.schemes or s == "symmetric"]
        later = [s for s in later if s in opts.schemes]
    widths = [b for b in opts.candidates if b not in PLANE_BITS or (slot.role in planes.ROLES
                                                                     and storage_bits(b, opset) == planes.BITS)]
    out = [candidate(slot, b, opts.granularity, opset, s, kernel_scales=opts.kernel_scales)
           for b in widths for s in schemes if supports(s, b)]
    out += [candidate(slot, b, opts.granularity, opset, s, kernel_scales=opts.kernel_scales)
            for s in later for b in widths if supports(s, b)]
    out.append(candidate(slot, FLOAT, opts.granularity, opset))
    return out


#: The width of the default plan (the bytes of uniform 4-bit weights)
DEFAULT_BITS = 4


def default_width(cands: list[Candidate]) -> list[int]:
    """Indices of the uniform (non-codebook) candidates at DEFAULT_BITS: every scheme of the
    default width, which all cost the same bytes."""
    return [i for i, c in enumerate(cands) if c.bits == DEFAULT_BITS and c.scheme not in CODEBOOK_SCHEMES]
