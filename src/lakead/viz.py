"""Heat-map overlays of anomaly maps on their images.

The colour scale is fixed per model, not stretched per image: a normal image stays calm and
a defect stands out. ``vmin`` is the typical score of a normal patch and ``vmax`` the
decision level of the visual branch, both learned at fit (``LakeDetector.map_range_``).
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

#: The colormap of every overlay (matplotlib name).
COLORMAP = "jet"
#: Opacity of the heat map where it is at or above ``vmax``.
MAX_ALPHA = 0.6


def colorize(amap: np.ndarray, vmin: float, vmax: float, cmap: str = COLORMAP) -> np.ndarray:
    """``(H, W)`` scores -> ``(H, W, 3)`` uint8 colours, ``vmin`` blue to ``vmax`` red."""
    from matplotlib import colormaps

    span = max(vmax - vmin, 1e-12)
    unit = np.clip((np.asarray(amap, dtype=np.float32) - vmin) / span, 0.0, 1.0)
    return (colormaps[cmap](unit)[..., :3] * 255.0).round().astype(np.uint8)


def overlay(image: np.ndarray, amap: np.ndarray, vmin: float, vmax: float) -> np.ndarray:
    """Blend a map over its ``(H, W, 3)`` uint8 image; opacity grows with the score.

    Below ``vmin`` the image shows through untouched; at ``vmax`` and above the heat colour
    covers it at :data:`MAX_ALPHA`.
    """
    if image.shape[:2] != amap.shape:
        raise ValueError(f"map {amap.shape} does not match image {image.shape[:2]}")
    heat = colorize(amap, vmin, vmax).astype(np.float32)
    span = max(vmax - vmin, 1e-12)
    alpha = (np.clip((amap - vmin) / span, 0.0, 1.0) * MAX_ALPHA)[..., None].astype(np.float32)
    out = image.astype(np.float32) * (1.0 - alpha) + heat * alpha
    return out.round().clip(0, 255).astype(np.uint8)


def png_bytes(rgb: np.ndarray, compress_level: int = 1) -> bytes:
    """Encode a ``(H, W, 3)`` uint8 array as PNG.

    Level 1 of 9: on photos it is several times faster than the default 6 for files
    about 10-20% larger, the right trade for one overlay per scored image.
    """
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG", compress_level=compress_level)
    return buf.getvalue()


def npy_bytes(array: np.ndarray) -> bytes:
    """Serialise an array in ``.npy`` format (readable with ``numpy.load``)."""
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def _contour(mask: np.ndarray) -> np.ndarray:
    """The boundary pixels of a bool mask ``(H, W)`` (two pixels wide on large images)."""
    from scipy import ndimage

    width = max(1, round(max(mask.shape) / 400))
    return mask & ~ndimage.binary_erosion(mask, iterations=width, border_value=0)


def verdict_lines(score: float, threshold: float, anomalous: bool, out_of_scope: bool) -> list[str]:
    """The words of an overlay's banner: the image score, the decision, and the image threshold
    it was compared with (of the image score, not of the map's colour scale)."""
    verdict = ("NOT THIS PRODUCT" if out_of_scope else "ANOMALOUS") if anomalous else "normal"
    return [f"score {score:.4g}", verdict, f"(image threshold {threshold:.4g})"]


#: The title of the colour bar and the words for its two ends (see :func:`annotate`).
BAR_TITLE = "map scale"
BAR_TOP = "patch level"
BAR_BOTTOM = "typical normal"


def _wrap(draw, parts: list[str], font, width: float) -> list[str]:
    """``parts`` joined two spaces apart on as few lines as fit in ``width`` pixels (a part wider
    than that gets a line of its own)."""
    lines: list[str] = []
    for part in parts:
        joined = f"{lines[-1]}  {part}" if lines else part
        if lines and draw.textlength(joined, font=font) <= width:
            lines[-1] = joined
        else:
            lines.append(part)
    return lines


def annotate(rgb: np.ndarray, mask: np.ndarray | None, text: str | list[str], vmin: float, vmax: float, *,
             anomalous: bool, cmap: str = COLORMAP) -> np.ndarray:
    """An overlay with what it means drawn on it, at the same size: the outline of the defect
    regions (white), a colour bar along the right edge titled "map scale", from ``vmin`` (the typical
    normal patch) to ``vmax`` (the patch decision level, which is not the image threshold), and
    ``text`` (score and decision: a string or the parts of :func:`verdict_lines`) in a box at the
    top left, red when ``anomalous``, green otherwise. The box takes at most about half the width
    (its parts wrap onto lines) so that a small image stays visible. Returns a new ``(H, W, 3)``
    uint8 array."""
    from matplotlib import colormaps
    from PIL import ImageDraw, ImageFont

    h, w = rgb.shape[:2]
    out = rgb.copy()
    if mask is not None and mask.any():
        out[_contour(mask)] = (255, 255, 255)
    bar = max(6, w // 40)
    ramp = colormaps[cmap](np.linspace(1.0, 0.0, h))[:, :3]  # (H, 3): top = vmax
    out[:, w - bar:] = (ramp * 255).round().astype(np.uint8)[:, None, :]
    canvas = Image.fromarray(out)
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default(size=max(9, min(h, w) // 28))
    parts = [text] if isinstance(text, str) else list(text)
    banner = "\n".join(_wrap(draw, parts, font, max(w // 2, 1)))
    box = draw.multiline_textbbox((4, 4), banner, font=font, spacing=2)
    draw.rectangle((box[0] - 3, box[1] - 3, box[2] + 3, box[3] + 3), fill=(180, 0, 0) if anomalous else (0, 110, 0))
    draw.multiline_text((4, 4), banner, fill=(255, 255, 255), font=font, spacing=2)
    for label, at_top in ((f"{BAR_TITLE}\n{vmax:.3g} {BAR_TOP}", True), (f"{vmin:.3g} {BAR_BOTTOM}", False)):
        size = draw.multiline_textbbox((0, 0), label, font=font, spacing=2)
        x = w - bar - (size[2] - size[0]) - 3
        y = 2 if at_top else h - (size[3] - size[1]) - 5
        if at_top and x < box[2] + 6:  # no room beside the banner: below it
            y = box[3] + 6
        draw.multiline_text((x, y), label, fill=(255, 255, 255), font=font, spacing=2, align="right",
                            stroke_width=1, stroke_fill=(0, 0, 0))
    return np.asarray(canvas)
