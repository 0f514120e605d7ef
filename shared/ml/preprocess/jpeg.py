"""Dropping a JPEG's metadata without decoding it again: the stored photo keeps its exact pixels.

An upright JPEG upload is stored as its own compressed data with every application segment
(APP0-APP15: EXIF with GPS and camera serials, XMP, ICC, Photoshop/IPTC, MPF, JFIF thumbnails)
and every comment removed, and nothing after the end-of-image marker (where phones append
extra images and vendor trailers). The quantisation and Huffman tables, frame, restart
intervals and scans are copied byte for byte, so the photo decodes to the same pixels as the
upload, with no second generation of JPEG loss. A minimal JFIF header (no thumbnail) is written
back when the upload had one, so decoders read the colour space as before.

Anything unexpected returns None, and the caller re-encodes the decoded photo instead: a marker
structure this walker does not fully understand, a frame type other than Huffman baseline,
extended or progressive, or a kept segment (tables, frame, scan header, restart interval) whose
length is not exactly what its content says. A file is never stored as it came.
"""
from __future__ import annotations

SOI, EOI, SOS = 0xD8, 0xD9, 0xDA
APP0, APP15, COM = 0xE0, 0xEF, 0xFE
DQT, DHT, DRI = 0xDB, 0xC4, 0xDD
# Baseline, extended and progressive Huffman frames: what cameras and phones write. Other frames (lossless,
# arithmetic, hierarchical) and their segments are left to the encoder.
FRAMES = (0xC0, 0xC1, 0xC2)
# Markers without a length: restarts (only inside scans), TEM.
_STANDALONE = {0x01, *range(0xD0, 0xD8)}
# JFIF 1.01, aspect ratio 1:1, no thumbnail.
CLEAN_JFIF = b"\xff\xe0\x00\x10JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00"


def _scan_end(data: bytes, i: int) -> int:
    """Where the entropy-coded data that starts at ``i`` ends: the next marker that is not a stuffed
    zero byte, a restart marker or fill; -1 when the file ends first."""
    while True:
        i = data.find(b"\xff", i)
        if i < 0 or i + 1 >= len(data):
            return -1
        following = data[i + 1]
        if following == 0x00 or 0xD0 <= following <= 0xD7:
            i += 2
        elif following == 0xFF:  # fill bytes before a marker
            i += 1
        else:
            return i


def _accounted_for(marker: int, body: bytes) -> bool:
    """Whether a kept segment's length is exactly what its own content says: no byte in it is left over
    (a segment whose length was stretched over a metadata segment would carry that segment along)."""
    if marker == DQT:
        i = 0
        while i < len(body):
            i += 1 + 64 * (2 if body[i] >> 4 else 1)
        return i == len(body)
    if marker == DHT:
        i = 0
        while i + 17 <= len(body):
            i += 17 + sum(body[i + 1:i + 17])
        return i == len(body)
    if marker in FRAMES:
        return len(body) >= 6 and len(body) == 6 + 3 * body[5]
    if marker == SOS:
        return len(body) >= 1 and len(body) == 4 + 2 * body[0]
    return marker == DRI and len(body) == 2


def strip_metadata(data: bytes) -> bytes | None:
    """The JPEG without application segments, comments or trailing data; None when its structure is not
    plain (no SOI, a truncated or malformed segment, a standalone marker outside a scan, no EOI)."""
    if data[:2] != b"\xff\xd8":
        return None
    out, jfif, i, n = [], False, 2, len(data)
    while i + 1 < n:
        if data[i] != 0xFF:
            return None
        while i < n and data[i] == 0xFF:  # fill bytes
            i += 1
        marker = data[i] if i < n else None
        if marker == EOI:
            return b"\xff\xd8" + (CLEAN_JFIF if jfif else b"") + b"".join(out) + b"\xff\xd9"
        if marker is None or marker in _STANDALONE or marker == SOI or marker == 0x00 or i + 3 > n:
            return None
        length = int.from_bytes(data[i + 1:i + 3], "big")
        end = i + 1 + length
        if length < 2 or end > n:
            return None
        if APP0 <= marker <= APP15 or marker == COM:
            jfif = jfif or (marker == APP0 and data[i + 3:i + 8] == b"JFIF\x00")
        elif _accounted_for(marker, data[i + 3:end]):
            out.append(b"\xff" + data[i:end])
        else:
            return None
        i = end
        if marker == SOS:
            stop = _scan_end(data, i)
            if stop < 0:
                return None
            out.append(data[i:stop])
            i = stop
    return None
