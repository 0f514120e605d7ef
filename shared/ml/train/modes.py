"""Training modes (multiclass, binary, specialised): the samples and class names of each, and the
mapping of original labels onto the classes that a binary model stores and evaluation applies."""
from __future__ import annotations

import dataclasses

from shared.ml.train.data import Sample

# Binary mode: every label but the positive one becomes this class.
BINARY_NEGATIVE = "others"
MODES = ("multiclass", "binary", "specialised")


def select_task(samples: list[Sample], mode: str, positive: str | None = None,
                classes: list[str] | None = None) -> tuple[list[Sample], list[str]]:
    """Samples and class names of a training mode.

    * ``multiclass``: every label is a class.
    * ``binary``: ``positive`` against all other labels (merged into ``others``).
    * ``specialised``: only the samples of ``classes`` (e.g. the genotypes of one syndrome).

    Raises:
        ValueError: for a missing or unknown positive label or class (all unknown ones are listed).
    """
    labels = sorted({s.label for s in samples})
    if mode == "multiclass":
        return samples, labels
    if mode == "binary":
        if not positive:
            raise ValueError("binary mode needs a positive label")
        if positive not in labels:
            raise ValueError(f"unknown positive label {positive!r}; the data has: {', '.join(labels[:20])}")
        if positive == BINARY_NEGATIVE:
            raise ValueError(f"the positive label cannot be {BINARY_NEGATIVE!r}")
        if len(labels) < 2:
            raise ValueError("binary mode needs at least one other label")
        return ([dataclasses.replace(s, label=s.label if s.label == positive else BINARY_NEGATIVE) for s in samples],
                [positive, BINARY_NEGATIVE])
    if mode == "specialised":
        wanted = sorted(set(classes or []))
        if len(wanted) < 2:
            raise ValueError("specialised mode needs at least two classes")
        unknown = [c for c in wanted if c not in labels]
        if unknown:
            raise ValueError(f"{len(unknown)} unknown class(es): {', '.join(unknown[:20])}")
        return [s for s in samples if s.label in wanted], wanted
    raise ValueError(f"unknown mode {mode!r} ({', '.join(MODES)})")


def binary_label_map(labels: list[str] | set[str], positive: str) -> dict[str, str]:
    """Binary mode's mapping of every original label onto ``positive`` or ``others``, stored with the model."""
    return {label: positive if label == positive else BINARY_NEGATIVE for label in sorted(labels)}


def apply_label_map(samples: list[Sample], class_names: list[str], extra: dict) -> tuple[list[Sample], dict[str, str]]:
    """Test samples with the labels the model was trained on: the mapping ``gestalt train`` applied.

    A binary model's checkpoint stores its ``label_map`` (e.g. ``healthy -> others``); a label it has
    not seen (or an older checkpoint without a map) goes to the negative class. Other models use their
    class names as they are (an unknown label is then an error in :func:`prepare`).

    Returns:
        The samples and the mapping applied (original label -> class name; only labels that changed).
    """
    mapping = dict(extra.get("label_map") or {})
    binary = extra.get("mode") == "binary" or (len(class_names) == 2 and class_names[1] == BINARY_NEGATIVE)
    negative = extra.get("negative") or (class_names[1] if binary else None)
    applied: dict[str, str] = {}
    out = []
    for s in samples:
        target = s.label
        if s.label not in class_names:
            if s.label in mapping:
                target = mapping[s.label]
            elif binary:
                target = negative
        if target != s.label:
            applied[s.label] = target
            s = dataclasses.replace(s, label=target)
        out.append(s)
    return out, applied
