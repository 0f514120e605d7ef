"""``gestalt weights``: the production weight files."""
from __future__ import annotations

from pathlib import Path

import click
from rich.console import Console
from rich.table import Table

from shared.cli.common import console


@click.group()
def weights() -> None:
    """Production model weights (never downloaded at run time)."""


@weights.command("status")
def weights_status() -> None:
    """Each expected file: source URL, sha256, and whether it is present."""
    from shared.ml.formats.weights import search_dirs, status

    table = Table(title="search order: " + ", ".join(str(d) for d in search_dirs()))
    for col in ("weights", "file", "sha256", "state", "source"):
        table.add_column(col, overflow="fold")
    for row in status():
        colour = {"present": "green", "missing": "yellow"}.get(row["state"], "red")
        table.add_row(row["name"], row["file"], row["sha256"][:16], f"[{colour}]{row['state']}[/]", row["url"])
    Console(width=160).print(table)


@weights.command("fetch")
@click.option("--dir", "target", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Where to put them (default: $GESTALT_WEIGHTS_DIR, else the torch hub checkpoint folder).")
@click.option("--only", default=None, help="One file name.")
def weights_fetch(target: Path | None, only: str | None) -> None:
    """Download the weights where a network exists (e.g. in a Docker build), checking their sha256."""
    import urllib3

    from shared.ml.formats.weights import fetch, search_dirs

    target = target or search_dirs()[0]
    try:
        for path in fetch(target, only):
            console.print(f"ok {path}")
    except (urllib3.exceptions.HTTPError, OSError, ValueError) as exc:
        raise click.ClickException(f"could not fetch weights: {exc}") from exc
