"""LSTM, GRU and RNN with every ONNX attribute, and the probes of their per-step internals.

All directions run in one loop: the reverse direction is turned into a forward pass over its
input reversed within each sequence's length, so one batched matmul per step serves both
directions of a bidirectional layer. Steps past `sequence_lens` hold the state and emit zeros.
"""

from __future__ import annotations

import numpy as np

from q4c.interp.ops.rnn_common import (
    Activations,
    Recorder,
    RnnSequence,
    advance,
    check_weights,
    clip_inplace,
    projected_inputs,
    transposed,
)
from q4c.interp.registry import op


def _lstm_default_loop(seq, W, R, bias, h, c, y, rec, H):  # noqa: N803
    """LSTM with the default activations (Sigmoid, Tanh, Tanh), no peepholes, clip or coupling.

    sigmoid(x) = 0.5 * tanh(x / 2) + 0.5, and halving is exact in binary floating point, so the
    i, o, f rows of W, R and B are halved once up front: then a single tanh over all four gates
    per step gives bit for bit what the general loop computes.
    """
    dt = y.dtype
    half = dt.type(0.5)
    xw = projected_inputs(seq, W, bias)
    xw[..., :3 * H] *= half
    rt = transposed(R, 3 * H)
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
        h, c = advance(seq, t, y, (h, c), (h_new, c_new))
        rec.add(t, i=i, o=o, f=f, c_tilde=c_tilde, c=c_new, h=h_new)
    return h, c


def lstm_forward(
    X, W, R, B, sequence_lens, initial_h, initial_c, P, *, activation_alpha, activation_beta,  # noqa: N803
    activations, clip, direction, hidden_size, input_forget, layout, probe,
):
    """LSTM-14: gates i, o, f, c stacked in W, R, B; peepholes P ordered i, o, f."""
    seq = RnnSequence(X, sequence_lens, direction, layout)
    nd, T = seq.nd, seq.T  # noqa: N806
    H = check_weights(seq, W, R, B, P, hidden_size, 4)  # noqa: N806
    dt = seq.X.dtype
    acts = Activations(activations, activation_alpha, activation_beta, ["Sigmoid", "Tanh", "Tanh"], nd)
    bias = np.zeros((nd, 4 * H), dt) if B is None else (B[:, :4 * H] + B[:, 4 * H:]).astype(dt, copy=False)
    h = seq.state(initial_h, H, dt)
    c = seq.state(initial_c, H, dt)
    y = np.zeros((nd, T, seq.B, H), dt)
    rec = Recorder(probe, seq, ("i", "o", "f", "c_tilde", "c", "h"))
    if P is None and not input_forget and clip is None and acts.default and dt.itemsize >= 4:
        h, c = _lstm_default_loop(seq, W, R, bias, h, c, y, rec, H)
        rec.publish(h)
        return seq.finish(seq.outputs(y), h, c)
    xw = projected_inputs(seq, W, bias)
    rt = transposed(R, None)
    if P is not None:
        p_i, p_o, p_f = (P[:, None, k * H:(k + 1) * H] for k in range(3))
    for t in range(T):
        g = np.matmul(h, rt)  # a fresh [nd, B, 4H] buffer: activations run in place on it
        g += xw[:, t]
        gi, go, gf, gc = g[..., :H], g[..., H:2 * H], g[..., 2 * H:3 * H], g[..., 3 * H:]
        if P is None and not input_forget:
            clip_inplace(g, clip)
            acts.inplace(0, g[..., :3 * H])  # i, o, f share f() and sit side by side
        else:
            if P is not None:
                gi += p_i * c
                gf += p_f * c
            acts.inplace(0, clip_inplace(gi, clip))
            if input_forget:  # couples the forget gate to the input gate
                np.subtract(1, gi, out=gf)
            else:
                acts.inplace(0, clip_inplace(gf, clip))
            clip_inplace(gc, clip)
        i, f, c_tilde = gi, gf, acts.inplace(1, gc)
        c_new = f * c
        c_new += i * c_tilde
        if P is not None or input_forget:
            if P is not None:
                go += p_o * c_new
            acts.inplace(0, clip_inplace(go, clip))
        o = go
        h_new = acts(2, c_new)
        h_new *= o
        h, c = advance(seq, t, y, (h, c), (h_new, c_new))
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
    seq = RnnSequence(X, sequence_lens, direction, layout)
    nd, T = seq.nd, seq.T  # noqa: N806
    H = check_weights(seq, W, R, B, None, hidden_size, 3)  # noqa: N806
    dt = seq.X.dtype
    acts = Activations(activations, activation_alpha, activation_beta, ["Sigmoid", "Tanh"], nd)
    if B is None:
        B = np.zeros((nd, 6 * H), dt)  # noqa: N806
    w_b, r_b = B[:, :3 * H].astype(dt), B[:, 3 * H:].astype(dt)
    bias = w_b.copy()
    bias[:, :2 * H] += r_b[:, :2 * H]  # Rb of z and r add outside any product
    xw = projected_inputs(seq, W, bias)
    r_bh = r_b[:, None, 2 * H:]
    rt = transposed(R, None)  # [nd, H, 3H]
    rt_zr, rt_h = rt[..., :2 * H], rt[..., 2 * H:]
    h = seq.state(initial_h, H, dt)
    y = np.zeros((nd, T, seq.B, H), dt)
    rec = Recorder(_probe, seq, ("z", "r", "h_tilde", "h"))
    for t in range(T):
        x_t = xw[:, t]
        if linear_before_reset:
            hr = np.matmul(h, rt)
            zr = hr[..., :2 * H]
        else:
            zr = np.matmul(h, rt_zr)
        zr += x_t[..., :2 * H]
        acts.inplace(0, clip_inplace(zr, clip))  # z and r share f() and sit side by side
        z, r = zr[..., :H], zr[..., H:]
        if linear_before_reset:
            hh = hr[..., 2 * H:]
            hh += r_bh
            hh *= r
        else:
            hh = np.matmul(r * h, rt_h)
            hh += r_bh
        hh += x_t[..., 2 * H:]
        h_tilde = acts.inplace(1, clip_inplace(hh, clip))
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
    seq = RnnSequence(X, sequence_lens, direction, layout)
    nd, T = seq.nd, seq.T  # noqa: N806
    H = check_weights(seq, W, R, B, None, hidden_size, 1)  # noqa: N806
    dt = seq.X.dtype
    acts = Activations(activations, activation_alpha, activation_beta, ["Tanh"], nd)
    bias = np.zeros((nd, H), dt) if B is None else (B[:, :H] + B[:, H:]).astype(dt, copy=False)
    xw = projected_inputs(seq, W, bias)
    rt = transposed(R, None)
    h = seq.state(initial_h, H, dt)
    y = np.zeros((nd, T, seq.B, H), dt)
    rec = Recorder(_probe, seq, ("h",))
    for t in range(T):
        pre = np.matmul(h, rt)
        pre += xw[:, t]
        h_new = acts.inplace(0, clip_inplace(pre, clip))
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
