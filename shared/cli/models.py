"""``gestalt models`` (list, activate, rollback) and ``gestalt retrain``."""
from __future__ import annotations

import click
from rich.console import Console
from rich.table import Table

from shared.cli.common import console, report_woken


@click.command()
@click.option("--dry-run", is_flag=True, help="Train and evaluate, but register and promote nothing.")
@click.option("--queue", "use_queue", is_flag=True, help="Run on a worker of the `train` queue instead of here.")
@click.option("--shuffle-labels", is_flag=True,
              help="Negative control: train on permuted labels; the promotion guard must reject the result.")
@click.option("--full", is_flag=True, help="Fine-tune every layer from the crops instead of only the heads.")
def retrain(dry_run: bool, use_queue: bool, shuffle_labels: bool, full: bool) -> None:
    """Retrain the regional heads from newly diagnosed cases now (as the nightly task does)."""
    if use_queue:
        from shared.dispatch import queue_retrain

        task_id = queue_retrain("cli", dry_run=dry_run, shuffle_labels=shuffle_labels, kind="full" if full else "heads")
        console.print(f"queued on `train`: task {task_id}")
        return
    from shared.db import session_scope
    from shared.modelops.retrain import run_retrain
    from shared.models import TrainingRun

    run_id = run_retrain("cli", dry_run=dry_run, shuffle_labels=shuffle_labels, kind="full" if full else "heads")
    with session_scope() as session:
        run = session.get(TrainingRun, run_id)
        console.print(f"training run {run.id}: {run.status}: {run.decision}")
        if run.counts:
            console.print(run.counts)


@click.group()
def models() -> None:
    """Model versions."""


@models.command("list")
def models_list() -> None:
    from sqlalchemy import select

    from shared.db import session_scope
    from shared.models import ModelVersion

    table = Table()
    for col in ("id", "name", "status", "classes", "width", "val top1", "val top5", "created"):
        table.add_column(col)
    with session_scope() as session:
        for v in session.scalars(select(ModelVersion).order_by(ModelVersion.id)):
            agg = (v.metrics.get("validation") or {}).get("aggregate", {})
            table.add_row(str(v.id), v.name, v.status, str(len(v.classes)), str(v.config.get("width")),
                          f"{agg.get('top1', float('nan')):.3f}", f"{agg.get('top5', float('nan')):.3f}",
                          v.created_at.strftime("%Y-%m-%d %H:%M"))
    Console().print(table)


@models.command("rollback")
def models_rollback() -> None:
    """Re-activate the version that was active before the current one."""
    from shared.audit import audit
    from shared.db import session_scope
    from shared.dispatch import wake_waiting_photos
    from shared.modelops.retrain import rollback

    try:
        with session_scope() as session:
            version = rollback(session)
            audit(session, "model_rollback", None, "model_version", version.id, via="cli")
            console.print(f"active model: {version.name}")
    except LookupError as exc:
        raise click.ClickException(str(exc)) from exc
    report_woken(wake_waiting_photos())


@models.command("activate")
@click.argument("ref")
def models_activate(ref: str) -> None:
    """Make a model version (name or id) the active one."""
    from shared.audit import audit
    from shared.db import session_scope
    from shared.dispatch import wake_waiting_photos
    from shared.modelops import registry

    try:
        with session_scope() as session:
            version = registry.find_version(session, ref)
            registry.activate(session, version)
            audit(session, "model_activate", None, "model_version", version.id, via="cli")
            console.print(f"active model: {version.name}")
    except registry.ModelNotFound as exc:
        raise click.ClickException(str(exc)) from exc
    report_woken(wake_waiting_photos())

