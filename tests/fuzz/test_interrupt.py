"""Interrupted and concurrent `q4c compile` runs, as real subprocesses and real signals.

SIGINT or SIGTERM while a pass runs, while the output is being written, or while --save-plan /
--save-calib / --report are written leaves neither the output nor a temporary file beside it,
and the input unchanged. Two compiles writing one output path leave one complete, valid model.

To hit a chosen moment every time, the child process stalls there (a sleep patched into
q4c.pipeline.run_one or q4c.graph.atomic_write, announced on stderr); the signal handling under
test is the real one.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from q4c import graph as g

#: A shell that starts the test suite in the background (no job control) starts it with SIGINT
#: ignored, and children inherit that: the child restores Python's own handler, as an
#: interactive start would have it.
RESTORE_SIGINT = "import signal; signal.signal(signal.SIGINT, signal.default_int_handler)"

CHILD = textwrap.dedent("""
    import contextlib, os, sys, time
    import signal
    signal.signal(signal.SIGINT, signal.default_int_handler)
    stage = os.environ["Q4C_TEST_STALL"]

    def stall():
        sys.stderr.write("STALLED\\n")
        sys.stderr.flush()
        time.sleep(60)

    import q4c.pipeline as pipeline
    run_one = pipeline.run_one

    def slow_run_one(pass_, graph, ctx):
        if pass_.name == stage:
            stall()
        return run_one(pass_, graph, ctx)

    pipeline.run_one = slow_run_one

    import q4c.graph as graph
    atomic_write = graph.atomic_write

    @contextlib.contextmanager
    def slow_atomic_write(path, suffix=".tmp"):
        with atomic_write(path, suffix) as tmp:
            yield tmp
            # the temporary file is complete; the signal comes before the rename
            if str(path).endswith(stage):
                stall()

    graph.atomic_write = slow_atomic_write
    from q4c.cli import main
    main()
""")


def _model(path: Path) -> Path:
    rng = np.random.default_rng(0)
    w1 = (rng.standard_normal((64, 128)) / 8).astype(np.float32)
    w2 = (rng.standard_normal((128, 32)) / 11).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W1"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
         helper.make_node("MatMul", ["r", "W2"], ["y"])], "mlp",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [4, 64])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [4, 32])],
        [numpy_helper.from_array(w1, "W1"), numpy_helper.from_array(w2, "W2")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10), path)
    return path


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _spawn(args: list[str], stall: str | None = None) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if stall is not None:
        env["Q4C_TEST_STALL"] = stall
        cmd = [sys.executable, "-c", CHILD, *args]
    else:
        cmd = [sys.executable, "-c", f"{RESTORE_SIGINT}; from q4c.cli import main; main()", *args]
    return subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.PIPE, env=env, text=True)


def _wait_for(proc: subprocess.Popen, marker: str, timeout: float = 120) -> str:
    """Read stderr lines until one contains `marker`; returns what was read."""
    seen = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if not line:
            break
        seen.append(line)
        if marker in line:
            return "".join(seen)
    proc.kill()
    raise AssertionError(f"{marker!r} never appeared on stderr:\n{''.join(seen)}")


def _interrupt(proc: subprocess.Popen, sig: int) -> tuple[int, str]:
    proc.send_signal(sig)
    try:
        _, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise AssertionError(f"q4c compile did not stop within 60 s of signal {sig}") from None
    return proc.returncode, err


#: (where the child stalls, the signal): every stage once, the file writes with both signals
CASES = [("measure-sensitivity", signal.SIGINT), ("quantize-weights", signal.SIGTERM),
         ("calib.json", signal.SIGTERM), ("out.onnx", signal.SIGINT), ("out.onnx", signal.SIGTERM),
         ("plan.json", signal.SIGINT), ("report.json", signal.SIGTERM)]


@pytest.mark.parametrize(("stage", "sig"), CASES)
def test_signal_leaves_no_partial_output(tmp_path, sig, stage):
    """Stalled at `stage` (a pass, or the rename of a file being written), then signalled."""
    src = _model(tmp_path / "in.onnx")
    before = _sha(src)
    outputs = ["calib.json", "out.onnx", "plan.json", "report.json"]  # the order compile writes them
    proc = _spawn(["-v", "compile", str(src), "-o", str(tmp_path / "out.onnx"), "--save-plan",
                   str(tmp_path / "plan.json"), "--save-calib", str(tmp_path / "calib.json"), "--report",
                   str(tmp_path / "report.json")], stall=stage)
    _wait_for(proc, "STALLED")
    code, err = _interrupt(proc, sig)
    assert code == (1 if sig == signal.SIGINT else 128 + signal.SIGTERM), err
    assert "Traceback" not in err, err
    assert _sha(src) == before
    left = sorted(p.name for p in tmp_path.iterdir() if p.name != "in.onnx")
    # Files finished before the stall stay (complete, atomically renamed); nothing partial or temporary.
    done = outputs[: outputs.index(stage)] if stage in outputs else []
    assert left == sorted(done), f"left behind: {left}"
    if "out.onnx" in done:
        g.check(onnx.load(tmp_path / "out.onnx"))


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_after_first_pass_line_real_timing(tmp_path, sig):
    """No stall: signalled as soon as the first pass line appears. Either the compile finished
    first (exit 0, a complete model) or nothing is left."""
    src = _model(tmp_path / "in.onnx")
    before = _sha(src)
    out = tmp_path / "out.onnx"
    proc = _spawn(["-v", "compile", str(src), "-o", str(out)])
    _wait_for(proc, "[1] fold-constants")
    code, err = _interrupt(proc, sig)
    assert _sha(src) == before
    assert "Traceback" not in err, err
    if code == 0:
        g.check(onnx.load(out))
    else:
        assert code in (1, 128 + signal.SIGTERM), err
        assert sorted(p.name for p in tmp_path.iterdir()) == ["in.onnx"]


def test_two_compiles_to_one_output_leave_one_complete_model(tmp_path):
    """Two processes, --bits 4 and --bits 8, same -o at once: each writes its own temporary
    file and renames it, so the survivor is one whole model, never a mix or a partial one."""
    src = _model(tmp_path / "in.onnx")
    out = tmp_path / "out.onnx"
    procs = [_spawn(["compile", str(src), "-o", str(out), "--bits", str(bits)]) for bits in (4, 8)]
    results = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [r[1][-500:] for r in results]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.onnx", "out.onnx"]
    model = onnx.load(out)
    g.check(model)
    bits = {t.data_type for t in model.graph.initializer}
    assert bits & {onnx.TensorProto.INT4, onnx.TensorProto.INT8, onnx.TensorProto.UINT4}  # one of the two, whole
