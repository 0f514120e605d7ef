"""Training data layouts and subject-disjoint splits."""
from __future__ import annotations

from pathlib import Path

import pytest

from shared.ml.training import Sample, scan_folder, subject_split, topk_accuracy


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


def test_topk():
    import numpy as np

    probs = np.array([[0.1, 0.7, 0.2], [0.5, 0.3, 0.2]])
    assert topk_accuracy(probs, np.array([1, 2]), 1) == 0.5
    assert topk_accuracy(probs, np.array([1, 2]), 3) == 1.0
