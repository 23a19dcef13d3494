"""The neuron-level report as files: ``report.json`` (:func:`report_data`), ``index.html``
(:func:`render_html`, the jinja2 template ``templates/report.html.j2``) and ``img/*.png``
(:func:`write_report`, pictures from :mod:`lakead.explain.figures`).

The page is rendered with autoescaping on: every value from the data (image names, class
names, paths, the command line) is HTML-escaped, quotes included.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import jinja2
import numpy as np

from .._version import __version__
from ..methods.lake import LakeDetector
from ..outputs import REPORT, output_directory
from ..neurons import KNEE_RULE
from .compute import ImageExplanation, ModelComparison, VarianceCurve, variance_curve
from .figures import _patch_box, activation_png, fingerprint_figure, image_png, jaccard_figure, overlay_png, variance_figure

#: The page template, in this package's ``templates/`` folder.
TEMPLATE = "report.html.j2"

FINGERPRINT_DEFINITION = (
    "A neuron's fingerprint is the vector, over the compared models, of its standardised log-variance on each "
    "model's support set: (log v - mean log v) / std log v, the mean and std taken over all channels of the block "
    "for that model. It says how strongly the channel varies on normal images of each category compared with the "
    "other channels; neurons with close fingerprints are sensitive to the same categories. The plot shows the first "
    "two principal components of the fingerprints of every channel."
)


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


def _fmt(v: Any) -> str:
    """A value of the page: floats to 4 significant digits (non-finite: n/a), lists comma-separated."""
    if isinstance(v, float):
        return "n/a" if not math.isfinite(v) else f"{v:.4g}"
    if isinstance(v, (list, tuple)):
        return ", ".join(str(x) for x in v) if v else "none"
    return str(v)


def _pct(share: Any) -> str:
    """A share (0..1, or None) as a percentage with one decimal."""
    return f"{100 * (share or 0.0):.1f}%"


@functools.lru_cache(maxsize=1)
def _environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("lakead.explain", "templates"),
        autoescape=True,  # every {{ value }} is HTML-escaped (& < > " '), as html.escape(quote=True)
        undefined=jinja2.StrictUndefined,  # a missing key is an error, not an empty string
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["fmt"] = _fmt
    env.filters["pct"] = _pct
    return env


def render_html(data: dict[str, Any]) -> str:
    """The report page from :func:`report_data`'s dict (every figure a relative PNG path)."""
    return _environment().get_template(TEMPLATE).render(
        data=data, m=data["model"], var=data["variance"], comp=data["comparison"],
    )


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
    the directory appears complete or not at all; an existing one is replaced only when it holds
    an explain report and nothing else, :mod:`lakead.outputs`). Returns
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
    with output_directory(target, REPORT) as tmp:
        (tmp / "img").mkdir()
        for rel, blob in blobs.items():
            (tmp / rel).write_bytes(blob)
        (tmp / "report.json").write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
        (tmp / "index.html").write_text(render_html(data), encoding="utf-8")
    return target / "index.html"
