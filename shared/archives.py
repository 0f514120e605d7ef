"""Unpacking a zip archive that someone uploaded, only after its directory says it is safe to.

Before a byte is unpacked, :func:`check_archive` reads the archive's end record (the entry count and the size of
its directory, before :mod:`zipfile` parses that directory) and then every entry's header, and refuses, with every
problem at once: more entries than allowed, an entry or a total that unpacks to more than allowed, an entry that
compresses more than a photo can (a zip bomb), an absolute path, a ``..`` part, a backslash, a symbolic link or any
other special file, an encrypted entry, an unknown compression method, two entries of one name.
:func:`unpack_archive` then writes the entries inside the destination only (never through a link; no file is
replaced), stopping at the sizes the directory declared; :mod:`zipfile` checks each entry's CRC. A refusal is an
:class:`shared.imports.ImportRefused`: nothing was unpacked, nothing is imported.
"""
from __future__ import annotations

import os
import re
import shutil
import stat
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO

from shared.imports import ImportRefused

# What an operating system or archiver puts beside the files: skipped, never unpacked or imported.
IGNORED = re.compile(r"^(\..*|__MACOSX|Thumbs\.db|desktop\.ini)$", re.IGNORECASE)
METHODS = {zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA}
# A directory record is 46 bytes and a name; with its extra fields and comment, this is more than a real one needs.
MAX_RECORD_BYTES = 4096
CHUNK = 1 << 20


@dataclass(frozen=True)
class ArchiveLimits:
    max_entries: int
    max_total_bytes: int
    max_entry_bytes: int
    max_ratio: float

    @classmethod
    def from_settings(cls, settings) -> ArchiveLimits:
        return cls(max_entries=settings.import_max_entries, max_total_bytes=settings.import_max_unpacked_mb << 20,
                   max_entry_bytes=settings.max_upload_bytes, max_ratio=settings.import_max_ratio)


def ignored(part: str) -> bool:
    """A name that an operating system writes beside a user's files (``.DS_Store``, ``__MACOSX``, ``Thumbs.db``)."""
    return bool(IGNORED.match(part))


def _mb(n: int) -> str:
    return f"{n / 2**20:.1f} MB"


def _end_record(fh: IO[bytes], limits: ArchiveLimits) -> None:
    """The entry count and directory size from the end record, before the directory is read."""
    try:
        end = zipfile._EndRecData(fh)  # the stdlib's reader of the end record (and its zip64 form)
    except OSError:
        end = None
    if end is None:
        raise ImportRefused(["the file is not a zip archive (or it is damaged); upload a .zip of "
                              "<syndrome>/<patient>/<photo> folders"])
    entries, directory = end[zipfile._ECD_ENTRIES_TOTAL], end[zipfile._ECD_SIZE]
    if entries > limits.max_entries or directory > limits.max_entries * MAX_RECORD_BYTES:
        raise ImportRefused([f"the archive holds {entries} entries; at most {limits.max_entries} are accepted "
                              "(GESTALT_IMPORT_MAX_ENTRIES): split it, or import it on the server with "
                              "`gestalt import photos`"])


def _entry_problems(info: zipfile.ZipInfo, limits: ArchiveLimits) -> list[str]:
    name, problems = info.filename, []
    parts = PurePosixPath(name).parts
    mode = info.external_attr >> 16
    if "\\" in name:
        problems.append("a backslash in the name; archive the folders with a zip tool that writes '/'")
    if name.startswith("/") or re.match(r"^[A-Za-z]:", name):
        problems.append("an absolute path; entries must be relative to the archive")
    if ".." in parts:
        problems.append("a '..' part would unpack outside the archive's folder")
    if stat.S_ISLNK(mode):
        problems.append("a symbolic link; the archive must hold the photos themselves")
    elif mode and stat.S_IFMT(mode) not in (0, stat.S_IFREG, stat.S_IFDIR):
        problems.append("not a plain file or folder")
    if info.flag_bits & 0x1:
        problems.append("encrypted; upload an archive without a password")
    if info.compress_type not in METHODS:
        problems.append(f"compressed with method {info.compress_type}, which cannot be read; use deflate")
    if info.file_size > limits.max_entry_bytes:
        problems.append(f"unpacks to {_mb(info.file_size)}; an entry may hold at most {_mb(limits.max_entry_bytes)} "
                        "(GESTALT_MAX_UPLOAD_MB)")
    ratio = info.file_size / max(info.compress_size, 1)
    if ratio > limits.max_ratio:
        problems.append(f"compressed {ratio:.0f} times; no photo compresses more than {limits.max_ratio:g} times "
                        "(GESTALT_IMPORT_MAX_RATIO): a zip bomb?")
    return [f"{name[:200]}: {p}" for p in problems]


def check_archive(fh: IO[bytes], limits: ArchiveLimits) -> zipfile.ZipFile:
    """The open archive when every entry is safe to unpack, else :class:`ImportRefused` with every problem."""
    _end_record(fh, limits)
    try:
        archive = zipfile.ZipFile(fh)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, ValueError, EOFError) as exc:
        raise ImportRefused([f"the archive cannot be read: {exc}"]) from exc
    infos = archive.infolist()
    problems = [f"the archive holds {len(infos)} entries; at most {limits.max_entries} are accepted"] \
        if len(infos) > limits.max_entries else []
    seen: set[tuple[str, ...]] = set()
    total = 0
    for info in infos:
        problems += _entry_problems(info, limits)
        parts = PurePosixPath(info.filename).parts
        if parts in seen:
            problems.append(f"{info.filename[:200]}: the archive holds two entries of this name")
        seen.add(parts)
        total += info.file_size
    if total > limits.max_total_bytes:
        problems.append(f"the archive unpacks to {_mb(total)}; at most {_mb(limits.max_total_bytes)} are accepted "
                        "(GESTALT_IMPORT_MAX_UNPACKED_MB): split it, or import it on the server with "
                        "`gestalt import photos`")
    if problems:
        archive.close()
        raise ImportRefused(problems)
    return archive


def unpack_archive(fh: IO[bytes], dest: Path, limits: ArchiveLimits) -> Path:
    """Check the archive (:func:`check_archive`), then unpack it into the empty folder ``dest``. Returns the
    folder that holds the ``<syndrome>`` folders: ``dest``, or the one folder that holds them all (an archive of the
    folder rather than of its contents)."""
    with check_archive(fh, limits) as archive:
        root = dest.resolve()
        for info in archive.infolist():
            parts = PurePosixPath(info.filename).parts
            if not parts or any(ignored(p) for p in parts):
                continue
            target = root.joinpath(*parts)
            try:
                if info.is_dir():
                    target.mkdir(parents=True, exist_ok=True)
                else:
                    _unpack_entry(archive, info, target, root)
            except (zipfile.BadZipFile, zlib.error, EOFError, OSError, NotImplementedError) as exc:
                raise ImportRefused([f"{info.filename[:200]}: cannot be unpacked ({exc}); the archive is damaged "
                                      "or two entries' names collide"]) from exc
    return _layout_root(root)


def _unpack_entry(archive: zipfile.ZipFile, info: zipfile.ZipInfo, target: Path, root: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    if not target.parent.resolve().is_relative_to(root):
        raise OSError(f"{target.parent} is outside the archive's folder")
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "wb") as out, archive.open(info) as src:
        # zipfile stops at the size the directory declared, and checks the CRC at the end.
        shutil.copyfileobj(src, out, CHUNK)


def _layout_root(root: Path) -> Path:
    """``root``, or its one folder when that holds every file three levels down (``top/<syndrome>/<patient>/x``)."""
    top = [p for p in root.iterdir() if not ignored(p.name)]
    if len(top) != 1 or not top[0].is_dir():
        return root
    depths = {len(p.relative_to(top[0]).parts) for p in top[0].rglob("*") if p.is_file()
              and not any(ignored(part) for part in p.relative_to(top[0]).parts)}
    return top[0] if depths == {3} else root
