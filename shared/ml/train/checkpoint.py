"""Every save and load of a model or a training run goes through here.

A model checkpoint is a dict (format, arch, config, class names, weights, metrics, members), written
with ``torch.save`` and read with ``weights_only=True``. A training state file (``gestalt pretrain``'s
checkpoint, ``gestalt train``'s epoch state) is written to a temp file beside its path and then
replaces it, so an interrupted run never leaves half a file.
"""
from __future__ import annotations

import io
import os
from pathlib import Path

import torch

from shared.ml.nets.ensemble import RegionalEnsemble, prepare_for_inference

CHECKPOINT_FORMAT = 1


def save_checkpoint(model: RegionalEnsemble, class_names: list[str], metrics: dict, extra: dict | None = None) -> bytes:
    """A checkpoint dict (arch, config, class names, weights, metrics) as bytes."""
    state = {
        "format": CHECKPOINT_FORMAT,
        "arch": model.arch,
        "config": model.config,
        "class_names": list(class_names),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "metrics": metrics,
        "extra": extra or {},
    }
    if getattr(model, "identity", None) is not None:
        state["members"] = {"identity": model.identity.state()}
    buf = io.BytesIO()
    torch.save(state, buf)
    return buf.getvalue()


def load_checkpoint(data: bytes, device: torch.device | str = "cpu", compile: bool = False, runtime: str = "eager",
                    cache_dir: str | os.PathLike | None = None) -> tuple[RegionalEnsemble, dict]:
    """The ensemble of a checkpoint, ready for :func:`predict` on ``device``, and the checkpoint dict.

    Args:
        runtime, cache_dir: the CPU runtime and its cache (see :func:`prepare_for_inference`).
    """
    state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    if state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"unsupported checkpoint format {state.get('format')!r}")
    cfg = state["config"]
    model = RegionalEnsemble(tuple(cfg["regions"]), cfg["num_classes"], state["arch"], cfg["width"])
    model.load_state_dict(state["state_dict"])
    members = state.get("members") or {}
    if members.get("identity"):
        from shared.ml.members.identity import IdentityMember

        model.identity = IdentityMember.from_state(members["identity"])
    return prepare_for_inference(model, device, compile=compile, runtime=runtime, cache_dir=cache_dir), state


def write_state(path: Path, state: dict) -> None:
    """Write ``state`` to a temp file beside ``path``, then replace ``path`` (never half-written)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    buf = io.BytesIO()
    torch.save(state, buf)
    tmp.write_bytes(buf.getvalue())
    os.replace(tmp, path)


def read_state(path: Path, kind: str, what: str) -> dict | None:
    """The state file at ``path`` (None when there is none), which must be of ``kind``; ``what`` names
    that kind in the error for any other file."""
    path = Path(path)
    if not path.is_file():
        return None
    state = torch.load(io.BytesIO(path.read_bytes()), map_location="cpu", weights_only=True)
    if state.get("kind") != kind:
        raise ValueError(f"{path} is not {what}; choose another file")
    return state
