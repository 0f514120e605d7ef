"""Seeding the gallery from a clinic's archive: ``DIR/<syndrome>/<patient>/<photo>`` as diagnosed, consented cases.

``gestalt import photos``, the API (``POST /api/v1/admin/imports/photos``) and the admin console's Imports page read
the folder with :func:`plan_photo_folder` and write it with :func:`shared.imports.write_cases`, all of it or nothing.

- A ``<syndrome>`` folder is named by a catalogue name (``Kabuki syndrome``) or an OMIM/Orphanet id
  (``OMIM:147920``, ``ORPHA:2322``; ``OMIM_147920`` where a file system allows no colon), or mapped to one by a
  labels file: CSV with the columns ``folder,syndrome`` (``,`` or ``;`` between them, UTF-8).
- A ``<patient>`` folder's name is the case's pseudonymous reference (``PATIENT_REF``: letters, digits, ``.``, ``_``,
  ``-``; never a name) and names one patient of the import: it may stand under one syndrome only. The case's
  ``external_id`` is ``photos-<patient>``, so running the import again skips the patients it has.
- Every photo passes the portal's upload gate with its bounds (:func:`shared.imports.check_photo`).
- Nothing else may be there: a file beside the syndrome folders or directly in one, a folder inside a patient folder,
  a link to a place outside DIR, a special file. What an operating system leaves (``.DS_Store``, ``__MACOSX``,
  ``Thumbs.db``, other names starting with ``.``) is skipped and counted.
- Consent to reuse the photos is stated for the whole import; without it nothing is imported.

Every problem is one line with its path (relative to DIR), and any problem refuses the whole import.
"""
from __future__ import annotations

import csv
import io
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy.orm import Session

from shared.archives import ignored
from shared.catalog import catalog_loaded, find_syndrome
from shared.imports import ImportRefused, PlannedCase, check_photo
from shared.ml.preprocess.imaging import ImageRejected
from shared.models import Syndrome
from shared.phenopackets import PATIENT_REF

CONSENT_REQUIRED = ("the gallery holds only photos of patients who consented to their reuse: state that every "
                    "patient of this import did")
EXTERNAL_PREFIX = "photos-"
LABELS_MAX_BYTES = 1 << 20
PATIENT_RULE = "1-64 letters, digits, '.', '_' or '-' (a pseudonymous reference, never a name)"
WINDOWS_CODE = re.compile(r"^(OMIM|ORPHA)[_ ](\d{1,7})$", re.IGNORECASE)


def external_id(patient_ref: str) -> str:
    """The id that marks a case as this import's patient (a plain name, so it exports as a Phenopacket id)."""
    return EXTERNAL_PREFIX + patient_ref


@dataclass
class FolderPlan:
    cases: list[PlannedCase]
    ignored: list[str] = field(default_factory=list)  # system files skipped, by path

    @property
    def photos(self) -> int:
        return sum(len(c.photos) for c in self.cases)


def read_labels(data: bytes, name: str) -> tuple[dict[str, tuple[str, str]], list[str]]:
    """``{folder: (syndrome, "NAME line N")}`` from a labels file's bytes, and its problems."""
    if len(data) > LABELS_MAX_BYTES:
        return {}, [f"{name}: {len(data) / 2**20:.1f} MB; a labels file has at most 1 MB"]
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        return {}, [f"{name}: not UTF-8 text; save it as \"CSV UTF-8\""]
    try:
        dialect = csv.Sniffer().sniff(text[:4096], delimiters=",;\t")
    except csv.Error:
        dialect = csv.excel
    reader = csv.reader(io.StringIO(text), dialect)
    try:
        header = [h.strip().lower() for h in next(reader, [])]
        if "folder" not in header or "syndrome" not in header:
            return {}, [f"{name}: the first line must name the columns folder,syndrome"]
        mapping: dict[str, tuple[str, str]] = {}
        problems = []
        for row in reader:
            where = f"{name} line {reader.line_num}"
            values = dict(zip(header, (v.strip() for v in row), strict=False))
            folder, syndrome = values.get("folder", ""), values.get("syndrome", "")
            if not any(v.strip() for v in row):
                continue
            if not folder or not syndrome:
                problems.append(f"{where}: needs both a folder and a syndrome")
            elif folder in mapping and mapping[folder][0] != syndrome:
                problems.append(f"{where}: folder {folder!r} is mapped again, to another syndrome")
            else:
                mapping.setdefault(folder, (syndrome, where))
    except csv.Error as exc:
        return {}, [f"{name} line {reader.line_num}: not valid CSV ({exc})"]
    return mapping, problems


def _syndrome(db: Session, ref: str) -> Syndrome | None:
    windows = WINDOWS_CODE.match(ref)
    return find_syndrome(db, f"{windows.group(1)}:{windows.group(2)}" if windows else ref)


def _resolve_labels(db: Session, mapping: dict[str, tuple[str, str]], problems: list[str]) -> dict[str, Syndrome]:
    found = {}
    for folder, (ref, where) in mapping.items():
        syndrome = _syndrome(db, ref)
        if syndrome is None:
            problems.append(f"{where}: unknown syndrome {ref[:100]!r}: not a catalogue name or an OMIM/ORPHA id")
        else:
            found[folder] = syndrome
    return found


class _Walk:
    """The folder's entries, level by level, with the problems and skipped names found on the way."""

    def __init__(self, root: Path):
        self.root = root.resolve()
        self.problems: list[str] = []
        self.ignored: list[str] = []

    def children(self, folder: Path, shown: str) -> list[tuple[Path, str]]:
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError as exc:
            self.problems.append(f"{shown or '.'}: cannot be read ({exc.strerror})")
            return []
        out = []
        for entry in entries:
            path, rel = Path(entry.path), f"{shown}/{entry.name}" if shown else entry.name
            if ignored(entry.name):
                self.ignored.append(rel)
            elif self._inside(path, rel) and self._plain(path, rel):
                out.append((path, rel))
        return out

    def _inside(self, path: Path, rel: str) -> bool:
        if not path.is_symlink():
            return True
        try:
            target = path.resolve(strict=True)
        except (OSError, RuntimeError):
            self.problems.append(f"{rel}: a link that leads nowhere")
            return False
        if not target.is_relative_to(self.root):
            self.problems.append(f"{rel}: a link to a place outside the import folder; copy the photo in")
            return False
        return True

    def _plain(self, path: Path, rel: str) -> bool:
        if path.is_dir() or path.is_file():
            return True
        self.problems.append(f"{rel}: not a plain file or folder")
        return False


def plan_photo_folder(db: Session, folder: Path, *, consent: bool, kind: str = "clinical",
                      labels: bytes | None = None, labels_name: str = "labels") -> FolderPlan:
    """Every patient of ``folder`` read and checked as a case with a confirmed diagnosis of ``kind`` and consent,
    or :class:`shared.imports.ImportRefused` with every problem found (nothing is written either way)."""
    if not consent:
        raise ImportRefused([CONSENT_REQUIRED])
    mapping, problems = read_labels(labels, labels_name) if labels is not None else ({}, [])
    by_label = _resolve_labels(db, mapping, problems)
    walk = _Walk(folder)
    plans: list[PlannedCase] = []
    seen: dict[str, str] = {}  # patient -> its folder
    syndromes = walk.children(folder, "")
    if not syndromes:
        walk.problems.append(f"{folder}: no <syndrome> folders; the layout is <syndrome>/<patient>/<photo>")
    for path, rel in syndromes:
        if not path.is_dir():
            walk.problems.append(f"{rel}: a file beside the syndrome folders; photos go in <syndrome>/<patient>/")
            continue
        syndrome = _folder_syndrome(db, path.name, mapping, by_label, walk.problems)
        patients = walk.children(path, rel)
        if not patients:
            walk.problems.append(f"{rel}/: no patient folders in it")
        for patient, shown in patients:
            plan = _plan_patient(walk, patient, shown, seen)
            if plan is not None:
                plan.syndrome, plan.kind, plan.consent = syndrome, kind, True
                plans.append(plan)
    problems += walk.problems
    if problems:
        raise ImportRefused(problems)
    return FolderPlan(cases=plans, ignored=walk.ignored)


def _folder_syndrome(db: Session, name: str, mapping: dict, by_label: dict[str, Syndrome],
                     problems: list[str]) -> Syndrome | None:
    if name in mapping:
        return by_label.get(name)  # an unknown one is a problem of its labels line
    syndrome = _syndrome(db, name)
    if syndrome is None:
        empty = "" if catalog_loaded(db) else " (the catalogue is empty: run `gestalt catalog load`)"
        problems.append(f"{name}/: not a catalogue name or an OMIM/ORPHA id (such as OMIM:147920 or ORPHA:2322), "
                        f"and the labels file does not map it{empty}")
    return syndrome


def _plan_patient(walk: _Walk, folder: Path, shown: str, seen: dict[str, str]) -> PlannedCase | None:
    name = folder.name
    if not folder.is_dir():
        walk.problems.append(f"{shown}: a file directly in a syndrome folder; put each patient's photos in a folder "
                             "of their own (<syndrome>/<patient>/<photo>)")
        return None
    ok = True
    if not PATIENT_REF.match(name):
        walk.problems.append(f"{shown}/: a patient folder's name must be {PATIENT_RULE}")
        ok = False
    elif name in seen:
        walk.problems.append(f"{shown}/: patient {name} is also in {seen[name]}/; a patient has one diagnosis")
        ok = False
    seen.setdefault(name, shown)
    plan = PlannedCase(source=shown, external_id=external_id(name), patient_ref=name)
    photos = walk.children(folder, shown)
    if not photos:
        walk.problems.append(f"{shown}/: no photos in it")
    for path, rel in photos:
        if path.is_dir():
            walk.problems.append(f"{rel}/: a folder inside a patient folder; photos go directly in "
                                 "<syndrome>/<patient>/")
            continue
        try:
            plan.photos.append(check_photo(path, rel))
        except ImageRejected as exc:
            walk.problems.append(f"{rel}: {exc.reason}")
        except OSError as exc:
            walk.problems.append(f"{rel}: cannot be read ({exc.strerror})")
    return plan if ok else None
