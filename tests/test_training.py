"""Training data layouts and subject-disjoint splits."""
from __future__ import annotations

from pathlib import Path

import pytest

from shared.ml.data import Sample, load_manifest, scan_folder
from shared.ml.splits import LeakageError, check_leakage, gmdb_protocol, in_holdout, subject_split


def _touch(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x")


def test_scan_both_layouts(tmp_path):
    _touch(tmp_path / "synA" / "subj1" / "a.jpg")
    _touch(tmp_path / "synA" / "subj1" / "b.jpg")
    _touch(tmp_path / "synA" / "subj2" / "c.png")
    _touch(tmp_path / "synB" / "d.jpg")
    _touch(tmp_path / "synB" / "notes.txt")
    samples = scan_folder(tmp_path)
    assert [(s.label, s.subject) for s in samples] == [
        ("synA", "synA/subj1"), ("synA", "synA/subj1"), ("synA", "synA/subj2"), ("synB", "synB/d.jpg")]


def test_scan_refuses_empty_and_missing(tmp_path):
    with pytest.raises(ValueError):
        scan_folder(tmp_path)
    with pytest.raises(FileNotFoundError):
        scan_folder(tmp_path / "nope")


def test_subject_split_is_disjoint_and_stable():
    samples = [Sample(Path(f"{lab}/{subj}/{i}.jpg"), lab, f"{lab}/{subj}")
               for lab in ("a", "b", "c") for subj in range(10) for i in range(3)]
    train, val = subject_split(samples, 0.2, seed=3)
    assert set(train).isdisjoint(val) and len(train) + len(val) == len(samples)
    assert {samples[i].subject for i in train}.isdisjoint({samples[i].subject for i in val})
    assert len({samples[i].subject for i in val}) == 6  # 2 of 10 subjects per label
    assert subject_split(samples, 0.2, seed=3) == (train, val)


def test_single_subject_label_stays_in_training():
    samples = [Sample(Path("x.jpg"), "rare", "rare/one")]
    assert subject_split(samples, 0.5) == ([0], [])


def test_manifest(tmp_path):
    _touch(tmp_path / "imgs" / "a.jpg")
    (tmp_path / "m.csv").write_text("image,subject,label\nimgs/a.jpg,P1,synA\n")
    [sample] = load_manifest(tmp_path / "m.csv")
    assert sample.path == tmp_path / "imgs" / "a.jpg" and sample.subject == "P1" and sample.label == "synA"
    (tmp_path / "bad.csv").write_text("path,label\nx,y\n")
    with pytest.raises(ValueError, match="missing column"):
        load_manifest(tmp_path / "bad.csv")
    (tmp_path / "gone.csv").write_text("image,subject,label\nnope.jpg,P1,synA\n")
    with pytest.raises(FileNotFoundError):
        load_manifest(tmp_path / "gone.csv")


def test_gmdb_protocol():
    samples = []
    for lab, n_subjects in (("freq1", 10), ("freq2", 8), ("rare1", 3), ("rare2", 2), ("single", 1)):
        samples += [Sample(Path(f"{lab}{j}.jpg"), lab, f"{lab}/{j}") for j in range(n_subjects)]
    frequent, rare = gmdb_protocol(samples, n_rare_splits=10, seed=1)
    assert {samples[i].label for i in frequent.train + frequent.test} == {"freq1", "freq2"}
    assert len(rare) == 10
    for split in rare:
        test_labels = [samples[i].label for i in split.test]
        assert sorted(test_labels) == ["rare1", "rare2"]  # one held-out subject per rare disorder
        assert {samples[i].subject for i in split.train}.isdisjoint({samples[i].subject for i in split.test})
        assert "single" not in {samples[i].label for i in split.train + split.test}
    assert len({tuple(s.test) for s in rare}) > 1  # the splits differ


def test_leakage_check_fails_loudly():
    check_leakage(["a"], ["h1"], ["b"], ["h2"])
    with pytest.raises(LeakageError, match="1 subject"):
        check_leakage(["a", "b"], ["h1"], ["b"], ["h2"])
    with pytest.raises(LeakageError, match="1 identical"):
        check_leakage(["a"], ["h1"], ["b"], ["h1"])


def test_holdout_by_hash_is_stable():
    subjects = [f"s{i}" for i in range(2000)]
    held = [s for s in subjects if in_holdout(s, 0.2)]
    assert 300 < len(held) < 500
    assert held == [s for s in subjects if in_holdout(s, 0.2)]
