"""Labelled image sets: folders, manifests and per-file hashes."""
from __future__ import annotations

import csv
import hashlib
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".pgm", ".ppm", ".bmp", ".tif", ".tiff", ".webp"}
MANIFEST_COLUMNS = ("image", "subject", "label")


@dataclass(frozen=True)
class Sample:
    path: Path
    label: str
    subject: str

    @cached_property
    def sha256(self) -> str:
        return hashlib.sha256(self.path.read_bytes()).hexdigest()


def scan_folder(root: Path) -> list[Sample]:
    """Samples of ``root/<label>/<subject>/<image>`` or ``root/<label>/<image>``.

    In the flat layout every image counts as its own subject (an identity folder of
    one person, as in face-identification data, cannot be split by subject).
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"training folder {root} does not exist")
    samples = []
    for label_dir in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        for entry in sorted(label_dir.iterdir()):
            if entry.is_dir():
                samples += [Sample(f, label_dir.name, f"{label_dir.name}/{entry.name}")
                            for f in sorted(entry.iterdir()) if f.suffix.lower() in IMAGE_SUFFIXES]
            elif entry.suffix.lower() in IMAGE_SUFFIXES:
                samples.append(Sample(entry, label_dir.name, f"{label_dir.name}/{entry.name}"))
    if not samples:
        raise ValueError(f"no images under {root} (expected {root}/<label>/[<subject>/]<image>)")
    return samples


def load_manifest(path: Path) -> list[Sample]:
    """Samples of a CSV with columns ``image,subject,label``; relative image paths are relative to the CSV.

    UTF-8 with or without a byte-order mark, LF or CRLF line endings; blank lines are skipped.

    Raises:
        ValueError: a missing column, an empty field, or no image listed at all.
        FileNotFoundError: listed images that do not exist.
    """
    path = Path(path)
    with path.open(newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        if reader.fieldnames:
            reader.fieldnames = [f.strip() for f in reader.fieldnames]
        missing = [c for c in MANIFEST_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{path}: missing column(s) {', '.join(missing)}; expected {','.join(MANIFEST_COLUMNS)}")
        samples = []
        for row in reader:
            line = reader.line_num
            row = {k: (v or "").strip() for k, v in row.items() if k is not None}
            if not any(row.values()):
                continue
            if not row["image"] or not row["label"] or not row["subject"]:
                raise ValueError(f"{path}:{line}: image, subject and label must all be set")
            image = Path(row["image"])
            samples.append(Sample(image if image.is_absolute() else path.parent / image, row["label"],
                                  row["subject"]))
    if not samples:
        raise ValueError(f"{path} lists no images (a header only?); expected rows of {','.join(MANIFEST_COLUMNS)}")
    absent = [str(s.path) for s in samples if not s.path.exists()]
    if absent:
        raise FileNotFoundError(f"{len(absent)} image(s) in {path} do not exist, e.g. {absent[:3]}")
    return samples


def load_samples(source: Path) -> list[Sample]:
    """A folder (see :func:`scan_folder`) or a manifest CSV."""
    source = Path(source)
    return load_manifest(source) if source.is_file() else scan_folder(source)


def subjects_known(samples: list[Sample]) -> bool:
    """False when every image is its own subject, as in the flat ``DIR/<label>/<image>`` layout: then a
    validation split cannot keep a person's photos on one side."""
    return len({s.subject for s in samples}) < len(samples) or not all(
        s.subject == f"{s.label}/{s.path.name}" for s in samples)
