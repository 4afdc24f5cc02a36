"""Perplexity of an lstm_lm-style model on the committed held-out text.

    python models/eval_lm.py models/lstm_lm.onnx [--threads 1] [--json]

models/data/lstm_lm_test.npz holds the held-out fortunes as token ids (``tokens``, 1-D; the
vocabulary is models/data/lstm_lm_vocab.json). The stream is cut into non-overlapping windows of
64 tokens (the training window; the tail that does not fill one is dropped); each window is run
from a zero state in ONNX Runtime (CPU, the session config q4c records in the model's metadata
applied) and every token after the first is scored: perplexity = exp(mean negative log-likelihood).
Importable: ``evaluate(model_path) -> {"perplexity", "tokens", ...}``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

DATA = Path(__file__).resolve().parent / "data"
TEST_TOKENS, VOCAB_JSON = DATA / "lstm_lm_test.npz", DATA / "lstm_lm_vocab.json"
SEQ, BATCH = 64, 32


def _session(model_path, threads: int) -> ort.InferenceSession:
    model = onnx.load(str(model_path), load_external_data=False)
    so = ort.SessionOptions()
    so.intra_op_num_threads = so.inter_op_num_threads = threads
    config = {p.key: p.value for p in model.metadata_props}.get("q4c.ort_session_config")
    for key, value in (json.loads(config) if config else {}).items():
        so.add_session_config_entry(key, str(value))
    return ort.InferenceSession(str(model_path), so, providers=["CPUExecutionProvider"])


def test_windows() -> np.ndarray:
    with np.load(TEST_TOKENS) as f:
        stream = f["tokens"].astype(np.int64)
    n = len(stream) // SEQ
    return stream[: n * SEQ].reshape(n, SEQ)


def evaluate(model_path, threads: int = 1, *, limit: int | None = None) -> dict:
    """{"perplexity", "tokens" (scored), "windows", "unk_rate"}; limit: first N windows only."""
    windows = test_windows()[:limit]
    sess = _session(model_path, threads)
    name = sess.get_inputs()[0].name
    per_window: list[float] = []  # NLL of each window: paired bootstrap intervals (benchmarks/stats.py)
    for i in range(0, len(windows), BATCH):
        x = windows[i : i + BATCH]
        (lp,) = sess.run(None, {name: x})
        picked = np.take_along_axis(lp[:, :-1].astype(np.float64), x[:, 1:, None], axis=-1)
        per_window.extend(float(-v) for v in picked.sum(axis=(1, 2)))
    nll = sum(per_window)
    scored = windows[:, 1:]
    return {"perplexity": math.exp(nll / scored.size), "tokens": int(scored.size), "windows": len(windows),
            "unk_rate": float(np.mean(scored == 0)), "items": [[v, scored.shape[1]] for v in per_window]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", type=Path)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    args = parser.parse_args(argv)
    r = evaluate(args.model, args.threads)
    if args.json:
        print(json.dumps(r, indent=1))
    else:
        print(f"{args.model}: perplexity {r['perplexity']:.2f} ({r['tokens']} tokens, {r['windows']} windows of {SEQ}, <unk> {100 * r['unk_rate']:.1f} %)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
