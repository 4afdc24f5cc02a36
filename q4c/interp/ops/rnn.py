"""LSTM, GRU and RNN with every ONNX attribute, and the probes of their per-step internals.

All directions run in one loop: the reverse direction is turned into a forward pass over its
input reversed within each sequence's length, so one batched matmul per step serves both
directions of a bidirectional layer. Steps past `sequence_lens` hold the state and emit zeros.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from q4c.errors import UnsupportedOpError
from q4c.interp.ops.math import sigmoid_array
from q4c.interp.registry import op

Activation = Callable[[np.ndarray], np.ndarray]


def _t(x: np.ndarray, v: float) -> np.generic:
    return x.dtype.type(v)


# name -> (function of (x, alpha, beta), number of alphas it takes, number of betas, defaults)
_ACTIVATIONS: dict[str, tuple[Callable[..., np.ndarray], int, int, float, float]] = {
    "sigmoid": (lambda x, a, b: sigmoid_array(x), 0, 0, 0.0, 0.0),
    "tanh": (lambda x, a, b: np.tanh(x), 0, 0, 0.0, 0.0),
    "relu": (lambda x, a, b: np.maximum(x, _t(x, 0)), 0, 0, 0.0, 0.0),
    "affine": (lambda x, a, b: x * _t(x, a) + _t(x, b), 1, 1, 1.0, 0.0),
    "leakyrelu": (lambda x, a, b: np.where(x < 0, x * _t(x, a), x), 1, 0, 0.01, 0.0),
    "thresholdedrelu": (lambda x, a, b: np.where(x > _t(x, a), x, _t(x, 0)), 1, 0, 1.0, 0.0),
    "scaledtanh": (lambda x, a, b: _t(x, a) * np.tanh(x * _t(x, b)), 1, 1, 1.0, 1.0),
    "hardsigmoid": (lambda x, a, b: np.clip(x * _t(x, a) + _t(x, b), 0, 1).astype(x.dtype), 1, 1, 0.2, 0.5),
    "elu": (lambda x, a, b: np.where(x < 0, _t(x, a) * np.expm1(np.minimum(x, 0)), x), 1, 0, 1.0, 0.0),
    "softsign": (lambda x, a, b: x / (1 + np.abs(x)), 0, 0, 0.0, 0.0),
    "softplus": (lambda x, a, b: np.logaddexp(_t(x, 0), x), 0, 0, 0.0, 0.0),
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
            fn, n_alpha, n_beta, alpha, beta = _ACTIVATIONS[key]
            if n_alpha and alphas:
                alpha = alphas.pop(0)
            if n_beta and betas:
                beta = betas.pop(0)
            bound.append(lambda x, fn=fn, a=alpha, b=beta: fn(x, a, b))
            keys.append((key, alpha, beta))
        k = len(defaults)
        self.per_direction = [bound[d * k:(d + 1) * k] for d in range(nd)]
        self.uniform = all(keys[d * k:(d + 1) * k] == keys[:k] for d in range(nd))

    def __call__(self, index: int, x: np.ndarray) -> np.ndarray:
        if self.uniform:
            return self.per_direction[0][index](x)
        return np.stack([fns[index](x[d]) for d, fns in enumerate(self.per_direction)])


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
        lens = None if sequence_lens is None else np.asarray(sequence_lens).astype(np.int64)
        if lens is not None and np.all(lens >= self.T):
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
    xw = np.matmul(xd.reshape(nd, t * b, i), W.transpose(0, 2, 1))
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


def _clip(x: np.ndarray, clip: float | None) -> np.ndarray:
    return x if clip is None else np.clip(x, -clip, clip, out=x)


def lstm_forward(
    X, W, R, B, sequence_lens, initial_h, initial_c, P, *, activation_alpha, activation_beta,  # noqa: N803
    activations, clip, direction, hidden_size, input_forget, layout, probe,
):
    """LSTM-14: gates i, o, f, c stacked in W, R, B; peepholes P ordered i, o, f."""
    seq = _Sequence(X, sequence_lens, direction, layout)
    nd, T = seq.nd, seq.T  # noqa: N806
    H = hidden_size or R.shape[-1]  # noqa: N806
    dt = seq.X.dtype
    acts = _Activations(activations, activation_alpha, activation_beta, ["Sigmoid", "Tanh", "Tanh"], nd)
    bias = np.zeros((nd, 4 * H), dt) if B is None else (B[:, :4 * H] + B[:, 4 * H:]).astype(dt, copy=False)
    xw = _projected_inputs(seq, W, bias)
    rt = np.ascontiguousarray(R.transpose(0, 2, 1))
    h = seq.state(initial_h, H, dt)
    c = seq.state(initial_c, H, dt)
    if P is not None:
        p_i, p_o, p_f = (P[:, None, k * H:(k + 1) * H] for k in range(3))
    y = np.zeros((nd, T, seq.B, H), dt)
    rec = _Recorder(probe, seq, ("i", "o", "f", "c_tilde", "c", "h"))
    for t in range(T):
        g = xw[:, t] + np.matmul(h, rt)
        gi, go, gf, gc = g[..., :H], g[..., H:2 * H], g[..., 2 * H:3 * H], g[..., 3 * H:]
        if P is not None:
            gi += p_i * c
            gf += p_f * c
        i = acts(0, _clip(gi, clip))
        f = (1 - i) if input_forget else acts(0, _clip(gf, clip))  # input_forget couples f to i
        c_tilde = acts(1, _clip(gc, clip))
        c_new = f * c + i * c_tilde
        if P is not None:
            go += p_o * c_new
        o = acts(0, _clip(go, clip))
        h_new = o * acts(2, c_new)
        if seq.mask is None:
            h, c = h_new, c_new
            y[:, t] = h_new
        else:
            m = seq.mask[t]
            h = np.where(m, h_new, h)
            c = np.where(m, c_new, c)
            y[:, t] = np.where(m, h_new, 0)
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
    H = hidden_size or R.shape[-1]  # noqa: N806
    dt = seq.X.dtype
    acts = _Activations(activations, activation_alpha, activation_beta, ["Sigmoid", "Tanh"], nd)
    if B is None:
        B = np.zeros((nd, 6 * H), dt)  # noqa: N806
    w_b, r_b = B[:, :3 * H].astype(dt), B[:, 3 * H:].astype(dt)
    bias = w_b.copy()
    bias[:, :2 * H] += r_b[:, :2 * H]  # Rb of z and r add outside any product
    xw = _projected_inputs(seq, W, bias)
    r_bh = r_b[:, None, 2 * H:]
    rt = np.ascontiguousarray(R.transpose(0, 2, 1))  # [nd, H, 3H]
    rt_zr, rt_h = rt[..., :2 * H], np.ascontiguousarray(rt[..., 2 * H:])
    h = seq.state(initial_h, H, dt)
    y = np.zeros((nd, T, seq.B, H), dt)
    rec = _Recorder(_probe, seq, ("z", "r", "h_tilde", "h"))
    for t in range(T):
        x_t = xw[:, t]
        if linear_before_reset:
            hr = np.matmul(h, rt)
            zr = x_t[..., :2 * H] + hr[..., :2 * H]
        else:
            zr = x_t[..., :2 * H] + np.matmul(h, rt_zr)
        _clip(zr, clip)
        z = acts(0, zr[..., :H])
        r = acts(0, zr[..., H:])
        if linear_before_reset:
            hh = x_t[..., 2 * H:] + r * (hr[..., 2 * H:] + r_bh)
        else:
            hh = x_t[..., 2 * H:] + np.matmul(r * h, rt_h) + r_bh
        h_tilde = acts(1, _clip(hh, clip))
        h_new = (1 - z) * h_tilde + z * h
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
    H = hidden_size or R.shape[-1]  # noqa: N806
    dt = seq.X.dtype
    acts = _Activations(activations, activation_alpha, activation_beta, ["Tanh"], nd)
    bias = np.zeros((nd, H), dt) if B is None else (B[:, :H] + B[:, H:]).astype(dt, copy=False)
    xw = _projected_inputs(seq, W, bias)
    rt = np.ascontiguousarray(R.transpose(0, 2, 1))
    h = seq.state(initial_h, H, dt)
    y = np.zeros((nd, T, seq.B, H), dt)
    rec = _Recorder(_probe, seq, ("h",))
    for t in range(T):
        h_new = acts(0, _clip(xw[:, t] + np.matmul(h, rt), clip))
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
