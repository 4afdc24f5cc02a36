"""A model's input/output signature and its state pairs: the one rule `compile --calib` (carrying
state through calibration sequences) and `bench --chunk` (carrying state between chunks) share.

A *state pair* is an output whose value feeds an input on the next call. `state_pairs(model)`
returns them as {output name: input name}: an output and an input pair when their names give a
common stem once one known affix is removed (case-insensitive; the input's own name counts as a
stem), their dtypes match and their shapes agree where both are fixed. Input affixes: suffixes
`_in`, `_input`, `_init`, `_initial`, `_prev`, `_0`, `0`, prefixes `in_`, `init_`, `initial_`,
`prev_`; output affixes: suffixes `_out`, `_output`, `_next`, `_new`, `_final`, `_n`, `n`,
prefixes `out_`, `next_`, `new_`, `final_`. So `h_in`/`h_out`, `h0`/`h_n`, `h`/`hn`,
`state`/`stateN`, `state`/`new_state`, `cache_prev`/`cache_next` pair. A stem matched by more
than one output or more than one input is ambiguous: none of its candidates pair.

Names only: a shape shared by one input and one output says nothing (a denoiser's frame in and
frame out have one shape), so `bench --chunk`'s former shape fallback is gone.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper

from q4c.errors import DataError, ModelLoadError

_IN_SUFFIXES = ("_initial", "_input", "_init", "_prev", "_in", "_0", "0")
_IN_PREFIXES = ("initial_", "init_", "prev_", "in_")
_OUT_SUFFIXES = ("_output", "_final", "_next", "_new", "_out", "_n", "n")
_OUT_PREFIXES = ("final_", "next_", "new_", "out_")


@dataclass(frozen=True)
class TensorSpec:
    """A graph input or output: name, numpy dtype, declared shape (int for fixed dims, str/None
    for symbolic ones)."""

    name: str
    dtype: np.dtype
    shape: tuple[int | str | None, ...]

    def describe(self) -> str:
        dims = ", ".join("?" if d is None else str(d) for d in self.shape)
        return f"{self.name}: {self.dtype}[{dims}]"


def input_specs(model: onnx.ModelProto) -> list[TensorSpec]:
    """Graph inputs that are not initializers, with numpy dtype and shape."""
    initializers = {t.name for t in model.graph.initializer}
    return [_spec(value) for value in model.graph.input if value.name not in initializers]


def output_specs(model: onnx.ModelProto) -> list[TensorSpec]:
    return [_spec(value) for value in model.graph.output]


def _spec(value: onnx.ValueInfoProto) -> TensorSpec:
    tensor_type = value.type.tensor_type
    try:
        dtype = np.dtype(helper.tensor_dtype_to_np_dtype(tensor_type.elem_type))
    except (KeyError, TypeError) as e:  # elem_type 0 (UNDEFINED) or a number onnx does not know
        raise ModelLoadError(f"graph input/output {value.name!r} has element type {tensor_type.elem_type}, "
                             f"which is not a tensor type ONNX defines") from e
    shape = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tensor_type.shape.dim)
    return TensorSpec(value.name, dtype, shape)


def _stems(name: str, suffixes: tuple[str, ...], prefixes: tuple[str, ...]) -> set[str]:
    """The name itself and the name with one known affix removed (lower case)."""
    low = name.lower()
    stems = {low}
    for s in suffixes:
        if low.endswith(s) and len(low) > len(s):
            stems.add(low[: -len(s)].rstrip("_"))
    for p in prefixes:
        if low.startswith(p) and len(low) > len(p):
            stems.add(low[len(p):])
    return {s for s in stems if s}


def compatible(a: TensorSpec, b: TensorSpec) -> bool:
    """Same dtype and rank, and no fixed dimension that differs."""
    if a.dtype != b.dtype or len(a.shape) != len(b.shape):
        return False
    return all(not (isinstance(x, int) and isinstance(y, int) and x > 0 and y > 0 and x != y)
               for x, y in zip(a.shape, b.shape, strict=True))


def state_pairs(model: onnx.ModelProto) -> dict[str, str]:
    """{output name: input name} of a stateful model (the rule is in the module docstring)."""
    inputs, outputs = input_specs(model), output_specs(model)
    candidates: list[tuple[str, str]] = []
    for out in outputs:
        out_stems = _stems(out.name, _OUT_SUFFIXES, _OUT_PREFIXES) - {out.name.lower()}
        for spec in inputs:
            in_stems = _stems(spec.name, _IN_SUFFIXES, _IN_PREFIXES)
            if out.name != spec.name and out_stems & in_stems and compatible(out, spec):
                candidates.append((out.name, spec.name))
    outs = [o for o, _ in candidates]
    ins = [i for _, i in candidates]
    return {o: i for o, i in candidates if outs.count(o) == 1 and ins.count(i) == 1}


def check_state_pairs(model: onnx.ModelProto, pairs: Mapping[str, str], source: str = "state pairs") -> dict[str, str]:
    """Validate declared output -> input pairs against the model's signature."""
    inputs = {s.name: s for s in input_specs(model)}
    outputs = {s.name: s for s in output_specs(model)}
    for out_name, in_name in pairs.items():
        if out_name not in outputs:
            raise DataError(f"{source}: {out_name!r} is not an output of the model (outputs: {', '.join(outputs)})")
        if in_name not in inputs:
            raise DataError(f"{source}: {in_name!r} is not an input of the model (inputs: {', '.join(inputs)})")
        if not compatible(outputs[out_name], inputs[in_name]):
            raise DataError(f"{source}: output {outputs[out_name].describe()} cannot feed input {inputs[in_name].describe()}")
    return dict(pairs)
