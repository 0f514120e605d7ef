"""Decode and validate uploaded photos; apply EXIF orientation, then drop all metadata.

``decode_upload`` is the single gate every photo passes before anything is stored.
It refuses what it cannot safely decode with :class:`ImageRejected`, whose
``reason`` is written for a clinician and whose ``http_status`` the web layer returns.
Before any decoder runs, :func:`shared.ml.preprocess.preflight.inspect` reads the file's structure and
refuses what would make the decode unbounded; ``decode_stored`` (the workers) makes the same checks.
"""
from __future__ import annotations

import hashlib
import io
import warnings
import zipfile
from dataclasses import dataclass
from functools import cached_property

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from shared.ml.preprocess.jpeg import CLEAN_JFIF, MAX_SCANS, strip_metadata
from shared.ml.preprocess.png import strip_ancillary
from shared.ml.preprocess.preflight import ImageRejected, inspect

# Formats we decode. Anything else (SVG, PDF, HEIC, text) is refused by name.
ALLOWED_FORMATS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp", "BMP": "bmp", "TIFF": "tif", "PPM": "pgm"}
# ISO-BMFF brands of HEIC/HEIF/AVIF, the default of many phones: refused with advice.
HEIF_BRANDS = {b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis", b"mif1", b"msf1", b"avif", b"avis"}
# Stored re-encodings: lossy sources stay JPEG, everything else becomes PNG.
JPEG_QUALITY = 95
# How an upload's bytes are stored: as uploaded (metadata-free, asked for), a JPEG with its metadata
# segments dropped (same compressed data, same pixels), or a fresh encode of the decoded photo.
AS_UPLOADED, STRIPPED, ENCODED = "as uploaded", "stripped", "encoded"
ORIENTATION = 0x0112


@dataclass(frozen=True)
class DecodedImage:
    image: Image.Image | None  # upright, RGB; None when only checked (``pixels=False``)
    data: bytes  # metadata-free bytes to store
    content_type: str
    ext: str
    sha256: str
    width: int
    height: int

    @cached_property
    def rgb(self) -> np.ndarray:
        """H x W x 3, uint8, upright (made on first use: the portal stores the bytes and never needs it)."""
        if self.image is None:  # the stored bytes decode to the upload's own pixels
            return np.asarray(Image.open(io.BytesIO(self.data)).convert("RGB"))
        return np.asarray(self.image)


def _to_rgb(im: Image.Image) -> Image.Image:
    if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(im, dtype=np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        arr = (arr - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(arr)
        im = Image.fromarray(arr.astype(np.uint8), "L")
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return im if im.mode == "RGB" else im.convert("RGB")


def _plain_jpeg(data: bytes, size: tuple[int, int]) -> bool:
    """A check of :func:`strip_metadata`'s output by Pillow's own parser (headers only, no decode): a JPEG of
    the photo's size whose only application segment is a bare JFIF header, with no metadata of any kind."""
    try:
        im = Image.open(io.BytesIO(data))
    except (OSError, SyntaxError, ValueError):
        return False
    info = set(im.info) - {"jfif", "jfif_version", "jfif_unit", "jfif_density", "dpi", "progressive",
                           "progression"}
    return im.format == "JPEG" and im.size == size and not info and \
        all(marker == "APP0" and body == CLEAN_JFIF[4:] for marker, body in getattr(im, "applist", []))


def _metadata_free(im: Image.Image) -> bool:
    """True when ``im`` (as opened, before any transpose) carries nothing but pixels: a JPEG with no
    segment other than JFIF's and no comment, or an RGB PNG with no ancillary data."""
    if im.mode != "RGB":
        return False
    if im.format == "JPEG":
        return all(marker == "APP0" and body.startswith(b"JFIF") for marker, body in getattr(im, "applist", [])) \
            and not {"exif", "comment", "icc_profile", "xmp", "photoshop", "adobe"} & set(im.info)
    return im.format == "PNG" and set(im.info) <= {"dpi"}


def decode_upload(data: bytes, *, max_bytes: int, max_pixels: float, min_side: int,
                  keep_clean: bool = False, pixels: bool = True, max_scans: int = MAX_SCANS) -> DecodedImage:
    """Decode a photo safely and return it upright, in RGB, with metadata-free bytes to store.

    Args:
        data: the uploaded bytes.
        max_bytes: larger files are refused with HTTP 413.
        max_pixels: larger images are refused before decoding (decompression bombs).
        min_side: photos smaller than this on either side are refused.
        keep_clean: store the bytes as they are when they carry no metadata at all (photos that Gestalt
            itself stored, coming back in a Phenopacket), so they keep their hash; otherwise re-encode.
        pixels: False when the caller only stores the photo (the portal): a JPEG kept as its own compressed
            data is then decoded at an eighth of its size, which reads and checks every byte of it as a
            full decode does at a fraction of the cost, and ``image`` is None (``rgb`` decodes on demand).
        max_scans: progressive JPEGs with more scans are refused before decoding.

    A plain 8-bit PNG without transparency or orientation is stored as its own chunks without the ancillary
    ones (:func:`shared.ml.preprocess.png.strip_ancillary`); with ``pixels=False`` nothing of it is decoded (the
    workers do).

    Raises:
        ImageRejected: with a reason a clinician can read.
    """
    _check_file(data, max_bytes)
    header = inspect(data, max_pixels=max_pixels, max_scans=max_scans)
    stripped_png = strip_ancillary(data, header.png) if header.png is not None else None
    if stripped_png is not None:
        _check_side((header.width, header.height), min_side)
        image = _decode_checked(stripped_png, max_pixels, True, False)[0] if pixels else None
        return DecodedImage(image=image, data=stripped_png, content_type="image/png", ext="png",
                            sha256=hashlib.sha256(stripped_png).hexdigest(), width=header.width, height=header.height)
    rgb_im, fmt, store, size = _decode_checked(data, max_pixels, keep_clean, not pixels)
    _check_side(size, min_side)
    stripped = _stripped(data, size) if store == STRIPPED else None
    if stripped is None and rgb_im.size != size:  # decoded small for a strip that did not check out
        rgb_im, fmt, store, size = _decode_checked(data, max_pixels, keep_clean, False)
    stored, content_type, ext = (stripped, "image/jpeg", "jpg") if stripped is not None else \
        _stored_bytes(data, rgb_im, fmt, store)
    return DecodedImage(image=rgb_im if rgb_im.size == size else None, data=stored, content_type=content_type,
                        ext=ext, sha256=hashlib.sha256(stored).hexdigest(), width=size[0], height=size[1])


def frame_size(data: bytes, *, max_pixels: float, max_scans: int = MAX_SCANS) -> tuple[int, int]:
    """A photo's width and height from its header alone, after :func:`shared.ml.preprocess.preflight.inspect`'s checks
    (0 x 0 when no header can be read: :func:`decode_upload` then says why). Nothing is decoded."""
    header = inspect(data, max_pixels=max_pixels, max_scans=max_scans)
    if header.format is not None:
        return header.width, header.height
    try:
        with Image.open(io.BytesIO(data)) as im:
            return im.size
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError, KeyError,
            ZeroDivisionError, Image.DecompressionBombError):
        return 0, 0


def _check_side(size: tuple[int, int], min_side: int) -> None:
    if min(size) < min_side:
        raise ImageRejected(
            f"the image is {size[0]}x{size[1]} pixels; at least {min_side} pixels per side are needed")


def _check_file(data: bytes, max_bytes: int) -> None:
    """The checks before any decoder sees the bytes: empty files, HEIC/AVIF, the file size."""
    if not data:
        raise ImageRejected("the file is empty")
    if data[4:8] == b"ftyp" and data[8:12] in HEIF_BRANDS:
        raise ImageRejected("HEIC/AVIF photos are not supported; export the photo as JPEG (on an iPhone: "
                            "Settings > Camera > Formats > Most Compatible)", http_status=415)
    if len(data) > max_bytes:
        raise ImageRejected(
            f"the file is {len(data) / 2**20:.1f} MB; the limit is {max_bytes / 2**20:.0f} MB", http_status=413)


def _decode_checked(data: bytes, max_pixels: float, keep_clean: bool,
                    small: bool) -> tuple[Image.Image, str, str, tuple[int, int]]:
    """The upright RGB image, its format, how its bytes are stored and its upright size (:func:`_decode`);
    every decoder failure (unreadable, bomb, damaged) becomes an :class:`ImageRejected`."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            return _decode(data, max_pixels, keep_clean, small)
    except ImageRejected:
        raise
    except UnidentifiedImageError as exc:
        raise ImageRejected("the file is not an image we can read; upload a JPEG or PNG photo",
                            http_status=415) from exc
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageRejected(f"the image is too large to decode safely; the limit is {max_pixels / 1e6:.0f} megapixels",
                            http_status=413) from exc
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError, KeyError,
            ZeroDivisionError, MemoryError) as exc:
        raise ImageRejected("the image file is damaged or truncated") from exc


def _decode(data: bytes, max_pixels: float, keep_clean: bool,
            small: bool) -> tuple[Image.Image, str, str, tuple[int, int]]:
    """Open the image, refuse a format, size or frame count we do not take before decoding the pixels,
    choose how to store it (:data:`AS_UPLOADED` when metadata-free and ``keep_clean``, :data:`STRIPPED` for an
    upright YCbCr or grayscale JPEG, else :data:`ENCODED`), decode (an eighth of the size when ``small`` and the
    JPEG is stored stripped: every byte is still read and checked), and turn it upright and RGB."""
    im = Image.open(io.BytesIO(data))
    fmt = im.format
    if fmt not in ALLOWED_FORMATS:
        raise ImageRejected(f"{fmt or 'this'} files are not supported; upload a JPEG or PNG photo",
                            http_status=415)
    width, height = im.size
    if width * height > max_pixels:
        raise ImageRejected(
            f"the image is {width}x{height} pixels; the limit is {max_pixels / 1e6:.0f} megapixels",
            http_status=413)
    if getattr(im, "n_frames", 1) > 1:
        raise ImageRejected("animated or multi-page images are not supported; upload a single photo",
                            http_status=415)
    if keep_clean and _metadata_free(im):
        store = AS_UPLOADED
    elif fmt == "JPEG" and im.mode in ("RGB", "L") and "adobe" not in im.info and \
            im.getexif().get(ORIENTATION, 1) == 1:  # Adobe's segment can carry the colour transform
        store = STRIPPED
        if small:
            im.draft(im.mode, (max(1, width // 8), max(1, height // 8)))
    else:
        store = ENCODED
    im.load()
    ImageOps.exif_transpose(im, in_place=True)  # upright; no copy when it already is
    size = (width, height) if store == STRIPPED else im.size
    return _to_rgb(im), fmt, store, size


def _stripped(data: bytes, size: tuple[int, int]) -> bytes | None:
    """The JPEG without its metadata, when the result checks out (:func:`_plain_jpeg`)."""
    stripped = strip_metadata(data)
    return stripped if stripped is not None and _plain_jpeg(stripped, size) else None


def _stored_bytes(data: bytes, rgb_im: Image.Image, fmt: str, store: str) -> tuple[bytes, str, str]:
    """The bytes to store when the photo is not stored stripped, their content type and extension: the upload
    itself (:data:`AS_UPLOADED`), else a fresh encode (JPEG stays JPEG, everything else becomes PNG)."""
    out = io.BytesIO()
    # A fresh encode: no EXIF (GPS included), no comments, no ICC, no XMP. Pillow's encoders write some of
    # what the decoder read (a JPEG's comment, an ICC profile into PNG) unless the image forgets it first.
    rgb_im.info = {}
    if store == AS_UPLOADED:
        out.write(data)
        content_type, ext = ("image/jpeg", "jpg") if fmt == "JPEG" else ("image/png", "png")
    elif fmt == "JPEG":
        rgb_im.save(out, format="JPEG", quality=JPEG_QUALITY)
        content_type, ext = "image/jpeg", "jpg"
    else:
        rgb_im.save(out, format="PNG", compress_level=1)
        content_type, ext = "image/png", "png"
    return out.getvalue(), content_type, ext


def decode_stored(data: bytes, max_pixels: float = 4e7, max_scans: int = MAX_SCANS) -> np.ndarray:
    """Decode bytes written by :func:`decode_upload` (upright, metadata-free JPEG or PNG), after the same checks
    as an upload's (:func:`shared.ml.preprocess.preflight.inspect`): a stored photo that would hold the decoder (stored
    before those checks, or put there some other way) is refused, not decoded."""
    header = inspect(data, max_pixels=max_pixels, max_scans=max_scans)
    if header.format is None:
        raise ImageRejected("the stored photo is not a JPEG or PNG that Gestalt stored; upload it again")
    rgb = _decode_rgb(data)
    if rgb is None:
        raise ImageRejected("the stored photo is damaged and could not be decoded; upload it again")
    return rgb


def _decode_rgb(data: bytes) -> np.ndarray | None:
    """An RGB decode by OpenCV: straight to RGB where it can (4.10 and later), else BGR then converted."""
    import cv2

    buf = np.frombuffer(data, np.uint8)
    if hasattr(cv2, "IMREAD_COLOR_RGB"):
        return cv2.imdecode(buf, cv2.IMREAD_COLOR_RGB)
    bgr = cv2.imdecode(buf, cv2.IMREAD_COLOR)
    return None if bgr is None else cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def encode_png(array: np.ndarray) -> bytes:
    import cv2

    if array.ndim == 3:
        array = cv2.cvtColor(array, cv2.COLOR_RGB2BGR)
    # Huffman coding alone: faster than zlib's level 1 and, on photos, no larger (PNG stays lossless).
    ok, buf = cv2.imencode(".png", array, [cv2.IMWRITE_PNG_COMPRESSION, 1,
                                           cv2.IMWRITE_PNG_STRATEGY, cv2.IMWRITE_PNG_STRATEGY_HUFFMAN_ONLY])
    if not ok:
        raise ValueError("PNG encoding failed")
    return buf.tobytes()


def decode_png_gray(data: bytes) -> np.ndarray:
    import cv2

    arr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_GRAYSCALE)
    if arr is None:
        raise ValueError("crop could not be decoded")
    return arr


def decode_png_rgb(data: bytes) -> np.ndarray:
    """An RGB crop stored by :func:`encode_png` (e.g. the identity encoder's face chip), ``H x W x 3``."""
    arr = _decode_rgb(data)
    if arr is None:
        raise ValueError("crop could not be decoded")
    return arr


def encode_crops(crops: dict[str, np.ndarray]) -> bytes:
    """A face's crops (name -> uint8 array: the grayscale region crops and the RGB face chip) as one
    uncompressed ``.npz``: one object per face, written and read without an image codec."""
    buf = io.BytesIO()
    np.savez(buf, **{name: np.ascontiguousarray(a, np.uint8) for name, a in crops.items()})
    return buf.getvalue()


def decode_crops(data: bytes) -> dict[str, np.ndarray]:
    """The crops written by :func:`encode_crops`, by name. Arrays only: nothing is unpickled."""
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as bundle:
            crops = {name: bundle[name] for name in bundle.files}
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as exc:
        raise ValueError(f"crops could not be decoded: {exc}") from exc
    if not crops or any(a.dtype != np.uint8 or a.ndim not in (2, 3) for a in crops.values()):
        raise ValueError("crops could not be decoded: not a face's uint8 crops")
    return crops
