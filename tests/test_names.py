"""q4c.names (the one fresh-name rule) and q4c.nomatch (the one matcher decline type)."""

import numpy as np
import onnx_graphsurgeon as gs
import pytest

from q4c import graph as g
from q4c.names import NameGenerator, fresh_tag, unique_name, used_names
from q4c.nomatch import NoMatch


def _graph_with_body() -> gs.Graph:
    x = gs.Variable("x", np.float32, [2])
    inner_out = gs.Variable("w", np.float32, [2])
    body = gs.Graph(nodes=[gs.Node("Identity", "inner", inputs=[x], outputs=[inner_out])], inputs=[], outputs=[inner_out])
    cond = gs.Variable("cond", np.bool_, [])
    y = gs.Variable("y", np.float32, [2])
    node = gs.Node("If", "branch", attrs={"then_branch": body, "else_branch": body}, inputs=[cond], outputs=[y])
    return gs.Graph(nodes=[node], inputs=[cond, x], outputs=[y])


def test_names_in_subgraphs_are_taken():
    graph = _graph_with_body()
    assert used_names(graph) == {"x", "w", "inner", "cond", "y", "branch"}
    assert unique_name(graph, "w") == "w_1"
    assert g.unique_name(graph, "w") == "w_1"  # the graph module's form follows the same rule
    assert unique_name(graph, "fresh") == "fresh"


def test_generator_remembers_what_it_handed_out():
    names = NameGenerator(_graph_with_body())
    assert [names("w"), names("w"), names("z"), names("z")] == ["w_1", "w_2", "z", "z_1"]
    names.reserve(["q"])
    assert names("q") == "q_1"


def test_prefix_is_part_of_the_stem():
    graph = _graph_with_body()
    graph.nodes[0].name = "lstm/MatMul"
    names = NameGenerator(graph, "lstm")
    assert [names("MatMul"), names("MatMul"), names("Add")] == ["lstm/MatMul_1", "lstm/MatMul_2", "lstm/Add"]


def test_nomatch_code_is_a_stats_key():
    assert NoMatch("skipped_peephole").detail == ""
    with pytest.raises(ValueError, match="skipped_"):
        NoMatch("peephole", "no prefix")


def test_an_empty_prefix_still_separates():
    assert NameGenerator(_graph_with_body(), "")("a") == "/a"


def test_a_fresh_tag_starts_no_name_in_the_model():
    graph = _graph_with_body()
    assert fresh_tag(graph, "q") == "q0"
    graph.nodes[0].name = "q0.7"  # a node inside the If branch
    graph.nodes[0].outputs[0].name = "q1"  # a name that is the bare tag also takes it
    assert fresh_tag(graph, "q") == "q2"
    graph.nodes[0].name = "q4c_cf/cb/cb0.3"  # behind a marker prefix: taken only when the prefix is stripped
    assert fresh_tag(graph, "cb") == "cb0"
    assert fresh_tag(graph, "cb", strip="q4c_cf/cb/") == "cb1"
