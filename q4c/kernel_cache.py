"""Per-machine cache of `--kernels auto` decisions, so the same command on the same machine writes
the same bytes.

`--kernels auto` times two ONNX Runtime forms of a compiled model (MatMulNBits kept, or weights
folded to FP32 at load) and keeps the faster; the choice changes the stored weights (float16 vs
float32 scales, block size). Timed afresh on every compile, a loaded machine could flip it from
one run to the next. So the first compile measures and records the decision here, keyed by
everything the timing depends on: the machine (architecture, CPU model, CPU count, OS), the
ONNX Runtime version, what decides both forms without building them (the unquantized graph's
digest and the plan: bits, scheme, granularity and form per weight) and the shapes and dtypes of
the timed inputs; later compiles with the same key reuse it without timing or quantizing. The
compile report says which happened (`kernel_choice.source`: "measured" or "cache") and names the cache file and key.

The cache is one JSON file, ~/.cache/q4c/kernels.json ({key: entry}); delete it (or an entry) to
measure again. It is written atomically (temporary file, then rename); a cache that cannot be
read or written is ignored, and the report says so (`cached: false`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

#: 2: keyed on the unquantized graph and the plan, not on the two built models
VERSION = 2


def cache_path() -> Path:
    return Path.home() / ".cache" / "q4c" / "kernels.json"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine() -> dict[str, Any]:
    """What the timing depends on besides the model: this machine and the ONNX Runtime version."""
    import onnxruntime

    return {"arch": platform.machine(), "cpu": _cpu_model(), "cpus": os.cpu_count(), "system": platform.system(),
            "onnxruntime": onnxruntime.__version__}


def key(parts: Mapping[str, Any], feeds: Mapping[str, np.ndarray]) -> str:
    """Hex key of (cache version, machine, `parts`: JSON-able values that decide the two timed
    models, e.g. a graph digest and the plan; the inputs' shapes and dtypes)."""
    doc = {"version": VERSION, "machine": machine(), "parts": dict(parts),
           "feeds": {k: [list(v.shape), str(v.dtype)] for k, v in sorted(feeds.items())}}
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:32]


def _read(path: Path) -> dict[str, Any]:
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return doc if isinstance(doc, dict) else {}


def lookup(cache_key: str, path: Path | None = None) -> dict[str, Any] | None:
    entry = _read(path or cache_path()).get(cache_key)
    return entry if isinstance(entry, dict) and entry.get("chosen") in ("low-bit", "fp32-at-load") else None


def record(cache_key: str, entry: Mapping[str, Any], path: Path | None = None) -> bool:
    """Add `entry` under `cache_key`; False (and a DEBUG log) when the cache cannot be written."""
    path = path or cache_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        doc = _read(path)
        doc[cache_key] = dict(entry)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".kernels-", suffix=".json")
        with os.fdopen(fd, "w") as f:
            json.dump(doc, f, indent=1, sort_keys=True)
        os.replace(tmp, path)
        return True
    except OSError as e:
        logger.debug("kernel cache %s not written: %s", path, e)
        return False


__all__ = ["cache_path", "machine", "key", "lookup", "record", "VERSION"]
