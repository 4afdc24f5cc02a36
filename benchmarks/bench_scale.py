"""Scale: compiling a 636.8M-parameter Whisper-large-like encoder (external data), and
sensitivity analysis on Ray workers vs threads, with a projection to 100 workers.

Parts (--parts, default large,small,ray,proj; `default` and `cands` on request):
  large  `q4c compile --bits 4` of models/make_large.py's full model, in a child process: wall
         time and peak RSS (resource.getrusage of the children); then the output in ONNX Runtime
         vs the reference interpreter on a short input (FRAMES mel frames).
  small  the default (sensitivity) compile of a one-layer member of the same family (same
         matrix shapes; the full model's candidates would not fit in memory, see the text).
  ray    measure-sensitivity wall time on a bundled model with 1 and 2 threads and 1 and 2 Ray
         workers (a local Ray started once, its start time reported apart), scores compared.
  proj   one forward run of the full model on FRAMES frames (not rendered since `default` measures it
         inside the tasks).
  cands  the default compile's candidates per weight of the family (counted, not rounded).
  default  the default compile of the full model in a child (scale_default.py), 1 and 2 threads, each
         stopped after --default-limit seconds: RSS per phase, per-task cost, rounding cost per
         shape class; with cands, the projection to 1, 2 and 100 workers.

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
RAY_MODEL = "rnnt_encoder"  # the largest bundled model: rounding 100 candidates dominates
SMALL_LAYERS = 1
PARTIAL = Path.home() / ".cache" / "q4c" / "bench_scale.partial.json"


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
    """`q4c compile --bits 4` of the full model in a child (benchmarks/scale_default.py: RSS per
    phase), then its output in ONNX Runtime vs the interpreter."""
    model = _large_model()
    summary = tmp / "large.json"
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    start = time.perf_counter()
    subprocess.run([sys.executable, str(Path(__file__).with_name("scale_default.py")), "1", "7200", str(summary),
                    "--bits", "4"], check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    seconds = time.perf_counter() - start
    peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    run = json.loads(summary.read_text())
    if not run["finished"]:
        raise RuntimeError(f"the --bits 4 compile did not finish: {run['stopped']}")
    r = run["report"]
    row = {"kind": "compile", "model": "whisper_large_enc", "config": "--bits 4", "params": r["input"]["params"],
           "input_bytes": model.stat().st_size + model.with_name(model.name + ".data").stat().st_size,
           "output_bytes": r["output"]["bytes"], "seconds": round(seconds, 1),
           "peak_rss_gib": round(peak_kib / 2**20, 2) if peak_kib > before else run["peak_rss_gib"],
           "phases": run["phases"],
           "passes": {p["name"]: p["seconds"] for p in r["passes"] if p["seconds"] >= 1.0},
           "sqnr_db_vs_fp32": r["verification"].get("output_sqnr_db"), **_stamp_fields(model),
           "choose_kernels": next((p["stats"] for p in r["passes"] if p["name"] == "choose-kernels"), None),
           "kernel_choice_source": (r.get("kernel_choice") or {}).get("source"),
           "compile_interp_vs_ort_max_abs": r["verification"].get("interp_vs_ort_max_abs")}
    row.update(_ort_vs_interp(summary.with_suffix(".q4.onnx"), FRAMES))
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


#: (backend, workers) subjects of the ray part, timed interleaved
SUBJECTS = (("threads", 1), ("threads", 2), ("ray", 1), ("ray", 2))
ROUNDS = 3


def ray_rows(path: Path | None = None, sensitivities: tuple[str, ...] = ("kl",)) -> list[dict]:
    """measure-sensitivity with 1 and 2 threads and 1 and 2 Ray workers, ROUNDS interleaved rounds
    (q4c.timing; wall time: parallel work is what is timed), a local Ray started once beforehand.
    Run it under the timing lock: flock /work/notes/timing.lock python benchmarks/bench_scale.py --parts ray"""
    import ray

    from q4c import graph as g
    from q4c.calib.readers import synthetic_samples

    model = g.convert_opset(g.load(path or MODELS / f"{RAY_MODEL}.onnx"))
    samples = synthetic_samples(model, count=4, seed=0)
    start = time.perf_counter()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    ray_start = time.perf_counter() - start
    rows = []
    try:
        for sensitivity in sensitivities:
            rows += _interleaved_rows(model, samples, sensitivity, ray_start, path.stem if path else RAY_MODEL)
    finally:
        ray.shutdown()
    return rows


def _interleaved_rows(model, samples, sensitivity: str, ray_start: float, name: str) -> list[dict]:
    from q4c import graph as g
    from q4c.config import CompileOptions, WorkerBackend
    from q4c.quant.sensitivity import measure
    from q4c.timing import interleaved

    tables: dict[str, list] = {}

    def subject(backend: str, workers: int):
        def run() -> None:
            opts = CompileOptions(workers=workers, workers_backend=WorkerBackend(backend), sensitivity=sensitivity)
            tables.setdefault(f"{backend}:{workers}", []).append(measure(g.import_graph(model), opts, 21, samples))
        return run

    timing = interleaved({f"{b}:{w}": subject(b, w) for b, w in SUBJECTS}, rounds=ROUNDS, warmup=0)
    reference = tables["threads:1"][0].scores
    base = timing.median("threads:1", wall=True)
    rows = []
    for key, runs in tables.items():
        backend, workers = key.split(":")
        last = runs[-1]
        row = {"kind": "sensitivity", "model": name, "sensitivity": sensitivity, "backend": backend,
               "workers": int(workers), "rounds": len(timing.wall[key]),
               "wall_seconds": [round(x, 2) for x in timing.wall[key]],
               "seconds": round(timing.median(key, wall=True), 2),
               "prepare_seconds": round(float(np.median([t.prepare_seconds for t in runs])), 2),
               "speedup_vs_1_thread": round(base / timing.median(key, wall=True), 2),
               "tensors": len(last.scores), "pairs": sum(len(v) for v in last.scores.values()),
               "same_scores_as_1_thread": all(t.scores == reference for t in runs),
               # wall seconds of the tasks summed (rounding + scoring): the work; over the wall time it is
               # the parallelism the run got (on a free 2-core machine up to 2 with 2 workers)
               "task_seconds": round(float(np.median([sum(v["tasks"] for v in t.task_seconds.values()) for t in runs])), 2),
               "ray_local_start_seconds": round(ray_start, 2)}
        row["scoring_seconds"] = round(row["seconds"] - row["prepare_seconds"], 2)
        if last.distributed:
            row.update(tasks=last.distributed["tasks"], forward_runs=last.distributed["forward_runs"])
        else:
            row.update(forward_runs=last.runner.runs if last.runner else 0)
        rows.append(row)
        print(f"bench: {row}", file=sys.stderr)
    return rows


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


#: --schemes of the full model's measured default-compile runs: the uniform ones, so no gptq input
#: statistics are gathered (float64 x x^T per weight input, ~8 GB on this model: with them the run
#: passed 20 GiB, see the text)
MEASURED_SCHEMES = "symmetric,symmetric-absmax"


def _child(args: list[str], wait: bool = True):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, str(Path(__file__).with_name("scale_default.py")), *args]
    return subprocess.run(command, check=True, env=env) if wait else subprocess.Popen(command, env=env)


def default_rows(limit: float) -> list[dict]:
    """The default compile's parts, in children (benchmarks/scale_default.py): the rounding cost of
    every default candidate per shape class, probed on the one-layer member (the full model's
    shapes), alongside the full model's compile with --schemes MEASURED_SCHEMES on 1 and then 2
    threads, each stopped after `limit` seconds if not done: RSS per phase, finished tasks with
    their forward runs on the full model."""
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        member = make_large.build(Path(tmp) / "member", layers=1)
        probing = _child(["1", str(4 * limit), str(Path(tmp) / "probe.json"), "--probe-only", "--model", str(member)],
                         wait=False)
        for workers in (1, 2):
            out = Path(tmp) / f"default{workers}.json"
            _child([str(workers), str(limit), str(out), "--schemes", MEASURED_SCHEMES])
            run = json.loads(out.read_text())
            tasks = run.pop("tasks")
            run.pop("report", None)
            run.update(schemes=MEASURED_SCHEMES, tasks_done=len(tasks), task_seconds=[t["seconds"] for t in tasks],
                       forward_per_run=round(float(np.median([t["forward"] / t["runs"] for t in tasks if t["runs"]])), 3)
                       if tasks else None, runs_per_task=int(np.median([t["runs"] for t in tasks])) if tasks else None,
                       scoring_started_at=min((t["at"] - t["seconds"] for t in tasks), default=None))
            rows.append({"kind": "default", "model": "whisper_large_enc", **run, **_stamp_fields(_large_model())})
            print(f"bench: default, {workers} workers: {run['tasks_done']}/{run['tasks_total']} tasks in "
                  f"{run['elapsed_seconds']} s, peak {run['peak_rss_gib']} GiB ({run['stopped'] or 'finished'})",
                  file=sys.stderr)
        probing.wait()
        probe = json.loads((Path(tmp) / "probe.json").read_text())
    rows.append({"kind": "probe", "model": "whisper_like_1layer", "probe": probe["probe"], "stopped": probe["stopped"],
                 "peak_rss_gib": probe["peak_rss_gib"], "elapsed_seconds": probe["elapsed_seconds"]})
    return rows


def _layer_free(name: str) -> str:
    return name.split(".", 2)[-1] if name.startswith("layers.") else name


def _pair_costs(probe: dict, cands: dict, forward: float, runs: int) -> list[float]:
    """Seconds of every (weight, candidate) task of the full model: its rounding, probed on the
    one-layer member's weight of the same role (the attention projections share one shape), plus
    `runs` forward runs; the candidates are the probe's (the member's default candidate lists)."""
    def probed(name: str) -> dict[str, float]:
        free = _layer_free(name)
        for n, v in probe.items():
            other = _layer_free(n)
            if other == free or other.split(".")[0] == free.split(".")[0] == "self_attn":
                return {k: c for k, c in v.items() if k != "shape"}
        raise KeyError(name)

    costs = []
    for name in cands["per_tensor"]:
        repeat = LARGE_LAYERS if name.startswith("layers.") else 1
        costs += [c + forward * runs for c in probed(name).values()] * repeat
    return costs


def _projection(default: list[dict], probe: dict, cands: dict, ray_rows: list[dict]) -> tuple[list[str], dict]:
    """The full model's default compile on N workers, from measured parts: the serial preparation
    (measured), every task's rounding + forward runs (measured per shape class) shared by N, and
    for Ray the local start plus shipping the job (weights + gptq statistics) to the nodes."""
    one = next(r for r in default if r["workers"] == 1)
    scoring_at = one["scoring_started_at"] or one["elapsed_seconds"]
    prepare = scoring_at - next(p[3] for p in one["phases"] if p[0] == "pass measure-sensitivity")
    before = next(p[3] for p in one["phases"] if p[0] == "pass measure-sensitivity")
    start = max((r["ray_local_start_seconds"] for r in ray_rows), default=0.0)
    shipped_gb = 2.55 + STATISTICS_GB
    lines, info = [], {"prepare": prepare, "before": before, "shipped_gb": shipped_gb}
    for samples, runs in (("1 (the default's synthetic input)", one["runs_per_task"] or 1), ("4 (a calibration set)", 4)):
        costs = _pair_costs(probe["probe"], cands, one["forward_per_run"], runs)
        info.setdefault("pairs", len(costs))
        for workers in (1, 2, 100):
            overhead = start + (shipped_gb * 8 / NETWORK_GBIT_S if workers > 2 else 0)
            scoring = sum(costs) / workers
            lines.append(f"| {samples} | {workers} | {len(costs):,} | {sum(costs) / len(costs):.2f} | "
                         f"{(before + prepare) / 60:.1f} | {scoring / 60:,.1f} | {overhead:.0f} | "
                         f"{(before + prepare + scoring + overhead) / 60:,.1f} |")
    return lines, info


#: gptq's input statistics of the full model (float64 x x^T per weight: 1280^2 for the attention and
#: fc1 inputs, 5120^2 for fc2, 3840^2 for conv2), shipped with the job
STATISTICS_GB = 32 * (5 * 1280**2 + 5120**2) * 8 / 1e9 + 3840**2 * 8 / 1e9


def _ray_table(ray_rows: list[dict]) -> list[str]:
    start = ", ".join(sorted({str(r["ray_local_start_seconds"]) for r in ray_rows}))
    rounds = max(r.get("rounds", 1) for r in ray_rows)
    out = [f"measure-sensitivity (kl, the default) on the bundled `{RAY_MODEL}` (the largest bundled model: 5 weights, "
           "100 (weight, candidate) pairs, where rounding the candidates, GPTQ and codebooks included, costs more than "
           "scoring them) with 4 synthetic samples: threads of one process vs Ray workers, a local Ray started once "
           f"beforehand ({start} s, not included). Each task rounds its own candidates and drops them after scoring, "
           "so that work is shared by the workers too; for Ray the wall time includes starting the workers and "
           f"their sessions. Wall-time medians of {rounds} interleaved rounds (q4c.timing order), run under the "
           "timing lock:", "",
           "| model | backend | workers | wall time (median) | rounds | preparing | speedup vs 1 thread | tasks | "
           "forward runs | task seconds (summed) | parallelism (task s / wall) | scores identical to 1 thread |",
           "|---|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in ray_rows:
        runs = ", ".join(f"{x:.1f}" for x in r.get("wall_seconds", [r["seconds"]]))
        out.append(f"| {r['model']} | {r['backend']} | {r['workers']} | {r['seconds']:.1f} s | {runs} | "
                   f"{r.get('prepare_seconds', float('nan')):.2f} s | {r.get('speedup_vs_1_thread', float('nan')):.2f}x | "
                   f"{r.get('tasks') or '-'} | {r['forward_runs']} | {r.get('task_seconds', float('nan')):.1f} s | "
                   f"{r.get('task_seconds', float('nan')) / r['seconds']:.2f} | "
                   f"{'yes' if r['same_scores_as_1_thread'] else 'NO'} |")
    pick = {(r["backend"], r["workers"]): r for r in ray_rows}
    if all(k in pick for k in SUBJECTS) and "task_seconds" in pick["ray", 2]:
        t1, t2, r1, r2 = (pick[k] for k in SUBJECTS)
        out += ["", f"2 Ray workers vs 1 thread: {t1['seconds'] / r2['seconds']:.2f}x, vs 1 Ray worker: "
                f"{r1['seconds'] / r2['seconds']:.2f}x, vs 2 threads: {t2['seconds'] / r2['seconds']:.2f}x (2 threads "
                f"vs 1: {t1['seconds'] / t2['seconds']:.2f}x). Both two-worker runs use the second core: every task "
                "rounds and scores one candidate, and numpy's rounding and ONNX Runtime's forward runs release the GIL "
                "for most of their time, so threads keep up with processes on one machine; Ray's workers can be on "
                f"other machines, at a small cost per task (1 Ray worker vs 1 thread: {r1['seconds'] / t1['seconds']:.2f}x "
                "the time, starting the worker included). The summed task seconds show what stops short of 2x: "
                f"{r1['task_seconds']:.1f} s with 1 Ray worker, {r2['task_seconds']:.1f} s with 2, i.e. each worker ran "
                f"{r2['task_seconds'] / r1['task_seconds']:.2f}x slower beside the other (2 cores shared with other "
                "jobs, load averages above)."]
    return out + [""]


#: RSS by phase of the same --bits 4 compile before this session's memory changes (commit ab7942e,
#: measured with the same sampler in-process; cold kernel cache, so choose-kernels timed both forms)
BEFORE = {"peak": 14.30, "load": 2.67, "convert (transient)": 5.01, "synthesize-constants": 5.07,
          "choose-kernels": 11.13, "quantize-weights": 8.39, "verification": 14.30, "save": 9.44}


def _memory_text(large: dict) -> str:
    """Where the --bits 4 compile's memory goes: peak RSS of each phase that raised it."""
    owners: dict[str, list[float]] = {}  # pass or stage -> [RSS at its start, its peak]; exports count to their pass
    owner = ""
    for name, at_start, peak, _ in large["phases"]:
        if not (owner.startswith("pass ") and name.removeprefix("after ") == "graph.export_model"):
            owner = name.removeprefix("after ") if name.startswith("after ") and owner == name[6:] else name
        spent = owners.setdefault(owner, [at_start, peak])
        spent[1] = max(spent[1], peak)
    shown = [f"{name.removeprefix('pass ')} {at_start:.1f} -> {peak:.1f}" for name, (at_start, peak) in owners.items()
             if peak >= at_start + 0.5]
    before = ", ".join(f"{k} {v:.1f}" for k, v in BEFORE.items())
    return ("Memory, GiB of RSS sampled every 50 ms in the compiling process (phases that raised it by 0.5 GiB "
            "or more, RSS at their start -> their peak): " + "; ".join(shown) + ". The converted FP32 model (2.4 GiB) lives "
            "through the whole compile (the verification's reference), and synthesize-constants reads every "
            "weight out of it into arrays (+2.4 GiB): ~5 GiB before any pass quantizes. Verification builds the "
            "FP32 reference session last (+2.4 GiB: ONNX Runtime's own copy of the weights). Before this "
            "session's changes (commit ab7942e, same sampler; peaks in GiB): " + before + ": every session of a "
            "large model got its weights as in-memory buffers, which ONNX Runtime copies anyway (two copies "
            "while loading, the buffers kept for the session's life); sessions now read a temporary "
            "external-data file written one tensor at a time (q4c.external_data.write_for_session). "
            "choose-kernels' peak (both forms built and timed) happens only when its verdict is not cached "
            f"(this run: {large.get('kernel_choice_source')}).")


#: the default compile's first attempt with every scheme (same harness, commit 994d146, stopped at its
#: 20 GiB cap): RSS entering gptq's input statistics, the cap, seconds into the statistics, the cause
STATISTICS_RUN = (9.9, 20, 30, "float64 x x^T per weight input, 5120^2 for each fc2: ~8 GB kept, and the "
                  "statistics' session with its own copy of the weights")


def _rate_minutes(run: dict) -> float:
    """Minutes all of a run's tasks would take at the rate it finished them."""
    scoring = run["elapsed_seconds"] - (run["scoring_started_at"] or 0.0)
    return run["tasks_total"] * scoring / max(run["tasks_done"], 1) / 60


def _default_table(default: list[dict]) -> list[str]:
    schemes = default[0].get("schemes", "")
    out = ["The default compile (kl sensitivity) of the full model, `q4c compile` options as the CLI's defaults "
           "(one synthetic input of 32 frames: `--calib` with fewer or shorter samples makes each score cheaper) "
           f"except `--schemes {schemes}`: with every scheme, measure-sensitivity first gathers gptq's input "
           f"statistics, which took the process from {STATISTICS_RUN[0]} to over {STATISTICS_RUN[1]} GiB within "
           f"{STATISTICS_RUN[2]} s (the run was stopped there; {STATISTICS_RUN[3]}); restricting the schemes is "
           "the user's option that skips them. Run by `benchmarks/scale_default.py` in a child and stopped at the "
           "time limit when not done. Each task rounds its one candidate and scores it; the driver holds no "
           "candidate:",
           "", "| threads | time limit | finished | tasks done | of | peak RSS | RSS when scoring started | "
           "s per task (median) | forward run |", "|---:|---:|---|---:|---:|---:|---:|---:|---:|"]
    for r in default:
        started = next((p[1] for p in r["phases"] if p[0] == "after runner (session, FP32 reference)"), None)
        median = float(np.median(r["task_seconds"])) if r["task_seconds"] else float("nan")
        out.append(f"| {r['workers']} | {r['limit_seconds'] / 60:.0f} min | {'yes' if r['finished'] else 'no'} | "
                   f"{r['tasks_done']} | {r['tasks_total']:,} | {r['peak_rss_gib']:.2f} GiB | {started} GiB | "
                   f"{median:.1f} s | {r['forward_per_run']} s |")
    one = default[0]
    if len(default) > 1 and one["tasks_done"]:
        two = default[1]
        out += ["", f"Tasks finished in the same time: {two['tasks_done']} with 2 threads vs {one['tasks_done']} with "
                f"1 ({two['tasks_done'] / one['tasks_done']:.2f}x): the uniform candidates' rounding is short "
                "numpy, the forward runs release the GIL. At these rates (tasks done over the scoring time) all "
                f"{one['tasks_total']:,} tasks would take "
                + " and ".join(f"{_rate_minutes(r):.0f} min with {r['workers']} thread{'s' * (r['workers'] > 1)}"
                               for r in (one, two)) + " of scoring, then the rest of the compile."]
    out += ["", "Phases of the 1-thread run (RSS at the start / peak, GiB; started at, s): " +
            "; ".join(f"{p[0]} {p[1]}/{p[2]} @{p[3]:.0f}" for p in one["phases"] if not p[0].startswith("after "))]
    return out + [""]


def _probe_table(probe: dict) -> list[str]:
    keys = list(next(iter(probe["probe"].values())))[1:]
    out = ["Rounding one candidate (s), every candidate of the default compile, on the first weight of each shape "
           f"class of the one-layer member (the full model's shapes; gptq statistics from its synthetic input; "
           f"{probe['elapsed_seconds']:.0f} s for the run, peak {probe['peak_rss_gib']:.2f} GiB):", "",
           "| weight | shape | " + " | ".join(keys) + " |", "|---|---|" + "---:|" * len(keys)]
    for name, v in probe["probe"].items():
        out.append(f"| {name} | {'x'.join(map(str, v['shape']))} | " +
                   " | ".join(f"{v[k]:.2f}" if k in v else "-" for k in keys) + " |")
    return out + [""]


def render(rows: list[dict]) -> str:
    by = {(_part(r)): r for r in rows if r["kind"] != "sensitivity"}
    ray_rows = [r for r in rows if r["kind"] == "sensitivity"]
    out = ["<!-- scale:begin -->", "## Scale: a 636.8M-parameter encoder, and sensitivity on Ray", "",
           "Produced by `python benchmarks/bench_scale.py --parts large,ray,default` (parts run separately, the ray part under the timing lock; rows merged into benchmarks/results/scale.json and rendered with `--from-results --write`) on the shared 2-core machine (other engineers' jobs "
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
        if large.get("phases"):
            out += [_memory_text(large), ""]
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
        out += _ray_table(ray_rows)
    default = [r for r in rows if r["kind"] == "default"]
    if default:
        out += _default_table(default)
    cands = by.get("cands")
    probe = next((r for r in rows if r["kind"] == "probe"), None)
    if probe:
        out += _probe_table(probe)
    if default and cands and probe and default[0].get("forward_per_run"):
        lines, info = _projection(default, probe, cands, ray_rows)
        out += [f"Projection of the full model's default compile from those measured parts: {info['pairs']:,} "
                "(weight, candidate) tasks (the one-layer member's default candidate lists as probed, x "
                f"{LARGE_LAYERS} layers), each costing its candidate's rounding (probed above per shape class) plus "
                "its forward runs (measured per run in the tasks above); before scoring, serially, everything up to "
                "the first task (loading, converting, the passes before measure-sensitivity, the runner's session "
                f"and FP32 reference: {info['before'] / 60:.1f} + {info['prepare'] / 60:.1f} min measured above, "
                "without the gptq statistics the default adds: one more forward pass and ~8 GB). Ray overhead: the "
                "local start measured above, and for 100 workers on other nodes "
                f"shipping the job (FP32 weights and gptq statistics, {info['shipped_gb']:.0f} GB, no rounded "
                f"candidate) once over an assumed {NETWORK_GBIT_S:.0f} Gbit/s network. After scoring, "
                "assign-precision measures a few whole plans (one forward run each) and the rest of the compile is "
                "that of `--bits 4` above; neither is in the table.", "",
                "| calibration samples per score | workers | tasks | s per task | before scoring (min) | "
                "scoring (min) | overhead (s) | total to plan (min) |", "|---|---:|---:|---:|---:|---:|---:|---:|",
                *lines, ""]
    out.append("<!-- scale:end -->")
    return "\n".join(out)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", default="large,small,ray,proj")
    parser.add_argument("--write", action="store_true")
    parser.add_argument("--default-limit", type=float, default=900.0,
                        help="seconds each run of the default part may take before it is stopped")
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
                       "default": lambda: default_rows(args.default_limit)}[part]()
                # the machine is shared: the load average (1 min, 2 cores) at the start and end of the part
                rows.extend({**r, "load_avg": [round(load, 1), round(os.getloadavg()[0], 1)]} for r in new)
                PARTIAL.parent.mkdir(parents=True, exist_ok=True)  # survives a crash of a later part
                PARTIAL.write_text(json.dumps(rows, indent=2, default=str))
        rows = [r for r in saved if _part(r) not in parts] + rows  # parts not rerun keep their rows
    # the one-layer note and the forward timing describe the compile before tasks rounded their own
    # candidates: the default part measures both on the full model now
    rows = [r for r in rows if r["kind"] not in ("note", "forward")]
    section = render(rows)
    print(with_stamp(section, stamp(KEY, rows)[0]))
    if args.write:
        publish(KEY, rows, section)
    return 0


def _part(row: dict) -> str:
    if row["kind"] == "sensitivity":
        return "ray"
    if row["kind"] == "forward":
        return "proj"
    if row["kind"] in ("default", "probe"):
        return "default"
    if row["kind"] in ("candidates", "note"):
        return "cands" if row["kind"] == "candidates" else "small"
    return "large" if row["model"] == "whisper_large_enc" else "small"


if __name__ == "__main__":
    sys.exit(main())
