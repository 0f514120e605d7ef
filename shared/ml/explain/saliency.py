"""Saliency heatmaps: where on the face the members that decide found evidence for a syndrome.

Grad-CAM (Selvaraju et al., the gradient-based localisation the paper's reference 37 builds on) through every
member, drawn on the aligned canvas (the boxes and canvas size from the model's preprocessing contract):

* a CASIA-Net region: its last convolution's 7x7 map, upsampled onto the region's 100 px crop, resized back onto
  the region's box;
* an encoder region: the identity encoder's 8 x 8 map at the end of its 128-channel stage for the member's head
  score of the class (the head differentiated in torch), on the region's 150 px cut, resized back onto its box;
* the identity member: the same through the encoder on dlib's face chip, warped back onto the canvas through the
  chip's placement (:func:`shared.ml.preprocess.facechip.chip_matrix` of the face's canvas landmarks).

Members whose descriptors average a crop and its mirror image get the mean of both maps (the mirror's flipped
back). :func:`weighted_map` combines the members' maps by their shares of the aggregate (a member with weight 0
adds nothing); each member's own map is there on request (:func:`member_maps`).
"""
from __future__ import annotations

import cv2
import numpy as np
import torch
from captum.attr import LayerAttribution, LayerGradCam
from torch import nn

from shared.ml.members.model import GestaltModel
from shared.ml.nets.ensemble import RegionalEnsemble, crops_to_tensor
from shared.ml.preprocess.alignment import CANVAS
from shared.ml.preprocess.imaging import encode_png
from shared.ml.preprocess.regions import REGIONS

ALL = "all"  # the name of the combined map (every member, weighted)
# The encoder's layer Grad-CAM reads: the end of its 128-channel stage, 8 x 8 on a 150 px input.
ENCODER_CAM_BLOCK = 9
OVERLAY_ALPHA = 0.5  # colour-map weight where the saliency is strongest
SEAM_SIGMA = 3.0  # canvas pixels: softens the steps where boxes of the combined map begin and end


def last_conv(net: nn.Module) -> nn.Conv2d:
    """The network's last convolution: the highest-level features that still have a spatial layout."""
    convs = [m for m in net.modules() if isinstance(m, nn.Conv2d)]
    if not convs:
        raise ValueError("the network has no convolution")
    return convs[-1]


def grad_cam(net: nn.Module, x: torch.Tensor, target: int) -> np.ndarray:
    """Grad-CAM maps ``N x H x W`` in [0, 1] (each divided by its maximum) for crops ``N x 1 x H x W``."""
    net.eval()
    device = next(net.parameters()).device
    with torch.inference_mode(False), torch.enable_grad():
        x = x.detach().clone().float().to(device).requires_grad_(True)
        cam = LayerGradCam(net, last_conv(net)).attribute(x, target=int(target), relu_attributions=True)
        up = LayerAttribution.interpolate(cam, tuple(x.shape[-2:]), interpolate_mode="bilinear")
    maps = up[:, 0].detach().float().cpu().numpy().clip(min=0)
    peak = maps.reshape(len(maps), -1).max(axis=1)
    return (maps / np.where(peak > 0, peak, 1.0)[:, None, None]).astype(np.float32)


def region_maps(model: RegionalEnsemble, crops: np.ndarray, class_index: int,
                regions: tuple[str, ...] | None = None) -> dict[str, np.ndarray]:
    """Each region's 100x100 Grad-CAM map for one face.

    Args:
        crops: ``R x 100 x 100`` uint8, in ``model.regions`` order.
        class_index: the output class (the syndrome's position in the model's class list).
        regions: a subset of ``model.regions`` (default all).
    """
    if not 0 <= class_index < model.num_classes:
        raise ValueError(f"class index {class_index} is outside 0..{model.num_classes - 1}")
    x = crops_to_tensor(np.asarray(crops)[None])[0]  # R x 1 x H x W
    return {r: grad_cam(model.nets[r], x[i:i + 1], class_index)[0]
            for i, r in enumerate(model.regions) if regions is None or r in regions}


def to_canvas(region_map: np.ndarray, region: str, size: int = CANVAS, box=None) -> np.ndarray:
    """A crop's map resized back onto its box of the aligned canvas (``box``, else the region's current box); zero
    outside the box."""
    x0, y0, x1, y1 = box if box is not None else REGIONS[region]
    out = np.zeros((size, size), np.float32)
    out[y0:y1, x0:x1] = cv2.resize(region_map.astype(np.float32), (x1 - x0, y1 - y0),
                                   interpolation=cv2.INTER_LINEAR)
    return out


def combine(maps: dict[str, np.ndarray], size: int = CANVAS) -> np.ndarray:
    """All regions' maps on the canvas: at each pixel, the mean over the regions whose box covers it
    (so a pixel seen by one small box is not outweighed by overlap alone), lightly blurred across the
    boxes' edges, divided by the maximum."""
    total = np.zeros((size, size), np.float32)
    cover = np.zeros((size, size), np.float32)
    for region, m in maps.items():
        total += to_canvas(m, region, size)
        x0, y0, x1, y1 = REGIONS[region]
        cover[y0:y1, x0:x1] += 1
    out = np.divide(total, cover, out=np.zeros_like(total), where=cover > 0)
    out = cv2.GaussianBlur(out, (0, 0), SEAM_SIGMA)
    peak = out.max()
    return out / peak if peak > 0 else out


def overlay(aligned_rgb: np.ndarray, heat: np.ndarray, box: tuple[int, int, int, int] | None = None,
            alpha: float = OVERLAY_ALPHA) -> np.ndarray:
    """The aligned face with ``heat`` (canvas-sized, [0, 1]) drawn over it in the jet colour map.

    The colour's weight grows with the saliency, so the face stays visible where the network
    found nothing; ``box`` (a region) is outlined.
    """
    heat = np.clip(heat, 0, 1).astype(np.float32)
    if heat.shape != aligned_rgb.shape[:2]:
        heat = cv2.resize(heat, aligned_rgb.shape[1::-1], interpolation=cv2.INTER_LINEAR)
    colour = cv2.cvtColor(cv2.applyColorMap((heat * 255).astype(np.uint8), cv2.COLORMAP_JET), cv2.COLOR_BGR2RGB)
    weight = (alpha * np.sqrt(heat))[..., None]
    out = (aligned_rgb.astype(np.float32) * (1 - weight) + colour.astype(np.float32) * weight).astype(np.uint8)
    if box is not None:
        x0, y0, x1, y1 = box
        cv2.rectangle(out, (x0, y0), (x1 - 1, y1 - 1), (255, 255, 255), 1)
    return out


def heatmap_png(model: RegionalEnsemble, crops: np.ndarray, aligned_rgb: np.ndarray, class_index: int,
                region: str = ALL) -> bytes:
    """The overlay PNG of one syndrome for one region (or ``"all"``, every region combined).

    Args:
        crops: ``R x 100 x 100`` uint8 in ``model.regions`` order.
        aligned_rgb: the aligned face, ``CANVAS x CANVAS x 3``.
    """
    if region != ALL and region not in model.regions:
        raise ValueError(f"region {region!r} is not one of this model's: {', '.join(model.regions)}")
    if region == ALL:
        heat, box = combine(region_maps(model, crops, class_index)), None
    else:
        m = region_maps(model, crops, class_index, (region,))[region]
        heat, box = to_canvas(m, region, aligned_rgb.shape[0]), REGIONS[region]
    return encode_png(overlay(aligned_rgb, heat, box))


# --- every member ---------------------------------------------------------------------------------


class _HeadScore(nn.Module):
    """The encoder (its identity descriptor, or with ``features`` its stage features) followed by an
    :class:`~shared.ml.members.identity.IdentityHead`'s logits, in torch (so that Grad-CAM can differentiate a
    member's score back to the encoder's feature maps)."""

    def __init__(self, encoder: nn.Module, head, features: bool = False):
        super().__init__()
        self.encoder = encoder
        self.features = features
        self.kind = head.kind
        self.gamma = float(head.gamma)
        for name in ("mean", "std", "weight", "bias", "components", "normalization"):
            value = getattr(head, name)
            self.register_buffer(name, None if value is None else torch.as_tensor(np.asarray(value, np.float32)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.features:
            from shared.ml.nets.encoder import FEATURE_BLOCK, INPUT_SCALE

            e = self.encoder
            h = e.pool(torch.relu(e.stem((x - e.mean) / INPUT_SCALE)))
            out = e.blocks[:FEATURE_BLOCK](h).mean(dim=(2, 3))
        else:
            out = self.encoder(x)
        z = (out - self.mean) / self.std
        if self.kind != "linear":
            sq = (z * z).sum(1, keepdim=True) + (self.components ** 2).sum(1)[None] - 2 * z @ self.components.T
            z = torch.exp(-self.gamma * sq.clamp_min(0)) @ self.normalization.T
        return z @ self.weight.T + self.bias


def encoder_cam(encoder: nn.Module, head, image: np.ndarray, class_index: int, flip: bool,
                features: bool = False) -> np.ndarray:
    """Grad-CAM ``H x W`` in [0, 1] of one ``H x W x 3`` uint8 input of the encoder, for a head's class score (a head
    on the identity descriptor, or with ``features`` on the stage features)."""
    from shared.ml.nets.encoder import chips_to_tensor

    scorer = _HeadScore(encoder, head, features).eval()
    x = chips_to_tensor(image[None])
    views = [x, x.flip(-1)] if flip else [x]
    maps = []
    with torch.inference_mode(False), torch.enable_grad():
        for k, view in enumerate(views):
            view = view.detach().clone().requires_grad_(True)
            cam = LayerGradCam(scorer, encoder.blocks[ENCODER_CAM_BLOCK]).attribute(
                view, target=int(class_index), relu_attributions=True)
            up = LayerAttribution.interpolate(cam, tuple(x.shape[-2:]), interpolate_mode="bilinear")[0, 0]
            m = up.detach().float().cpu().numpy().clip(min=0)
            maps.append(m[:, ::-1] if k else m)
    out = np.mean(maps, axis=0)
    peak = out.max()
    return (out / peak if peak > 0 else out).astype(np.float32)


def member_maps(model: GestaltModel, crops: dict[str, np.ndarray], class_index: int, encoder: nn.Module | None = None,
                chip_to_canvas: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Every member's map of one face on the aligned canvas (``canvas x canvas``, [0, 1]), by member name.

    Args:
        crops: the face's stored crops by name (one face: ``1 x ...`` each), as the model's members read them.
        encoder: the identity encoder network, for members built on it.
        chip_to_canvas: the 2 x 3 affine from dlib's face chip to the canvas; without it the identity member's
            map is left out.
    """
    from shared.ml.members.identity import CHIP_REGION, MEMBER
    from shared.ml.preprocess.regions import cut_name

    if not 0 <= class_index < model.num_classes:
        raise ValueError(f"class index {class_index} is outside 0..{model.num_classes - 1}")
    size, boxes = int(model.contract["canvas"]), model.contract["regions"]
    out: dict[str, np.ndarray] = {}
    for member in model.members:
        if member.kind == "casia":
            stack = np.stack([crops[r][0] for r in member.regions])
            for r, m in region_maps(member.net, stack, class_index).items():
                out[r] = to_canvas(m, r, size, boxes[r])
        elif member.kind == "encoder_regions" and encoder is not None:
            for r in member.regions:
                if r in member.tails:  # the map of a fine-tuned region goes through its own tail
                    cam = _tail_cam(encoder, member, r, crops[cut_name(r)][0], class_index)
                else:
                    cam = encoder_cam(encoder, member.heads[r], crops[cut_name(r)][0], class_index, member.flip,
                                      features=True)
                out[r] = to_canvas(cam, r, size, boxes[r])
        elif member.kind == MEMBER and encoder is not None and chip_to_canvas is not None:
            cam = encoder_cam(encoder, member.head, crops[CHIP_REGION][0], class_index, member.flip)
            out[MEMBER] = cv2.warpAffine(cam, np.asarray(chip_to_canvas, np.float64), (size, size),
                                         flags=cv2.INTER_LINEAR, borderValue=0)
    return out


def _tail_cam(encoder: nn.Module, member, region: str, image: np.ndarray, class_index: int) -> np.ndarray:
    """Grad-CAM through a fine-tuned region's own tail: the frozen blocks up to it, then the tail, then the head."""
    import copy

    tuned = copy.deepcopy(encoder)
    tail = member.tails[region]
    for k, block in enumerate(tail.blocks):
        tuned.blocks[tail.block + k] = block
    return encoder_cam(tuned, member.heads[region], image, class_index, member.flip, features=True)


def weighted_map(model: GestaltModel, crops: dict[str, np.ndarray], class_index: int, encoder: nn.Module | None = None,
                 chip_to_canvas: np.ndarray | None = None, maps: dict[str, np.ndarray] | None = None) -> np.ndarray:
    """The members' maps combined by their shares of the aggregate (the members that decide, weighted as they
    are), lightly blurred across the boxes' edges and divided by the maximum."""
    maps = maps if maps is not None else member_maps(model, crops, class_index, encoder, chip_to_canvas)
    shares = model.stack.share_of()
    size = int(model.contract["canvas"])
    total = np.zeros((size, size), np.float32)
    for name, m in maps.items():
        total += float(shares.get(name, 0.0)) * m
    total = cv2.GaussianBlur(total, (0, 0), SEAM_SIGMA)
    peak = total.max()
    return total / peak if peak > 0 else total


def member_heatmap_png(model: GestaltModel, crops: dict[str, np.ndarray], aligned_rgb: np.ndarray, class_index: int,
                       member: str = ALL, encoder: nn.Module | None = None,
                       chip_to_canvas: np.ndarray | None = None) -> bytes:
    """The overlay PNG of one syndrome: every member weighted (``member="all"``), or one member's own map (a
    region's box outlined)."""
    if member != ALL and member not in model.names:
        raise ValueError(f"member {member!r} is not one of this model's: {', '.join(model.names)}")
    if member == ALL:
        heat, box = weighted_map(model, crops, class_index, encoder, chip_to_canvas), None
    else:
        maps = member_maps(model, crops, class_index, encoder, chip_to_canvas)
        if member not in maps:
            raise ValueError(f"no map for member {member!r}: its crops, the encoder or the chip's placement is missing")
        heat, box = maps[member], model.contract["regions"].get(member)
    return encode_png(overlay(aligned_rgb, heat, None if box is None else tuple(box)))


def chip_placement(canvas_landmarks: np.ndarray, contract: dict) -> np.ndarray:
    """The 2 x 3 affine from dlib's face chip to the aligned canvas, from the face's landmarks on the canvas."""
    from shared.ml.preprocess.facechip import chip_matrix, face_chip_details

    chip = contract.get("chip") or {}
    details = face_chip_details(np.asarray(canvas_landmarks, np.float64), int(chip.get("size", 150)),
                                float(chip.get("padding", 0.25)))
    return chip_matrix(details)
