"""A compile of the 636.8M-parameter encoder, run for a time limit in this process (bench_scale.py's
`default` and `large` parts start it as a child): RSS sampled per phase (load, convert, import,
each pass, gptq statistics, the runner, verification, save), every finished scoring task's wall
time (rounding its candidate + forward runs), and, with --probe, the rounding time of every
candidate of one weight per shape class (the projection's cost table). The default compile, or
`--bits N`. Writes a JSON summary (with the compile's report when it finished) to OUT when the
compile ends or the limit is reached.

    python benchmarks/scale_default.py WORKERS LIMIT_SECONDS OUT [--probe | --probe-only] [--bits N]
        [--schemes LIST] [--model PATH]

--probe-only stops after the probe (the one-layer member has the full model's shapes: its probe
is the full model's cost table without the full model's memory).
"""

from __future__ import annotations

import functools
import json
import os
import resource
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "models"))
import make_large  # noqa: E402


#: the machine has 23 GiB shared with other jobs: a run past this stops (and says so)
RSS_CAP_GIB = 20.0


class Recorder:
    def __init__(self, limit: float, out: Path, workers: int) -> None:
        self.limit, self.out, self.workers = limit, out, workers
        self.start = time.perf_counter()
        self.phases: list[list] = []  # [name, rss at start, peak rss, start seconds]
        self.tasks: list[dict] = []
        self.probe: dict[str, dict[str, float]] = {}
        self.total_tasks = 0
        self.finished = False
        self.stopped = ""
        self.report: dict | None = None
        self.lock = threading.Lock()

    @staticmethod
    def rss() -> float:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30

    def phase(self, name: str) -> None:
        with self.lock:
            r = self.rss()
            self.phases.append([name, round(r, 2), round(r, 2), round(time.perf_counter() - self.start, 1)])

    def sample(self) -> None:
        while True:
            r = self.rss()
            with self.lock:
                if self.phases and r > self.phases[-1][2]:
                    self.phases[-1][2] = round(r, 2)
            if time.perf_counter() - self.start > self.limit or r > RSS_CAP_GIB:
                self.stopped = "time limit" if r <= RSS_CAP_GIB else f"RSS over {RSS_CAP_GIB} GiB"
                self.dump()
                os._exit(0)
            time.sleep(0.05)

    def dump(self) -> None:
        with self.lock:
            out = {"report": self.report, "workers": self.workers, "limit_seconds": self.limit, "finished": self.finished, "stopped": self.stopped,
                   "elapsed_seconds": round(time.perf_counter() - self.start, 1),
                   "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
                   "phases": self.phases, "tasks_total": self.total_tasks, "tasks": self.tasks, "probe": self.probe}
        self.out.write_text(json.dumps(out, indent=1))


def _instrument(rec: Recorder, probe: bool, only: bool = False) -> None:
    from q4c import graph as g
    from q4c.quant import score_job, sensitivity

    def wrap(module, name: str, label: str) -> None:
        fn = getattr(module, name)

        @functools.wraps(fn)
        def wrapped(*args, **kwargs):
            rec.phase(label)
            try:
                return fn(*args, **kwargs)
            finally:
                rec.phase(f"after {label}")

        setattr(module, name, wrapped)

    from q4c import compiler

    for name in ("load", "convert_opset", "import_graph", "export_model", "save"):
        wrap(g, name, f"graph.{name}")
    wrap(compiler, "_verify", "verification")
    wrap(sensitivity, "input_hessians", "gptq input statistics")
    wrap(sensitivity, "_attach_runner", "runner (session, FP32 reference)")
    real_tasks, real_run = score_job.ScoreJob.tasks, score_job.ScoreJob.run
    probed, probing = threading.Event(), threading.Lock()

    def tasks(self, names):
        out = real_tasks(self, names)
        rec.total_tasks = len(out)
        return out

    def run(self, task):
        if probe and not probed.is_set():
            with probing:  # the first task probes rounding costs once, before any scoring
                if not probed.is_set():
                    rec.probe = _probe(self)
                    probed.set()
                    if only:
                        rec.stopped = "probe done"
                        rec.dump()
                        os._exit(0)
        result = real_run(self, task)
        with rec.lock:
            rec.tasks.append({"name": task.name, "keys": list(task.keys), "seconds": round(result.seconds, 3),
                              "forward": round(result.forward_seconds, 3), "runs": result.runs,
                              "at": round(time.perf_counter() - rec.start, 1)})
        return result

    score_job.ScoreJob.tasks, score_job.ScoreJob.run = tasks, run


def _probe(job) -> dict[str, dict[str, float]]:
    """Seconds to round each candidate of the first weight of every (shape, role) class."""
    seen, out = set(), {}
    for name, rounding in job.roundings.items():
        cls = (job.weights[name].shape, rounding.role, rounding.reduce_axis)
        if cls in seen:
            continue
        seen.add(cls)
        costs = {}
        for key in rounding.candidates:
            start = time.perf_counter()
            job.dequantized(name, key)
            costs[key] = round(time.perf_counter() - start, 3)
        out[name] = {"shape": list(job.weights[name].shape), **costs}
        print(f"probe {name}: {costs}", file=sys.stderr, flush=True)
    return out


def main() -> None:
    workers, limit, out = int(sys.argv[1]), float(sys.argv[2]), Path(sys.argv[3])
    rec = Recorder(limit, out, workers)
    threading.Thread(target=rec.sample, daemon=True).start()
    _instrument(rec, "--probe" in sys.argv or "--probe-only" in sys.argv, "--probe-only" in sys.argv)
    from q4c import compiler
    from q4c.config import CompileOptions

    def arg(flag: str) -> str | None:
        return sys.argv[sys.argv.index(flag) + 1] if flag in sys.argv else None

    bits, schemes, model = arg("--bits"), arg("--schemes"), arg("--model")
    opts = CompileOptions(workers=max(workers, 1), bits=None if bits is None else int(bits),
                          schemes=tuple(schemes.split(",")) if schemes else ())
    rec.phase("start")
    rec.report = compiler.compile_file(Path(model) if model else make_large.DEFAULT_DIR / make_large.NAME,
                                       out.with_suffix(".q4.onnx"), opts, progress=lambda name: rec.phase(f"pass {name}"))
    rec.finished = True
    rec.phase("done")
    rec.dump()


if __name__ == "__main__":
    main()
