"""A PNG's chunks, walked without decoding: the checks before any decoder runs, and metadata dropped in place.

A PNG is a signature and a list of chunks (length, type, data, CRC). :func:`layout` reads them all,
checks every CRC and refuses what would make a decoder slow or a photo ambiguous before any pixel is
inflated: more chunks than a real file has, oversized text or ICC chunks (a decoder inflates them),
an animation (APNG's ``acTL``), a truncated or damaged file.

:func:`strip_ancillary` keeps only what the pixels need (``IHDR``, ``PLTE``, ``IDAT``, ``IEND``), byte for
byte: text (``tEXt``, ``zTXt``, ``iTXt``: comments, XMP), ``eXIf``, ``iCCP`` and every other ancillary
chunk are dropped, so the stored photo decodes to the same pixels as the upload without a decode and a
fresh encode. Only plain 8-bit photos without transparency are stripped this way, and only when nothing
in them turns the photo (an EXIF orientation, which Pillow also reads from XMP and from ImageMagick's raw
EXIF text); anything else returns None and the caller decodes and encodes it afresh.
"""
from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass, field

SIGNATURE = b"\x89PNG\r\n\x1a\n"
CRITICAL = (b"IHDR", b"PLTE", b"IDAT", b"IEND")
TEXT = (b"tEXt", b"zTXt", b"iTXt")
ANIMATION = (b"acTL", b"fcTL", b"fdAT")
# The bit depths each colour type allows (PNG specification, table 11.1).
DEPTHS = {0: (1, 2, 4, 8, 16), 2: (8, 16), 3: (1, 2, 4, 8), 4: (8, 16), 6: (8, 16)}
# Chunks per file: a 20 MB photo written in 8 KB IDAT chunks (libpng's default) has about 2,600.
MAX_CHUNKS = 20_000
# Bytes of one text or ICC chunk (decoders inflate them; ICC profiles are tens of kilobytes).
MAX_METADATA_CHUNK = 1 << 20
# Text chunks per file.
MAX_TEXT_CHUNKS = 256
# Text keywords from which Pillow reads an orientation (besides eXIf): such a photo is decoded and turned.
ORIENTING_TEXT = (b"Raw profile type exif", b"Raw profile type APP1", b"XML:com.adobe.xmp")


class PngRefused(ValueError):
    """The PNG is refused before decoding; the message is written for a clinician."""

    def __init__(self, reason: str, http_status: int = 400):
        super().__init__(reason)
        self.reason = reason
        self.http_status = http_status


@dataclass
class PngLayout:
    width: int
    height: int
    bit_depth: int
    colour_type: int
    chunks: list[tuple[bytes, int, int]] = field(default_factory=list)  # (type, start, end) of each chunk
    orienting: bool = False  # eXIf, or a text chunk Pillow reads an orientation from
    transparency: bool = False  # tRNS

    @property
    def plain(self) -> bool:
        """8-bit grey or RGB, or a palette, without transparency and without anything that turns the photo."""
        plain_type = (self.colour_type in (0, 2) and self.bit_depth == 8) or \
            (self.colour_type == 3 and self.bit_depth in (1, 2, 4, 8))
        return plain_type and not self.transparency and not self.orienting


def layout(data: bytes) -> PngLayout:
    """Every chunk of the PNG, checked (see the module's docstring).

    Raises:
        PngRefused: a truncated or damaged file (400), an animation (415), too many chunks or too much text (413).
    """
    if not data.startswith(SIGNATURE):
        raise PngRefused("the file is not a PNG")
    i, n, found, texts = len(SIGNATURE), len(data), None, 0
    while True:
        if i + 12 > n:
            raise PngRefused("the image file is damaged or truncated (the PNG ends before its IEND chunk)")
        length, kind = struct.unpack(">I4s", data[i:i + 8])
        end = i + 12 + length
        if end > n or zlib.crc32(data[i + 4:end - 4]) != int.from_bytes(data[end - 4:end], "big"):
            raise PngRefused(f"the image file is damaged or truncated (its {kind.decode('latin-1')!r} chunk)")
        if found is None:
            if kind != b"IHDR" or length != 13:
                raise PngRefused("the image file is damaged (a PNG starts with its IHDR chunk)")
            width, height, depth, colour, compression, filtering, interlace = struct.unpack(">IIBBBBB",
                                                                                           data[i + 8:i + 21])
            if depth not in DEPTHS.get(colour, ()) or compression or filtering or interlace > 1:
                raise PngRefused("the image file is damaged (its PNG header is not one a PNG can have)")
            found = PngLayout(width, height, depth, colour)
        found.chunks.append((kind, i, end))
        if len(found.chunks) > MAX_CHUNKS:
            raise PngRefused(f"the PNG has more than {MAX_CHUNKS:,} chunks; save the photo again", 413)
        if kind in ANIMATION:
            raise PngRefused("animated or multi-page images are not supported; upload a single photo", 415)
        if kind in TEXT or kind == b"iCCP":
            texts += kind in TEXT
            if length > MAX_METADATA_CHUNK or texts > MAX_TEXT_CHUNKS:
                raise PngRefused(f"the PNG carries more text or colour-profile data than a photo does (a "
                                 f"{length:,}-byte {kind.decode()} chunk, {texts} text chunks); save it again", 413)
            found.orienting |= kind in TEXT and data[i + 8:end - 4].split(b"\x00", 1)[0] in ORIENTING_TEXT
        found.orienting |= kind == b"eXIf"
        found.transparency |= kind == b"tRNS"
        i = end
        if kind == b"IEND":
            return found


def strip_ancillary(data: bytes, found: PngLayout) -> bytes | None:
    """The PNG with its critical chunks only (signature, IHDR, PLTE, IDAT..., IEND, byte for byte); None when the
    photo is not :attr:`PngLayout.plain` and must be decoded and encoded afresh instead."""
    if not found.plain:
        return None
    return SIGNATURE + b"".join(data[start:end] for kind, start, end in found.chunks if kind in CRITICAL)
