"""``gestalt up``/``down`` and the processes of a deployment: migrate, worker, beat, web, flower."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import click

from shared.cli.catalog import ensure_catalog
from shared.cli.common import console
from shared.config import get_settings, reload_settings
from shared.queues import ALIGN, ALL, DETECT, INFER, joined


@click.command()
@click.option("--data-dir", type=click.Path(path_type=Path), default=None,
              help="Data directory (default: $GESTALT_DATA_DIR or ./var).")
def up(data_dir: Path | None) -> None:
    """Start the whole stack on this machine: engines, migrations, workers, beat and web."""
    from shared import migrate
    from shared.stack import EmbeddedEngines, Ports, StackError, Supervisor, app_processes, hold_stack_lock

    if data_dir:
        os.environ["GESTALT_DATA_DIR"] = str(data_dir.resolve())
    settings = reload_settings()
    external = {k: os.environ.get(k) for k in ("GESTALT_DATABASE_URL", "GESTALT_REDIS_URL", "GESTALT_S3_ENDPOINT")}
    if any(external.values()):
        raise click.ClickException("GESTALT_*_URL/ENDPOINT are set: use `gestalt migrate`, `gestalt worker`, "
                                   "`gestalt beat` and `gestalt web` against external services")
    settings.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    try:
        hold_stack_lock(settings.data_dir)  # held until this process exits
    except StackError as exc:
        raise click.ClickException(str(exc)) from exc
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
    ensure_catalog()

    def ready() -> None:
        console.print(f"[bold green]Gestalt is up:[/] http://{settings.web_host}:{settings.web_port}/  "
                      f"(logs in {engines.logs}; Ctrl-C or `gestalt down` stops it)")
        console.print("First account: gestalt users create --admin")

    Supervisor(engines, app_processes(engines, settings)).run(ready)


@click.command()
@click.option("--data-dir", type=click.Path(path_type=Path), default=None)
def down(data_dir: Path | None) -> None:
    """Stop the stack that `gestalt up` started."""
    from shared.stack import stop_running_stack

    directory = (data_dir or get_settings().data_dir).resolve()
    if stop_running_stack(directory):
        console.print("stopped")
    else:
        console.print(f"no running stack in {directory}")


@click.command("migrate")
def migrate_cmd() -> None:
    """Apply database migrations (one-shot)."""
    from shared import migrate

    migrate.upgrade()
    console.print("database is at the latest migration")
    ensure_catalog()


@click.command(context_settings={"ignore_unknown_options": True})
@click.option("-Q", "--queues", default=joined(ALL), show_default=True)
@click.option("-c", "--concurrency", type=int, default=None)
@click.option("-n", "--hostname", default=None)
@click.argument("celery_args", nargs=-1, type=click.UNPROCESSED)
def worker(queues: str, concurrency: int | None, hostname: str | None, celery_args: tuple[str, ...]) -> None:
    """Run a Celery worker on the given queues."""
    get_settings().require_secrets()
    if {DETECT, ALIGN} & set(queues.split(",")):
        from shared.ml.formats.weights import WeightsMissing
        from shared.ml.preprocess.pipeline import check_backends

        try:
            click.echo(f"preprocessing backends: {check_backends(get_settings())}")
        except (WeightsMissing, ValueError) as exc:
            raise click.ClickException(str(exc)) from exc
    if INFER in queues.split(","):
        from shared.ml.runtime.choices import RuntimeUnavailable, check_runtime

        settings = get_settings()
        device = "cuda" if settings.device == "cuda" else "cpu"  # "auto" finds out in the worker; CPU is the check
        try:
            click.echo(f"cpu runtime: {check_runtime(settings.cpu_runtime, device)}")
        except RuntimeUnavailable as exc:
            raise click.ClickException(str(exc)) from exc
    argv = [sys.executable, "-m", "celery", "-A", "worker.celery_app", "worker", "-Q", queues, "--loglevel=INFO",
            "-c", str(concurrency or get_settings().worker_concurrency)]
    if hostname:
        argv += ["-n", hostname]
    _exec([*argv, *celery_args])


@click.command()
def beat() -> None:
    """Run Celery beat (exactly one per deployment)."""
    settings = get_settings()
    settings.require_secrets()
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    _exec([sys.executable, "-m", "celery", "-A", "worker.celery_app", "beat", "--loglevel=INFO",
           "-s", str(settings.data_dir / "celerybeat-schedule")])


@click.command()
@click.option("--host", default=None)
@click.option("--port", type=int, default=None)
@click.option("--workers", type=int, default=None)
def web(host: str | None, port: int | None, workers: int | None) -> None:
    """Run the portal with gunicorn."""
    settings = get_settings()
    settings.require_secrets()
    bind = f"{host or settings.web_host}:{port or settings.web_port}"
    _exec([sys.executable, "-m", "gunicorn", "--bind", bind, "--workers", str(workers or settings.web_workers),
           "--access-logfile", "-", "--timeout", "120", "web:create_app()"])


def _exec(argv: list[str]) -> None:
    """Become the server process (signals then reach it directly); argv is built here, never from input."""
    os.execv(argv[0], argv)  # noqa: S606


@click.command()
@click.option("--port", type=int, default=5555, show_default=True)
def flower(port: int) -> None:
    """Run Flower (deep queue inspection) behind basic auth from $FLOWER_BASIC_AUTH (user:password)."""
    import importlib.util

    get_settings().require_secrets()
    auth = os.environ.get("FLOWER_BASIC_AUTH", "")
    if ":" not in auth or len(auth.split(":", 1)[1]) < 12:
        raise click.ClickException("set FLOWER_BASIC_AUTH to user:password (a password of 12+ characters)")
    if importlib.util.find_spec("flower") is None:
        raise click.ClickException("Flower is not installed: pip install 'gestalt[ops]'")
    _exec([sys.executable, "-m", "celery", "-A", "worker.celery_app", "flower", f"--port={port}",
           f"--basic-auth={auth}"])
