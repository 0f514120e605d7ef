"""Settings: one object, read from ``GESTALT_*`` environment variables.

Every setting has a comment. Secrets have no defaults: ``gestalt up`` generates
them into the data directory for the embedded stack, and a deployment must set
them (``Settings.require_secrets`` stops the process at start-up otherwise).
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from shared.ml.runtime.choices import RUNTIME_CHOICES


class ConfigError(RuntimeError):
    """A required setting is missing or malformed."""


def _int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError as exc:
        raise ConfigError(f"{name} must be an integer, got {raw!r}") from exc


def _float(name: str, default: float) -> float:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return float(raw)
    except ValueError as exc:
        raise ConfigError(f"{name} must be a number, got {raw!r}") from exc


# The spellings a boolean setting accepts (any case); anything else stops the process at start.
BOOLEANS = {"1": True, "true": True, "yes": True, "on": True, "0": False, "false": False, "no": False, "off": False}


def _bool(name: str, default: bool) -> bool:
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    value = BOOLEANS.get(raw.strip().lower())
    if value is None:
        raise ConfigError(f"{name}={raw!r} is not a boolean; allowed: {', '.join(BOOLEANS)}")
    return value


# The settings that take one of a few values: attribute -> (variable, the values allowed). The detector and
# landmark names are the registries' of shared.ml.preprocess.backends (tests/test_config.py checks that they agree).
CHOICES = {
    "detector_backend": ("GESTALT_DETECTOR", ("auto", "retinaface", "mediapipe")),
    "landmark_backend": ("GESTALT_LANDMARKER", ("auto", "fan", "mediapipe")),
    "device": ("GESTALT_DEVICE", ("auto", "cpu", "cuda", "cuda:<index>", "mps")),
    "infer_precision": ("GESTALT_INFER_PRECISION", ("auto", "fp32", "bf16")),
    "fuse_stages": ("GESTALT_FUSE_STAGES", ("auto", "on", "off")),
}


def _is_choice(value: str, allowed: tuple[str, ...]) -> bool:
    """``value`` is one of ``allowed``, where ``name:<index>`` stands for ``name:0``, ``name:1``, ..."""
    patterns = [re.escape(a.removesuffix(":<index>")) + r":\d+" for a in allowed if a.endswith(":<index>")]
    return value in allowed or any(re.fullmatch(p, value) for p in patterns)


def check_choices(settings: object) -> None:
    """Stop at start when a choice setting is none of its values: its name, its value and the values allowed."""
    for attr, (name, allowed) in CHOICES.items():
        value = getattr(settings, attr)
        if not _is_choice(value, allowed):
            raise ConfigError(f"{name}={value!r} is not one of the values allowed: {', '.join(allowed)}")


def _str(name: str, default: str | None = None) -> str | None:
    raw = os.environ.get(name)
    return default if raw is None or raw == "" else raw


def _choice(name: str, default: str, allowed: tuple[str, ...]) -> str:
    value = _str(name, default)
    if value not in allowed:
        raise ConfigError(f"{name} must be one of {', '.join(allowed)}, got {value!r}")
    return value


@dataclass(frozen=True)
class Settings:
    # Where the embedded stack keeps PostgreSQL, Redis and SeaweedFS data, logs and generated secrets.
    data_dir: Path = field(default_factory=lambda: Path(_str("GESTALT_DATA_DIR", "./var")).resolve())
    # SQLAlchemy URL of PostgreSQL; unset means the embedded server that `gestalt up` starts.
    database_url: str | None = field(default_factory=lambda: _str("GESTALT_DATABASE_URL"))
    # Redis URL used as the Celery broker and result backend; unset means embedded.
    redis_url: str | None = field(default_factory=lambda: _str("GESTALT_REDIS_URL"))
    # S3 endpoint as host:port (MinIO, SeaweedFS, AWS); unset means embedded SeaweedFS.
    s3_endpoint: str | None = field(default_factory=lambda: _str("GESTALT_S3_ENDPOINT"))
    # S3 credentials. Secrets: no defaults.
    s3_access_key: str | None = field(default_factory=lambda: _str("GESTALT_S3_ACCESS_KEY"))
    s3_secret_key: str | None = field(default_factory=lambda: _str("GESTALT_S3_SECRET_KEY"))
    # Bucket for originals, crops and checkpoints; created on start if missing.
    s3_bucket: str = field(default_factory=lambda: _str("GESTALT_S3_BUCKET", "gestalt"))
    # Use https to reach the object store.
    s3_secure: bool = field(default_factory=lambda: _bool("GESTALT_S3_SECURE", False))
    # Region name passed to the S3 client (MinIO ignores it).
    s3_region: str = field(default_factory=lambda: _str("GESTALT_S3_REGION", "us-east-1"))
    # Flask session signing key. Secret: no default.
    secret_key: str | None = field(default_factory=lambda: _str("GESTALT_SECRET_KEY"))
    # Largest accepted upload per photo, in megabytes (larger ones get HTTP 413).
    max_upload_mb: int = field(default_factory=lambda: _int("GESTALT_MAX_UPLOAD_MB", 20))
    # Largest decoded photo, in megapixels; bigger files are refused as decompression bombs.
    max_image_megapixels: float = field(default_factory=lambda: _float("GESTALT_MAX_IMAGE_MEGAPIXELS", 40.0))
    # Smallest accepted photo side, in pixels.
    min_image_side: int = field(default_factory=lambda: _int("GESTALT_MIN_IMAGE_SIDE", 64))
    # Progressive JPEGs with more scans are refused before decoding, in the portal, the workers, train and import:
    # encoders write about ten, and each scan is a pass of the decoder over the whole image.
    max_jpeg_scans: int = field(default_factory=lambda: _int("GESTALT_MAX_JPEG_SCANS", 100))
    # Most photos in one upload request (more are refused with HTTP 413 before any is read).
    max_photos_per_request: int = field(default_factory=lambda: _int("GESTALT_MAX_PHOTOS_PER_REQUEST", 20))
    # Most megapixels (summed over the photos' headers) in one upload request, refused with 413 before decoding.
    max_request_megapixels: float = field(default_factory=lambda: _float("GESTALT_MAX_REQUEST_MEGAPIXELS", 250.0))
    # Processor seconds the portal may spend decoding the photos of one upload request; past it the request is
    # refused with 413 and the web worker goes on (photos that must be decoded and encoded afresh: turned, CMYK,
    # transparent or 16-bit PNG, WebP, TIFF, BMP).
    upload_cpu_seconds: float = field(default_factory=lambda: _float("GESTALT_UPLOAD_CPU_SECONDS", 10.0))
    # Photo archives an admin imports (`POST /api/v1/admin/imports/photos`, the admin console's Imports page): the
    # largest upload, in megabytes (a larger one gets 413 before it is read). `gestalt import photos DIR` on the
    # server has no such limit. Each photo in it still passes the upload gate (GESTALT_MAX_UPLOAD_MB and the rest).
    import_max_archive_mb: int = field(default_factory=lambda: _int("GESTALT_IMPORT_MAX_ARCHIVE_MB", 200))
    # Most entries (files and folders) in one archive, read from its end record before its directory is parsed.
    import_max_entries: int = field(default_factory=lambda: _int("GESTALT_IMPORT_MAX_ENTRIES", 2000))
    # Most megabytes an archive may unpack to, summed over its entries (each entry at most GESTALT_MAX_UPLOAD_MB).
    import_max_unpacked_mb: int = field(default_factory=lambda: _int("GESTALT_IMPORT_MAX_UNPACKED_MB", 500))
    # Largest compression ratio of one entry (unpacked / packed size): photos hardly compress, a zip bomb does
    # a thousandfold. Checked, like the sizes above, from the archive's directory before anything is unpacked.
    import_max_ratio: float = field(default_factory=lambda: _float("GESTALT_IMPORT_MAX_RATIO", 100.0))
    # Processor seconds the portal may spend checking one archive's photos (gunicorn's timeout is 120 s); past it
    # the import is refused with 413 and nothing is written: import a larger archive with `gestalt import photos`.
    import_cpu_seconds: float = field(default_factory=lambda: _float("GESTALT_IMPORT_CPU_SECONDS", 60.0))
    # Archive imports each admin may run (Flask-Limiter syntax), refused ones included: each unpacks and decodes.
    import_rate_limit: str = field(default_factory=lambda: _str("GESTALT_IMPORT_RATE_LIMIT", "10 per hour"))
    # Photos each user may upload (accepted ones; Flask-Limiter syntax); past it uploads get 429 with Retry-After.
    photo_rate_limit: str = field(default_factory=lambda: _str("GESTALT_PHOTO_RATE_LIMIT", "200 per hour"))
    # Saliency heatmaps each user may request (each may run the model's networks backwards).
    heatmap_rate_limit: str = field(default_factory=lambda: _str("GESTALT_HEATMAP_RATE_LIMIT", "60 per minute"))
    # Printable reports each user may request.
    report_rate_limit: str = field(default_factory=lambda: _str("GESTALT_REPORT_RATE_LIMIT", "20 per minute"))
    # Rescores each user may ask for (each queues the photo for the workers again).
    rescore_rate_limit: str = field(default_factory=lambda: _str("GESTALT_RESCORE_RATE_LIMIT", "30 per minute"))
    # Minimum detector confidence for a face to count.
    min_face_confidence: float = field(default_factory=lambda: _float("GESTALT_MIN_FACE_CONFIDENCE", 0.5))
    # Face detector: "retinaface" (RetinaFace ResNet-50, else MobileNet-0.25), "mediapipe" (BlazeFace,
    # offline), or "auto" (RetinaFace ResNet-50 when its weights are present, else mediapipe).
    detector_backend: str = field(default_factory=lambda: _str("GESTALT_DETECTOR", "auto"))
    # Landmarks: "fan" (face-alignment 2D-FAN-4), "mediapipe" (FaceMesh, offline) or "auto" (fan when present).
    landmark_backend: str = field(default_factory=lambda: _str("GESTALT_LANDMARKER", "auto"))
    # Check each weight file's sha256 against the manifest before loading it (turn off only for development).
    weights_verify: bool = field(default_factory=lambda: _bool("GESTALT_WEIGHTS_VERIFY", True))
    # Where the HPO ontology arrays and the phenotype ranker's calibration are cached (built on first use);
    # empty: $XDG_CACHE_HOME/gestalt, else ~/.cache/gestalt.
    phenotype_cache: str | None = field(default_factory=lambda: _str("GESTALT_PHENOTYPE_CACHE"))
    # Seconds a worker trusts its cached idea of the active model before asking the database again.
    model_check_seconds: float = field(default_factory=lambda: _float("GESTALT_MODEL_CHECK_SECONDS", 5.0))
    # Torch intra-op threads per worker process (0 = on the CPU, the cores shared out among a worker's processes;
    # torch's default on a GPU and in the command-line tools).
    torch_threads: int = field(default_factory=lambda: _int("GESTALT_TORCH_THREADS", 0))
    # Device for inference and training: "cpu", "cuda" or "auto".
    device: str = field(default_factory=lambda: _str("GESTALT_DEVICE", "auto"))
    # Compile the inference model with torch.compile when a worker loads it (slower first photo, faster after).
    infer_compile: bool = field(default_factory=lambda: _bool("GESTALT_INFER_COMPILE", False))
    # Most photos one infer task scores in one forward pass: itself plus photos waiting behind it.
    infer_batch: int = field(default_factory=lambda: _int("GESTALT_INFER_BATCH", 64))
    # Test-time augmentation: average each region's softmax over the crop and its horizontal flip.
    infer_flip_tta: bool = field(default_factory=lambda: _bool("GESTALT_INFER_FLIP_TTA", False))
    # Inference precision: "auto" (bf16 autocast on CUDA, fp32 on CPU), "fp32" or "bf16" (also on CPUs with
    # AVX512-BF16/AMX, several times faster there; scores move in the third decimal).
    infer_precision: str = field(default_factory=lambda: _str("GESTALT_INFER_PRECISION", "auto"))
    # The runtime of the networks a CPU worker runs (the identity encoder, the regional ensemble): "auto" (for each
    # network the fastest that passed bench/runtimes.py's accuracy check; docs/performance.md), "eager" (PyTorch fp32,
    # channels-last), "compile" (torch.compile), "onnx" (ONNX Runtime fp32), "onnx-int8" (ONNX Runtime, int8
    # weights and calibrated activations) or "onnx-int8-dynamic". A CUDA worker always runs PyTorch.
    cpu_runtime: str = field(default_factory=lambda: _choice("GESTALT_CPU_RUNTIME", "auto", RUNTIME_CHOICES))
    # Where the ONNX models exported (and quantised) for the CPU runtime are kept, by the weights' hash, so that
    # a network is exported once per machine; empty: $XDG_CACHE_HOME/gestalt/runtimes, else ~/.cache/gestalt/runtimes.
    runtime_cache: Path = field(default_factory=lambda: Path(_str("GESTALT_RUNTIME_CACHE", "") or _user_cache(
        "runtimes")))
    # Celery task events (sent, received, started, succeeded) for a monitor such as Flower. Off by default: nothing in
    # Gestalt reads them, they cost four Redis publishes per task, and Flower switches them on while it runs.
    task_events: bool = field(default_factory=lambda: _bool("GESTALT_TASK_EVENTS", False))
    # Celery worker processes per worker in the embedded stack.
    worker_concurrency: int = field(default_factory=lambda: _int("GESTALT_WORKER_CONCURRENCY", 2))
    # Seconds between two sweeps (re-queue lost images, score images waiting for a model).
    sweep_seconds: float = field(default_factory=lambda: _float("GESTALT_SWEEP_SECONDS", 30.0))
    # Images still `queued` this many seconds after upload are enqueued again by the sweeper.
    requeue_after_seconds: int = field(default_factory=lambda: _int("GESTALT_REQUEUE_AFTER_SECONDS", 120))
    # The sweeper stops re-queueing an image this many seconds after upload and marks it failed.
    give_up_seconds: int = field(default_factory=lambda: _int("GESTALT_GIVE_UP_SECONDS", 6 * 3600))
    # Nightly retraining: crontab "minute hour day-of-month month day-of-week", in `timezone`.
    retrain_cron: str = field(default_factory=lambda: _str("GESTALT_RETRAIN_CRON", "0 2 * * *"))
    # IANA time zone of beat's schedule (default: this machine's zone).
    timezone: str = field(default_factory=lambda: _str("GESTALT_TIMEZONE", local_timezone()))
    # While no trained model is active, score photos with the gallery model (the identity encoder's descriptors matched
    # against diagnosed, consented patients; registered and activated by the first worker that needs it). Off: photos
    # wait in awaiting_model until a model is activated.
    gallery_model: bool = field(default_factory=lambda: _bool("GESTALT_GALLERY_MODEL", True))
    # A diagnosed syndrome becomes a new output class once it has this many subjects (cases).
    retrain_min_subjects: int = field(default_factory=lambda: _int("GESTALT_RETRAIN_MIN_SUBJECTS", 5))
    # While only the gallery model is active, the nightly run trains a clinic's first model once this many syndromes
    # each have GESTALT_RETRAIN_MIN_SUBJECTS diagnosed, consented patients.
    retrain_min_syndromes: int = field(default_factory=lambda: _int("GESTALT_RETRAIN_MIN_SYNDROMES", 2))
    # Share of new subjects held out (by a stable hash) to compare candidate and active models.
    retrain_holdout_fraction: float = field(default_factory=lambda: _float("GESTALT_RETRAIN_HOLDOUT", 0.2))
    # A candidate may be at most this much worse (absolute top-1 and top-10) and still be promoted.
    retrain_tolerance: float = field(default_factory=lambda: _float("GESTALT_RETRAIN_TOLERANCE", 0.02))
    # Full fine-tunes (every layer, from the crops) on this crontab; empty turns them off (e.g. "0 3 * * 0").
    retrain_full_cron: str = field(default_factory=lambda: _str("GESTALT_RETRAIN_FULL_CRON", ""))
    # Epochs of a full fine-tune.
    retrain_full_epochs: int = field(default_factory=lambda: _int("GESTALT_RETRAIN_FULL_EPOCHS", 10))
    # Epochs of head training per night (the cost is epochs x images).
    retrain_epochs: int = field(default_factory=lambda: _int("GESTALT_RETRAIN_EPOCHS", 30))
    # Web listen address for `gestalt web` / `gestalt up`.
    web_host: str = field(default_factory=lambda: _str("GESTALT_WEB_HOST", "127.0.0.1"))
    web_port: int = field(default_factory=lambda: _int("GESTALT_WEB_PORT", 5000))
    # Gunicorn worker processes for the web app.
    web_workers: int = field(default_factory=lambda: _int("GESTALT_WEB_WORKERS", 2))
    # Reverse proxies in front of the portal whose X-Forwarded-For/-Proto are trusted (werkzeug's ProxyFix): 0 for
    # the loopback portal of `gestalt up`, 1 behind the one TLS proxy of deploy/ (compose, the cluster's Ingress).
    # The client address (rate limits, audit log) is then the one that proxy saw; more than the real number of
    # proxies lets a client choose its own address.
    trusted_proxies: int = field(default_factory=lambda: _int("GESTALT_TRUSTED_PROXIES", 0))
    # Failed logins allowed per account, from any address (Flask-Limiter syntax); successes do not count. Also the
    # wrong current passwords allowed per account on /account/password.
    login_rate_limit: str = field(default_factory=lambda: _str("GESTALT_LOGIN_RATE_LIMIT", "10 per minute"))
    # Failed logins allowed per client address across all accounts (password spraying); looser than the per-account
    # limit, so one account's attacker locks out that account, not the others who share the address.
    login_address_rate_limit: str = field(
        default_factory=lambda: _str("GESTALT_LOGIN_ADDRESS_RATE_LIMIT", "30 per minute;300 per hour"))
    # Hours a portal session may sit idle before it ends (the next request asks for a login).
    session_idle_hours: float = field(default_factory=lambda: _float("GESTALT_SESSION_IDLE_HOURS", 8.0))
    # Hours after login at which a portal session ends, however active it is.
    session_max_hours: float = field(default_factory=lambda: _float("GESTALT_SESSION_MAX_HOURS", 24.0))
    # Days an API token is valid from its creation (`gestalt tokens create --days` overrides it).
    token_days: int = field(default_factory=lambda: _int("GESTALT_TOKEN_DAYS", 90))
    # Days a case is kept after it was created; 0 keeps cases until a clinician deletes them.
    retention_days: int = field(default_factory=lambda: _int("GESTALT_RETENTION_DAYS", 0))
    # Seconds before Redis hands an unacknowledged task (its worker died) to another worker.
    visibility_timeout: int = field(default_factory=lambda: _int("GESTALT_VISIBILITY_TIMEOUT", 900))
    # Send the session cookie over https only. `gestalt up` turns it off for its plain-http loopback portal.
    secure_cookies: bool = field(default_factory=lambda: _bool("GESTALT_SECURE_COOKIES", True))
    # Ports of the embedded engines (127.0.0.1 only).
    embedded_pg_port: int = field(default_factory=lambda: _int("GESTALT_EMBEDDED_PG_PORT", 54329))
    embedded_redis_port: int = field(default_factory=lambda: _int("GESTALT_EMBEDDED_REDIS_PORT", 63799))
    # First of the nine consecutive ports SeaweedFS uses; the S3 API is base+6.
    embedded_s3_port_base: int = field(default_factory=lambda: _int("GESTALT_EMBEDDED_S3_PORT_BASE", 18300))
    # Most photos one detect task runs the detector on in one batch: itself plus photos waiting behind it
    # (claimed with SKIP LOCKED). Batching is for the GPU; on 2 CPU cores it saves transactions and round trips.
    detect_batch: int = field(default_factory=lambda: _int("GESTALT_DETECT_BATCH", 8))
    # Most photos one align task runs the landmark model on in one batch (the same claim as detect's).
    align_batch: int = field(default_factory=lambda: _int("GESTALT_ALIGN_BATCH", 8))
    # Run detect, align and infer for a claimed batch in one go: "auto" when the worker consumes all three
    # queues (a GPU worker does), "on" or "off". The three queues stay separate for split deployments.
    fuse_stages: str = field(default_factory=lambda: _str("GESTALT_FUSE_STAGES", "auto"))
    # Seconds a batch's claim on a photo holds: the photo's own message waits meanwhile and redoes the
    # stage only after this (the claiming worker died). Longer than a batch takes.
    claim_lease_seconds: float = field(default_factory=lambda: _float("GESTALT_CLAIM_LEASE_SECONDS", 30.0))
    # Decoded originals each worker process keeps (by sha256), so detect and align decode a photo once.
    decode_cache: int = field(default_factory=lambda: _int("GESTALT_DECODE_CACHE", 8))

    def __post_init__(self) -> None:
        check_choices(self)
        # Commands run beside `gestalt up` (users create, train, ...) find the embedded
        # engines through the connection file it writes; explicit env vars always win.
        embedded = read_stack_file(self.data_dir)
        for attr, key in (
            ("database_url", "GESTALT_DATABASE_URL"),
            ("redis_url", "GESTALT_REDIS_URL"),
            ("s3_endpoint", "GESTALT_S3_ENDPOINT"),
            ("s3_access_key", "GESTALT_S3_ACCESS_KEY"),
            ("s3_secret_key", "GESTALT_S3_SECRET_KEY"),
            ("secret_key", "GESTALT_SECRET_KEY"),
        ):
            if getattr(self, attr) is None and embedded.get(key):
                object.__setattr__(self, attr, embedded[key])

    @property
    def max_upload_bytes(self) -> int:
        return self.max_upload_mb * 1024 * 1024

    @property
    def import_max_archive_bytes(self) -> int:
        return self.import_max_archive_mb * 1024 * 1024

    def require_secrets(self) -> None:
        """Stop at start-up when a service is configured without its secret."""
        missing = [
            name
            for name, value in (
                ("GESTALT_DATABASE_URL", self.database_url),
                ("GESTALT_REDIS_URL", self.redis_url),
                ("GESTALT_S3_ENDPOINT", self.s3_endpoint),
                ("GESTALT_S3_ACCESS_KEY", self.s3_access_key),
                ("GESTALT_S3_SECRET_KEY", self.s3_secret_key),
                ("GESTALT_SECRET_KEY", self.secret_key),
            )
            if not value
        ]
        if missing:
            raise ConfigError(
                "missing settings: " + ", ".join(missing)
                + " (run `gestalt up` for the embedded stack, or set them in the environment)"
            )


STACK_FILE = "stack.json"


def _user_cache(name: str) -> str:
    return str(Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "gestalt" / name)


def local_timezone() -> str:
    """This machine's IANA zone name (from $TZ or /etc/localtime), else UTC."""
    if os.environ.get("TZ"):
        return os.environ["TZ"].lstrip(":")
    try:
        target = os.path.realpath("/etc/localtime")
        if "zoneinfo/" in target:
            return target.split("zoneinfo/", 1)[1]
    except OSError:
        pass
    return "UTC"


def read_stack_file(data_dir: Path) -> dict[str, str]:
    """Connection settings of a running embedded stack, or {} when there is none."""
    path = Path(data_dir) / STACK_FILE
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


_settings: Settings | None = None


def get_settings() -> Settings:
    """The process-wide settings, read once from the environment."""
    global _settings
    if _settings is None:
        _settings = Settings()
    return _settings


def reload_settings() -> Settings:
    """Re-read the environment (tests and the CLI after exporting embedded URLs)."""
    global _settings
    _settings = Settings()
    return _settings
