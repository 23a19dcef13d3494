"""What an evaluation measured: the result dataclasses and the pure helpers about them (table
columns, means, decision rates, formatting, the choice of example images). No I/O."""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..data import Sample
from ..metrics import oracle_recall

IMAGE_KEYS = ("auroc", "f1_max", "ap")
PIXEL_KEYS = ("auroc", "f1_max", "ap", "pro")
#: Column names of the tables, in order: image-level then pixel-level metrics.
METRIC_COLUMNS = tuple(f"image_{k}" for k in IMAGE_KEYS) + tuple(f"pixel_{k}" for k in PIXEL_KEYS)
HEADERS = {
    "image_auroc": "I-AUROC", "image_f1_max": "I-F1max", "image_ap": "I-AP",
    "pixel_auroc": "P-AUROC", "pixel_f1_max": "P-F1max", "pixel_ap": "P-AP", "pixel_pro": "PRO",
}



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
    neurons: int | None = None  # the fitted detector's k (neurons kept), where it has one

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
            "k": self.neurons,
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


#: The numbers of a decision row: at the fitted threshold, and the oracle at the same false alarms.
DECISION_KEYS = ("false_alarm_rate", "recall", "oracle_recall")


def decision_rates(labels: np.ndarray, flagged: np.ndarray, threshold: float, scores: np.ndarray | None = None) -> dict[str, float]:
    """How the yes/no decisions at the threshold learned from normal images alone fare:
    the share of normal test images flagged (false alarms) and of defective ones flagged
    (recall), and, given the image ``scores``, the recall of the best threshold with no more
    false alarms (:func:`lakead.metrics.oracle_recall`): what not seeing defects costs.
    NaN where a class is absent.

    >>> decision_rates(np.array([0, 0, 1, 1]), np.array([False, True, True, True]), 1.5, np.array([1, 2, 3, 4]))
    {'threshold': 1.5, 'false_alarm_rate': 0.5, 'recall': 1.0, 'oracle_recall': 1.0}
    """
    normal, defect = flagged[labels == 0], flagged[labels == 1]
    far = float(normal.mean()) if normal.size else float("nan")
    return {
        "threshold": float(threshold),
        "false_alarm_rate": far,
        "recall": float(defect.mean()) if defect.size else float("nan"),
        "oracle_recall": oracle_recall(labels, scores, far) if scores is not None and math.isfinite(far) else float("nan"),
    }



# -- a whole dataset ------------------------------------------------------------------------


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


def format_percent(v: float | None, digits: int = 1) -> str:
    """A metric in percent for tables; "n/a" when undefined."""
    if v is None or not math.isfinite(v):
        return "n/a"
    return f"{100 * v:.{digits}f}"


def _clean(d: dict[str, float]) -> dict[str, float | None]:
    """JSON has no NaN: undefined metrics become null."""
    return {k: (None if v is None or (isinstance(v, float) and not math.isfinite(v)) else v) for k, v in d.items()}



# -- grids ------------------------------------------------------------------------------------


@dataclass
class GridReport:
    rows: list[dict[str, Any]]  # one per variant: its label, mean metrics, and per category
    label_keys: list[str]
    out_dir: Path
    settings: dict[str, Any]
