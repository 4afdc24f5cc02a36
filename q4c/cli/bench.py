"""`q4c bench`: ONNX Runtime latency, real-time factor and peak memory, optionally against another model."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click
import numpy as np

from q4c import graph as g
from q4c.bench import bench, state_pairs, stream_specs
from q4c.calib.readers import load_samples, synthetic_samples
from q4c.cli.render import emit_json, human_bytes, table
from q4c.signature import input_specs


@click.command("bench")
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--vs", "other", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="A second model with the same inputs (e.g. the FP32 original), run interleaved with MODEL.")
@click.option("--data", type=click.Path(path_type=Path), default=None,
              help="A .npz keyed by input name, or a directory of them (cycled). Default: synthetic inputs.")
@click.option("--threads", type=click.IntRange(min=1), default=1, show_default=True,
              help="ONNX Runtime intra-op threads.")
@click.option("--iters", type=click.IntRange(min=1), default=50, show_default=True, help="Timed iterations.")
@click.option("--warmup", type=click.IntRange(min=0), default=5, show_default=True, help="Untimed iterations first.")
@click.option("--chunk", type=click.IntRange(min=1), default=None, metavar="N",
              help="Streaming: split axis 1 of the inputs into chunks of N and run them in order, carrying "
                   "state outputs to state inputs, paired by name as compile --calib pairs them (h_in/h_out, "
                   "h0/h_n, state/stateN, cache_prev/cache_next).")
@click.option("--hop-ms", type=click.FloatRange(min=0), default=10.0, show_default=True,
              help="Frame hop of [batch, T, 80] feature inputs, for the real-time factor (0: no RTF).")
@click.option("--memory/--no-memory", default=True, show_default=True,
              help="Measure peak RSS in a fresh subprocess per model.")
@click.option("--system", "system", type=click.Path(dir_okay=False, path_type=Path), default=None, metavar="SPEC",
              help="Time a compiled system: 'q4c bench --system SPEC OUTDIR' runs the SPEC's driver over its first "
                   "--samples samples with OUTDIR/<name>.onnx and with the FP32 graphs, interleaved (--iters rounds).")
@click.option("--samples", "system_samples", type=click.IntRange(min=1), default=2, show_default=True,
              help="--system: the driver's first N samples per round.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document (schema q4c.bench/1).")
def bench_cmd(model: Path, other: Path | None, data: Path | None, threads: int, iters: int, warmup: int,
              chunk: int | None, hop_ms: float, memory: bool, as_json: bool, system: Path | None = None,
              system_samples: int = 2) -> None:
    """Time MODEL with ONNX Runtime (CPU, the session config recorded in the model applied).

    Reports p50/p90 latency after warm-up; with --vs, both models interleaved in one process and the
    ratio MODEL/OTHER per pair (below 1: MODEL is faster); the real-time factor when an input is
    [batch, T, 80] audio features (T frames of --hop-ms); and peak memory (RSS of a fresh process
    that loads the model and runs it once).

    \b
    Examples:
      q4c bench models/bilstm_am.q4.onnx --vs models/bilstm_am.onnx --data models/bilstm_am.npz
      q4c bench models/rnnt_predictor.q4.onnx --data long_tokens.npz --chunk 1 --json
      q4c bench --system models/real/dfn3_system.toml /tmp/dfn3sys --iters 5
    """
    if system is not None:
        if other is not None or data is not None or chunk is not None:
            raise click.UsageError("--system SPEC OUTDIR times the driver against the SPEC's FP32 graphs "
                                   "(no --vs, --data, --chunk)")
        from q4c.cli.system import bench_system

        bench_system(system, model, system_samples, threads, iters, warmup, as_json)
        return
    if model.is_dir():
        raise click.UsageError(f"MODEL {model} is a directory (a compiled system: --system SPEC {model})")
    proto = g.load(model)
    if data is not None:
        specs = stream_specs(proto, state_pairs(proto)) if chunk is not None else input_specs(proto)
        samples = load_samples(data, specs)
        source = str(data)
    else:
        samples = synthetic_samples(proto, count=1, seed=0, time_steps=100)
        if chunk is not None:  # streams start from zero state, as a fresh utterance does
            samples = [{k: (np.zeros_like(v) if k in state_pairs(proto) else v) for k, v in s.items()} for s in samples]
        source = "synthetic"
        click.echo("no --data: timing synthetic inputs shaped by the model's signature "
                   f"({'; '.join(f'{k} {list(v.shape)}' for k, v in samples[0].items())})", err=True)
    with click.progressbar(length=warmup + iters, label=f"bench {model.name}" + (f" vs {other.name}" if other else ""),
                           file=sys.stderr) as bar:
        doc = bench(str(model), samples, other_path=str(other) if other else None, threads=threads, iters=iters,
                    warmup=warmup, chunk=chunk, hop_ms=hop_ms, memory=memory, progress=bar.update)
    doc["data"] = source
    if as_json:
        emit_json(doc)
        return
    _render(doc)


def _render(doc: dict[str, Any]) -> None:
    subjects = [doc["model"]] + ([doc["vs"]] if doc["vs"] else [])
    unit = "stream" if doc["chunk"] else "call"
    headers = ["model", f"p50 ms/{unit}", f"p90 ms/{unit}", "CPU p50 ms", "RTF", "peak RSS", "RSS growth"]
    if doc["chunk"]:
        headers += [f"p50 ms/chunk of {doc['chunk']}", "p90 ms/chunk", "state carried"]
    rows = []
    for s in subjects:
        row = [s["path"], s["p50_ms"], s["p90_ms"], s["cpu_p50_ms"], "-" if s["rtf"] is None else round(s["rtf"], 5),
               _bytes(s["peak_rss_bytes"]), _bytes(s["rss_growth_bytes"])]
        if doc["chunk"]:
            c = s["chunks"]
            row += [c["p50_ms"], c["p90_ms"], ", ".join(f"{k}->{v}" for k, v in c["state_pairs"].items()) or "none"]
        rows.append(row)
    click.echo(f"ONNX Runtime, {doc['threads']} thread(s), {doc['iters']} iterations after {doc['warmup']} "
               f"warm-up, data: {doc['data']} ({doc['samples']} sample(s))")
    click.echo(table(headers, rows))
    ratio = doc["ratio"]
    if ratio is not None:
        r = ratio["p50"]
        name = Path(doc["model"]["path"]).name
        if abs(r - 1) <= 0.02:
            verdict = f"{name} runs at the same speed within 2%"
        else:
            verdict = f"{name} is {1 / r:.2f}x faster" if r < 1 else f"{name} is {r:.2f}x slower"
        click.echo(f"time ratio {doc['model']['path']} / {doc['vs']['path']} over {ratio['pairs']} interleaved pairs: "
                   f"p50 {r:.3f}, p90 {ratio['p90']:.3f}, CPU time p50 {ratio['cpu_p50']:.3f} ({verdict})")


def _bytes(n: int | None) -> str:
    return "-" if n is None else human_bytes(n)
