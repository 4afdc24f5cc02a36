"""CalibrationTable: per-tensor activation statistics and clipping ranges, as a JSON file
(`--save-calib` / `--load-calib`, schema q4c.calib/1)."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from q4c.calib.observers import OBSERVERS, uint8_qparams
from q4c.errors import ConfigError

CALIB_SCHEMA = "q4c.calib/1"


@dataclass(frozen=True)
class TensorStats:
    """What calibration saw of one tensor. `lo`/`hi` is the clipping range the observer chose;
    `source` is "ort" (a graph tensor) or "probe" (an LSTM/GRU internal from the interpreter,
    keyed `node::what`); `state` marks a stateful model's state input."""

    min: float
    max: float
    mean: float
    std: float
    count: int
    lo: float
    hi: float
    source: str = "ort"
    state: bool = False

    def qparams(self) -> tuple[float, int]:
        """uint8 asymmetric (scale, zero point) for the clipping range."""
        return uint8_qparams(self.lo, self.hi)


@dataclass
class CalibrationTable:
    """Statistics by tensor name, with how they were gathered."""

    observer: str
    tensors: dict[str, TensorStats] = field(default_factory=dict)
    #: samples (sequences) and model calls they made
    samples: int = 0
    calls: int = 0
    #: output -> input pairs whose state was carried between calls
    state_pairs: dict[str, str] = field(default_factory=dict)
    #: q4c.graph.fingerprint of the model calibrated, to warn when a table is replayed elsewhere
    model: str = ""

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def __getitem__(self, name: str) -> TensorStats:
        return self.tensors[name]

    def range(self, name: str) -> tuple[float, float]:
        s = self.tensors[name]
        return s.lo, s.hi

    def qparams(self, name: str) -> tuple[float, int]:
        return self.tensors[name].qparams()

    def to_json(self) -> dict[str, Any]:
        return {
            "schema": CALIB_SCHEMA,
            "observer": self.observer,
            "samples": self.samples,
            "calls": self.calls,
            "state_pairs": dict(sorted(self.state_pairs.items())),
            "model": self.model,
            "tensors": {name: _finite(asdict(s)) for name, s in sorted(self.tensors.items())},
        }

    @classmethod
    def from_json(cls, doc: Mapping[str, Any], source: str = "calibration table") -> CalibrationTable:
        if not isinstance(doc, Mapping) or doc.get("schema") != CALIB_SCHEMA:
            raise ConfigError(f"{source}: not a q4c calibration table (expected schema {CALIB_SCHEMA!r})")
        observer = doc.get("observer")
        if observer not in OBSERVERS:
            raise ConfigError(f"{source}: unknown observer {observer!r}")
        tensors = doc.get("tensors")
        if not isinstance(tensors, Mapping):
            raise ConfigError(f"{source}: 'tensors' must be an object of name -> statistics")
        try:
            samples, calls = int(doc.get("samples", 0)), int(doc.get("calls", 0))
            state_pairs = {str(k): str(v) for k, v in dict(doc.get("state_pairs") or {}).items()}
        except (TypeError, ValueError, OverflowError) as e:
            raise ConfigError(f"{source}: 'samples' and 'calls' must be integers and 'state_pairs' an object "
                              f"of output -> input names ({e})") from e
        table = cls(observer=str(observer), samples=samples, calls=calls, state_pairs=state_pairs,
                    model=str(doc.get("model", "")))
        for name, entry in tensors.items():
            try:
                stats = TensorStats(**entry)
            except TypeError as e:
                raise ConfigError(f"{source}: tensor {name!r}: {e}") from e
            if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in (stats.lo, stats.hi)) or stats.lo > stats.hi:
                raise ConfigError(f"{source}: tensor {name!r}: range [{stats.lo}, {stats.hi}] is not a finite interval")
            table.tensors[name] = stats
        return table

    def save(self, path: str | os.PathLike[str]) -> None:
        from q4c.graph import write_json

        write_json(path, self.to_json(), indent=1)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> CalibrationTable:
        from q4c.graph import read_json

        return cls.from_json(read_json(path, "calibration table"), source=str(path))


def _finite(entry: dict[str, Any]) -> dict[str, Any]:
    """JSON has no infinity: a tensor never observed keeps 0-width statistics."""
    return {k: (0.0 if isinstance(v, float) and not math.isfinite(v) else v) for k, v in entry.items()}
