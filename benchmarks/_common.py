"""What the benchmark scripts share: paths, the bundled model list, and publishing results
(benchmarks/results/<key>.json and the <key> section of BENCHMARKS.md)."""

from __future__ import annotations

import json
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MODELS = REPO / "models"
RESULTS = REPO / "benchmarks" / "results"


def bundled_models() -> list[str]:
    return sorted(p.stem for p in MODELS.glob("*.onnx") if not p.name.endswith(".q4.onnx"))


def write_section(path: Path, section: str, key: str) -> None:
    """Replace the text between `<!-- key:begin -->` and `<!-- key:end -->` (or append it)."""
    begin, end = f"<!-- {key}:begin -->", f"<!-- {key}:end -->"
    text = path.read_text() if path.exists() else "# Benchmarks\n\nEvery figure here is produced by a committed script; rerun it to check.\n"
    if begin in text and end in text:
        text = text[: text.index(begin)] + section + text[text.index(end) + len(end):]
    else:
        text = text.rstrip() + "\n\n" + section + "\n"
    path.write_text(text)


def merged(key: str, rows: list[dict], names: list[str]) -> list[dict]:
    """`rows` plus the saved rows of every model not rerun now (`--merge`), by model name."""
    saved = RESULTS / f"{key}.json"
    if not saved.exists():
        return rows
    kept = [r for r in json.loads(saved.read_text()) if r["model"] not in names]
    return sorted(kept + rows, key=lambda r: r["model"])  # stable: each model's rows keep their order


def publish(key: str, rows: list[dict], section: str) -> None:
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{key}.json").write_text(json.dumps(rows, indent=2, default=str) + "\n")
    write_section(REPO / "BENCHMARKS.md", section, key)


def run(key: str, names: list[str], measure: Callable[[str, Path], list[dict]], render: Callable[[list[dict]], str],
        *, merge: bool, write: bool) -> None:
    """Measure each model (in a scratch directory), optionally keep the other models' saved
    rows, print the BENCHMARKS.md section and, with `write`, publish it."""
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            print(f"bench: {name}", file=sys.stderr)
            rows.extend(measure(name, Path(tmp)))
    if merge:
        rows = merged(key, rows, names)
    section = render(rows)
    print(section)
    if write:
        publish(key, rows, section)
