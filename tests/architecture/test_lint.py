"""The ruff rule set in pyproject.toml ([tool.ruff]) passes on the repository, and it catches
what it is there for."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
RUFF = shutil.which("ruff")

pytestmark = pytest.mark.skipif(RUFF is None, reason="ruff is in the test extra: pip install -e '.[test]'")


def _ruff(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run([RUFF, "check", "--no-cache", "--output-format", "concise", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=600)


def _tracked_python_files() -> list[str]:
    """The committed .py files (others' unsaved work in a shared checkout is not judged); the
    whole tree outside a git checkout."""
    git = shutil.which("git")
    if git is None:
        return []
    listed = subprocess.run([git, "ls-files", "*.py"], cwd=REPO, capture_output=True, text=True)
    return listed.stdout.split() if listed.returncode == 0 else []


def test_the_repository_passes_the_rule_set():
    result = _ruff(*_tracked_python_files())
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_rule_set_flags_an_unused_import_and_unsorted_imports(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("import sys\nimport os\n\nprint(os.sep)\n")
    result = _ruff("--config", str(REPO / "pyproject.toml"), str(bad), cwd=tmp_path)
    assert result.returncode == 1
    assert "F401" in result.stdout and "I001" in result.stdout, result.stdout
