"""Driver of the trained RNN-T system ``rnnt_sys`` (models/train_rnnt.py): greedy transducer decoding.

    run(graphs, sample) -> {"tokens": int64 [N], "logits": float32 [frames, 29],
                            "aligned": float32 [frames + N_fp32, 29] (when the sample has "path")}
    samples() -> the 24 calibration utterances, {"features": float32 [1, T, 80],
                                                 "path": int64 [frames, MAX_SYMBOLS]} each

``graphs[name](feeds) -> {output name: array}`` runs one graph (q4c's system contract, see
system.toml): ``encoder`` features [1, T, 80] -> enc [1, T // 4, 256]; ``predictor`` token
[1, 1] int64, h_in / c_in [1, 1, 128] -> pred [1, 1, 128], h_out / c_out; ``joiner`` enc
[1, 256], pred [1, 128] -> logits [1, 29]. Decoding: the predictor starts from blank (0) and a
zero state; per encoder frame the joiner's argmax is taken up to MAX_SYMBOLS times, each
non-blank unit emitted and fed to the predictor, a blank moves to the next frame (the same loop
as train_rnnt.greedy_decode in torch). ``tokens`` are the emitted unit ids (models/data/
bilstm_am_test.json ``units``); ``logits`` are the joiner's outputs at each frame's first step
(a float output of fixed shape, for q4c's system objectives, e.g. ``--objective logits=kl``).

``aligned`` scores the decode where a greedy argmax hides it: the joiner's logits at every
decision the FP32 system took (per frame each emission and the closing blank), with the
predictor teacher-forced on the FP32 system's units. ``logits`` only sees each frame's first
step, and after the first differing unit compares decodes on different paths. A sample's
``path`` (per frame the units the FP32 graphs beside this file emit, -1 padded) is computed by
``samples()`` with ONNX Runtime; use ``--objective aligned=kl``.
Calibration samples are dev utterances (models/data/bilstm_am_calib), never test ones.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

BLANK, MAX_SYMBOLS, PRED_HIDDEN, N_UNITS = 0, 5, 128, 29
HERE = Path(__file__).resolve().parent
CALIB = HERE.parent / "data" / "bilstm_am_calib"


def decode(graphs, features: np.ndarray, record: list | None = None) -> tuple[list[int], np.ndarray]:
    """features [1, T, 80] (or [T, 80]) -> (unit ids, first-step logits [T // 4, 29]); `record`
    gets (frame, step, unit) per emission."""
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
            if record is not None:
                record.append((t, step, k))
            pred, h_next, c_next = predict(k, h_next, c_next)
    return tokens, first


def frame_paths(graphs, features: np.ndarray) -> np.ndarray:
    """Per encoder frame, the units the greedy decode emits there: int64 [T // 4, MAX_SYMBOLS], -1 padded."""
    tokens, first = decode(graphs, features, record := [])
    path = np.full((first.shape[0], MAX_SYMBOLS), -1, np.int64)
    for t, step, k in record:
        path[t, step] = k
    return path


def aligned(graphs, features: np.ndarray, path: np.ndarray) -> np.ndarray:
    """The joiner's logits at each decision of `path` (frame_paths of the reference system): per
    frame one row per emitted unit and one for the closing blank (none after MAX_SYMBOLS
    emissions), the predictor fed the path's units whatever these graphs would emit."""
    features = np.asarray(features, np.float32)
    enc = graphs["encoder"]({"features": features if features.ndim == 3 else features[None]})["enc"][0]
    zero = np.zeros((1, 1, PRED_HIDDEN), np.float32)
    out = graphs["predictor"]({"token": np.array([[BLANK]], np.int64), "h_in": zero, "c_in": zero})
    rows = []
    for t in range(enc.shape[0]):
        units = [int(k) for k in path[t] if k >= 0]
        for step in range(min(len(units) + 1, MAX_SYMBOLS)):
            rows.append(graphs["joiner"]({"enc": enc[t : t + 1], "pred": out["pred"][:, 0]})["logits"][0])
            if step < len(units):
                out = graphs["predictor"]({"token": np.array([[units[step]]], np.int64),
                                           "h_in": out["h_out"], "c_in": out["c_out"]})
    return np.asarray(rows, np.float32)


def run(graphs, sample) -> dict[str, np.ndarray]:
    features = sample["features"] if isinstance(sample, dict) else sample
    tokens, first = decode(graphs, features)
    result = {"tokens": np.asarray(tokens, np.int64), "logits": first}
    if isinstance(sample, dict) and "path" in sample:
        result["aligned"] = aligned(graphs, features, sample["path"])
    return result


def fp32_graphs() -> dict:
    """The FP32 graphs beside this file as ONNX Runtime sessions (the driver's graphs contract)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    graphs = {}
    for name in ("encoder", "predictor", "joiner"):
        sess = ort.InferenceSession(str(HERE / f"{name}.onnx"), options, providers=["CPUExecutionProvider"])
        names = [o.name for o in sess.get_outputs()]
        graphs[name] = lambda feeds, s=sess, o=names: dict(zip(o, s.run(o, dict(feeds))))
    return graphs


def samples(limit: int | None = None):
    reference = fp32_graphs()
    for path in sorted(CALIB.glob("*.npz"))[:limit]:
        with np.load(path) as f:
            features = f["features"].astype(np.float32)
        yield {"features": features, "path": frame_paths(reference, features)}
