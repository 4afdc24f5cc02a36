"""The pipeline's chores: honesty audits, PassError naming the pass, --dump-dir, --check, plugin order."""

from __future__ import annotations

import textwrap

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest

import q4c
from q4c import graph as g
from q4c.config import CompileOptions
from q4c.errors import PassError, PostconditionError
from q4c.pipeline import Pass, PassContext, PassResult, Pipeline
from q4c.testing import matmul_model

PLUGIN = '''
import numpy as np
import onnx_graphsurgeon as gs
from q4c.pipeline import Pass, PassResult


class Liar(Pass):
    """Renames a node and says it did nothing."""

    name = "liar"

    def run(self, graph, ctx):
        graph.nodes[0].name = "renamed"
        return PassResult(False)


class Marker(Pass):
    """Records where it ran."""

    name = "marker"

    def run(self, graph, ctx):
        ctx.warn("marker ran after " + ctx.records[-1].name)
        return PassResult(False)
'''


class _Rename(Pass):
    name = "rename"

    def __init__(self, modified: bool, analysis: bool = False) -> None:
        self.says = modified
        self.analysis = analysis  # type: ignore[misc]

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        graph.nodes[0].name = "renamed"
        return PassResult(self.says)


class _Noop(Pass):
    name = "noop"

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        return PassResult(False)


class _Boom(Pass):
    name = "boom"

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        raise ZeroDivisionError("bug")


def _run(passes, model, **kw):
    graph = g.import_graph(model)
    ctx = PassContext(options=CompileOptions())
    Pipeline(passes, like=model, **kw).run(graph, ctx)
    return ctx


def test_a_pass_that_edits_but_says_unmodified_is_caught_by_the_audit(rng):
    model = matmul_model(rng)
    with pytest.raises(PostconditionError, match="'rename' reported modified=False but the graph changed"):
        _run([_Noop(), _Rename(modified=False)], model, audit=True)
    _run([_Rename(modified=False)], model, audit=False)  # without the audit nobody looks


def test_a_pass_that_says_modified_but_did_nothing_is_caught(rng):
    class Boaster(_Noop):
        name = "boaster"

        def run(self, graph, ctx):
            return PassResult(True)

    with pytest.raises(PostconditionError, match="'boaster' reported modified=True but the graph did not change"):
        _run([Boaster()], matmul_model(rng), audit=True)


def test_an_analysis_that_edits_is_caught_even_when_it_says_so(rng):
    with pytest.raises(PostconditionError, match="'rename' is an analysis but edited the graph"):
        _run([_Rename(modified=True, analysis=True)], matmul_model(rng), audit=True)
    _run([_Rename(modified=True, analysis=False)], matmul_model(rng), audit=True)  # a transform may


def test_pass_error_names_the_pass_and_the_passes_before_it(rng):
    with pytest.raises(PassError) as err:
        _run([_Noop(), _Rename(modified=True), _Boom(), _Noop()], matmul_model(rng))
    message = str(err.value)
    assert "pass 'boom' failed (passes before it: noop, rename)" in message and "ZeroDivisionError" in message
    assert isinstance(err.value.__cause__, ZeroDivisionError)  # the traceback is kept


def test_dump_dir_writes_one_valid_model_per_pass(rng, tmp_path):
    src = tmp_path / "m.onnx"
    onnx.save(matmul_model(rng, k=64, n=32), src)
    report = q4c.compile_file(src, tmp_path / "o.onnx", CompileOptions(bits=4, kernels="low-bit"),
                              dump_dir=tmp_path / "dump", verify=False)
    dumps = sorted((tmp_path / "dump").glob("*.onnx"))
    assert [p.name for p in dumps] == [f"{i:03d}_{r['name']}.onnx" for i, r in enumerate(report["passes"], start=1)]
    for path in dumps:
        onnx.checker.check_model(onnx.load(path), full_check=True)
    last = onnx.load(dumps[-1])
    assert g.op_histogram(last) == g.op_histogram(onnx.load(tmp_path / "o.onnx"))


def test_check_turns_the_audit_on_for_every_pass_including_plugins(rng, tmp_path):
    src = tmp_path / "m.onnx"
    onnx.save(matmul_model(rng, k=64, n=32), src)
    plugin = tmp_path / "plugin.py"
    plugin.write_text(textwrap.dedent(PLUGIN))
    options = CompileOptions(bits=4, kernels="low-bit")
    # without --check the lie goes unnoticed; with it, the pass is named
    q4c.compile_file(src, tmp_path / "a.onnx", options, passes=f"default,+{plugin}:Liar", verify=False)
    with pytest.raises(PostconditionError, match="'liar' reported modified=False"):
        q4c.compile_file(src, tmp_path / "b.onnx", options, passes=f"default,+{plugin}:Liar", verify=False,
                         check_each=True)
    assert not (tmp_path / "b.onnx").exists()


def test_a_plugin_pass_runs_where_the_user_put_it(rng, tmp_path):
    src = tmp_path / "m.onnx"
    onnx.save(matmul_model(rng, k=64, n=32), src)
    plugin = tmp_path / "plugin.py"
    plugin.write_text(textwrap.dedent(PLUGIN))
    spec = f"fold-constants,assign-precision,choose-kernels,{plugin}:Marker,quantize-weights,lower-ort-kernels"
    report = q4c.compile_file(src, tmp_path / "o.onnx", CompileOptions(bits=4, kernels="low-bit"), passes=spec,
                              verify=False)
    assert [p["name"] for p in report["passes"]] == ["fold-constants", "assign-precision", "choose-kernels", "marker",
                                                    "quantize-weights", "lower-ort-kernels"]
    assert "marker ran after choose-kernels" in report["warnings"]
    assert np.prod(report["tensors"][0]["shape"]) == 64 * 32
