"""The training data: every photo decoded, aligned and cropped as the worker does an upload
(:func:`prepare`), its fingerprint, and the photos it skipped with their reasons."""
from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field

import cv2
import numpy as np
from tqdm import tqdm

from shared.ml.preprocess.cache import CachedFace, CachedRejection, PrepCache
from shared.ml.preprocess.imaging import ImageRejected, decode_upload
from shared.ml.preprocess.jpeg import MAX_SCANS
from shared.ml.preprocess.pipeline import Preprocessor
from shared.ml.preprocess.quality import reason_kind
from shared.ml.preprocess.regions import DEFAULT_REGIONS
from shared.ml.train.data import Sample

logger = logging.getLogger(__name__)


@dataclass
class PreparedData:
    crops: np.ndarray  # N x R x 100 x 100 uint8
    labels: np.ndarray  # N int64
    samples: list[Sample]
    rejected: list[tuple[Sample, str]] = field(default_factory=list)
    aligned: np.ndarray | None = None  # N x 200 x 200 uint8 aligned grayscale faces (keep_aligned=True)
    landmarks: np.ndarray | None = None  # N x L x 2 landmarks on the aligned canvas (keep_aligned=True)
    chips: np.ndarray | None = None  # N x 150 x 150 x 3 uint8 face chips, the identity encoder's input
    cuts: np.ndarray | None = None  # N x 4 x 150 x 150 x 3 uint8: the paper's regions cut at the encoder's size
    regions: tuple[str, ...] = ()  # the order of the regions in ``crops``
    # What the encoder gives, by name ("identity": the chip's identity descriptor, N x 128; a region: its cut's stage
    # features, N x 256), computed once by shared.ml.train.members.describe and kept here.
    descriptors: dict[str, np.ndarray] = field(default_factory=dict)

    def stored_crops(self, index=slice(None)) -> dict[str, np.ndarray]:
        """The photos' crops by the names the workers store them under (what a model's members read)."""
        from shared.ml.members.identity import CHIP_REGION
        from shared.ml.preprocess.regions import DEFAULT_REGIONS, cut_name

        out = {r: self.crops[index, i] for i, r in enumerate(self.regions)}
        if self.chips is not None:
            out[CHIP_REGION] = self.chips[index]
        if self.cuts is not None:
            out.update({cut_name(r): self.cuts[index, i] for i, r in enumerate(DEFAULT_REGIONS)})
        return out


def prepare(samples: list[Sample], class_names: list[str], preprocessor: Preprocessor,
            max_bytes: int = 50 * 2**20, max_pixels: float = 4e7, progress: bool = True,
            keep_aligned: bool = False, cache: PrepCache | None = None, max_scans: int = MAX_SCANS) -> PreparedData:
    """Decode, detect, align and crop every sample, as the worker does for an upload.

    With ``cache``, a photo preprocessed before with the same setup (backends, regions, threshold) is
    read from it instead: neither decoding nor the detector runs. Faces found and photos rejected by
    the preprocessor are both cached; photos the decoder refuses are not (cheap, and limit-dependent).
    ``max_pixels`` and ``max_scans`` bound each decode as in the workers (:func:`decode_upload`).

    Raises:
        ValueError: when a sample's label is not in ``class_names`` (all unknown labels are listed).
    """
    index = {name: i for i, name in enumerate(class_names)}
    unknown = sorted({s.label for s in samples} - set(index))
    if unknown:
        raise ValueError(f"{len(unknown)} unknown label(s): {', '.join(unknown[:20])}")
    crops, labels, kept, rejected, aligned, landmarks, chips, cuts = [], [], [], [], [], [], [], []
    for s in tqdm(samples, desc="preprocess", unit="img", disable=not progress):
        raw = s.path.read_bytes()
        entry = None
        if cache is not None:
            digest = hashlib.sha256(raw).hexdigest()
            entry = cache.get(digest)
        if entry is None:
            try:
                decoded = decode_upload(raw, max_bytes=max_bytes, max_pixels=max_pixels, min_side=32,
                                        max_scans=max_scans)
            except ImageRejected as exc:
                rejected.append((s, exc.reason))
                continue
            try:
                result = preprocessor.run(decoded.rgb)
            except ImageRejected as exc:
                entry = CachedRejection(exc.reason)
            else:
                entry = _entry(result.aligned, preprocessor.regions)
            if cache is not None:
                cache.put(digest, entry)
        if isinstance(entry, CachedRejection):
            rejected.append((s, entry.reason))
            continue
        crops.append(entry.crops)
        chips.append(entry.chip)
        cuts.append(entry.cuts)
        labels.append(index[s.label])
        kept.append(s)
        if keep_aligned:
            aligned.append(entry.aligned)
            landmarks.append(entry.landmarks)
    if cache is not None:
        logger.info("preprocessing cache %s: %d read, %d computed", cache.root, cache.hits, cache.misses)
    if not crops:
        raise ValueError("no usable face in the data")
    return PreparedData(np.stack(crops), np.asarray(labels, np.int64), kept, rejected,
                        np.stack(aligned) if keep_aligned else None, np.stack(landmarks) if keep_aligned else None,
                        np.stack(chips), np.stack(cuts), tuple(preprocessor.regions))


def _entry(aligned, regions: tuple[str, ...]) -> CachedFace:
    """What the preprocessing cache keeps of an aligned face (and training reads)."""
    return CachedFace(np.stack([aligned.crops[r] for r in regions]),
                      cv2.cvtColor(aligned.aligned_rgb, cv2.COLOR_RGB2GRAY),
                      aligned.alignment.apply(aligned.landmarks).astype(np.float32), aligned.chip,
                      np.stack([aligned.cuts[r] for r in DEFAULT_REGIONS]))


def data_hash(samples: list[Sample]) -> str:
    """A short fingerprint of the training set (paths, labels, subjects)."""
    h = hashlib.sha256()
    for s in samples:
        h.update(f"{s.label}\0{s.subject}\0{s.path.name}\n".encode())
    return h.hexdigest()[:16]


def skipped_summary(rejected: list[tuple[Sample, str]]) -> list[tuple[str, int]]:
    """(reason, count) of skipped photos, the most frequent first."""
    from collections import Counter

    return Counter(reason_kind(r) for _, r in rejected).most_common()


def write_skipped(rejected: list[tuple[Sample, str]], path) -> None:
    """Every skipped photo with its reason: a CSV of image, subject, label, reason."""
    import csv
    from pathlib import Path

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["image", "subject", "label", "reason"])
        for sample, reason in rejected:
            w.writerow([str(sample.path), sample.subject, sample.label, reason])
