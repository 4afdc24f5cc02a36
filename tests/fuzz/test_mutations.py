"""Mutated files through the CLI entry points: byte flips, truncations and field edits of model
protobufs (a small bundled model and a tiny built one), .npz samples, plan JSON (--plan) and
calibration-table JSON (--load-calib), through inspect, run, diff and compile.

Property (harness.invoke): exit 0, 1 or 2 (3 for diff over tolerance), one `Error:` line, no
traceback, no internal error; plus the input file unchanged and no output left on failure.
Each test runs a fixed-seed batch and reports every failing case at once.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import mutators as mut
import numpy as np
import onnx
import pytest
from harness import SEED, digest, invoke, leftovers, scaled
from onnx import helper, numpy_helper

REPO = Path(__file__).resolve().parents[2]
#: cases per test in CI (the long script runs many more); ~3000 in all
CASES = {"inspect_bundled": 1000, "inspect_tiny": 700, "run_npz": 300, "run_model_ort": 200, "run_model_interp": 200,
         "diff": 120, "compile_model": 80, "compile_plan": 120, "compile_calib": 80}


def tiny_model() -> onnx.ModelProto:
    """x [1, 4, 16] -> MatMul 16x64 -> LSTM (H 16) -> Softmax: every weight kind compile
    quantizes, small enough that a compile takes ~0.2 s."""
    rng = np.random.default_rng(0)
    f, h = 16, 16
    nodes = [helper.make_node("MatMul", ["x", "W"], ["a"]),
             helper.make_node("Transpose", ["a"], ["at"], perm=[1, 0, 2]),
             helper.make_node("LSTM", ["at", "Wl", "Rl", "Bl"], ["y"], hidden_size=h),
             helper.make_node("Squeeze", ["y", "axis"], ["ys"]),
             helper.make_node("Transpose", ["ys"], ["yt"], perm=[1, 0, 2]),
             helper.make_node("Softmax", ["yt"], ["p"], axis=-1)]
    inits = {"W": rng.standard_normal((f, 64)) / 4, "Wl": rng.standard_normal((1, 4 * h, 64)) / 8,
             "Rl": rng.standard_normal((1, 4 * h, h)) / 4, "Bl": rng.standard_normal((1, 8 * h)) / 10}
    graph = helper.make_graph(
        nodes, "tiny", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 4, f])],
        [helper.make_tensor_value_info("p", onnx.TensorProto.FLOAT, [1, 4, h])],
        [numpy_helper.from_array(v.astype(np.float32), k) for k, v in inits.items()]
        + [numpy_helper.from_array(np.array([1], np.int64), "axis")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)


def make_base(d: Path) -> dict[str, Path]:
    """The tiny model, a sample, its compiled form, a plan and a calibration table (all valid)."""
    paths = {"model": d / "tiny.onnx", "data": d / "tiny.npz", "compiled": d / "tiny.q4.onnx",
             "plan": d / "plan.json", "calib": d / "calib.json", "bundled": REPO / "models" / "lstm_scan.onnx"}
    onnx.save(tiny_model(), paths["model"])
    np.savez(paths["data"], x=np.random.default_rng(1).standard_normal((1, 4, 16)).astype(np.float32))
    out = invoke(["compile", str(paths["model"]), "-o", str(paths["compiled"]), "--bits", "4", "--calib",
                  str(paths["data"]), "--save-plan", str(paths["plan"]), "--save-calib", str(paths["calib"])])
    assert out.exit_code == 0, out.stderr
    return paths


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> dict[str, Path]:
    return make_base(tmp_path_factory.mktemp("base"))


@dataclass(frozen=True)
class Entry:
    """One fuzzed entry point: which base file is mutated, how, and the command run on it."""

    source: str  # key of make_base()
    mutators: tuple
    command: Callable[[Path, dict[str, Path], Path], list[str]]  # (mutant, base, output path) -> args
    suffix: str = ".onnx"
    output: str | None = None  # file name the command writes (checked absent after a failure)
    ok_codes: tuple[int, ...] = (0, 1, 2)


ENTRIES = {
    # models/lstm_scan.onnx: a Scan body and shared weights, 430 KB
    "inspect_bundled": Entry("bundled", mut.MODEL_MUTATORS, lambda p, b, o: ["inspect", str(p), "--json"]),
    "inspect_tiny": Entry("model", mut.MODEL_MUTATORS, lambda p, b, o: ["inspect", str(p)]),
    "run_npz": Entry("data", (mut.mutate_npz,), lambda p, b, o: ["run", str(b["model"]), "--data", str(p), "-o", str(o)],
                     suffix=".npz", output="out.npz"),
    "run_model_ort": Entry("model", mut.MODEL_MUTATORS,
                           lambda p, b, o: ["run", str(p), "--data", str(b["data"]), "-o", str(o)], output="out.npz"),
    "run_model_interp": Entry("model", mut.MODEL_MUTATORS,
                              lambda p, b, o: ["run", str(p), "--data", str(b["data"]), "--backend", "interp"]),
    "diff": Entry("compiled", mut.MODEL_MUTATORS,
                  lambda p, b, o: ["diff", str(b["model"]), str(p), "--data", str(b["data"])], ok_codes=(0, 1, 2, 3)),
    "compile_model": Entry("model", mut.MODEL_MUTATORS,
                           lambda p, b, o: ["compile", str(p), "-o", str(o), "--bits", "4", "--kernels", "fp32-at-load"],
                           output="out.onnx"),
    "compile_plan": Entry("plan", (mut.mutate_json,),
                          lambda p, b, o: ["compile", str(b["model"]), "-o", str(o), "--plan", str(p),
                                           "--kernels", "fp32-at-load"], suffix=".json", output="out.onnx"),
    "compile_calib": Entry("calib", (mut.mutate_json,),
                           lambda p, b, o: ["compile", str(b["model"]), "-o", str(o), "--bits", "8", "--activations",
                                            "int8", "--load-calib", str(p)], suffix=".json", output="out.onnx"),
}


def fuzz_entry(name: str, base: dict[str, Path], tmp_path: Path, cases: int, seed: int = SEED):
    """Run `cases` mutants through entry `name`; returns (failures [(case, mutation, message)],
    exit code counts). Failing mutants are kept in tmp_path as failed_<case>."""
    entry = ENTRIES[name]
    original = base[entry.source].read_bytes()
    rng = np.random.default_rng([seed, sum(map(ord, name))])  # fixed per entry, independent of order
    out = tmp_path / (entry.output or "unused")
    failures, counts = [], {}
    for case in range(cases):
        kind, data = entry.mutators[int(rng.integers(0, len(entry.mutators)))](original, rng)
        path = tmp_path / f"mutant{entry.suffix}"
        path.write_bytes(data)
        before = digest(path)
        out.unlink(missing_ok=True)
        try:
            result = invoke(entry.command(path, base, out), timeout=60)
            counts[result.exit_code] = counts.get(result.exit_code, 0) + 1
            assert result.exit_code in entry.ok_codes, f"exit {result.exit_code}: {result.stderr[-500:]}"
            assert digest(path) == before, "input file changed"
            if result.exit_code not in (0, 3):
                assert not out.exists(), "output left after a failure"
            stray = [f for f in leftovers(tmp_path, [path, out]) if f.startswith(".")]
            assert not stray, f"temporary files left: {stray}"
        except AssertionError as e:
            failures.append((case, kind, str(e)[:700]))
            (tmp_path / f"failed_{case}{entry.suffix}").write_bytes(data)
    return failures, counts


@pytest.mark.parametrize("name", sorted(ENTRIES))
def test_mutants_keep_the_cli_contract(tmp_path, base, name):
    failures, counts = fuzz_entry(name, base, tmp_path, scaled(CASES[name]))
    assert not failures, f"{len(failures)} failing mutants:\n" + "\n".join(map(str, failures[:15]))
    # Both outcomes reached: the mutants are neither all junk nor all harmless.
    assert counts.get(1, 0) > 0, counts
    if name != "compile_model":
        assert counts.get(0, 0) + counts.get(3, 0) > 0, counts


def test_plan_and_table_fixtures_are_valid(base):
    """The unmutated plan and table replay (so mutants start from something that works)."""
    plan = json.loads(base["plan"].read_text())
    assert set(plan["tensors"]) == {"W", "Wl", "Rl"}
    assert json.loads(base["calib"].read_text())["schema"] == "q4c.calib/1"
