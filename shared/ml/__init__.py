"""Gestalt's machine learning, pure: numpy or torch in and out, no database, object store, portal or workers.

One sub-package per stage, each importing only from the stages below it (``lint-imports`` holds the order,
see ``pyproject.toml``):

``formats``, ``runtime``, ``phenotype``
    numpy-only formats (weight manifests, stored vectors, rankings); where and how a network runs (device,
    precision); the HPO phenotype ranking (torch-free).
``preprocess``
    a photo to its aligned face: decoding and the upload gate, detection, landmarks, alignment, region crops,
    the face chip, the quality gate, measurements, the preprocessing cache.
``nets``
    architectures only: CASIA-Net, the regional ensemble, the identity encoder and dlib's file format.
``evaluate``
    statistics (top-k, bootstrap CIs, tests) and the evaluation report; arrays in, files out.
``members``
    the ensemble's members and how they combine into one ranking: the identity member, the gallery.
``explain``
    saliency heatmaps of the members that decide.
``train``
    training data, splits, the recipe, the loop, pretraining, heads, fitting members, checkpoints.

Each package's ``__init__`` names its public entry points and imports them on first use, so that importing a
package never loads torch.
"""
from __future__ import annotations

import importlib
from collections.abc import Callable


def lazy_exports(package: str, exports: dict[str, str]) -> tuple[Callable[[str], object], Callable[[], list[str]]]:
    """A package's ``__getattr__`` and ``__dir__`` (PEP 562) for ``{name: module}``: ``name`` is imported from
    ``package.module`` on first use."""

    def __getattr__(name: str) -> object:
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(f"{package}.{exports[name]}"), name)

    def __dir__() -> list[str]:
        return sorted(exports)

    return __getattr__, __dir__
