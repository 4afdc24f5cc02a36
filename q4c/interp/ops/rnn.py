"""LSTM, GRU and RNN with every ONNX attribute, and the probes of their per-step internals.

All directions run in one loop: the reverse direction is turned into a forward pass over its
input reversed within each sequence's length, so one batched matmul per step serves both
directions of a bidirectional layer. Steps past `sequence_lens` hold the state and emit zeros.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable

import numpy as np

from q4c.errors import ModelLoadError, UnsupportedOpError
from q4c.interp.ops.math import sigmoid_array
from q4c.interp.registry import op



def _advance(seq, t: int, y: np.ndarray, old: tuple[np.ndarray, ...], new: tuple[np.ndarray, ...]) -> tuple[np.ndarray, ...]:
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


class _Activations:
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


class _Sequence:
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


def _projected_inputs(seq: _Sequence, W: np.ndarray, bias: np.ndarray) -> np.ndarray:  # noqa: N803
    """X W^T + bias for every step and direction at once: [nd, T, B, gates * H]."""
    xd = seq.inputs()
    nd, t, b, i = xd.shape
    xw = np.empty((nd, t * b, W.shape[1]), dtype=xd.dtype)
    for d in range(nd):  # 2-D products go to BLAS; numpy's stacked matmul may not
        np.dot(xd[d].reshape(t * b, i), W[d].T, out=xw[d])
    xw += bias[:, None, :]
    return xw.reshape(nd, t, b, -1)


class _Recorder:
    """Collects per-step probe values; padded steps are zeroed like Y."""

    def __init__(self, probe: dict | None, seq: _Sequence, names: tuple[str, ...]) -> None:
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


def _check_weights(seq: _Sequence, W, R, B, P, hidden_size: int | None, gates: int) -> int:  # noqa: N803
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


def _clip(x: np.ndarray, clip: float | None) -> np.ndarray:
    return x if clip is None else np.clip(x, -clip, clip, out=x)


def _lstm_default_loop(seq, W, R, bias, h, c, y, rec, H):  # noqa: N803
    """LSTM with the default activations (Sigmoid, Tanh, Tanh), no peepholes, clip or coupling.

    sigmoid(x) = 0.5 * tanh(x / 2) + 0.5, and halving is exact in binary floating point, so the
    i, o, f rows of W, R and B are halved once up front: then a single tanh over all four gates
    per step gives bit for bit what the general loop computes.
    """
    dt = y.dtype
    half = dt.type(0.5)
    xw = _projected_inputs(seq, W, bias)
    xw[..., :3 * H] *= half
    rt = _transposed(R, 3 * H)
    for t in range(seq.T):
        g = np.matmul(h, rt)
        g += xw[:, t]
        np.tanh(g, out=g)
        sig = g[..., :3 * H]
        sig *= half
        sig += half
        i, o, f, c_tilde = g[..., :H], g[..., H:2 * H], g[..., 2 * H:3 * H], g[..., 3 * H:]
        c_new = f * c
        c_new += i * c_tilde
        h_new = np.tanh(c_new)
        h_new *= o
        h, c = _advance(seq, t, y, (h, c), (h_new, c_new))
        rec.add(t, i=i, o=o, f=f, c_tilde=c_tilde, c=c_new, h=h_new)
    return h, c


# Derived weights of constant (read-only) arrays, reused across runs while the array lives.
_DERIVED: dict[tuple[int, int | None], tuple[weakref.ref, np.ndarray]] = {}


def _transposed(R: np.ndarray, halve_first: int | None) -> np.ndarray:  # noqa: N803
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


def lstm_forward(
    X, W, R, B, sequence_lens, initial_h, initial_c, P, *, activation_alpha, activation_beta,  # noqa: N803
    activations, clip, direction, hidden_size, input_forget, layout, probe,
):
    """LSTM-14: gates i, o, f, c stacked in W, R, B; peepholes P ordered i, o, f."""
    seq = _Sequence(X, sequence_lens, direction, layout)
    nd, T = seq.nd, seq.T  # noqa: N806
    H = _check_weights(seq, W, R, B, P, hidden_size, 4)  # noqa: N806
    dt = seq.X.dtype
    acts = _Activations(activations, activation_alpha, activation_beta, ["Sigmoid", "Tanh", "Tanh"], nd)
    bias = np.zeros((nd, 4 * H), dt) if B is None else (B[:, :4 * H] + B[:, 4 * H:]).astype(dt, copy=False)
    h = seq.state(initial_h, H, dt)
    c = seq.state(initial_c, H, dt)
    y = np.zeros((nd, T, seq.B, H), dt)
    rec = _Recorder(probe, seq, ("i", "o", "f", "c_tilde", "c", "h"))
    if P is None and not input_forget and clip is None and acts.default and dt.itemsize >= 4:
        h, c = _lstm_default_loop(seq, W, R, bias, h, c, y, rec, H)
        rec.publish(h)
        return seq.finish(seq.outputs(y), h, c)
    xw = _projected_inputs(seq, W, bias)
    rt = _transposed(R, None)
    if P is not None:
        p_i, p_o, p_f = (P[:, None, k * H:(k + 1) * H] for k in range(3))
    for t in range(T):
        g = np.matmul(h, rt)  # a fresh [nd, B, 4H] buffer: activations run in place on it
        g += xw[:, t]
        gi, go, gf, gc = g[..., :H], g[..., H:2 * H], g[..., 2 * H:3 * H], g[..., 3 * H:]
        if P is None and not input_forget:
            _clip(g, clip)
            acts.inplace(0, g[..., :3 * H])  # i, o, f share f() and sit side by side
        else:
            if P is not None:
                gi += p_i * c
                gf += p_f * c
            acts.inplace(0, _clip(gi, clip))
            if input_forget:  # couples the forget gate to the input gate
                np.subtract(1, gi, out=gf)
            else:
                acts.inplace(0, _clip(gf, clip))
            _clip(gc, clip)
        i, f, c_tilde = gi, gf, acts.inplace(1, gc)
        c_new = f * c
        c_new += i * c_tilde
        if P is not None or input_forget:
            if P is not None:
                go += p_o * c_new
            acts.inplace(0, _clip(go, clip))
        o = go
        h_new = acts(2, c_new)
        h_new *= o
        h, c = _advance(seq, t, y, (h, c), (h_new, c_new))
        rec.add(t, i=i, o=o, f=f, c_tilde=c_tilde, c=c_new, h=h_new)
    rec.publish(h)
    return seq.finish(seq.outputs(y), h, c)


@op("LSTM", since=7)
def lstm(
    X, W, R, B=None, sequence_lens=None, initial_h=None, initial_c=None, P=None, *,  # noqa: N803
    activation_alpha: list[float] | None = None, activation_beta: list[float] | None = None,
    activations: list[str] | None = None, clip: float | None = None, direction: str = "forward",
    hidden_size: int | None = None, input_forget: int = 0, layout: int = 0, _probe: dict | None = None,
):
    return lstm_forward(
        X, W, R, B, sequence_lens, initial_h, initial_c, P, activation_alpha=activation_alpha,
        activation_beta=activation_beta, activations=activations, clip=clip, direction=direction,
        hidden_size=hidden_size, input_forget=input_forget, layout=layout, probe=_probe,
    )


@op("GRU", since=7)
def gru(
    X, W, R, B=None, sequence_lens=None, initial_h=None, *,  # noqa: N803
    activation_alpha: list[float] | None = None, activation_beta: list[float] | None = None,
    activations: list[str] | None = None, clip: float | None = None, direction: str = "forward",
    hidden_size: int | None = None, layout: int = 0, linear_before_reset: int = 0,
    _probe: dict | None = None,
):
    """GRU-14: gates z, r, h stacked in W, R and B."""
    seq = _Sequence(X, sequence_lens, direction, layout)
    nd, T = seq.nd, seq.T  # noqa: N806
    H = _check_weights(seq, W, R, B, None, hidden_size, 3)  # noqa: N806
    dt = seq.X.dtype
    acts = _Activations(activations, activation_alpha, activation_beta, ["Sigmoid", "Tanh"], nd)
    if B is None:
        B = np.zeros((nd, 6 * H), dt)  # noqa: N806
    w_b, r_b = B[:, :3 * H].astype(dt), B[:, 3 * H:].astype(dt)
    bias = w_b.copy()
    bias[:, :2 * H] += r_b[:, :2 * H]  # Rb of z and r add outside any product
    xw = _projected_inputs(seq, W, bias)
    r_bh = r_b[:, None, 2 * H:]
    rt = _transposed(R, None)  # [nd, H, 3H]
    rt_zr, rt_h = rt[..., :2 * H], rt[..., 2 * H:]
    h = seq.state(initial_h, H, dt)
    y = np.zeros((nd, T, seq.B, H), dt)
    rec = _Recorder(_probe, seq, ("z", "r", "h_tilde", "h"))
    for t in range(T):
        x_t = xw[:, t]
        if linear_before_reset:
            hr = np.matmul(h, rt)
            zr = hr[..., :2 * H]
        else:
            zr = np.matmul(h, rt_zr)
        zr += x_t[..., :2 * H]
        acts.inplace(0, _clip(zr, clip))  # z and r share f() and sit side by side
        z, r = zr[..., :H], zr[..., H:]
        if linear_before_reset:
            hh = hr[..., 2 * H:]
            hh += r_bh
            hh *= r
        else:
            hh = np.matmul(r * h, rt_h)
            hh += r_bh
        hh += x_t[..., 2 * H:]
        h_tilde = acts.inplace(1, _clip(hh, clip))
        # (1 - z) * h~ + z * h  ==  h~ + z * (h - h~)
        h_new = h - h_tilde
        h_new *= z
        h_new += h_tilde
        if seq.mask is None:
            h = h_new
            y[:, t] = h_new
        else:
            m = seq.mask[t]
            h = np.where(m, h_new, h)
            y[:, t] = np.where(m, h_new, 0)
        rec.add(t, z=z, r=r, h_tilde=h_tilde, h=h_new)
    rec.publish(h)
    return seq.finish(seq.outputs(y), h)


@op("RNN", since=7)
def rnn(
    X, W, R, B=None, sequence_lens=None, initial_h=None, *,  # noqa: N803
    activation_alpha: list[float] | None = None, activation_beta: list[float] | None = None,
    activations: list[str] | None = None, clip: float | None = None, direction: str = "forward",
    hidden_size: int | None = None, layout: int = 0, _probe: dict | None = None,
):
    seq = _Sequence(X, sequence_lens, direction, layout)
    nd, T = seq.nd, seq.T  # noqa: N806
    H = _check_weights(seq, W, R, B, None, hidden_size, 1)  # noqa: N806
    dt = seq.X.dtype
    acts = _Activations(activations, activation_alpha, activation_beta, ["Tanh"], nd)
    bias = np.zeros((nd, H), dt) if B is None else (B[:, :H] + B[:, H:]).astype(dt, copy=False)
    xw = _projected_inputs(seq, W, bias)
    rt = _transposed(R, None)
    h = seq.state(initial_h, H, dt)
    y = np.zeros((nd, T, seq.B, H), dt)
    rec = _Recorder(_probe, seq, ("h",))
    for t in range(T):
        pre = np.matmul(h, rt)
        pre += xw[:, t]
        h_new = acts.inplace(0, _clip(pre, clip))
        if seq.mask is None:
            h = h_new
            y[:, t] = h_new
        else:
            m = seq.mask[t]
            h = np.where(m, h_new, h)
            y[:, t] = np.where(m, h_new, 0)
        rec.add(t, h=h_new)
    rec.publish(h)
    return seq.finish(seq.outputs(y), h)
