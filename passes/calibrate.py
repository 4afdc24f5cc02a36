"""Calibrate: activation statistics over the input samples, an analysis that fills
`ctx.calibration` with a CalibrationTable (or loads one with --load-calib)."""

from __future__ import annotations

import logging

import onnx_graphsurgeon as gs

from q4c import graph as g
from q4c.calib.readers import synthetic_samples
from q4c.calib.runner import collect, float_tensors
from q4c.calib.table import CalibrationTable
from q4c.pipeline import Artifact, Pass, PassContext, PassResult

logger = logging.getLogger(__name__)


class CalibratePass(Pass):
    """Run the graph as it stands (after canonicalization) over `ctx.samples` with ONNX Runtime,
    observing every float tensor of the main graph with `--observer`, plus LSTM/GRU internals
    from the interpreter's probes on the first calls; or load `--load-calib`.

    Samples of stateful models already carry their state (the compiler materializes each call
    of a sequence), so state inputs are observed with the values they take in use.
    Requires: samples (synthetic ones, with a warning, if none).  Ensures: ctx.calibration.
    Stats: tensors, samples, probes, loaded, missing (loaded table lacks a tensor of this graph).
    """

    name = "calibrate"
    analysis = True
    provides = frozenset({Artifact.CALIBRATION})

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        opts = ctx.options
        model = g.export_model(graph.copy())
        if opts.calib_table is not None:
            table = CalibrationTable.load(opts.calib_table)
            names, _ = float_tensors(model)
            missing = [n for n in names if n not in table]
            if table.model and table.model != g.fingerprint(model):
                ctx.warn(f"{opts.calib_table}: calibrated on a different graph; "
                         f"{len(missing)} of this graph's {len(names)} float tensors are not in it")
            if opts.observer != table.observer:
                ctx.warn(f"{opts.calib_table}: ranges were chosen by the {table.observer!r} observer; "
                         f"--observer {opts.observer} applies only when calibrating")
            ctx.calibration = table
            return PassResult(False, {k: v for k, v in {"loaded": len(table.tensors), "missing": len(missing)}.items() if v})
        samples = ctx.samples
        if not samples:
            ctx.warn("calibrating on a synthetic sample built from the input signature: pass --calib DATA for ranges "
                     "that match real inputs")
            samples = synthetic_samples(model, count=1, seed=opts.seed)
        table = collect(model, samples, observer=opts.observer, progress=ctx.sample_progress)
        ctx.calibration = table
        probes = sum(1 for s in table.tensors.values() if s.source == "probe")
        stats = {"tensors": len(table.tensors) - probes, "probes": probes, "samples": table.samples}
        return PassResult(False, {k: v for k, v in stats.items() if v})
