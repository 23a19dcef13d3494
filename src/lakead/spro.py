"""sPRO, the saturated per-region overlap of MVTec LOCO (Bergmann et al., "Beyond Dents and
Scratches: Logical Constraints in Unsupervised Anomaly Detection and Localization", IJCV 2022).

As the paper defines it:

- a defect is one ground-truth mask file of a test image (one file may hold several connected
  parts: it is still one defect);
- its saturation area ``s`` comes from the category's ``defects_config.json``, by the pixel
  value the mask file uses: with ``relative_saturation``, ``s = saturation_threshold * area``,
  else ``s = min(saturation_threshold, area)`` (pixels);
- at a threshold ``t``, ``sPRO(t)`` is the mean over every defect of
  ``min(|defect pixels with map >= t| / s, 1)``: a defect counts as found once ``s`` of its
  pixels are flagged, however large it is;
- the false-positive rate at ``t`` is the share of the pixels of the defect-free test images
  at or above ``t`` (logical anomalies can lie outside their annotation, so defective images
  are not used for it);
- AUC-sPRO is the area under sPRO against that rate for a rate in ``[0, limit]``, divided by
  ``limit`` (:func:`lakead.metrics.pro_from_curve`); the paper's main figure uses 0.05
  (:data:`SPRO_FPR_LIMIT`).

Scores are binned as in :class:`lakead.metrics.PixelMetrics` (relative bins of about 0.05 %
at the default 20 bits; pixels in one bin are treated as tied), so memory stays bounded
whatever the number of images. Written from the paper's definition; the official MVTec LOCO
evaluation script was not available to compare against.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .errors import LakeadError
from .metrics import HIST_BITS, _monotone_bits, pro_from_curve

#: The FPR limit of AUC-sPRO in MVTec LOCO's main results.
SPRO_FPR_LIMIT = 0.05
#: The file of saturation thresholds in each MVTec LOCO category folder.
DEFECTS_CONFIG = "defects_config.json"

#: pixel value -> (saturation_threshold, relative_saturation)
Saturation = dict[int, tuple[float, bool]]


def read_defects_config(path: str | os.PathLike) -> Saturation:
    """``defects_config.json``: a list of ``{"defect_name", "pixel_value",
    "saturation_threshold", "relative_saturation"}``, keyed by pixel value."""
    p = Path(path)
    try:
        entries = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise LakeadError(f"{p}: cannot be read as JSON ({exc})") from None
    out: Saturation = {}
    if not isinstance(entries, list):
        raise LakeadError(f"{p}: expected a list of defects, each with pixel_value, saturation_threshold and "
                          "relative_saturation")
    for i, e in enumerate(entries):
        try:
            value, threshold, relative = int(e["pixel_value"]), float(e["saturation_threshold"]), e["relative_saturation"]
        except (TypeError, KeyError, ValueError):
            raise LakeadError(f"{p}: entry {i} needs pixel_value, saturation_threshold and relative_saturation, "
                              f"got {e!r}"[:300]) from None
        if not isinstance(relative, bool) or threshold <= 0:
            raise LakeadError(f"{p}: entry {i}: relative_saturation must be true or false and saturation_threshold "
                              f"positive, got {relative!r} and {threshold}")
        out[value] = (threshold, relative)
    return out


def saturation_area(area: int, threshold: float, relative: bool) -> float:
    """Pixels of a defect that count as finding all of it.

    >>> saturation_area(1000, 0.5, True), saturation_area(1000, 300, False), saturation_area(200, 300, False)
    (500.0, 300.0, 200.0)
    """
    return float(threshold * area) if relative else float(min(threshold, area))


def defect_of(mask_file: str | os.PathLike, config: Saturation, size: tuple[int, int]) -> tuple[np.ndarray, float]:
    """One mask file as ``(defect pixels (H, W) bool, saturation area)``: its pixel value
    (one non-zero value per file) picks its entry of ``config``."""
    from PIL import UnidentifiedImageError

    from .images import open_image

    p = Path(mask_file)
    try:
        with open_image(p) as im:
            arr = np.asarray(im.convert("L") if im.mode not in ("L", "I", "I;16") else im)
    except (OSError, UnidentifiedImageError) as exc:
        raise LakeadError(f"{p}: cannot be read as a mask ({exc})") from None
    if arr.shape != tuple(size):
        raise LakeadError(f"mask {p} is {arr.shape[1]}x{arr.shape[0]} pixels, its image {size[1]}x{size[0]}")
    values = np.unique(arr[arr != 0])
    defect = arr != 0
    if values.size == 0:
        return defect, 1.0  # an empty mask file: a defect nobody can find (sPRO 0 for it)
    if values.size > 1 or int(values[0]) not in config:
        raise LakeadError(f"{p}: pixel value(s) {values[:5].tolist()} do not name one defect of {DEFECTS_CONFIG} "
                          f"(known: {sorted(config)})")
    threshold, relative = config[int(values[0])]
    return defect, saturation_area(int(defect.sum()), threshold, relative)


class SproMetrics:
    """AUC-sPRO accumulated image by image in bounded memory.

    ``add_normal(amap)`` for each defect-free test image; ``add_defects(amap, defects)`` for
    each defective one, with its ``(mask, saturation area)`` pairs (:func:`defect_of`).

    >>> m = SproMetrics()
    >>> m.add_normal(np.array([[0.1, 0.2], [0.3, 0.2]]))
    >>> m.add_defects(np.array([[0.9, 0.1], [0.1, 0.1]]), [(np.array([[1, 1], [0, 0]], bool), 1.0)])
    >>> m.compute()  # one flagged pixel saturates the defect before any false positive
    1.0
    """

    def __init__(self, bits: int = HIST_BITS) -> None:
        self._shift = np.uint32(32 - bits)
        self._neg = np.zeros(1 << bits, np.int64)  # pixels of defect-free images per bin
        self._gain = np.zeros(1 << bits, np.float64)  # rise of the sum of capped overlaps at each bin
        self.defects = 0

    def _keys(self, amap: np.ndarray) -> np.ndarray:
        a = np.asarray(amap)
        if not np.isfinite(a).all():
            raise ValueError("anomaly map holds NaN or infinite values")
        return (_monotone_bits(a).reshape(-1) >> self._shift).astype(np.intp)

    def add_normal(self, amap: np.ndarray) -> None:
        self._neg += np.bincount(self._keys(amap), minlength=self._neg.size)

    def add_defects(self, amap: np.ndarray, defects: Sequence[tuple[np.ndarray, float]]) -> None:
        keys = self._keys(amap)
        for mask, saturation in defects:
            m = np.asarray(mask, bool).reshape(-1)
            if m.size != keys.size:
                raise ValueError(f"mask of {m.size} pixels for a map of {keys.size}")
            self.defects += 1
            bins, counts = np.unique(keys[m], return_counts=True)  # ascending bins
            if not bins.size:
                continue
            found = np.minimum(np.cumsum(counts[::-1]) / max(saturation, 1e-12), 1.0)  # from the highest bin down
            self._gain[bins[::-1]] += np.diff(found, prepend=0.0)

    def curve(self) -> tuple[np.ndarray, np.ndarray]:
        """``(fpr, sPRO)`` at every bin threshold, from (0, 0) down to the lowest score."""
        if self.defects == 0 or self._neg.sum() == 0:
            raise ValueError("sPRO needs defects and defect-free test images")
        used = np.flatnonzero((self._neg > 0) | (self._gain != 0))[::-1]
        fp = np.concatenate([[0], np.cumsum(self._neg[used])])
        spro = np.minimum(np.concatenate([[0.0], np.cumsum(self._gain[used])]) / self.defects, 1.0)  # rounding
        return fp / fp[-1], spro

    def compute(self, limit: float = SPRO_FPR_LIMIT) -> float:
        """AUC-sPRO up to an FPR of ``limit``, divided by ``limit``; NaN without defects or
        defect-free images."""
        try:
            return pro_from_curve(*self.curve(), limit=limit)
        except ValueError:
            return float("nan")
