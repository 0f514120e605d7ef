"""Object storage behind one module: originals, crops, aligned faces and checkpoints.

Everything goes through the ``minio`` client, so the same code talks to MinIO,
SeaweedFS or AWS S3. Keys derive from content hashes: the same bytes stored twice
are one object, and a re-run task rewrites the same key instead of adding one.
"""
from __future__ import annotations

import hashlib
import io
import logging
from datetime import timedelta

import urllib3
from minio import Minio
from minio.error import S3Error

from shared.config import ConfigError, get_settings

logger = logging.getLogger(__name__)

# Presigned URLs are for one object and expire quickly: they carry patient photos.
PRESIGN_SECONDS = 300
# The codes of an S3Error that mean "no such object" (a HEAD request's 404 reads as NoSuchKey); any other code
# (AccessDenied, ...) is a fault to report, never an absent object.
MISSING = ("NoSuchKey", "NoSuchObject", "NotFound")


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def original_key(sha256: str, ext: str) -> str:
    return f"originals/{sha256[:2]}/{sha256}.{ext}"


def crops_prefix(sha256: str) -> str:
    """The folder of everything derived from a stored original's face: its crops and heatmaps."""
    return f"crops/{sha256[:2]}/{sha256}/"


def crops_key(sha256: str) -> str:
    """All crops of a stored original's face (every region and the identity chip), one object, keyed by
    that original's hash. Faces aligned before crops were bundled have one PNG per crop in the same folder."""
    return f"{crops_prefix(sha256)}crops.npz"


def aligned_key(sha256: str) -> str:
    """The aligned face's PNG as alignment stored it until the crops object held the face (faces aligned since have
    :func:`aligned_png_key`)."""
    return f"aligned/{sha256[:2]}/{sha256}.png"


def aligned_png_key(sha256: str, digest: str) -> str:
    """The aligned face's PNG, made from the crops object when the face is first shown; named by the face's pixels
    (``digest``), so that a face aligned again differently is shown anew, and kept with the crops."""
    return f"{crops_prefix(sha256)}aligned-{digest}.png"


# Part of every heatmap key: raise it when the rendering changes, so cached overlays are redrawn.
HEATMAP_RENDER = "v1"


def heatmap_prefix(sha256: str) -> str:
    """Where the saliency overlays of one stored original live (beside its crops)."""
    return f"{crops_prefix(sha256)}heatmaps/"


def heatmap_key(sha256: str, model_sha256: str, syndrome_id: int, region: str) -> str:
    """A saliency overlay of a stored original for one model (its checkpoint hash), syndrome and region.
    Kept beside the original's crops, so case deletion and the orphan collector remove it with them."""
    return f"{heatmap_prefix(sha256)}{HEATMAP_RENDER}-{model_sha256[:12]}-{syndrome_id}-{region}.png"


# The fitted face + phenotype combination (gestalt evaluate-phenotype --install); read by the portal.
PHENOTYPE_COMBINER_KEY = "models/phenotype-combiner.json"


def checkpoint_key(name: str, sha256: str) -> str:
    return f"models/{name}-{sha256[:12]}.pt"


def feature_set_key(backbone_sha: str, blob: bytes) -> str:
    """A training set stored as backbone features (retraining starts from it), by backbone and content."""
    return f"features/{backbone_sha}/base-{sha256_hex(blob)[:16]}.npz"


def train_data_key(blob: bytes) -> str:
    """A training set stored as crops (for full fine-tunes), by content."""
    return f"train-data/base-{sha256_hex(blob)[:16]}.npz"


class Storage:
    def __init__(self, endpoint: str, access_key: str, secret_key: str, bucket: str,
                 secure: bool = False, region: str = "us-east-1"):
        # Short timeouts and a few retries: tasks retry with backoff on their own.
        http = urllib3.PoolManager(
            timeout=urllib3.Timeout(connect=3, read=30), maxsize=10,
            retries=urllib3.Retry(total=2, backoff_factor=0.2, status_forcelist=[500, 502, 503, 504]))
        self.client = Minio(endpoint, access_key=access_key, secret_key=secret_key, secure=secure,
                            region=region, http_client=http)
        self.bucket = bucket

    def ensure_bucket(self) -> None:
        if not self.client.bucket_exists(self.bucket):
            try:
                self.client.make_bucket(self.bucket)
            except S3Error as exc:  # created concurrently by another process
                if exc.code not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                    raise
            logger.info("bucket=%s state=created", self.bucket)

    def put(self, key: str, data: bytes, content_type: str = "application/octet-stream") -> str:
        self.client.put_object(self.bucket, key, io.BytesIO(data), len(data), content_type=content_type)
        return key

    def get(self, key: str) -> bytes:
        response = self.client.get_object(self.bucket, key)
        try:
            return response.read()
        finally:
            response.close()
            response.release_conn()

    def get_if_present(self, key: str) -> bytes | None:
        """The object's bytes, or None when there is no such object (any other error is raised)."""
        try:
            return self.get(key)
        except S3Error as exc:
            if exc.code in MISSING:
                return None
            raise

    def exists(self, key: str) -> bool:
        try:
            self.client.stat_object(self.bucket, key)
            return True
        except S3Error as exc:
            if exc.code in MISSING:
                return False
            raise

    def delete(self, key: str) -> None:
        self.client.remove_object(self.bucket, key)

    def list(self, prefix: str = "") -> list[str]:
        return [o.object_name for o in self.client.list_objects(self.bucket, prefix=prefix, recursive=True)]

    def presigned_url(self, key: str, seconds: int = PRESIGN_SECONDS) -> str:
        return self.client.presigned_get_object(self.bucket, key, expires=timedelta(seconds=seconds))


_storage: Storage | None = None


def get_storage() -> Storage:
    """The process-wide storage client; the bucket is created on first use."""
    global _storage
    if _storage is None:
        s = get_settings()
        if not (s.s3_endpoint and s.s3_access_key and s.s3_secret_key):
            raise ConfigError("GESTALT_S3_ENDPOINT/ACCESS_KEY/SECRET_KEY are not set and no embedded stack runs")
        storage = Storage(s.s3_endpoint, s.s3_access_key, s.s3_secret_key, s.s3_bucket, s.s3_secure, s.s3_region)
        storage.ensure_bucket()
        _storage = storage
    return _storage


def reset_storage() -> None:
    global _storage
    _storage = None
