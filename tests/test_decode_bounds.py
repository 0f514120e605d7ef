"""Decoder bounds: what would hold a decoder is refused from its structure before any decode, wherever a photo
is decoded (the upload gate of the portal, train, evaluate and import; the workers' decode of a stored original)."""
from __future__ import annotations

import io
import struct
import time
import zlib

import numpy as np
import pytest
from PIL import Image
from skimage import data
from sqlalchemy import select

from shared.ml.preprocess.imaging import ImageRejected, decode_stored, decode_upload, frame_size
from tests.hostile_corpus import scan_bomb

LIMITS = {"max_bytes": 20 * 2**20, "max_pixels": 40e6, "min_side": 64}


@pytest.fixture(scope="module")
def bomb() -> bytes:
    return scan_bomb()


def _png(im: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="PNG", **kw)
    return buf.getvalue()


def _chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def _with_chunks(png: bytes, *chunks: bytes) -> bytes:
    """The PNG with ``chunks`` inserted after its IHDR."""
    return png[:33] + b"".join(chunks) + png[33:]


def test_the_scan_bomb_is_refused_before_decoding_everywhere(bomb):
    start = time.perf_counter()
    for call in (lambda: decode_upload(bomb, **LIMITS, pixels=False), lambda: decode_upload(bomb, **LIMITS),
                 lambda: decode_stored(bomb), lambda: frame_size(bomb, max_pixels=40e6)):
        with pytest.raises(ImageRejected, match="more than 100 scans") as refused:
            call()
        assert refused.value.http_status == 413
    elapsed = time.perf_counter() - start
    print(f"\n80,000-scan JPEG ({len(bomb) / 2**20:.1f} MB): refused by all four gates in {elapsed * 1000:.0f} ms")
    assert elapsed < 2  # each gate reads markers only (a decode took over a minute)
    # The limit is a setting: a caller that allows more scans gets the photo decoded (a small one, to stay fast).
    assert decode_upload(scan_bomb(150, (256, 256)), **LIMITS, max_scans=200).width == 256



def test_train_and_evaluate_decode_under_the_settings_bounds(tmp_path, monkeypatch):
    """``gestalt train`` and ``evaluate`` prepare their photos under the settings' scan and frame limits, as the
    workers do: a photo past GESTALT_MAX_JPEG_SCANS is listed as refused, never decoded."""
    from shared.cli.common import decode_limits
    from shared.config import Settings
    from shared.ml.preprocess.pipeline import Preprocessor
    from shared.ml.train.data import Sample
    from shared.ml.train.prepared import prepare

    (tmp_path / "many-scans.jpg").write_bytes(scan_bomb(150, (256, 256)))
    Image.fromarray(data.astronaut()).save(tmp_path / "face.jpg")
    monkeypatch.setenv("GESTALT_MAX_JPEG_SCANS", "120")
    limits = decode_limits(Settings())
    assert limits == {"max_pixels": 40e6, "max_scans": 120}
    samples = [Sample(tmp_path / "face.jpg", "a", "p1"), Sample(tmp_path / "many-scans.jpg", "a", "p2")]
    prepared = prepare(samples, ["a"], Preprocessor(), progress=False, **limits)
    assert [s.path.name for s in prepared.samples] == ["face.jpg"]
    assert [(s.path.name, "more than 120 scans" in reason) for s, reason in prepared.rejected] == [
        ("many-scans.jpg", True)]

def test_bytes_between_markers_do_not_hide_scans(bomb):
    """libjpeg skips bytes where a marker should be; the count must skip them too, not give up."""
    laced = bomb.replace(b"\xff\xc4", b"\x00\xff\xc4")
    assert laced != bomb
    with pytest.raises(ImageRejected, match="scans"):
        decode_upload(laced, **LIMITS, pixels=False)


def test_real_progressive_and_baseline_jpegs_pass():
    rgb = Image.fromarray(data.astronaut())
    for kw in ({}, {"progressive": True}, {"progressive": True, "optimize": True}):
        buf = io.BytesIO()
        rgb.save(buf, "JPEG", **kw)
        assert decode_upload(buf.getvalue(), **LIMITS).rgb.shape == (512, 512, 3)


def test_a_plain_png_is_stored_without_its_metadata_and_without_a_decode():
    face = Image.fromarray(data.astronaut())
    secret = b"PHI-MARKER"
    png = _with_chunks(_png(face), _chunk(b"tEXt", b"Comment\x00" + secret),
                       _chunk(b"iTXt", b"Author\x00\x00\x00\x00\x00" + secret),
                       _chunk(b"iCCP", b"icc\x00\x00" + zlib.compress(secret * 10)),
                       _chunk(b"zTXt", b"Title\x00\x00" + zlib.compress(secret)))
    assert Image.open(io.BytesIO(png)).info  # Pillow reads the text
    decoded = decode_upload(png, **LIMITS, pixels=False)
    assert decoded.image is None and decoded.content_type == "image/png"
    assert secret not in decoded.data and b"iCCP" not in decoded.data and b"tEXt" not in decoded.data
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(decoded.data))), data.astronaut())
    assert np.array_equal(decode_stored(decoded.data), data.astronaut())
    # Stripping is idempotent: a stored photo coming back (a Phenopacket) keeps its hash.
    assert decode_upload(decoded.data, **LIMITS, keep_clean=True).sha256 == decoded.sha256


def test_a_png_turned_by_its_exif_is_decoded_turned_and_encoded_afresh():
    face = Image.fromarray(data.astronaut()[:, :300])  # 512 tall, 300 wide
    exif = Image.Exif()
    exif[0x0112] = 6
    decoded = decode_upload(_png(face, exif=exif), **LIMITS, pixels=False)
    assert (decoded.width, decoded.height) == (512, 300) and b"eXIf" not in decoded.data


@pytest.mark.parametrize(("name", "make", "status", "words"), [
    ("animated PNG", lambda png: _with_chunks(png, _chunk(b"acTL", struct.pack(">II", 2, 0))), 415, "animated"),
    ("too many chunks", lambda png: _with_chunks(png, *[_chunk(b"prVt", b"")] * 20_001), 413, "chunks"),
    ("huge text chunk", lambda png: _with_chunks(png, _chunk(b"zTXt", b"k\x00\x00" + bytes(2 << 20))), 413, "text"),
    ("bad CRC", lambda png: png[:29] + b"\x00\x00\x00\x00" + png[33:], 400, "damaged"),
    ("truncated", lambda png: png[:len(png) // 2], 400, "truncated"),
    ("bad header", lambda png: png[:8] + _chunk(b"IHDR", struct.pack(">IIBBBBB", 64, 64, 3, 2, 0, 0, 0)) + png[33:],
     400, "damaged"),
])
def test_hostile_pngs_are_refused_from_their_chunks(name, make, status, words):
    png = _png(Image.fromarray(data.astronaut()[:128, :128]))
    for call in (lambda b: decode_upload(b, **LIMITS, pixels=False), decode_stored):
        with pytest.raises(ImageRejected, match=words) as refused:
            call(make(png))
        assert refused.value.http_status == status, name


@pytest.mark.parametrize("fmt", ["TIFF", "WEBP"])
def test_multi_frame_tiff_and_webp_are_refused(fmt):
    face = Image.fromarray(data.astronaut())
    buf = io.BytesIO()
    face.save(buf, format=fmt, save_all=True, append_images=[face.rotate(5)])
    with pytest.raises(ImageRejected, match="animated or multi-page") as refused:
        decode_upload(buf.getvalue(), **LIMITS, pixels=False)
    assert refused.value.http_status == 415


def test_a_stored_scan_bomb_ends_rejected_and_the_worker_goes_on(engines, workers, bomb):
    """An original stored before these checks (or put there some other way) is refused by the worker's decode
    budget with its reason; the worker then scores the next photo."""
    from shared.db import session_scope
    from shared.dispatch import enqueue_photo
    from shared.models import Case
    from shared.models import Image as ImageRow
    from shared.storage import get_storage, original_key
    from shared.users import find_user
    from tests.conftest import new_user

    good = decode_upload(_png(Image.fromarray(data.astronaut())), **LIMITS)
    stored = [("bomb", bomb, "image/jpeg", "jpg"), ("good", good.data, "image/png", "png")]
    with session_scope() as s:
        case = Case(owner_id=find_user(s, new_user()).id, patient_ref="PT-BOMB", sex="unknown")
        s.add(case)
        s.flush()
        rows = {}
        for name, blob, content_type, ext in stored:
            import hashlib

            sha = hashlib.sha256(blob).hexdigest()
            get_storage().put(original_key(sha, ext), blob, content_type)
            rows[name] = ImageRow(case_id=case.id, sha256=sha, object_key=original_key(sha, ext),
                                  content_type=content_type, width=4000, height=3000, status="queued",
                                  stage_times={"uploaded": time.time()})
            s.add(rows[name])
        s.flush()
        ids = {name: row.id for name, row in rows.items()}
    start = time.monotonic()
    for name in ("bomb", "good"):
        enqueue_photo(ids[name])
    final = {}
    while time.monotonic() - start < 180 and len(final) < 2:
        with session_scope() as s:
            for name, image_id in ids.items():
                row = s.get(ImageRow, image_id)
                if row.status in ("rejected", "failed", "done", "awaiting_model") and name not in final:
                    final[name] = (row.status, row.reason, time.monotonic() - start)
        time.sleep(0.5)
    print(f"\nstored scan bomb: {final.get('bomb')}; the next photo: {final.get('good')}")
    assert final["bomb"][0] == "rejected" and "more than 100 scans" in final["bomb"][1]
    assert final["good"][0] in ("done", "awaiting_model", "rejected") and "scans" not in (final["good"][1] or "")
    assert workers.running
    with session_scope() as s:
        assert s.scalars(select(ImageRow.status).where(ImageRow.id == ids["bomb"])).one() == "rejected"


def test_import_refuses_a_scan_bomb_photo(engines, tmp_path, bomb, monkeypatch):
    import hashlib
    import json

    from click.testing import CliRunner

    from shared.cli import main
    from shared.config import reload_settings
    from tests.conftest import new_user


    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "bomb.jpg").write_bytes(bomb)
    packet = {"id": "bomb-packet", "subject": {"id": "PT-BOMB-IMPORT"},
              "files": [{"uri": "photos/bomb.jpg", "fileAttributes": {"sha256": hashlib.sha256(bomb).hexdigest()}}],
              "metaData": {"phenopacketSchemaVersion": "2.0", "createdBy": "test"}}
    (tmp_path / "bomb.json").write_text(json.dumps(packet))
    monkeypatch.setenv("GESTALT_MAX_UPLOAD_MB", "20")  # the default: the bomb (3.7 MB) passes the size check
    reload_settings()
    try:
        start = time.perf_counter()
        r = CliRunner().invoke(main, ["import", "phenopackets", str(tmp_path), "--owner", new_user()])
        elapsed = time.perf_counter() - start
    finally:
        monkeypatch.undo()
        reload_settings()
    assert r.exit_code != 0 and "bomb.json: file photos/bomb.jpg: the JPEG holds more than 100 scans" in r.output, \
        r.output
    print(f"\nimport of a scan-bomb photo refused in {elapsed:.2f} s")
