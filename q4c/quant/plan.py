"""PrecisionPlan: the decision of how many bits each weight gets, as a replayable JSON file."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

from q4c.config import (
    CODEBOOK_SCHEMES,
    SUPPORTED_BITS,
    UNIFORM_SCHEMES,
    Granularity,
)
from q4c.errors import ConfigError

PLAN_SCHEMA = "q4c.plan/1"
#: bits value meaning "leave this tensor in float"
FLOAT = 32
#: Rounding schemes: "symmetric" picks each group's scale (and clipping) by least squared weight
#: error; "symmetric-absmax" never clips (the group's largest weight is kept exactly), which
#: protects outlier weights that matter more to the output than the weight error says; "gptq"
#: keeps symmetric's scales but rounds with error compensation against the layer's calibration
#: inputs (q4c.quant.gptq), so it needs calibration data. Codebook schemes ("mulaw", "kmeans",
#: "nf4": q4c.quant.codebook) store an index into a float16 table of centroids instead; their
#: granularity names the tables ("tensor", "channel", "channels:G") or nf4's scale blocks.
SCHEMES = (*UNIFORM_SCHEMES, *CODEBOOK_SCHEMES)


@dataclass(frozen=True)
class TensorPrecision:
    bits: int
    granularity: str = "block:32"
    scheme: str = "symmetric"

    def __post_init__(self) -> None:
        # A hand-edited plan may hold any JSON value here: check types before using them.
        if isinstance(self.bits, bool) or not isinstance(self.bits, int):
            raise ConfigError(f"bits must be an integer, not {self.bits!r}")
        if not isinstance(self.granularity, str) or not isinstance(self.scheme, str):
            raise ConfigError(f"granularity and scheme must be strings, not {self.granularity!r}, {self.scheme!r}")
        if self.scheme not in SCHEMES:
            raise ConfigError(f"scheme {self.scheme!r} is not supported (one of {', '.join(SCHEMES)})")
        if self.scheme in CODEBOOK_SCHEMES and self.bits != FLOAT:
            from q4c.quant.codebook import scheme_bits, validate_granularity

            if self.bits not in scheme_bits(self.scheme):
                raise ConfigError(f"the {self.scheme} scheme stores {', '.join(map(str, scheme_bits(self.scheme)))}-bit "
                                  f"indices, not {self.bits}")
            validate_granularity(self.granularity)
            return
        if self.bits not in (*SUPPORTED_BITS, FLOAT):
            raise ConfigError(f"bits must be one of {', '.join(map(str, SUPPORTED_BITS))} or {FLOAT} (float), not {self.bits}")
        Granularity.parse(self.granularity)


@dataclass
class PrecisionPlan:
    """Per weight tensor (by name): bits, granularity, scheme. Tensors absent stay float."""

    tensors: dict[str, TensorPrecision] = field(default_factory=dict)
    defaults: dict[str, object] = field(default_factory=dict)

    def to_json(self) -> dict[str, object]:
        return {
            "schema": PLAN_SCHEMA,
            "defaults": dict(self.defaults),
            "tensors": {name: asdict(tp) for name, tp in sorted(self.tensors.items())},
        }

    @classmethod
    def from_json(cls, doc: Mapping[str, object], source: str = "plan") -> PrecisionPlan:
        if not isinstance(doc, Mapping) or doc.get("schema") != PLAN_SCHEMA:
            raise ConfigError(f"{source}: not a q4c plan (expected schema {PLAN_SCHEMA!r})")
        tensors = doc.get("tensors")
        if not isinstance(tensors, Mapping):
            raise ConfigError(f"{source}: 'tensors' must be an object of name -> {{bits, granularity, scheme}}")
        defaults = doc.get("defaults") or {}
        if not isinstance(defaults, Mapping):
            raise ConfigError(f"{source}: 'defaults' must be an object, not {type(defaults).__name__}")
        plan = cls(defaults=dict(defaults))
        for name, entry in tensors.items():
            try:
                plan.tensors[name] = TensorPrecision(**entry)
            except TypeError as e:
                raise ConfigError(f"{source}: tensor {name!r}: {e}") from e
            except ConfigError as e:
                raise ConfigError(f"{source}: tensor {name!r}: {e}") from e
        return plan

    def save(self, path: str | os.PathLike[str]) -> None:
        from q4c.graph import (
            write_text,  # atomic: an interrupted --save-plan leaves no partial file
        )

        write_text(path, json.dumps(self.to_json(), indent=2, sort_keys=True) + "\n")

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> PrecisionPlan:
        try:
            doc = json.loads(Path(path).read_text())
        except (OSError, ValueError) as e:  # JSONDecodeError, UnicodeDecodeError
            raise ConfigError(f"{path}: cannot read plan: {e}") from e
        return cls.from_json(doc, source=str(path))
