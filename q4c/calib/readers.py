"""Input samples: `.npz` files or directories of them, validated against the model's inputs,
and synthetic samples built from the input signature when no data is given."""

from __future__ import annotations

import logging
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import helper

from q4c.errors import DataError

logger = logging.getLogger(__name__)

Feeds = dict[str, np.ndarray]


@dataclass(frozen=True)
class InputSpec:
    name: str
    dtype: np.dtype
    shape: tuple[int | str | None, ...]  # int for fixed dims, str/None for symbolic ones

    def describe(self) -> str:
        dims = ", ".join("?" if d is None else str(d) for d in self.shape)
        return f"{self.name}: {self.dtype}[{dims}]"


def input_specs(model: onnx.ModelProto) -> list[InputSpec]:
    """Graph inputs that are not initializers, with numpy dtype and shape."""
    initializers = {t.name for t in model.graph.initializer}
    specs = []
    for value in model.graph.input:
        if value.name in initializers:
            continue
        tensor_type = value.type.tensor_type
        dtype = np.dtype(helper.tensor_dtype_to_np_dtype(tensor_type.elem_type))
        shape = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tensor_type.shape.dim)
        specs.append(InputSpec(value.name, dtype, shape))
    return specs


def load_samples(path: str | Path, specs: list[InputSpec]) -> list[Feeds]:
    """All samples of DATA: one `.npz`, or a directory of `.npz` files in sorted name order."""
    path = Path(path)
    if path.is_dir():
        files = sorted(path.glob("*.npz"))
        if not files:
            raise DataError(f"{path}: directory holds no .npz samples")
    elif path.is_file():
        files = [path]
    else:
        raise DataError(f"{path}: no such file or directory")
    return [read_sample(f, specs) for f in files]


def read_sample(path: Path, specs: list[InputSpec]) -> Feeds:
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except (OSError, ValueError, zipfile.BadZipFile) as e:
        raise DataError(f"{path}: not a readable .npz file: {e}") from e
    return validate(arrays, specs, str(path))


def validate(arrays: dict[str, np.ndarray], specs: list[InputSpec], source: str) -> Feeds:
    """Check keys, rank, dtype castability and finiteness; return feeds in the model's dtypes."""
    signature = "; ".join(s.describe() for s in specs)
    names = {s.name for s in specs}
    missing = sorted(names - set(arrays))
    extra = sorted(set(arrays) - names)
    if missing:
        raise DataError(f"{source}: missing input(s) {', '.join(missing)}; the model expects {signature}")
    if extra:
        raise DataError(f"{source}: unknown key(s) {', '.join(extra)}; the model expects {signature}")
    feeds: Feeds = {}
    for spec in specs:
        value = np.asarray(arrays[spec.name])
        where = f"{source}: key {spec.name!r}"
        if spec.shape and value.ndim != len(spec.shape):
            raise DataError(f"{where} has rank {value.ndim} {value.shape}; expected {spec.describe()}")
        for actual, expected in zip(value.shape, spec.shape):
            if isinstance(expected, int) and expected > 0 and actual != expected:
                raise DataError(f"{where} has shape {value.shape}; expected {spec.describe()}")
        feeds[spec.name] = _cast(value, spec.dtype, where)
    return feeds


def _cast(value: np.ndarray, dtype: np.dtype, where: str) -> np.ndarray:
    if value.dtype == dtype:
        out = value
    elif np.issubdtype(dtype, np.floating) and (np.issubdtype(value.dtype, np.floating) or np.issubdtype(value.dtype, np.integer)):
        out = value.astype(dtype)
    elif np.issubdtype(dtype, np.integer) and np.issubdtype(value.dtype, np.integer):
        info = np.iinfo(dtype)
        if value.size and (value.min() < info.min or value.max() > info.max):
            raise DataError(f"{where}: values out of range for {dtype}")
        out = value.astype(dtype)
    elif dtype == np.bool_ and value.dtype == np.bool_:
        out = value
    else:
        raise DataError(f"{where} has dtype {value.dtype}, which cannot be cast to {dtype} without loss")
    if np.issubdtype(out.dtype, np.floating) and not np.all(np.isfinite(out)):
        raise DataError(f"{where} contains NaN or infinity")
    return out


def synthetic_samples(model: onnx.ModelProto, count: int = 1, seed: int = 0, time_steps: int = 32) -> list[Feeds]:
    """Samples shaped by the input signature: symbolic batch 1, other symbolic dims `time_steps`;
    floats ~ N(0, 1); integer inputs that index a Gather table stay inside the table."""
    rng = np.random.default_rng(seed)
    specs = input_specs(model)
    limits = _index_limits(model)
    samples = []
    for _ in range(count):
        feeds: Feeds = {}
        for spec in specs:
            shape = tuple(d if isinstance(d, int) and d > 0 else (1 if i == 0 else time_steps) for i, d in enumerate(spec.shape))
            if np.issubdtype(spec.dtype, np.floating):
                feeds[spec.name] = rng.standard_normal(shape).astype(spec.dtype)
            elif np.issubdtype(spec.dtype, np.integer):
                feeds[spec.name] = rng.integers(0, limits.get(spec.name, 2), size=shape).astype(spec.dtype)
            elif spec.dtype == np.bool_:
                feeds[spec.name] = np.ones(shape, np.bool_)
            else:
                raise DataError(f"cannot synthesize input {spec.describe()}; pass --data/--calib")
        samples.append(feeds)
    return samples


def _index_limits(model: onnx.ModelProto) -> dict[str, int]:
    """For integer graph inputs used as Gather indices: the size of the gathered axis."""
    shapes = {t.name: list(t.dims) for t in model.graph.initializer}
    limits: dict[str, int] = {}
    for node in model.graph.node:
        if node.op_type == "Gather" and len(node.input) > 1 and node.input[0] in shapes:
            axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
            limits[node.input[1]] = shapes[node.input[0]][axis]
    return limits
