"""Synthetic defects made from normal images, with their masks: what ``lakead tune`` scores
candidate configurations on when no real defect image exists (docs/SELECTION.md).

Every generator takes an ``(H, W, 3)`` uint8 image and a ``numpy.random.Generator`` (so a seed
gives the same defect on every machine) and returns a :class:`Defect`: the changed image and an
``(H, W)`` bool mask of the defect. Sizes are shares of the image area, small by default:
defects of 5-15 % of the image saturated every candidate in the feasibility run of issue 30
(all scored 1.0, no information), defects of 0.5-3 % kept the candidates apart.

Kinds (:data:`KINDS`; each a documented function below):

- ``cutpaste``: a rectangle of the image pasted elsewhere, brightness jittered (CutPaste, Li et al. 2021);
- ``scar``: a long thin rotated rectangle filled with the image's pixels from elsewhere (CutPaste-scar);
- ``blend``: a rectangle of *another* normal image blended in with a feathered edge (NSA-style, Schlüter et al. 2022);
- ``noise``: an irregular blob from a smooth random field filled with an unrelated texture (DRAEM-style, Zavrtanik et al. 2021);
- ``blur``, ``colour``, ``intensity``: an elliptical area blurred, tinted, or darkened/brightened;
- ``scratch``: a thin dark or bright polyline (a small structural cut).

Where the defect goes: inside :func:`placement_mask` (the pixels unlike the image's border, the
object on a plain background), or anywhere when that covers too little of the image (a texture).

Outside its mask a defect leaves the image unchanged, except ``blend``, whose feathered edge
reaches a few pixels beyond the mask (pixels where the blend weight is below one half).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

#: Every kind, in the order :func:`make_defect` cycles through them.
KINDS = ("cutpaste", "scar", "blend", "noise", "blur", "colour", "intensity", "scratch")
#: Default share of the image area of a defect (subtle: see the module docstring).
AREA = (0.01, 0.03)


@dataclass(frozen=True)
class Defect:
    """A synthetic defect: the changed ``(H, W, 3)`` uint8 image and its ``(H, W)`` bool mask."""

    image: np.ndarray
    mask: np.ndarray
    kind: str


def placement_mask(image: np.ndarray, min_share: float = 0.2) -> np.ndarray:
    """``(H, W)`` bool: where a defect may be centred. The pixels whose colour differs from the
    median colour of the image's border by more than a tenth of the image's colour range (the
    object on a plain background); every pixel when those cover less than ``min_share`` (a
    plain image, or an object too small to aim at)."""
    img = image.astype(np.float32)
    h, w = img.shape[:2]
    border = np.concatenate([img[0], img[-1], img[:, 0], img[:, -1]])  # (2H+2W, 3)
    ref = np.median(border, axis=0)
    dist = np.abs(img - ref).max(axis=2)
    spread = float(img.max() - img.min()) or 1.0
    mask = dist > 0.1 * spread
    if mask.mean() < min_share:
        return np.ones((h, w), bool)
    return mask


def _centre(rng: np.random.Generator, where: np.ndarray) -> tuple[int, int]:
    ys, xs = np.nonzero(where)
    i = int(rng.integers(len(ys)))
    return int(ys[i]), int(xs[i])


def _rect(rng: np.random.Generator, shape: tuple[int, int], area: tuple[float, float], where: np.ndarray,
          aspect: tuple[float, float] = (0.5, 2.0)) -> tuple[int, int, int, int]:
    """(top, left, height, width) of a rectangle of ``area`` share, centred in ``where``, inside the image."""
    h, w = shape
    a = rng.uniform(*area) * h * w
    r = np.exp(rng.uniform(np.log(aspect[0]), np.log(aspect[1])))
    rh = int(np.clip(round(np.sqrt(a * r)), 1, h))
    rw = int(np.clip(round(np.sqrt(a / r)), 1, w))
    cy, cx = _centre(rng, where)
    top = int(np.clip(cy - rh // 2, 0, h - rh))
    left = int(np.clip(cx - rw // 2, 0, w - rw))
    return top, left, rh, rw


def _ellipse(rng: np.random.Generator, shape: tuple[int, int], area: tuple[float, float], where: np.ndarray) -> np.ndarray:
    """An ``(H, W)`` bool ellipse of ``area`` share, random axes ratio and angle, centred in ``where``."""
    h, w = shape
    a = rng.uniform(*area) * h * w
    r = np.exp(rng.uniform(np.log(0.5), np.log(2.0)))
    ay, ax = np.sqrt(a * r / np.pi), np.sqrt(a / r / np.pi)
    cy, cx = _centre(rng, where)
    t = rng.uniform(0, np.pi)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    dy, dx = yy - cy, xx - cx
    u, v = dy * np.cos(t) + dx * np.sin(t), -dy * np.sin(t) + dx * np.cos(t)
    mask = (u / max(ay, 0.5)) ** 2 + (v / max(ax, 0.5)) ** 2 <= 1.0
    if not mask.any():
        mask[cy, cx] = True
    return mask


def _paint(image: np.ndarray, mask: np.ndarray, values: np.ndarray) -> np.ndarray:
    out = image.copy()
    out[mask] = np.clip(values[mask], 0, 255).astype(np.uint8) if values.dtype != np.uint8 else values[mask]
    return out


def cutpaste(image: np.ndarray, rng: np.random.Generator, area: tuple[float, float] = AREA,
             where: np.ndarray | None = None) -> Defect:
    """A rectangle of the image (from anywhere) pasted at a rectangle centred in ``where``, its
    brightness scaled by 0.8-1.2 (CutPaste). The mask is the pasted rectangle."""
    h, w = image.shape[:2]
    where = placement_mask(image) if where is None else where
    top, left, rh, rw = _rect(rng, (h, w), area, where, (0.3, 3.3))
    sy, sx = int(rng.integers(0, h - rh + 1)), int(rng.integers(0, w - rw + 1))
    patch = image[sy : sy + rh, sx : sx + rw].astype(np.float32) * rng.uniform(0.8, 1.2)
    out = image.copy()
    out[top : top + rh, left : left + rw] = np.clip(patch, 0, 255).astype(np.uint8)
    mask = np.zeros((h, w), bool)
    mask[top : top + rh, left : left + rw] = True
    return Defect(out, mask, "cutpaste")


def _band(shape: tuple[int, int], centre: tuple[int, int], length: float, width: float, angle: float) -> np.ndarray:
    h, w = shape
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    dy, dx = yy - centre[0], xx - centre[1]
    u, v = dy * np.cos(angle) + dx * np.sin(angle), -dy * np.sin(angle) + dx * np.cos(angle)
    return (np.abs(u) <= length / 2) & (np.abs(v) <= width / 2)


def scar(image: np.ndarray, rng: np.random.Generator, area: tuple[float, float] = (0.005, 0.02),
         where: np.ndarray | None = None) -> Defect:
    """A long thin rectangle (length 6-12 times its width) at a random angle, centred in
    ``where``, filled with the image's own pixels shifted from elsewhere and brightness-jittered
    (CutPaste-scar). The mask is the rectangle."""
    h, w = image.shape[:2]
    where = placement_mask(image) if where is None else where
    a = rng.uniform(*area) * h * w
    ratio = rng.uniform(6, 12)
    width = max(1.0, np.sqrt(a / ratio))
    mask = _band((h, w), _centre(rng, where), width * ratio, width, rng.uniform(0, np.pi))
    shifted = np.roll(image, (int(rng.integers(h // 4, 3 * h // 4 + 1)), int(rng.integers(w // 4, 3 * w // 4 + 1))), (0, 1))
    return Defect(_paint(image, mask, shifted.astype(np.float32) * rng.uniform(0.7, 1.3)), mask, "scar")


def blend(image: np.ndarray, source: np.ndarray, rng: np.random.Generator, area: tuple[float, float] = AREA,
          where: np.ndarray | None = None) -> Defect:
    """A rectangle of another normal image ``source`` (resized to this one's size; taken from a
    random place) blended in at a rectangle centred in ``where`` with a feathered edge (NSA-style:
    a piece of a normal image out of place). The mask: where the blend weight is at least one half."""
    from PIL import Image
    from scipy.ndimage import gaussian_filter

    h, w = image.shape[:2]
    if source.shape[:2] != (h, w):
        source = np.asarray(Image.fromarray(source).resize((w, h), Image.BILINEAR))
    where = placement_mask(image) if where is None else where
    top, left, rh, rw = _rect(rng, (h, w), area, where)
    sy, sx = int(rng.integers(0, h - rh + 1)), int(rng.integers(0, w - rw + 1))
    pasted = image.astype(np.float32).copy()
    pasted[top : top + rh, left : left + rw] = source[sy : sy + rh, sx : sx + rw]
    box = np.zeros((h, w), np.float32)
    box[top : top + rh, left : left + rw] = 1.0
    alpha = gaussian_filter(box, sigma=max(0.5, 0.1 * min(rh, rw)))
    alpha = np.where(alpha < 1e-3, 0.0, alpha)[..., None]  # exactly unchanged far from the rectangle
    out = (alpha * pasted + (1 - alpha) * image.astype(np.float32)).round()
    return Defect(np.clip(out, 0, 255).astype(np.uint8), alpha[..., 0] >= 0.5, "blend")


def _smooth_field(rng: np.random.Generator, shape: tuple[int, int], cells: int) -> np.ndarray:
    """A smooth random field in [0, 1]: a ``cells x cells`` grid of uniform values, bicubic-upsampled."""
    from PIL import Image

    grid = rng.uniform(0, 1, (cells, cells)).astype(np.float32)
    return np.asarray(Image.fromarray(grid, mode="F").resize((shape[1], shape[0]), Image.BICUBIC))


def noise(image: np.ndarray, rng: np.random.Generator, area: tuple[float, float] = AREA,
          where: np.ndarray | None = None) -> Defect:
    """An irregular blob (a smooth random field thresholded inside an ellipse of twice the area)
    filled with an unrelated texture (random coloured stripes and noise) at 50-100 % opacity
    (DRAEM-style). The mask is the blob."""
    h, w = image.shape[:2]
    where = placement_mask(image) if where is None else where
    region = _ellipse(rng, (h, w), (2 * area[0], 2 * area[1]), where)
    field = _smooth_field(rng, (h, w), int(rng.integers(4, 9)))
    inside = field[region]
    mask = region & (field >= np.median(inside))
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    t = rng.uniform(0, np.pi)
    period = rng.uniform(3, 12)
    stripes = 0.5 + 0.5 * np.sin((yy * np.cos(t) + xx * np.sin(t)) * 2 * np.pi / period)
    colours = rng.uniform(0, 255, (2, 3)).astype(np.float32)
    texture = stripes[..., None] * colours[0] + (1 - stripes[..., None]) * colours[1]
    texture += rng.normal(0, 20, (h, w, 3)).astype(np.float32)
    beta = rng.uniform(0.5, 1.0)
    mixed = (1 - beta) * image.astype(np.float32) + beta * texture
    return Defect(_paint(image, mask, mixed), mask, "noise")


def local_change(image: np.ndarray, rng: np.random.Generator, kind: str, area: tuple[float, float] = AREA,
                 where: np.ndarray | None = None) -> Defect:
    """An elliptical area changed in place: ``blur`` (Gaussian, sigma 2-5 % of the image side),
    ``colour`` (a tint of 30-60 grey levels in a random colour direction) or ``intensity``
    (multiplied by 0.5-0.7 or 1.3-1.6). The mask is the ellipse."""
    from scipy.ndimage import gaussian_filter

    h, w = image.shape[:2]
    where = placement_mask(image) if where is None else where
    mask = _ellipse(rng, (h, w), area, where)
    img = image.astype(np.float32)
    if kind == "blur":
        s = rng.uniform(0.02, 0.05) * min(h, w)
        changed = np.stack([gaussian_filter(img[..., c], s) for c in range(3)], -1)
    elif kind == "colour":
        direction = rng.normal(size=3)
        changed = img + rng.uniform(30, 60) * direction / (np.linalg.norm(direction) or 1.0)
    elif kind == "intensity":
        changed = img * (rng.uniform(0.5, 0.7) if rng.uniform() < 0.5 else rng.uniform(1.3, 1.6))
    else:
        raise ValueError(f"unknown local change {kind!r}: blur, colour or intensity")
    return Defect(_paint(image, mask, changed), mask, kind)


def scratch(image: np.ndarray, rng: np.random.Generator, area: tuple[float, float] = (0.002, 0.008),
            where: np.ndarray | None = None) -> Defect:
    """A thin polyline of 2-4 segments (a random walk from a point in ``where``), 1-3 % of the
    image side wide, dark or bright (a small structural cut or scratch). The mask is the line."""
    h, w = image.shape[:2]
    where = placement_mask(image) if where is None else where
    side = min(h, w)
    width = max(1.0, rng.uniform(0.01, 0.03) * side)
    length = rng.uniform(*area) * h * w / width
    segments = int(rng.integers(2, 5))
    y, x = map(float, _centre(rng, where))
    angle = rng.uniform(0, 2 * np.pi)
    mask = np.zeros((h, w), bool)
    for _ in range(segments):
        seg = length / segments
        ny, nx = y + seg * np.sin(angle), x + seg * np.cos(angle)
        mask |= _band((h, w), (int(round((y + ny) / 2)), int(round((x + nx) / 2))), seg + width, width, np.pi / 2 - angle)
        y, x = float(np.clip(ny, 0, h - 1)), float(np.clip(nx, 0, w - 1))
        angle += rng.uniform(-0.8, 0.8)
    if not mask.any():
        mask[int(y), int(x)] = True
    level = rng.uniform(0, 40) if rng.uniform() < 0.5 else rng.uniform(215, 255)
    return Defect(_paint(image, mask, np.full((h, w, 3), level, np.float32)), mask, "scratch")


def make_defect(kind: str, image: np.ndarray, rng: np.random.Generator, *, source: np.ndarray | None = None,
                where: np.ndarray | None = None) -> Defect:
    """A defect of ``kind`` (one of :data:`KINDS`) on ``image``; ``source``: the other normal
    image ``blend`` takes its piece from (default: the image itself, flipped)."""
    makers: dict[str, Callable[[], Defect]] = {
        "cutpaste": lambda: cutpaste(image, rng, where=where),
        "scar": lambda: scar(image, rng, where=where),
        "blend": lambda: blend(image, source if source is not None else image[::-1, ::-1].copy(), rng, where=where),
        "noise": lambda: noise(image, rng, where=where),
        "blur": lambda: local_change(image, rng, "blur", where=where),
        "colour": lambda: local_change(image, rng, "colour", where=where),
        "intensity": lambda: local_change(image, rng, "intensity", where=where),
        "scratch": lambda: scratch(image, rng, where=where),
    }
    if kind not in makers:
        raise ValueError(f"unknown defect kind {kind!r}; choose from {', '.join(KINDS)}")
    return makers[kind]()
