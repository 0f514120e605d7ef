"""dlib's face chip, reproduced: the 150x150 crop that dlib's face-recognition network expects.

:func:`face_chip` is ``dlib.get_face_chip(image, shape, size, padding)`` without dlib, for our
68 landmarks (or dlib's 5-point scheme):

1. :func:`face_chip_details` (dlib's ``get_face_chip_details``). With 68 points it fits the
   least-squares similarity transform (Umeyama) from dlib's mean face to the landmarks on 33
   points: nose 27-35, eyes 36-47, the outer lips' upper half 48-54 and the inner lips' upper
   half 60-64. Jaw, brows and the lower lip (55-59, 65-67) are left out. The mean face lives on
   a unit square that ``padding`` widens by that fraction on each side (``(padding + p) /
   (2 padding + 1)``), scaled to ``size``. With 5 points (dlib's 5-point predictor: the outer
   and inner corner of the image-right eye, then of the image-left eye, then the base of the
   nose) it fits dlib's 5-point template instead. The result is dlib's ``chip_details``: a
   rectangle of ``size * scale`` pixels around the chip centre's place in the image, and an
   angle.
2. :func:`extract_chip` (dlib's ``extract_image_chip``): when the rectangle is more than twice
   the chip's size, the photo (cropped to the rectangle's neighbourhood) is first halved by
   dlib's ``pyramid_down<2>`` (a 5-tap [1 4 6 4 1] binomial filter, every other pixel, kept
   in dlib's coordinate convention ``p / 2 - (1.25, 0.75)``) until it is not; then each chip
   pixel is sampled bilinearly. Samples whose 2x2 neighbourhood leaves the image are black.

``face_recognition`` (and dlib's own example) cut chips at size 150 with padding 0.25.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

CHIP_SIZE = 150
PADDING = 0.25

# dlib's mean face (get_face_chip_details): points 17-67 of the 68-point scheme on the unit square.
_MEAN_FACE_X = (
    0.000213256, 0.0752622, 0.18113, 0.29077, 0.393397, 0.586856, 0.689483, 0.799124,
    0.904991, 0.98004, 0.490127, 0.490127, 0.490127, 0.490127, 0.36688, 0.426036,
    0.490127, 0.554217, 0.613373, 0.121737, 0.187122, 0.265825, 0.334606, 0.260918,
    0.182743, 0.645647, 0.714428, 0.793132, 0.858516, 0.79751, 0.719335, 0.254149,
    0.340985, 0.428858, 0.490127, 0.551395, 0.639268, 0.726104, 0.642159, 0.556721,
    0.490127, 0.423532, 0.338094, 0.290379, 0.428096, 0.490127, 0.552157, 0.689874,
    0.553364, 0.490127, 0.42689)
_MEAN_FACE_Y = (
    0.106454, 0.038915, 0.0187482, 0.0344891, 0.0773906, 0.0773906, 0.0344891,
    0.0187482, 0.038915, 0.106454, 0.203352, 0.307009, 0.409805, 0.515625, 0.587326,
    0.609345, 0.628106, 0.609345, 0.587326, 0.216423, 0.178758, 0.179852, 0.231733,
    0.245099, 0.244077, 0.231733, 0.179852, 0.178758, 0.216423, 0.244077, 0.245099,
    0.780233, 0.745405, 0.727388, 0.742578, 0.727388, 0.745405, 0.780233, 0.864805,
    0.902192, 0.909281, 0.902192, 0.864805, 0.784792, 0.778746, 0.785343, 0.778746,
    0.784792, 0.824182, 0.831803, 0.824182)
MEAN_FACE_68 = np.full((68, 2), np.nan)
MEAN_FACE_68[17:] = np.column_stack([_MEAN_FACE_X, _MEAN_FACE_Y])
# The points dlib fits on: 27-54 and 60-64 (no jaw, no brows, no lower lip).
CHIP_POINTS_68 = np.array([i for i in range(27, 68) if not (55 <= i <= 59 or 65 <= i <= 67)])
# dlib's 5-point template, in the order of its shape_predictor_5_face_landmarks.
MEAN_FACE_5 = np.array([
    [0.8595674595992, 0.2134981538014],
    [0.6460604764104, 0.2289674387677],
    [0.1205750620789, 0.2137274526848],
    [0.3340850613712, 0.2290642403242],
    [0.4901123135679, 0.6277975316475],
])


@dataclass(frozen=True)
class ChipDetails:
    """dlib's ``chip_details``: where the chip lies in the image."""

    rect: tuple[float, float, float, float]  # left, top, right, bottom (a dlib drectangle)
    angle: float  # radians
    rows: int
    cols: int

    @property
    def size(self) -> int:
        return self.rows * self.cols


def similarity_transform(src: np.ndarray, dst: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Least-squares similarity (Umeyama 1991) with ``dst ~ m @ src + b``: returns ``(m, b)``."""
    src = np.asarray(src, np.float64)
    dst = np.asarray(dst, np.float64)
    mu_s, mu_d = src.mean(0), dst.mean(0)
    s, d = src - mu_s, dst - mu_d
    var_s = (s**2).sum() / len(src)
    cov = d.T @ s / len(src)
    u, sv, vt = np.linalg.svd(cov)
    sign = np.eye(2)
    if np.linalg.det(cov) < 0:
        sign[1, 1] = -1
    r = u @ sign @ vt
    scale = float(np.trace(np.diag(sv) @ sign) / var_s) if var_s > 0 else 1.0
    m = scale * r
    return m, mu_d - m @ mu_s


def template_points(num_points: int, size: int = CHIP_SIZE, padding: float = PADDING) -> tuple[np.ndarray, np.ndarray]:
    """(indices into the landmarks, where each goes on the chip in pixels) for 68 or 5 landmarks."""
    if num_points == 68:
        idx, unit = CHIP_POINTS_68, MEAN_FACE_68[CHIP_POINTS_68]
    elif num_points == 5:
        idx, unit = np.arange(5), MEAN_FACE_5
    else:
        raise ValueError(f"face chips need 68 or 5 landmarks, got {num_points}")
    return idx, (padding + unit) / (2 * padding + 1) * size


def face_chip_details(landmarks: np.ndarray, size: int = CHIP_SIZE, padding: float = PADDING) -> ChipDetails:
    """dlib's ``get_face_chip_details`` for 68 (or dlib's 5) landmarks in image pixels."""
    if size <= 0 or padding < 0:
        raise ValueError(f"size must be positive and padding non-negative, got {size}, {padding}")
    pts = np.asarray(landmarks, np.float64)
    idx, chip_pts = template_points(len(pts), size, padding)
    m, b = similarity_transform(chip_pts, pts[idx])
    p = m @ np.array([1.0, 0.0])
    angle = math.atan2(p[1], p[0])
    scale = math.hypot(p[0], p[1])
    cx, cy = m @ np.array([size / 2, size / 2]) + b
    # dlib's centered_drect: a drectangle's width is right - left + 1, like a pixel rectangle's.
    half = (size * scale - 1) / 2
    return ChipDetails((cx - half, cy - half, cx + half, cy + half), angle, size, size)


# --- dlib's rectangles and pyramid ---------------------------------------------------------

Rect = tuple[float, float, float, float]


def _area(r: Rect) -> float:
    """A dlib drectangle's area: width and height are right - left + 1 and bottom - top + 1, 0 if empty."""
    if r[0] > r[2] or r[1] > r[3]:
        return 0.0
    return (r[2] - r[0] + 1) * (r[3] - r[1] + 1)


def _down(r: Rect) -> Rect:
    """``pyramid_down<2>::rect_down``: each corner ``p / 2 - (1.25, 0.75)``."""
    return (r[0] / 2 - 1.25, r[1] / 2 - 0.75, r[2] / 2 - 1.25, r[3] / 2 - 0.75)


def _rotate(center: tuple[float, float], p: tuple[float, float], angle: float) -> tuple[float, float]:
    c, s = math.cos(angle), math.sin(angle)
    x, y = p[0] - center[0], p[1] - center[1]
    return (c * x - s * y + center[0], s * x + c * y + center[1])


def _center(r: Rect) -> tuple[float, float]:
    return ((r[0] + r[2]) / 2, (r[1] + r[3]) / 2)


def pyramid_down(image: np.ndarray) -> np.ndarray:
    """dlib's ``pyramid_down<2>`` on a uint8 image: [1 4 6 4 1]^2 / 256, truncated, every other pixel.

    Output pixel (r, c) is centred on input pixel (2r + 2, 2c + 2); the output has
    ``(rows - 3) // 2`` x ``(cols - 3) // 2`` pixels.
    """
    h, w = image.shape[:2]
    if h <= 8 or w <= 8:
        return image[:0, :0]
    oh, ow = (h - 3) // 2, (w - 3) // 2
    a = image.astype(np.uint32)
    rows = (a[:, 0:2 * ow:2] + 4 * a[:, 1:2 * ow + 1:2] + 6 * a[:, 2:2 * ow + 2:2]
            + 4 * a[:, 3:2 * ow + 3:2] + a[:, 4:2 * ow + 4:2])
    out = (rows[0:2 * oh:2] + 4 * rows[1:2 * oh + 1:2] + 6 * rows[2:2 * oh + 2:2]
           + 4 * rows[3:2 * oh + 3:2] + rows[4:2 * oh + 4:2]) // 256
    return out.astype(np.uint8)


def _bilinear(image: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """dlib's ``interpolate_bilinear`` at float coordinates; black where a 2x2 neighbourhood leaves the image."""
    h, w = image.shape[:2]
    left, top = np.floor(x), np.floor(y)
    inside = ((left >= 0) & (top >= 0) & (left + 1 < w) & (top + 1 < h)).ravel()
    # Channel planes (C x H*W): the four neighbours are gathered by flat index (one take each) and only they are
    # widened, and each step below runs along a whole plane. With the channels last, numpy's loops ran three
    # elements at a time against each pixel's weight, three times slower for the same doubles.
    planes = np.ascontiguousarray(np.moveaxis(image, -1, 0)).reshape(-1, h * w)
    at = np.where(inside, (top * w + left).ravel(), 0).astype(np.intp)
    fx, fy = (x - left).ravel(), (y - top).ravel()
    gx = 1 - fx

    def neighbour(offset: int, weight: np.ndarray) -> np.ndarray:
        value = planes.take(at + offset, 1).astype(np.float64)
        value *= weight
        return value

    # (1 - fy) * ((1 - fx) * tl + fx * tr) + fy * ((1 - fx) * bl + fx * br): the same operations in the same order.
    value = neighbour(0, gx)
    value += neighbour(1, fx)
    value *= 1 - fy
    bottom = neighbour(w, gx)
    bottom += neighbour(w + 1, fx)
    bottom *= fy
    value += bottom
    # dlib assigns the double to the uint8 channel by truncation (values are within 0-255 here).
    out = np.clip(value, 0, 255, out=value).astype(np.uint8)
    out[:, ~inside] = 0
    return np.moveaxis(out, 0, -1).reshape(*x.shape, -1)


def extract_chip(image: np.ndarray, details: ChipDetails) -> np.ndarray:
    """dlib's ``extract_image_chip`` with bilinear sampling: ``rows x cols`` (x channels) uint8."""
    image = np.asarray(image)
    if image.dtype != np.uint8:
        raise ValueError(f"images must be uint8, got {image.dtype}")
    squeeze = image.ndim == 2
    if squeeze:
        image = image[..., None]
    h, w = image.shape[:2]
    rect, angle = details.rect, details.angle
    # How deep the pyramid must go, and the part of the image the chip and its filter margin need.
    grow = 2.0
    r = _down(rect)
    while _area(r) > details.size:
        r = _down(r)
        grow = grow * 2 + 2
    center = _center(rect)
    corners = [_rotate(center, p, angle) for p in
               ((rect[0], rect[1]), (rect[2], rect[1]), (rect[0], rect[3]), (rect[2], rect[3]))]
    xs, ys = [p[0] for p in corners], [p[1] for p in corners]
    box = (max(min(xs) - grow, 0.0), max(min(ys) - grow, 0.0),
           min(max(xs) + grow, w - 1.0), min(max(ys) + grow, h - 1.0))
    # dlib rounds the double rectangle to whole pixels (floor(x + 0.5)) when it joins the bounding box.
    bl, bt, br, bb = (math.floor(v + 0.5) for v in box)
    black = np.zeros((details.rows, details.cols, image.shape[2]), np.uint8)
    if br < bl or bb < bt:  # the chip lies wholly outside the image
        return black[..., 0] if squeeze else black
    source = image[bt:bb + 1, bl:br + 1]
    # The pyramid level to sample from, and the chip's rectangle in that level's pixels.
    r = (rect[0] - bl, rect[1] - bt, rect[2] - bl, rect[3] - bt)
    level = -1
    while _area(_down(r)) > details.size:
        level += 1
        r = _down(r)
    for _ in range(level + 1):
        source = pyramid_down(source)
    if source.size == 0:  # a sliver of the image too thin for the pyramid
        return black[..., 0] if squeeze else black
    # Chip corners (0,0), (cols-1,0), (0,rows-1) go onto the rotated rectangle's corners.
    c = _center(r)
    tl, tr, bl_ = (_rotate(c, p, angle) for p in ((r[0], r[1]), (r[2], r[1]), (r[0], r[3])))
    ux = (np.subtract(tr, tl)) / max(details.cols - 1, 1)
    uy = (np.subtract(bl_, tl)) / max(details.rows - 1, 1)
    rows, cols = np.mgrid[0:details.rows, 0:details.cols].astype(np.float64)
    x = tl[0] + cols * ux[0] + rows * uy[0]
    y = tl[1] + cols * ux[1] + rows * uy[1]
    out = _bilinear(source, x, y)
    return out[..., 0] if squeeze else out


def face_chip(image_rgb: np.ndarray, landmarks68: np.ndarray, size: int = CHIP_SIZE,
              padding: float = PADDING) -> np.ndarray:
    """The ``size x size x 3`` uint8 chip that ``dlib.get_face_chip(image, shape, size, padding)`` cuts.

    Args:
        image_rgb: ``H x W x 3`` uint8 (a grayscale ``H x W`` photo is repeated into three channels).
        landmarks68: ``68 x 2`` landmarks in image pixels (x, y) in the 68-point scheme of
            :mod:`shared.ml.preprocess.landmarks`; dlib's 5-point scheme (``5 x 2``) works too.
    """
    image = np.asarray(image_rgb)
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=2)
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an H x W x 3 RGB image, got shape {image.shape}")
    return extract_chip(image, face_chip_details(landmarks68, size, padding))


def chip_matrix(details: ChipDetails) -> np.ndarray:
    """The 2 x 3 affine from chip pixels to the pixels of the image ``details`` were computed in (what
    :func:`extract_chip` samples, at full resolution): for mapping something drawn on the chip back onto the image
    (or onto the aligned canvas, when the landmarks given to :func:`face_chip_details` were the canvas's)."""
    rect, angle = details.rect, details.angle
    center = _center(rect)
    tl, tr, bl = (_rotate(center, p, angle) for p in ((rect[0], rect[1]), (rect[2], rect[1]), (rect[0], rect[3])))
    ux = np.subtract(tr, tl) / max(details.cols - 1, 1)
    uy = np.subtract(bl, tl) / max(details.rows - 1, 1)
    return np.array([[ux[0], uy[0], tl[0]], [ux[1], uy[1], tl[1]]], np.float64)
