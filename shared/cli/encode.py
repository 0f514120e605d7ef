"""``gestalt encode``: the face-identity descriptor of each photo's main face, for research use."""
from __future__ import annotations

from collections import Counter
from pathlib import Path

import click
from rich.console import Console

console = Console(stderr=True)


@click.command("encode")
@click.argument("images", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--out", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="An .npz file: paths, descriptors (N x 128 float32), rejected paths and their reasons.")
@click.option("--batch-size", type=click.IntRange(1, 1024), default=32, show_default=True,
              help="Photos detected and encoded together.")
@click.option("--device", default=None, help="cpu, cuda or auto (default: GESTALT_DEVICE).")
def encode_cmd(images: tuple[Path, ...], out: Path, batch_size: int, device: str | None) -> None:
    """The 128-d identity descriptor (dlib's ResNet face encoder, ported to PyTorch) of each photo's main face:
    detected, given 68 landmarks and cut to dlib's 150x150 face chip as the workers do. Photos with no usable
    face are listed with the reason, never silently dropped."""
    import numpy as np

    from shared.config import get_settings
    from shared.ml.formats.weights import WeightsMissing
    from shared.ml.nets import encoder
    from shared.ml.preprocess.facechip import face_chip
    from shared.ml.preprocess.imaging import ImageRejected, decode_upload
    from shared.ml.preprocess.pipeline import Preprocessor

    settings = get_settings()
    try:
        model = encoder.load_encoder(device or settings.device)
        pre = Preprocessor.from_settings(settings)
    except (WeightsMissing, ValueError) as exc:
        raise click.ClickException(str(exc)) from exc
    kept: list[str] = []
    descriptors: list[np.ndarray] = []
    rejected: list[tuple[str, str]] = []
    for start in range(0, len(images), batch_size):
        paths = images[start:start + batch_size]
        decoded = {}
        for path in paths:
            try:
                decoded[path] = decode_upload(path.read_bytes(), max_bytes=settings.max_upload_bytes,
                                              max_pixels=settings.max_image_megapixels * 1e6,
                                              min_side=settings.min_image_side,
                                              max_scans=settings.max_jpeg_scans).rgb
            except ImageRejected as exc:
                rejected.append((str(path), exc.reason))
        found = list(decoded)
        chips = []
        for path, result in zip(found, pre.run_batch([decoded[p] for p in found]), strict=True):
            if isinstance(result, ImageRejected):
                rejected.append((str(path), result.reason))
            else:
                chips.append(face_chip(decoded[path], result.aligned.landmarks))
                kept.append(str(path))
        if chips:
            descriptors.append(encoder.encode(model, np.stack(chips)))
    pre.close()
    matrix = np.concatenate(descriptors) if descriptors else np.zeros((0, encoder.DESCRIPTOR_DIM), np.float32)
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez(out, paths=np.array(kept, dtype=str), descriptors=matrix.astype(np.float32),
             rejected_paths=np.array([p for p, _ in rejected], dtype=str),
             rejected_reasons=np.array([r for _, r in rejected], dtype=str),
             encoder=np.array(encoder.NAME), detector=np.array(pre.detector_name),
             landmarker=np.array(pre.landmarker_name))
    console.print(f"{len(kept)} descriptor(s) -> {out}; {len(rejected)} photo(s) without a usable face")
    for reason, count in Counter(r for _, r in rejected).most_common():
        console.print(f"  {count} x {reason}")
