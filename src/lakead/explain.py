"""The neuron-level report: which sensitive neurons carry an anomaly, in pictures.

``lakead explain MODEL_DIR [IMAGES...] --out DIR [--compare OTHER_MODEL_DIR ...]`` writes::

    DIR/index.html    a self-contained page (no script, no stylesheet or font from elsewhere)
    DIR/report.json   every number the page shows
    DIR/img/*.png     the figures, overlays and neuron activation maps the page shows

What the page holds:

1. **Channel variance.** The variance of every channel of the visual block over all support
   tokens (Eq. 3), sorted from largest to smallest, with the model's ``k`` and the elbow
   estimate of :func:`lakead.neurons.knee_k` marked.
2. **Per image.** The overlay of the anomaly map (:mod:`lakead.viz`, the model's fixed colour
   scale) with the most anomalous patch outlined. At that patch, the squared distance to
   the nearest gallery vector (Eq. 7) is a sum over the sensitive neurons,
   ``sum_k (q_k - g_k)^2``; each neuron's term, as a share of the sum, is its
   *contribution*. The top contributors are listed, each with its activation map: the
   channel's value at every token of the image, coloured from the 1st to the 99th
   percentile of that channel over the support tokens (so bright = beyond what normal
   images showed).
3. **Across models** (``--compare``; one model per category, same backbone and block): the
   Jaccard overlap of their sensitive-neuron sets as a heat map, and a 2-D embedding of
   *neuron fingerprints*. A neuron's fingerprint is the vector, over the compared models, of
   its standardised log-variance on each model's support set
   (:func:`lakead.neurons.neuron_fingerprints`): how strongly that channel varies on normal
   images of each category, compared with the other channels of the block. The embedding
   is the first two principal components of the fingerprints of every channel.

The module has two halves: computations that return plain dataclasses
(:func:`variance_curve`, :func:`explain_images`, :func:`compare_models`), and rendering that
turns them into files (:func:`write_report`).
"""

from __future__ import annotations

import html
import io
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw

from . import __version__
from .detector import LakeDetector
from .errors import ConfigError
from .fileio import atomic_directory
from .images import ImageInput
from .neurons import KNEE_RULE, embed_2d, jaccard_matrix, knee_k, neuron_fingerprints, patch_contributions, top_contributors
from .ops import nearest_neighbor, upsample_map
from .viz import colorize, overlay, png_bytes

#: Percentiles of a neuron's support values that span the colour scale of its activation map.
NORMAL_PERCENTILES = (1.0, 99.0)
#: Longest side, in pixels, of the images and overlays drawn in the report (small images are enlarged).
DISPLAY_SIZE = 320
#: Longest side, in pixels, of each neuron activation map drawn in the report.
THUMB_SIZE = 150
#: Colormap of the neuron activation maps (the anomaly overlays keep :data:`lakead.viz.COLORMAP`).
ACTIVATION_CMAP = "viridis"

FINGERPRINT_DEFINITION = (
    "A neuron's fingerprint is the vector, over the compared models, of its standardised log-variance on each "
    "model's support set: (log v - mean log v) / std log v, the mean and std taken over all channels of the block "
    "for that model. It says how strongly the channel varies on normal images of each category compared with the "
    "other channels; neurons with close fingerprints are sensitive to the same categories. The plot shows the first "
    "two principal components of the fingerprints of every channel."
)


# ======================================================================================
# Computations
# ======================================================================================


@dataclass(frozen=True)
class VarianceCurve:
    """The sorted channel-variance curve of a fitted model."""

    channels: np.ndarray  # (D,) int: channel indices, largest variance first (ties: lower index)
    variance: np.ndarray  # (D,) float64: their variances
    neurons: np.ndarray  # (K,) int: the model's sensitive neurons, in the model's order
    k: int  # K
    k_rule: str  # how K was chosen
    knee_k: int  # the elbow estimate on this curve (lakead.neurons.knee_k)
    selection: str  # the model's neuron selection rule


@dataclass(frozen=True)
class NeuronContribution:
    """One sensitive neuron's part in the distance of the most anomalous patch."""

    channel: int  # channel index in the block
    position: int  # position in the model's neuron list (0 = largest variance with selection "top")
    squared_diff: float  # (value - normal_value)^2, in the block's raw units
    share: float  # squared_diff / the patch's squared distance
    value: float  # the channel at the patch
    normal_value: float  # the channel in the nearest gallery vector
    activation: np.ndarray  # (gh, gw) float32: the channel at every token of the image
    normal_range: tuple[float, float]  # NORMAL_PERCENTILES of the channel over the support tokens


@dataclass(frozen=True)
class ImageExplanation:
    """Why one image scored as it did."""

    name: str
    image: np.ndarray  # (H, W, 3) uint8
    amap: np.ndarray  # (H, W) float32: the prediction's anomaly map
    score: float
    visual: float
    semantic: float
    anomalous: bool
    threshold: float
    patch: tuple[int, int]  # (row, col) of the most anomalous token on the (gh, gw) grid
    patch_score: float  # that token's visual score (the image's visual score)
    nearest_support: str  # the support image that holds the nearest gallery vector
    nearest_patch: tuple[int, int]  # (row, col) of that vector in its image
    contributions: tuple[NeuronContribution, ...]  # the top contributors, largest first
    top_share: float  # their summed share of the squared distance


@dataclass(frozen=True)
class ModelComparison:
    """Sensitive neurons of several models fitted on the same backbone and block."""

    labels: tuple[str, ...]  # one per model (C)
    neuron_sets: tuple[np.ndarray, ...]  # C arrays of channel indices
    jaccard: np.ndarray  # (C, C)
    fingerprints: np.ndarray  # (D, C)
    embedding: np.ndarray  # (D, 2)
    explained: np.ndarray  # (2,) fraction of the fingerprints' variance on each axis
    membership: np.ndarray  # (D, C) bool: channel d is a sensitive neuron of model c


def _k_rule(det: LakeDetector) -> str:
    if det.config.selection == "all":
        return "all channels (selection 'all')"
    if det.config.k == "auto":
        return "auto: k = the elbow estimate"
    return "fixed by the user"


def variance_curve(det: LakeDetector) -> VarianceCurve:
    """The sorted variance curve of ``det``'s support set, its ``k`` and the elbow estimate."""
    det.check_fitted()
    v = det.channel_variance_.detach().cpu().numpy().astype(np.float64)  # (D,)
    order = np.argsort(-v, kind="stable")
    neurons = det.neurons_.detach().cpu().numpy().astype(np.int64)
    return VarianceCurve(
        channels=order, variance=v[order], neurons=neurons, k=int(neurons.size), k_rule=_k_rule(det),
        knee_k=knee_k(v), selection=det.config.selection,
    )


def explain_images(
    det: LakeDetector,
    images: Sequence[ImageInput],
    *,
    names: Sequence[str] | None = None,
    top: int = 8,
) -> list[ImageExplanation]:
    """Explain each image's score: its map, its most anomalous patch and the neurons behind it.

    Raises :class:`~lakead.errors.ImageLoadError` on the first image that cannot be read.
    """
    det.check_fitted()
    if top < 1:
        raise ConfigError(f"top must be at least 1, got {top}")
    loaded = det.read_images(images, names)  # as predict reads them
    arrays, labels = loaded.arrays, loaded.names
    if not arrays:
        return []
    pred = det.predict(arrays, names=labels)
    gh, gw = det.grid_
    gallery = det.gallery_  # (M, K)
    neurons = det.neurons_.to(gallery.device)
    gallery_np = gallery.detach().cpu().numpy()
    lo, hi = np.percentile(gallery_np, NORMAL_PERCENTILES, axis=0)  # (K,) each
    rows_per_image = gh * gw
    out: list[ImageExplanation] = []
    # the same forward path as predict (batches, precision), read at the visual block only
    for start, f in det.iter_features(arrays, det.layer_, None):
        vis = f.visual.to(gallery.device)  # (B, N, D)
        b, n_tok, _ = vis.shape
        q = vis[..., neurons]  # (B, N, K)
        dist, idx = nearest_neighbor(q.reshape(b * n_tok, -1), gallery)
        dist, idx = dist.reshape(b, n_tok), idx.reshape(b, n_tok)  # (B, N)
        for j in range(b):
            i = start + j
            t = int(torch.argmax(dist[j]))
            g_row = int(idx[j, t])
            query = q[j, t].detach().cpu().numpy()  # (K,)
            contrib = patch_contributions(query, gallery_np[g_row])  # (K,)
            total = float(contrib.sum())
            picked = top_contributors(contrib, top)
            acts = vis[j].detach().cpu().numpy()  # (N, D)
            contributions = tuple(
                NeuronContribution(
                    channel=int(det.neurons_[p]), position=int(p), squared_diff=float(contrib[p]),
                    share=float(contrib[p] / total) if total > 0 else 0.0, value=float(query[p]),
                    normal_value=float(gallery_np[g_row, p]),
                    activation=acts[:, int(det.neurons_[p])].reshape(gh, gw).astype(np.float32),  # (gh, gw)
                    normal_range=(float(lo[p]), float(hi[p])),
                )
                for p in picked
            )
            support_index = int(det.gallery_image_[g_row])
            pos = g_row - support_index * rows_per_image
            out.append(ImageExplanation(
                name=labels[i], image=arrays[i], amap=pred.maps[i], score=float(pred.scores[i]),
                visual=float(pred.visual[i]), semantic=float(pred.semantic[i]), anomalous=bool(pred.anomalous[i]),
                threshold=float(pred.threshold), patch=(t // gw, t % gw),
                patch_score=float(dist[j, t]) / det.visual_scale_, nearest_support=det.support_[support_index],
                nearest_patch=(pos // gw, pos % gw), contributions=contributions,
                top_share=float(sum(c.share for c in contributions)),
            ))
    return out


def compare_models(detectors: Sequence[LakeDetector], labels: Sequence[str]) -> ModelComparison:
    """Overlap and fingerprints of the sensitive neurons of ``C >= 2`` fitted models.

    Every model must read the same block of the same backbone (else the channel indices
    do not name the same neurons): a :class:`~lakead.errors.ConfigError` says which differs.
    """
    if len(detectors) != len(labels):
        raise ConfigError(f"got {len(labels)} labels for {len(detectors)} models")
    if len(detectors) < 2:
        raise ConfigError("comparing sensitive neurons needs at least two fitted models")
    first = detectors[0]
    for det, label in zip(detectors, labels):
        det.check_fitted()
        if det.backbone.info.fingerprint != first.backbone.info.fingerprint:
            raise ConfigError(f"model {label!r} was fitted on another backbone than {labels[0]!r}: their neurons cannot be compared")
        if det.layer_ != first.layer_ or det.width_ != first.width_:
            raise ConfigError(
                f"model {label!r} reads block {det.layer_!r} ({det.width_} channels) but {labels[0]!r} reads "
                f"block {first.layer_!r} ({first.width_} channels): compare models fitted at the same block"
            )
    sets = tuple(det.neurons_.detach().cpu().numpy().astype(np.int64) for det in detectors)
    variances = np.stack([det.channel_variance_.detach().cpu().numpy().astype(np.float64) for det in detectors])  # (C, D)
    fingerprints = neuron_fingerprints(variances)  # (D, C)
    embedding, explained = embed_2d(fingerprints)
    membership = np.zeros((first.width_, len(detectors)), dtype=bool)
    for c, s in enumerate(sets):
        membership[s, c] = True
    return ModelComparison(
        labels=tuple(labels), neuron_sets=sets, jaccard=jaccard_matrix(sets), fingerprints=fingerprints,
        embedding=embedding, explained=explained, membership=membership,
    )


def comparison_labels(detectors: Sequence[LakeDetector], dirs: Sequence[str | Path]) -> list[str]:
    """A label per model: its class name, with its directory name where class names repeat."""
    names = [det.class_name_ for det in detectors]
    return [n if names.count(n) == 1 else f"{n} ({Path(d).name})" for n, d in zip(names, dirs)]


# ======================================================================================
# Rendering
# ======================================================================================


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


def _num(v: Any) -> Any:
    """JSON-safe numbers: NaN and infinities become null."""
    if isinstance(v, (float, np.floating)):
        v = float(v)
        return v if math.isfinite(v) else None
    if isinstance(v, np.integer):
        return int(v)
    if isinstance(v, (list, tuple)):
        return [_num(x) for x in v]
    if isinstance(v, dict):
        return {k: _num(x) for k, x in v.items()}
    return v


def report_data(
    det: LakeDetector,
    curve: VarianceCurve,
    explanations: Sequence[ImageExplanation],
    comparison: ModelComparison | None,
    files: dict[str, Any],
    *,
    image_rule: str | None = None,
    command: str | None = None,
) -> dict[str, Any]:
    """Every number the report shows, as a JSON-ready dict (``report.json``)."""
    gh, gw = det.grid_
    data: dict[str, Any] = {
        "lakead_version": __version__,
        "generated_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": command,
        "model": _num(det.summary()),
        "variance": {
            "channels_sorted": curve.channels.tolist(),
            "variance_sorted": _num(curve.variance.tolist()),
            "neurons": curve.neurons.tolist(),
            "k": curve.k,
            "k_rule": curve.k_rule,
            "elbow_k": curve.knee_k,
            "elbow_rule": KNEE_RULE,
            "selection": curve.selection,
            "figure": files["variance"],
        },
        "images": [],
        "image_rule": image_rule,
        "map_range": _num(list(det.map_range_)),
        "grid": [gh, gw],
        "comparison": None,
    }
    for i, ex in enumerate(explanations):
        data["images"].append({
            "name": ex.name,
            "size": [int(ex.image.shape[0]), int(ex.image.shape[1])],
            "score": _num(ex.score),
            "visual": _num(ex.visual),
            "semantic": _num(ex.semantic),
            "anomalous": ex.anomalous,
            "threshold": _num(ex.threshold),
            "patch": {"row": ex.patch[0], "col": ex.patch[1], "box_xyxy": list(_patch_box(ex.patch, det.grid_, ex.image.shape[:2]))},
            "patch_score": _num(ex.patch_score),
            "nearest_normal": {"support_image": ex.nearest_support, "row": ex.nearest_patch[0], "col": ex.nearest_patch[1]},
            "top_share": _num(ex.top_share),
            "image": files["images"][i]["image"],
            "overlay": files["images"][i]["overlay"],
            "top_neurons": [
                {
                    "channel": nc.channel, "position": nc.position, "share": _num(nc.share),
                    "squared_diff": _num(nc.squared_diff), "value": _num(nc.value), "normal_value": _num(nc.normal_value),
                    "normal_range": _num(list(nc.normal_range)), "activation_map": files["images"][i]["neurons"][r],
                }
                for r, nc in enumerate(ex.contributions)
            ],
        })
    if comparison is not None:
        data["comparison"] = {
            "models": [
                {"label": lab, "k": int(s.size), "neurons": s.tolist()} for lab, s in zip(comparison.labels, comparison.neuron_sets)
            ],
            "jaccard": _num(comparison.jaccard.tolist()),
            "fingerprint_definition": FINGERPRINT_DEFINITION,
            "fingerprints": _num(comparison.fingerprints.tolist()),
            "embedding": {
                "method": "PCA (first two principal components of the fingerprints of every channel)",
                "xy": _num(comparison.embedding.tolist()),
                "explained_variance_ratio": _num(comparison.explained.tolist()),
            },
            "jaccard_figure": files["jaccard"],
            "fingerprint_figure": files["fingerprints"],
        }
    return data


_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;background:#f5f6f8;color:#1d1f23}
main{max-width:1180px;margin:0 auto;padding:20px 28px 60px}
h1{font-size:1.5rem;margin:.2em 0}h2{font-size:1.2rem;margin:1.6em 0 .5em;border-bottom:2px solid #d8dbe1;padding-bottom:4px}
h3{font-size:1rem;margin:0 0 .4em}
p.note,.muted{color:#555;font-size:.9rem;line-height:1.4}
table{border-collapse:collapse;font-size:.86rem}
td,th{padding:3px 9px;border-bottom:1px solid #e3e5ea;text-align:left;vertical-align:top}
th{background:#eceef2}
.summary td:first-child{color:#555}
.card{background:#fff;border:1px solid #dde0e6;border-radius:8px;padding:14px 16px;margin:14px 0;box-shadow:0 1px 2px rgba(0,0,0,.04)}
.row{display:flex;gap:18px;flex-wrap:wrap;align-items:flex-start}
.figure img{max-width:100%;height:auto}
.tag{display:inline-block;padding:1px 8px;border-radius:10px;font-size:.8rem;font-weight:600}
.tag.bad{background:#fde2e1;color:#a4161a}.tag.ok{background:#e1f5e5;color:#1e6b34}
.bar{background:#e8710a;height:10px;border-radius:2px;display:inline-block;vertical-align:middle}
.neurons{display:flex;flex-wrap:wrap;gap:10px;margin-top:10px}
.neuron{text-align:center;font-size:.78rem;width:158px}
.neuron img{display:block;margin:0 auto 3px;border:1px solid #ccc}
code{background:#eef0f3;padding:0 4px;border-radius:3px}
"""


def _e(v: Any) -> str:
    return html.escape(str(v), quote=True)


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return "n/a" if not math.isfinite(v) else f"{v:.4g}"
    if isinstance(v, (list, tuple)):
        return ", ".join(str(x) for x in v) if v else "none"
    return str(v)


def render_html(data: dict[str, Any]) -> str:
    """The report page from :func:`report_data`'s dict (every figure a relative PNG path)."""
    m, var = data["model"], data["variance"]
    parts = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
        "<meta name='viewport' content='width=device-width, initial-scale=1'>",
        f"<title>lakead explain: {_e(m['class_name'])}</title><style>{_CSS}</style></head><body><main>",
        f"<h1>Sensitive neurons of the <code>{_e(m['class_name'])}</code> model</h1>",
        f"<p class='muted'>lakead {_e(data['lakead_version'])}, generated {_e(data['generated_at'])}"
        + (f"; command: <code>{_e(data['command'])}</code>" if data.get("command") else "")
        + ". Every number on this page is in <code>report.json</code>. Higher scores are more anomalous.</p>",
        "<div class='card'><table class='summary'>",
    ]
    for key, value in m.items():
        parts.append(f"<tr><td>{_e(key)}</td><td>{_e(_fmt(value))}</td></tr>")
    parts.append("</table></div>")

    # -- variance -----------------------------------------------------------------------
    parts += [
        "<h2>1. Channel variance on the support set</h2>",
        f"<p class='note'>The variance of each of the {len(var['variance_sorted'])} channels of block "
        f"<code>{_e(m['layer'])}</code> over every token of every support image (Eq. 3), largest first. "
        f"The model keeps <b>k = {var['k']}</b> neurons ({_e(var['k_rule'])}); selection rule "
        f"<code>{_e(var['selection'])}</code>. The elbow estimate is <b>{var['elbow_k']}</b> "
        f"({_e(var['elbow_rule'])}).</p>",
        f"<div class='card figure'><img src='{_e(var['figure'])}' alt='sorted channel variance'></div>",
        "<details class='card'><summary>The sensitive neurons, in the model's order</summary><p class='muted'>"
        + _e(", ".join(str(c) for c in var["neurons"])) + "</p></details>",
    ]

    # -- images -------------------------------------------------------------------------
    parts.append("<h2>2. What the neurons see, image by image</h2>")
    if not data["images"]:
        parts.append("<p class='note'>No image was given: pass images or folders after the model directory to "
                     "see their maps and the neurons behind their scores.</p>")
    else:
        parts.append(
            "<p class='note'>The image, then the anomaly map over it (the model's fixed colour scale: transparent at a "
            "typical normal patch, red at the decision level), the most anomalous patch outlined. Its distance to the "
            "nearest normal patch of the support set (Eq. 7) is a sum of one squared difference per sensitive neuron; "
            "the table gives the largest terms as shares of the sum. Below: each of those neurons' activation over the "
            "image, coloured from the 1st (dark) to the 99th (yellow) percentile of that neuron on normal support "
            "tokens, so yellow marks values normal images rarely reach.</p>"
        )
        if data.get("image_rule"):
            parts.append(f"<p class='muted'>Images: {_e(data['image_rule'])}.</p>")
    for im in data["images"]:
        verdict = "<span class='tag bad'>anomalous</span>" if im["anomalous"] else "<span class='tag ok'>normal</span>"
        nn = im["nearest_normal"]
        parts += [
            "<div class='card'>",
            f"<h3>{_e(im['name'])} {verdict}</h3>",
            "<div class='row'>",
            f"<div class='figure'><img src='{_e(im['image'])}' alt='{_e(im['name'])}'></div>",
            f"<div class='figure'><img src='{_e(im['overlay'])}' alt='anomaly overlay of {_e(im['name'])}'></div>",
            "<div><table>",
            f"<tr><td>score</td><td>{_fmt(im['score'])} (threshold {_fmt(im['threshold'])})</td></tr>",
            f"<tr><td>visual / semantic</td><td>{_fmt(im['visual'])} / {_fmt(im['semantic'])}</td></tr>",
            f"<tr><td>most anomalous patch</td><td>row {im['patch']['row']}, column {im['patch']['col']} "
            f"(score {_fmt(im['patch_score'])})</td></tr>",
            f"<tr><td>nearest normal patch</td><td>{_e(nn['support_image'])}, row {nn['row']}, column {nn['col']}</td></tr>",
            f"<tr><td>top {len(im['top_neurons'])} neurons' share</td><td>{100 * (im['top_share'] or 0):.1f}%</td></tr>",
            "</table>",
            "<table style='margin-top:8px'><tr><th>#</th><th>neuron</th><th>share</th><th>value here</th><th>nearest normal</th>"
            "<th>normal 1%..99%</th></tr>",
        ]
        for r, nc in enumerate(im["top_neurons"], 1):
            share = nc["share"] or 0.0
            lo, hi = nc["normal_range"]
            parts.append(
                f"<tr><td>{r}</td><td>{nc['channel']}</td><td><span class='bar' style='width:{round(120 * share)}px'>"
                f"</span> {100 * share:.1f}%</td><td>{_fmt(nc['value'])}</td><td>{_fmt(nc['normal_value'])}</td>"
                f"<td>{_fmt(lo)} .. {_fmt(hi)}</td></tr>"
            )
        parts += ["</table></div></div>", "<div class='neurons'>"]
        for nc in im["top_neurons"]:
            parts.append(
                f"<div class='neuron'><img src='{_e(nc['activation_map'])}' alt='activation of neuron {nc['channel']}'>"
                f"neuron {nc['channel']} &middot; {100 * (nc['share'] or 0):.1f}%</div>"
            )
        parts += ["</div></div>"]

    # -- comparison ---------------------------------------------------------------------
    parts.append("<h2>3. Sensitive neurons across categories</h2>")
    comp = data["comparison"]
    if comp is None:
        parts.append("<p class='note'>One model only. Give other models fitted on the same backbone and block "
                     "(one per category) with <code>--compare DIR</code> to see how their sensitive neurons overlap.</p>")
    else:
        parts += [
            "<p class='note'>Jaccard overlap |A &cap; B| / |A &cup; B| of the models' sensitive-neuron sets "
            "(1 = the same neurons, 0 = none in common).</p>",
            f"<div class='card row'><div class='figure'><img src='{_e(comp['jaccard_figure'])}' alt='Jaccard matrix'></div>",
            "<div><table><tr><th>model</th><th>k</th></tr>",
            *[f"<tr><td>{_e(mm['label'])}</td><td>{mm['k']}</td></tr>" for mm in comp["models"]],
            "</table></div></div>",
            f"<p class='note'><b>Neuron fingerprint.</b> {_e(comp['fingerprint_definition'])}</p>",
            f"<div class='card figure'><img src='{_e(comp['fingerprint_figure'])}' alt='neuron fingerprint embedding'></div>",
        ]
    parts.append("</main></body></html>")
    return "\n".join(parts)


def write_report(
    out_dir: str | Path,
    det: LakeDetector,
    explanations: Sequence[ImageExplanation] = (),
    comparison: ModelComparison | None = None,
    *,
    image_rule: str | None = None,
    command: str | None = None,
) -> Path:
    """Write ``index.html``, ``report.json`` and ``img/*.png`` to ``out_dir`` (atomically:
    the directory appears complete or not at all; an existing one is replaced). Returns
    the path of ``index.html``."""
    curve = variance_curve(det)
    blobs: dict[str, bytes] = {"img/variance.png": variance_figure(curve)}
    files: dict[str, Any] = {"variance": "img/variance.png", "images": []}
    for i, ex in enumerate(explanations):
        entry = {"image": f"img/image{i:03d}.png", "overlay": f"img/image{i:03d}_overlay.png", "neurons": []}
        blobs[entry["image"]] = image_png(ex)
        blobs[entry["overlay"]] = overlay_png(ex, det.map_range_, det.grid_)
        for nc in ex.contributions:
            rel = f"img/image{i:03d}_neuron{nc.channel:05d}.png"
            blobs[rel] = activation_png(ex, nc, det.grid_)
            entry["neurons"].append(rel)
        files["images"].append(entry)
    if comparison is not None:
        files["jaccard"], files["fingerprints"] = "img/jaccard.png", "img/fingerprints.png"
        blobs[files["jaccard"]] = jaccard_figure(comparison)
        blobs[files["fingerprints"]] = fingerprint_figure(comparison)
    data = report_data(det, curve, explanations, comparison, files, image_rule=image_rule, command=command)
    target = Path(out_dir)
    with atomic_directory(target) as tmp:
        (tmp / "img").mkdir()
        for rel, blob in blobs.items():
            (tmp / rel).write_bytes(blob)
        (tmp / "report.json").write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
        (tmp / "index.html").write_text(render_html(data), encoding="utf-8")
    return target / "index.html"

