"""Calibration and INT8 activations, measured in one run:

1. q4c's calibration (`q4c.calib.collect`) against onnxruntime.quantization's calibrators
   (`create_calibrator`, MinMax and Entropy) on the same model and the same 32 samples: wall
   time and peak memory, each run in a fresh process (peak RSS above the process's RSS just
   before calibrating, /proc/self/clear_refs), and how far q4c's min/max ranges are from ORT's.
2. Calibration time of every bundled model with every observer over a 32-sample directory.
3. `--activations int8` on the Conformer and the Transformer LM, per observer: output SQNR
   against FP32 on held-out samples, the op histogram of ONNX Runtime's optimized graph, and
   latency against FP32 (1 intra-op thread, sessions interleaved, median of N calls).

    python benchmarks/bench_calib.py [--iters 50] [--write]

Samples are seeded variations of each model's committed sample (`models/<name>.npz`): float
inputs cropped along their time axis, scaled and perturbed; token inputs redrawn. Held-out
samples use another seed. With --write, the tables replace the `calibration` section of
BENCHMARKS.md and the raw figures go to benchmarks/results/calibration.json.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import onnx

REPO = Path(__file__).resolve().parent.parent
MODELS = REPO / "models"
sys.path.insert(0, str(REPO / "benchmarks"))

from _common import stamp, stamped_rows, with_stamp, write_section  # noqa: E402

import q4c  # noqa: E402
from q4c import graph as g  # noqa: E402
from q4c import ort as q4ort  # noqa: E402
from q4c.calib.readers import infer_state_pairs, input_specs, open_reader  # noqa: E402
from q4c.calib.runner import collect  # noqa: E402
from q4c.compiler import sqnr_db  # noqa: E402
from q4c.timing import interleaved, timed

OBSERVERS = ("minmax", "percentile", "entropy", "mse")
#: (model, samples, frames per sample or None for the committed length)
COMPARE_RUNS = (("conformer", 32, 100), ("conformer", 256, None), ("transformer_lm", 32, None), ("rnnt_encoder", 32, 100))
INT8_MODELS = ("conformer", "transformer_lm")
N_SAMPLES = 32
N_HELD_OUT = 8


def bundled_models() -> list[str]:
    return sorted(p.stem for p in MODELS.glob("*.onnx") if not p.name.endswith(".q4.onnx"))


def make_samples(name: str, count: int, seed: int, max_frames: int | None = None) -> list[dict[str, np.ndarray]]:
    """Seeded variations of the committed sample (crops of at most `max_frames` frames)."""
    model = onnx.load(MODELS / f"{name}.onnx")
    with np.load(MODELS / f"{name}.npz") as npz:
        base = {k: npz[k] for k in npz.files}
    specs = {s.name: s for s in input_specs(model)}
    state_inputs = set(infer_state_pairs(model).values())
    vocab = _vocab(model)
    rng = np.random.default_rng(seed)
    samples = []
    for _ in range(count):
        sample = {}
        for key, value in base.items():
            if key in state_inputs:
                continue
            if np.issubdtype(value.dtype, np.integer):
                fixed = isinstance(specs[key].shape[1], int) and specs[key].shape[1] > 0
                length = int(rng.integers(4, 9)) if fixed else value.shape[1]
                sample[key] = rng.integers(0, vocab.get(key, 2), size=(value.shape[0], length)).astype(value.dtype)
                continue
            crop = value
            for axis, dim in enumerate(specs[key].shape):
                if isinstance(dim, str) and axis > 0 and value.shape[axis] > 8:
                    n = value.shape[axis]
                    length = int(rng.integers(n // 2, n + 1)) if max_frames is None else min(n, max_frames)
                    start = int(rng.integers(0, n - length + 1))
                    crop = np.take(crop, np.arange(start, start + length), axis=axis)
            noise = rng.standard_normal(crop.shape) * 0.1 * (float(np.std(crop)) or 1.0)
            sample[key] = (crop * rng.uniform(0.7, 1.3) + noise).astype(value.dtype)
        samples.append(sample)
    return samples


def _vocab(model: onnx.ModelProto) -> dict[str, int]:
    shapes = {t.name: list(t.dims) for t in model.graph.initializer}
    return {n.input[1]: shapes[n.input[0]][0] for n in model.graph.node
            if n.op_type == "Gather" and n.input[0] in shapes and len(n.input) > 1}


def write_dir(samples: list[dict[str, np.ndarray]], directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for i, s in enumerate(samples):
        np.savez(directory / f"{i:03d}.npz", **s)
    return directory


# --- 1. q4c vs onnxruntime.quantization, each in a fresh process ---------------------------------

def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def _calibrate_in_child(tool: str, method: str, model_path: str, data_dir: str, queue: mp.Queue) -> None:
    try:
        queue.put(_calibrate(tool, method, model_path, data_dir))
    except Exception as e:  # reported in the table, not hidden
        queue.put({"error": f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"})


def _calibrate(tool: str, method: str, model_path: str, data_dir: str) -> dict:
    files = sorted(Path(data_dir).glob("*.npz"))
    samples = [dict(np.load(f)) for f in files]
    model = onnx.load(model_path)
    if tool == "ort":
        from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, create_calibrator

        class Reader(CalibrationDataReader):
            def __init__(self) -> None:
                self.items = iter(samples)

            def get_next(self):  # type: ignore[no-untyped-def]
                return next(self.items, None)

        tmp = tempfile.mkdtemp()
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak RSS (VmHWM) to the current RSS
    before = _rss_kib("VmRSS")
    start = time.perf_counter()  # wall time of one calibration run (a duration, not a latency comparison)
    if tool == "q4c":
        table = collect(model, samples, observer=method, probes=False)
        ranges = {n: (s.min, s.max) for n, s in table.tensors.items()}
    else:
        calibrator = create_calibrator(model_path, augmented_model_path=str(Path(tmp) / "augmented.onnx"),
                                       calibrate_method={"minmax": CalibrationMethod.MinMax,
                                                         "entropy": CalibrationMethod.Entropy}[method])
        calibrator.collect_data(Reader())
        result = calibrator.compute_data()
        ranges = {n: (float(np.asarray(v.range_value[0]).reshape(-1)[0]), float(np.asarray(v.range_value[1]).reshape(-1)[0]))
                  for n, v in result.data.items()}
    seconds = time.perf_counter() - start
    peak = _rss_kib("VmHWM")
    return {"seconds": seconds, "peak_mib": (peak - before) / 1024, "tensors": len(ranges), "ranges": ranges}


def compare_with_ort(name: str, count: int, frames: int | None, tmp: Path) -> dict:
    model_path = tmp / f"{name}.opset21.onnx"
    onnx.save(g.convert_opset(g.load(MODELS / f"{name}.onnx")), model_path)
    # one length for all samples: ORT's Entropy calibrator stacks every sample's tensors into one
    # array and fails on variable-length inputs ("inhomogeneous shape"), q4c's does not
    base_frames = int(next(iter(np.load(MODELS / f"{name}.npz").values())).shape[1])
    data_dir = write_dir(make_samples(name, count, seed=1, max_frames=frames or base_frames),
                         tmp / f"{name}_{count}_calib")
    ctx = mp.get_context("spawn")
    runs = {}
    for tool, method in (("q4c", "minmax"), ("ort", "minmax"), ("q4c", "entropy"), ("ort", "entropy")):
        print(f"bench: {name} x{count} {tool} {method}", file=sys.stderr)
        queue: mp.Queue = ctx.Queue()
        proc = ctx.Process(target=_calibrate_in_child, args=(tool, method, str(model_path), str(data_dir), queue))
        proc.start()
        runs[f"{tool}-{method}"] = queue.get(timeout=3600)
        proc.join()
    q4c_ranges, ort_ranges = runs["q4c-minmax"].get("ranges", {}), runs["ort-minmax"].get("ranges", {})
    common = sorted(set(q4c_ranges) & set(ort_ranges))
    # q4c leaves infinities out (an attention mask's -inf); ORT's range then is infinite
    finite = [n for n in common if np.all(np.isfinite(ort_ranges[n]))]
    worst = max((max(abs(q4c_ranges[n][0] - ort_ranges[n][0]), abs(q4c_ranges[n][1] - ort_ranges[n][1]))
                 for n in finite), default=0.0)
    for run in runs.values():
        run.pop("ranges", None)
    return {"model": name, "samples": count, "frames": frames or base_frames, "runs": runs,
            "minmax_common_tensors": len(finite), "minmax_ort_infinite": len(common) - len(finite),
            "minmax_max_abs_diff": worst}


# --- 2. every model x every observer ---------------------------------------------------------------

def observer_matrix(tmp: Path) -> list[dict]:
    rows = []
    for name in bundled_models():
        model = g.convert_opset(g.load(MODELS / f"{name}.onnx"))
        data_dir = write_dir(make_samples(name, N_SAMPLES, seed=1, max_frames=None), tmp / f"{name}_matrix")
        row = {"model": name, "seconds": {}}
        for observer in OBSERVERS:
            print(f"bench: {name} {observer}", file=sys.stderr)
            table, seconds, _ = timed(lambda: collect(model, open_reader(model, data_dir), observer=observer))
            row["seconds"][observer] = round(seconds, 3)
            row.update(tensors=sum(s.source == "ort" for s in table.tensors.values()),
                       probes=sum(s.source == "probe" for s in table.tensors.values()), calls=table.calls)
        rows.append(row)
    return rows


# --- 3. --activations int8 ---------------------------------------------------------------------------

def ort_optimized_ops(path: Path, tmp: Path) -> dict[str, int]:
    import onnxruntime as ort

    model = onnx.load(path)
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp / "optimized.onnx")
    options.log_severity_level = 3
    for k, v in q4ort.session_config(model).items():
        options.add_session_config_entry(k, v)
    ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    ops = Counter(f"{n.domain}::{n.op_type}" if n.domain else n.op_type for n in onnx.load(tmp / "optimized.onnx").graph.node)
    return dict(sorted(ops.items()))


def latency(paths: dict[str, Path], feeds: dict[str, np.ndarray], iters: int) -> dict[str, float]:
    sessions = {k: q4ort.make_session(onnx.load(p), threads=1) for k, p in paths.items()}
    # interleaved: machine noise hits every form alike; process-CPU time (q4c.timing says why)
    timing = interleaved({k: (lambda s=s: s.run(None, feeds)) for k, s in sessions.items()}, rounds=iters, warmup=5)
    return {k: timing.median(k) * 1e3 for k in sessions}


def held_out_sqnr(fp32: Path, quant: Path, samples: list[dict[str, np.ndarray]]) -> float:
    ref_s = q4ort.make_session(onnx.load(fp32), threads=1)
    q_s = q4ort.make_session(onnx.load(quant), threads=1)
    values = []
    for feeds in samples:
        ref, out = q4ort.run(ref_s, feeds), q4ort.run(q_s, feeds)
        values += [sqnr_db(v, out[k]) for k, v in ref.items() if np.issubdtype(v.dtype, np.floating)]
    return round(float(np.mean(values)), 2)


def int8_activations(name: str, iters: int, tmp: Path) -> dict:
    src = MODELS / f"{name}.onnx"
    data_dir = write_dir(make_samples(name, N_SAMPLES, seed=1), tmp / f"{name}_int8")
    held_out = make_samples(name, N_HELD_OUT, seed=2)
    paths = {"fp32": src}
    print(f"bench: {name} default compile", file=sys.stderr)
    q4c.compile_file(src, tmp / f"{name}.w4.onnx", data=data_dir)
    paths["weights-only"] = tmp / f"{name}.w4.onnx"
    result: dict = {"model": name, "observers": {}}
    for observer in OBSERVERS:
        print(f"bench: {name} --activations int8 --observer {observer}", file=sys.stderr)
        out = tmp / f"{name}.int8.{observer}.onnx"
        report = q4c.compile_file(src, out, q4c.CompileOptions(activations="int8", observer=observer), data=data_dir)
        result["observers"][observer] = {
            "held_out_sqnr_db": held_out_sqnr(src, out, held_out),
            "bytes": report["output"]["bytes"],
            "stats": next(p["stats"] for p in report["passes"] if p["name"] == "insert-activation-qdq"),
        }
        paths[f"int8-{observer}"] = out
    result["weights_only_sqnr_db"] = held_out_sqnr(src, paths["weights-only"], held_out)
    best = max(OBSERVERS, key=lambda o: result["observers"][o]["held_out_sqnr_db"])
    result["best_observer"] = best
    result["ort_optimized_ops"] = ort_optimized_ops(paths[f"int8-{best}"], tmp)
    with np.load(MODELS / f"{name}.npz") as npz:
        feeds = {k: npz[k] for k in npz.files}
    ms = latency({k: paths[k] for k in ("fp32", "weights-only", f"int8-{best}")}, feeds, iters)
    result["latency_ms"] = {k: round(v, 3) for k, v in ms.items()}
    result["latency_ratio"] = {k: round(v / ms["fp32"], 3) for k, v in ms.items()}
    result["fp32_bytes"] = src.stat().st_size
    result["weights_only_bytes"] = paths["weights-only"].stat().st_size
    return result


# --- rendering ------------------------------------------------------------------------------------

def render(compare: list[dict], matrix: list[dict], int8: list[dict], iters: int) -> str:
    lines = ["<!-- calibration:begin -->", "## Calibration and INT8 activations", "",
             f"ONNX Runtime {_ort_version()}, this machine's 2 vCPUs, shared with other jobs (noisy: figures move "
             "10-20 % between runs). Calibration data: "
             f"{N_SAMPLES} seeded variations of each model's committed sample (crops, scaling, noise; tokens redrawn).",
             "", "### Calibration cost: q4c vs onnxruntime.quantization",
             "",
             "Same model (converted to opset 21), same samples (all of one length: ORT's Entropy calibrator stacks "
             "every sample into one array and fails on variable-length inputs), each calibrator in a fresh process. Peak memory is "
             "the peak RSS above the RSS just before calibrating. q4c: `collect(model, samples, observer=...)` over every "
             "float tensor of the graph (4096-bin histograms for entropy); ORT: `create_calibrator(...)`, `collect_data`, "
             "`compute_data` with its defaults (Entropy: 128 bins). Interpreter probes off (ORT cannot see LSTM "
             "internals either). ORT's MinMax keeps every intermediate output until `compute_data` and its Entropy "
             "stacks them into arrays, so their memory grows with the data (compare the two conformer rows); q4c's "
             "observers are fixed-size whatever the data.", "",
             "| model | samples x frames | tensors (q4c / ORT) | q4c minmax s | ORT MinMax s | q4c entropy s | ORT Entropy s | q4c minmax MiB | ORT MinMax MiB | q4c entropy MiB | ORT Entropy MiB | min/max ranges, max abs diff |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    keys = ("q4c-minmax", "ort-minmax", "q4c-entropy", "ort-entropy")
    for row in compare:
        r = row["runs"]
        secs = [f"{r[k]['seconds']:.2f}" if "error" not in r[k] else "failed" for k in keys]
        mib = [f"{r[k]['peak_mib']:.1f}" if "error" not in r[k] else "-" for k in keys]
        tensors = " / ".join(str(r[k].get("tensors", "-")) for k in ("q4c-minmax", "ort-minmax"))
        lines.append(f"| {row['model']} | {row['samples']} x {row['frames']} | {tensors} | {secs[0]} | {secs[1]} | {secs[2]} | {secs[3]} | "
                     f"{' | '.join(mib)} | {row['minmax_max_abs_diff']:.2g} over {row['minmax_common_tensors']}"
                     + (f" (+{row['minmax_ort_infinite']} where ORT's range is infinite)" if row["minmax_ort_infinite"] else "")
                     + " |")
    errors = [(row["model"], k, row["runs"][k]["error"]) for row in compare for k in keys if "error" in row["runs"][k]]
    lines += [""] + [f"- {m} {k} failed: `{e}`" for m, k, e in errors]
    lines += ["", "### Every bundled model with every observer (32 samples, seconds)", "",
              "Graph tensors through ONNX Runtime; LSTM/GRU gates and cell state through the interpreter's probes on "
              "the first 8 calls (`probes` column). Stateful models run each sample call by call with their state "
              "carried (`calls` > 32).", "",
              "| model | tensors | probes | calls | " + " | ".join(OBSERVERS) + " |",
              "|---|---|---|---|" + "---|" * len(OBSERVERS)]
    for row in matrix:
        lines.append(f"| {row['model']} | {row['tensors']} | {row['probes']} | {row['calls']} | "
                     + " | ".join(f"{row['seconds'][o]:.2f}" for o in OBSERVERS) + " |")
    lines += ["", "### `--activations int8`", "",
              f"`q4c compile MODEL --calib DIR --activations int8 --observer O` (everything else default), calibrated on "
              f"the 32 samples, SQNR of the output against FP32 averaged over {N_HELD_OUT} held-out samples (another "
              f"seed). Weights of the quantized MatMul/Conv are int8 per channel (ORT's integer kernels take no other); "
              f"`weights-only` is the default compile (sensitivity-guided, 4 bits average) for comparison. Latency on the "
              f"committed sample input, 1 intra-op thread, sessions interleaved, median of {iters} calls.", ""]
    for row in int8:
        lines += [f"**{row['model']}** (FP32 {row['fp32_bytes'] / 2**20:.2f} MiB, weights-only "
                  f"{row['weights_only_bytes'] / 2**20:.2f} MiB, held-out SQNR {row['weights_only_sqnr_db']} dB)", "",
                  "| observer | held-out SQNR dB | size MiB | quantized / kept float |", "|---|---|---|---|"]
        for obs, r in row["observers"].items():
            quantized = sum(v for k, v in r["stats"].items() if k.startswith("quantized_"))
            kept = ", ".join(f"{k[len('kept_float_'):]} {v}" for k, v in sorted(r["stats"].items()) if k.startswith("kept_float_"))
            lines.append(f"| {obs}{' (best)' if obs == row['best_observer'] else ''} | {r['held_out_sqnr_db']} | "
                         f"{r['bytes'] / 2**20:.2f} | {quantized} / {kept or '-'} |")
        lat, ratio = row["latency_ms"], row["latency_ratio"]
        lines += ["", "| form | ms | ratio to FP32 |", "|---|---|---|"]
        lines += [f"| {k} | {lat[k]:.3f} | {ratio[k]:.2f} |" for k in lat]
        entropy, best = row["observers"]["entropy"]["held_out_sqnr_db"], row["observers"][row["best_observer"]]["held_out_sqnr_db"]
        if entropy < best - 3:
            lines += ["", f"The entropy (KL) ranges cost {best - entropy:.1f} dB here: KL favours resolution near zero and "
                      "clips the long positive tails of ReLU/SiLU outputs to a fraction of what percentile keeps."]
        ops = row["ort_optimized_ops"]
        lines += ["", f"ONNX Runtime's optimized graph (`SessionOptions.optimized_model_filepath`, int8-{row['best_observer']}): "
                  + ", ".join(f"`{k}` {v}" for k, v in ops.items()), ""]
    lines.append("<!-- calibration:end -->")
    return "\n".join(lines)


def _ort_version() -> str:
    import onnxruntime

    return onnxruntime.__version__


def _publish(section: str, rows: list[dict]) -> None:
    """The section into BENCHMARKS.md, stamped with the hash of every bundled model as measured."""
    write_section(REPO / "BENCHMARKS.md", with_stamp(section, stamp("calibration", rows)[0]), "calibration")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument("--write", action="store_true", help="update BENCHMARKS.md and benchmarks/results/calibration.json")
    parser.add_argument("--render-only", action="store_true", help="re-render BENCHMARKS.md from the saved results")
    args = parser.parse_args()
    results = REPO / "benchmarks" / "results" / "calibration.json"
    if args.render_only:
        saved = json.loads(results.read_text())
        section = render(saved["compare"], saved["observers"], saved["int8"], saved["iters"])
        print(section)
        if args.write:
            _publish(section, saved.get("stamp_rows") or [{"model": m, "model_sha256": None} for m in bundled_models()])
        return 0
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        compare = [compare_with_ort(name, count, frames, tmp) for name, count, frames in COMPARE_RUNS]
        matrix = observer_matrix(tmp)
        int8 = [int8_activations(name, args.iters, tmp) for name in INT8_MODELS]
    section = render(compare, matrix, int8, args.iters)
    print(section)
    if args.write:
        (REPO / "benchmarks" / "results").mkdir(exist_ok=True)
        rows = stamped_rows([{"model": name} for name in bundled_models()])  # the observer matrix runs every one
        results.write_text(json.dumps({"compare": compare, "observers": matrix, "int8": int8, "iters": args.iters,
                                       "stamp_rows": rows}, indent=2) + "\n")
        _publish(section, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
