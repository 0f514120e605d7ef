"""The preprocessing cache: a second pass over the same photos runs no detector."""
from __future__ import annotations

import stat

import numpy as np
from PIL import Image

from shared.ml.preprocess.cache import PrepCache
from shared.ml.preprocess.pipeline import Preprocessor
from shared.ml.train.data import Sample
from shared.ml.train.prepared import prepare
from tests.conftest import shared_data


class CountingPreprocessor(Preprocessor):
    calls = 0

    def run(self, rgb):
        type(self).calls += 1
        return super().run(rgb)


def _samples(tmp_path) -> list[Sample]:
    orl = shared_data("faces", "orl")
    blank = tmp_path / "blank.png"
    Image.fromarray(np.full((120, 120, 3), 128, np.uint8)).save(blank)
    return [Sample(orl / s / f"{i}.pgm", s, s) for s in ("s1", "s2") for i in (1, 2)] + [Sample(blank, "s1", "x")]


def test_second_pass_reads_the_cache(tmp_path):
    samples = _samples(tmp_path)
    pre = CountingPreprocessor()
    root = tmp_path / "cache"
    first = prepare(samples, ["s1", "s2"], pre, progress=False, keep_aligned=True,
                    cache=PrepCache.for_preprocessor(root, pre))
    computed = CountingPreprocessor.calls
    assert computed == len(samples)
    assert "blank.png" in [s.path.name for s, _ in first.rejected]
    cache = PrepCache.for_preprocessor(root, pre)
    second = prepare(samples, ["s1", "s2"], pre, progress=False, keep_aligned=True, cache=cache)
    assert CountingPreprocessor.calls == computed  # no detector, no landmarks
    assert (cache.hits, cache.misses) == (len(samples), 0)
    np.testing.assert_array_equal(first.crops, second.crops)
    np.testing.assert_array_equal(first.aligned, second.aligned)
    np.testing.assert_allclose(first.landmarks, second.landmarks)
    assert [(s.path, r) for s, r in first.rejected] == [(s.path, r) for s, r in second.rejected]
    assert stat.S_IMODE(root.stat().st_mode) == 0o700
    files = list(root.rglob("*.npz"))
    assert len(files) == len(samples) and all(stat.S_IMODE(f.stat().st_mode) == 0o600 for f in files)
    pre.close()


def test_key_depends_on_setup_and_damage_is_a_miss(tmp_path):
    pre = Preprocessor()
    a = PrepCache.for_preprocessor(tmp_path, pre)
    b = PrepCache(tmp_path, {**pre.provenance, "regions": ["full_face"], "min_confidence": 0.5})
    assert a.path("0" * 64) != b.path("0" * 64)
    a.path("0" * 64).parent.mkdir(parents=True)
    a.path("0" * 64).write_bytes(b"not an npz")
    assert a.get("0" * 64) is None and a.misses == 1
    pre.close()
