"""The crop store: a face's region crops, identity chip and aligned face, one object per face, read back by name.

Alignment stores them (:func:`store_crops`) and records one ``crops`` row per region that points at the
face's object; scoring, heatmaps, the feature store and retraining read them back (:func:`crop_keys`,
:func:`load_crops`). Faces aligned before the crops were bundled have one PNG object per crop, and their
rows point at those: they load the same way.

The aligned face travels in the same object (``ALIGNED_FACE``, never a crop row). Its PNG, which the portal
and the API show, is made from there the first time someone looks at it (:func:`aligned_face_png`), so the
workers encode and store no image a clinician may never open. The face row names that PNG by the face's pixels
(:func:`shared.storage.aligned_png_key`), so a photo aligned again differently never shows an earlier PNG. Faces
aligned before that have their PNG stored at alignment, and read it.
"""
from __future__ import annotations

import hashlib
from collections.abc import Iterable

import numpy as np
from sqlalchemy import select
from sqlalchemy.orm import Session

from shared.ml.members.identity import CHIP_REGION
from shared.ml.preprocess.imaging import (
    decode_crops,
    decode_png_gray,
    decode_png_rgb,
    decode_stored,
    encode_crops,
    encode_png,
)
from shared.ml.preprocess.regions import CUT_PREFIX, cut_name
from shared.models import Crop, Face
from shared.storage import Storage, aligned_png_key, crops_key

# The aligned face's name in a face's crops object (the canvas the landmarks and regions are given on).
ALIGNED_FACE = "aligned_face"


def face_crops(aligned) -> dict[str, np.ndarray]:
    """An aligned face's crops by the names they are stored and read under: its region crops (grayscale, by
    region), dlib's face chip, and the paper's regions cut at the encoder's size (``cut_<region>``): what every
    member of any model reads."""
    crops = dict(aligned.crops)
    if getattr(aligned, "chip", None) is not None:
        crops[CHIP_REGION] = aligned.chip
    crops.update({cut_name(r): cut for r, cut in (getattr(aligned, "cuts", None) or {}).items()})
    return crops


def store_crops(storage: Storage, sha256: str, crops: dict[str, np.ndarray],
                aligned: np.ndarray | None = None) -> str:
    """Store the face's crops (name -> array) of the original ``sha256``, with its aligned face when given, as one
    object; returns its key."""
    if ALIGNED_FACE in crops:
        raise ValueError(f"{ALIGNED_FACE} is the aligned face's name, not a crop's")
    bundle = crops if aligned is None else {**crops, ALIGNED_FACE: aligned}
    return storage.put(crops_key(sha256), encode_crops(bundle))


def aligned_digest(aligned: np.ndarray) -> str:
    """A short digest of the aligned face's pixels (and shape): what names its PNG."""
    a = np.ascontiguousarray(aligned, np.uint8)
    return hashlib.sha256(repr(a.shape).encode() + a.tobytes()).hexdigest()[:16]


def _bundled_face(storage: Storage, sha256: str) -> np.ndarray | None:
    """The aligned face in the crops object of ``sha256``; None when there is no such object or it holds none."""
    bundle = storage.get_if_present(crops_key(sha256))
    return None if bundle is None else decode_crops(bundle).get(ALIGNED_FACE)


def aligned_face(storage: Storage, sha256: str, png_key: str) -> np.ndarray:
    """The aligned face (``CANVAS x CANVAS x 3``) of the original ``sha256``: from its crops object, or, for a face
    aligned before the crops object held it, decoded from its PNG (``png_key``).

    Raises:
        S3Error: when neither is stored (``NoSuchKey``).
    """
    face = _bundled_face(storage, sha256)
    return face if face is not None else decode_stored(storage.get(png_key))


def aligned_face_png(storage: Storage, sha256: str, png_key: str) -> bytes | None:
    """The aligned face's PNG under ``png_key`` (the face row's): read when it was made before, otherwise made
    (:func:`_make_png`). None when there is nothing to show."""
    png = storage.get_if_present(png_key)
    return png if png is not None else _make_png(storage, sha256, png_key)


def ensure_aligned_png(storage: Storage, sha256: str, png_key: str) -> bool:
    """Whether the aligned face's PNG is stored under ``png_key``, made first when it is not (a presigned URL of
    it is to be handed out: its bytes are not read)."""
    return storage.exists(png_key) or _make_png(storage, sha256, png_key) is not None


def _make_png(storage: Storage, sha256: str, png_key: str) -> bytes | None:
    """The aligned face's PNG encoded from the crops object and stored under ``png_key`` (the first view; two first
    views at once write the same bytes). None when there is nothing to show: no aligned face in the crops object,
    or one of another alignment than the row names (a photo being aligned again)."""
    try:
        face = _bundled_face(storage, sha256)
    except ValueError:  # a damaged crops object: nothing to show until the photo is aligned again
        return None
    if face is None or aligned_png_key(sha256, aligned_digest(face)) != png_key:
        return None
    png = encode_png(face)
    storage.put(png_key, png, "image/png")
    return png


def crop_keys(session: Session, image_ids: Iterable[int]) -> dict[int, dict[str, str]]:
    """The object key of each stored crop, by photo and crop name (region, or the identity chip)."""
    keys: dict[int, dict[str, str]] = {}
    for image_id, name, key in session.execute(
            select(Face.image_id, Crop.region, Crop.object_key).join(Crop, Crop.face_id == Face.id)
            .where(Face.image_id.in_(list(image_ids)))):
        keys.setdefault(image_id, {})[name] = key
    return keys


def load_crops(storage: Storage, keys: dict[str, str], names: Iterable[str]) -> dict[str, np.ndarray]:
    """The named crops of one face (``keys``: one photo's entry of :func:`crop_keys`), each object read once:
    the region crops grayscale (H x W), the identity chip and the region cuts RGB (H x W x 3)."""
    bundles: dict[str, dict[str, np.ndarray]] = {}
    out = {}
    for name in names:
        key = keys[name]
        if key.endswith(".npz"):
            if key not in bundles:
                bundles[key] = decode_crops(storage.get(key))
            if name not in bundles[key]:
                raise ValueError(f"the stored crops {key} hold no {name}")
            out[name] = bundles[key][name]
        else:  # one PNG per crop, from before the crops were bundled
            data = storage.get(key)
            out[name] = decode_png_rgb(data) if name == CHIP_REGION or name.startswith(CUT_PREFIX) \
                else decode_png_gray(data)
    return out


def region_stack(storage: Storage, keys: dict[str, str], regions: Iterable[str]) -> np.ndarray:
    """One face's region crops stacked in ``regions``' order (R x H x W), as the regional networks read them."""
    regions = list(regions)
    crops = load_crops(storage, keys, regions)
    return np.stack([crops[r] for r in regions])
