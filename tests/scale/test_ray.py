"""Sensitivity on Ray workers (q4c.distributed): the same scores and plan as threads, a worker
killed mid-run is retried, and a clear error without Ray installed."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import onnx
import pytest
from click.testing import CliRunner

from q4c import graph as g
from q4c.calib.readers import synthetic_samples
from q4c.cli import main
from q4c.config import CompileOptions, WorkerBackend
from q4c.errors import ConfigError
from q4c.quant.sensitivity import measure
from q4c.testing import softmax_mlp

MODELS = Path(__file__).resolve().parents[2] / "models"


def _measure(model: onnx.ModelProto, opts: CompileOptions, **kwargs):
    samples = synthetic_samples(model, count=2, seed=1)
    return measure(g.import_graph(model), opts, 21, samples, **kwargs)


def test_without_ray_installed_the_ray_backend_is_a_one_line_error(monkeypatch, rng):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    with pytest.raises(ConfigError, match=r"needs Ray, which is not installed: pip install 'q4c\[ray\]'"):
        _measure(softmax_mlp(rng), CompileOptions(workers=2, workers_backend=WorkerBackend.RAY))


@pytest.mark.parametrize(("args", "message"), [
    (["--workers", "many"], "expected a thread count, 'ray' or 'ray:N', not 'many'"),
    (["--workers", "ray:two"], "expected a thread count, 'ray' or 'ray:N', not 'ray:two'"),
    (["--workers", "2", "--ray-address", "head:6379"], "--ray-address needs --workers ray"),
])
def test_cli_refuses_bad_worker_options_before_compiling(tmp_path, args, message):
    out = tmp_path / "o.onnx"
    result = CliRunner().invoke(main, ["compile", str(MODELS / "lstm_scan.onnx"), "-o", str(out), *args])
    assert result.exit_code == 2 and message in result.output
    assert not out.exists()


ray = pytest.importorskip("ray")


def test_an_unreachable_ray_address_is_a_one_line_error(rng):
    assert not ray.is_initialized()  # runs before the module's local Ray starts
    with pytest.raises(ConfigError, match=r"cannot reach the Ray cluster at 127\.0\.0\.1:1 .*ray start --head"):
        _measure(softmax_mlp(rng), CompileOptions(workers=2, workers_backend=WorkerBackend.RAY, ray_address="127.0.0.1:1"))


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.mark.parametrize("sensitivity", ["kl", "hessian"])
def test_ray_workers_give_the_scores_threads_give(local_ray, rng, sensitivity):
    model = softmax_mlp(rng)
    threads = _measure(model, CompileOptions(workers=1, sensitivity=sensitivity))
    on_ray = _measure(model, CompileOptions(workers=2, workers_backend=WorkerBackend.RAY, sensitivity=sensitivity))
    assert on_ray.scores == threads.scores  # bit-identical, in the same order
    assert on_ray.trace == threads.trace
    assert on_ray.distributed["workers"] == 2
    per_tensor = {n: len(s) for n, s in threads.scores.items()}
    want = sum(per_tensor.values()) if sensitivity == "kl" else len(per_tensor)  # kl: one task per pair
    assert on_ray.distributed["tasks"] == want
    assert all(v > 0 for s in on_ray.scores.values() for v in s.values())


def test_a_worker_killed_mid_run_is_restarted_and_its_task_retried(local_ray, rng, monkeypatch):
    from q4c import distributed

    model = softmax_mlp(rng)
    threads = _measure(model, CompileOptions(workers=1))
    killed: list[int] = []
    pids: list[int] = []

    def kill_once(done: int, actors: list) -> None:
        if not killed:  # the first worker, with a task still in flight, dies once
            pids.append(ray.get(actors[0].pid.remote()))
            ray.kill(actors[0], no_restart=False)
            killed.append(done)

    real = distributed.score_on_ray
    monkeypatch.setattr(distributed, "score_on_ray",
                        lambda job, tasks, opts, progress=None: real(job, tasks, opts, progress, on_result=kill_once))
    on_ray = _measure(model, CompileOptions(workers=2, workers_backend=WorkerBackend.RAY))
    assert killed == [1]
    assert on_ray.scores == threads.scores


def test_cli_workers_ray_writes_the_plan_workers_1_writes(local_ray, tmp_path):
    plans = []
    for workers in ("1", "ray:2"):
        plan = tmp_path / f"plan_{workers.replace(':', '_')}.json"
        result = CliRunner().invoke(main, ["compile", str(MODELS / "lstm_scan.onnx"), "-o", str(tmp_path / "o.onnx"),
                                           "--workers", workers, "--calib-samples", "2", "--no-verify",
                                           "--save-plan", str(plan), "--json"])
        assert result.exit_code == 0, result.output
        report = json.loads(result.stdout)
        assert report["sensitivity"]["workers"] == (1 if workers == "1" else 2)
        plans.append(json.loads(plan.read_text()))
    assert plans[0] == plans[1]
