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

:func:`layout` walks the same markers without decoding anything, for the checks made before any decoder
runs: the frame's size and how many scans the file holds. A progressive JPEG may legally hold any number
of scans, and a decoder passes over every block of the image for each one, so a file of a few megabytes
made of tens of thousands of tiny scans holds a decoder for minutes (libjpeg-turbo's "Two Issues with
the JPEG Standard"). Cameras and encoders write one scan (baseline) or about ten (progressive).
"""
from __future__ import annotations

import re
import struct
from dataclasses import dataclass

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


# Entropy-coded data up to the next marker: runs of bytes other than 0xFF, and 0xFF (after any fill bytes)
# followed by a stuffed zero or a restart, then the fill before the marker. Matched from the scan's start with
# possessive repeats, so the cost is linear in the data (a search for the marker itself restarted at each 0xFF of
# a long fill run: quadratic) and the bytes between markers are skipped in C (about 9 times faster on photos).
_DATA_UP_TO_MARKER = re.compile(rb"(?:[^\xff]++|\xff++[\x00\xd0-\xd7])*+\xff*+")
# More scans than this are refused by default (GESTALT_MAX_JPEG_SCANS): ten times what encoders write.
MAX_SCANS = 100
# Segments (tables, headers, metadata) besides the scans: a real file has a few dozen, plus the Huffman
# tables an optimising encoder writes before each scan.
MAX_OTHER_SEGMENTS = 1000


def segment_limit(max_scans: int) -> int:
    """The most segments other than scans that a JPEG of at most ``max_scans`` scans may hold."""
    return MAX_OTHER_SEGMENTS + 2 * max_scans


def _scan_end(data: bytes, i: int) -> int:
    """Where the entropy-coded data that starts at ``i`` ends: the last 0xFF before the next marker that is not a
    stuffed zero byte, a restart marker or fill; -1 when the file ends first. One regular-expression search, so a
    scan full of restart markers costs no Python loop."""
    end = _DATA_UP_TO_MARKER.match(data, i).end()
    # Stopped before the end of the file, after fill: at a marker; the last 0xFF is the one before it.
    return end - 1 if i < end < len(data) and data[end - 1] == 0xFF else -1


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


@dataclass(frozen=True)
class JpegLayout:
    """What a JPEG's markers say, read without decoding: the frame's size and type, and how many scans follow."""

    width: int
    height: int
    frame: int  # SOF marker: 0xC0 baseline, 0xC1 extended, 0xC2 progressive, ...
    scans: int
    segments: int  # marker segments other than scans


def layout(data: bytes, max_scans: int = MAX_SCANS) -> JpegLayout | None:
    """The JPEG's frame size, frame type and scan count from a walk of its markers; nothing is decoded.

    The walk is as lenient as libjpeg's reader, so a file cannot hide scans from it that the decoder would then
    read: bytes where a marker should be, stuffed zeros and restart markers outside a scan are skipped as libjpeg
    skips them (each counts as a segment). It stops at ``max_scans + 1`` scans or ``segment_limit(max_scans) + 1``
    other segments, so its cost is bounded whatever the file holds. None when no frame header is found (the
    decoder then says what is wrong)."""
    if data[:2] != b"\xff\xd8":
        return None
    i, n, width, height, frame, scans, segments = 2, len(data), 0, 0, 0, 0, 0
    while scans <= max_scans and segments <= segment_limit(max_scans):
        i = data.find(b"\xff", i)
        while 0 <= i < n and data[i] == 0xFF:
            i += 1
        if i < 0 or i >= n or data[i] == EOI:
            break
        marker, segments = data[i], segments + 1
        length = int.from_bytes(data[i + 1:i + 3], "big")
        if marker in _STANDALONE or marker in (SOI, 0x00) or length < 2:
            i += 1
            continue
        end = i + 1 + length
        if end > n:
            break
        if 0xC0 <= marker <= 0xCF and marker not in (DHT, 0xC8, 0xCC) and length >= 7:
            frame, height, width = marker, *struct.unpack(">HH", data[i + 4:i + 8])
        if marker == SOS:
            scans, segments = scans + 1, segments - 1
            end = _scan_end(data, end)
            if end < 0:
                break
        i = end
    return JpegLayout(width, height, frame, scans, segments) if frame else None
