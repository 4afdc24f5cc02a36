"""Rebuild the bundled FP32 test models: ``python models/make_models.py [names...]``.

Needs the ``models`` extra (torch, see models/requirements.txt); q4c itself never imports torch.
Every model is seeded, so a rebuild with the same torch/onnx versions reproduces the files.
Writes models/<name>.onnx, <name>.npz (one sample input, keyed by graph input names) and
<name>.ref.npz (torch's outputs for that input, keyed by graph output names).
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _acoustic  # noqa: E402
import _cells  # noqa: E402
import _lm  # noqa: E402
import _rnnt  # noqa: E402
from _common import MODELS  # noqa: E402

# bilstm_am and lstm_lm are trained, not generated: models/train_asr.py, models/train_lm.py.
BUILDERS = {
    "rnnt_encoder": _rnnt.rnnt_encoder,
    "rnnt_predictor": _rnnt.rnnt_predictor,
    "rnnt_joiner": _rnnt.rnnt_joiner,
    "conformer": _acoustic.conformer,
    "transformer_lm": _lm.transformer_lm,
    "gru_am": _acoustic.gru_am,
    "lstm_unrolled": _cells.lstm_unrolled,
    "lstm_unrolled_concat": _cells.lstm_unrolled_concat,
    "lstm_scan": _cells.lstm_scan,
}
SIZE_LIMIT = 48 * 2**20  # the whole models/ folder, as `du -sh models` counts (48M)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="*", metavar="name", help=f"default: all of {', '.join(BUILDERS)}")
    parser.add_argument("--json", type=Path, help="also write the per-model summaries here")
    args = parser.parse_args(argv)
    if unknown := [n for n in args.names if n not in BUILDERS]:
        parser.error(f"unknown model(s) {', '.join(unknown)}; choose from {', '.join(BUILDERS)}")
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", module=r"torch\.onnx.*")
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    summaries = {}
    for name in args.names or BUILDERS:
        info = BUILDERS[name]()
        summaries[name] = info
        extra = {k: info[k] for k in ("gates", "entropy") if k in info}
        print(f"{name:22s} params={info['params']:>9,d} bytes={info['bytes']:>10,d} opset={info['opset']} {extra}")
    total = sum(p.stat().st_size for p in MODELS.rglob("*") if p.is_file() and "__pycache__" not in p.parts and not p.name.endswith(".q4.onnx"))
    print(f"models/ total {total:,d} bytes (limit {SIZE_LIMIT:,d})")
    if args.json:
        args.json.write_text(json.dumps(summaries, indent=1, sort_keys=True))
    return 0 if total < SIZE_LIMIT else 1


if __name__ == "__main__":
    sys.exit(main())
