"""The evaluation harness: fit on the shots, score the test split, compute the metrics, write
the report; ablation grids and baselines on the same data with the same metrics.

One function does one thing:

- :func:`evaluate_category` fits a detector on one category's shots and scores its test
  images, returning a :class:`CategoryResult` (metrics, error bounds, a few examples);
- :func:`evaluate` runs it over a dataset and writes ``metrics.json``, ``metrics.csv``,
  ``scores.csv``, ``report.md`` and one figure per category;
- :func:`run_grid` runs several variants (an ablation grid, or the baselines) over the same
  categories and shots and writes one table: :func:`ablation_variants` and
  :func:`baseline_variants` build the variants.

Metrics come from :mod:`lakead.metrics` (pixel metrics binned with computed error bounds,
recorded next to them). Images are read and scored one batch at a time and pixel metrics
are accumulated in fixed memory, so a category of thousands of full-size images fits.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import itertools
import json
import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import __version__
from .backbones import Backbone, Features, load_backbone
from .data import Category, Sample, load_dataset, read_mask, select_shots
from .detector import LakeConfig, LakeDetector, Prediction
from .errors import ConfigError, ImageLoadError, LakeadError
from .fileio import atomic_write_bytes, atomic_write_text
from .metrics import PRO_FPR_LIMIT, PixelMetrics, image_metrics

log = logging.getLogger(__name__)

IMAGE_KEYS = ("auroc", "f1_max", "ap")
PIXEL_KEYS = ("auroc", "f1_max", "ap", "pro")
#: Column names of the tables, in order: image-level then pixel-level metrics.
METRIC_COLUMNS = tuple(f"image_{k}" for k in IMAGE_KEYS) + tuple(f"pixel_{k}" for k in PIXEL_KEYS)
HEADERS = {
    "image_auroc": "I-AUROC", "image_f1_max": "I-F1max", "image_ap": "I-AP",
    "pixel_auroc": "P-AUROC", "pixel_f1_max": "P-F1max", "pixel_ap": "P-AP", "pixel_pro": "PRO",
}
#: Which number of a :class:`~lakead.detector.Prediction` is the image score.
SCORE_FIELDS = ("scores", "visual", "semantic")
#: Longest side of the example images kept for the figures.
EXAMPLE_SIDE = 256


# -- methods: the baselines ----------------------------------------------------------------


@dataclass(frozen=True)
class Method:
    """A way of scoring: options that override the detector configuration, and which
    number of the prediction is the image score."""

    name: str
    overrides: dict[str, Any]
    score: str  # one of SCORE_FIELDS
    description: str
    needs_text: bool = False


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("lake", {}, "scores", "LAKE as configured: top-k sensitive neurons + text probe, fused (Eq. 14)"),
        Method("visual", {"use_text": False}, "visual", "visual branch only: the configured neurons (top-k by default), nearest neighbour"),
        Method("all", {"selection": "all", "use_text": False}, "visual",
               "full-width nearest neighbour: every channel (PatchCore-like, no coreset)"),
        Method("random", {"selection": "random", "use_text": False}, "visual", "k random channels, nearest neighbour"),
        Method("bottom", {"selection": "bottom", "use_text": False}, "visual", "k lowest-variance channels, nearest neighbour"),
        Method("text", {"map_source": "semantic", "use_text": True}, "semantic",
               "text probe only (zero-shot): per-token P(anomalous) of the two prompts; the shots are not used", True),
    )
}


def method_config(config: LakeConfig, method: str) -> tuple[LakeConfig, Method]:
    """The configuration a method runs with."""
    if method not in METHODS:
        raise ConfigError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    m = METHODS[method]
    return dataclasses.replace(config, **m.overrides).validate(), m


# -- one category -------------------------------------------------------------------------


@dataclass
class Example:
    """A test image shown in the figure, downsized: image, mask and map at the same size."""

    name: str
    defect: str
    score: float
    image: np.ndarray  # (h, w, 3) uint8
    mask: np.ndarray  # (h, w) bool
    amap: np.ndarray  # (h, w) float32


@dataclass
class CategoryResult:
    """Everything measured on one category."""

    name: str
    counts: dict[str, int]
    support_rule: str
    support: list[str]
    image: dict[str, float]
    pixel: dict[str, float]
    pixel_bounds: dict[str, float]  # upper bounds on |binned - exact| of each pixel metric
    pixel_images: int  # test images in the pixel metrics
    pixel_excluded: list[str]  # defect images without a mask, left out of the pixel metrics
    fit_seconds: float
    predict_seconds_per_image: float
    labels: np.ndarray = field(repr=False)  # (T,) 0/1
    scores: np.ndarray = field(repr=False)  # (T,) image scores
    rows: list[dict[str, Any]] = field(repr=False, default_factory=list)  # one per test image
    examples: list[Example] = field(repr=False, default_factory=list)
    map_range: tuple[float, float] = (0.0, 1.0)
    pixel_roc: tuple[np.ndarray, np.ndarray] | None = field(repr=False, default=None)
    decision: dict[str, float] = field(default_factory=dict)  # the fitted threshold's false alarms and recall

    def metrics(self) -> dict[str, float]:
        """The seven numbers of a table row, keyed by :data:`METRIC_COLUMNS`."""
        out = {f"image_{k}": self.image[k] for k in IMAGE_KEYS}
        out.update({f"pixel_{k}": self.pixel[k] for k in PIXEL_KEYS})
        return out

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "counts": self.counts,
            "support_rule": self.support_rule,
            "support": self.support,
            "image": _clean(self.image),
            "pixel": _clean(self.pixel),
            "pixel_error_bounds": _clean(self.pixel_bounds),
            "pixel_images": self.pixel_images,
            "pixel_excluded": self.pixel_excluded,
            "fit_seconds": round(self.fit_seconds, 3),
            "predict_seconds_per_image": round(self.predict_seconds_per_image, 5),
            "decision": _clean(self.decision),
        }


def choose_examples(test: Sequence[Sample], n: int) -> list[int]:
    """Indices of up to ``n`` test images for the figure: the first image of each defect type
    in turn (with a mask when there is one), then the first normal image."""
    if n <= 0:
        return []
    by_defect: dict[str, list[int]] = {}
    for i, s in enumerate(test):
        if s.label == 1:
            by_defect.setdefault(s.defect, []).append(i)
    for idx in by_defect.values():
        idx.sort(key=lambda i: test[i].mask is None)  # masked images first, stable
    chosen: list[int] = []
    rounds = itertools.zip_longest(*by_defect.values())
    for row in rounds:
        for i in row:
            if i is not None and len(chosen) < n - 1:
                chosen.append(i)
    normal = next((i for i, s in enumerate(test) if s.label == 0), None)
    if normal is not None:
        chosen.append(normal)
    return chosen[:n]


def _downsize(image: np.ndarray, mask: np.ndarray, amap: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    from PIL import Image

    h, w = amap.shape
    f = min(1.0, EXAMPLE_SIDE / max(h, w))
    if f == 1.0:
        return image, mask, amap
    size = (max(1, round(w * f)), max(1, round(h * f)))  # PIL: (width, height)
    img = np.asarray(Image.fromarray(image).resize(size, Image.Resampling.BILINEAR))
    m = np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize(size, Image.Resampling.NEAREST)) > 0
    a = np.asarray(Image.fromarray(amap.astype(np.float32), mode="F").resize(size, Image.Resampling.BILINEAR))
    return img, m, a.astype(np.float32)


def evaluate_category(
    category: Category,
    config: LakeConfig,
    backbone: Backbone,
    *,
    shots: int | None,
    seed: int | None,
    score: str = "scores",
    examples: int = 0,
    images: ImageCache | None = None,
    on_progress: Callable[[int], None] | None = None,
) -> CategoryResult:
    """Fit on ``shots`` normal training images of ``category`` (drawn by
    :func:`~lakead.data.select_shots` with ``seed``), score every test image, compute the
    metrics. ``score`` picks the image score (fused, visual or semantic). Defect images
    without a mask count for image metrics only. ``images`` keeps decoded images for the
    next call (grids). ``on_progress(n)`` after every batch."""
    if score not in SCORE_FIELDS:
        raise ConfigError(f"score must be one of {SCORE_FIELDS}, got {score!r}")
    chosen, rule = select_shots(category.train, shots, seed)
    det = LakeDetector.from_config(config, backbone=backbone)
    t0 = time.perf_counter()
    support = chosen if images is None else [images.read_or_path(det, p) for p in chosen]
    det.fit(support, category.class_name, names=[str(p) for p in chosen], support_rule=rule, on_progress=on_progress)
    fit_s = time.perf_counter() - t0
    read = (lambda p: images.read(det, p)) if images is not None else (lambda p: det.read_image(p, str(p)))

    test = category.test
    show = set(choose_examples(test, examples))
    acc = PixelMetrics()
    labels = np.array([s.label for s in test], dtype=np.int64)
    scores = np.zeros(len(test), dtype=np.float64)
    flagged = np.zeros(len(test), dtype=bool)  # the detector's own yes/no decisions
    rows: list[dict[str, Any]] = []
    kept: dict[int, Example] = {}
    excluded: list[str] = []
    bs = config.batch_size
    t0 = time.perf_counter()
    for start in range(0, len(test), bs):
        batch = test[start : start + bs]
        arrays = [read(s.path) for s in batch]
        pred = det.predict(arrays)
        for j, (s, arr) in enumerate(zip(batch, arrays)):
            i = start + j
            value = float(getattr(pred, score)[j])
            if not math.isfinite(value):
                raise LakeadError(f"{s.path}: the {score} score is {value} (the backbone gave non-finite features?)")
            scores[i] = value
            flagged[i] = bool(pred.anomalous[j])
            rows.append(_row(category.name, s, pred, j, value))
            mask = _mask_for(s, arr.shape[:2])
            if mask is None:
                excluded.append(str(s.path))
            else:
                acc.update(mask, pred.maps[j])
            if i in show:
                img, m, a = _downsize(arr, mask if mask is not None else np.zeros(arr.shape[:2], bool), pred.maps[j])
                kept[i] = Example(s.path.name, s.defect, value, img, m, a)
        if on_progress is not None:
            on_progress(len(batch))
    predict_s = (time.perf_counter() - t0) / max(1, len(test))

    roc = None
    try:
        roc = _thin(*acc.roc_curve())
    except ValueError:
        pass
    return CategoryResult(
        name=category.name,
        counts=category.counts(),
        support_rule=rule,
        support=list(det.support_),
        image=image_metrics(labels, scores),
        pixel=acc.compute(),
        pixel_bounds=acc.error_bounds(),
        pixel_images=acc.images,
        pixel_excluded=excluded,
        fit_seconds=fit_s,
        predict_seconds_per_image=predict_s,
        labels=labels,
        scores=scores,
        rows=rows,
        examples=[kept[i] for i in sorted(kept, key=lambda i: (test[i].label == 0, i))],
        map_range=tuple(det.map_range_),
        pixel_roc=roc,
        decision=decision_rates(labels, flagged, det.threshold_),
    )


def decision_rates(labels: np.ndarray, flagged: np.ndarray, threshold: float) -> dict[str, float]:
    """How the yes/no decisions at the threshold learned from normal images alone fare:
    the share of normal test images flagged (false alarms) and of defective ones flagged
    (recall). NaN where a class is absent.

    >>> decision_rates(np.array([0, 0, 1, 1]), np.array([False, True, True, True]), 1.5)
    {'threshold': 1.5, 'false_alarm_rate': 0.5, 'recall': 1.0}
    """
    normal, defect = flagged[labels == 0], flagged[labels == 1]
    return {
        "threshold": float(threshold),
        "false_alarm_rate": float(normal.mean()) if normal.size else float("nan"),
        "recall": float(defect.mean()) if defect.size else float("nan"),
    }


class ImageCache:
    """Decoded images kept between the variants of a grid, up to ``max_bytes`` in all
    (beyond that, images are decoded again each time)."""

    def __init__(self, max_bytes: int = 2 << 30) -> None:
        self.max_bytes = max_bytes
        self.bytes = 0
        self._arrays: dict[Path, np.ndarray] = {}

    def read(self, det: LakeDetector, path: Path) -> np.ndarray:
        arr = self._arrays.get(path)
        if arr is None:
            arr = det.read_image(path, str(path))
            if self.bytes + arr.nbytes <= self.max_bytes:
                self._arrays[path] = arr
                self.bytes += arr.nbytes
        return arr

    def read_or_path(self, det: LakeDetector, path: Path) -> np.ndarray | Path:
        """The decoded image, or the path itself when it cannot be read: ``fit`` then reads
        it again and skips it with its own warning."""
        try:
            return self.read(det, path)
        except ImageLoadError:
            return path

    def clear(self) -> None:
        self._arrays.clear()
        self.bytes = 0


def _mask_for(s: Sample, shape: tuple[int, int]) -> np.ndarray | None:
    """The sample's mask at ``shape``; all-zero for a normal image; None when missing."""
    if s.label == 0:
        return np.zeros(shape, dtype=bool)
    if s.mask is None:
        return None
    return read_mask(s.mask, size=shape)


def _row(category: str, s: Sample, pred: Prediction, j: int, value: float) -> dict[str, Any]:
    return {
        "category": category, "path": str(s.path), "label": s.label, "defect": s.defect, "score": value,
        "fused": float(pred.scores[j]), "visual": float(pred.visual[j]), "semantic": float(pred.semantic[j]),
        "anomalous": bool(pred.anomalous[j]),
    }


def _thin(x: np.ndarray, y: np.ndarray, n: int = 2000) -> tuple[np.ndarray, np.ndarray]:
    """At most about ``n`` points of a curve, ends kept (for plotting only)."""
    if x.size <= n:
        return x, y
    idx = np.unique(np.concatenate([np.linspace(0, x.size - 1, n).round().astype(int), [0, x.size - 1]]))
    return x[idx], y[idx]


# -- a whole dataset: the report ------------------------------------------------------------


@dataclass
class EvalReport:
    """What :func:`evaluate` measured, and where it wrote it."""

    results: list[CategoryResult]
    mean: dict[str, float]
    settings: dict[str, Any]
    out_dir: Path


def mean_metrics(rows: Sequence[dict[str, float]]) -> dict[str, float]:
    """The mean of each metric over categories, ignoring categories where it is undefined (NaN)."""
    out = {}
    for key in METRIC_COLUMNS:
        vals = [r[key] for r in rows if r.get(key) is not None and math.isfinite(r[key])]
        out[key] = float(np.mean(vals)) if vals else float("nan")
    return out


def _categories(data: str | Path | Sequence[Category], categories: Sequence[str] | None) -> tuple[list[Category], str]:
    """Categories and the data root to report, from a folder or already loaded categories."""
    if isinstance(data, (str, Path)):
        return load_dataset(data, categories), str(Path(data).resolve())
    cats = list(data)
    if categories:
        cats = [c for c in cats if c.name in categories or c.name.split("/")[-1] in categories]
    if not cats:
        raise ConfigError("no category to evaluate")
    roots = [str(c.root.resolve()) for c in cats]
    return cats, os.path.commonpath(roots)


def images_to_process(categories: Sequence[Category], shots: int | None, runs: int = 1) -> int:
    """Images read by :func:`evaluate` (shots and test images): the length of a progress bar."""
    return runs * sum(_n_shots(c, shots) + len(c.test) for c in categories)


def evaluate(
    data: str | Path | Sequence[Category],
    out_dir: str | Path,
    config: LakeConfig,
    *,
    categories: Sequence[str] | None = None,
    shots: int | None = 64,
    seed: int | None = 0,
    method: str = "lake",
    examples: int = 4,
    figures: bool = True,
    command: str | None = None,
    backbone: Backbone | None = None,
    on_progress: Callable[[int], None] | None = None,
) -> EvalReport:
    """Evaluate ``config`` (with ``method``'s overrides) on every category of ``data`` (a
    dataset folder, see :func:`~lakead.data.load_dataset`, or loaded categories) and write
    the report to ``out_dir`` (created; the files in it are replaced one by one, atomically).
    ``on_progress(n)`` is called as images are processed (see :func:`images_to_process`)."""
    cats, data_root = _categories(data, categories)
    cfg, m = method_config(config, method)
    bb = backbone or load_backbone(cfg.backbone, need_text=cfg.use_text)
    _check_method(m, bb)
    cfg = _without_missing_text(cfg, bb)
    results = []
    for cat in cats:
        log.info("%s: %s shots, %d test images", cat.name, _n_shots(cat, shots), len(cat.test))
        results.append(evaluate_category(cat, cfg, bb, shots=shots, seed=seed, score=m.score,
                                         examples=examples if figures else 0, on_progress=on_progress))
    settings = _settings(data_root, cfg, bb, m, shots, seed, command)
    report = EvalReport(results, mean_metrics([r.metrics() for r in results]), settings, Path(out_dir))
    write_report(report, figures=figures)
    return report


def _check_method(m: Method, bb: Backbone) -> None:
    if m.needs_text and not bb.has_text:
        raise ConfigError(f"method {m.name!r} needs a text tower; backbone {bb.info.source} has none")


def _without_missing_text(cfg: LakeConfig, bb: Backbone) -> LakeConfig:
    """The text probe turned off, with one warning, for a backbone without a text tower (so
    that each category's fit does not warn again)."""
    if cfg.use_text and not bb.has_text:
        log.warning("backbone %s has no text tower: the text probe is off (semantic scores are 0)", bb.info.source)
        return dataclasses.replace(cfg, use_text=False)
    return cfg


def _n_shots(cat: Category, shots: int | None) -> int:
    return len(cat.train) if shots is None else min(shots, len(cat.train))


def _settings(data_root, cfg: LakeConfig, bb: Backbone, m: Method, shots, seed, command) -> dict[str, Any]:
    return {
        "lakead_version": __version__,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": command,
        "data_root": str(data_root),
        "method": m.name,
        "method_description": m.description,
        "image_score": m.score,
        "shots": "all" if shots is None else shots,
        "shot_seed": seed,
        "backbone": bb.info.to_dict(),
        "config": cfg.to_dict(),
        "pro_fpr_limit": PRO_FPR_LIMIT,
    }


def format_percent(v: float | None, digits: int = 1) -> str:
    """A metric in percent for tables; "n/a" when undefined."""
    if v is None or not math.isfinite(v):
        return "n/a"
    return f"{100 * v:.{digits}f}"


def _clean(d: dict[str, float]) -> dict[str, float | None]:
    """JSON has no NaN: undefined metrics become null."""
    return {k: (None if v is None or not math.isfinite(v) else v) for k, v in d.items()}


def _csv(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(columns), extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if isinstance(v, float) and not math.isfinite(v) else v) for k, v in r.items()})
    return buf.getvalue()


def write_report(report: EvalReport, *, figures: bool = True) -> None:
    """``metrics.json``, ``metrics.csv``, ``scores.csv``, ``report.md`` and
    ``figures/<category>.png`` in ``report.out_dir``, each written atomically."""
    out = report.out_dir
    out.mkdir(parents=True, exist_ok=True)
    doc = {
        "settings": report.settings,
        "categories": [r.to_json() for r in report.results],
        "mean": _clean(report.mean),
    }
    atomic_write_text(out / "metrics.json", json.dumps(doc, indent=2) + "\n")
    table = [{"category": r.name, "n_normal": r.counts["test_normal"], "n_defect": r.counts["test_defect"],
              "pixel_images": r.pixel_images, "shots": len(r.support), **r.metrics()} for r in report.results]
    table.append({"category": "mean", **report.mean})
    atomic_write_text(out / "metrics.csv", _csv(table, ["category", "n_normal", "n_defect", "pixel_images", "shots", *METRIC_COLUMNS]))
    rows = [row for r in report.results for row in r.rows]
    atomic_write_text(out / "scores.csv", _csv(rows, ["category", "path", "label", "defect", "score", "fused", "visual", "semantic", "anomalous"]))
    fig_files = {}
    if figures:
        for r in report.results:
            name = "figures/" + r.name.replace("/", "__") + ".png"
            atomic_write_bytes(out / name, category_figure(r))
            fig_files[r.name] = name
    atomic_write_text(out / "report.md", report_markdown(report, fig_files))


def metrics_table(rows: Sequence[tuple[Any, dict[str, float]]], first: str | Sequence[str] = "category") -> str:
    """A markdown table: label column(s) and the seven metrics in percent. A row's label is
    one value, or a sequence of values when ``first`` names several columns."""
    names = [first] if isinstance(first, str) else list(first)
    head = "| " + " | ".join([*names, *(HEADERS[c] for c in METRIC_COLUMNS)]) + " |"
    sep = "|" + "---|" * len(names) + "---:|" * len(METRIC_COLUMNS)
    body = []
    for label, m in rows:
        cells = [label] if isinstance(first, str) else list(label)
        body.append("| " + " | ".join([*map(str, cells), *(format_percent(m.get(c)) for c in METRIC_COLUMNS)]) + " |")
    return "\n".join([head, sep, *body])


def report_markdown(report: EvalReport, figures: dict[str, str]) -> str:
    s = report.settings
    cfg = s["config"]
    bb = s["backbone"]
    lines = [
        "# lakead evaluation",
        "",
        f"{s['date']}, lakead {s['lakead_version']}. Data: `{s['data_root']}`.",
    ]
    if s.get("command"):
        lines += ["", "Command:", "", "```", s["command"], "```"]
    rows = [(f"{r.name} ({r.counts['test_normal']} / {r.counts['test_defect']})", r.metrics()) for r in report.results]
    rows.append(("**mean**", report.mean))
    lines += [
        "",
        "## Results (%)",
        "",
        "I- = image level, P- = pixel level; (normal / defect test images). PRO: area under the "
        f"per-region-overlap curve for FPR 0 to {PRO_FPR_LIMIT}, divided by {PRO_FPR_LIMIT}. "
        "The mean is over categories; n/a: undefined (one class only).",
        "",
        metrics_table(rows),
        "",
        "## Decisions at the threshold learned from normal images only",
        "",
        "The fitted detector's own yes/no (fused score above its leave-one-out threshold; no defect "
        "image is used to set it): the share of normal test images it flags (false alarms) and of "
        "defective ones (recall).",
        "",
        "| category | threshold | false alarms | recall |",
        "|---|---:|---:|---:|",
        *(f"| {r.name} | {r.decision.get('threshold', float('nan')):.4g} | "
          f"{format_percent(r.decision.get('false_alarm_rate'))} | {format_percent(r.decision.get('recall'))} |"
          for r in report.results),
        "",
        "## Settings",
        "",
        f"- method: `{s['method']}`: {s['method_description']}; image score: `{s['image_score']}`",
        f"- backbone: `{bb['source']}` ({bb['kind']}, weights sha256 {bb['fingerprint'][:16]}...)",
        f"- layer: `{cfg['layer']}`, k: {cfg['k']}, selection: `{cfg['selection']}` (seed {cfg['seed']}), "
        f"text probe: {'on' if cfg['use_text'] and bb['joint_dim'] else 'off'}, lam: {cfg['lam']}, "
        f"semantic layer: {cfg['semantic_layer']}, semantic aggregation: {cfg['semantic_agg']}",
        f"- score_norm: `{cfg['score_norm']}`, maps: `{cfg['map_source']}`, sigma: {cfg['sigma']}, "
        f"image size: {cfg['image_size'] or bb['image_size']}, device: {cfg['device']}, batch size: {cfg['batch_size']}",
        f"- shots: {s['shots']} per category, seed {s['shot_seed']}:",
    ]
    for r in report.results:
        lines.append(f"  - {r.name}: {r.support_rule} (listed in metrics.json)")
    excluded = [(r.name, len(r.pixel_excluded)) for r in report.results if r.pixel_excluded]
    if excluded:
        lines += ["", "## Images left out of pixel metrics", ""]
        lines += [f"- {name}: {n} defect image(s) without a mask count for image metrics only (listed in metrics.json)"
                  for name, n in excluded]
    worst = max((v for r in report.results for v in r.pixel_bounds.values() if v is not None and math.isfinite(v)), default=0.0)
    lines += [
        "",
        "## Notes",
        "",
        f"- Pixel metrics use score bins (lakead.metrics); the largest bound on the binning error of any pixel "
        f"metric above is {worst:.1e} (per metric in metrics.json).",
        f"- Time: fit {sum(r.fit_seconds for r in report.results):.1f} s in all; scoring "
        + ", ".join(f"{r.name} {1000 * r.predict_seconds_per_image:.0f} ms" for r in report.results)
        + " per image (reading, model, maps and metrics; this machine, not a benchmark).",
    ]
    if figures:
        lines += ["", "## Figures", ""]
        for r in report.results:
            lines += [f"### {r.name}", "", f"![{r.name}]({figures[r.name]})", ""]
    return "\n".join(lines) + "\n"


def category_figure(r: CategoryResult) -> bytes:
    """ROC curves (image and pixel) and a few example maps next to their masks, as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt
    from sklearn.metrics import roc_curve

    from .viz import overlay

    n = len(r.examples)
    fig = plt.figure(figsize=(3.6 + 2.3 * max(n, 1), 4.8), dpi=100)
    grid = fig.add_gridspec(2, 1 + max(n, 1), width_ratios=[1.6] + [1] * max(n, 1))
    ax = fig.add_subplot(grid[:, 0])
    if 0 < r.labels.sum() < r.labels.size:
        fpr, tpr, _ = roc_curve(r.labels, r.scores)
        ax.plot(fpr, tpr, label=f"image ({format_percent(r.image['auroc'])})")
    if r.pixel_roc is not None:
        ax.plot(*r.pixel_roc, label=f"pixel ({format_percent(r.pixel['auroc'])})")
    ax.plot([0, 1], [0, 1], color="0.7", lw=0.8, ls="--")
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title=f"{r.name}: ROC (AUROC %)", xlim=(0, 1), ylim=(0, 1.01))
    ax.legend(loc="lower right", fontsize=8)
    vmin, vmax = r.map_range
    for i, ex in enumerate(r.examples):
        top, bottom = fig.add_subplot(grid[0, 1 + i]), fig.add_subplot(grid[1, 1 + i])
        top.imshow(ex.image)
        if ex.mask.any():
            top.contour(ex.mask, levels=[0.5], colors="lime", linewidths=0.8)
        top.set_title(f"{ex.defect}\n{ex.name}", fontsize=8)
        bottom.imshow(overlay(ex.image, ex.amap, vmin, vmax))
        if ex.mask.any():
            bottom.contour(ex.mask, levels=[0.5], colors="white", linewidths=0.6)
        bottom.set_title(f"score {ex.score:.3g}", fontsize=8)
        for a in (top, bottom):
            a.set_xticks([])
            a.set_yticks([])
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


# -- grids: ablations and baselines --------------------------------------------------------


@dataclass(frozen=True)
class Variant:
    """One row of a grid: a label, its configuration, image score, shots and seeds."""

    label: dict[str, Any]  # the settings that make this row, shown as table columns
    config: LakeConfig
    score: str
    shots: int | None
    seeds: tuple[int, ...] = (0,)  # selection="random": one run per seed, averaged


def parse_shots(value: str) -> int | None:
    """``"16"`` -> 16; ``"all"`` -> None (every training image)."""
    v = value.strip().lower()
    if v == "all":
        return None
    if not v.isdigit() or int(v) < 1:
        raise ConfigError(f"shots must be a positive integer or 'all', got {value!r}")
    return int(v)


def ablation_variants(
    base: LakeConfig,
    *,
    ks: Sequence[int],
    lams: Sequence[float],
    shots: Sequence[int | None],
    layers: Sequence[Any],
    selections: Sequence[str],
    seeds: Sequence[int] = (0, 1, 2),
    score_norms: Sequence[str] | None = None,
) -> list[Variant]:
    """Every combination of the lists (k is dropped for selection="all", which keeps every
    channel). Random selections run once per seed and are averaged."""
    norms = list(score_norms) if score_norms else [base.score_norm]
    out: list[Variant] = []
    seen = set()
    for layer, shot, sel, k, lam, norm in itertools.product(layers, shots, selections, ks, lams, norms):
        k_eff = None if sel == "all" else k
        key = (layer, shot, sel, k_eff, lam, norm)
        if key in seen:
            continue
        seen.add(key)
        cfg = dataclasses.replace(base, layer=layer, selection=sel, k=k if k_eff is not None else base.k, lam=lam, score_norm=norm).validate()
        label = {"layer": layer, "shots": "all" if shot is None else shot, "selection": sel,
                 "k": "all" if k_eff is None else k, "lam": lam, "score_norm": norm}
        out.append(Variant(label, cfg, "scores", shot, tuple(seeds) if sel == "random" else (cfg.seed,)))
    return out


def baseline_variants(
    base: LakeConfig,
    *,
    methods: Sequence[str],
    shots: int | None,
    seeds: Sequence[int] = (0, 1, 2),
    score_norms: Sequence[str] = ("loo", "none"),
    has_text: bool = True,
) -> list[Variant]:
    """One row per method; LAKE once per ``score_norms`` entry (the normalisation changes
    only the fused score, so the other methods run once). Methods that need a text tower
    are left out, with a warning, when the backbone has none."""
    out = []
    for name in methods:
        cfg, m = method_config(base, name)
        if m.needs_text and not has_text:
            log.warning("method %r left out: the backbone has no text tower", name)
            continue
        fused = m.score == "scores" and has_text and cfg.use_text
        for norm in (score_norms if fused else [cfg.score_norm]):
            c = dataclasses.replace(cfg, score_norm=norm).validate()
            k = "-" if m.score == "semantic" else "all" if c.selection == "all" else c.k  # the text probe uses no neurons
            label = {"method": name, "score_norm": norm if fused else "-", "k": k}
            out.append(Variant(label, c, m.score, shots, tuple(seeds) if c.selection == "random" else (c.seed,)))
    return out


class FeatureCache(Backbone):
    """A backbone that remembers the block outputs of every image it has read, so that the
    variants of a grid run the network once per image.

    Entries are keyed by a SHA-1 of the image's preprocessed pixels and the block, so a
    different image, input size or preprocessing is never served from the cache. An entry
    made with the semantic block also serves visual-only requests. Features are kept on the
    CPU in float32 (exactly what the backbone returned); :meth:`clear` empties the cache.
    """

    def __init__(self, inner: Backbone) -> None:
        self.inner = inner
        self.info = inner.info
        self.preprocessing = inner.preprocessing
        self.has_text = inner.has_text
        self._store: dict[tuple[str, Any], tuple[torch.Tensor, torch.Tensor | None, tuple[int, int], Any]] = {}
        self.hits = 0
        self.misses = 0

    @property
    def device(self) -> torch.device:  # type: ignore[override]
        return self.inner.device

    @device.setter
    def device(self, value: torch.device) -> None:
        self.inner.device = value

    def resolve_layer(self, layer: Any, *, semantic: bool = False) -> Any:
        return self.inner.resolve_layer(layer, semantic=semantic)

    def check_image_size(self, image_size: int) -> int:
        return self.inner.check_image_size(image_size)

    def grid_size(self, image_size: int) -> tuple[int, int]:
        return self.inner.grid_size(image_size)

    def text_embeddings(self, prompts: Sequence[str]) -> torch.Tensor:
        return self.inner.text_embeddings(prompts)

    @property
    def logit_scale(self) -> float:
        return self.inner.logit_scale

    def to(self, device: torch.device | str) -> "FeatureCache":
        self.inner.to(device)
        return self

    def clear(self) -> None:
        self._store.clear()

    def extract(self, pixels: torch.Tensor, layer: Any, semantic_layer: Any) -> Features:
        keys = [(hashlib.sha1(pixels[i].detach().cpu().contiguous().numpy().tobytes()).hexdigest() + str(tuple(pixels.shape[1:])), layer)
                for i in range(pixels.shape[0])]
        found = [self._store.get(k) for k in keys]
        if all(e is not None and (semantic_layer is None or e[3] == semantic_layer) for e in found):
            self.hits += len(keys)
            dev = self.inner.device
            visual = torch.stack([e[0] for e in found]).to(dev)  # type: ignore[index]
            joint = torch.stack([e[1] for e in found]).to(dev) if semantic_layer is not None else None  # type: ignore[index, misc]
            return Features(visual=visual, joint=joint, grid=found[0][2])  # type: ignore[index]
        self.misses += len(keys)
        f = self.inner.extract(pixels, layer, semantic_layer)
        for i, k in enumerate(keys):
            old = self._store.get(k)
            if old is None or (semantic_layer is not None and old[3] is None):  # never drop a joint entry
                joint = f.joint[i].detach().cpu() if f.joint is not None else None
                self._store[k] = (f.visual[i].detach().cpu(), joint, f.grid, semantic_layer)
        return f


@dataclass
class GridReport:
    rows: list[dict[str, Any]]  # one per variant: its label, mean metrics, and per category
    label_keys: list[str]
    out_dir: Path
    settings: dict[str, Any]


def grid_images(categories: Sequence[Category], variants: Sequence[Variant]) -> int:
    """Images read by :func:`run_grid`: the length of a progress bar."""
    return sum(images_to_process(categories, v.shots, len(v.seeds)) for v in variants)


def run_grid(
    data: str | Path | Sequence[Category],
    out_dir: str | Path,
    variants: Sequence[Variant],
    *,
    categories: Sequence[str] | None = None,
    shot_seed: int | None = 0,
    title: str = "ablation",
    command: str | None = None,
    backbone: Backbone | None = None,
    cache_features: bool = True,
    on_progress: Callable[[int], None] | None = None,
) -> GridReport:
    """Run every variant on every category (the same shots for every variant with the same
    shot count) and write ``<title>.md``, ``<title>.csv`` and ``<title>.json``: one table,
    one row per variant, the mean over categories; then the same table per category.

    With ``cache_features`` the network runs once per image and block for all variants
    (:class:`FeatureCache`; memory: one category's features) and decoded images are kept
    (:class:`ImageCache`, up to 2 GiB)."""
    if not variants:
        raise ConfigError("nothing to run: the grid is empty")
    cats, data_root = _categories(data, categories)
    backbones = {v.config.backbone for v in variants}
    if len(backbones) != 1:
        raise ConfigError(f"a grid runs one backbone, got {sorted(backbones)}")
    bb = backbone or load_backbone(variants[0].config.backbone, need_text=any(v.config.use_text for v in variants))
    if any(v.config.use_text for v in variants) and not bb.has_text:
        log.warning("backbone %s has no text tower: the text probe is off (semantic scores are 0)", bb.info.source)
        variants = [dataclasses.replace(v, config=dataclasses.replace(v.config, use_text=False)) for v in variants]
    per_cat: list[dict[str, dict[str, float]]] = [{} for _ in variants]
    spread: list[dict[str, dict[str, float]]] = [{} for _ in variants]
    bounds: list[dict[str, float]] = [{} for _ in variants]  # the largest binning-error bound per pixel metric
    reader = FeatureCache(bb) if cache_features else bb
    images = ImageCache() if cache_features else None
    for cat in cats:  # categories outside: the cache holds one category's features at a time
        for i, v in enumerate(variants):
            log.info("%s: row %d of %d (%s)", cat.name, i + 1, len(variants), ", ".join(f"{k}={x}" for k, x in v.label.items()))
            runs = []
            for s in v.seeds:
                cfg = dataclasses.replace(v.config, seed=s)
                res = evaluate_category(cat, cfg, reader, shots=v.shots, seed=shot_seed, score=v.score, images=images,
                                        on_progress=on_progress)
                runs.append(res.metrics())
                for key, b in res.pixel_bounds.items():
                    if math.isfinite(b):
                        bounds[i][key] = max(bounds[i].get(key, 0.0), b)
            per_cat[i][cat.name] = mean_metrics(runs) if len(runs) > 1 else runs[0]
            if len(runs) > 1:
                spread[i][cat.name] = {k: float(np.std([r[k] for r in runs])) for k in METRIC_COLUMNS}
        if isinstance(reader, FeatureCache):
            reader.clear()
        if images is not None:
            images.clear()
    rows = [
        {"label": v.label, "seeds": list(v.seeds), "mean": mean_metrics(list(per_cat[i].values())),
         "categories": per_cat[i], "seed_std": spread[i], "pixel_error_bounds": bounds[i], "config": v.config.to_dict(),
         "score": v.score}
        for i, v in enumerate(variants)
    ]
    label_keys = [k for k in variants[0].label if len({str(v.label[k]) for v in variants}) > 1] or list(variants[0].label)
    settings = {
        "lakead_version": __version__,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": command,
        "data_root": data_root,
        "categories": [c.name for c in cats],
        "shot_seed": shot_seed,
        "backbone": bb.info.to_dict(),
        "base_config": variants[0].config.to_dict(),
    }
    report = GridReport(rows, label_keys, Path(out_dir), settings)
    write_grid(report, title)
    return report


def write_grid(report: GridReport, title: str) -> None:
    out = report.out_dir
    out.mkdir(parents=True, exist_ok=True)
    keys = report.label_keys
    doc = {"settings": report.settings, "rows": [
        {**r, "mean": _clean(r["mean"]), "categories": {c: _clean(m) for c, m in r["categories"].items()}} for r in report.rows]}
    atomic_write_text(out / f"{title}.json", json.dumps(doc, indent=2) + "\n")
    flat = []
    for r in report.rows:
        for cat, m in [("mean", r["mean"]), *r["categories"].items()]:
            flat.append({**r["label"], "seeds": " ".join(map(str, r["seeds"])), "category": cat, **m})
    all_keys = list(report.rows[0]["label"])
    atomic_write_text(out / f"{title}.csv", _csv(flat, [*all_keys, "seeds", "category", *METRIC_COLUMNS]))
    atomic_write_text(out / f"{title}.md", grid_markdown(report, title))


def _label(r: dict[str, Any], keys: Sequence[str]) -> list[str]:
    cells = [str(r["label"][k]) for k in keys]
    if len(r["seeds"]) > 1:
        cells[-1] += f" (mean of seeds {','.join(map(str, r['seeds']))})"
    return cells


def grid_markdown(report: GridReport, title: str) -> str:
    s = report.settings
    bb = s["backbone"]
    cfg = s["base_config"]
    keys = report.label_keys
    fixed = {k: v for k, v in report.rows[0]["label"].items() if k not in keys}
    lines = [f"# lakead {title}", "", f"{s['date']}, lakead {s['lakead_version']}. Data: `{s['data_root']}` "
             f"({', '.join(s['categories'])}). Backbone `{bb['source']}` (sha256 {bb['fingerprint'][:16]}...)."]
    if s.get("command"):
        lines += ["", "Command:", "", "```", s["command"], "```"]
    lines += [
        "",
        f"Mean over categories, in %. Fixed: {', '.join(f'{k}={v}' for k, v in fixed.items()) or 'nothing'}; "
        f"image size {cfg['image_size'] or bb['image_size']}, shots drawn with seed {s['shot_seed']}. "
        f"PRO: FPR limit {PRO_FPR_LIMIT}.",
        "",
        metrics_table([(_label(r, keys), r["mean"]) for r in report.rows], first=keys),
        "",
        "Pixel metrics are binned (lakead.metrics): the largest bound on the binning error of any pixel number "
        f"here is {max((b for r in report.rows for b in r.get('pixel_error_bounds', {}).values()), default=0.0):.1e} "
        "(per row in the .json).",
    ]
    for cat in s["categories"]:
        lines += ["", f"## {cat}", "", metrics_table([(_label(r, keys), r["categories"][cat]) for r in report.rows], first=keys)]
    return "\n".join(lines) + "\n"
