"""Scoring jobs round their own candidates (q4c.quant.score_job): each candidate a task rounds is,
byte for byte, what quantize_slot makes of the graph's weight slot (what quantize-weights stores
and what the driver used to round up front), and the job shipped to workers holds no rounded
candidate."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

from q4c import graph as g
from q4c.calib.readers import synthetic_samples
from q4c.config import CompileOptions
from q4c.quant import score_job
from q4c.quant.plan import FLOAT
from q4c.quant.sensitivity import measure
from q4c.quant.weights import quantize_slot
from q4c.testing import softmax_mlp


@pytest.mark.parametrize("sensitivity", ["kl", "hessian", "mse"])
def test_tasks_round_each_candidate_as_quantize_slot_does_and_ship_none(rng, sensitivity, monkeypatch):
    model = softmax_mlp(rng, 128)
    opts = CompileOptions(workers=1, sensitivity=sensitivity)  # one thread: each task's forward time is its own
    rounded: dict[tuple[str, str], list[bytes]] = {}
    jobs: list[score_job.ScoreJob] = []
    real_dequantized, real_run = score_job.ScoreJob.dequantized, score_job.ScoreJob.run

    def recording(self, name, key):
        out = real_dequantized(self, name, key)
        rounded.setdefault((name, key), []).append(out.tobytes())
        return out

    def run(self, task):
        jobs.append(self)
        return real_run(self, task)

    monkeypatch.setattr(score_job.ScoreJob, "dequantized", recording)
    monkeypatch.setattr(score_job.ScoreJob, "run", run)
    graph = g.import_graph(model)
    table = measure(graph, opts, 21, synthetic_samples(model, count=16, seed=1))  # 128 rows: full-rank Hessians

    schemes = set()
    for name, slot in table.slots.items():
        w = np.asarray(slot.tensor.values, dtype=np.float32)
        for cand in table.candidates[name]:
            if cand.bits == FLOAT:
                continue
            schemes.add(cand.scheme)
            want = quantize_slot(slot, w, cand.bits, opts.granularity, cand.scheme, kernel_scales=opts.kernel_scales,
                                 hessians=table.hessians.get(name)).dequantize().tobytes()
            assert rounded[name, cand.key] == [want], (name, cand.key)  # rounded once, in its task, identically
    assert set(rounded) == {(n, c.key) for n, cs in table.candidates.items() for c in cs if c.bits != FLOAT}
    if sensitivity == "kl":  # every rounding scheme took part, gptq and codebooks included
        assert {"symmetric", "symmetric-absmax", "gptq", "kmeans", "mulaw", "nf4"} <= schemes

    for name, spent in table.task_seconds.items():  # rounding is inside the tasks' time, forward runs too
        assert spent["tasks"] > 0 and 0 <= spent["forward"] <= spent["tasks"]
        assert (spent["forward"] > 0) == (sensitivity != "mse")
    job = jobs[0]
    shipped = len(pickle.dumps(job.for_workers()))
    weights = sum(w.nbytes for w in job.weights.values())
    statistics = sum(h.nbytes for hs in job.hessians.values() for h in hs)
    candidates = sum(len(b[0]) for b in rounded.values())
    assert candidates >= 4 * weights  # what shipping rounded candidates would have cost (4 widths at least)
    assert shipped < weights + statistics + 64 * 1024  # the weights, their statistics, small recipes


def test_plan_cache_past_its_budget_keeps_only_the_last_plan_and_measures_the_same(rng, monkeypatch):
    from q4c.quant import sensitivity

    model = softmax_mlp(rng, 128)
    samples = synthetic_samples(model, count=2, seed=1)
    opts = CompileOptions(workers=1)
    table = measure(g.import_graph(model), opts, 21, samples)
    four = {n: "4" for n in table.scores}
    two = {**four, "w1": "2"}
    want = [table.measure_plan(p, opts.granularity) for p in (four, two, four)]
    monkeypatch.setattr(sensitivity, "PLAN_CACHE_BYTES", 0)
    small = measure(g.import_graph(model), opts, 21, samples)
    got = [small.measure_plan(p, opts.granularity) for p in (four, two, four)]
    assert got == want and want[1] > want[0] > 0
    assert set(small.__dict__["_dequantized"]) == {(n, k) for n, k in four.items()}  # the last plan's only
    assert ("w1", "2") in table.__dict__["_dequantized"]  # within budget: every plan's kept


def test_without_gptq_or_codebooks_among_the_schemes_no_statistics_are_gathered(rng, monkeypatch):
    from q4c.quant import sensitivity

    model = softmax_mlp(rng, 128)
    samples = synthetic_samples(model, count=16, seed=1)  # 128 rows: full-rank Hessians
    full = measure(g.import_graph(model), CompileOptions(workers=1), 21, samples)
    assert full.hessians  # the default gathers them (gptq and the codebooks use them)
    calls = []
    real = sensitivity.input_hessians
    monkeypatch.setattr(sensitivity, "input_hessians", lambda *a, **k: calls.append(1) or real(*a, **k))
    uniform = measure(g.import_graph(model), CompileOptions(workers=1, schemes=("symmetric", "symmetric-absmax")),
                      21, samples)
    assert calls == [] and uniform.hessians == {}
    for name, scores in uniform.scores.items():  # the same candidates score the same without them
        assert scores == {k: full.scores[name][k] for k in scores} and set(scores) < set(full.scores[name])
    measure(g.import_graph(model), CompileOptions(workers=1, schemes=("symmetric", "nf4")), 21, samples)
    assert calls == [1]  # a codebook among the schemes: gathered


def test_a_runner_spec_carries_the_weights_once_and_rebuilds_the_same_runner(rng):
    from onnx import numpy_helper

    from q4c.quant.weight_runner import WeightInputRunner

    model = softmax_mlp(rng, 128)
    weights = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    runner = WeightInputRunner(model, weights, synthetic_samples(model, count=2, seed=1))
    spec = runner.spec()
    assert not {t.name for t in spec["model"].graph.initializer} & set(weights)  # inputs, shipped as `weights`
    again = WeightInputRunner(**spec)
    change = {"w1": weights["w1"] * np.float32(1.1)}
    assert again.divergence(change) == runner.divergence(change) > 0
