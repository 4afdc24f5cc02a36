"""The layering of q4c, as import-linter contracts in pyproject.toml ([tool.importlinter]).

The contracts hold on the code as it is, and each one can fail: a copy of the package with one
planted import breaks exactly the contract that forbids it.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("importlinter", reason="import-linter is in the test extra: pip install -e '.[test]'")

REPO = Path(__file__).resolve().parents[2]
LAYERS = "Layers: the CLI on top"
ORACLE = "The interpreter is an independent oracle"
PASSES = "Passes do not import the CLI"
HALVES = "Recurrent fusion and recurrent lowering are independent halves"
CONTRACTS = (LAYERS, ORACLE, PASSES, HALVES)


def _lint(root: Path) -> subprocess.CompletedProcess:
    """`lint-imports` over the q4c and passes packages found under `root` (first on the path)."""
    env = {**os.environ, "PYTHONPATH": str(root), "COLUMNS": "400"}
    script = "import sys; from importlinter.cli import lint_imports_command; sys.exit(lint_imports_command())"
    return subprocess.run([sys.executable, "-c", script, "--no-cache"], cwd=root, env=env, capture_output=True,
                          text=True, timeout=600)


def _verdicts(output: str) -> dict[str, str]:
    """{contract name prefix: KEPT or BROKEN} from the lint-imports summary (lines may wrap)."""
    flat = " ".join(output.split())
    verdicts = {}
    for name in CONTRACTS:
        found = re.search(re.escape(name) + r".*?\b(KEPT|BROKEN)\b", flat)
        assert found, f"contract {name!r} missing from the report:\n{output}"
        verdicts[name] = found.group(1)
    return verdicts


def test_the_contracts_hold():
    result = _lint(REPO)
    assert result.returncode == 0, result.stdout + result.stderr
    assert set(_verdicts(result.stdout).values()) == {"KEPT"}


@pytest.mark.parametrize(("path", "line", "broken"), [
    ("q4c/interp/__init__.py", "import q4c.compiler", {LAYERS, ORACLE}),
    ("q4c/interp/ops/math.py", "import onnxruntime", {ORACLE}),
    ("passes/fold_constants.py", "import q4c.cli", {PASSES}),
    ("q4c/recurrent_lowering/emit.py", "import q4c.recurrent_fusion.view", {HALVES}),  # down a layer, still forbidden
    ("q4c/recurrent_fusion/view.py", "import q4c.recurrent_lowering.emit", {HALVES, LAYERS}),
    ("q4c/graph.py", "import q4c.calib.table", {LAYERS}),
    ("q4c/metrics.py", "import q4c.interp", {LAYERS}),
    ("q4c/calib/table.py", "import q4c.recurrent_fusion.view", {LAYERS}),  # siblings stay independent
    ("q4c/calib/table.py", "import q4c.quant.plan", {LAYERS}),  # calibration below quantization
    ("q4c/quant/weights.py", "import q4c.recurrent_lowering.emit", {LAYERS}),  # quantization below lowering
    ("q4c/recurrent_lowering/emit.py", "import q4c.verify", {LAYERS}),  # lowering below verification
    # the cycle the leaf q4c.latency.budget broke: quant -> config -> latency.planner -> recurrent_lowering
    ("q4c/config.py", "import q4c.latency.planner", {LAYERS}),
])
def test_a_planted_import_breaks_its_contract(tmp_path, path, line, broken):
    for name in ("q4c", "passes"):
        shutil.copytree(REPO / name, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "pyproject.toml", tmp_path / "pyproject.toml")
    target = tmp_path / path
    target.write_text(target.read_text() + f"\n{line}  # planted\n")
    result = _lint(tmp_path)
    assert result.returncode != 0
    verdicts = _verdicts(result.stdout)
    assert {name for name, v in verdicts.items() if v == "BROKEN"} == broken, result.stdout
