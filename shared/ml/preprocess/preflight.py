"""The checks every photo passes before any decoder reads it: cheap, and bounded by the file's size.

A decoder's work is not bounded by the bytes it is given: a small file may claim a huge frame, hold
tens of thousands of progressive scans, or millions of chunks. So before a photo is decoded (in the
portal, in the workers, in ``gestalt train``, ``evaluate`` and ``import``) its structure is read without
decoding anything (:func:`inspect`): the frame's size against the megapixel limit, a JPEG's scans
(:func:`shared.ml.preprocess.jpeg.layout`), a PNG's chunks, their CRCs, text and animation chunks
(:func:`shared.ml.preprocess.png.layout`). With those bounded, every decode that follows is bounded too.
"""
from __future__ import annotations

from dataclasses import dataclass

from shared.ml.preprocess import jpeg, png


class ImageRejected(ValueError):
    """A photo that cannot be used, with a reason a clinician can read."""

    def __init__(self, reason: str, http_status: int = 400):
        super().__init__(reason)
        self.reason = reason
        self.http_status = http_status


@dataclass(frozen=True)
class Header:
    """What :func:`inspect` read: the format when it walked the file itself (JPEG, PNG), else None (Pillow's
    header parser decides), and the frame's size (0 x 0 when unknown)."""

    format: str | None
    width: int = 0
    height: int = 0
    png: png.PngLayout | None = None


def inspect(data: bytes, *, max_pixels: float, max_scans: int = jpeg.MAX_SCANS) -> Header:
    """Read a JPEG's markers or a PNG's chunks and refuse, before any decoding, what would make the decode
    unbounded or the photo ambiguous.

    Raises:
        ImageRejected: too many pixels, scans, segments or chunks (413), an animation (415), a damaged PNG (400).
    """
    if data.startswith(png.SIGNATURE):
        try:
            found = png.layout(data)
        except png.PngRefused as exc:
            raise ImageRejected(exc.reason, exc.http_status) from exc
        check_pixels(found.width, found.height, max_pixels)
        return Header("PNG", found.width, found.height, found)
    if data[:3] == b"\xff\xd8\xff":
        found = jpeg.layout(data, max_scans)
        if found is None:
            return Header(None)
        if found.scans > max_scans:
            raise ImageRejected(
                f"the JPEG holds more than {max_scans} scans (progressive passes over the image); cameras and "
                "encoders write about ten, and so many make decoding take minutes: save the photo again as a "
                "normal JPEG", 413)
        if found.segments > jpeg.segment_limit(max_scans):
            raise ImageRejected(f"the JPEG holds more than {jpeg.segment_limit(max_scans):,} marker segments; "
                                "save the photo again as a normal JPEG", 413)
        check_pixels(found.width, found.height, max_pixels)
        return Header("JPEG", found.width, found.height)
    return Header(None)


def check_pixels(width: int, height: int, max_pixels: float) -> None:
    """Refuse a frame larger than ``max_pixels`` (a decompression bomb claims a huge one in a small file)."""
    if width * height > max_pixels:
        raise ImageRejected(f"the image is {width}x{height} pixels; the limit is {max_pixels / 1e6:.0f} megapixels",
                            http_status=413)
