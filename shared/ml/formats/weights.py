"""Production model weights: where they are expected, where they come from, and their hashes.

Weights are never downloaded at run time. They load from ``GESTALT_WEIGHTS_DIR`` or
the torch hub checkpoint folder; ``gestalt weights fetch`` downloads them where a
network exists (a Docker build, an admin's machine) and checks their sha256.
"""
from __future__ import annotations

import functools
import hashlib
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import urllib3
from tqdm import tqdm


@dataclass(frozen=True)
class WeightFile:
    key: str  # how code asks for it
    name: str  # what uses it
    filename: str
    url: str
    sha256: str  # the full hash, or the prefix that torch hub puts in the file name

    def matches(self, digest: str) -> bool:
        return digest.startswith(self.sha256)


WEIGHTS = (
    WeightFile("retinaface_resnet50", "retinaface-resnet50 (retinaface-pytorch)",
               "retinaface_resnet50_2020-07-20-f168fae3c.zip",
               "https://github.com/ternaus/retinaface/releases/download/0.01/"
               "retinaface_resnet50_2020-07-20-f168fae3c.zip", "f168fae3c"),
    WeightFile("fan", "2D-FAN-4 landmarks (face-alignment)", "2DFAN4-11f355bf06.pth.tar",
               "https://www.adrianbulat.com/downloads/python-fan/2DFAN4-11f355bf06.pth.tar", "11f355bf06"),
    WeightFile("retinaface_mobilenet", "retinaface-mobilenet0.25 (face-alignment)", "retinaface_mobilenet0.25.pth",
               "https://www.adrianbulat.com/downloads/python-fan/retinaface_mobilenet0.25.pth",
               "38ec7bb3c9cbfe2f40edabc05fab970a6d648747cbc534092be85d5eb9b37ed0"),
)

WEIGHTS_BY_KEY = {w.key: w for w in WEIGHTS}


class WeightsMissing(FileNotFoundError):
    """A weight file is not in any search location; the message says where to put it."""


def search_dirs() -> list[Path]:
    """``GESTALT_WEIGHTS_DIR`` first, then the torch hub checkpoint folder."""
    dirs = []
    if os.environ.get("GESTALT_WEIGHTS_DIR"):
        dirs.append(Path(os.environ["GESTALT_WEIGHTS_DIR"]))
    torch_home = Path(os.environ.get("TORCH_HOME", Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")) / "torch"))
    dirs.append(torch_home.expanduser() / "hub" / "checkpoints")
    return dirs


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def locate(weight: WeightFile) -> Path | None:
    for directory in search_dirs():
        candidate = directory / weight.filename
        if candidate.is_file():
            return candidate
    return None


def require(weight: WeightFile, verify: bool = True) -> Path:
    """The verified path of a weight file, or :class:`WeightsMissing` with one clear line.

    ``verify=False`` skips the hash check (development with locally trained or random weights).
    """
    path = locate(weight)
    if path is None:
        raise WeightsMissing(f"{weight.name}: {weight.filename} not found in "
                             f"{', '.join(str(d) for d in search_dirs())}; run `gestalt weights fetch` where a "
                             f"network exists, or copy it from {weight.url}")
    if not verify:
        return path
    digest = sha256_of(path)
    if not weight.matches(digest):
        raise WeightsMissing(f"{weight.name}: {path} has sha256 {digest[:16]}..., expected {weight.sha256[:16]}...")
    return path


def status() -> list[dict]:
    rows = []
    for w in WEIGHTS:
        path = locate(w)
        state = "missing"
        if path is not None:
            state = "present" if w.matches(sha256_of(path)) else "wrong sha256"
        rows.append({"name": w.name, "file": w.filename, "url": w.url, "sha256": w.sha256,
                     "state": state, "path": str(path) if path else None})
    return rows


def fetch(target: Path, only: str | None = None) -> list[Path]:
    """Download missing weights into ``target``, verifying each hash before it is moved into place."""
    target.mkdir(parents=True, exist_ok=True)
    http = urllib3.PoolManager(retries=urllib3.Retry(total=3, backoff_factor=1))
    done = []
    for w in WEIGHTS:
        if only and only not in (w.filename, w.name):
            continue
        dest = target / w.filename
        if dest.is_file() and w.matches(sha256_of(dest)):
            done.append(dest)
            continue
        if not w.url.startswith("https://"):
            raise ValueError(f"refusing a non-https weight URL: {w.url}")
        with tempfile.NamedTemporaryFile(dir=target, delete=False, suffix=".part") as tmp:
            tmp_path = Path(tmp.name)
            try:
                response = http.request("GET", w.url, preload_content=False, timeout=urllib3.Timeout(10, 120))
                try:
                    if response.status != 200:
                        raise OSError(f"{w.url} answered HTTP {response.status}")
                    total = int(response.headers.get("Content-Length") or 0)
                    with tqdm(total=total or None, unit="B", unit_scale=True, desc=w.filename) as bar:
                        for block in response.stream(1 << 20):
                            tmp.write(block)
                            bar.update(len(block))
                finally:
                    response.release_conn()
            except BaseException:
                tmp_path.unlink(missing_ok=True)
                raise
        digest = sha256_of(tmp_path)
        if not w.matches(digest):
            tmp_path.unlink(missing_ok=True)
            raise ValueError(f"{w.filename}: downloaded sha256 {digest[:16]}... does not match {w.sha256[:16]}...")
        shutil.move(tmp_path, dest)
        done.append(dest)
    return done


@functools.cache
def mediapipe_model_sha(stem: str) -> str:
    """sha256 of a model file bundled in the mediapipe wheel (e.g. ``face_landmark``), for provenance."""
    import mediapipe

    root = Path(mediapipe.__file__).parent / "modules"
    files = sorted(root.rglob(f"{stem}*.tflite"))
    return sha256_of(files[0]) if files else "unknown"
