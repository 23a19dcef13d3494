"""Running an evaluation: fit on one category's shots and score its test split
(:func:`evaluate_category`), over a whole dataset (:func:`evaluate`, which writes the report).
Images are read and scored one batch at a time and pixel metrics are accumulated in fixed
memory."""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
from collections.abc import Callable, Collection, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Union

import numpy as np

from .._version import __version__
from ..api import Detector, Prediction, Runtime
from ..backbones import Backbone, load_backbone
from ..data import Category, Sample, read_mask, select_shots
from ..errors import ConfigError, ImageLoadError, LakeadError
from ..fileio import atomic_write_bytes
from ..layouts import load_any, sample_masks
from ..spro import SproMetrics, defect_of
from ..methods.lake import LakeConfig
from ..methods import SCORE_FIELDS, Method, get_method
from ..metrics import PRO_FPR_LIMIT, PixelMetrics, image_metrics
from ..outputs import EVALUATION, check_output, output_directory
from .report import write_report
from .results import CategoryResult, EvalReport, Example, choose_examples, decision_rates, mean_metrics

log = logging.getLogger(__name__)

#: Longest side of the example images kept for the figures.
EXAMPLE_SIDE = 256



# -- one category -------------------------------------------------------------------------


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
    config: Any,
    backbone: Backbone,
    *,
    runtime: Runtime = Runtime(),
    method: str | Method = "lake",
    shots: int | None,
    seed: int | None,
    score: str | None = None,
    examples: int = 0,
    images: ImageCache | None = None,
    on_progress: Callable[[int], None] | None = None,
    save_maps: Collection[str] = (),
    maps_dir: Path | None = None,
) -> CategoryResult:
    """Fit a detector of ``method`` (a name of :data:`lakead.methods.METHODS`, or a
    :class:`~lakead.methods.Method`; built by :meth:`Method.build` from ``config``, with
    ``backbone`` and ``runtime``) on ``shots`` normal training images of ``category``
    (drawn by :func:`~lakead.data.select_shots` with ``seed``), score every test image,
    ``runtime.batch_size`` images at a time, and compute the metrics. ``score`` picks the
    image score (fused, visual or semantic; default: the method's). Defect images without a
    mask count for image metrics only. ``images`` keeps decoded images for the next call
    (grids). ``on_progress(n)`` after every batch. ``save_maps`` (``"png"`` and/or ``"npy"``)
    keeps each test image's map under ``maps_dir`` (see :func:`save_maps_of`)."""
    m = get_method(method) if isinstance(method, str) else method
    score = m.score if score is None else score
    if score not in SCORE_FIELDS:
        raise ConfigError(f"score must be one of {SCORE_FIELDS}, got {score!r}")
    runtime = runtime.validate()
    chosen, rule = select_shots(category.train, shots, seed)
    det = m.build(config, backbone, runtime)
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
    out_of_scope = np.zeros(len(test), dtype=bool)
    masks = MaskCounts()  # the defect masks of the fitted levels against the ground truth
    saturation = {v: (t, r) for v, t, r in getattr(category, "saturation", ())}  # MVTec LOCO: sPRO
    spro = SproMetrics() if saturation else None
    rows: list[dict[str, Any]] = []
    kept: dict[int, Example] = {}
    excluded: list[str] = []
    bs = runtime.batch_size
    t0 = time.perf_counter()
    for start in range(0, len(test), bs):
        batch = test[start : start + bs]
        arrays = [read(s.path) for s in batch]
        pred = det.predict(arrays)
        if save_maps:
            save_maps_of(category, batch, arrays, pred, det, save_maps, maps_dir)
        for j, (s, arr) in enumerate(zip(batch, arrays)):
            i = start + j
            value = float(getattr(pred, score)[j])
            if not math.isfinite(value):
                raise LakeadError(f"{s.path}: the {score} score is {value} (the backbone gave non-finite features?)")
            scores[i] = value
            flagged[i] = bool(pred.anomalous[j])
            out_of_scope[i] = bool(pred.out_of_scope[j])
            rows.append(_row(category.name, s, pred, j, value))
            mask = _mask_for(s, arr.shape[:2])
            if mask is None:
                excluded.append(str(s.path))
            else:
                acc.update(mask, pred.maps[j])
                masks.update(mask, pred.regions(j)[0])
                if spro is not None and s.label == 0:
                    spro.add_normal(pred.maps[j])
                elif spro is not None:
                    spro.add_defects(pred.maps[j], [defect_of(f, saturation, mask.shape) for f in sample_masks(s)])
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
        pixel={**acc.compute(), **({"spro": spro.compute()} if spro is not None else {})},
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
        decision={**decision_rates(labels, flagged, det.threshold_, scores), **masks.compute(),
                  "out_of_scope_rate": float(out_of_scope.mean()) if len(test) else float("nan"),
                  "rule": str(getattr(det, "threshold_rule_", "?"))},
        neurons=det.summary().get("k"),
    )


#: What decodes an image for :class:`ImageCache`: a ``read(path)`` callable, or a detector
#: (its ``read_image``, so the image is checked as ``fit`` and ``predict`` check it).
ImageReader = Union[Callable[[Path], np.ndarray], Detector]


def _reader(source: ImageReader) -> Callable[[Path], np.ndarray]:
    read_image = getattr(source, "read_image", None)
    if read_image is not None:
        return lambda p: read_image(p, str(p))
    if callable(source):
        return source
    raise TypeError(f"ImageCache reads with a read(path) callable or a detector, got {type(source).__name__}")


class MaskCounts:
    """Defect masks against ground-truth masks, accumulated image by image: the pixel F1 of
    the masks and the share of ground-truth regions (connected areas) they touch."""

    def __init__(self) -> None:
        self.tp = self.fp = self.fn = 0
        self.regions = self.found = 0

    def update(self, truth: np.ndarray, predicted: np.ndarray) -> None:
        from scipy import ndimage

        self.tp += int((truth & predicted).sum())
        self.fp += int((~truth & predicted).sum())
        self.fn += int((truth & ~predicted).sum())
        labels, count = ndimage.label(truth, structure=np.ones((3, 3), dtype=bool))
        if count:
            hit = np.unique(labels[predicted & truth])
            self.regions += count
            self.found += int((hit > 0).sum())

    def compute(self) -> dict[str, float]:
        f1 = 2 * self.tp / (2 * self.tp + self.fp + self.fn) if self.tp + self.fp + self.fn else float("nan")
        return {"mask_pixel_f1": float(f1), "region_recall": self.found / self.regions if self.regions else float("nan")}


class ImageCache:
    """Decoded images kept between the variants of a grid, up to ``max_bytes`` in all
    (beyond that, images are decoded again each time).

    Each read names what decodes the image: a ``read(path)`` callable or a
    :class:`~lakead.api.Detector` (any method).
    """

    def __init__(self, max_bytes: int = 2 << 30) -> None:
        self.max_bytes = max_bytes
        self.bytes = 0
        self._arrays: dict[Path, np.ndarray] = {}

    def read(self, source: ImageReader, path: Path) -> np.ndarray:
        arr = self._arrays.get(path)
        if arr is None:
            arr = _reader(source)(path)
            if self.bytes + arr.nbytes <= self.max_bytes:
                self._arrays[path] = arr
                self.bytes += arr.nbytes
        return arr

    def read_or_path(self, source: ImageReader, path: Path) -> np.ndarray | Path:
        """The decoded image, or the path itself when it cannot be read: ``fit`` then reads
        it again and skips it with its own warning."""
        try:
            return self.read(source, path)
        except ImageLoadError:
            return path

    def clear(self) -> None:
        self._arrays.clear()
        self.bytes = 0


def _mask_for(s: Sample, shape: tuple[int, int]) -> np.ndarray | None:
    """The sample's mask at ``shape`` (the union of its mask files: MVTec LOCO has one per
    defect); all-zero for a normal image; None when missing."""
    if s.label == 0:
        return np.zeros(shape, dtype=bool)
    files = sample_masks(s)
    if not files:
        return None
    mask = read_mask(files[0], size=shape)
    for more in files[1:]:
        mask |= read_mask(more, size=shape)
    return mask


def save_maps_of(category: Category, batch: Sequence[Sample], arrays: Sequence[np.ndarray], pred: Prediction,
                 det: Detector, kinds: Collection[str], maps_dir: Path | None) -> None:
    """Write each image's map as ``lakead predict`` does, each file atomically, named by the
    image's path under its category folder: ``overlays/<category>/<path>.png`` (the map over
    the image with the defect regions outlined, score, decision and colour bar; ``"png"``)
    and ``maps/<category>/<path>.npy`` (the raw float32 map at the image's size; ``"npy"``)."""
    from ..viz import annotate, npy_bytes, overlay, png_bytes, verdict_lines

    if maps_dir is None:
        raise ConfigError("save_maps needs maps_dir, the folder to write the maps to")
    vmin, vmax = det.map_range_
    for j, (s, arr) in enumerate(zip(batch, arrays)):
        try:
            rel = s.path.relative_to(category.root).as_posix()
        except ValueError:
            rel = s.path.name
        name = f"{category.name}/{rel}"
        if "png" in kinds:
            text = verdict_lines(float(pred.scores[j]), pred.threshold, bool(pred.anomalous[j]), bool(pred.out_of_scope[j]))
            image = annotate(overlay(arr, pred.maps[j], vmin, vmax), pred.regions(j)[0], text, vmin, vmax,
                             anomalous=bool(pred.anomalous[j]))
            atomic_write_bytes(maps_dir / "overlays" / f"{name}.png", png_bytes(image))
        if "npy" in kinds:
            atomic_write_bytes(maps_dir / "maps" / f"{name}.npy", npy_bytes(pred.maps[j]))


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


def _categories(data: str | Path | Sequence[Category], categories: Sequence[str] | None,
                rule: Any = None) -> tuple[list[Category], str]:
    """Categories and the data root to report, from a folder (volumes sliced by ``rule``, a
    :class:`lakead.medical.ReadRule`) or already loaded categories."""
    if isinstance(data, (str, Path)):
        return load_any(data, categories, rule=rule), str(Path(data).resolve())
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
    method: str | Method = "lake",
    runtime: Runtime | None = None,
    examples: int = 4,
    figures: bool = True,
    command: str | None = None,
    backbone: Backbone | None = None,
    on_progress: Callable[[int], None] | None = None,
    save_maps: Collection[str] = (),
) -> EvalReport:
    """Evaluate ``method`` (a name of :data:`lakead.methods.METHODS` or a
    :class:`~lakead.methods.Method`) configured by ``config`` on every category of ``data``
    (a dataset folder, see :func:`~lakead.data.load_dataset`, or loaded categories) and write
    the report to ``out_dir`` (a new folder, or one holding only an earlier evaluation, replaced
    when the new one is complete: :mod:`lakead.outputs`).
    ``runtime`` says how to run (device, batch size, precision; default :class:`Runtime`()),
    recorded in the report beside the configuration. ``on_progress(n)`` is called as images
    are processed (see :func:`images_to_process`). ``save_maps`` (``"png"`` and/or ``"npy"``)
    keeps the maps in ``out_dir/overlays/`` and ``out_dir/maps/`` (see :func:`save_maps_of`)."""
    rt = (runtime or Runtime()).validate()
    unknown = sorted(set(save_maps) - {"png", "npy"})
    if unknown:
        raise ConfigError(f"save_maps: {', '.join(unknown)} is not png or npy")
    cats, data_root = _categories(data, categories, getattr(config, "read_rule", None))
    check_output(out_dir, EVALUATION, inputs=[data_root])  # before the work
    m = get_method(method) if isinstance(method, str) else method
    cfg = m.configure(config)
    bb = backbone or load_backbone(cfg.backbone, need_text=getattr(cfg, "use_text", False) or m.needs_text)
    _check_method(m, bb, cfg)
    cfg = _without_missing_text(cfg, bb)
    results = []
    with output_directory(out_dir, EVALUATION, inputs=[data_root]) as tmp:  # the maps and the report, put in place together
        for cat in cats:
            log.info("%s: %s shots, %d test images", cat.name, _n_shots(cat, shots), len(cat.test))
            results.append(evaluate_category(cat, cfg, bb, runtime=rt, method=m, shots=shots, seed=seed,
                                             examples=examples if figures else 0, on_progress=on_progress,
                                             save_maps=save_maps, maps_dir=tmp))
        settings = _settings(data_root, cfg, rt, bb, m, shots, seed, command)
        settings["data_notes"] = sorted({note for c in cats if (note := getattr(c, "note", ""))})
        settings["saved_maps"] = sorted(save_maps)
        report = EvalReport(results, mean_metrics([r.metrics() for r in results]), settings, Path(out_dir))
        write_report(report, figures=figures, into=tmp)
    return report


def has_text_probe(cfg: Any, bb: Backbone) -> bool:
    """Whether a configuration on this backbone can run a text probe: the backbone has a text
    tower, or the configuration takes the probe from another model (``text_backbone``)."""
    return bb.has_text or getattr(cfg, "text_backbone", None) is not None


def method_description(m: Method, cfg: Any) -> str:
    """What a method does as run with ``cfg``: a method that fuses the text probe says so only
    when the probe is on."""
    if getattr(cfg, "use_text", None) is False and not m.needs_text and " + text probe, fused" in m.description:
        return m.description.replace(" + text probe, fused", "") + "; text probe off: the visual score alone"
    return m.description


def _check_method(m: Method, bb: Backbone, cfg: Any = None) -> None:
    if m.needs_text and not has_text_probe(cfg, bb):
        raise ConfigError(f"method {m.name!r} needs a text tower; backbone {bb.info.source} has none")
    if m.backbone_kinds and bb.info.kind not in m.backbone_kinds:
        raise ConfigError(f"method {m.name!r} runs on {', '.join(m.backbone_kinds)} backbones; {bb.info.source} is {bb.info.kind}")


def _without_missing_text(cfg: Any, bb: Backbone) -> Any:
    """The text probe turned off, with one warning, for a backbone without a text tower (so
    that each category's fit does not warn again)."""
    if getattr(cfg, "use_text", False) and not has_text_probe(cfg, bb):
        log.warning("backbone %s has no text tower: the text probe is off (semantic scores are 0)", bb.info.source)
        return dataclasses.replace(cfg, use_text=False)
    return cfg


def _n_shots(cat: Category, shots: int | None) -> int:
    return len(cat.train) if shots is None else min(shots, len(cat.train))


def runtime_settings(rt: Runtime) -> dict[str, Any]:
    """How a run was carried out, as recorded in a report: the runtime as given and the
    device it resolved to."""
    return {**dataclasses.asdict(rt), "device_used": str(rt.torch_device())}


def _settings(data_root, cfg: Any, rt: Runtime, bb: Backbone, m: Method, shots, seed, command) -> dict[str, Any]:
    return {
        "lakead_version": __version__,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": command,
        "data_root": str(data_root),
        "method": m.name,
        "method_description": method_description(m, cfg),
        "image_score": m.score,
        "shots": "all" if shots is None else shots,
        "shot_seed": seed,
        "backbone": bb.info.to_dict(),
        "config": cfg.to_dict(),
        "runtime": runtime_settings(rt),
        "pro_fpr_limit": PRO_FPR_LIMIT,
    }
