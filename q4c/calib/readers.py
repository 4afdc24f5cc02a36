"""Input samples: `.npz` files, directories of them, Python readers, or synthetic samples built
from the input signature, validated against the model's inputs; and the state pairs of
stateful models, whose outputs feed their own inputs on the next call.

A *sample* is a feed dict (one call) or a list of feed dicts (a *sequence*: consecutive calls of
a stateful model, its state carried from one call to the next). A stateful model's sample may
also hold a whole sequence in one dict: an input whose declared dim is fixed (the RNN-T
predictor's `tokens` [batch, 1]) may be given a multiple of it along that axis ([1, 8]), and the
sample is split into that many calls (`to_steps`).

State pairs (output -> input) are declared by a Python reader (a `state_pairs` attribute on the
function) or inferred from the signature by q4c.signature's one rule (`infer_state_pairs`, the
same rule `bench --chunk` uses).
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import logging
import re
import sys
import zipfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import onnx

from q4c.errors import ConfigError, DataError
from q4c.signature import TensorSpec as InputSpec
from q4c.signature import input_specs
from q4c.signature import state_pairs as infer_state_pairs  # noqa: F401 (the calibration name of the one rule)

logger = logging.getLogger(__name__)

Feeds = dict[str, np.ndarray]
#: one call (a feed dict) or a sequence of calls of a stateful model
Sample = Feeds | list[Feeds]


@runtime_checkable
class CalibrationReader(Protocol):
    """An iterable of samples (feed dicts, or lists of them for sequences); iterating again
    starts over. `state_pairs` (output -> input) is None when the reader declares none."""

    state_pairs: dict[str, str] | None

    def __iter__(self) -> Iterator[Sample]: ...


# --- validation and steps ----------------------------------------------------------------------

def validate(arrays: Mapping[str, np.ndarray], specs: list[InputSpec], source: str, *,
             optional: frozenset[str] = frozenset(), steps: bool = False) -> Feeds:
    """Check keys, rank, dtype castability and finiteness; return feeds in the model's dtypes.

    `optional` inputs (a stateful model's state) may be absent. With `steps`, a fixed dim may be
    given any multiple of its size (a sequence of calls, split by `to_steps`).
    """
    signature = "; ".join(s.describe() for s in specs)
    names = {s.name for s in specs}
    missing = sorted(names - set(arrays) - optional)
    extra = sorted(set(arrays) - names)
    if missing:
        raise DataError(f"{source}: missing input(s) {', '.join(missing)}; the model expects {signature}")
    if extra:
        raise DataError(f"{source}: unknown key(s) {', '.join(extra)}; the model expects {signature}")
    feeds: Feeds = {}
    for spec in specs:
        if spec.name not in arrays:
            continue
        value = np.asarray(arrays[spec.name])
        where = f"{source}: key {spec.name!r}"
        if spec.shape and value.ndim != len(spec.shape):
            raise DataError(f"{where} has rank {value.ndim} {value.shape}; expected {spec.describe()}")
        for actual, expected in zip(value.shape, spec.shape):
            if isinstance(expected, int) and expected > 0 and actual != expected:
                if not (steps and spec.name not in optional and actual % expected == 0 and actual > 0):
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


def to_steps(feeds: Feeds, specs: list[InputSpec], state_inputs: Iterable[str], source: str = "sample") -> list[Feeds]:
    """Split a validated sample of a stateful model into calls along its fixed-size axes; state
    inputs absent from the sample start at zero (their symbolic dims resolved from the other
    inputs' dims of the same name, else 1)."""
    state_inputs = set(state_inputs)
    dims: dict[str, int] = {}
    counts: dict[str, int] = {}
    split: list[tuple[str, int, int]] = []  # (input, axis, step size)
    for spec in specs:
        value = feeds.get(spec.name)
        if value is None:
            continue
        for axis, (actual, expected) in enumerate(zip(value.shape, spec.shape)):
            if isinstance(expected, str):
                dims.setdefault(expected, actual)
            elif isinstance(expected, int) and expected > 0 and actual != expected and spec.name not in state_inputs:
                split.append((spec.name, axis, expected))
                counts[spec.name] = actual // expected
    n = set(counts.values())
    if len(n) > 1:
        detail = ", ".join(f"{k}: {v}" for k, v in sorted(counts.items()))
        raise DataError(f"{source}: inputs split into different numbers of calls ({detail})")
    n_steps = n.pop() if n else 1
    first = dict(feeds)
    for spec in specs:
        if spec.name in state_inputs and spec.name not in first:
            shape = tuple(d if isinstance(d, int) and d > 0 else dims.get(d, 1) if isinstance(d, str) else 1 for d in spec.shape)
            first[spec.name] = np.zeros(shape, spec.dtype)
    if n_steps == 1:
        return [first]
    steps = []
    for t in range(n_steps):
        step = {k: v for k, v in first.items()}
        for name, axis, size in split:
            index = [slice(None)] * first[name].ndim
            index[axis] = slice(t * size, (t + 1) * size)
            step[name] = np.ascontiguousarray(first[name][tuple(index)])
        steps.append(step)
    return steps


def as_sequence(sample: Sample, specs: list[InputSpec], state_pairs: Mapping[str, str], source: str) -> list[Feeds]:
    """Any sample as a list of complete calls (state of later calls is carried at run time)."""
    state_inputs = frozenset(state_pairs.values())
    if isinstance(sample, Mapping):
        feeds = validate(sample, specs, source, optional=state_inputs, steps=bool(state_inputs))
        return to_steps(feeds, specs, state_inputs, source) if state_inputs else [feeds]
    if isinstance(sample, (list, tuple)):
        if not sample:
            raise DataError(f"{source}: empty sequence")
        steps: list[Feeds] = []
        for t, step in enumerate(sample):
            if not isinstance(step, Mapping):
                raise DataError(f"{source}[{t}]: expected a dict of input name -> array, got {type(step).__name__}")
            where = f"{source}[{t}]"
            feeds = validate(step, specs, where, optional=state_inputs)
            steps.extend(to_steps(feeds, specs, state_inputs, where) if t == 0 else [feeds])
        return steps
    raise DataError(f"{source}: expected a dict of input name -> array or a list of them, got {type(sample).__name__}")


# --- readers -----------------------------------------------------------------------------------

class NpzReader:
    """`.npz` files (keys = input names), read lazily in the given order."""

    def __init__(self, files: list[Path], state_pairs: dict[str, str] | None = None) -> None:
        self.files = files
        self.state_pairs = state_pairs

    def __len__(self) -> int:
        return len(self.files)

    def __iter__(self) -> Iterator[Sample]:
        for path in self.files:
            yield _read_npz(path)

    def __repr__(self) -> str:
        return f"NpzReader({len(self.files)} file(s))"


class PythonReader:
    """`module:function` or `path/to/file.py:function`: the function is called with no arguments
    and returns an iterable of samples; a `state_pairs` attribute (output -> input) on it
    declares the model's state."""

    def __init__(self, spec: str) -> None:
        self.spec = spec
        self.function = load_callable(spec)
        pairs = getattr(self.function, "state_pairs", None)
        if pairs is not None and not (isinstance(pairs, Mapping) and all(isinstance(k, str) and isinstance(v, str)
                                                                         for k, v in pairs.items())):
            raise ConfigError(f"{spec}: state_pairs must be a dict of output name -> input name")
        self.state_pairs = dict(pairs) if pairs is not None else None

    def __iter__(self) -> Iterator[Sample]:
        try:
            items = self.function()
        except Exception as e:
            raise DataError(f"{self.spec}: the reader raised {type(e).__name__}: {e}") from e
        if isinstance(items, Mapping) or not isinstance(items, Iterable):
            raise DataError(f"{self.spec}: the reader must return an iterable of samples, got {type(items).__name__}")
        yield from items

    def __repr__(self) -> str:
        return f"PythonReader({self.spec!r})"


class SamplesReader:
    """Samples already in memory (what `compile_model(samples=[...])` gets)."""

    def __init__(self, samples: Iterable[Sample], state_pairs: dict[str, str] | None = None) -> None:
        self.samples = list(samples)
        self.state_pairs = state_pairs

    def __len__(self) -> int:
        return len(self.samples)

    def __iter__(self) -> Iterator[Sample]:
        return iter(self.samples)


def import_function(text: str, base: Path | None = None) -> Callable[..., Any]:
    """The function named by `package.module:function` or `path/to/file.py:function` (a relative
    file path taken from `base` when given, else the working directory). A file is imported once
    per process, whoever asks (a calibration reader and a system driver may share it). Raises
    ConfigError with what is wrong, for the caller to prefix with where the text came from."""
    target, sep, attr = text.rpartition(":")
    if not sep or not target or not attr:
        raise ConfigError("expected 'module:function' or 'file.py:function'")
    try:
        if target.endswith(".py"):
            path = Path(target).expanduser()
            path = path if path.is_absolute() or base is None else base / path
            if not path.is_file():
                raise ConfigError(f"no such file {path}")
            name = "q4c_user_" + re.sub(r"\W", "_", str(path.resolve()))
            module = sys.modules.get(name)
            if module is None:
                module_spec = importlib.util.spec_from_file_location(name, path)
                assert module_spec is not None and module_spec.loader is not None
                module = importlib.util.module_from_spec(module_spec)
                sys.modules[name] = module
                try:
                    module_spec.loader.exec_module(module)
                except BaseException:
                    del sys.modules[name]
                    raise
        else:
            module = importlib.import_module(target)
    except ConfigError:
        raise
    except Exception as e:
        lines = str(e).strip().splitlines()
        raise ConfigError(f"cannot import {target}: {type(e).__name__}" + (f": {lines[0][:300]}" if lines else "")) from e
    function = getattr(module, attr, None)
    if not callable(function):
        raise ConfigError(f"{target} has no function {attr!r}")
    return function


def load_callable(spec: str) -> Callable[..., Any]:
    """A reader function: `package.module:function` or `path/to/file.py:function`."""
    try:
        function = import_function(spec)
    except ConfigError as e:
        raise ConfigError(f"reader {spec!r}: {e}") from e.__cause__
    if inspect.isclass(function):
        raise ConfigError(f"reader {spec!r}: {spec.rpartition(':')[2]} is a class; give a function returning an "
                          f"iterable of samples")
    return function


def npz_files(path: str | Path) -> list[Path]:
    path = Path(path)
    if path.is_dir():
        files = sorted(path.glob("*.npz"))
        if not files:
            raise DataError(f"{path}: directory holds no .npz samples")
        return files
    if path.is_file():
        return [path]
    raise DataError(f"{path}: no such file or directory")


def open_reader(model: onnx.ModelProto, data: str | Path | None = None, *, reader: str | None = None,
                count: int = 1, seed: int = 0) -> CalibrationReader:
    """The samples for `model`: DATA (`.npz` or directory), a Python `reader`, or (neither given)
    `count` synthetic samples, with a warning."""
    if data is not None and reader is not None:
        raise ConfigError("give either --calib DATA or --calib-reader, not both")
    if reader is not None:
        return PythonReader(reader)
    if data is not None:
        return NpzReader(npz_files(data))
    logger.warning("no --calib data: calibrating on %d synthetic sample(s) built from the input signature", count)
    return SamplesReader(synthetic_samples(model, count=count, seed=seed))


def load_samples(path: str | Path, specs: list[InputSpec]) -> list[Feeds]:
    """All samples of DATA: one `.npz`, or a directory of `.npz` files in sorted name order
    (one call each; see `open_reader` for sequences and stateful models)."""
    return [validate(_read_npz(f), specs, str(f)) for f in npz_files(path)]


def read_sample(path: Path, specs: list[InputSpec]) -> Feeds:
    return validate(_read_npz(path), specs, str(path))


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    # EOFError: an empty file; NotImplementedError: a zip entry with an unknown compression method;
    # RuntimeError: zipfile's "encrypted, password required" (a flipped flag bit)
    except (OSError, ValueError, EOFError, NotImplementedError, RuntimeError, zipfile.BadZipFile) as e:
        raise DataError(f"{path}: not a readable .npz file: {e or type(e).__name__}") from e
    return _Named(arrays, str(path))


class _Named(dict):
    """A feed dict that remembers the file it came from (for error messages)."""

    def __init__(self, arrays: dict[str, np.ndarray], source: str) -> None:
        super().__init__(arrays)
        self.source = source


def source_of(sample: Sample, default: str) -> str:
    return getattr(sample, "source", default)


def synthetic_samples(model: onnx.ModelProto, count: int = 1, seed: int = 0, time_steps: int = 32) -> list[Feeds]:
    """Samples shaped by the input signature; floats ~ N(0, 1); integer inputs that index a
    Gather table stay inside the table.

    A named symbolic dim has one size across all inputs (`tokens [batch, 1]` and
    `h_in [1, batch, 128]` must agree): 1 for a name that says batch (or a dim first seen at
    axis 0), `time_steps` otherwise; an unnamed dim is 1 at axis 0, else `time_steps`.
    """
    rng = np.random.default_rng(seed)
    specs = input_specs(model)
    limits = _index_limits(model)
    named: dict[str, int] = {}
    for spec in specs:
        for i, d in enumerate(spec.shape):
            if isinstance(d, str) and d and d not in named:
                named[d] = 1 if ("batch" in d.lower() or i == 0) else time_steps

    def size(i: int, d: int | str | None) -> int:
        if isinstance(d, int) and d > 0:
            return d
        if isinstance(d, str) and d in named:
            return named[d]
        return 1 if i == 0 else time_steps

    samples = []
    for _ in range(count):
        feeds: Feeds = {}
        for spec in specs:
            shape = tuple(size(i, d) for i, d in enumerate(spec.shape))
            if np.issubdtype(spec.dtype, np.floating):
                feeds[spec.name] = rng.standard_normal(shape).astype(spec.dtype)
            elif np.issubdtype(spec.dtype, np.integer):
                feeds[spec.name] = rng.integers(0, limits.get(spec.name, 2), size=shape).astype(spec.dtype)
            elif spec.dtype == np.bool_:
                feeds[spec.name] = np.ones(shape, np.bool_)
            else:
                raise DataError(f"cannot synthesize input {spec.describe()}; pass --calib DATA")
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
