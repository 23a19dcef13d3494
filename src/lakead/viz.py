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
