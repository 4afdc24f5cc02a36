"""What the interpreter's LSTM, GRU and RNN share: the sequence view (directions, layout,
sequence_lens masks), activations by ONNX name, per-step probe recording, weight-shape checks,
and cached derived weights of constants."""

from __future__ import annotations

import weakref
from collections.abc import Callable

import numpy as np

from q4c.errors import ModelLoadError, UnsupportedOpError
from q4c.interp.ops.math import sigmoid_array


def advance(seq, t: int, y: np.ndarray, old: tuple[np.ndarray, ...], new: tuple[np.ndarray, ...]) -> tuple[np.ndarray, ...]:
    """Step t's output into y and the carried states: batch entries past their sequence_lens
    keep their old state and output zeros (ONNX LSTM/GRU semantics)."""
    if seq.mask is None:
        y[:, t] = new[0]
        return new
    m = seq.mask[t]
    y[:, t] = np.where(m, new[0], 0)
    return tuple(np.where(m, n, o) for n, o in zip(new, old, strict=True))

def _t(x: np.ndarray, v: float) -> np.generic:
    return x.dtype.type(v)


def _sigmoid_into(x: np.ndarray, out: np.ndarray) -> np.ndarray:
    if x.dtype.itemsize < 4:  # half precision: compute in float32 (see sigmoid_array)
        out[...] = sigmoid_array(x)
        return out
    # 1 / (1 + exp(-x)) as 0.5 * tanh(x / 2) + 0.5, in place: no temporaries, no overflow.
    np.multiply(x, _t(x, 0.5), out=out)
    np.tanh(out, out=out)
    out *= _t(x, 0.5)
    out += _t(x, 0.5)
    return out


def _assign(fn: Callable[[np.ndarray], np.ndarray]) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
    def into(x: np.ndarray, out: np.ndarray) -> np.ndarray:
        out[...] = fn(x)
        return out

    return into


# name -> (factory of an in-place function (x, out) given (alpha, beta), alphas it takes, betas, defaults)
_ACTIVATIONS: dict[str, tuple[Callable[[float, float], Callable[..., np.ndarray]], int, int, float, float]] = {
    "sigmoid": (lambda a, b: _sigmoid_into, 0, 0, 0.0, 0.0),
    "tanh": (lambda a, b: lambda x, out: np.tanh(x, out=out), 0, 0, 0.0, 0.0),
    "relu": (lambda a, b: lambda x, out: np.maximum(x, _t(x, 0), out=out), 0, 0, 0.0, 0.0),
    "affine": (lambda a, b: _assign(lambda x: x * _t(x, a) + _t(x, b)), 1, 1, 1.0, 0.0),
    "leakyrelu": (lambda a, b: _assign(lambda x: np.where(x < 0, x * _t(x, a), x)), 1, 0, 0.01, 0.0),
    "thresholdedrelu": (lambda a, b: _assign(lambda x: np.where(x > _t(x, a), x, _t(x, 0))), 1, 0, 1.0, 0.0),
    "scaledtanh": (lambda a, b: _assign(lambda x: _t(x, a) * np.tanh(x * _t(x, b))), 1, 1, 1.0, 1.0),
    "hardsigmoid": (lambda a, b: _assign(lambda x: np.clip(x * _t(x, a) + _t(x, b), 0, 1)), 1, 1, 0.2, 0.5),
    "elu": (lambda a, b: _assign(lambda x: np.where(x < 0, _t(x, a) * np.expm1(np.minimum(x, 0)), x)),
            1, 0, 1.0, 0.0),
    "softsign": (lambda a, b: _assign(lambda x: x / (1 + np.abs(x))), 0, 0, 0.0, 0.0),
    "softplus": (lambda a, b: _assign(lambda x: np.logaddexp(_t(x, 0), x)), 0, 0, 0.0, 0.0),
}


class Activations:
    """The activation functions of each direction, with alpha/beta bound.

    activation_alpha/beta are consumed in order by the functions that take them (as ONNX
    Runtime reads them); a function past the end of the list gets its ONNX default.
    """

    def __init__(self, names: list[str] | None, alphas, betas, defaults: list[str], nd: int) -> None:
        names = list(defaults) * nd if not names else list(names)
        if len(names) == len(defaults) and nd == 2:
            names = names * 2
        if len(names) != len(defaults) * nd:
            raise UnsupportedOpError(f"{len(names)} activations for {nd} direction(s); expected {len(defaults) * nd}")
        alphas, betas = list(alphas or []), list(betas or [])
        bound, keys = [], []
        for name in names:
            key = name.lower()
            if key not in _ACTIVATIONS:
                raise UnsupportedOpError(f"recurrent activation '{name}'")
            factory, n_alpha, n_beta, alpha, beta = _ACTIVATIONS[key]
            if n_alpha and alphas:
                alpha = alphas.pop(0)
            if n_beta and betas:
                beta = betas.pop(0)
            bound.append(factory(alpha, beta))
            keys.append((key, alpha, beta))
        k = len(defaults)
        self.per_direction = [bound[d * k:(d + 1) * k] for d in range(nd)]
        self.uniform = all(keys[d * k:(d + 1) * k] == keys[:k] for d in range(nd))
        # The op's default activations (Sigmoid, Tanh, ...) in every direction: fast paths apply.
        self.default = self.uniform and [key[0] for key in keys[:k]] == [d.lower() for d in defaults]

    def inplace(self, index: int, x: np.ndarray) -> np.ndarray:
        """Apply activation `index` to x [nd, ...], overwriting it (x must be a scratch buffer)."""
        if self.uniform:
            return self.per_direction[0][index](x, x)
        for d, fns in enumerate(self.per_direction):
            fns[index](x[d], x[d])
        return x

    def __call__(self, index: int, x: np.ndarray) -> np.ndarray:
        """Apply activation `index` to x [nd, ...] into a new array."""
        return self.inplace(index, x.copy())


class RnnSequence:
    """Time-major input, per-direction time order, and the sequence_lens mask."""

    def __init__(self, X: np.ndarray, sequence_lens, direction: str, layout: int) -> None:  # noqa: N803
        if direction not in ("forward", "reverse", "bidirectional"):
            raise UnsupportedOpError(f"direction '{direction}'")
        self.layout = layout
        self.X = X.transpose(1, 0, 2) if layout else X
        self.T, self.B = self.X.shape[:2]
        self.reverse = [False, True] if direction == "bidirectional" else [direction == "reverse"]
        self.nd = len(self.reverse)
        lens = None if sequence_lens is None else np.minimum(np.asarray(sequence_lens).astype(np.int64), self.T)
        if lens is not None and np.all(lens == self.T):
            lens = None
        self.mask = None
        self._rev_index = None
        if lens is not None:
            t = np.arange(self.T)[:, None]
            self.mask = (t < lens[None, :])[:, :, None]  # [T, B, 1]
            self._rev_index = (np.where(t < lens, lens - 1 - t, t), np.arange(self.B)[None, :])

    def reorder(self, a: np.ndarray, reverse: bool) -> np.ndarray:
        """a [T, B, ...] in this direction's processing order (an involution: also undoes it)."""
        if not reverse:
            return a
        if self._rev_index is None:
            return a[::-1]
        return a[self._rev_index]

    def inputs(self) -> np.ndarray:
        """[nd, T, B, I] inputs, each direction in its processing order."""
        return np.stack([self.reorder(self.X, r) for r in self.reverse])

    def outputs(self, per_dir: np.ndarray) -> np.ndarray:
        """[nd, T, B, H] in processing order -> [T, nd, B, H] in original time order."""
        return np.stack([self.reorder(per_dir[d], r) for d, r in enumerate(self.reverse)], axis=1)

    def state(self, initial, hidden: int, dtype: np.dtype) -> np.ndarray:
        if initial is None:
            return np.zeros((self.nd, self.B, hidden), dtype=dtype)
        return initial.transpose(1, 0, 2) if self.layout else initial

    def finish(self, y: np.ndarray, *states: np.ndarray) -> tuple[np.ndarray, ...]:
        if self.layout:  # layout=1: Y [B, T, nd, H], states [B, nd, H]
            return (y.transpose(2, 0, 1, 3),) + tuple(s.transpose(1, 0, 2) for s in states)
        return (y,) + states


def projected_inputs(seq: RnnSequence, W: np.ndarray, bias: np.ndarray) -> np.ndarray:  # noqa: N803
    """X W^T + bias for every step and direction at once: [nd, T, B, gates * H]."""
    xd = seq.inputs()
    nd, t, b, i = xd.shape
    xw = np.empty((nd, t * b, W.shape[1]), dtype=xd.dtype)
    for d in range(nd):  # 2-D products go to BLAS; numpy's stacked matmul may not
        np.dot(xd[d].reshape(t * b, i), W[d].T, out=xw[d])
    xw += bias[:, None, :]
    return xw.reshape(nd, t, b, -1)


class Recorder:
    """Collects per-step probe values; padded steps are zeroed like Y."""

    def __init__(self, probe: dict | None, seq: RnnSequence, names: tuple[str, ...]) -> None:
        self.probe, self.seq = probe, seq
        self.steps: dict[str, list[np.ndarray]] = {n: [] for n in names} if probe is not None else {}

    def add(self, t: int, **values: np.ndarray) -> None:
        if self.probe is None:
            return
        mask = None if self.seq.mask is None else self.seq.mask[t]
        for name, v in values.items():
            self.steps[name].append(v if mask is None else np.where(mask, v, 0).astype(v.dtype))

    def publish(self, like: np.ndarray) -> None:
        if self.probe is None:
            return
        for name, values in self.steps.items():
            stacked = np.stack(values, axis=1) if values else np.zeros((self.seq.nd, 0) + like.shape[1:], like.dtype)
            self.probe[name] = self.seq.outputs(stacked)


def check_weights(seq: RnnSequence, W, R, B, P, hidden_size: int | None, gates: int) -> int:  # noqa: N803
    """Hidden size H, after checking W [nd, G*H, I], R [nd, G*H, H], B [nd, 2*G*H] and P
    [nd, 3*H] against it, the direction count and X: a model whose attribute and weights
    disagree is refused naming both (the checker does not compare them)."""
    H = hidden_size or (R.shape[-1] if R.ndim == 3 else 0)  # noqa: N806
    want = {"W": (seq.nd, gates * H, seq.X.shape[-1]), "R": (seq.nd, gates * H, H), "B": (seq.nd, 2 * gates * H),
            "P": (seq.nd, 3 * H)}
    for name, value in (("W", W), ("R", R), ("B", B), ("P", P)):
        if value is not None and tuple(value.shape) != want[name]:
            raise ModelLoadError(f"{name} is {list(value.shape)} but hidden_size={hidden_size}, {seq.nd} direction(s) "
                                 f"and input size {seq.X.shape[-1]} need {list(want[name])}")
    return H


def clip_inplace(x: np.ndarray, clip: float | None) -> np.ndarray:
    return x if clip is None else np.clip(x, -clip, clip, out=x)


# Derived weights of constant (read-only) arrays, reused across runs while the array lives.
_DERIVED: dict[tuple[int, int | None], tuple[weakref.ref, np.ndarray]] = {}


def transposed(R: np.ndarray, halve_first: int | None) -> np.ndarray:  # noqa: N803
    """R [nd, G*H, H] -> contiguous [nd, H, G*H], its first `halve_first` columns halved."""

    def make() -> np.ndarray:
        rt = np.array(R.transpose(0, 2, 1), order="C")  # always a copy: it is written below
        if halve_first:
            rt[..., :halve_first] *= rt.dtype.type(0.5)
        return rt

    if R.flags.writeable:  # a computed tensor may change between runs: derive it afresh
        return make()
    key = (id(R), halve_first)
    hit = _DERIVED.get(key)
    if hit is not None and hit[0]() is R:
        return hit[1]
    derived = make()
    derived.flags.writeable = False
    _DERIVED[key] = (weakref.ref(R), derived)
    weakref.finalize(R, _DERIVED.pop, key, None)  # the entry dies with the constant
    return derived
