"""Precision candidates per weight tensor and what each costs in stored bytes."""

from __future__ import annotations

import math
from dataclasses import dataclass

from q4c.config import Granularity
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
        suffix = {"symmetric-absmax": ":absmax", "gptq": ":gptq"}.get(self.scheme, "")
        return f"{self.bits}{suffix}"


def candidate(slot: WeightSlot, bits: int, granularity: Granularity, opset: int,
              scheme: str = "symmetric", *, kernel_scales: bool = True) -> Candidate:
    shape = tuple(int(d) for d in slot.tensor.shape)
    n = math.prod(shape)
    if bits == FLOAT:
        return Candidate(FLOAT, str(granularity), "symmetric", 32, 4 * n)
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
