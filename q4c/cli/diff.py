"""`q4c diff`: how far a compiled model is from its FP32 original, and where the error enters."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import click

from q4c import graph as g
from q4c import ort as q4ort
from q4c.calib.readers import load_samples
from q4c.cli.render import emit_json, table
from q4c.diff import below_tolerance, diff_models
from q4c.signature import input_specs


@click.command("diff")
@click.argument("reference", metavar="FLOAT", type=click.Path(path_type=Path), required=False)
@click.argument("other", metavar="QUANT", type=click.Path(dir_okay=False, path_type=Path), required=False)
@click.option("--data", type=click.Path(path_type=Path), default=None,
              help="A .npz keyed by input name, or a directory of .npz samples; metrics pool all samples. "
                   "Required unless --system.")
@click.option("--system", "system", type=click.Path(dir_okay=False, path_type=Path), default=None, metavar="SPEC",
              help="Compare a compiled system: 'q4c diff --system SPEC OUTDIR' runs the SPEC's driver over its samples "
                   "with the FP32 graphs and with OUTDIR/<name>.onnx and compares the driver's outputs.")
@click.option("--samples", "system_samples", type=click.IntRange(min=1), default=8, show_default=True,
              help="--system: the driver's first N samples.")
@click.option("--tensors", is_flag=True,
              help="Also compare every intermediate tensor in graph order and recurrent layers per time step "
                   "(both models run by q4c's interpreter).")
@click.option("--plot", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write a PNG of per-tensor SQNR and per-time-step recurrent error (implies --tensors; "
                   "needs matplotlib: pip install 'q4c[plot]').")
@click.option("--tolerance", type=float, default=None, metavar="DB",
              help="Exit 3 when any output's SQNR is below DB.")
@click.option("--backend", type=click.Choice(["ort", "interp"]), default="ort", show_default=True,
              help="What computes the outputs: ONNX Runtime CPU with each model's recorded session config "
                   "(what deployments get), or q4c's interpreter.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document (schema q4c.diff/1).")
@click.pass_context
def diff_cmd(ctx: click.Context, reference: Path | None, other: Path | None, data: Path | None, tensors: bool,
             plot: Path | None, tolerance: float | None, backend: str, as_json: bool, system: Path | None = None,
             system_samples: int = 8) -> None:
    """Run FLOAT and QUANT on the same DATA and compare them.

    Per output: SQNR (dB; inf when identical), max and mean absolute error, cosine similarity;
    for (log-)probability outputs also KL(FLOAT || QUANT) and per-frame arg-max agreement; for
    CTC log-probs ([batch, time, vocab] from float features, blank 0) the share of greedy
    transcripts that match and the token edit distance rate against FLOAT's transcript.

    \b
    Examples:
      q4c diff models/bilstm_am.onnx models/bilstm_am.q4.onnx --data models/bilstm_am.npz
      q4c diff m.onnx m.q4.onnx --data samples/ --tensors --plot diff.png --tolerance 10
      q4c diff --system models/real/dfn3_system.toml /tmp/dfn3sys --tolerance 25
    """
    if system is not None:
        if reference is None or other is not None or tensors or plot is not None or backend != "ort":
            raise click.UsageError("--system SPEC takes one argument, the compiled OUTDIR (no --tensors, --plot, "
                                   "--backend interp)")
        from q4c.cli.system import diff_system

        failing = diff_system(system, reference, system_samples, tolerance, as_json)
        if failing:
            click.echo(f"over tolerance: {', '.join(failing)} below {tolerance} dB", err=True)
            ctx.exit(3)
        return
    if reference is None or other is None or data is None:
        raise click.UsageError("give FLOAT, QUANT and --data (or --system SPEC OUTDIR)")
    if reference.is_dir():
        raise click.UsageError(f"FLOAT {reference} is a directory (a compiled system: --system SPEC {reference})")
    ref_model, other_model = g.load(reference), g.load(other)
    samples = load_samples(data, input_specs(ref_model))
    tensors = tensors or plot is not None
    runners: dict[str, Any] = {}
    if backend == "ort":
        ref_session, other_session = q4ort.make_session(ref_model), q4ort.make_session(other_model)
        runners = {"run_reference": lambda f: q4ort.run(ref_session, f),
                   "run_other": lambda f: q4ort.run(other_session, f)}
    doc = diff_models(ref_model, other_model, samples, tensors=tensors, **runners)
    failing = below_tolerance(doc, tolerance) if tolerance is not None else []
    doc = {**doc, "float": str(reference), "quant": str(other), "backend": backend, "tolerance_db": tolerance,
           "passed": not failing}
    if plot is not None:
        from q4c.plot import plot_diff

        plot_diff(doc, plot, title=f"q4c diff: {other.name} vs {reference.name} ({doc['samples']} sample(s))")
        click.echo(f"wrote {plot}", err=True)
    if as_json:
        emit_json(doc)
    else:
        _render(doc)
    if failing:
        click.echo("over tolerance: " + ", ".join(f"{n} {doc['outputs'][n]['sqnr_db']} dB < {tolerance} dB"
                                                  for n in failing), err=True)
        ctx.exit(3)


def _render(doc: dict[str, Any]) -> None:
    rows = []
    for name, m in doc["outputs"].items():
        ctc = m.get("ctc")
        rows.append((name, m["kind"], m["sqnr_db"], m["max_abs"], m["mean_abs"], m["cosine"], m.get("kl", "-"),
                     m.get("argmax_agreement", "-"),
                     f"{ctc['transcript_match']:.3g} / {ctc['token_error_rate']:.3g}" if ctc else "-"))
    click.echo(f"{doc['quant']} vs {doc['float']} on {doc['samples']} sample(s), outputs by {doc['backend']}")
    click.echo(table(["output", "kind", "SQNR dB", "max |err|", "mean |err|", "cosine", "KL", "argmax agree",
                      "CTC match / TER"], rows))
    if "tensors" not in doc:
        return
    first = doc["first_error"]["name"] if doc["first_error"] else None
    click.echo("")
    click.echo(table(["#", "tensor", "op", "shape", "SQNR dB", "max |err|", "cosine", ""],
                     [(i, t["name"], t["op"], "x".join(map(str, t["shape"])), t["sqnr_db"], t["max_abs"], t["cosine"],
                       "<- first error" if t["name"] == first else "")
                      for i, t in enumerate(doc["tensors"])]))
    skipped = {k: v for k, v in doc["tensors_skipped"].items() if v}
    if skipped:
        click.echo("not compared: " + ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in skipped.items()))
    if doc["recurrent"]:
        click.echo("")
        click.echo(table(["recurrent layer", "op", "steps", "SQNR dB first step", "SQNR dB last step", "min SQNR dB",
                          "max |err| first", "max |err| last"],
                         [(node, r["op"], len(r["per_step_sqnr_db"]), _at(r["per_step_sqnr_db"], 0),
                           _at(r["per_step_sqnr_db"], -1), min(r["per_step_sqnr_db"], default=math.inf),
                           _at(r["per_step_max_abs"], 0), _at(r["per_step_max_abs"], -1))
                          for node, r in doc["recurrent"].items()]))


def _at(values: list[float], index: int) -> Any:
    return values[index] if values else "-"

