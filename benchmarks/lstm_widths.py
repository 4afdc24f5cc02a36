"""What one LSTM costs in decisions at each code width, whole and gate by gate (issue 13).

On silero_vad_16k_op15 (models/real/fetch.py) canonicalized as q4c compiles it, the LSTM's input
weight W and recurrent weight R [1, 512, 128] are quantized (every other weight FP32) at 4, 5, 6
and 8 bits (q4c's quantize_slot: GPTQ below 8 bits against the Hessians q4c gathers, symmetric
at 6 and 8), and, at 4-bit GPTQ, one gate's 128 rows at a time (ONNX gate order i, o, f, c). The
model runs closed loop over the calibration audio as silero-vad runs it (models/real/silero.py),
and the table gives the decision flips at 0.5 against FP32. The calibration audio, not the test
audio: this chooses what q4c offers, and the test audio judges q4c's plans (bench_real).

    python benchmarks/lstm_widths.py [--write]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "models" / "real"))
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT))

import fetch  # noqa: E402
import silero  # noqa: E402
from _common import run  # noqa: E402

import q4c  # noqa: E402
from q4c.calib.readers import PythonReader, SamplesReader  # noqa: E402
from q4c.calib.runner import materialize  # noqa: E402
from q4c.config import CompileOptions, Granularity  # noqa: E402
from q4c.objectives import group_sequences  # noqa: E402
from q4c.quant.gptq import fitting_calls, input_hessians  # noqa: E402
from q4c.quant.sensitivity import MAX_SAMPLES, candidate_slots, gptq_eligible  # noqa: E402
from q4c.quant.weights import quantize_slot  # noqa: E402

KEY = "lstm_widths"
EXPORT = "silero_vad_16k_op15"
CANONICAL = "fold-constants,fuse-lstm-gates,synthesize-constants,lower-gemm,lower-pointwise-conv,dedupe-weights"
WIDTHS = ((4, "gptq"), (5, "gptq"), (6, "gptq"), (6, "symmetric"), (8, "symmetric"))
GATES = "iofc"


def measure(export: str, tmp: Path) -> list[dict]:
    assert export == EXPORT
    src = fetch.model_path(EXPORT)
    canon_path = tmp / "canonical.onnx"
    q4c.compile_file(src, canon_path, CompileOptions(), passes=CANONICAL, verify=False)
    canon = onnx.load(canon_path)
    reader = PythonReader(f"{ROOT / 'models' / 'real' / 'silero.py'}:calib_{EXPORT}")
    samples = SamplesReader(list(reader), reader.state_pairs)
    feeds = materialize(canon, samples)
    _, grouped = group_sequences(canon, samples, feeds)
    graph = gs.import_onnx(canon)
    lstm = {n: s for n, s in candidate_slots(graph, CompileOptions()).items() if s.role in ("lstm_w", "lstm_r")}
    hessians = input_hessians(canon, gptq_eligible(graph, lstm), feeds, fitting_calls(grouped, MAX_SAMPLES))
    weights = {n: np.asarray(s.tensor.values, np.float32) for n, s in lstm.items()}

    def rounded(name: str, bits: int, scheme: str) -> np.ndarray:
        return quantize_slot(lstm[name], weights[name], bits, Granularity(), scheme, kernel_scales=False,
                             hessians=hessians.get(name)).dequantize()

    def flips(changes: dict[str, np.ndarray]) -> float:
        model = onnx.load(canon_path)
        for init in model.graph.initializer:
            if init.name in changes:
                init.CopyFrom(onnx.numpy_helper.from_array(changes[init.name].astype(np.float32), init.name))
        path = tmp / "variant.onnx"
        onnx.save(model, path)
        [row] = list(silero.compare(path, src, EXPORT, split="calib"))
        return float(row["flips"])

    role = {n: "W" if s.role == "lstm_w" else "R" for n, s in lstm.items()}
    rows = []
    for bits, scheme in WIDTHS:
        both = {n: rounded(n, bits, scheme) for n in lstm}
        rows.append({"weights": "W and R", "bits": bits, "scheme": scheme, "flips": flips(both)})
        for name in lstm:
            rows.append({"weights": role[name], "bits": bits, "scheme": scheme, "flips": flips({name: both[name]})})
        print(rows[-3:], flush=True)
    for name in sorted(lstm, key=lambda n: role[n], reverse=True):
        four = rounded(name, 4, "gptq")
        hidden = four.shape[1] // 4
        for g, gate in enumerate(GATES):
            w = weights[name].copy()
            w[:, g * hidden:(g + 1) * hidden] = four[:, g * hidden:(g + 1) * hidden]
            rows.append({"weights": f"{role[name]} gate {gate}", "bits": 4, "scheme": "gptq", "flips": flips({name: w})})
            print(rows[-1], flush=True)
    return [{"model": EXPORT, **r} for r in rows]


def section(rows: list[dict]) -> str:
    out = [f"<!-- {KEY}:begin -->", "## One LSTM at each code width (silero_vad_16k_op15)", "",
           __doc__.split("\n\n")[1].replace("\n", " "), "",
           "| weights quantized | bits | rounding | decision flips % (calibration audio, closed loop) |", "|---|---|---|---|"]
    out += [f"| {r['weights']} | {r['bits']} | {r['scheme']} | {100 * r['flips']:.3f} |" for r in rows]
    out += ["", "6-bit codes (q4c.quant.planes) are what the LSTM can take short of 8: offered with `--require`."
            " The gates differ by at most ~2.5x at 4 bits, so splitting a weight by gate would give the"
            " allocation little: not built.", f"<!-- {KEY}:end -->"]
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--write", action="store_true", help=f"write benchmarks/results/{KEY}.json and BENCHMARKS.md")
    args = parser.parse_args()
    run(KEY, [EXPORT], measure, section, merge=False, write=args.write)


if __name__ == "__main__":
    main()
