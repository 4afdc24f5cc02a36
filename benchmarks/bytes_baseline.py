"""Byte-identity guard for refactors: compile every bundled model with fixed options and record
the sha256 of each output, or compare against a recorded file.

    python benchmarks/bytes_baseline.py --write before.json    # on the commit before a refactor
    python benchmarks/bytes_baseline.py --check before.json    # after: lists every output that changed

Options are fixed so that nothing depends on machine load: `--kernels low-bit` and
`--kernels fp32-at-load` (never `auto`), `--bits 4` and the default budget, one sensitivity
worker. Each compile also saves its plan and replays it with `--plan`: the replay must write the
same bytes and an equal plan file (issue "one orchestrator, one plan").

Each row also records `content_sha256`, a digest of what the output holds without its tensor and
node names (every initializer's type, shape and bytes; every node's op and attributes): a change
that only renames (the decoders' short names) keeps it and changes `sha256`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODELS = ("bilstm_am", "conformer", "gru_am", "lstm_lm", "lstm_scan", "lstm_unrolled", "lstm_unrolled_concat",
          "rnnt_encoder", "rnnt_joiner", "rnnt_predictor", "transformer_lm")
CALIB = {"bilstm_am": "models/data/bilstm_am_calib", "lstm_lm": "models/data/lstm_lm_calib"}
CONFIGS = {"bits4-lowbit": ["--bits", "4", "--kernels", "low-bit"],
           "bits4-fp32load": ["--bits", "4", "--kernels", "fp32-at-load"],
           "default-lowbit": ["--kernels", "low-bit"],
           "default-fp32load": ["--kernels", "fp32-at-load"]}


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _content_sha(path: Path) -> str:
    """sha256 over the sorted initializers (type, shape, bytes) and nodes (domain, op, attributes)
    of every graph, names left out."""
    import onnx

    parts: list[bytes] = []

    def walk(graph: onnx.GraphProto) -> None:
        for t in graph.initializer:
            t = onnx.TensorProto.FromString(t.SerializeToString())
            t.name = ""
            parts.append(b"I" + t.SerializeToString())
        for node in graph.node:
            attrs = []
            for a in node.attribute:
                if a.type == onnx.AttributeProto.GRAPH:
                    walk(a.g)
                    attrs.append(a.name.encode())
                else:
                    attrs.append(a.SerializeToString())
            parts.append(b"N" + f"{node.domain}:{node.op_type}".encode() + b"".join(sorted(attrs)))

    walk(onnx.load(path).graph)
    return hashlib.sha256(b"".join(sorted(parts))).hexdigest()


def _compile(model: str, extra: list[str], out: Path, tmp: Path) -> dict[str, object]:
    calib = ROOT / CALIB.get(model, f"models/{model}.npz")
    base = [sys.executable, "-m", "q4c", "compile", str(ROOT / f"models/{model}.onnx"), "--calib", str(calib),
            "--no-verify", "--workers", "1", *extra]
    plan = tmp / "plan.json"
    first = subprocess.run([*base, "-o", str(out), "--save-plan", str(plan)], capture_output=True, text=True)
    if first.returncode != 0:
        return {"error": (first.stderr.strip().splitlines() or ["?"])[-1]}
    row: dict[str, object] = {"sha256": _sha(out), "content_sha256": _content_sha(out)}
    if plan.exists():
        replay, plan2 = tmp / "replay.onnx", tmp / "plan2.json"
        again = subprocess.run([*base, "--plan", str(plan), "-o", str(replay), "--save-plan", str(plan2)],
                               capture_output=True, text=True)
        if again.returncode != 0:
            row["replay"] = "error: " + (again.stderr.strip().splitlines() or ["?"])[-1]
        else:
            same_bytes = _sha(replay) == row["sha256"]
            same_plan = plan2.exists() and json.loads(plan2.read_text()) == json.loads(plan.read_text())
            row["replay"] = "identical" if same_bytes and same_plan else (
                f"differs (bytes {'same' if same_bytes else 'differ'}, plan {'same' if same_plan else 'differs'})")
    return row


def run() -> dict[str, dict[str, object]]:
    results: dict[str, dict[str, object]] = {}
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        for model in MODELS:
            for name, extra in CONFIGS.items():
                key = f"{model}/{name}"
                results[key] = _compile(model, extra, tmp / "out.onnx", tmp)
                print(key, results[key], file=sys.stderr, flush=True)
    return results


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    group = ap.add_mutually_exclusive_group(required=True)
    group.add_argument("--write", type=Path, help="record the sha256 of every output here")
    group.add_argument("--check", type=Path, help="compare against a recorded file")
    args = ap.parse_args()
    results = run()
    if args.write:
        args.write.write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")
        return 0
    before = json.loads(args.check.read_text())
    changed = [k for k in sorted(set(before) | set(results))
               if before.get(k, {}).get("sha256") != results.get(k, {}).get("sha256")]
    replay_bad = [k for k, r in results.items() if r.get("replay", "identical") != "identical"]
    for k in changed:
        renamed = before.get(k, {}).get("content_sha256") == results.get(k, {}).get("content_sha256") is not None
        print(f"{'RENAMED' if renamed else 'CHANGED'} {k}: {before.get(k)} -> {results.get(k)}")
    for k in replay_bad:
        print(f"REPLAY {k}: {results[k]['replay']}")
    print(f"{len(results) - len(changed)}/{len(results)} outputs identical; {len(replay_bad)} plan replays differ")
    return 1 if changed or replay_bad else 0


if __name__ == "__main__":
    sys.exit(main())
