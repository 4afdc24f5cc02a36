"""Sensitivity scoring on a Ray cluster: each Ray actor holds one ONNX Runtime session of the
model (a WeightInputRunner rebuilt from its spec) and scores a share of the (tensor,
candidate) tasks of a ScoreJob, rounding each task's candidates itself (the job ships the FP32
weights and how to round them, never the rounded candidates). The results are those of the
threaded run: each task's score depends only on the job's data. A worker lost mid-run is restarted by Ray and its task retried
(`max_restarts`, `max_task_retries`); losing more than that is a one-line error.

Ray is an optional extra: `pip install "q4c[ray]"`. `--ray-address ADDR` (or $RAY_ADDRESS, Ray's
own convention) joins a running cluster (`ray start --head` on one machine, `ray start
--address HEAD:6379` on the others; q4c must be installed on every node); without either, a
local Ray is started for the compile and stopped after it.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Callable
from typing import Any

from q4c.config import CompileOptions
from q4c.errors import ConfigError, Q4cError
from q4c.quant.score_job import ScoreJob, Task, TaskResult, merge
from q4c.quant.weight_runner import WeightInputRunner

logger = logging.getLogger(__name__)

#: restarts of one worker, and retries of one task, before a lost worker is fatal
MAX_RESTARTS = 3
#: tasks in flight per worker: one running, one queued, so no worker idles between tasks
IN_FLIGHT = 2

#: seconds to wait for a --ray-address to accept a connection
PROBE_SECONDS = 5.0

INSTALL_HINT = "pip install 'q4c[ray]' (or pip install ray)"


class RayWorkerLostError(Q4cError):
    """A Ray worker died more often than MAX_RESTARTS."""


class ScoreWorker:
    """One Ray actor: a session of the model and the job's data (Ray hands numpy arrays from its
    object store to every worker of a machine without copying them)."""

    def __init__(self) -> None:
        os.environ.setdefault("OMP_NUM_THREADS", "1")
        self.job: ScoreJob | None = None

    def run(self, refs: list[Any], task: Task) -> TaskResult:
        """Score `task`; the first call (also after a restart) fetches the job from `refs`
        (object refs inside a list, which Ray does not resolve: the worker gets them itself, so
        a restarted worker has no constructor arguments to lose)."""
        if self.job is None:
            import ray

            job, runner_spec = ray.get(refs)
            # the runner feeds the measured weights: the job's own arrays, shipped once
            runner_spec = {**runner_spec, "weights": {n: job["weights"][n] for n in runner_spec["weights"]}}
            self.job = ScoreJob(**job, runner=WeightInputRunner(**runner_spec))
        return self.job.run(task)

    def pid(self) -> int:
        return os.getpid()


def _import_ray() -> Any:
    try:
        import ray
    except ImportError as e:
        raise ConfigError(f"--workers ray needs Ray, which is not installed: {INSTALL_HINT}") from e
    return ray


def _connect(ray: Any, address: str | None, cpus: int) -> bool:
    """Join `address` ($RAY_ADDRESS) or start a local Ray; True if this call started it."""
    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address is not None:
        _probe(address)
    try:
        if address is None:
            ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
        else:
            ray.init(address=address, log_to_driver=False, logging_level=logging.WARNING)
    except (ConnectionError, RuntimeError, ValueError, TimeoutError) as e:
        where = f"the Ray cluster at {address}" if address else "a local Ray"
        raise ConfigError(f"cannot start or join {where}: {' '.join(str(e).split())[:200]}") from e
    return True


def _probe(address: str) -> None:
    """Fail in one line if a host:port address does not answer (ray.init would retry for minutes)."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or "://" in address:
        return  # "auto", ray://..., or no port: left to Ray
    try:
        socket.create_connection((host, int(port)), timeout=PROBE_SECONDS).close()
    except OSError as e:
        raise ConfigError(f"cannot reach the Ray cluster at {address} ({e.strerror or e}); start one with "
                          f"'ray start --head' or fix --ray-address / RAY_ADDRESS") from e


def score_on_ray(job: ScoreJob, tasks: list[Task], opts: CompileOptions,
                 progress: Callable[[int, int], None] | None = None,
                 on_result: Callable[[int, list[Any]], None] | None = None
                 ) -> tuple[dict[str, TaskResult], dict[str, Any]]:
    """Score `tasks` on Ray workers; returns the results merged per tensor (as
    ScoreJob.run would give for all of a tensor's candidates) and a summary (workers, tasks,
    forward runs, seconds). `on_result(done, actors)` is called after each finished task
    (tests use it to kill a worker mid-run)."""
    ray = _import_ray()
    assert job.runner is not None
    start = time.perf_counter()
    wanted = opts.workers if opts.workers > 0 else None
    started = _connect(ray, opts.ray_address, wanted or (os.cpu_count() or 1))
    actors: list[Any] = []
    try:
        count = wanted or max(1, int(ray.cluster_resources().get("CPU", 1)))
        count = max(1, min(count, len(tasks)))
        actor_class = ray.remote(num_cpus=1, max_restarts=MAX_RESTARTS, max_task_retries=MAX_RESTARTS)(ScoreWorker)
        spec = {**job.runner.spec(), "weights": list(job.runner.weights)}  # names: the arrays are the job's
        refs = [ray.put(job.for_workers()), ray.put(spec)]
        actors = [actor_class.remote() for _ in range(count)]
        logger.info("measure-sensitivity on Ray: %d tasks on %d workers", len(tasks), count)
        results = _dispatch(ray, actors, refs, tasks, progress, on_result)
        summary = {"backend": "ray", "workers": count, "tasks": len(tasks),
                   "forward_runs": sum(r.runs for r in results), "seconds": round(time.perf_counter() - start, 3)}
    finally:
        for actor in actors:  # also on a failure: a joined cluster must not keep them
            ray.kill(actor)
        if started:
            ray.shutdown()
    return merge(tasks, results), summary


def _dispatch(ray: Any, actors: list[Any], refs: list[Any], tasks: list[Task], progress: Callable[[int, int], None] | None,
              on_result: Callable[[int, list[Any]], None] | None) -> list[TaskResult]:
    """Keep IN_FLIGHT tasks on every worker until all are done; results in task order."""
    results: list[TaskResult | None] = [None] * len(tasks)
    pending = list(range(len(tasks)))[::-1]
    running: dict[Any, tuple[int, int]] = {}  # future -> (task index, actor index)

    def submit(actor_index: int) -> None:
        if pending:
            i = pending.pop()
            running[actors[actor_index].run.remote(refs, tasks[i])] = (i, actor_index)

    for a in range(len(actors)):
        for _ in range(IN_FLIGHT):
            submit(a)
    done_count, step = 0, max(1, len(tasks) // 10)
    while running:
        ready, _ = ray.wait(list(running), num_returns=1)
        i, a = running.pop(ready[0])
        try:
            results[i] = ray.get(ready[0])
        except ray.exceptions.RayActorError as e:
            raise RayWorkerLostError(f"Ray worker lost more than {MAX_RESTARTS} times (task: tensor "
                                     f"{tasks[i].name!r}): {' '.join(str(e).split())[:200]}") from e
        done_count += 1
        if progress is not None:
            progress(done_count, len(tasks))
        if done_count % step == 0 or done_count == len(tasks):
            logger.info("measure-sensitivity on Ray: %d/%d tasks", done_count, len(tasks))
        if on_result is not None:
            on_result(done_count, actors)
        submit(a)
    return [r for r in results if r is not None]
