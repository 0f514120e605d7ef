"""`gestalt encode`: descriptors of each photo's main face, rejected photos listed with their reasons."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image
from skimage import data

from shared.ml.nets import encoder
from tests.conftest import shared_data

pytestmark = pytest.mark.skipif(encoder.source_path() is None, reason=f"{encoder.PACKAGE} is not installed")


def test_encode_writes_descriptors_and_lists_rejections(tmp_path):
    from shared.cli import main

    orl = shared_data("faces", "orl")
    photos = [orl / f"s{s}" / f"{i}.pgm" for s in (1, 2, 3) for i in (1, 2)]
    coffee = tmp_path / "coffee.png"
    Image.fromarray(data.coffee()).save(coffee)
    broken = tmp_path / "broken.jpg"
    buf = io.BytesIO()
    Image.fromarray(data.astronaut()).save(buf, format="JPEG")
    broken.write_bytes(buf.getvalue()[:2000])
    out = tmp_path / "descriptors.npz"
    r = CliRunner().invoke(main, ["encode", *map(str, photos), str(coffee), str(broken), "--out", str(out),
                                  "--batch-size", "4"])
    assert r.exit_code == 0, r.output
    with np.load(out) as npz:
        paths, d = list(npz["paths"]), npz["descriptors"]
        rejected = dict(zip(npz["rejected_paths"], npz["rejected_reasons"], strict=True))
        assert str(npz["encoder"]) == encoder.NAME
    # Every photo is accounted for: encoded, or rejected with a reason (ORL's quality gate may refuse one).
    assert sorted(paths + list(rejected)) == sorted(map(str, [*photos, coffee, broken]))
    assert len(paths) >= 5 and d.shape == (len(paths), encoder.DESCRIPTOR_DIM) and d.dtype == np.float32
    assert {str(coffee), str(broken)} <= set(rejected) and "damaged" in rejected[str(broken)]
    assert f"{len(rejected)} photo(s) without a usable face" in " ".join(r.output.split())
    subject = [Path(p).parent.name for p in paths]
    distance = np.linalg.norm(d[:, None] - d[None], axis=-1)
    same = [distance[i, j] for i in range(len(paths)) for j in range(i) if subject[i] == subject[j]]
    other = [distance[i, j] for i in range(len(paths)) for j in range(i) if subject[i] != subject[j]]
    assert same and max(same) < min(other), (same, min(other))  # ORL identities separate without training
