"""Driver of the trained RNN-T system ``rnnt_sys`` (models/train_rnnt.py): greedy transducer decoding.

    run(graphs, sample) -> {"tokens": int64 [N], "logits": float32 [frames, 29]}
    samples() -> the 24 calibration utterances, {"features": float32 [1, T, 80]} each

``graphs[name](feeds) -> {output name: array}`` runs one graph (q4c's system contract, see
system.toml): ``encoder`` features [1, T, 80] -> enc [1, T // 4, 256]; ``predictor`` token
[1, 1] int64, h_in / c_in [1, 1, 128] -> pred [1, 1, 128], h_out / c_out; ``joiner`` enc
[1, 256], pred [1, 128] -> logits [1, 29]. Decoding: the predictor starts from blank (0) and a
zero state; per encoder frame the joiner's argmax is taken up to MAX_SYMBOLS times, each
non-blank unit emitted and fed to the predictor, a blank moves to the next frame (the same loop
as train_rnnt.greedy_decode in torch). ``tokens`` are the emitted unit ids (models/data/
bilstm_am_test.json ``units``); ``logits`` are the joiner's outputs at each frame's first step
(a float output of fixed shape, for q4c's system objectives, e.g. ``--objective logits=kl``).
Calibration samples are dev utterances (models/data/bilstm_am_calib), never test ones.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

BLANK, MAX_SYMBOLS, PRED_HIDDEN, N_UNITS = 0, 5, 128, 29
CALIB = Path(__file__).resolve().parent.parent / "data" / "bilstm_am_calib"


def decode(graphs, features: np.ndarray) -> tuple[list[int], np.ndarray]:
    """features [1, T, 80] (or [T, 80]) -> (unit ids, first-step logits [T // 4, 29])."""
    features = np.asarray(features, np.float32)
    if features.ndim == 2:
        features = features[None]
    enc = graphs["encoder"]({"features": features})["enc"][0]
    zero = np.zeros((1, 1, PRED_HIDDEN), np.float32)

    def predict(token: int, h, c):
        out = graphs["predictor"]({"token": np.array([[token]], np.int64), "h_in": h, "c_in": c})
        return out["pred"][:, 0], out["h_out"], out["c_out"]

    pred, h_next, c_next = predict(BLANK, zero, zero)
    tokens: list[int] = []
    first = np.zeros((enc.shape[0], N_UNITS), np.float32)
    for t in range(enc.shape[0]):
        for step in range(MAX_SYMBOLS):
            logits = graphs["joiner"]({"enc": enc[t : t + 1], "pred": pred})["logits"]
            if step == 0:
                first[t] = logits[0]
            k = int(np.argmax(logits[0]))
            if k == BLANK:
                break
            tokens.append(k)
            pred, h_next, c_next = predict(k, h_next, c_next)
    return tokens, first


def run(graphs, sample) -> dict[str, np.ndarray]:
    features = sample["features"] if isinstance(sample, dict) else sample
    tokens, first = decode(graphs, features)
    return {"tokens": np.asarray(tokens, np.int64), "logits": first}


def samples(limit: int | None = None):
    for path in sorted(CALIB.glob("*.npz"))[:limit]:
        with np.load(path) as f:
            yield {"features": f["features"].astype(np.float32)}
