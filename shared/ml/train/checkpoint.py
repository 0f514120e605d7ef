"""Every save and load of a model or a training run goes through here.

A model checkpoint is a dict (format, class names, each member's state, the stack, the OOD reference, the
preprocessing contract, metrics), written with ``torch.save`` and read with ``weights_only=True``. A training
state file (``gestalt pretrain``'s checkpoint, ``gestalt train``'s epoch state) is written to a temp file beside
its path and then replaces it, so an interrupted run never leaves half a file.
"""
from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import torch

from shared.ml.members.casia import CasiaRegions
from shared.ml.members.encoder_regions import EncoderRegions
from shared.ml.members.identity import MEMBER, IdentityMember, OODReference
from shared.ml.members.model import CASIA, ENCODER, GestaltModel, preprocessing_contract
from shared.ml.members.stack import MEAN, Stack
from shared.ml.nets.ensemble import prepare_for_inference

# 2: a model of members (any kinds, see shared.ml.members.base.KINDS) and a stack; 1: the regional CASIA-Nets with
# an optional identity member at one weight (still read, as an equivalent model of format 2).
CHECKPOINT_FORMAT = 2
# The regional CASIA-Nets alone, as `gestalt pretrain` writes them (and models were saved before format 2).
CASIA_FORMAT = 1
# The member kinds a checkpoint may hold.
KINDS = {cls.kind: cls for cls in (CasiaRegions, EncoderRegions, IdentityMember)}


def save_checkpoint(model: GestaltModel, metrics: dict, extra: dict | None = None) -> bytes:
    """A checkpoint (format, class names, members, stack, OOD reference, contract, metrics) as bytes."""
    state = {
        "format": CHECKPOINT_FORMAT,
        "class_names": list(model.class_names),
        "backbone": model.backbone,
        "members": [{"kind": m.kind, **m.state()} for m in model.members],
        "stack": model.stack.state(),
        "ood": model.ood.state() if model.ood is not None else None,
        "descriptors": {"names": list(model.descriptor_names), "encoder_sha": model.encoder_sha, "flip": model.flip,
                        "gallery": list(model.gallery_names)},
        "contract": model.contract,
        "metrics": metrics,
        "extra": extra or {},
    }
    buf = io.BytesIO()
    torch.save(state, buf)
    return buf.getvalue()


def load_checkpoint(data: bytes, device: torch.device | str = "cpu", compile: bool = False, runtime: str = "eager",
                    cache_dir: str | os.PathLike | None = None) -> tuple[GestaltModel, dict]:
    """The model of a checkpoint, ready for :func:`shared.ml.members.model.predict` on ``device``, and the
    checkpoint dict. A format-1 checkpoint (regional CASIA-Nets, an identity member at one weight) loads as the
    equivalent model.

    Args:
        runtime, cache_dir: the CPU runtime of networks the model holds, and its cache (see
            :func:`shared.ml.nets.ensemble.prepare_for_inference`).
    """
    state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    fmt = state.get("format")
    if fmt == CASIA_FORMAT:
        model = _from_format_1(state)
    elif fmt == CHECKPOINT_FORMAT:
        members = []
        for entry in state["members"]:
            kind = entry["kind"]
            if kind not in KINDS:
                raise ValueError(f"unknown member kind {kind!r} in the checkpoint")
            members.append(KINDS[kind].from_state(entry))
        ood, desc = state.get("ood"), state.get("descriptors") or {}
        model = GestaltModel(list(state["class_names"]), members, Stack.from_state(state["stack"]),
                             state.get("backbone", ENCODER), OODReference.from_state(ood) if ood else None,
                             tuple(desc.get("names") or ()), desc.get("encoder_sha", ""), bool(desc.get("flip", True)),
                             state.get("contract") or preprocessing_contract(), tuple(desc.get("gallery") or ()))
    else:
        raise ValueError(f"unsupported checkpoint format {fmt!r}")
    for member in model.members:
        if isinstance(member, CasiaRegions):
            prepare_for_inference(member.net, device, compile=compile, runtime=runtime, cache_dir=cache_dir)
    return model, state


def _from_format_1(state: dict) -> GestaltModel:
    """A format-1 checkpoint as a model: its regions averaged at (1 - w) and its identity member at w, by a
    weighted mean of probabilities (:data:`shared.ml.members.stack.MEAN`), as it scored when it was trained."""
    casia = CasiaRegions.from_state({k: state[k] for k in ("arch", "config", "state_dict")})
    members: list = [casia]
    identity = (state.get("members") or {}).get("identity")
    weight, ood, names, sha, flip = 0.0, None, (), "", True
    if identity:
        member = IdentityMember.from_state(identity)
        members.append(member)
        weight, sha, flip, names = float(identity["weight"]), member.encoder_sha, member.flip, (MEMBER,)
        ood = OODReference.from_state(identity["ood"]) if identity.get("ood") else None
    regions = casia.names
    weights = [(1.0 - weight) / len(regions)] * len(regions) + ([weight] if identity else [])
    stack = Stack(tuple(regions) + ((MEMBER,) if identity else ()), np.asarray(weights), None, MEAN,
                  {"source": "checkpoint format 1: one identity weight chosen on the validation split"})
    return GestaltModel(list(state["class_names"]), members, stack, CASIA, ood, names, sha, flip,
                        gallery_names=names)


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
