"""Running the identity encoder for members: in one pass, the identity descriptor (128-d, the network's own output),
each crop's stage features (the 256-channel stage's output averaged over space, what the regional members read),
and, when a member fine-tunes a tail of the network, the activations that tail goes on from.

Why stage features for regions: the network's last block and projection are trained to tell whole faces apart; a
region's cut is not a whole face, and the 256-d stage features before them keep more of what a region shows. On
the screening example (docs/examples/screening), trained on ORL and tested on the colour photos of faces/people,
the upper and lower face's calls rose from 0.90 and 0.81 with the 128-d descriptor to 0.98 and 0.92 with them.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from shared.ml.nets.encoder import (
    DESCRIPTOR_DIM,
    FEATURE_BLOCK,
    FEATURE_DIM,
    INPUT_SCALE,
    DlibFaceResNet,
    _as_uint8_nhwc,
    _batches,
    encode,
)
from shared.ml.runtime.device import autocast_context


@dataclass
class EncoderOutput:
    descriptors: np.ndarray  # N x 128, the identity descriptor (mean over the views)
    features: np.ndarray  # N x 256, the stage features (mean over the views)
    activations: np.ndarray | None = None  # N x V x C x H x W entering the block asked for (V = 2 with flip)


@torch.inference_mode()
def run_encoder(model: DlibFaceResNet, chips: np.ndarray, flip: bool = False, block: int | None = None,
                batch_size: int = 64, precision: str = "auto") -> EncoderOutput:
    """One pass of the encoder over 150 px uint8 RGB crops ``N x 150 x 150 x 3``: descriptors, stage features and,
    with ``block`` (at most :data:`FEATURE_BLOCK`), the activations entering that block. With ``flip`` each crop and
    its mirror image go through together and the descriptors and features are their means."""
    if block is not None and not 0 <= block <= FEATURE_BLOCK:
        raise ValueError(f"block must be within 0..{FEATURE_BLOCK}, got {block}")
    x_all = _as_uint8_nhwc(chips)
    device = next(model.parameters()).device
    runner = getattr(model, "runner", None) if block is None else None  # a tail's activations need torch
    descs, feats, acts = [], [], []
    for part in _batches(len(x_all), batch_size):
        x = x_all[part].to(device, non_blocking=True).permute(0, 3, 1, 2).float()
        n = len(x)
        views = torch.cat([x, x.flip(-1)]) if flip else x
        if runner is not None:
            d, f = (torch.from_numpy(out) for out in runner(views))
            descs.append((d[:n] + d[n:]) / 2 if flip else d)
            feats.append((f[:n] + f[n:]) / 2 if flip else f)
            continue
        with autocast_context(device, precision):
            h = (views - model.mean) / INPUT_SCALE
            if model.channels_last:
                h = h.contiguous(memory_format=torch.channels_last)
            h = model.pool(F.relu(model.stem(h)))
            if block is not None:
                h = model.blocks[:block](h)
                a = h.float().cpu()
                acts.append(torch.stack([a[:n], a[n:]], 1) if flip else a[:, None])
                h = model.blocks[block:FEATURE_BLOCK](h)
            else:
                h = model.blocks[:FEATURE_BLOCK](h)
            f = h.mean(dim=(2, 3)).float()
            d = model.fc(model.blocks[FEATURE_BLOCK:](h).mean(dim=(2, 3))).float()
        descs.append(((d[:n] + d[n:]) / 2 if flip else d).cpu())
        feats.append(((f[:n] + f[n:]) / 2 if flip else f).cpu())
    if not descs:
        return EncoderOutput(np.zeros((0, DESCRIPTOR_DIM), np.float32), np.zeros((0, FEATURE_DIM), np.float32),
                             None if block is None else np.zeros((0, 1 + flip, 0, 0, 0), np.float32))
    return EncoderOutput(torch.cat(descs).numpy(), torch.cat(feats).numpy(),
                         torch.cat(acts).numpy() if block is not None else None)


class EncoderTail(nn.Module):
    """The encoder's residual blocks from ``block`` to the end of its 256-channel stage: the part a regional member
    may fine-tune on its region's cuts (the blocks before stay frozen and shared). Its output, averaged over space,
    replaces the frozen stage features."""

    def __init__(self, encoder: DlibFaceResNet, block: int):
        super().__init__()
        if not 0 <= block < FEATURE_BLOCK:
            raise ValueError(f"a tail starts at a block within 0..{FEATURE_BLOCK - 1}, got {block}")
        self.block = block
        self.blocks = copy.deepcopy(encoder.blocks[block:FEATURE_BLOCK])

    def forward(self, activations: torch.Tensor) -> torch.Tensor:
        """Stage features ``N x 256`` from the activations entering block ``block`` (``N x C x H x W``)."""
        return self.blocks(activations).mean(dim=(2, 3))

    @torch.inference_mode()
    def describe(self, activations: np.ndarray, batch_size: int = 256) -> np.ndarray:
        """Stage features of ``N x V x C x H x W`` activations, averaged over the ``V`` views (a crop, its mirror)."""
        self.eval()
        a = torch.as_tensor(activations)
        out = [self(a[part].flatten(0, 1)).view(len(a[part]), a.shape[1], -1).mean(1) for part in
               _batches(len(a), batch_size)]
        return torch.cat(out).numpy() if out else np.zeros((0, FEATURE_DIM), np.float32)


class EncoderRunner:
    """The encoder as members take it: ``runner(chips, flip)`` gives identity descriptors (:func:`encode`),
    :meth:`run` also the stage features and a tail's activations; ``net`` is the network (saliency differentiates
    through it)."""

    def __init__(self, net: DlibFaceResNet, precision: str = "auto"):
        self.net = net
        self.precision = precision

    def __call__(self, chips: np.ndarray, flip: bool) -> np.ndarray:
        return encode(self.net, chips, precision=self.precision, flip=flip)

    def run(self, chips: np.ndarray, flip: bool, block: int | None = None) -> EncoderOutput:
        return run_encoder(self.net, chips, flip, block, precision=self.precision)
