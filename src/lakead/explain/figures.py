"""The pictures of the neuron-level report, as PNG bytes.

Matplotlib figures of the computations in :mod:`lakead.explain.compute` (:func:`variance_figure`,
:func:`jaccard_figure`, :func:`fingerprint_figure`) and the per-image pictures at display size
(:func:`image_png`, :func:`overlay_png`, :func:`activation_png`), the most anomalous patch
outlined.
"""

from __future__ import annotations

import io
import math
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from ..ops import upsample_map
from ..viz import colorize, overlay, png_bytes
from .compute import ImageExplanation, ModelComparison, NeuronContribution, VarianceCurve

#: Longest side, in pixels, of the images and overlays drawn in the report (small images are enlarged).
DISPLAY_SIZE = 320
#: Longest side, in pixels, of each neuron activation map drawn in the report.
THUMB_SIZE = 150
#: Colormap of the neuron activation maps (the anomaly overlays keep :data:`lakead.viz.COLORMAP`).
ACTIVATION_CMAP = "viridis"


def _fig_png(fig: Any) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return buf.getvalue()


def variance_figure(curve: VarianceCurve) -> bytes:
    """PNG: the sorted variance curve (linear and log scale) with ``k`` and the elbow marked."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10.5, 3.6))
    rank = np.arange(1, curve.variance.size + 1)
    pos = {int(c): i for i, c in enumerate(curve.channels)}
    chosen = np.array(sorted(pos[int(c)] for c in curve.neurons)) if curve.selection != "all" else np.array([], int)
    for ax, log in zip(fig.subplots(1, 2), (False, True)):
        ax.plot(rank, curve.variance, color="#333", lw=1.4, label="variance (sorted)")
        if chosen.size and chosen.size < curve.variance.size:
            ax.scatter(chosen + 1, curve.variance[chosen], s=10, color="#e8710a", zorder=3, label="sensitive neurons")
        ax.axvline(curve.k + 0.5, color="#d62728", ls="--", lw=1.2, label=f"k = {curve.k}")
        ax.axvline(curve.knee_k + 0.5, color="#2ca02c", ls=":", lw=1.6, label=f"elbow = {curve.knee_k}")
        ax.set_xlabel("channel rank (1 = largest variance)")
        ax.set_ylabel("variance over support tokens")
        if log:
            positive = curve.variance[curve.variance > 0]
            if positive.size:
                ax.set_yscale("log")
            ax.set_title("log scale")
        else:
            ax.set_title("linear scale (the elbow is found here)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="upper right")
    return _fig_png(fig)


def jaccard_figure(comparison: ModelComparison) -> bytes:
    """PNG: the Jaccard matrix as an annotated heat map."""
    from matplotlib.figure import Figure

    c = len(comparison.labels)
    side = 2.2 + 0.75 * c
    fig = Figure(figsize=(side + 1.0, side))
    ax = fig.subplots()
    im = ax.imshow(comparison.jaccard, vmin=0.0, vmax=1.0, cmap="Blues")
    ax.set_xticks(range(c), comparison.labels, rotation=35, ha="right")
    ax.set_yticks(range(c), comparison.labels)
    for i in range(c):
        for j in range(c):
            v = comparison.jaccard[i, j]
            ax.text(j, i, f"{v:.2f}", ha="center", va="center", color="white" if v > 0.6 else "black", fontsize=9)
    ax.set_title("Jaccard overlap of sensitive-neuron sets")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    return _fig_png(fig)


def fingerprint_figure(comparison: ModelComparison) -> bytes:
    """PNG: every channel's fingerprint in 2-D; sensitive neurons coloured by model."""
    from matplotlib import colormaps
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.8, 5.2))
    ax = fig.subplots()
    xy = comparison.embedding
    member = comparison.membership
    count = member.sum(axis=1)
    ax.scatter(xy[count == 0, 0], xy[count == 0, 1], s=6, color="#bbbbbb", label="other channels")
    colours = colormaps["tab10"]
    for c, label in enumerate(comparison.labels):
        only = member[:, c] & (count == 1)
        ax.scatter(xy[only, 0], xy[only, 1], s=16, color=colours(c % 10), label=f"{label} only")
    shared = count >= 2
    if shared.any():
        ax.scatter(xy[shared, 0], xy[shared, 1], s=30, marker="D", facecolor="none", edgecolor="black",
                   label="sensitive in 2+ models")
    ax.set_xlabel(f"PC 1 ({100 * comparison.explained[0]:.0f}% of fingerprint variance)")
    ax.set_ylabel(f"PC 2 ({100 * comparison.explained[1]:.0f}%)")
    ax.set_title("neuron fingerprints (standardised log-variance per model)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    return _fig_png(fig)


def _display_size(h: int, w: int, longest: int = DISPLAY_SIZE) -> tuple[int, int]:
    s = longest / max(h, w)
    return max(1, round(h * s)), max(1, round(w * s))


def _resized(image: np.ndarray, longest: int = DISPLAY_SIZE) -> np.ndarray:
    h, w = _display_size(*image.shape[:2], longest=longest)
    return np.asarray(Image.fromarray(image).resize((w, h), Image.Resampling.BILINEAR))


def _patch_box(patch: tuple[int, int], grid: tuple[int, int], size: tuple[int, int]) -> tuple[int, int, int, int]:
    """Pixel box ``(x0, y0, x1, y1)`` of token ``(row, col)`` in an image of ``size (H, W)``."""
    (r, c), (gh, gw), (h, w) = patch, grid, size
    return (int(c * w / gw), int(r * h / gh), int(math.ceil((c + 1) * w / gw)) - 1, int(math.ceil((r + 1) * h / gh)) - 1)


def _outline(rgb: np.ndarray, box: tuple[int, int, int, int]) -> np.ndarray:
    im = Image.fromarray(rgb)
    draw = ImageDraw.Draw(im)
    x0, y0, x1, y1 = box
    draw.rectangle((x0 - 2, y0 - 2, x1 + 2, y1 + 2), outline=(0, 0, 0), width=1)
    draw.rectangle((x0 - 1, y0 - 1, x1 + 1, y1 + 1), outline=(255, 255, 255), width=2)
    return np.asarray(im)


def image_png(ex: ImageExplanation) -> bytes:
    """PNG: the image itself at display size."""
    return png_bytes(_resized(ex.image))


def overlay_png(ex: ImageExplanation, map_range: tuple[float, float], grid: tuple[int, int]) -> bytes:
    """PNG: the anomaly overlay at display size with the most anomalous patch outlined."""
    small = _resized(ex.image)
    h, w = small.shape[:2]
    amap = np.asarray(Image.fromarray(ex.amap).resize((w, h), Image.Resampling.BILINEAR))
    rgb = overlay(small, amap, *map_range)
    return png_bytes(_outline(rgb, _patch_box(ex.patch, grid, (h, w))))


def activation_png(ex: ImageExplanation, nc: NeuronContribution, grid: tuple[int, int], longest: int = THUMB_SIZE) -> bytes:
    """PNG: one neuron's activation over the image, coloured on its normal range, patch outlined."""
    h, w = _display_size(*ex.image.shape[:2], longest=longest)
    up = upsample_map(nc.activation, (h, w))  # (h, w)
    rgb = colorize(up, nc.normal_range[0], nc.normal_range[1], cmap=ACTIVATION_CMAP)
    return png_bytes(_outline(rgb, _patch_box(ex.patch, grid, (h, w))))
