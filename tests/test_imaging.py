"""decode_upload: EXIF orientation applied then dropped, hostile files refused with a reason."""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image
from skimage import data

from shared.ml.preprocess.imaging import ImageRejected, decode_upload

LIMITS = {"max_bytes": 20 * 2**20, "max_pixels": 40e6, "min_side": 64}


def _save(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


def test_exif_orientation_is_applied_then_removed():
    im = Image.fromarray(data.astronaut()[:, :300])  # 512 tall, 300 wide
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW on display
    exif[0x8825] = {1: "N", 2: (52.0, 12.0, 0.0)}
    decoded = decode_upload(_save(im, "JPEG", exif=exif), **LIMITS)
    assert (decoded.width, decoded.height) == (512, 300)
    stored = Image.open(io.BytesIO(decoded.data))
    assert stored.size == (512, 300)
    assert not stored.getexif()
    assert b"Exif" not in decoded.data[:200]


def test_grayscale_16bit_and_palette_become_rgb():
    g16 = Image.fromarray(data.camera().astype(np.uint16) * 256)
    assert decode_upload(_save(g16, "PNG"), **LIMITS).rgb.shape == (512, 512, 3)
    pal = Image.fromarray(data.astronaut()).convert("P")
    assert decode_upload(_save(pal, "PNG"), **LIMITS).rgb.shape == (512, 512, 3)


def test_decompression_bomb_is_refused_before_decoding():
    # A 30000 x 30000 PNG compresses to a few hundred KB.
    bomb = _save(Image.new("L", (30000, 30000)), "PNG")
    with pytest.raises(ImageRejected) as err:
        decode_upload(bomb, **LIMITS)
    assert err.value.http_status == 413 and "megapixels" in err.value.reason


def test_animated_gif_and_svg_are_refused():
    frames = [Image.fromarray(data.astronaut()).convert("P") for _ in range(2)]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:])
    with pytest.raises(ImageRejected) as err:
        decode_upload(buf.getvalue(), **LIMITS)
    assert err.value.http_status == 415
    svg = b'<svg xmlns="http://www.w3.org/2000/svg"><script>alert(1)</script></svg>'
    with pytest.raises(ImageRejected):
        decode_upload(svg, **LIMITS)


def test_tiny_image_is_refused():
    with pytest.raises(ImageRejected, match="at least 64 pixels"):
        decode_upload(_save(Image.new("RGB", (40, 40)), "PNG"), **LIMITS)


def test_bit_flipped_jpeg_is_refused_or_decoded_never_crashes():
    raw = bytearray(_save(Image.fromarray(data.astronaut()), "JPEG"))
    rng = np.random.default_rng(1)
    for _ in range(20):
        corrupt = bytearray(raw)
        for pos in rng.integers(0, len(raw), 30):
            corrupt[pos] ^= 0xFF
        try:
            decode_upload(bytes(corrupt), **LIMITS)
        except ImageRejected as exc:
            assert exc.reason


def test_a_faces_crops_round_trip_as_one_object_and_nothing_else_decodes():
    from shared.ml.preprocess.imaging import decode_crops, encode_crops

    rng = np.random.default_rng(0)
    crops = {"full_face": rng.integers(0, 256, (100, 100), np.uint8),
             "upper_half": rng.integers(0, 256, (100, 100), np.uint8),
             "face_chip": rng.integers(0, 256, (150, 150, 3), np.uint8)}
    back = decode_crops(encode_crops(crops))
    assert set(back) == set(crops)
    for name, crop in crops.items():
        np.testing.assert_array_equal(back[name], crop)
    # Pickled objects are never loaded; other bytes and other arrays are refused.
    pickled = io.BytesIO()
    np.savez(pickled, full_face=np.array([{"x": 1}], dtype=object))
    floats = io.BytesIO()
    np.savez(floats, full_face=np.zeros((100, 100), np.float32))
    for blob in (pickled.getvalue(), floats.getvalue(), b"PK\x03\x04 not a zip", b"\x89PNG\r\n", b""):
        with pytest.raises(ValueError, match="crops could not be decoded"):
            decode_crops(blob)
