"""Scale: compiling a 636.8M-parameter Whisper-large-like encoder (external data), and
sensitivity analysis on Ray workers vs threads, with a projection to 100 workers.

Parts (--parts, default all):
  large  `q4c compile --bits 4` of models/make_large.py's full model, in a child process: wall
         time and peak RSS (resource.getrusage of the children); then the output in ONNX Runtime
         vs the reference interpreter on a short input (FRAMES mel frames).
  small  the default (sensitivity) compile of a one-layer member of the same family (same
         matrix shapes; the full model's candidates would not fit in memory, see the text).
  ray    measure-sensitivity wall time on a bundled model with 1 and 2 threads and 1 and 2 Ray
         workers (a local Ray started once, its start time reported apart), scores compared.
  proj   the per-pair cost on the full model (one forward run on FRAMES frames x the samples a
         score runs), for the projection to 100 workers.

    python benchmarks/bench_scale.py [--parts large,small,ray,proj] [--write] [--from-results]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import MODELS, REPO, RESULTS, START_COMMIT, publish, sha256_prefix, stamp, with_stamp  # noqa: E402

sys.path.insert(0, str(REPO / "models"))
import make_large  # noqa: E402

KEY = "scale"
FRAMES = 32  # mel frames of the check input: 16 tokens after the stride-2 conv
RAY_MODEL = "transformer_lm"
SMALL_LAYERS = 1
PARTIAL = Path.home() / ".cache" / "q4c" / "bench_scale.partial.json"
#: a two-layer member (45M parameters) where hessian scoring (light preparation) dominates
BIG = "whisper_like_2layer.onnx"


def _large_model() -> Path:
    path = make_large.DEFAULT_DIR / make_large.NAME
    if not path.exists():
        print(f"bench: generating {path}", file=sys.stderr)
        make_large.build(make_large.DEFAULT_DIR)
    return path


def _stamp_fields(path: Path) -> dict:
    import datetime

    shown = "~/" + str(path.relative_to(Path.home())) if path.is_relative_to(Path.home()) else str(path)
    return {"model_file": shown, "model_sha256": sha256_prefix(path), "date": datetime.date.today().isoformat(),
            "commit": START_COMMIT}


def _compile_child(model: Path, out: Path, args: list[str]) -> dict:
    """`python -m q4c compile` in a child: its report, wall time and peak RSS (the child's own:
    the benchmark process waits for one child at a time, so RUSAGE_CHILDREN's max is that child's)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "q4c", "compile", str(model), "-o", str(out), *args, "--json"],
                          capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    seconds = time.perf_counter() - start
    peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    if proc.returncode != 0:
        raise RuntimeError(f"compile failed: {proc.stderr[-2000:]}")
    report = json.loads(proc.stdout)
    if peak_kib <= before:
        print("bench: warning: an earlier child had a higher peak; the peak shown is a bound", file=sys.stderr)
    return {"report": report, "seconds": round(seconds, 1), "peak_rss_gib": round(peak_kib / 2**20, 2)}


def _ort_vs_interp(path: Path, frames: int) -> dict:
    """The output in ONNX Runtime vs the reference interpreter: exactly (MatMulNBits at
    accuracy_level 0, optimizations off: float compute, as the interpreter), and as deployed
    (accuracy_level 4 quantizes activations to int8 inside ONNX Runtime, which the interpreter
    does not model)."""
    import onnx
    import onnxruntime as ort

    from q4c import ort as q4ort
    from q4c.interp import Interpreter
    from q4c.metrics import sqnr_db
    from q4c.verify import float_accuracy_copy

    model = onnx.load(str(path))
    feeds = {"mel": np.random.default_rng(7).standard_normal((1, 80, frames)).astype(np.float32)}
    want = Interpreter(model).run(feeds)["hidden"]
    start = time.perf_counter()
    deployed = q4ort.run(q4ort.make_session(str(path)), feeds)["hidden"]
    ort_s = time.perf_counter() - start
    exact = q4ort.run(q4ort.make_session(float_accuracy_copy(model), level=ort.GraphOptimizationLevel.ORT_DISABLE_ALL),
                      feeds)["hidden"]
    return {"frames": frames, "ort_loads": True, "ort_seconds": round(ort_s, 1),
            "interp_vs_ort_max_abs": float(np.max(np.abs(exact - want))),
            "deployed_vs_interp_max_abs": float(np.max(np.abs(deployed - want))),
            "deployed_vs_interp_sqnr_db": round(sqnr_db(want, deployed), 1),
            "output_rms": float(np.sqrt(np.mean(want**2)))}


def large_rows(tmp: Path) -> list[dict]:
    model = _large_model()
    out = tmp / "large.q4.onnx"
    run = _compile_child(model, out, ["--bits", "4"])
    r = run["report"]
    row = {"kind": "compile", "model": "whisper_large_enc", "config": "--bits 4", "params": r["input"]["params"],
           "input_bytes": model.stat().st_size + model.with_name(model.name + ".data").stat().st_size,
           "output_bytes": r["output"]["bytes"], "seconds": run["seconds"], "peak_rss_gib": run["peak_rss_gib"],
           "passes": {p["name"]: p["seconds"] for p in r["passes"] if p["seconds"] >= 1.0},
           "sqnr_db_vs_fp32": r["verification"].get("output_sqnr_db"), **_stamp_fields(model),
           "choose_kernels": next((p["stats"] for p in r["passes"] if p["name"] == "choose-kernels"), None),
           "compile_interp_vs_ort_max_abs": r["verification"].get("interp_vs_ort_max_abs")}
    row.update(_ort_vs_interp(out, FRAMES))
    return [row]


def small_rows(tmp: Path) -> list[dict]:
    model = make_large.build(tmp / "small", layers=SMALL_LAYERS)
    run = _compile_child(model, tmp / "small.q4.onnx", ["--workers", "2"])
    r = run["report"]
    s = r["sensitivity"]
    return [{"kind": "compile", "model": f"whisper_like_{SMALL_LAYERS}layer", "config": "default (kl sensitivity), 2 threads",
             "params": r["input"]["params"], "output_bytes": r["output"]["bytes"], "seconds": run["seconds"],
             "peak_rss_gib": run["peak_rss_gib"], "sensitivity_seconds": s["seconds"], "tensors": s["tensors"],
             "forward_runs": s.get("forward_runs"), "avg_weight_bits": r.get("avg_weight_bits"), "pairs": s.get("pairs"),
             "prepare_seconds": s.get("prepare_seconds"), "units": s.get("units"),
             "passes": {p["name"]: p["seconds"] for p in r["passes"] if p["seconds"] >= 1.0},
             "sqnr_db_vs_fp32": r["verification"].get("output_sqnr_db")}]


def cands_rows(tmp: Path) -> list[dict]:
    """Candidates the default compile scores per weight of the family (counted, not quantized):
    the one-layer member's slots and candidate lists, as measure-sensitivity builds them."""
    from q4c import graph as g
    from q4c.config import CompileOptions
    from q4c.quant.candidates import candidate_list
    from q4c.quant.sensitivity import candidate_slots, gptq_eligible
    from q4c.quant.tying import tied_groups

    model = g.convert_opset(g.load(make_large.build(tmp / "cands", layers=1)), 25)
    graph = g.import_graph(model)
    opts = CompileOptions()
    slots = candidate_slots(graph, opts)
    gptq = gptq_eligible(graph, slots)
    tied = {n for group in tied_groups(dict(slots)) if len(group) > 1 for n in group}
    counts = {n: sum(c.bits != 32 for c in candidate_list(s, opts, 25, gptq=n in gptq, tied=n in tied))
              for n, s in slots.items()}
    return [{"kind": "candidates", "model": "whisper_like_1layer", "per_tensor": counts}]


def ray_rows(path: Path | None = None, sensitivities: tuple[str, ...] = ("kl", "hessian")) -> list[dict]:
    import ray

    from q4c import graph as g
    from q4c.calib.readers import synthetic_samples
    from q4c.config import WorkerBackend

    model = g.convert_opset(g.load(path or MODELS / f"{RAY_MODEL}.onnx"))
    samples = synthetic_samples(model, count=4, seed=0)
    start = time.perf_counter()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    ray_start = time.perf_counter() - start
    rows, reference = [], {}
    try:
        for sensitivity in sensitivities:
            for backend, workers in ((WorkerBackend.THREADS, 1), (WorkerBackend.THREADS, 2),
                                     (WorkerBackend.RAY, 1), (WorkerBackend.RAY, 2)):
                row = _sensitivity_row(model, samples, sensitivity, backend, workers, ray_start, reference)
                rows.append(row if path is None else {**row, "model": path.stem})
                print(f"bench: {rows[-1]}", file=sys.stderr)
    finally:
        ray.shutdown()
    return rows


def _sensitivity_row(model, samples, sensitivity: str, backend, workers: int, ray_start: float,
                     reference: dict) -> dict:
    from q4c import graph as g
    from q4c.config import CompileOptions
    from q4c.quant.sensitivity import measure

    graph = g.import_graph(model)
    start = time.perf_counter()
    table = measure(graph, CompileOptions(workers=workers, workers_backend=backend, sensitivity=sensitivity), 21,
                    samples)
    seconds = time.perf_counter() - start
    reference.setdefault(sensitivity, table.scores)
    pairs = sum(len(s) for s in table.scores.values())
    row = {"kind": "sensitivity", "model": RAY_MODEL, "sensitivity": sensitivity, "backend": backend.value,
           "workers": workers, "seconds": round(seconds, 2), "prepare_seconds": round(table.prepare_seconds, 2),
           "scoring_seconds": round(seconds - table.prepare_seconds, 2), "tensors": len(table.scores), "pairs": pairs,
           "same_scores_as_1_thread": table.scores == reference[sensitivity],
           "ray_local_start_seconds": round(ray_start, 2)}
    if table.distributed:
        row.update(tasks=table.distributed["tasks"], forward_runs=table.distributed["forward_runs"])
    else:
        row.update(forward_runs=table.runner.runs if table.runner else 0)
    return row


def proj_rows() -> list[dict]:
    """One forward run of the full FP32 model on FRAMES frames (what a kl score repeats per sample)."""
    from q4c import graph as g
    from q4c import ort as q4ort

    model = g.load(_large_model())
    session = q4ort.make_session(model, threads=1)
    feeds = {"mel": np.random.default_rng(7).standard_normal((1, 80, FRAMES)).astype(np.float32)}
    q4ort.run(session, feeds)
    times = []
    for _ in range(3):
        start = time.perf_counter()
        q4ort.run(session, feeds)
        times.append(time.perf_counter() - start)
    return [{"kind": "forward", "model": "whisper_large_enc", "frames": FRAMES, "seconds": round(float(np.median(times)), 3),
             "threads": 1}]


#: assumed for the projection only (not measured here): network between Ray nodes
NETWORK_GBIT_S = 10.0
LARGE_LAYERS = 32


def _projection(cands: dict, forward: dict, ray_rows: list[dict], samples: int) -> tuple[int, list[str]]:
    """Scoring of the full model's default compile on N Ray workers, from measured parts."""
    per_tensor = cands["per_tensor"]
    layer = sum(v for n, v in per_tensor.items() if n.startswith("layers."))
    pairs = layer * LARGE_LAYERS + sum(v for n, v in per_tensor.items() if not n.startswith("layers."))
    per_pair = forward["seconds"] * samples
    start = max(r["ray_local_start_seconds"] for r in ray_rows)
    per_candidate = max(per_tensor.values())
    shipped_gb = 2.55 * (1 + per_candidate)  # FP32 weights + every candidate, float32
    transfer = shipped_gb * 8 / NETWORK_GBIT_S
    lines = []
    for workers in (1, 2, 100):
        scoring = pairs * per_pair / workers
        overhead = start + (transfer if workers > 2 else 0)
        lines.append(f"| {workers} | {pairs:,} | {per_pair:.2f} | {scoring / 60:,.1f} | {overhead:.0f} | "
                     f"{(scoring + overhead) / 60:,.1f} |")
    return pairs, lines


def render(rows: list[dict]) -> str:
    by = {(_part(r)): r for r in rows if r["kind"] != "sensitivity"}
    ray_rows = [r for r in rows if r["kind"] == "sensitivity"]
    out = ["<!-- scale:begin -->", "## Scale: a 636.8M-parameter encoder, and sensitivity on Ray", "",
           "Produced by `python benchmarks/bench_scale.py --write` on the shared 2-core machine (other engineers' jobs "
           f"running: 1-minute load averages {sorted({x for r in rows for x in r.get('load_avg', [])})} during the runs, "
           "so times are upper bounds and speedups understated). The model is `models/make_large.py`'s Whisper-large-like encoder (d_model "
           "1280, 32 layers, 20 heads, FFN 5120, conv front-end on 80 mel bins; random weights with trained-like "
           "statistics), 2.55 GB of FP32 weights in external data.", ""]
    large = by.get("large")
    if large:
        out += ["| compile | params | input | output | wall time | peak RSS | ORT vs interpreter (max abs, "
                f"{large['frames']} frames) |", "|---|---:|---:|---:|---:|---:|---:|",
                f"| `q4c compile --bits 4` | {large['params']:,} | {large['input_bytes'] / 1e9:.2f} GB | "
                f"{large['output_bytes'] / 1e6:.0f} MB | {large['seconds']:.0f} s | {large['peak_rss_gib']:.2f} GiB | "
                f"{large['interp_vs_ort_max_abs']:.2g} (output RMS {large['output_rms']:.2f}) |", "",
                "ORT vs interpreter: MatMulNBits at accuracy_level 0 with optimizations off (float compute, as the "
                "interpreter); as deployed (accuracy_level 4: activations quantized to int8 inside ONNX Runtime) the "
                f"output differs from the interpreter's by up to {large.get('deployed_vs_interp_max_abs', float('nan')):.2g} "
                f"({large.get('deployed_vs_interp_sqnr_db')} dB SQNR). Peak RSS is the compiling child's "
                f"(resource.getrusage): {large['peak_rss_gib'] / (large['params'] * 4 / 2**30):.1f}x the "
                f"{large['params'] * 4 / 2**30:.2f} GiB of FP32 weights.", "",
                "Passes over a second: " + ", ".join(f"{k} {v:.0f} s" for k, v in large["passes"].items()) +
                f" (choose-kernels: {large.get('choose_kernels')}; `timed` means it timed both ONNX Runtime forms on "
                "this model, a cached choice skips that)" +
                f". SQNR of the 4-bit output vs FP32 on the synthetic input: {large['sqnr_db_vs_fp32']} dB (random "
                "weights with 1 % outlier input channels compound 4-bit noise over 32 layers; a quality figure for "
                "trained weights needs a trained model). The output loads in ONNX Runtime (under 2 GiB, so one file).",
                ""]
    small = by.get("small")
    if small and small["kind"] == "note":
        out += [small["text"], ""]
    elif small:
        out += ["| default compile, one-layer member | params | wall time | peak RSS | sensitivity | preparing | "
                "tensors | pairs |", "|---|---:|---:|---:|---:|---:|---:|---:|",
                f"| `--workers 2` | {small['params']:,} | {small['seconds']:.0f} s | {small['peak_rss_gib']:.2f} GiB | "
                f"{small['sensitivity_seconds']:.0f} s | {small['prepare_seconds']:.0f} s | {small['tensors']} | "
                f"{small['pairs']} |", ""]
    if ray_rows:
        out += [f"measure-sensitivity on the bundled `{RAY_MODEL}` and on `{Path(BIG).stem}` (the generator's "
                "two-layer member, 45M parameters, hessian only) with synthetic samples: threads of one process vs "
                "Ray workers (a local Ray started once beforehand, "
                f"{', '.join(sorted({str(r['ray_local_start_seconds']) for r in ray_rows}))} s, not included). "
                "Preparing (slots, gptq statistics, every candidate's rounding) runs in the driver either way; scoring "
                "is what the workers share (for Ray it includes starting the workers and their sessions):",
                "", "| model | sensitivity | backend | workers | wall time | preparing | scoring | tasks | forward runs | "
                "scores identical to 1 thread |", "|---|---|---|---:|---:|---:|---:|---:|---:|---|"]
        for r in ray_rows:
            out.append(f"| {r['model']} | {r.get('sensitivity', 'kl')} | {r['backend']} | {r['workers']} | "
                       f"{r['seconds']:.1f} s | "
                       f"{r.get('prepare_seconds', float('nan')):.1f} s | {r['scoring_seconds']:.1f} s | "
                       f"{r.get('tasks') or '-'} | {r['forward_runs']} | {'yes' if r['same_scores_as_1_thread'] else 'NO'} |")
        pick = {(r["model"], r.get("sensitivity"), r["backend"], r["workers"]): r for r in ray_rows}
        kl_t, kl_r = pick.get((RAY_MODEL, "kl", "threads", 1)), pick.get((RAY_MODEL, "kl", "ray", 1))
        overhead = "" if not (kl_t and kl_r) else (
            f" Ray's cost per task on `{RAY_MODEL}` kl: "
            f"{(kl_r['scoring_seconds'] - kl_t['scoring_seconds']) / kl_r['tasks'] * 1000:.1f} ms over a thread "
            "(1 worker each), starting the worker included.")
        out += ["", "No speedup from a second worker here, threads or Ray: the machine's 2 cores were shared with "
                "other jobs during these runs (load averages above), so a second worker got no second core. What "
                "the rows do show: Ray's scores equal the threaded ones bit for bit, and its overhead." + overhead, ""]
    forward, cands = by.get("proj"), by.get("cands")
    if forward and cands and ray_rows:
        samples = 4  # MAX_SAMPLES: a calibration set gives every score 4 samples
        pairs, lines = _projection(cands, forward, ray_rows, samples)
        per = max(cands["per_tensor"].values())
        out += [f"Projection: scoring the full model's default compile on Ray workers. Pairs: the one-layer member's "
                f"candidate lists (counted by `--parts cands`: {per} per matrix) x {LARGE_LAYERS} layers = {pairs:,}; "
                f"cost per pair: one FP32 forward run of the full model on {forward['frames']} frames "
                f"({forward['seconds']:.2f} s, 1 thread, measured) x {samples} calibration samples; overhead: the "
                "local Ray start measured above, plus for 100 workers shipping the weights and every candidate "
                f"({2.55 * (1 + per):.0f} GB as float32) once over an assumed {NETWORK_GBIT_S:.0f} Gbit/s network.", "",
                "| workers | pairs | s per pair | scoring (min) | overhead (s) | total (min) |",
                "|---:|---:|---:|---:|---:|---:|", *lines, "",
                "Not in the projection: preparing the candidates (rounding every weight every way, k-means codebooks "
                "and GPTQ included) runs serially in the compiling process and was not measured at this size (see "
                "above); with 100 workers it, not the scoring, sets the wall time. And every worker node needs the "
                "weights plus every candidate in memory (~50 GB here), so the default compile of this model needs "
                "candidates prepared per worker (each worker rounding only the tensors of its tasks): not done yet.",
                ""]
    out.append("<!-- scale:end -->")
    return "\n".join(out)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", default="large,small,ray,proj")
    parser.add_argument("--write", action="store_true")
    parser.add_argument("--from-results", action="store_true", help=f"re-render benchmarks/results/{KEY}.json")
    args = parser.parse_args()
    saved = json.loads((RESULTS / f"{KEY}.json").read_text()) if (RESULTS / f"{KEY}.json").exists() else []
    if args.from_results:
        rows = saved
    else:
        parts = args.parts.split(",")
        rows = []
        with tempfile.TemporaryDirectory() as tmp:
            for part in parts:
                print(f"bench: {part}", file=sys.stderr)
                load = os.getloadavg()[0]
                new = {"large": lambda: large_rows(Path(tmp)), "small": lambda: small_rows(Path(tmp)),
                       "ray": ray_rows, "proj": proj_rows, "cands": lambda: cands_rows(Path(tmp)),
                       "raybig": lambda: ray_rows(make_large.build(Path(tmp) / "big", layers=2, name=BIG),
                                                  ("hessian",))}[part]()
                # the machine is shared: the load average (1 min, 2 cores) at the start and end of the part
                rows.extend({**r, "load_avg": [round(load, 1), round(os.getloadavg()[0], 1)]} for r in new)
                PARTIAL.parent.mkdir(parents=True, exist_ok=True)  # survives a crash of a later part
                PARTIAL.write_text(json.dumps(rows, indent=2, default=str))
        rows = [r for r in saved if _part(r) not in parts] + rows  # parts not rerun keep their rows
    section = render(rows)
    print(with_stamp(section, stamp(KEY, rows)[0]))
    if args.write:
        publish(KEY, rows, section)
    return 0


def _part(row: dict) -> str:
    if row["kind"] == "sensitivity":
        return "raybig" if row["model"] == Path(BIG).stem else "ray"
    if row["kind"] == "forward":
        return "proj"
    if row["kind"] in ("candidates", "note"):
        return "cands" if row["kind"] == "candidates" else "small"
    return "large" if row["model"] == "whisper_large_enc" else "small"


if __name__ == "__main__":
    sys.exit(main())
