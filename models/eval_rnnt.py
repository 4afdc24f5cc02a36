"""Word and character error rates of the trained RNN-T system (models/rnnt_sys) on the committed test set.

    python models/eval_rnnt.py                               # FP32 graphs in models/rnnt_sys
    python models/eval_rnnt.py /tmp/rnnt_q4                  # a directory of encoder/predictor/joiner.onnx
    python models/eval_rnnt.py --joiner /tmp/j4.onnx         # swap single graphs (the rest from models/rnnt_sys)

Runs the three graphs in ONNX Runtime (CPU, one thread, default optimizations, the session
config q4c records in a compiled model's metadata applied: eval_asr._session), decodes each test
utterance with the system's driver (models/rnnt_sys/driver.py: greedy transducer decode, one
utterance per run) and scores against models/data/bilstm_am_test.json (the bilstm_am test set:
160 utterances, half in a held-out dialect): WER / CER = total edit distance / total reference
words / characters. Also reports the decode speed (real-time factor over 10 ms feature frames).
Importable: ``evaluate(paths) -> {"wer", "cer", ...}``, ``sessions(paths) -> graphs``.
numpy + onnxruntime only.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from pathlib import Path

import numpy as np

MODELS = Path(__file__).resolve().parent
SYSTEM = MODELS / "rnnt_sys"
GRAPHS = ("encoder", "predictor", "joiner")
sys.path.insert(0, str(MODELS))

from eval_asr import _session, edit_distance, error_rates, load_test_set  # noqa: E402


def driver():
    spec = importlib.util.spec_from_file_location("rnnt_sys_driver", SYSTEM / "driver.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def sessions(paths: dict[str, Path], threads: int = 1) -> dict:
    """{name: run(feeds) -> {output: array}} over ORT sessions, the driver's graphs contract."""
    graphs = {}
    for name in GRAPHS:
        sess = _session(paths[name], threads)
        outs = [o.name for o in sess.get_outputs()]
        graphs[name] = lambda feeds, s=sess, o=outs: dict(zip(o, s.run(o, dict(feeds))))
    return graphs


def default_paths(directory: Path = SYSTEM) -> dict[str, Path]:
    return {name: Path(directory) / f"{name}.onnx" for name in GRAPHS}


def evaluate(paths: dict[str, Path] | None = None, threads: int = 1, *, limit: int | None = None) -> dict:
    """{"wer", "cer", "utterances", "words", "chars", "held_out_voice", "seen_voices", "hyps",
    "items", "rtf", "seconds"} for the test set (the first ``limit`` utterances)."""
    doc, feats = load_test_set()
    utts = doc["utterances"][:limit]
    graphs = sessions(paths or default_paths(), threads)
    drv = driver()
    hyps, t0 = [], time.perf_counter()
    for f in feats[: len(utts)]:
        tokens, _ = drv.decode(graphs, f.astype(np.float32)[None])
        hyps.append("".join(doc["units"][k] for k in tokens))
    seconds = time.perf_counter() - t0
    refs = [u["text"] for u in utts]
    result = error_rates(refs, hyps)
    for key, held in (("held_out_voice", True), ("seen_voices", False)):
        sel = [i for i, u in enumerate(utts) if u["held_out_voice"] == held]
        if sel:
            sub = error_rates([refs[i] for i in sel], [hyps[i] for i in sel])
            result[key] = {"wer": sub["wer"], "cer": sub["cer"], "utterances": sub["utterances"]}
    audio = sum(len(f) for f in feats[: len(utts)]) * 0.01
    result.update(seconds=seconds, rtf=seconds / audio, hyps=hyps)
    result["examples"] = [{"ref": r, "hyp": h} for r, h in list(zip(refs, hyps))[:3]]
    result["items"] = [[edit_distance(r.split(), h.split()), len(r.split()), edit_distance(r, h), len(r)]
                       for r, h in zip(refs, hyps)]  # fmt: skip
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("directory", type=Path, nargs="?", default=SYSTEM, help="directory with encoder/predictor/joiner.onnx")
    for name in GRAPHS:
        parser.add_argument(f"--{name}", type=Path, help=f"use this {name} graph instead of DIRECTORY/{name}.onnx")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--limit", type=int)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    paths = default_paths(args.directory)
    for name in GRAPHS:
        if getattr(args, name):
            paths[name] = getattr(args, name)
    r = evaluate(paths, args.threads, limit=args.limit)
    if args.json:
        print(json.dumps({k: v for k, v in r.items() if k != "hyps"}, indent=1))
        return 0
    sizes = sum(p.stat().st_size for p in paths.values())
    print(f"{args.directory}: WER {100 * r['wer']:.2f} %  CER {100 * r['cer']:.2f} %  ({r['utterances']} utterances, "
          f"{r['words']} words; {sizes:,} bytes; decode {r['seconds']:.1f} s, RTF {r['rtf']:.4f})")  # fmt: skip
    for key in ("seen_voices", "held_out_voice"):
        if key in r:
            s = r[key]
            print(f"  {key:15s} WER {100 * s['wer']:.2f} %  CER {100 * s['cer']:.2f} %  ({s['utterances']} utterances)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
