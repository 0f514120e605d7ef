"""A corpus of broken and hostile photo files, generated on demand (nothing binary is committed).

``python tests/hostile_corpus.py OUT_DIR`` writes them to a folder; the tests call
:func:`corpus` directly.
"""
from __future__ import annotations

import io
import struct
import sys
import zipfile
import zlib
from pathlib import Path

import numpy as np
from PIL import Image
from skimage import data


def _save(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _jpeg_with_size(width: int, height: int) -> bytes:
    """A tiny real JPEG whose SOF header claims another size (a decompression-bomb header)."""
    raw = bytearray(_save(Image.new("RGB", (16, 16), (128, 128, 128)), "JPEG"))
    sof = raw.find(b"\xff\xc0")
    raw[sof + 5:sof + 9] = struct.pack(">HH", height, width)
    return bytes(raw)


def scan_bomb(scans: int = 80_000, size: tuple[int, int] = (4000, 3000)) -> bytes:
    """A progressive JPEG made of ``scans`` tiny scans: a real grey photo's scans, then its smallest AC scan (with
    its Huffman table) repeated. About 48 bytes a scan; a decoder passes over the whole image for each one."""
    buf = io.BytesIO()
    Image.new("L", size, 128).save(buf, "JPEG", progressive=True, quality=90)
    jpeg = buf.getvalue()
    groups, start, i = [], None, 2
    while jpeg[i + 1] != 0xD9:
        marker, end = jpeg[i + 1], i + 2 + int.from_bytes(jpeg[i + 2:i + 4], "big")
        if marker == 0xDA:  # the entropy-coded data runs to the next marker that is not a stuffed zero or restart
            while jpeg[end] != 0xFF or jpeg[end + 1] == 0 or 0xD0 <= jpeg[end + 1] <= 0xD7:
                end += 1
        if marker in (0xC4, 0xDA):
            start = i if start is None else start
            if marker == 0xDA:
                groups.append(jpeg[start:end])
                start = None
        i = end
    first_table = jpeg.index(groups[0])
    return jpeg[:first_table] + b"".join(groups) + min(groups[1:], key=len) * scans + b"\xff\xd9"


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def corpus() -> dict[str, bytes]:
    """Name -> bytes. At least 40 files; names carry the extension a user's browser would send."""
    face = Image.fromarray(data.astronaut())
    jpeg = _save(face, "JPEG", quality=90)
    png = _save(face, "PNG")
    rng = np.random.default_rng(7)
    files: dict[str, bytes] = {
        "zero-bytes.jpg": b"",
        "one-byte.jpg": b"\xff",
        "soi-eoi-only.jpg": b"\xff\xd8\xff\xd9",
        "random-bytes-1.jpg": rng.bytes(4096),
        "random-bytes-2.png": rng.bytes(65536),
        "text.jpg": b"Patient name: nobody\n" * 50,
        "html.jpg": b"<!doctype html><html><body><script>alert(1)</script></body></html>",
        "pdf-renamed.jpg": b"%PDF-1.7\n1 0 obj<</Type/Catalog>>endobj\ntrailer<</Root 1 0 R>>\n%%EOF\n",
        "svg-with-script.svg": (b'<svg xmlns="http://www.w3.org/2000/svg" onload="alert(1)">'
                                b"<script>alert(2)</script></svg>"),
        "svg-renamed.jpg": b'<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg"><image href="file:///etc/passwd"/></svg>',
        "elf-binary.jpg": b"\x7fELF\x02\x01\x01" + b"\x00" * 100,
        "heic.heic": b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + b"\x00" * 64,
        "avif.avif": b"\x00\x00\x00\x1cftypavif\x00\x00\x00\x00avifmif1miaf" + b"\x00" * 64,
        "webp.webp": _save(face, "WEBP", quality=80),
        "ico.ico": _save(face.resize((64, 64)), "ICO"),
        "gif-static.gif": _save(face.convert("P"), "GIF"),
        "png-bomb-30000.png": _save(Image.new("L", (30000, 30000)), "PNG"),
        "jpeg-bomb-header.jpg": _jpeg_with_size(30000, 30000),
        "jpeg-48mp.jpg": _save(Image.new("RGB", (8000, 6000), (90, 90, 90)), "JPEG", quality=50),
        "tiny-1x1.png": _save(Image.new("RGB", (1, 1)), "PNG"),
        "strip-10000x1.png": _save(Image.new("RGB", (10000, 1)), "PNG"),
        "cmyk.jpg": _save(face.convert("CMYK"), "JPEG"),
        "grayscale.jpg": _save(face.convert("L"), "JPEG"),
        "png-16bit.png": _save(Image.fromarray(data.camera().astype(np.uint16) * 256), "PNG"),
        "png-palette.png": _save(face.convert("P"), "PNG"),
        "png-palette-transparent.png": _save(face.convert("P"), "PNG", transparency=0),
        "png-la.png": _save(face.convert("LA"), "PNG"),
        "png-rgba.png": _save(face.convert("RGBA"), "PNG"),
        "bmp.bmp": _save(face, "BMP"),
        "no-face.jpg": _save(Image.fromarray(data.coffee()), "JPEG"),
        "zip-renamed.jpg": _zip(),
        "polyglot-jpeg-zip.jpg": jpeg + _zip(),
        "polyglot-jpeg-html.jpg": jpeg + b"<script>alert(1)</script>",
        "gif-js-polyglot.gif": b"GIF89a/*\x01\x00\x01\x00\x00\x00\x00*/=alert(1)//;",
        "png-bad-crc.png": png[:33] + b"\x00\x00\x00\x00" + png[37:],
        "png-truncated-idat.png": png[: len(png) // 3],
        "png-huge-ihdr.png": b"\x89PNG\r\n\x1a\n" + _png_chunk(
            b"IHDR", struct.pack(">IIBBBBB", 2**31 - 1, 2**31 - 1, 8, 2, 0, 0, 0)),
        "png-zero-size.png": b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", struct.pack(">IIBBBBB", 0, 0, 8, 2, 0, 0, 0)),
        "animated.gif": _animated(face),
        "tiff-multipage.tif": _multipage(face),
        "huge-exif.jpg": _save(face, "JPEG", exif=_exif({0x9286: b"ASCII\x00\x00\x00" + b"A" * 60000})),
        "gps-exif.jpg": _save(face, "JPEG", exif=_exif({0x8825: {1: "N", 2: (52.0, 12.0, 0.0)}})),
    }
    for orientation in (0, 3, 6, 8, 9, 255):
        files[f"exif-orientation-{orientation}.jpg"] = _save(face, "JPEG", exif=_exif({0x0112: orientation}))
    for cut in (10, 200, 2000, len(jpeg) // 2):
        files[f"truncated-{cut}.jpg"] = jpeg[:cut]
    for seed in range(5):
        corrupt = bytearray(jpeg)
        for pos in np.random.default_rng(seed).integers(0, len(corrupt), 40):
            corrupt[pos] ^= 0xFF
        files[f"bitflip-{seed}.jpg"] = bytes(corrupt)
    return files


def _exif(tags: dict) -> Image.Exif:
    exif = Image.Exif()
    for k, v in tags.items():
        exif[k] = v
    return exif


def _zip() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("payload.txt", "not a photo")
    return buf.getvalue()


def _animated(face: Image.Image) -> bytes:
    frames = [face.convert("P"), face.rotate(10).convert("P")]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    return buf.getvalue()


def _multipage(face: Image.Image) -> bytes:
    buf = io.BytesIO()
    face.save(buf, format="TIFF", save_all=True, append_images=[face.rotate(5)])
    return buf.getvalue()


if __name__ == "__main__":
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "hostile-corpus")
    out.mkdir(parents=True, exist_ok=True)
    for name, content in corpus().items():
        (out / name).write_bytes(content)
    print(f"{len(corpus())} files in {out}")
