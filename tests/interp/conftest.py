"""Builders and the ONNX Runtime baseline shared by the interpreter's tests."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

MS_DOMAIN = "com.microsoft"


def build_model(
    nodes: Sequence[onnx.NodeProto],
    inputs: Sequence[onnx.ValueInfoProto],
    outputs: Sequence[str | tuple[str, int] | onnx.ValueInfoProto],
    initializers: Mapping[str, np.ndarray] | None = None,
    opset: int = 21,
    ms_opset: int | None = None,
) -> onnx.ModelProto:
    """A one-graph model pinned to IR 10 (ORT 1.31 refuses onnx 1.23's default IR 14).

    An output given by name alone is float; `(name, TensorProto type)` gives its type.
    """
    outs = []
    for o in outputs:
        if isinstance(o, str):
            o = (o, onnx.TensorProto.FLOAT)
        outs.append(helper.make_tensor_value_info(o[0], o[1], None) if isinstance(o, tuple) else o)
    inits = [numpy_helper.from_array(v, k) for k, v in (initializers or {}).items()]
    graph = helper.make_graph(list(nodes), "g", list(inputs), outs, inits)
    opsets = [helper.make_opsetid("", opset)]
    if ms_opset is not None:
        opsets.append(helper.make_opsetid(MS_DOMAIN, ms_opset))
    return helper.make_model(graph, opset_imports=opsets, ir_version=10)


def run_ort_disabled(model: onnx.ModelProto, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """ONNX Runtime CPU with every graph optimization off, so its fusions cannot hide anything."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(None, dict(feeds))))


@pytest.fixture
def make_model() -> Callable[..., onnx.ModelProto]:
    return build_model


@pytest.fixture
def run_ort() -> Callable[[onnx.ModelProto, Mapping[str, np.ndarray]], dict[str, np.ndarray]]:
    return run_ort_disabled
