"""What a pipeline worker process keeps between tasks, each made on first use (after fork).

The detector and landmark models, the model cache, the face-identity encoder, the I/O threads,
and a small cache of decoded originals. Callers look these up through this module
(``resources.preprocessor()``), so a benchmark may replace one in its own worker processes.
"""
from __future__ import annotations

from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from minio.error import S3Error

from shared.config import get_settings
from shared.ml.preprocess.imaging import ImageRejected, decode_stored
from shared.ml.preprocess.pipeline import Preprocessor
from shared.ml.preprocess.regions import ALL_REGIONS
from shared.modelops.registry import ModelCache
from shared.models import Image
from shared.storage import get_storage

_preprocessor: Preprocessor | None = None
_models: ModelCache | None = None
_encoder = None
_originals: OrderedDict[str, np.ndarray] = OrderedDict()
_pool: ThreadPoolExecutor | None = None


def preprocessor() -> Preprocessor:
    """The detector and landmark models of this process, created on first use (after fork)."""
    global _preprocessor
    if _preprocessor is None:
        # Every region is cut, so that any model version (whatever regions its config names) can score it.
        _preprocessor = Preprocessor.from_settings(get_settings(), regions=ALL_REGIONS)
    return _preprocessor


def model_cache() -> ModelCache:
    global _models
    if _models is None:
        s = get_settings()
        _models = ModelCache(check_seconds=s.model_check_seconds, device=s.device, compile=s.infer_compile,
                             runtime=s.cpu_runtime, runtime_cache=str(s.runtime_cache),
                             gallery_fallback=s.gallery_model)
    return _models


def encoder():
    """The face-identity encoder of this process (for models with members built on it), loaded on first use."""
    global _encoder
    if _encoder is None:
        from shared.ml.nets.encoder import load_encoder
        from shared.ml.runtime.device import resolve_device

        s = get_settings()
        _encoder = load_encoder(resolve_device(s.device), verify=s.weights_verify, runtime=s.cpu_runtime,
                                cache_dir=s.runtime_cache)
    return _encoder


def encoder_runner():
    """The encoder as a model's members read through it (descriptors, and the activations a fine-tuned tail goes
    on from), at the workers' precision."""
    from shared.ml.nets.encoder_runner import EncoderRunner

    return EncoderRunner(encoder(), get_settings().infer_precision)


def io_pool() -> ThreadPoolExecutor:
    """Threads for object-store round trips and image codecs (both release the GIL); made after fork."""
    global _pool
    if _pool is None:
        _pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="pipeline-io")
    return _pool


def node() -> str | None:
    """The Celery node running the current task (e.g. ``pipeline@gpu-3``), for the admin and for tests."""
    from celery import current_task

    return current_task.request.hostname if current_task and current_task.request else None


def _load_rgb(image: Image) -> np.ndarray:
    try:
        data = get_storage().get(image.object_key)
    except S3Error as exc:
        if exc.code in ("NoSuchKey", "NoSuchObject"):
            raise ImageRejected("the stored photo is missing; upload it again") from exc
        raise
    s = get_settings()
    return decode_stored(data, max_pixels=s.max_image_megapixels * 1e6, max_scans=s.max_jpeg_scans)


def original_rgb(image: Image) -> np.ndarray:
    """The decoded original, from this process's small cache (by sha256) when a stage before decoded it."""
    cached = _originals.get(image.sha256)
    if cached is not None:
        _originals.move_to_end(image.sha256)
        return cached
    rgb = _load_rgb(image)
    keep = get_settings().decode_cache
    if keep > 0:
        _originals[image.sha256] = rgb
        while len(_originals) > keep:
            _originals.popitem(last=False)
    return rgb
