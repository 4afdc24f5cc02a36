"""ONNX's own backend node test cases, for every op type q4c.interp registers."""

from __future__ import annotations

import functools
import re
import warnings

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from q4c.errors import UnsupportedOpError
from q4c.interp import Interpreter, registered_ops

# Case families skipped on purpose, each with its reason (matched against the case name).
SKIPPED_FAMILIES: dict[str, str] = {
    r"e8m0|E8M0": "float8e8m0 (MX scale type): its round_mode conversions are not implemented",
    r"^test_training_dropout(?!_zero_ratio)": "training-mode Dropout draws random masks; inference only",
}


@functools.cache
def _node_cases() -> tuple:
    """Every node test case, collected once per session (collect_testcases keeps global state)."""
    from onnx.backend.test.case import node

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return tuple(node.collect_testcases(None))


def _op_types(graph: onnx.GraphProto) -> set[str]:
    found = set()
    for n in graph.node:
        found.add(n.op_type)
        for attr in n.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                found |= _op_types(attr.g)
    return found


def _covered_cases() -> list:
    known = {op_type for (domain, op_type) in registered_ops() if domain == ""}
    return [c for c in _node_cases() if _op_types(c.model.graph) <= known]


_CASES = {case.name: case for case in _covered_cases()}


def _array(value) -> np.ndarray:
    if isinstance(value, onnx.TensorProto):
        return numpy_helper.to_array(value)
    return np.asarray(value)


def _skip_reason(name: str) -> str | None:
    for pattern, reason in SKIPPED_FAMILIES.items():
        if re.search(pattern, name):
            return reason
    return None


def _assert_matches(actual: np.ndarray, expected: np.ndarray, rtol: float, atol: float, name: str) -> None:
    assert actual.shape == expected.shape, f"{name}: shape {actual.shape} != {expected.shape}"
    assert actual.dtype == expected.dtype, f"{name}: dtype {actual.dtype} != {expected.dtype}"
    if expected.dtype.kind == "f" or expected.dtype.name == "bfloat16":
        np.testing.assert_allclose(
            actual.astype(np.float64), expected.astype(np.float64), rtol=rtol, atol=atol, err_msg=name
        )
    elif expected.dtype.kind == "V":  # int4/uint4/int2/uint2: exact
        np.testing.assert_array_equal(actual.astype(np.int64), expected.astype(np.int64), err_msg=name)
    else:  # integers, bools, strings: exact
        np.testing.assert_array_equal(actual, expected, err_msg=name)


def test_conformance_covers_the_core_ops():
    covered = {op for case in _CASES.values() for op in _op_types(case.model.graph)}
    for op_type in ("LSTM", "GRU", "QuantizeLinear", "DequantizeLinear", "Conv", "ConvTranspose", "Loop", "Scan", "If"):
        assert op_type in covered
    assert len(_CASES) > 1000


@pytest.mark.parametrize("name", sorted(_CASES))
def test_node_case(name: str) -> None:
    reason = _skip_reason(name)
    if reason:
        pytest.skip(reason)
    case = _CASES[name]
    interp = Interpreter(case.model)
    for inputs, outputs in case.data_sets:
        feeds = {vi.name: _array(v) for vi, v in zip(case.model.graph.input, inputs)}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            try:
                got = interp.run(feeds)
            except UnsupportedOpError as e:  # pragma: no cover - a family missing from the list above
                pytest.fail(f"unsupported without a listed reason: {e}")
        for vi, expected in zip(case.model.graph.output, outputs):
            _assert_matches(got[vi.name], _array(expected), case.rtol, case.atol, f"{name}:{vi.name}")
