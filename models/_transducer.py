"""RNN-Transducer loss on the T x (U+1) lattice, in numpy (no torch needed, so its test runs in CI).

``lattice(blank, emit, t_len, u_len) -> (nll, grad_blank, grad_emit)``: for each utterance b,
``blank[b, t, u]`` is log P(blank | frame t, u labels emitted) and ``emit[b, t, u]`` is
log P(label u+1 | frame t, u labels emitted). An alignment walks from (0, 0): blank moves to
(t+1, u), a label to (t, u+1); it ends with the blank out of (T-1, U). ``nll[b] = -log`` of the
sum over all alignments; the gradients are those of ``nll`` with respect to ``blank`` and
``emit`` (minus the posterior occupancy of each arc), zero outside each utterance's lattice.

Forward (alpha) and backward (beta) run one frame at a time, vectorised over the batch and over
u: within frame t, alpha[t, u] = S[u] + logcumsumexp_k<=u(alpha[t-1, k] + blank[t-1, k] - S[k])
with S the running sum of emit[t, :u] (beta likewise, reversed), so the loop is T steps long.
models/train_rnnt.py wraps it in a torch autograd Function.
"""

from __future__ import annotations

import numpy as np

_NEG = -1e30  # log of (practically) zero that stays finite: no inf - inf = nan in the sums
_MASK = -1e4  # emission log-prob past an utterance's last label: forbids the arc


def _cumlse(x: np.ndarray) -> np.ndarray:
    """log(cumsum(exp(x))) along the last axis, stable."""
    return np.logaddexp.accumulate(x, axis=-1)


def lattice(blank, emit, t_len, u_len):
    blank = np.asarray(blank, np.float64)
    emit = np.asarray(emit, np.float64)
    t_len = np.asarray(t_len, np.int64)
    u_len = np.asarray(u_len, np.int64)
    b, t_max, u1 = blank.shape
    assert emit.shape == (b, t_max, u1 - 1), (blank.shape, emit.shape)
    assert (t_len >= 1).all() and (t_len <= t_max).all() and (u_len <= u1 - 1).all()
    rows = np.arange(b)
    emit = np.where(np.arange(u1 - 1)[None, None, :] >= u_len[:, None, None], _MASK, emit)
    # S[b, t, u] = sum_{j<u} emit[b, t, j]
    s = np.concatenate([np.zeros((b, t_max, 1)), np.cumsum(emit, axis=-1)], axis=-1)

    alpha = np.empty((b, t_max, u1))
    alpha[:, 0] = s[:, 0]
    for t in range(1, t_max):
        a = alpha[:, t - 1] + blank[:, t - 1]
        alpha[:, t] = s[:, t] + _cumlse(a - s[:, t])
    last_t = t_len - 1
    log_p = alpha[rows, last_t, u_len] + blank[rows, last_t, u_len]

    # nxt[b, t, u]: beta[t+1, u], or at an utterance's last frame the end state (0 at u = U_b)
    end = np.full((b, u1), _NEG)
    end[rows, u_len] = 0.0
    beta = np.empty((b, t_max, u1))
    nxt = np.empty((b, t_max, u1))
    following = end
    for t in range(t_max - 1, -1, -1):
        n = np.where((t >= last_t)[:, None], end, following)
        nxt[:, t] = n
        x = s[:, t] + blank[:, t] + n
        beta[:, t] = _cumlse(x[:, ::-1])[:, ::-1] - s[:, t]
        following = beta[:, t]

    tt = np.arange(t_max)[None, :, None]
    uu = np.arange(u1)[None, None, :]
    valid_b = (tt < t_len[:, None, None]) & (uu <= u_len[:, None, None])
    valid_e = (tt < t_len[:, None, None]) & (uu[..., :-1] < u_len[:, None, None])
    lp = log_p[:, None, None]
    g_blank = -np.exp(np.where(valid_b, alpha + blank + nxt - lp, _NEG))
    g_emit = -np.exp(np.where(valid_e, alpha[..., :-1] + emit + beta[..., 1:] - lp, _NEG))
    return -log_p, g_blank, g_emit


def brute_force(blank, emit, t_len: int, u_len: int):
    """-log P and its gradients for ONE utterance by enumerating every alignment (tiny cases only)."""
    blank = np.asarray(blank, np.float64)
    emit = np.asarray(emit, np.float64)
    paths = []

    def walk(t, u, arcs):
        if t == t_len - 1 and u == u_len:
            paths.append(arcs + [("b", t, u)])
            return
        if u < u_len:
            walk(t, u + 1, arcs + [("e", t, u)])
        if t < t_len - 1:
            walk(t + 1, u, arcs + [("b", t, u)])

    walk(0, 0, [])
    scores = np.array([sum(blank[t, u] if k == "b" else emit[t, u] for k, t, u in p) for p in paths])
    log_p = np.logaddexp.reduce(scores)
    g_blank, g_emit = np.zeros_like(blank), np.zeros_like(emit)
    for p, sc in zip(paths, scores):
        w = np.exp(sc - log_p)
        for k, t, u in p:
            (g_blank if k == "b" else g_emit)[t, u] -= w
    return -log_p, g_blank, g_emit, len(paths)
