"""`q4c passes`: every pass q4c can run, and where it comes from."""

from __future__ import annotations

import click

from q4c.cli.render import emit_json, table
from q4c.registry import list_passes


@click.command("passes")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document.")
def passes_cmd(as_json: bool) -> None:
    """List built-in and plugin passes (entry-point group 'q4c.passes') with the default pipeline.

    Use the names with 'q4c compile --passes', e.g. '--passes default,-lower-ort-kernels'.
    """
    from q4c.passes import DEFAULT_PIPELINE

    infos = list_passes()
    if as_json:
        emit_json({"schema": "q4c.passes/1", "default": list(DEFAULT_PIPELINE),
                   "passes": [{"name": i.name, "origin": i.origin, "summary": i.summary} for i in infos]})
        return
    click.echo(table(["pass", "origin", "in default", "what it does"],
                     [(i.name, i.origin, "yes" if i.name in DEFAULT_PIPELINE else "", i.summary) for i in infos]))
