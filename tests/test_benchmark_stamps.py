"""BENCHMARKS.md stamps: every stamped model hash still matches the committed model file.

Sections regenerated since stamps exist carry `<!-- stamp {...} -->` (command, date, sha256 prefix
of each model); this test checks every stamp it finds, so a figure measured on a model that has
since been retrained or re-exported fails here instead of going stale silently. Sections not yet
regenerated have no stamp and are not checked.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
import _common  # noqa: E402


def _stamped_doc(key: str, models: dict[str, str]) -> str:
    doc = {"key": key, "command": "python benchmarks/x.py --write", "date": "2026-12-06", "models": models}
    return f"<!-- {key}:begin -->\n## t\n\n<!-- stamp {json.dumps(doc)} -->\n<!-- {key}:end -->\n"


@pytest.mark.parametrize("document", ["BENCHMARKS.md", "README.md", "models/README.md"])
def test_every_stamped_model_hash_matches_the_committed_file(document):
    text = (REPO / document).read_text()
    assert _common.stale_stamps(text) == []


def test_a_stale_or_missing_model_is_reported(tmp_path):
    (tmp_path / "m.onnx").write_bytes(b"model bytes v2")
    good = hashlib.sha256(b"model bytes v2").hexdigest()[:12]
    old = hashlib.sha256(b"model bytes v1").hexdigest()[:12]
    assert _common.stale_stamps(_stamped_doc("a", {"m.onnx": good}), root=tmp_path) == []
    assert _common.stale_stamps(_stamped_doc("a", {"m.onnx": old}), root=tmp_path) == [
        f"a: m.onnx stamped {old}, file is {good}"]
    assert _common.stale_stamps(_stamped_doc("b", {"gone.onnx": good}), root=tmp_path) == [
        f"b: gone.onnx stamped {good}, file is missing"]


def test_stamp_names_command_date_and_hash_and_replaces_an_older_stamp():
    rows = _common.stamped_rows([{"model": "bilstm_am", "wer": 0.6}])
    line, doc = _common.stamp("task", rows, command="python benchmarks/bench_task.py --write")
    expected = hashlib.sha256((REPO / "models" / "bilstm_am.onnx").read_bytes()).hexdigest()[:12]
    assert doc["models"] == {"models/bilstm_am.onnx": expected}
    assert "python benchmarks/bench_task.py --write" in line and doc["date"] in line and expected in line
    section = "<!-- task:begin -->\n## Task\n\nbody\n<!-- task:end -->"
    once = _common.with_stamp(section, line)
    assert _common.with_stamp(once, line) == once  # restamping replaces, never stacks
    assert _common.stamped_sections(once) == ["task"]


def test_rows_merged_from_an_unstamped_run_are_named_not_given_todays_hash():
    rows = [*_common.stamped_rows([{"model": "bilstm_am"}]), {"model": "lstm_lm", "model_sha256": None}]
    line, doc = _common.stamp("task", _common.stamped_rows(rows), command="c")
    assert list(doc["models"]) == ["models/bilstm_am.onnx"] and doc["unstamped"] == ["lstm_lm"]


def test_stamp_names_a_commit_git_knows():
    import re
    import subprocess

    _, doc = _common.stamp("task", [], command="c")
    first = re.match(r"[0-9a-f]{12}", doc["commit"])
    assert first is not None, doc["commit"]
    kind = subprocess.run(["git", "cat-file", "-t", first.group(0)], cwd=REPO, capture_output=True, text=True)
    assert kind.stdout.strip() == "commit"


def test_a_rerendered_section_names_the_commit_its_rows_were_measured_at():
    rows = [{"model": "bilstm_am", "model_sha256": "abc", "model_file": "models/bilstm_am.onnx", "commit": "0123456789ab"}]
    assert _common.stamp("task", rows, command="c")[1]["commit"] == "0123456789ab"


def test_every_benchmarks_section_carries_its_own_stamp():
    """Every generated section of BENCHMARKS.md names its command, date, commit and model hashes."""
    import re

    text = (REPO / "BENCHMARKS.md").read_text()
    keys = re.findall(r"<!-- ([a-z0-9_-]+):begin -->", text)
    assert len(keys) >= 11
    unstamped = [key for key in keys
                 if key not in _common.stamped_sections(text[text.index(f"<!-- {key}:begin -->"):
                                                             text.index(f"<!-- {key}:end -->")])]
    assert unstamped == []
