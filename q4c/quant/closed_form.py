"""Recognise float weights that are closed-form functions (DFT bases, windows) and build small
ONNX generators (standard ops only) that recompute them.

A generator is a chain of Range / Mul / Mod / Cast / Cos / Sin / Concat / Reshape nodes with
scalar and shape constants only: ONNX Runtime constant-folds it at session load, and the file
stores a few hundred bytes instead of the tensor. Arithmetic is float64 with the DFT phase
reduced exactly in int64 ((k * n) mod N) before Cos/Sin, so the regenerated tensor matches
the formula to float32 rounding. Generator nodes are named with `GENERATOR_PREFIX`: q4c's
fold-constants recognises them by it (`is_generator`) and never folds them back.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

#: Node names of generators start with this; fold-constants leaves such nodes alone.
GENERATOR_PREFIX = "q4c_cf/"
#: Max |regenerated - original| accepted.
TOLERANCE = 1e-6
#: A fit this close (relative to the tensor's largest magnitude) but above TOLERANCE is a near
#: miss worth reporting; anything further is simply not a closed-form tensor.
NEAR_MISS = 1e-2
MIN_WINDOW = 32  # shorter 1-D tensors cost less than any generator
MIN_DFT = 8

# name -> (a0, a1, a2, power, symmetric): a0 - a1 cos(2 pi n / D) + a2 cos(4 pi n / D), raised to
# `power`; D = N (periodic, torch/librosa fftbins) or N - 1 (symmetric). Vorbis is separate.
_COSINE_WINDOWS = {
    "hann_periodic": (0.5, 0.5, 0.0, 1.0, False),
    "hann_symmetric": (0.5, 0.5, 0.0, 1.0, True),
    "hamming_periodic": (0.54, 0.46, 0.0, 1.0, False),
    "hamming_symmetric": (0.54, 0.46, 0.0, 1.0, True),
    "blackman_periodic": (0.42, 0.5, 0.08, 1.0, False),
    "blackman_symmetric": (0.42, 0.5, 0.08, 1.0, True),
    "povey": (0.5, 0.5, 0.0, 0.85, True),  # Kaldi: symmetric hann ** 0.85
}
WINDOWS = (*_COSINE_WINDOWS, "vorbis")


def window(name: str, n: int) -> np.ndarray:
    """The named window of length `n` in float64 (the reference the generators must match)."""
    t = np.arange(n, dtype=np.float64)
    if name == "vorbis":  # sin(pi/2 sin^2(pi (t + 1/2) / N))
        return np.sin(0.5 * np.pi * np.sin(np.pi * (t + 0.5) / n) ** 2)
    a0, a1, a2, power, symmetric = _COSINE_WINDOWS[name]
    d = n - 1 if symmetric else n
    w = a0 - a1 * np.cos(2 * np.pi * t / d) + a2 * np.cos(4 * np.pi * t / d)
    return np.maximum(w, 0.0) ** power if power != 1.0 else w


@dataclass(frozen=True)
class ClosedForm:
    """What a tensor was recognised as.

    kind "window": values = scale * window(name, n), reshaped to `shape`.
    kind "dft": rows f = 0..K-1 of each part in `parts` ("cos", "sin", "-sin") of
    trig(2 pi f t / n) * scale * window(t), parts stacked along the frequency axis; `transposed`
    means the tensor is [n, frequencies] (x @ W); then reshaped to `shape` (e.g. [2K, 1, n]).
    `window_name` None is no window; "stored" keeps the fitted window (times scale) as an
    n-long float32 constant.
    """

    kind: str
    shape: tuple[int, ...]
    dtype: np.dtype
    n: int
    scale: float
    window_name: str | None
    parts: tuple[str, ...] = ()
    frequencies: int = 0
    transposed: bool = False
    stored_window: np.ndarray | None = None
    fit_error: float = 0.0  # max |formula in float64 - original|

    def describe(self) -> str:
        win = self.window_name or "none"
        if self.kind == "window":
            return f"window {win} n={self.n}"
        layout = ("[n,F]" if self.transposed else "[F,n]") + (f"->{list(self.shape)}" if len(self.shape) != 2 else "")
        return f"dft n={self.n} parts={'/'.join(self.parts)} window={win} layout={layout}"


@dataclass(frozen=True)
class NearMiss:
    """A tensor shaped like a closed form whose best fit misses TOLERANCE (`error`)."""

    description: str
    error: float


def reference(cf: ClosedForm) -> np.ndarray:
    """The closed form evaluated in float64 with exact phase reduction, in the tensor's shape."""
    n = cf.n
    win = _effective_window(cf)
    if cf.kind == "window":
        return win.reshape(cf.shape)
    basis = _dft_parts(n, cf.frequencies, cf.parts) * win[None, :]
    if cf.transposed:
        basis = basis.T
    return basis.reshape(cf.shape)


def _effective_window(cf: ClosedForm) -> np.ndarray:
    if cf.window_name == "stored":
        assert cf.stored_window is not None
        return cf.stored_window.astype(np.float64)
    base = np.ones(cf.n) if cf.window_name is None else window(cf.window_name, cf.n)
    return cf.scale * base


def _dft_parts(n: int, frequencies: int, parts: tuple[str, ...]) -> np.ndarray:
    m = (np.arange(frequencies, dtype=np.int64)[:, None] * np.arange(n, dtype=np.int64)[None, :]) % n
    phase = m.astype(np.float64) * (2 * np.pi / n)
    table = {"cos": np.cos(phase), "sin": np.sin(phase), "-sin": -np.sin(phase)}
    return np.concatenate([table[p] for p in parts], axis=0)


# --- recognisers ---------------------------------------------------------------------------


def recognise(values: np.ndarray) -> ClosedForm | NearMiss | None:
    """The closed form `values` is (within TOLERANCE of the float64 formula), a NearMiss, or None."""
    values = np.asarray(values)
    if values.dtype not in (np.float32, np.float64, np.float16):
        return None
    dims = [int(d) for d in values.shape if d != 1]
    window_like = len(dims) == 1 and dims[0] >= MIN_WINDOW
    dft_like = len(dims) == 2 and any(n >= MIN_DFT and f in (n // 2 + 1, 2 * (n // 2 + 1))
                                      for f, n in (dims, dims[::-1]))
    if not (window_like or dft_like) or not np.all(np.isfinite(values)):  # shape first: cheap
        return None
    return _recognise_window(values) if window_like else _recognise_dft(values)


def _best(fits: list[ClosedForm | NearMiss]) -> ClosedForm | NearMiss | None:
    exact = [f for f in fits if isinstance(f, ClosedForm)]
    if exact:  # a named window beats a stored one; then the smallest error
        return min(exact, key=lambda f: (f.window_name == "stored", f.fit_error))
    misses = [f for f in fits if isinstance(f, NearMiss)]
    return min(misses, key=lambda f: f.error) if misses else None


def _judge(cf: ClosedForm, values: np.ndarray) -> ClosedForm | NearMiss | None:
    original = values.astype(np.float64)
    # Compared in the tensor's own precision: a float16 basis is the formula rounded to float16.
    error = float(np.max(np.abs(reference(cf).astype(values.dtype).astype(np.float64) - original)))
    peak = float(np.max(np.abs(original))) or 1.0
    if error <= TOLERANCE:
        return ClosedForm(**{**cf.__dict__, "fit_error": error})
    if error <= NEAR_MISS * peak:
        return NearMiss(cf.describe(), error)
    return None


def _fit_scale(target: np.ndarray, base: np.ndarray) -> float:
    denom = float(np.dot(base, base))
    return float(np.dot(target, base) / denom) if denom else 0.0


def _recognise_window(values: np.ndarray) -> ClosedForm | NearMiss | None:
    v = values.astype(np.float64).reshape(-1)
    n = v.size
    fits: list[ClosedForm | NearMiss] = []
    for name in WINDOWS:
        base = window(name, n)
        scale = _fit_scale(v, base)
        if scale == 0.0:
            continue
        cf = ClosedForm("window", tuple(values.shape), values.dtype, n, scale, name)
        judged = _judge(cf, values)
        if judged is not None:
            fits.append(judged)
    return _best(fits)


def _recognise_dft(values: np.ndarray) -> ClosedForm | NearMiss | None:
    matrix = values.astype(np.float64).reshape([d for d in values.shape if d != 1])
    fits: list[ClosedForm | NearMiss] = []
    for transposed in (False, True):
        f_by_n = matrix.T if transposed else matrix
        rows, n = f_by_n.shape
        k = n // 2 + 1
        if n < MIN_DFT:
            continue
        if rows == 2 * k:
            layouts = [("cos", "-sin"), ("cos", "sin")]
        elif rows == k:
            layouts = [("cos",), ("-sin",), ("sin",)]
        else:
            continue
        for parts in layouts:
            fits.extend(_fit_dft(values, f_by_n, n, k, parts, transposed))
    return _best(fits)


def _fit_dft(values: np.ndarray, f_by_n: np.ndarray, n: int, k: int, parts: tuple[str, ...],
             transposed: bool) -> list[ClosedForm | NearMiss]:
    basis = _dft_parts(n, k, parts)
    # The effective window (scale * w[t]) column by column, by least squares over the rows.
    denom = np.sum(basis * basis, axis=0)
    effective = np.divide(np.sum(f_by_n * basis, axis=0), denom, out=np.zeros(n), where=denom > 1e-12)
    common = {"shape": tuple(values.shape), "dtype": values.dtype, "n": n, "parts": parts, "frequencies": k,
              "transposed": transposed}
    fits: list[ClosedForm | NearMiss] = []
    candidates: list[tuple[str | None, np.ndarray]] = [(None, np.ones(n))] + [(w, window(w, n)) for w in WINDOWS]
    for name, base in candidates:
        scale = _fit_scale(effective, base)
        if scale == 0.0:
            continue
        judged = _judge(ClosedForm("dft", scale=scale, window_name=name, **common), values)
        if judged is not None:
            fits.append(judged)
    if not any(isinstance(f, ClosedForm) for f in fits) and np.any(effective):
        stored = effective.astype(np.float32)
        judged = _judge(ClosedForm("dft", scale=1.0, window_name="stored", stored_window=stored, **common), values)
        if judged is not None:
            fits.append(judged)
    return fits


# --- generators ----------------------------------------------------------------------------


class _Builder:
    """Accumulates generator nodes and their small constants.

    Names are short (each is stored in the file, most of them twice): tensors are `<tag>.<i>`.
    Only nodes whose inputs are all constants (the Range nodes, a Cast of a stored window) can
    be folded, so only they carry the GENERATOR_PREFIX marker in their name; every other node
    reads one of their outputs and stays unfolded with them (and unnamed).
    """

    def __init__(self, tag: str) -> None:
        self.tag = tag
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self._count = 0
        self._consts: dict[tuple[str, bytes, tuple[int, ...]], str] = {}

    def _name(self) -> str:
        self._count += 1
        return f"{self.tag}.{self._count}"

    def const(self, value: np.ndarray | float, dtype: type = np.float64) -> str:
        array = np.asarray(value, dtype=dtype)
        key = (array.dtype.str, array.tobytes(), array.shape)
        if key not in self._consts:
            self._consts[key] = self._name()
            self.initializers.append(numpy_helper.from_array(array, self._consts[key]))
        return self._consts[key]

    def node(self, op: str, inputs: list[str], output: str | None = None, **attrs: object) -> str:
        output = output or self._name()
        constant_only = all(i in self._consts.values() for i in inputs)
        name = f"{GENERATOR_PREFIX}{output}" if constant_only else ""
        self.nodes.append(helper.make_node(op, inputs, [output], name=name, **attrs))
        return output


def build_generator(cf: ClosedForm, tag: str, output: str) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    """Nodes and constants computing `cf` into tensor `output`; other tensor names are `<tag>.<i>`."""
    b = _Builder(tag)
    n = cf.n
    t = b.node("Range", [b.const(0, np.int64), b.const(n, np.int64), b.const(1, np.int64)])  # [n] int64
    win = _window_nodes(b, cf, t)  # [n] float64 (scale folded in), or a scalar
    if cf.kind == "window":
        result = win
    else:
        f = b.node("Range", [b.const(0, np.int64), b.const(cf.frequencies, np.int64), b.const(1, np.int64)])
        f = b.node("Reshape", [f, b.const([cf.frequencies, 1], np.int64)])
        # Phase reduced exactly in int64 before the float Cos/Sin: (f * t) mod n < n.
        m = b.node("Mod", [b.node("Mul", [f, t]), b.const(n, np.int64)])
        phase = b.node("Mul", [b.node("Cast", [m], to=TensorProto.DOUBLE), b.const(2 * math.pi / n)])
        parts = []
        for part in cf.parts:
            if part == "cos":
                parts.append(b.node("Cos", [phase]))
            else:
                s = b.node("Sin", [phase])
                parts.append(b.node("Neg", [s]) if part == "-sin" else s)
        basis = parts[0] if len(parts) == 1 else b.node("Concat", parts, axis=0)
        result = b.node("Mul", [basis, win])
        if cf.transposed:
            result = b.node("Transpose", [result], perm=[1, 0])
    to = helper.np_dtype_to_tensor_dtype(np.dtype(cf.dtype))
    natural = (cf.frequencies * len(cf.parts), n)[:: -1 if cf.transposed else 1] if cf.kind == "dft" else (n,)
    if tuple(cf.shape) == natural:
        b.node("Cast", [result], output=output, to=to)
    else:
        b.node("Reshape", [b.node("Cast", [result], to=to), b.const(list(cf.shape), np.int64)], output=output)
    return b.nodes, b.initializers


def _window_nodes(b: _Builder, cf: ClosedForm, t: str) -> str:
    if cf.window_name is None:
        return b.const(cf.scale)
    if cf.window_name == "stored":
        assert cf.stored_window is not None
        return b.node("Cast", [b.const(cf.stored_window, np.float32)], to=TensorProto.DOUBLE)
    n = cf.n
    td = b.node("Cast", [t], to=TensorProto.DOUBLE)
    if cf.window_name == "vorbis":
        arg = b.node("Mul", [b.node("Add", [td, b.const(0.5)]), b.const(math.pi / n)])
        s = b.node("Sin", [arg])
        w = b.node("Sin", [b.node("Mul", [b.node("Mul", [s, s]), b.const(math.pi / 2)])])
    else:
        a0, a1, a2, power, symmetric = _COSINE_WINDOWS[cf.window_name]
        d = n - 1 if symmetric else n
        arg = b.node("Mul", [td, b.const(2 * math.pi / d)])
        w = b.node("Sub", [b.const(a0), b.node("Mul", [b.node("Cos", [arg]), b.const(a1)])])
        if a2:
            arg2 = b.node("Mul", [td, b.const(4 * math.pi / d)])
            w = b.node("Add", [w, b.node("Mul", [b.node("Cos", [arg2]), b.const(a2)])])
        if power != 1.0:
            # max(w, 0) first: the symmetric window's ends are 0 up to rounding, and a negative
            # base to a fractional power is NaN.
            w = b.node("Pow", [b.node("Max", [w, b.const(0.0)]), b.const(power)])
    return b.node("Mul", [w, b.const(cf.scale)])


def generator_model(cf: ClosedForm, opset: int, ir_version: int, tag: str = "cf", output: str = "y") -> onnx.ModelProto:
    """The generator alone as a model with the one output `output` (to check it at compile time,
    and to splice it into a graph)."""
    nodes, inits = build_generator(cf, tag, output)
    out = helper.make_tensor_value_info(output, helper.np_dtype_to_tensor_dtype(np.dtype(cf.dtype)), list(cf.shape))
    graph = helper.make_graph(nodes, "closed_form", [], [out], initializer=inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=ir_version)


def generator_bytes(cf: ClosedForm) -> int:
    """Serialized bytes of the generator's nodes and constants (what the file stores instead)."""
    nodes, inits = build_generator(cf, "cf", "y")
    return sum(n.ByteSize() for n in nodes) + sum(t.ByteSize() for t in inits)


def is_generator(node_name: str | None) -> bool:
    """Whether a node (by name) is a generator node fold-constants must leave alone."""
    return bool(node_name) and str(node_name).startswith(GENERATOR_PREFIX)
