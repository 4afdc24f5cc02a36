"""`q4c run`: execute a model on sample inputs with ONNX Runtime or q4c's interpreter."""

from __future__ import annotations

from pathlib import Path

import click
import numpy as np

from q4c import graph as g
from q4c import ort as q4ort
from q4c.calib.readers import input_specs, load_samples
from q4c.cli.render import emit_json, table


@click.command("run")
@click.argument("model", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--data", required=True, type=click.Path(path_type=Path),
              help="A .npz keyed by input name, or a directory of .npz samples (run in sorted order).")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write outputs to this .npz (keyed by output name; with several samples, '<name>/<index>').")
@click.option("--backend", type=click.Choice(["ort", "interp"]), default="ort", show_default=True,
              help="ort: ONNX Runtime CPU with the session config recorded in the model; interp: q4c's numpy interpreter.")
@click.option("--threads", type=int, default=None, help="ONNX Runtime intra-op threads (default: ONNX Runtime's choice).")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary of the outputs (schema q4c.run/1).")
def run_cmd(model: Path, data: Path, output: Path | None, backend: str, threads: int | None, as_json: bool) -> None:
    """Run MODEL on DATA and summarize (or save) the outputs.

    \b
    Example:
      q4c run models/bilstm_am.q4.onnx --data models/bilstm_am.npz -o out.npz
    """
    proto = g.load(model)
    samples = load_samples(data, input_specs(proto))
    if backend == "ort":
        session = q4ort.make_session(proto, threads=threads)
        results = [q4ort.run(session, feeds) for feeds in samples]
    else:
        from q4c.interp import Interpreter
        from q4c.verify import refuse_inconsistent_model

        refuse_inconsistent_model(proto)  # the interpreter trusts shapes: a contradicting graph is refused
        interp = Interpreter(proto)
        results = [interp.run(feeds) for feeds in samples]
    if output is not None:
        arrays = results[0] if len(results) == 1 else {f"{k}/{i}": v for i, r in enumerate(results) for k, v in r.items()}
        _save_npz(output, arrays)
    summary = [{"sample": i, "output": name, "shape": list(v.shape), "dtype": str(v.dtype),
                "mean": float(np.mean(v)) if v.size else 0.0, "max_abs": float(np.max(np.abs(v))) if v.size else 0.0}
               for i, r in enumerate(results) for name, v in r.items()]
    if as_json:
        emit_json({"schema": "q4c.run/1", "backend": backend, "samples": len(samples),
                   "output_path": str(output) if output else None, "outputs": summary})
        return
    click.echo(table(["sample", "output", "shape", "dtype", "mean", "max |x|"],
                     [(s["sample"], s["output"], s["shape"], s["dtype"], s["mean"], s["max_abs"]) for s in summary]))


def _save_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Atomic: write beside, then rename, so a failed run leaves no partial file."""
    from q4c.graph import atomic_write

    with atomic_write(path, suffix=".npz") as tmp:
        np.savez(tmp, **arrays)
