"""Image and pixel metrics of anomaly detection, written once and used everywhere.

Higher score = more anomalous. Label 1 (or a non-zero mask pixel) = anomalous.

Image level (exact, scikit-learn): AUROC, average precision (AP) and F1-max, the largest F1
over every threshold.

Pixel level, over every pixel of every test image pooled: AUROC, AP, F1-max and PRO. PRO is
the MVTec-AD definition (Bergmann et al., "The MVTec Anomaly Detection Dataset", IJCV 2021):
for a threshold, the per-region overlap is the mean, over every connected defect region
(8-connectivity) of every image, of the fraction of that region's pixels at or above the
threshold, so each region weighs the same whatever its size; the false-positive rate is over
all normal pixels. PRO is the area under the overlap-vs-FPR curve for FPR in [0, 0.3]
(linearly interpolated at 0.3), divided by 0.3, so that a perfect map scores 1.0 and a
constant map 0.15. Two traps of public code are avoided: the area is not rescaled by the
FPR the curve happens to reach, and it is not integrated beyond 0.3.

Memory stays bounded whatever the number of images: :class:`PixelMetrics` keeps
histograms over a fixed set of score bins, never the pixels. A bin holds the float32
scores that share their top ``bits`` bits (sign, exponent and ``bits - 9`` mantissa bits),
so bins are relative: two scores share a bin only when they agree to about ``2**-(bits-9)``
of their magnitude (1/2048, about 0.05 %, at the default ``bits=20``, whatever the range of
the scores; 2**20 bins, 32 MiB). Every threshold between bins is exact; pixels within one
bin are treated as tied. The effect of that is bounded, and the bound is computed from the
histograms (:meth:`PixelMetrics.error_bounds`): a bin whose pixels all have the same score
contributes no error, since exact ties are ties in both computations. The evaluation
runner records these bounds next to every pixel metric it reports.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

#: The FPR limit of PRO (the MVTec-AD definition).
PRO_FPR_LIMIT = 0.3
#: Default number of leading bits of a float32 score that pick its bin.
HIST_BITS = 20
#: Pixels buffered before they are folded into the histograms.
_FLUSH_PIXELS = 1 << 20

__all__ = ["HIST_BITS", "PRO_FPR_LIMIT", "PixelMetrics", "image_metrics", "pixel_metrics", "pro_from_curve"]


# -- image level ----------------------------------------------------------------------------


def _f1_max_from_pr(precision: np.ndarray, recall: np.ndarray) -> float:
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(denom, dtype=np.float64), where=denom > 0)
    return float(f1.max())


def image_metrics(labels: Sequence[int] | np.ndarray, scores: Sequence[float] | np.ndarray) -> dict[str, float]:
    """AUROC, AP and F1-max of image scores against 0/1 labels (1 = anomalous).

    ``auroc`` is NaN when only one class is present; ``ap`` and ``f1_max`` are NaN when
    there is no anomalous image.

    >>> image_metrics([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8])
    {'auroc': 0.75, 'ap': 0.8333333333333333, 'f1_max': 0.8}
    """
    from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score

    y = _check_labels(labels)
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    if s.shape != y.shape:
        raise ValueError(f"got {y.size} labels but {s.size} scores")
    if not np.isfinite(s).all():
        raise ValueError(f"{int((~np.isfinite(s)).sum())} image score(s) are NaN or infinite")
    n_pos = int(y.sum())
    out = {"auroc": float("nan"), "ap": float("nan"), "f1_max": float("nan")}
    if 0 < n_pos < y.size:
        out["auroc"] = float(roc_auc_score(y, s))
    if n_pos > 0:
        out["ap"] = float(average_precision_score(y, s))
        precision, recall, _ = precision_recall_curve(y, s)
        out["f1_max"] = _f1_max_from_pr(precision, recall)
    return out


def oracle_recall(labels: Sequence[int] | np.ndarray, scores: Sequence[float] | np.ndarray, false_alarm_rate: float) -> float:
    """The highest recall (share of label-1 scores above a threshold) of any threshold whose
    false-alarm rate (share of label-0 scores above it) is at most ``false_alarm_rate``: what
    the best threshold, chosen knowing the test labels, would catch at that cost. NaN when a
    class is absent.

    >>> oracle_recall([0, 0, 0, 0, 1, 1], [0.1, 0.2, 0.3, 0.9, 0.5, 0.95], 0.25)
    1.0
    >>> oracle_recall([0, 0, 0, 0, 1, 1], [0.1, 0.2, 0.3, 0.9, 0.5, 0.95], 0.0)
    0.5
    """
    y, s = np.asarray(labels), np.asarray(scores, dtype=np.float64)
    good, bad = np.sort(s[y == 0]), s[y == 1]
    if not good.size or not bad.size:
        return float("nan")
    allowed = int(np.floor(false_alarm_rate * good.size + 1e-9))  # normal scores that may lie above
    t = good[good.size - allowed - 1] if allowed < good.size else -np.inf  # the lowest admissible threshold
    return float(np.mean(bad > t))


def _check_labels(labels: Sequence[int] | np.ndarray) -> np.ndarray:
    y = np.asarray(labels).reshape(-1)
    if y.dtype == np.bool_:
        return y.astype(np.int64)
    if y.size and not np.isin(y, (0, 1)).all():
        raise ValueError(f"labels must be 0 (normal) or 1 (anomalous), found {sorted(set(np.unique(y).tolist()) - {0, 1})[:5]}")
    return y.astype(np.int64)


# -- pixel level ----------------------------------------------------------------------------


def _monotone_bits(values: np.ndarray) -> np.ndarray:
    """float32 values -> uint32 codes in the same order (``a < b`` iff ``code(a) < code(b)``).

    Non-negative floats get their sign bit set; negative floats have every bit flipped, so
    that larger magnitudes sort lower. -0.0 is first turned into +0.0.
    """
    v = np.ascontiguousarray(values, dtype=np.float32) + np.float32(0.0)  # -0.0 -> +0.0
    u = v.view(np.uint32)
    neg = (u >> np.uint32(31)).astype(bool)
    return np.where(neg, ~u, u | np.uint32(0x80000000))


def pro_from_curve(fpr: np.ndarray, pro: np.ndarray, limit: float = PRO_FPR_LIMIT) -> float:
    """Area under a PRO curve for FPR in ``[0, limit]``, divided by ``limit``.

    ``fpr`` ascending from 0 to 1 and ``pro`` the overlap at the same thresholds. The curve
    is linearly interpolated at ``limit``, as in the MVTec-AD evaluation code.

    >>> pro_from_curve(np.array([0.0, 1.0]), np.array([0.0, 1.0]))  # a constant map
    0.15
    """
    x = np.asarray(fpr, dtype=np.float64)
    y = np.asarray(pro, dtype=np.float64)
    if x.size < 2 or x[0] != 0.0 or x[-1] < limit or np.any(np.diff(x) < 0):
        raise ValueError("fpr must rise from 0 to at least the limit")
    inside = x <= limit
    xi, yi = x[inside], y[inside]
    area = float(np.sum(0.5 * (yi[1:] + yi[:-1]) * np.diff(xi)))
    if xi[-1] < limit:
        j = int(inside.sum())  # first point beyond the limit
        y_lim = y[j - 1] + (y[j] - y[j - 1]) * (limit - x[j - 1]) / (x[j] - x[j - 1])
        area += 0.5 * (y[j - 1] + y_lim) * (limit - x[j - 1])
    return float(round(area / limit, 15))


class PixelMetrics:
    """Streaming pixel-level AUROC, AP, F1-max and PRO in bounded memory.

    >>> m = PixelMetrics()
    >>> m.update(np.array([[0, 1], [0, 0]]), np.array([[0.1, 0.9], [0.2, 0.3]]))
    >>> m.compute()
    {'auroc': 1.0, 'ap': 1.0, 'f1_max': 1.0, 'pro': 1.0}

    ``update(mask, amap)`` adds one image: an ``(H, W)`` mask (non-zero = defect) and an
    ``(H, W)`` map of the same size (sizes may differ from image to image). Memory:
    five arrays of ``2**bits`` entries (32 MiB at the default) plus a buffer of about a
    million pixels, whatever the number of images. See the module docstring for the bins
    and :meth:`error_bounds` for how far the results can be from exact.
    """

    def __init__(self, bits: int = HIST_BITS) -> None:
        if not 10 <= bits <= 24:
            raise ValueError(f"bits must be between 10 and 24, got {bits}")
        self.bits = bits
        n_bins = 1 << bits
        self._shift = np.uint32(32 - bits)
        self._neg = np.zeros(n_bins, np.int64)  # normal pixels per bin
        self._pos = np.zeros(n_bins, np.int64)  # defect pixels per bin
        self._region = np.zeros(n_bins, np.float64)  # sum over defect pixels of 1 / size of their region
        self._lo = np.full(n_bins, np.iinfo(np.uint32).max, np.uint32)  # smallest score code per bin
        self._hi = np.zeros(n_bins, np.uint32)  # largest score code per bin
        self._buffer: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        self._buffered = 0
        self.images = 0
        self.regions = 0
        self._curve: dict[str, np.ndarray] | None = None

    def update(self, mask: np.ndarray, amap: np.ndarray) -> None:
        """Add one image's mask and anomaly map."""
        from scipy.ndimage import label

        m = np.asarray(mask)
        a = np.asarray(amap)
        if m.ndim != 2 or a.ndim != 2:
            raise ValueError(f"mask and map must be 2-D (H, W) arrays, got shapes {m.shape} and {a.shape}")
        if m.shape != a.shape:
            raise ValueError(f"mask of size {m.shape} and map of size {a.shape} differ")
        if not np.isfinite(a).all():
            raise ValueError("anomaly map holds NaN or infinite values")
        defect = m != 0
        codes = _monotone_bits(a).reshape(-1)
        weight = np.zeros(defect.shape, np.float64)
        if defect.any():
            regions, n = label(defect, structure=np.ones((3, 3), dtype=int))  # 8-connectivity
            sizes = np.bincount(regions.reshape(-1))
            weight[defect] = 1.0 / sizes[regions[defect]]
            self.regions += int(n)
        self._buffer.append((codes, defect.reshape(-1), weight.reshape(-1)))
        self._buffered += codes.size
        self.images += 1
        self._curve = None
        if self._buffered >= _FLUSH_PIXELS:
            self._flush()

    def _flush(self) -> None:
        if not self._buffer:
            return
        codes = np.concatenate([b[0] for b in self._buffer])
        defect = np.concatenate([b[1] for b in self._buffer])
        weight = np.concatenate([b[2] for b in self._buffer])
        self._buffer, self._buffered = [], 0
        keys = (codes >> self._shift).astype(np.intp)
        n_bins = self._neg.size
        self._neg += np.bincount(keys[~defect], minlength=n_bins)
        self._pos += np.bincount(keys[defect], minlength=n_bins)
        self._region += np.bincount(keys[defect], weights=weight[defect], minlength=n_bins)
        np.minimum.at(self._lo, keys, codes)
        np.maximum.at(self._hi, keys, codes)

    # -- the curve over bin thresholds -----------------------------------------------------

    def _build(self) -> dict[str, np.ndarray]:
        """Cumulative counts at every threshold "score >= the lowest score of bin b",
        from the highest bin down; index 0 is the threshold above every score."""
        if self._curve is not None:
            return self._curve
        self._flush()
        used = np.flatnonzero((self._neg + self._pos) > 0)[::-1]  # occupied bins, highest scores first
        pos, neg, reg = self._pos[used], self._neg[used], self._region[used]
        zero = np.zeros(1)
        self._curve = {
            "pos": pos,
            "neg": neg,
            "exact": self._lo[used] == self._hi[used],  # every pixel of the bin has the same score
            "tp": np.concatenate([zero, np.cumsum(pos)]),
            "fp": np.concatenate([zero, np.cumsum(neg)]),
            "overlap": np.concatenate([zero, np.cumsum(reg)]),
        }
        return self._curve

    def roc_curve(self) -> tuple[np.ndarray, np.ndarray]:
        """``(fpr, tpr)`` at every bin threshold, from (0, 0) to (1, 1)."""
        c = self._build()
        p, n = c["tp"][-1], c["fp"][-1]
        if p == 0 or n == 0:
            raise ValueError("the ROC curve needs both normal and defect pixels")
        return c["fp"] / n, c["tp"] / p

    def pro_curve(self) -> tuple[np.ndarray, np.ndarray]:
        """``(fpr, per-region overlap)`` at every bin threshold, from (0, 0) to (1, 1)."""
        c = self._build()
        if self.regions == 0 or c["fp"][-1] == 0:
            raise ValueError("the PRO curve needs defect regions and normal pixels")
        return c["fp"] / c["fp"][-1], c["overlap"] / self.regions

    def compute(self) -> dict[str, float]:
        """``{"auroc", "ap", "f1_max", "pro"}`` over every pixel added so far.

        All four are NaN when there is no defect pixel; ``auroc`` and ``pro`` are NaN when
        there is no normal pixel.
        """
        c = self._build()
        out = {"auroc": float("nan"), "ap": float("nan"), "f1_max": float("nan"), "pro": float("nan")}
        tp, fp = c["tp"], c["fp"]
        p, n = tp[-1], fp[-1]
        if p == 0:
            return out
        precision = np.divide(tp, tp + fp, out=np.ones_like(tp), where=(tp + fp) > 0)
        recall = tp / p
        out["ap"] = float(np.sum(np.diff(recall) * precision[1:]))  # the step-wise AP of scikit-learn
        out["f1_max"] = float(np.max(2 * tp / (tp + fp + p)))
        if n > 0:
            fpr, tpr = fp / n, tp / p
            out["auroc"] = float(np.trapezoid(tpr, fpr))
            out["pro"] = pro_from_curve(*self.pro_curve())
        return out

    def error_bounds(self) -> dict[str, float]:
        """Upper bounds on ``|binned - exact|`` for each metric of :meth:`compute`.

        Only bins holding different scores can differ from the exact computation:

        - AUROC: a (defect, normal) pixel pair in one bin counts 1/2; exactly it counts 0,
          1/2 or 1, so the bound is ``1/2 * sum_b pos_b * neg_b / (P * N)``.
        - AP: within a bin, the precision of any exact threshold lies between the bin's
          lowest and highest possible precision; the bound sums ``pos_b / P`` times that span.
        - F1-max: thresholds between bins are exact, so the binned value is never above the
          exact one; within a bin F1 can be at most ``2 (TP + pos_b) / (TP + pos_b + FP + P)``.
        - PRO: the exact curve between two bin thresholds is monotone, so it lies in the box
          they span; the trapezoid is off by at most half the box (all of it for the box
          cut at FPR 0.3), divided by 0.3.
        """
        c = self._build()
        tp, fp, pos, neg, inexact = c["tp"], c["fp"], c["pos"], c["neg"], ~c["exact"]
        p, n = tp[-1], fp[-1]
        nan = float("nan")
        out = {"auroc": nan, "ap": nan, "f1_max": nan, "pro": nan}
        if p == 0:
            return out
        tp0, fp0 = tp[:-1], fp[:-1]  # counts above each bin
        p_hi = np.divide(tp0 + pos, tp0 + pos + fp0, out=np.ones_like(tp0), where=(tp0 + pos + fp0) > 0)
        p_lo = (tp0 + 1) / (tp0 + 1 + fp0 + neg)
        out["ap"] = float(np.sum(np.where(inexact & (pos > 0), pos / p * (p_hi - p_lo), 0.0)))
        f1_within = np.where(inexact, 2 * (tp0 + pos) / (tp0 + pos + fp0 + p), 0.0)
        out["f1_max"] = float(max(0.0, f1_within.max(initial=0.0) - np.max(2 * tp / (tp + fp + p))))
        if n > 0:
            out["auroc"] = float(0.5 * np.sum(np.where(inexact, pos * neg, 0)) / (p * n))
            f, o = self.pro_curve()
            df, do = np.diff(f), np.diff(o)
            full = inexact & (f[1:] <= PRO_FPR_LIMIT)
            cut = inexact & (f[:-1] < PRO_FPR_LIMIT) & (f[1:] > PRO_FPR_LIMIT)
            box = np.sum(np.where(full, 0.5 * df * do, 0.0)) + np.sum(np.where(cut, (PRO_FPR_LIMIT - f[:-1]) * do, 0.0))
            out["pro"] = float(box / PRO_FPR_LIMIT)
        return out


def pixel_metrics(
    masks: Iterable[np.ndarray], maps: Iterable[np.ndarray], *, bits: int = HIST_BITS
) -> dict[str, float]:
    """Pixel AUROC, AP, F1-max and PRO of anomaly maps against masks (non-zero = defect).

    ``masks`` and ``maps`` are sequences (or iterables) of ``(H, W)`` arrays, paired in
    order; sizes may differ between images but each map must match its mask. Memory is
    bounded (see :class:`PixelMetrics`, which also gives the error bounds).

    >>> mask = np.zeros((4, 4)); mask[1:3, 1:3] = 1
    >>> pixel_metrics([mask], [mask])["pro"]
    1.0
    """
    acc = PixelMetrics(bits=bits)
    for i, (mask, amap) in enumerate(_zip_strict(masks, maps)):
        try:
            acc.update(mask, amap)
        except ValueError as exc:
            raise ValueError(f"image {i}: {exc}") from None
    return acc.compute()


def _zip_strict(a: Iterable[np.ndarray], b: Iterable[np.ndarray]):
    """Pairs of ``a`` and ``b``; a ValueError when one runs out before the other."""
    ia, ib = iter(a), iter(b)
    end = object()
    i = 0
    while True:
        x, y = next(ia, end), next(ib, end)
        if x is end and y is end:
            return
        if x is end or y is end:
            raise ValueError(f"got more {'maps' if x is end else 'masks'} than {'masks' if x is end else 'maps'} (after {i} pairs)")
        yield x, y
        i += 1
