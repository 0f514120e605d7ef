"""Saliency heatmaps: where on the face a region's network found evidence for a syndrome.

Grad-CAM (Selvaraju et al., the gradient-based localisation the paper's reference 37 builds on)
on each region network's last convolution: the 7x7 activations weighted by the class score's
mean gradient, rectified, upsampled to the 100x100 crop. Each region's map is then resized back
onto its box on the 200x200 aligned canvas (``regions.REGIONS``), and drawn over the aligned
face with a colour map, one region at a time or all regions combined.
"""
from __future__ import annotations

import cv2
import numpy as np
import torch
from captum.attr import LayerAttribution, LayerGradCam
from torch import nn

from shared.ml.nets.ensemble import RegionalEnsemble, crops_to_tensor
from shared.ml.preprocess.alignment import CANVAS
from shared.ml.preprocess.imaging import encode_png
from shared.ml.preprocess.regions import REGIONS

ALL = "all"  # the region name of the combined map
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


def to_canvas(region_map: np.ndarray, region: str, size: int = CANVAS) -> np.ndarray:
    """A crop's map resized back onto its box of the aligned canvas; zero outside the box."""
    x0, y0, x1, y1 = REGIONS[region]
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
