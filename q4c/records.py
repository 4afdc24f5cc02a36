"""Typed records passes hand each other through the PassContext (instead of free-form dicts).

`QuantizedTensor`: what quantize-weights / insert-activation-qdq did to one weight, read by the
lowering passes and written into the compile report's "tensors" list (`to_json`, same keys as
the report always had).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

#: a field the report leaves out when it holds this value (entries of different origins carry
#: different keys: a float-kept entry has no codes, only quantize-weights reports a block axis)
ABSENT: Any = type("Absent", (), {"__repr__": lambda self: "ABSENT"})()


@dataclass
class QuantizedTensor:
    """One weight tensor as stored: `codes` names its codes (or codebook indices) initializer."""

    name: str
    op: str
    role: str
    shape: list[int]
    bits: int
    granularity: str
    scheme: str
    stored_bits: int
    codes: str | None = ABSENT
    #: the axis the blocks of scales run along (block granularities), else None
    block_axis: int | None = ABSENT
    #: codebook schemes: index/table/scale bytes, table count, mu
    codebook: dict[str, Any] | None = ABSENT
    #: "uint8" where insert-activation-qdq quantized the activation feeding the weight's op
    activations: str | None = ABSENT
    #: "weight_sqnr_db" and, after measure-sensitivity, the measure's scores per candidate
    sensitivity: dict[str, Any] = field(default_factory=dict)

    _ORDER = ("name", "codes", "op", "role", "shape", "bits", "granularity", "block_axis", "stored_bits", "scheme",
              "codebook", "activations", "sensitivity")

    def to_json(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self._ORDER if getattr(self, k) is not ABSENT}

    @property
    def has_codes(self) -> bool:
        return self.codes is not ABSENT and self.codes is not None

    def __getitem__(self, key: str) -> Any:
        """Read access by report key (scripts and tests written against the old dict entries)."""
        if key not in {f.name for f in fields(self)} or getattr(self, key) is ABSENT:
            raise KeyError(key)
        return getattr(self, key)

    def get(self, key: str, default: Any = None) -> Any:
        try:
            return self[key]
        except KeyError:
            return default

    def __contains__(self, key: str) -> bool:
        return self.get(key, ABSENT) is not ABSENT
