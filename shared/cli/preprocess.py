"""``gestalt preprocess``: the workers' preprocessing on files, with what each step saw."""
from __future__ import annotations

from pathlib import Path

import click

from shared.config import get_settings
from shared.ml.backends import DETECTORS, LANDMARKERS


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
