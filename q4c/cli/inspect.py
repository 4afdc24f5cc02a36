"""`q4c inspect`: what a model holds."""

from __future__ import annotations

from pathlib import Path

import click

from q4c import graph as g
from q4c.cli.render import emit_json, human_bytes, table
from q4c.inspect import inspect_model


@click.command("inspect")
@click.argument("model", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document (schema q4c.inspect/1).")
def inspect_cmd(model: Path, as_json: bool) -> None:
    """Show MODEL's opsets, op histogram, weights by dtype and bit width, inputs and outputs.

    \b
    Example:
      q4c inspect models/bilstm_am.q4.onnx --json | jq .weights
    """
    info = inspect_model(g.load(model))
    if as_json:
        emit_json({"path": str(model), **info})
        return
    click.echo(f"{model}: IR {info['ir_version']}, opsets " + ", ".join(f"{d} {v}" for d, v in info["opsets"].items()))
    for io in ("inputs", "outputs"):
        click.echo(f"{io}: " + "; ".join(f"{t['name']} {t['dtype']}{t['shape']}" for t in info[io]))
    click.echo(table(["weights", "tensors", "params", "bytes"],
                     [(k, v["tensors"], v["params"], human_bytes(v["bytes"])) for k, v in info["weights"].items()]))
    click.echo(table(["op", "count"], sorted(info["ops"].items(), key=lambda kv: -kv[1])))
    books = info.get("codebooks", {})
    if books.get("tensors"):
        click.echo(f"codebooks: {books['tensors']} weight(s), {human_bytes(books['bytes'])} (indices "
                   f"{human_bytes(books['index_bytes'])}, tables {human_bytes(books['table_bytes'])}, scales "
                   f"{human_bytes(books['scale_bytes'])})")
    if info["session_config"]:
        click.echo(f"ONNX Runtime session config: {info['session_config']}")
