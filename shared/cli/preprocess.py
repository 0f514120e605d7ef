"""``gestalt preprocess``: the workers' preprocessing on files, with what each step saw."""
from __future__ import annotations

from pathlib import Path

import click

from shared.config import get_settings
from shared.ml.preprocess.backends import DETECTORS, LANDMARKERS


@click.command("preprocess")
@click.argument("images", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="One folder per photo is written here.")
@click.option("--detector", type=click.Choice(["auto", *DETECTORS]), default=None,
              help="Default: GESTALT_DETECTOR.")
@click.option("--landmarker", type=click.Choice(["auto", *LANDMARKERS]), default=None,
              help="Default: GESTALT_LANDMARKER.")
@click.option("--batch-size", type=int, default=8, show_default=True)
def preprocess_cmd(images: tuple[Path, ...], out_dir: Path, detector: str | None, landmarker: str | None,
                   batch_size: int) -> None:
    """Detect, check, align and crop photos as the workers do; write what each step saw.

    Per photo: aligned.png, crops/<region>.png, landmarks.png (the 68 points and the box on
    the photo) and result.json (box, rotation, landmarks, quality, measurements, backends
    and weight hashes, or the rejection reason).
    """
    settings = get_settings()
    pre = _preprocessor(settings, detector, landmarker)
    rejected = 0
    used: set[str] = set()
    for start in range(0, len(images), batch_size):
        paths = images[start:start + batch_size]
        decoded, outcome = _run_batch(pre, paths, settings)
        for i, path in enumerate(paths):
            name = path.stem if path.stem not in used else f"{path.parent.name}-{path.stem}-{start + i}"
            used.add(name)
            if not _write_outcome(out_dir / name, path, outcome[i], decoded.get(i), pre.provenance):
                rejected += 1
    click.echo(f"{len(images) - rejected} aligned, {rejected} rejected -> {out_dir}")


def _preprocessor(settings, detector: str | None, landmarker: str | None):
    """The workers' Preprocessor with every region, the chosen backends or the settings' ones."""
    from shared.ml.formats.weights import WeightsMissing
    from shared.ml.preprocess.pipeline import Preprocessor
    from shared.ml.preprocess.regions import ALL_REGIONS

    try:
        return Preprocessor(settings.min_face_confidence, ALL_REGIONS, detector or settings.detector_backend,
                            landmarker or settings.landmark_backend, verify_weights=settings.weights_verify)
    except (WeightsMissing, ValueError) as exc:
        raise click.ClickException(str(exc)) from exc


def _run_batch(pre, paths: tuple[Path, ...], settings) -> tuple[dict[int, object], dict[int, object]]:
    """Decode ``paths`` as uploads and preprocess the decodable ones in one batch.

    Returns (decoded RGB arrays, outcome) by index in ``paths``: a preprocessing result, or the
    ImageRejected of the upload check or of a step."""
    from shared.ml.preprocess.imaging import ImageRejected, decode_upload

    decoded: dict[int, object] = {}
    outcome: dict[int, object] = {}
    for i, path in enumerate(paths):
        try:
            decoded[i] = decode_upload(path.read_bytes(), max_bytes=settings.max_upload_bytes,
                                       max_pixels=settings.max_image_megapixels * 1e6,
                                       min_side=settings.min_image_side, max_scans=settings.max_jpeg_scans).rgb
        except ImageRejected as exc:
            outcome[i] = exc
    keys = sorted(decoded)
    for i, result in zip(keys, pre.run_batch([decoded[i] for i in keys]), strict=True):
        outcome[i] = result
    return decoded, outcome


def _write_outcome(target: Path, path: Path, result, rgb, provenance: dict) -> bool:
    """Write one photo's folder ``target`` and echo a line; False when the photo was rejected."""
    import json

    from shared.ml.preprocess.imaging import ImageRejected

    target.mkdir(parents=True, exist_ok=True)
    record: dict = {"image": str(path), **provenance}
    accepted = not isinstance(result, ImageRejected)
    if accepted:
        record.update(_write_aligned(target, result, rgb))
        a = result.aligned
        click.echo(f"{path}: face {result.face.score:.2f}, rotation {result.detection.rotation:.0f}, "
                   f"canthal index {a.measurements['canthal_index']:.1f}")
    else:
        record["rejected"] = result.reason
        click.echo(f"{path}: rejected: {result.reason}")
    (target / "result.json").write_text(json.dumps(record, indent=2))
    return accepted


def _write_aligned(target: Path, result, rgb) -> dict:
    """aligned.png, crops/<region>.png and landmarks.png of an aligned face; returns what result.json records."""
    import numpy as np

    from shared.ml.preprocess.imaging import encode_png
    from shared.ml.preprocess.landmarks import draw_landmarks
    from shared.ml.preprocess.pipeline import Frame

    a = result.aligned
    frame = Frame.turned(rgb.shape, result.detection.rotation)
    corners = frame.to_photo(np.array(result.face.box).reshape(2, 2))
    record = dict(box=[round(float(c), 2) for c in result.face.box], rotation=result.detection.rotation,
                  score=round(result.face.score, 4), faces_found=result.faces_found,
                  landmarks=np.round(a.landmarks, 2).tolist(), transform=a.alignment.matrix.tolist(),
                  quality=a.quality, measurements=a.measurements)
    (target / "crops").mkdir(exist_ok=True)
    (target / "aligned.png").write_bytes(encode_png(a.aligned_rgb))
    for region, crop in a.crops.items():
        (target / "crops" / f"{region}.png").write_bytes(encode_png(crop))
    box = None if result.detection.rotation else tuple(corners.ravel())
    (target / "landmarks.png").write_bytes(encode_png(draw_landmarks(rgb, a.landmarks, box)))
    return record
