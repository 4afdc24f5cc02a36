"""Measured cost of each (layer shape, form, bits) in ONNX Runtime, cached per machine and version.

A cost is the median process-CPU time of one call of a one-layer model (q4c.latency.micro) at
1 intra-op thread, the forms of one shape timed interleaved with each other (q4c.timing), so
their ratios are taken under the same machine load. Each timed sample runs the call several
times so it lasts about SAMPLE_SECONDS (a single call of a small layer is a few microseconds).

Cache: ~/.cache/q4c/costs/<machine key>.json, one file per machine key = sha256 of (cache
version, architecture, CPU model string, CPU count, OS, ONNX Runtime version): a different ONNX
Runtime (or CPU) reads a different file, so its costs are measured afresh. Inside, entries are
keyed by shape + form + bits and record when they were measured; reports carry the machine key
and the age of the oldest entry used. Delete the directory to measure everything again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from q4c import kernel_cache
from q4c import ort as q4ort
from q4c.latency.forms import NOT_PLANNED, SESSION_CONFIG, Form, LayerShape, timed_bits
from q4c.latency.micro import layer_feeds, layer_model
from q4c.quant.plan import FLOAT
from q4c.timing import interleaved

logger = logging.getLogger(__name__)

VERSION = 1
#: Target length of one timed sample (calls are repeated to reach it).
SAMPLE_SECONDS = 0.004
#: Interleaved rounds per shape: at least MIN_ROUNDS, at most MAX_ROUNDS or ROUND_SECONDS of wall time.
MIN_ROUNDS, MAX_ROUNDS, ROUND_SECONDS = 5, 25, 1.5


def cache_dir() -> Path:
    return Path.home() / ".cache" / "q4c" / "costs"


def machine_key() -> str:
    """Hex key of what micro-benchmark costs depend on besides the layer: the machine and ONNX Runtime."""
    doc = {"version": VERSION, "machine": kernel_cache.machine()}
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:24]


def entry_key(shape: LayerShape, form: Form, bits: int) -> str:
    return json.dumps({"shape": shape.to_json(), "form": form.value, "bits": bits}, sort_keys=True)


@dataclass
class CostCache:
    """The cost entries of this machine key, read from and written to one JSON file."""

    key: str
    path: Path
    entries: dict[str, dict[str, Any]] = field(default_factory=dict)
    writable: bool = True

    @classmethod
    def open(cls, directory: Path | None = None) -> CostCache:
        key = machine_key()
        path = (directory or cache_dir()) / f"{key}.json"
        try:
            doc = json.loads(path.read_text())
        except FileNotFoundError:
            doc = {}
        except (OSError, ValueError) as e:
            logger.warning("cost cache %s unreadable (%s): measuring afresh", path, e)
            doc = {}
        entries = doc.get("entries") if isinstance(doc, dict) and doc.get("key") == key else None
        return cls(key, path, dict(entries) if isinstance(entries, dict) else {})

    def get(self, shape: LayerShape, form: Form, bits: int) -> dict[str, Any] | None:
        entry = self.entries.get(entry_key(shape, form, bits))
        return entry if isinstance(entry, dict) and isinstance(entry.get("seconds"), (int, float)) else None

    def put(self, shape: LayerShape, form: Form, bits: int, seconds: float, rounds: int) -> None:
        self.entries[entry_key(shape, form, bits)] = {"seconds": seconds, "rounds": rounds, "measured_at": time.time()}

    def save(self) -> bool:
        """Write atomically; False (and a warning) when the directory cannot be written."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            doc = {"key": self.key, "machine": kernel_cache.machine(), "version": VERSION, "entries": self.entries}
            fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".costs-", suffix=".json")
            with os.fdopen(fd, "w") as f:
                json.dump(doc, f, indent=1, sort_keys=True)
            os.replace(tmp, self.path)
            return True
        except OSError as e:
            logger.warning("cost cache %s not written: %s", self.path, e)
            self.writable = False
            return False


@dataclass
class CostTable:
    """Seconds per call of each (shape, form, bits) asked for, and where they came from."""

    seconds: dict[tuple[LayerShape, Form, int], float] = field(default_factory=dict)
    cache_key: str = ""
    cache_path: str = ""
    measured: int = 0
    cached: int = 0
    oldest: float | None = None  # measured_at of the oldest entry used

    def cost(self, shape: LayerShape, form: Form, bits: int) -> float:
        """Seconds per call; forms that run in float cost the FP32 op whatever the stored bits."""
        return self.seconds[(shape, form, timed_bits(form, bits))]

    def report(self) -> dict[str, Any]:
        age = None if self.oldest is None else round(time.time() - self.oldest, 1)
        return {"cache_key": self.cache_key, "cache_path": self.cache_path, "entries_measured": self.measured,
                "entries_cached": self.cached, "oldest_entry_age_s": age,
                "timing": "process-CPU median per call, 1 intra-op thread, forms of a shape interleaved",
                "forms_not_planned": dict(NOT_PLANNED)}


def _repeat(call, target: float) -> int:
    start = time.process_time()
    call()
    once = max(time.process_time() - start, 1e-6)
    return max(1, min(1000, int(target / once)))


def measure_shape(shape: LayerShape, variants: Iterable[tuple[Form, int]]) -> dict[tuple[Form, int], tuple[float, int]]:
    """Time the variants of one shape interleaved: {(form, bits): (seconds per call, rounds)}."""
    feeds = layer_feeds(shape)
    calls = {}
    for form, bits in variants:
        session = q4ort.make_session(layer_model(shape, form, bits), threads=1, config=SESSION_CONFIG.get(form, {}))
        calls[(form, bits)] = (lambda s=session: s.run(None, feeds))
    repeats = {v: _repeat(c, SAMPLE_SECONDS) for v, c in calls.items()}
    subjects = {f"{f.value}:{b}": (lambda c=c, r=repeats[(f, b)]: [c() for _ in range(r)])
                for (f, b), c in calls.items()}
    timing = interleaved(subjects, rounds=MAX_ROUNDS, min_rounds=MIN_ROUNDS, max_seconds=ROUND_SECONDS)
    return {(f, b): (timing.median(f"{f.value}:{b}") / repeats[(f, b)], timing.rounds) for (f, b) in calls}


def costs(wanted: Mapping[LayerShape, Iterable[tuple[Form, int]]], cache: CostCache | None = None) -> CostTable:
    """Seconds per call of every (shape, form, bits) in `wanted`, measured or from the cache.

    The FP32 form is always timed with a shape's other variants (ratios to it stay coherent)."""
    cache = cache or CostCache.open()
    table = CostTable(cache_key=cache.key, cache_path=str(cache.path))
    dirty = False
    for shape, variants in wanted.items():
        variants = sorted({(f, timed_bits(f, b)) for f, b in variants} | {(Form.FP32_AT_LOAD, FLOAT)},
                          key=lambda v: (v[0].value, v[1]))
        hits = {v: cache.get(shape, *v) for v in variants}
        if all(hits.values()):
            for v, entry in hits.items():
                table.seconds[(shape, *v)] = float(entry["seconds"])
                table.cached += 1
                at = float(entry.get("measured_at", time.time()))
                table.oldest = at if table.oldest is None else min(table.oldest, at)
            continue
        logger.info("timing %s: %s", shape.label(), ", ".join(f"{f.value}:{b}" for f, b in variants))
        for v, (seconds, rounds) in measure_shape(shape, variants).items():
            cache.put(shape, *v, seconds, rounds)
            table.seconds[(shape, *v)] = seconds
            table.measured += 1
        table.oldest = table.oldest or time.time()
        dirty = True
    if dirty:
        cache.save()
    return table


__all__ = ["VERSION", "CostCache", "CostTable", "cache_dir", "costs", "entry_key", "machine_key", "measure_shape"]
