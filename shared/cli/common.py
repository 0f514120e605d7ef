"""What the command modules share: the console, torch and preprocessing-cache options, data loading."""
from __future__ import annotations

from pathlib import Path

import click
from rich.console import Console

from shared.config import get_settings

console = Console(stderr=True)


def torch_options(func):
    """--threads and --device, shared by train, pretrain and evaluate."""
    func = click.option("--device", default=None,
                        help="Where torch runs: cpu, cuda, cuda:N or auto (CUDA when present) "
                             "[default: $GESTALT_DEVICE, else auto].")(func)
    return click.option("--threads", type=click.IntRange(min=0), default=None,
                        help="Torch CPU threads; 0 leaves torch's own choice "
                             "[default: $GESTALT_TORCH_THREADS, else 0].")(func)


def torch_runtime(threads: int | None, device: str | None):
    """Settings with the chosen device, torch's thread count set; prints both. Returns (settings, device)."""
    import dataclasses

    import torch

    from shared.ml.runtime.device import resolve_device
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


def cache_options(func):
    """--cache DIR and --no-cache, shared by train, pretrain and evaluate."""
    func = click.option("--no-cache", "no_cache", is_flag=True,
                        help="Preprocess every photo afresh and store nothing.")(func)
    return click.option("--cache", "cache_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
                        help="Preprocessing cache (faces found, crops, rejections; keyed by photo sha256 and the "
                             "detector, landmarker and regions), shared by train and evaluate "
                             "[default: $GESTALT_DATA_DIR/prep-cache].")(func)


def decode_limits(settings) -> dict:
    """The decoder bounds of the settings (frame size, progressive JPEG scans), as the workers apply them, for
    :func:`shared.ml.train.prepared.prepare`."""
    return {"max_pixels": settings.max_image_megapixels * 1e6, "max_scans": settings.max_jpeg_scans}


def prep_cache(settings, preprocessor, cache_dir: Path | None, no_cache: bool):
    """The preprocessing cache to use, or None with --no-cache."""
    from shared.ml.preprocess.cache import DEFAULT_SUBDIR, PrepCache

    if no_cache:
        return None
    root = cache_dir or Path(settings.data_dir) / DEFAULT_SUBDIR
    try:
        return PrepCache.for_preprocessor(root, preprocessor)
    except OSError as exc:
        console.print(f"[yellow]preprocessing cache {root} unusable ({exc}); running without it[/]")
        return None


def cache_note(cache, before: tuple[int, int] = (0, 0)) -> None:
    """The photos read from and computed into ``cache`` since its counts were ``before`` (hits, misses)."""
    if cache is None:
        return
    hits, misses = cache.hits - before[0], cache.misses - before[1]
    if hits + misses:
        console.print(f"preprocessing cache {cache.root}: {hits} photo(s) read, {misses} computed", soft_wrap=True)


def load_samples_or_fail(path: Path):
    """A folder or manifest's samples; a bad manifest or an empty folder is a one-line error."""
    from shared.ml.train.data import load_samples

    try:
        return load_samples(path)
    except (ValueError, FileNotFoundError, UnicodeDecodeError) as exc:
        raise click.ClickException(str(exc)) from exc


def report_skipped(rejected, path: Path | None) -> None:
    """One line of counts by reason; the full list (image, subject, label, reason) to ``path``."""
    from shared.ml.train.prepared import skipped_summary, write_skipped

    if not rejected:
        return
    counts = "; ".join(f"{n} {reason}" for reason, n in skipped_summary(rejected))
    console.print(f"[yellow]skipped {len(rejected)} photo(s)[/]: {counts}", soft_wrap=True)
    if path is not None:
        write_skipped(rejected, path)
        console.print(f"the skipped photos and their reasons: {path}")


def report_woken(waiting: int) -> None:
    """After an activation: how many photos that waited for a model were sent to be scored."""
    if waiting:
        console.print(f"{waiting} waiting image(s) queued for scoring")
