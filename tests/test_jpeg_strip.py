"""An upright JPEG upload is stored without its metadata and with its exact pixels (shared.ml.preprocess.jpeg).

Every kind of segment that carries metadata goes in, each with a marker string; none of the
strings may come out, the pixels must be the upload's, and any file the walker does not fully
understand must fall back to a fresh encode that is just as clean.
"""
from __future__ import annotations

import io
import random

import numpy as np
import pytest
from PIL import Image
from skimage import data

from shared.ml.preprocess.imaging import ImageRejected, decode_upload
from shared.ml.preprocess.jpeg import CLEAN_JFIF, strip_metadata

LIMITS = {"max_bytes": 20 * 2**20, "max_pixels": 40e6, "min_side": 64}
SECRET = b"PHI-MARKER"


def _segment(marker: int, body: bytes) -> bytes:
    return bytes([0xFF, marker]) + (len(body) + 2).to_bytes(2, "big") + body


def _jpeg(mode: str = "RGB", **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(data.astronaut()[:300, :260]).convert(mode).save(buf, format="JPEG", quality=88, **kw)
    return buf.getvalue()


def _with_metadata(jpeg: bytes) -> bytes:
    """The JPEG with EXIF (GPS, camera serial), XMP, ICC, IPTC, a JFIF thumbnail extension and a comment
    after its JFIF header, a comment between its tables, and a phone's trailer after the end of the image."""
    exif = Image.Exif()
    exif[0x8825] = {1: "N", 2: (52.0, 12.0, 0.0)}
    exif[0xA431] = SECRET.decode() + "-serial"
    raw = exif.tobytes()
    segments = [
        _segment(0xE1, raw if raw.startswith(b"Exif\x00\x00") else b"Exif\x00\x00" + raw),
        _segment(0xE1, b"http://ns.adobe.com/xap/1.0/\x00<x:xmpmeta>" + SECRET + b"-xmp</x:xmpmeta>"),
        _segment(0xE2, b"ICC_PROFILE\x00\x01\x01" + SECRET + b"-icc" + bytes(64)),
        _segment(0xED, b"Photoshop 3.0\x00" + SECRET + b"-iptc"),
        _segment(0xE0, b"JFXX\x00\x13" + SECRET + b"-thumb"),
        _segment(0xFE, SECRET + b"-comment"),
    ]
    soi_jfif = 2 + 2 + int.from_bytes(jpeg[4:6], "big")  # SOI, then Pillow's JFIF segment
    body = jpeg[soi_jfif:]
    tables_end = body.index(b"\xff\xc0") if b"\xff\xc0" in body else body.index(b"\xff\xc2")
    body = body[:tables_end] + _segment(0xFE, SECRET + b"-late-comment") + body[tables_end:]
    return jpeg[:soi_jfif] + b"".join(segments) + body + b"MPF\x00" + SECRET + b"-trailer"


def _pixels(blob: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(blob)))


@pytest.mark.parametrize("mode,kw", [("RGB", {}), ("RGB", {"progressive": True}), ("L", {}),
                                     ("RGB", {"subsampling": 0})])
def test_metadata_goes_and_the_pixels_stay(mode, kw):
    clean = _jpeg(mode, **kw)
    upload = _with_metadata(clean)
    assert upload.count(SECRET) == 8
    decoded = decode_upload(upload, **LIMITS)
    assert SECRET not in decoded.data
    assert np.array_equal(_pixels(decoded.data), _pixels(upload))  # the same compressed data: no new loss
    stored = Image.open(io.BytesIO(decoded.data))
    assert stored.applist == [("APP0", CLEAN_JFIF[4:])]
    assert not stored.getexif() and "comment" not in stored.info and "icc_profile" not in stored.info
    assert decoded.data == strip_metadata(clean)  # the same photo without metadata stores the same bytes
    assert decoded.content_type == "image/jpeg" and decoded.rgb.shape == (300, 260, 3)


def test_rotated_and_adobe_jpegs_are_encoded_afresh():
    exif = Image.Exif()
    exif[0x0112] = 6
    exif[0xA431] = SECRET.decode()
    rotated = decode_upload(_jpeg(exif=exif, comment=SECRET + b"-comment"), **LIMITS)
    assert (rotated.width, rotated.height) == (300, 260) and SECRET not in rotated.data
    assert not Image.open(io.BytesIO(rotated.data)).info.keys() - {"jfif", "jfif_version", "jfif_unit",
                                                                     "jfif_density"}
    # Adobe's segment says how to read the colour channels: dropping it could change the colours.
    adobe = Image.open(io.BytesIO(_jpeg("CMYK")))
    assert "adobe" in adobe.info
    cmyk = decode_upload(_jpeg("CMYK"), **LIMITS)
    assert Image.open(io.BytesIO(cmyk.data)).mode == "RGB" and "adobe" not in Image.open(io.BytesIO(cmyk.data)).info


def test_files_the_walker_does_not_understand_are_left_to_the_encoder():
    good = _with_metadata(_jpeg())
    eoi = good.rindex(b"\xff\xd9")
    assert strip_metadata(good[:eoi]) is None  # no end of image
    assert strip_metadata(good[:100]) is None  # a segment runs past the end
    assert strip_metadata(b"\xff\xd8\xff\xd0" + good[2:]) is None  # a restart marker outside a scan
    assert strip_metadata(b"GIF89a" + good) is None
    assert strip_metadata(b"\xff\xd8\xff\xe1\x00\x01" + good[2:]) is None  # a length shorter than itself
    # A table segment stretched over the comment that follows it would carry the comment along.
    dqt = good.index(b"\xff\xdb")
    length = int.from_bytes(good[dqt + 2:dqt + 4], "big")
    stretched = good[:dqt] + _segment(0xDB, good[dqt + 4:dqt + 2 + length] + _segment(0xFE, SECRET)) + \
        good[dqt + 2 + length:]
    assert strip_metadata(stretched) is None
    arithmetic = good.replace(b"\xff\xc0", b"\xff\xc9", 1)
    assert strip_metadata(arithmetic) is None


def test_mutated_uploads_never_store_metadata():
    """Bytes flipped anywhere in a metadata-laden upload: each one is refused or stored clean."""
    upload = _with_metadata(_jpeg())
    rng = random.Random(18)
    stored = kept_data = 0
    for _ in range(150):
        blob = bytearray(upload)
        for _ in range(rng.randint(1, 4)):
            at = rng.randrange(len(blob))
            blob[at] = rng.choice([0xFF, 0x00, 0xD9, 0xE1, 0xFE, 0xDA, rng.randrange(256)])
        try:
            decoded = decode_upload(bytes(blob), **LIMITS)
        except ImageRejected:
            continue
        stored += 1
        kept_data += decoded.data == strip_metadata(bytes(blob))
        assert SECRET not in decoded.data
        out = Image.open(io.BytesIO(decoded.data))
        assert all(m == "APP0" and body == CLEAN_JFIF[4:] for m, body in out.applist)
        assert not out.getexif() and "comment" not in out.info
    print(f"{stored} of 150 mutated uploads stored, {kept_data} of them with their own compressed data")
    assert stored > 50 and kept_data > 10


@pytest.mark.parametrize("fmt", ["WEBP", "TIFF"])
def test_other_formats_are_stored_as_png_without_their_profile(fmt):
    buf = io.BytesIO()
    Image.fromarray(data.astronaut()[:200, :200]).save(buf, format=fmt, icc_profile=SECRET * 20)
    decoded = decode_upload(buf.getvalue(), **LIMITS)
    assert decoded.content_type == "image/png" and SECRET not in decoded.data
    assert not Image.open(io.BytesIO(decoded.data)).info


def test_checking_without_pixels_stores_the_same_bytes_and_refuses_the_same_files():
    """The portal only stores photos (``pixels=False``): a JPEG kept as its own data is decoded small."""
    upload = _with_metadata(_jpeg())
    full, checked = decode_upload(upload, **LIMITS), decode_upload(upload, **LIMITS, pixels=False)
    assert checked.data == full.data and checked.sha256 == full.sha256
    assert checked.image is None and (checked.width, checked.height) == (full.width, full.height) == (260, 300)
    assert np.array_equal(checked.rgb, full.rgb)
    eoi = upload.rindex(b"\xff\xd9")
    for damaged in (upload[: eoi // 2], upload[: eoi - 4000]):
        with pytest.raises(ImageRejected):
            decode_upload(damaged, **LIMITS)
        with pytest.raises(ImageRejected):
            decode_upload(damaged, **LIMITS, pixels=False)
    exif = Image.Exif()
    exif[0x0112] = 6
    rotated = decode_upload(_jpeg(exif=exif), **LIMITS, pixels=False)  # encoded afresh: decoded whole
    assert rotated.image is not None and rotated.image.size == (300, 260) == (rotated.width, rotated.height)
    for rows, cols in ((60, 200), (5, 5)):  # too small, also below the eighth the check decodes at
        small = io.BytesIO()
        Image.fromarray(data.astronaut()[:rows, :cols]).save(small, format="JPEG")
        with pytest.raises(ImageRejected, match="at least 64 pixels"):
            decode_upload(small.getvalue(), **LIMITS, pixels=False)


def _scan_end_reference(data: bytes, i: int) -> int:
    """The end of entropy-coded data byte by byte: the last 0xFF of the first fill run followed by a marker."""
    while True:
        i = data.find(b"\xff", i)
        if i < 0:
            return -1
        j = i
        while j < len(data) and data[j] == 0xFF:
            j += 1
        if j == len(data):
            return -1
        if data[j] != 0 and not 0xD0 <= data[j] <= 0xD7:
            return j - 1
        i = j + 1


def test_scan_end_finds_the_marker_after_stuffing_restarts_and_fill():
    from shared.ml.preprocess.jpeg import _scan_end

    rng = random.Random(7)
    for _ in range(5000):
        blob = bytes(rng.choice((0xFF, 0x00, 0xD0, 0xD7, 0xD9, 0x12, 0xC4)) for _ in range(rng.randint(0, 24)))
        start = rng.randint(0, len(blob))
        assert _scan_end(blob, start) == _scan_end_reference(blob, start), (blob, start)


def test_scan_end_is_linear_on_long_fill_runs():
    """A long run of 0xFF that no marker ends had made the search quadratic (seconds for 20 kB)."""
    import time

    from shared.ml.preprocess.jpeg import _scan_end

    start = time.process_time()
    assert _scan_end(b"\xff" * 2_000_000 + b"\x00", 0) == -1
    assert _scan_end(b"\xff\x00" * 1_000_000 + b"\xff\xd9", 0) == 2_000_000
    assert time.process_time() - start < 2.0
