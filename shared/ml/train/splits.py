"""Subject-disjoint splits, the GMDB frequent/rare protocol, and the leakage check."""
from __future__ import annotations

import hashlib
import random
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

# GestaltMatcher's protocol: a disorder is "frequent" with more than 6 subjects,
# "rare" with 2 to 6; rare disorders are tested one held-out subject at a time.
FREQUENT_MIN_SUBJECTS = 7
RARE_MIN_SUBJECTS = 2


class Labelled(Protocol):
    label: str
    subject: str


class LeakageError(AssertionError):
    """A subject or an image is on both sides of a split."""


def subject_split(samples: Sequence[Labelled], val_fraction: float, seed: int = 0) -> tuple[list[int], list[int]]:
    """Indices of train and held-out samples; no subject is on both sides.

    Per label, ``ceil(val_fraction * subjects)`` subjects are held out, leaving at
    least one subject in training. Labels with a single subject stay in training.
    """
    rng = random.Random(seed)
    by_label: dict[str, set[str]] = defaultdict(set)
    for s in samples:
        by_label[s.label].add(s.subject)
    held: set[str] = set()
    for label in sorted(by_label):
        subjects = sorted(by_label[label])
        rng.shuffle(subjects)
        n_val = min(len(subjects) - 1, int(np.ceil(val_fraction * len(subjects)))) if val_fraction > 0 else 0
        held.update(subjects[:n_val])
    train = [i for i, s in enumerate(samples) if s.subject not in held]
    val = [i for i, s in enumerate(samples) if s.subject in held]
    return train, val


def _subject_hash(subject: str, salt: str) -> float:
    digest = hashlib.sha256(f"{salt}:{subject}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def in_holdout(subject: str, fraction: float, salt: str = "gestalt-holdout") -> bool:
    """A stable holdout assignment by hash: a subject stays on its side as data grows."""
    return _subject_hash(subject, salt) < fraction


def stratified_holdout(subjects: Sequence[str], labels: Sequence[str], fraction: float,
                       salt: str = "gestalt-holdout") -> list[bool]:
    """Per row, whether its subject is held out: of each label's subjects, the ``fraction`` (at least one, and
    never all) with the lowest stable hash. For a first split of few patients, where :func:`in_holdout` alone may
    hold out no patient of a syndrome, or none at all."""
    by_label: dict[str, set[str]] = {}
    for subject, label in zip(subjects, labels, strict=True):
        by_label.setdefault(label, set()).add(subject)
    held: set[str] = set()
    for members in by_label.values():
        if len(members) < 2:
            continue
        ranked = sorted(members, key=lambda s: _subject_hash(s, salt))
        held.update(ranked[:min(len(ranked) - 1, max(1, round(fraction * len(ranked))))])
    return [s in held for s in subjects]


@dataclass(frozen=True)
class Split:
    train: list[int]
    test: list[int]


def gmdb_protocol(samples: Sequence[Labelled], n_rare_splits: int = 10, test_fraction: float = 0.1,
                  seed: int = 0) -> tuple[Split, list[Split]]:
    """The frequent split and ``n_rare_splits`` rare splits.

    Frequent disorders (more than 6 subjects) get one subject-disjoint split.
    For rare disorders (2-6 subjects), each rare split holds out one random subject
    per disorder; the others (with all frequent data) form the gallery/train side.
    """
    subjects: dict[str, set[str]] = defaultdict(set)
    for s in samples:
        subjects[s.label].add(s.subject)
    frequent = {lab for lab, subs in subjects.items() if len(subs) >= FREQUENT_MIN_SUBJECTS}
    rare = {lab for lab, subs in subjects.items() if RARE_MIN_SUBJECTS <= len(subs) < FREQUENT_MIN_SUBJECTS}
    freq_idx = [i for i, s in enumerate(samples) if s.label in frequent]
    tr, te = subject_split([samples[i] for i in freq_idx], test_fraction, seed)
    frequent_split = Split([freq_idx[i] for i in tr], [freq_idx[i] for i in te])
    rare_splits = []
    rng = random.Random(seed)
    for _ in range(n_rare_splits):
        held = {rng.choice(sorted(subjects[lab])) for lab in sorted(rare)}
        test = [i for i, s in enumerate(samples) if s.label in rare and s.subject in held]
        train = [i for i, s in enumerate(samples) if (s.label in rare or s.label in frequent) and s.subject not in held]
        rare_splits.append(Split(train, test))
    return frequent_split, rare_splits


def check_leakage(train_subjects: Iterable[str], train_hashes: Iterable[str],
                  test_subjects: Iterable[str], test_hashes: Iterable[str]) -> None:
    """Fail loudly when a subject or an identical image is on both sides."""
    subjects = set(train_subjects) & set(test_subjects)
    images = set(train_hashes) & set(test_hashes)
    if subjects or images:
        raise LeakageError(
            f"train/test leakage: {len(subjects)} subject(s) {sorted(subjects)[:5]} and {len(images)} identical "
            f"image(s) {[h[:12] for h in sorted(images)[:5]]} are on both sides")
