"""Word and character error rates of a bilstm_am-style CTC model on the committed test set.

    python models/eval_asr.py models/bilstm_am.onnx [--threads 1] [--json]
    python models/eval_asr.py /tmp/b4.onnx            # e.g. the output of q4c compile --bits 4

Runs the model in ONNX Runtime (CPU, default graph optimizations, the session config q4c records
in the model's metadata applied), one utterance per run (no padding), greedy CTC decoding
(argmax per frame, merge repeats, drop blank 0), and scores against the transcripts in
models/data/bilstm_am_test.json: WER / CER = total edit distance / total reference words / chars.
Importable: ``evaluate(model_path) -> {"wer", "cer", "utterances", ...}``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

DATA = Path(__file__).resolve().parent / "data"
TEST_FEATURES, TEST_JSON = DATA / "bilstm_am_test.npz", DATA / "bilstm_am_test.json"


def edit_distance(ref, hyp) -> int:
    """Levenshtein distance between two sequences (words or characters)."""
    prev = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, 1):
        cur = [i] + [0] * len(hyp)
        for j, h in enumerate(hyp, 1):
            cur[j] = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (r != h))
        prev = cur
    return prev[-1]


def error_rates(refs: list[str], hyps: list[str]) -> dict:
    word_err = sum(edit_distance(r.split(), h.split()) for r, h in zip(refs, hyps))
    char_err = sum(edit_distance(r, h) for r, h in zip(refs, hyps))
    words, chars = sum(len(r.split()) for r in refs), sum(len(r) for r in refs)
    return {"wer": word_err / words, "cer": char_err / chars, "utterances": len(refs), "words": words, "chars": chars}


def greedy_decode(log_probs: np.ndarray, units: list[str]) -> str:
    ids = log_probs.argmax(-1)
    keep = np.concatenate([[True], ids[1:] != ids[:-1]]) & (ids != 0)
    return "".join(units[i] for i in ids[keep])


def _session(model_path, threads: int) -> ort.InferenceSession:
    model = onnx.load(str(model_path), load_external_data=False)
    so = ort.SessionOptions()
    so.intra_op_num_threads = so.inter_op_num_threads = threads
    config = {p.key: p.value for p in model.metadata_props}.get("q4c.ort_session_config")
    for key, value in (json.loads(config) if config else {}).items():
        so.add_session_config_entry(key, str(value))
    return ort.InferenceSession(str(model_path), so, providers=["CPUExecutionProvider"])


def load_test_set() -> tuple[dict, list[np.ndarray]]:
    doc = json.loads(TEST_JSON.read_text())
    with np.load(TEST_FEATURES) as f:
        feats = [f[u["key"]] for u in doc["utterances"]]
    return doc, feats


def evaluate(model_path, threads: int = 1, *, limit: int | None = None) -> dict:
    """{"wer", "cer", "utterances", "words", "chars", "held_out_voice": {...}, "seen_voices": {...}}."""
    doc, feats = load_test_set()
    utts = doc["utterances"][:limit]
    sess = _session(model_path, threads)
    name = sess.get_inputs()[0].name
    hyps = []
    for f in feats[: len(utts)]:
        (y,) = sess.run(None, {name: f.astype(np.float32)[None]})
        hyps.append(greedy_decode(y[0], doc["units"]))
    refs = [u["text"] for u in utts]
    result = error_rates(refs, hyps)
    for key, held in (("held_out_voice", True), ("seen_voices", False)):
        sel = [i for i, u in enumerate(utts) if u["held_out_voice"] == held]
        if sel:
            sub = error_rates([refs[i] for i in sel], [hyps[i] for i in sel])
            result[key] = {"wer": sub["wer"], "cer": sub["cer"], "utterances": sub["utterances"]}
    result["examples"] = [{"ref": r, "hyp": h} for r, h in list(zip(refs, hyps))[:3]]
    # per utterance [word errors, words, char errors, chars]: paired bootstrap intervals (benchmarks/stats.py)
    result["items"] = [[edit_distance(r.split(), h.split()), len(r.split()), edit_distance(r, h), len(r)]
                       for r, h in zip(refs, hyps)]
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", type=Path)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    args = parser.parse_args(argv)
    r = evaluate(args.model, args.threads)
    if args.json:
        print(json.dumps(r, indent=1))
        return 0
    print(f"{args.model}: WER {100 * r['wer']:.2f} %  CER {100 * r['cer']:.2f} %  ({r['utterances']} utterances, {r['words']} words)")
    for key in ("seen_voices", "held_out_voice"):
        if key in r:
            s = r[key]
            print(f"  {key:15s} WER {100 * s['wer']:.2f} %  CER {100 * s['cer']:.2f} %  ({s['utterances']} utterances)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
