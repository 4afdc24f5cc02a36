"""`q4c compile` on generated models: a valid, verified output, or exit 1 with one line.

Each example draws a model (strategies.models) and one of the option sets below. Success means
the written model passes the full checker, loads in ONNX Runtime, and q4c's interpreter agrees
with ONNX Runtime on a fresh sample within 1e-4 of the output's magnitude (checked here, apart
from compile's own verification). NaN/inf weights must be refused naming the tensor, unless
--allow-nonfinite.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from harness import digest, invoke, leftovers, scaled
from hypothesis import event, given, settings
from hypothesis import strategies as st
from strategies import BLOCKS, GeneratedModel, feeds_for, models

from q4c import graph as g
from q4c.testing import run_interp, run_ort
from q4c.verify import float_accuracy_copy

OPTION_SETS = (
    (),
    ("--bits", "4"),
    ("--bits", "2"),
    ("--bits", "8", "--granularity", "channel"),
    ("--kernels", "fp32-at-load"),
    ("--kernels", "low-bit"),
)
#: per compile (a hang fails, not a slow machine): CI examples take <= 2 s, the slowest seen in
#: fuzz_long 60 s on a loaded machine
COMPILE_TIMEOUT = 120.0
#: interpreter vs ONNX Runtime on the compiled model, relative to the output's largest magnitude
RTOL = 1e-4


def check_compile(tmp_path, gm: GeneratedModel, options: tuple[str, ...]) -> str:
    """Compile `gm` with `options` and assert the contract; returns 'ok' or the error line."""
    src, out = tmp_path / "m.onnx", tmp_path / "m.q4.onnx"
    for p in tmp_path.iterdir():
        p.unlink()
    onnx.save(gm.model, src)
    before = digest(src)
    result = invoke(["compile", str(src), "-o", str(out), *options], timeout=COMPILE_TIMEOUT)
    assert digest(src) == before, "the input model changed"
    if gm.nonfinite is not None and "--allow-nonfinite" not in options:
        assert result.exit_code == 1, f"NaN/inf weight {gm.nonfinite} compiled (exit {result.exit_code})"
        assert gm.nonfinite in result.error, result.error
    if result.exit_code != 0:
        assert result.exit_code == 1, f"exit {result.exit_code}: {result.stderr}"
        assert leftovers(tmp_path, [src]) == [], "files left behind by a failed compile"
        return result.error
    assert leftovers(tmp_path, [src, out]) == [], "temporary files left beside the output"
    compiled = onnx.load(out)
    g.check(compiled)
    feeds = feeds_for(gm.model, seed=1)
    want = run_interp(compiled, feeds)
    got = run_ort(float_accuracy_copy(compiled), feeds)
    for name, ref in got.items():
        scale = float(np.max(np.abs(ref))) if ref.size and np.all(np.isfinite(ref)) else 1.0
        np.testing.assert_allclose(want[name], ref, rtol=0, atol=RTOL * max(scale, 1e-3), err_msg=f"{name}: interp vs ORT")
    return "ok"


@settings(max_examples=scaled(40))
@given(gm=models(), option=st.sampled_from(OPTION_SETS))
def test_compile_writes_a_verified_model_or_one_error_line(tmp_path_factory, gm, option):
    outcome = check_compile(tmp_path_factory.mktemp("gen"), gm, option)
    event("compiled" if outcome == "ok" else outcome.split(":")[1].strip()[:40])  # --hypothesis-show-statistics


@settings(max_examples=scaled(12))
@given(gm=models(nonfinite=True, max_blocks=2), allow=st.booleans())
def test_nonfinite_weights_refused_naming_the_tensor(tmp_path_factory, gm, allow):
    check_compile(tmp_path_factory.mktemp("nan"), gm, ("--bits", "4") + (("--allow-nonfinite",) if allow else ()))


@pytest.mark.parametrize("block", BLOCKS)
@settings(max_examples=scaled(2))
@given(data=st.data())
def test_every_block_compiles(tmp_path_factory, block, data):
    """Each block kind on its own (so none is starved by the random mix above), at 4 bits."""
    gm = data.draw(models(blocks=(block,), max_blocks=1, opsets=(17, 21)))
    check_compile(tmp_path_factory.mktemp(block), gm, ("--bits", "4"))


def test_generator_is_valid():
    """The generator's models pass the full checker and ONNX Runtime agrees with the interpreter
    on them (else a compile failure could be the generator's fault)."""

    @settings(max_examples=scaled(30))
    @given(models())
    def one(gm):
        g.check(gm.model)
        feeds = feeds_for(gm.model)
        want = run_interp(gm.model, feeds)
        if gm.ort_runs:
            for name, ref in run_ort(gm.model, feeds).items():
                np.testing.assert_allclose(want[name], ref, rtol=1e-4, atol=1e-4, err_msg=name)

    one()
