"""Every non-quantizing pass alone on generated models: the output passes the full checker and
computes what the input computed (interpreter, 1e-5 of the output's magnitude), `modified` is
honest (the pipeline's fingerprint audit, q4c.testing.run_pass), and a second run changes
nothing. Through the CLI too (`q4c compile --passes X`), whose own verification must pass.

Models are drawn at opset 21, what compile converts every input to before the passes run.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from harness import invoke, scaled
from hypothesis import given, settings
from hypothesis import strategies as st
from q4c.passes import BUILTIN_PASSES
from strategies import feeds_for, models

from q4c import graph as g
from q4c.errors import Q4cError
from q4c.testing import run_interp, run_pass

#: the passes that promise equivalence (the quantizing ones are judged by compile's tests)
EQUIVALENT = [name for name in ("fold-constants", "fuse-lstm-gates", "lower-gemm", "lower-pointwise-conv",
                                "dedupe-weights", "synthesize-constants") if name in BUILTIN_PASSES]
RTOL = 1e-5


def _assert_same(before: dict[str, np.ndarray], after: dict[str, np.ndarray], what: str) -> None:
    assert before.keys() == after.keys(), what
    for name, ref in before.items():
        scale = max(float(np.max(np.abs(ref))) if ref.size else 0.0, 1.0)
        np.testing.assert_allclose(after[name], ref, rtol=RTOL, atol=RTOL * scale, err_msg=f"{what}: {name}")


def check_pass_on(name: str, gm) -> None:
    """The properties of pass `name` on generated model `gm` (AssertionError if one fails)."""
    feeds = feeds_for(gm.model, seed=2)
    want = run_interp(gm.model, feeds)
    try:
        out, _ = run_pass(BUILTIN_PASSES[name](), gm.model)  # audit=True: raises on a dishonest `modified`
    except Q4cError as e:  # a pass may refuse a graph, in one line (not a crash)
        assert "\n" not in str(e), str(e)
        return
    g.check(out)
    _assert_same(want, run_interp(out, feeds), f"{name} changed the outputs of {gm}")
    again, second = run_pass(BUILTIN_PASSES[name](), out)
    assert not second.modified, f"{name} is not idempotent on {gm}: second run {second.stats}"
    assert g.fingerprint(again) == g.fingerprint(out)


@pytest.mark.parametrize("name", EQUIVALENT)
@settings(max_examples=scaled(20))
@given(data=st.data())
def test_pass_preserves_semantics_is_honest_and_idempotent(name, data):
    check_pass_on(name, data.draw(models(opsets=(21,), min_weight=0)))


@pytest.mark.parametrize("name", EQUIVALENT)
@settings(max_examples=scaled(2))
@given(data=st.data())
def test_cli_passes_alone(tmp_path_factory, name, data):
    """`q4c compile M --passes NAME`: exit 0 with an equivalent model (or one error line)."""
    gm = data.draw(models(opsets=(17, 21), max_blocks=3, min_weight=0))
    d = tmp_path_factory.mktemp(name)
    src, out = d / "m.onnx", d / "out.onnx"
    onnx.save(gm.model, src)
    result = invoke(["compile", str(src), "-o", str(out), "--passes", name])
    if result.exit_code != 0:
        assert result.exit_code == 1 and not out.exists()
        return
    feeds = feeds_for(gm.model, seed=3)
    _assert_same(run_interp(gm.model, feeds), run_interp(onnx.load(out), feeds), f"--passes {name} on {gm}")
